"""GPSD-style generative pre-training: the stage before discriminative pre-training, and the transfer.

Why: a ranker pre-trained on the ESMM loss alone over-fits within an epoch or two (docs/results.md): its
item table learns each item's click rate in the pre-train window. GPSD (Wang et al., 2025) first trains
a causal Transformer over users' item sequences to predict the next item, then starts the ranker from
its item embeddings, frozen: the table then holds what items are like, not how often they were clicked.

The stage (`pretrain_generative`) runs on the same pre-train split, reader, sharded tables (TorchRec
EBC / FBGEMM, `shard_ranker`) and dense engine (DeepSpeed, `DenseEngine`) as pre-training. Each clicked
row with a non-empty history is one example: the Transformer's state at the newest position of the
row's history (`SequenceTransformer.encode`) scores the batch's target items (`sampled_softmax_loss`,
in-batch negatives). Its weights are exported like a backbone (`export_backbone`: sharded, hashed),
stamped with the stage's identity, so a re-run reuses them and a changed config trains them again.

`Transfer` then copies the item table (and the Transformer) into the ranker before its engine is built;
frozen tables get a fused optimizer of rate 0 in table batches of their own (`shard_ranker`), a frozen
Transformer `requires_grad` False (DeepSpeed leaves it out).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from iak_dist.config import DistributedConfig, GenerativeConfig, ModelConfig, to_dict
from iak_dist.data.batch import Batch
from iak_dist.data.parquet import ParquetReader
from iak_dist.data.schema import Schema, SparseFeature
from iak_dist.data.source import Split
from iak_dist.distributed.checkpoint import (
    backbone_weights,
    export_backbone,
    read_backbone_meta,
    read_json,
    verify_backbone,
)
from iak_dist.distributed.context import DistContext, on_every_rank, on_main
from iak_dist.distributed.sharding import init_tables, set_sparse_lr, shard_ranker
from iak_dist.distributed.zero import DenseEngine
from iak_dist.errors import UserError
from iak_dist.io import atomic_write_json
from iak_dist.model.backbone import Backbone, backbone_identity
from iak_dist.phases.pretrain import steps_for
from iak_dist.phases.schedule import lr_factor
from iak_dist.runtime import say
from iak_dist.tracking import summary_writer

RECORD = "generative.json"
"""Beside the stage's exported weights (`<seed dir>/generative/backbone`): the stage's identity, the
weights' hash and the stage's summary (time, loss)."""


def sampled_softmax_loss(states: torch.Tensor, targets: torch.Tensor, same_item: torch.Tensor) -> torch.Tensor:
    """Mean over rows i of -log softmax_j(states_i . targets_j) at j = i (in-batch negatives).

    states, targets: [N, d] (row i's sequence state and its own target item's embedding); same_item
    [N, N] bool: rows i and j hold the same item. Such j != i are left out of row i's softmax: their item
    is row i's positive too, not a negative. N = 0 gives 0 (a batch without a usable row still steps).
    """
    logits = states @ targets.T
    others = ~torch.eye(len(states), dtype=torch.bool, device=states.device)
    logits = logits.masked_fill(same_item & others, float("-inf"))
    rows = torch.arange(len(states), device=states.device)
    return F.cross_entropy(logits, rows, reduction="sum") / max(len(states), 1)


class GenerativeModel(nn.Module):
    """The backbone's tables and its Transformer over one sequence feature: next-item prediction.

    Sharded as the Ranker is (`shard_ranker` reads `backbone`); the backbone's tower and heads are built
    but never used here.
    """

    def __init__(self, backbone: Backbone, feature: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature = feature

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, rows used): each clicked row with history predicts its item from its history."""
        pooled = self.backbone.embeddings(batch.sparse).to_dict()
        keys, shares, index = self.backbone.sequences[self.feature]
        items = torch.stack([pooled[key] for key in keys], dim=1).float()  # [B, L, d], most recent last
        lengths = batch.sequence_lengths[:, index]
        states, _ = self.backbone.sequence_encoders[self.feature].encode(items, lengths)
        used = (batch.click > 0.5) & (lengths > 0)
        newest = states[:, -1][used]  # right-aligned: the newest item's state has read the whole history
        targets = pooled[shares].float()[used]
        # a bag of one item pools to its row bit for bit, so equal rows are the same item (two items hashed
        # onto one row are one item to the model as well)
        same_item = (targets.unsqueeze(1) == targets.unsqueeze(0)).all(dim=2)
        return sampled_softmax_loss(newest, targets, same_item), used.sum()


def stage_model(model_cfg: ModelConfig) -> ModelConfig:
    """The stage's model: the ranker's, with the Transformer encoder (a pooled ranker takes the items only)
    and its items by ID (the stage reads no item tower: the ranker's `item_tower` does not change it)."""
    return dataclasses.replace(model_cfg, sequence_encoder="transformer", item_tower="id")


