"""The multi-domain ranking backbone: embeddings -> interaction -> MLP tower -> ESMM heads.

Plain modules only: nothing here knows about sharding or ZeRO (they are applied from outside by
`iak_dist.distributed`). Fine-tuning strategies plug in through the `Adapter` hooks of
`iak_dist.model.strategies.base`, without changing the backbone's structure.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from iak_dist.config import ModelConfig, to_dict
from iak_dist.data.schema import Schema
from iak_dist.errors import UserError
from iak_dist.model.item_tower import TEXT_TABLE, ItemTower, text_table
from iak_dist.model.sequence import SequencePool, SequenceTransformer
from iak_dist.model.strategies.base import DomainRows

# `model.table_dtype` -> TorchRec's table data type, which FBGEMM takes as its weights precision
TABLE_DATA_TYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}


def _left_to_init_tables(weight: torch.Tensor) -> None:
    """TorchRec's per-table `init_fn` for tables built on the meta device: a no-op.

    Those tables are sharded, then drawn by `distributed.sharding.init_tables` (plan-independent) or
    loaded; TorchRec's own draw after sharding would be overwritten anyway, and costs one pass over
    every row (about a minute of CPU for a billion rows).
    """


@dataclass
class ModelOutput:
    """Logits of the two ESMM towers and the adapter's auxiliary loss (0 when it has none)."""

    ctr_logit: torch.Tensor  # [B]
    cvr_logit: torch.Tensor  # [B]
    aux_loss: torch.Tensor  # scalar

    @property
    def p_ctr(self) -> torch.Tensor:
        return torch.sigmoid(self.ctr_logit)

    @property
    def p_ctcvr(self) -> torch.Tensor:
        """ESMM: p(click and convert) = p(click) * p(convert | click)."""
        return torch.sigmoid(self.ctr_logit) * torch.sigmoid(self.cvr_logit)


class DotInteraction(nn.Module):
    """DLRM interaction: pairwise dot products of the F feature vectors, plus the dense vector."""

    def __init__(self, num_vectors: int, dim: int) -> None:
        super().__init__()
        rows, cols = torch.triu_indices(num_vectors, num_vectors, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.out_features = dim + len(rows)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:  # [B, F, d]
        gram = torch.bmm(vectors, vectors.transpose(1, 2))
        return torch.cat([vectors[:, -1], gram[:, self.rows, self.cols]], dim=1)


class CrossInteraction(nn.Module):
    """DCNv2 low-rank cross layers (TorchRec's `LowRankCrossNet`) over the concatenated vectors."""

    def __init__(self, num_vectors: int, dim: int, layers: int, rank: int) -> None:
        super().__init__()
        self.out_features = num_vectors * dim
        self.cross = LowRankCrossNet(in_features=self.out_features, num_layers=layers, low_rank=rank)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.cross(vectors.flatten(1))


class Backbone(nn.Module):
    """Multi-domain CTR/CTCVR ranker.

    Args:
        schema: names the sparse features (one embedding table each, sized `table_size`) and the
            dense columns.
        cfg: widths and the interaction block.
        device: where to allocate the embedding tables; pass `torch.device("meta")` when the
            tables will be sharded (TorchRec materialises only each rank's shards).

    Example::

        backbone = Backbone(Schema.load("data/ml/schema.yaml"), ModelConfig())
        out = backbone(batch.sparse, batch.dense)   # ModelOutput with ctr / cvr logits
    """

    def __init__(self, schema: Schema, cfg: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.feature_names = schema.feature_names
        d = cfg.embedding_dim
        sharded_later = device is not None and device.type == "meta"
        tables = [
            EmbeddingBagConfig(
                name=f"t_{owner.name}", embedding_dim=d, num_embeddings=owner.table_size,
                feature_names=[key for f in schema.sparse if schema.table_owner(f.name) == owner.name
                               for key in schema.keys_of(f)],
                pooling=table_pooling(schema, owner.name), data_type=TABLE_DATA_TYPES[cfg.table_dtype],
                init_fn=_left_to_init_tables if sharded_later else None,
            )
            for owner in schema.table_owners
        ]
        text_rows = ItemTower.text_rows(schema, cfg.item_tower)  # the item text's frozen table (None: no tower)
        if text_rows is not None:
            tables.append(text_table(text_rows, TABLE_DATA_TYPES[cfg.table_dtype],  # zeros until filled
                                     _left_to_init_tables if sharded_later else nn.init.zeros_))
        self.frozen_tables = [TEXT_TABLE] if text_rows is not None else []
        """Tables that never train, whatever the strategy (`shard_ranker` gives them rate 0)."""
        self.table_configs = tables  # kept: a sharded collection no longer exposes them
        self.table_dtype = cfg.table_dtype
        self.embeddings = EmbeddingBagCollection(tables=tables, device=device)
        # sequence features: their lookup keys, the feature whose table they share (its embedding is the
        # target of target attention), and the encoder that makes their one vector
        self.sequences = {f.name: (schema.keys_of(f), f.shares_table, i)
                          for i, f in enumerate(schema.sequence_features)}
        self.sequence_encoders = nn.ModuleDict({
            f.name: SequencePool(f.pooling) if cfg.sequence_encoder == "pool"
            else SequenceTransformer(f.max_length, d, cfg.sequence_layers, cfg.sequence_heads)
            for f in schema.sequence_features})
        # the item feature by its text (model.item_tower; None: by ID), from the text table above
        self.item_tower = ItemTower(cfg.item_tower, d, text_rows) if text_rows is not None else None
        self.dense_proj = nn.Linear(max(len(schema.dense), 1), d)
        num_vectors = len(self.feature_names) + 1
        widths = tower_widths(schema, cfg)
        if cfg.interaction == "dcn":
            self.interaction: nn.Module = CrossInteraction(num_vectors, d, cfg.cross_layers, cfg.cross_rank)
        else:
            self.interaction = DotInteraction(num_vectors, d)
        assert self.interaction.out_features == widths[0]
        self.tower = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.ctr_head = nn.Linear(widths[-1], 1)
        self.cvr_head = nn.Linear(widths[-1], 1)
        self.tower_widths = widths

    @property
    def hidden_width(self) -> int:
        return self.tower_widths[-1]

    def embed(self, sparse: KeyedJaggedTensor, sequence_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """One vector per feature [B, F, d], in schema order (`sequence_lengths`: `Batch.sequence_lengths`).

        Trap: a sharded EmbeddingBagCollection returns its features in plan order, not config
        order, so the KeyedTensor is read by key, never by position.
        fp16 tables pool into fp32 (FBGEMM's output dtype); an unsharded fp16 collection pools into
        fp16, so the result is cast: the dense part always sees fp32.
        """
        return self.feature_vectors(self.lookup(sparse), sequence_lengths)

    def lookup(self, sparse: KeyedJaggedTensor) -> Mapping[str, torch.Tensor]:
        """The pooled bag [B, d] of every lookup key (read by key: see `embed`), the item feature's through
        the item tower; an adapter that `adapts_lookups` changes these before `feature_vectors`."""
        return self.items_by_text(self.embeddings(sparse).to_dict())

    def items_by_text(self, pooled: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """`pooled` with the item feature's vector made by the item tower (`model.item_tower`) from its ID
        and text bags; as it is without a tower. The serving `Predictor` calls it on its own bags."""
        return pooled if self.item_tower is None else self.item_tower.item_vectors(pooled)

    def feature_vectors(self, pooled: Mapping[str, torch.Tensor],
                        sequence_lengths: torch.Tensor | None) -> torch.Tensor:
        """[B, F, d] from the pooled bag of every lookup key: a feature's bag, or a sequence feature's items
        (one bag per position) through its encoder. The serving `Predictor` pools its own bags and calls this."""
        vectors = []
        for name in self.feature_names:
            if name not in self.sequences:
                vectors.append(pooled[name].float())
                continue
            keys, shares, index = self.sequences[name]
            items = torch.stack([pooled[key] for key in keys], dim=1).float()  # [B, L, d], most recent last
            target = pooled[shares].float() if shares is not None else None
            vectors.append(self.sequence_encoders[name](items, sequence_lengths[:, index], target))
        return torch.stack(vectors, dim=1)

    def dense_part(self, embedded: torch.Tensor, dense: torch.Tensor, adapter=None, domain=None) -> ModelOutput:
        """Everything after the embedding lookup: interaction, tower (with adapter hooks), heads."""
        return self.after_prefix(self.prefix(embedded, dense), adapter, domain)

    @property
    def prefix_width(self) -> int:
        """Width of `prefix`: the interaction output and the first tower layer's output on it."""
        return self.tower_widths[0] + self.tower_widths[1]

    def prefix(self, embedded: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """[B, prefix_width]: the interaction output x and the first tower layer's pre-activation
        `tower[0](x)`, side by side. It is the last point no fine-tuning strategy but `full` changes:
        adapters hook in from `adapt_preactivation` on (one on the first layer's input passes through that
        frozen layer without recomputing it), so a frozen backbone's can be cached (`data/prefix_cache.py`)
        and the first layer's GEMM is paid once per row, not once per step."""
        vectors = torch.cat([embedded, self.dense_proj(dense).unsqueeze(1)], dim=1)
        x = self.interaction(vectors)
        return torch.cat([x, self.tower[0](x)], dim=1)

    def after_prefix(self, prefix: torch.Tensor, adapter=None, domain=None) -> ModelOutput:
        """From `prefix` on: the tower with the adapter's hooks (each layer's output, then its ReLU), heads."""
        x, first = prefix.split(self.tower_widths[:2], dim=1)
        aux = x.new_zeros(())
        rows = DomainRows.of(domain, adapter.num_domains) if adapter is not None else None
        for i, layer in enumerate(self.tower):
            y = first if i == 0 else layer(x)
            if adapter is not None:
                y, layer_aux = adapter.adapt_preactivation(i, x, y, rows, layer)
                aux = aux + layer_aux
            # in place on a pre-activation this forward made (a layer's or an adapter's output, which no
            # backward reads): one [B, width] buffer fewer, a memory-bound pass cheaper at batch 4096; never
            # on `first`, the batch's own prefix
            y = torch.relu(y) if y is first else torch.relu_(y)
            if adapter is not None:
                y, layer_aux = adapter.adapt_activation(i, y, rows)
                aux = aux + layer_aux
            x = y
        ctr, cvr = self.ctr_head(x).squeeze(1), self.cvr_head(x).squeeze(1)
        heads = adapter.head_logits(x, rows) if adapter is not None else None
        if heads is not None:  # per-domain heads; rows of unknown domains keep the backbone's
            known = domain >= 0
            ctr, cvr = torch.where(known, heads[0], ctr), torch.where(known, heads[1], cvr)
        return ModelOutput(ctr, cvr, aux)

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor,
                sequence_lengths: torch.Tensor | None = None) -> ModelOutput:
        return self.dense_part(self.embed(sparse, sequence_lengths), dense)

    def dense_modules(self) -> dict[str, nn.Module]:
        """The modules DeepSpeed / the dense optimizer own (everything but the embedding tables)."""
        return {n: m for n, m in self.named_children() if n != "embeddings"}

    def dense_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.dense_modules().values() for p in m.parameters()]


def table_pooling(schema: Schema, owner: str) -> PoolingType:
    """How the table of feature `owner` pools a bag: TorchRec pools per table, not per feature, so the
    multi-hot features on one table must agree (a single-hot bag is the same under sum and mean)."""
    on_table = [f for f in schema.sparse if schema.table_owner(f.name) == owner]
    # a sequence feature's bags hold one item each (its encoder pools them): it does not constrain the table
    wanted = {f.pooling for f in on_table if f.multi_hot and not f.sequence}
    if len(wanted) > 1:
        raise UserError(f"schema: features {', '.join(f.name for f in on_table)} share table t_{owner} but pool by "
                        f"{' and '.join(sorted(wanted))}; TorchRec pools per table: give them one pooling")
    return PoolingType.MEAN if wanted == {"mean"} else PoolingType.SUM


def tower_widths(schema: Schema, cfg: ModelConfig) -> list[int]:
    """[interaction output, *tower]: the input and output widths of every tower layer."""
    num_vectors = len(schema.sparse) + 1
    d = cfg.embedding_dim
    first = num_vectors * d if cfg.interaction == "dcn" else d + num_vectors * (num_vectors - 1) // 2
    return [first, *cfg.tower]


LATER_MODEL_KEYS = {"table_dtype": "fp32", "sequence_encoder": "pool", "sequence_layers": 1, "sequence_heads": 2,
                    "item_tower": "id"}
"""Model keys that came after the first backbones, with their defaults: left out of the identity there."""


def backbone_identity(schema: Schema, cfg: ModelConfig) -> str:
    """A short hash of what defines the backbone (schema tables + model config).

    The keys of `LATER_MODEL_KEYS` came later: at their defaults they are left out, so the identities
    stamped on backbones and adapters written before they existed still match.
    """
    model = {k: v for k, v in to_dict(cfg).items() if k not in LATER_MODEL_KEYS or v != LATER_MODEL_KEYS[k]}
    blob = json.dumps({"schema": schema.as_dict(), "model": model}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