def sequence_feature(schema: Schema, data_dir: Path) -> SparseFeature:
    """The sequence feature the stage reads: the first that shares its table with a target feature."""
    for feature in schema.sequence_features:
        if feature.shares_table is not None:
            return feature
    raise UserError(f"pretrain.objective: generative pre-training needs a sequence feature that shares its "
                    f"item table (schema in {data_dir} has none); prepare the data with data.history_length > 0")


def stage_identity(schema: Schema, model_cfg: ModelConfig, cfg: GenerativeConfig, seed: int, data: str) -> str:
    """A short hash of what the stage's weights depend on: tables and Transformer, its loop, the seed and the
    pre-train split's data (`data`: its fingerprint); not what the ranker takes from it (`transfer` and
    `freeze_transferred` reuse the same stage)."""
    blob = json.dumps({"backbone": backbone_identity(schema, stage_model(model_cfg)), "optim": to_dict(cfg.optim),
                       "seed": seed, "data": data}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _reusable(out_dir: Path, identity: str) -> dict[str, Any] | None:
    """The record of weights trained with `identity` (checked against their files), None to train them.

    A record of another identity (a changed config) is not reused; weights that do not match their own
    record are refused: they were replaced or damaged, and training anew would hide it.
    """
    record_path, weights_dir = out_dir / RECORD, out_dir / "backbone"
    if not record_path.is_file():
        return None
    remedy = f"move {out_dir} aside to train the generative stage again"
    record = read_json(record_path, remedy)
    if record.get("identity") != identity:
        say(f"[generative] {out_dir}: trained with another config (identity {record.get('identity')}, now "
            f"{identity}): training it again")
        return None
    if not (weights_dir / "backbone.json").is_file():
        raise UserError(f"{weights_dir}: the generative weights {RECORD} records are missing; {remedy}")
    meta = verify_backbone(weights_dir)
    if meta["weights"] != record.get("weights"):
        raise UserError(f"{weights_dir}: weights {meta['weights']} are not the ones {RECORD} records "
                        f"({record.get('weights')}); {remedy}")
    return record


def pretrain_generative(data_dir: str | Path, model_cfg: ModelConfig, cfg: GenerativeConfig,
                        dist_cfg: DistributedConfig, seed: int, out_dir: str | Path, ctx: DistContext,
                        show_progress: bool = True) -> tuple[Path, dict[str, float]]:
    """Train the generative stage on the pre-train split (or reuse it); returns (weights folder, summary).

    Collective. The weights go to `out_dir/backbone` (an exported backbone of `stage_model(model_cfg)`),
    the record to `out_dir/generative.json`. No mid-stage checkpoints: an interrupted stage trains again.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    schema = Schema.load(data_dir / "schema.yaml")
    feature = sequence_feature(schema, data_dir)
    split = Split.open(data_dir, "pretrain", schema)
    identity = stage_identity(schema, model_cfg, cfg, seed, split.fingerprint())
    # rank 0 decides for every rank (ranks that saw the files differently would split: one training, one not)
    record = on_main(ctx, lambda: _reusable(out_dir, identity), share=True)
    if record is not None:
        say(f"[generative] seed {seed}: reusing the generative stage in {out_dir}", ctx.rank)
        return out_dir / "backbone", record["summary"]
    if ctx.is_main:
        (out_dir / RECORD).unlink(missing_ok=True)

    optim = cfg.optim
    reader = ParquetReader(split, schema, optim.batch_size, ctx.rank, ctx.world_size, shuffle=True, seed=seed,
                           drop_last=True, split_mode=dist_cfg.data_split)
    torch.manual_seed(seed)
    stage_cfg = stage_model(model_cfg)
    backbone = Backbone(schema, stage_cfg, device=torch.device("meta"))
    generative = GenerativeModel(backbone, feature.name)
    sharded = shard_ranker(generative, ctx, dist_cfg.sharding, optim.lr_sparse, optim.batch_size)
    init_tables(sharded.model, generative, seed)  # the ranker's own initial tables at this seed
    encoder = backbone.sequence_encoders[feature.name]
    encoder.query.requires_grad_(False)  # target attention is the ranker's: not used here
    dense = DenseEngine({"encoder": encoder}, optim.lr_dense, optim.weight_decay, dist_cfg.zero, optim.batch_size,
                        ctx.world_size)
    total = steps_for(optim, reader.num_rows)
    batches = iter(reader.batches(reader.resume_position(None, 0)))
    writer = summary_writer(out_dir / "tb", ctx)
    bar = tqdm(total=total, desc=f"generative seed {seed}", unit="step", disable=not (show_progress and ctx.is_main),
               mininterval=2.0)
    losses: list[float] = []
    pending: list[torch.Tensor] = []
    ema, factor, start = None, None, time.perf_counter()
    sharded.model.train()
    try:
        for step in range(total):
            if (new_factor := lr_factor(step, total, optim)) != factor:
                factor = new_factor
                dense.set_lr(optim.lr_dense * factor)
                set_sparse_lr(sharded.model, sharded.data_parallel_optimizer, optim.lr_sparse * factor)
            batch = next(batches).to(ctx.device, non_blocking=True)
            loss, _ = sharded.model(batch)
            dense.backward(loss)  # sync point: the fused sparse update and the dense all-reduce
            dense.step()
            if sharded.data_parallel_optimizer is not None:
                sharded.data_parallel_optimizer.step()
            pending.append(loss.detach())
            bar.update(1)
            if step % optim.log_every == 0 or step == total - 1:
                values = torch.stack(pending).tolist()  # sync point: once per log_every steps
                pending.clear()
                for value in values:
                    ema = value if ema is None else 0.98 * ema + 0.02 * value
                losses.extend(values)
                bar.set_postfix(loss=f"{ema:.4f}")
                if writer is not None:
                    writer.add_scalar("generative/loss", values[-1], step)
        seconds = time.perf_counter() - start
        bar.close()
        with dense.gathered():
            export_backbone(sharded.model, schema, stage_cfg, out_dir / "backbone", ctx.rank)
        summary = {"generative/loss_first": losses[0], "generative/loss_ema": float(ema),
                   "generative/steps": float(total), "generative/seconds": seconds}
        if ctx.is_main:
            meta = read_backbone_meta(out_dir / "backbone")
            atomic_write_json(out_dir / RECORD, {"identity": identity, "weights": meta["weights"],
                                                 "feature": feature.name, "summary": summary,
                                                 "losses": losses})
        ctx.barrier()  # sync point: the record is written before any rank reads the weights
    finally:
        if writer is not None:
            writer.close()
    say(f"[generative] seed {seed}: {total} steps in {seconds:.0f} s, sampled-softmax loss {losses[0]:.3f} -> "
        f"{ema:.3f}; weights in {out_dir / 'backbone'}", ctx.rank)
    return out_dir / "backbone", summary


@dataclasses.dataclass
class Transfer:
    """What the ranker takes from the generative stage: names of tensors under `backbone.`, frozen or not."""

    source: Path
    """The stage's exported weights (`pretrain_generative`)."""
    tables: list[str]
    """Embedding tables (`t_<feature>`): the sequence feature's item table."""
    encoder: list[str]
    """Transformer tensors (`sequence_encoders.<feature>.<name>`), empty for `transfer: items`."""
    freeze: bool

    @property
    def frozen_tables(self) -> list[str]:
        return self.tables if self.freeze else []

    @property
    def tensors(self) -> list[str]:
        return [f"embeddings.embedding_bags.{table}.weight" for table in self.tables] + self.encoder

    def apply(self, model: nn.Module, backbone: Backbone) -> None:
        """Copy the tensors into the (sharded) model, each rank its own shards; freeze the Transformer's.

        Collective. Call before the dense engine is built: DeepSpeed optimises what requires grad then.
        """
        meta = read_backbone_meta(self.source)
        weights = backbone_weights(self.source, meta)
        state = model.state_dict()

        @torch.no_grad()
        def load() -> None:
            for name in self.tensors:
                target = state[f"backbone.{name}"]
                if list(target.size()) != weights.tensors[name]["shape"]:
                    raise UserError(f"{self.source}: {name} has shape {weights.tensors[name]['shape']}, the ranker "
                                    f"{list(target.size())}; move {self.source.parent} aside to train the "
                                    f"generative stage again")
                weights.load_into(name, target)

        on_every_rank(load, what=str(self.source))
        if self.freeze:
            params = dict(backbone.named_parameters())
            for name in self.encoder:
                params[name].requires_grad_(False)


def transfer_from(source: Path, schema: Schema, model_cfg: ModelConfig, cfg: GenerativeConfig) -> Transfer:
    """The `Transfer` of `cfg` from the stage's weights in `source`, after checking they fit this ranker."""
    meta = read_backbone_meta(source)
    expected = backbone_identity(schema, stage_model(model_cfg))
    if meta["identity"] != expected:
        raise UserError(f"{source}: generative weights of another model or schema (identity {meta['identity']}, "
                        f"this config's {expected}); move {source.parent} aside to train the generative stage again")
    feature = sequence_feature(schema, source)
    encoder: list[str] = []
    if cfg.transfer == "items+encoder":
        stage = Backbone(schema, stage_model(model_cfg), device=torch.device("meta"))
        names = stage.sequence_encoders[feature.name].state_dict()
        encoder = [f"sequence_encoders.{feature.name}.{name}" for name in names if not name.startswith("query.")]
    return Transfer(source, [f"t_{schema.table_owner(feature.name)}"], encoder, cfg.freeze_transferred)
