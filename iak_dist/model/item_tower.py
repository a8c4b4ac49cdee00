"""Item towers (issue 14 item 4, MoRec's question: items by ID, by their text, or both).

The item feature's one vector, which the interaction reads like any feature's, comes from:

- `id`: its ID embedding (the backbone of before: no tower is built);
- `text`: `W t + b`, with `t` the item's sentence vector (`data.item_text`, 384 wide) and `W` a trained
  `Linear(384 -> embedding_dim)`. The ID row is not read, so an item that never appeared in training
  is scored through its text alone (zero-shot items);
- `id+text`: `e_id + W t + b`, the sum.

Why a sum for `id+text`, not a concatenation followed by a linear layer: the item stays one
`embedding_dim` vector in one space, so the interaction, the tower widths, every strategy and the
prefix cache are those of an ID-only backbone; the projection starts at zero (PEFT's habit), so a
fresh `id+text` tower scores exactly as `id` until the projection trains; and an item whose ID row
never trained (initialised near zero) still gets its projected text, in the space the trained rows
live in, where a concatenation's linear layer could have learnt to lean on the ID half. It costs
384 x d + d parameters (6,160 at d = 16); the concatenation would add 2 d x d more.

The text vectors are a frozen embedding table of their own, `t_item_text`: one 384-wide row per hashed
slot of the item table, looked up by the same `item_id` feature in the same sharded EmbeddingBagCollection
as the ID table. So TorchRec shards it like any table (the planner places it; `distributed.sharding.plan.
item_text` sets its sharding), it never trains (`Backbone.frozen_tables`: rate 0 in `shard_ranker`, for
`full` too), and checkpoints and exports carry it as they carry every table, each rank its own shards:
fine-tuning, evaluation and serving need no data folder. `load_item_text` fills it once, at the start of
pre-training, from item_text.parquet: each rank reads its share of the file's row groups and sends each
vector to the ranks holding its slot (`fill_rows_by_mean`), so a rank reads only its row groups (a
file of one row group, as MovieLens's, is read by rank 0) and holds only its own shards. Items whose
IDs hash to one slot share their ID row already; their text vectors are averaged there (175 of the
1682 MovieLens items share a slot at 16384 slots).

Trap: a feature that feeds two tables comes out of TorchRec keyed `<feature>@<table>` for both, so
the lookups hold `item_id@t_item_id` and `item_id@t_item_text`, and `item_vectors` reads them by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType

from iak_dist.data.item_text import TEXT_DIM, item_text_batches, open_item_text
from iak_dist.data.schema import Schema, hash_ids
from iak_dist.errors import UserError
from iak_dist.model.strategies.base import Overlay

if TYPE_CHECKING:
    from iak_dist.distributed.context import DistContext

ITEM_TOWER_MODES = ("id", "text", "id+text")
ItemTowerMode = Literal["id", "text", "id+text"]
ITEM_FEATURE = "item_id"
"""The sparse feature the text describes: item_text.parquet is keyed by the splits' `item_id` column."""
TEXT_TABLE = "t_item_text"
"""The frozen table of the items' text vectors (a feature may not be named `item_text`: its table's name)."""


class ItemTower(nn.Module):
    """The item feature's vector from its text (`text`) or its ID embedding plus its text (`id+text`).

    Args:
        mode: `text` or `id+text` (`id` needs no tower).
        embedding_dim: the backbone's `embedding_dim`.
        table_size: the item table's size (the text table has as many rows, one per hashed slot).
        text_dim: width of the text vectors (all-MiniLM-L6-v2: 384).

    Example::

        tower = ItemTower("text", embedding_dim=16, table_size=16384)
        pooled = tower.item_vectors(lookups)   # lookups["item_id"] is now W t + b, t from t_item_text
    """

    id_key = f"{ITEM_FEATURE}@t_{ITEM_FEATURE}"
    text_key = f"{ITEM_FEATURE}@{TEXT_TABLE}"

    def __init__(self, mode: ItemTowerMode, embedding_dim: int, table_size: int, text_dim: int = TEXT_DIM) -> None:
        super().__init__()
        if mode not in ("text", "id+text"):
            raise ValueError(f"an item tower is built for modes text and id+text, got {mode!r}")
        self.mode = mode
        self.feature, self.table_size = ITEM_FEATURE, table_size
        self.project = nn.Linear(text_dim, embedding_dim)
        if mode == "id+text":  # starts as the ID-only model; the gradient of W is g t^T, not zero
            nn.init.zeros_(self.project.weight)
            nn.init.zeros_(self.project.bias)

    @staticmethod
    def text_rows(schema: Schema, mode: ItemTowerMode) -> int | None:
        """Rows of the text table of `model.item_tower` `mode` (the item table's size); None for `id`.
        Checks that the schema has the single-hot item feature the text describes."""
        if mode == "id":
            return None
        feature = next((f for f in schema.sparse if f.name == ITEM_FEATURE), None)
        if feature is None or feature.multi_hot:
            raise UserError(f"model.item_tower {mode}: needs a single-hot sparse feature {ITEM_FEATURE} (the items "
                            f"item_text.parquet describes); the schema has "
                            f"{'a multi-hot one' if feature is not None else 'none'}")
        if feature.shares_table is not None:  # its lookups would be keyed by another table's name
            raise UserError(f"model.item_tower {mode}: {ITEM_FEATURE} shares the table of {feature.shares_table}; "
                            f"the text describes an item feature with a table of its own")
        if any(f.name == TEXT_TABLE[len("t_"):] for f in schema.sparse):
            raise UserError(f"model.item_tower {mode}: the schema has a feature named {TEXT_TABLE[len('t_'):]}, "
                            f"whose table name {TEXT_TABLE} the item text takes; rename that feature")
        return feature.table_size

    def forward(self, text_vectors: torch.Tensor, id_vectors: torch.Tensor) -> torch.Tensor:
        """[B, d] item vectors from the items' text vectors [B, text_dim] and ID embeddings [B, d]."""
        projected = self.project(text_vectors)
        return projected if self.mode == "text" else id_vectors + projected

    def item_vectors(self, pooled: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The lookups with the item feature's vector made by the tower (read by key: a Proxy when traced)."""
        vector = self(pooled[self.text_key].float(), pooled[self.id_key].float())
        return Overlay(pooled, {self.feature: vector})


def text_table(rows: int, data_type: DataType, init_fn=None) -> EmbeddingBagConfig:
    """The text table's config: one `TEXT_DIM` row per slot of the item table, looked up by `item_id`."""
    return EmbeddingBagConfig(name=TEXT_TABLE, embedding_dim=TEXT_DIM, num_embeddings=rows,
                              feature_names=[ITEM_FEATURE], pooling=PoolingType.SUM, data_type=data_type,
                              init_fn=init_fn)


def load_item_text(model: nn.Module, data_dir: str | Path, table_size: int, ctx: DistContext) -> None:
    """Fill the text table of the (sharded) `model` from `data_dir/item_text.parquet`, each rank its shards.

    Collective. Each slot's row is the mean of the vectors of the items hashed to it, zeros where none is.
    Rank r reads row groups r, r + N, ... of the file (checked by `open_item_text` on every rank first).
    """
    from iak_dist.distributed.context import on_every_rank
    from iak_dist.distributed.sharding import fill_rows_by_mean

    file = on_every_rank(open_item_text, data_dir, what=str(data_dir))
    mine = list(range(ctx.rank, file.num_row_groups, ctx.world_size))
    batches = ((hash_ids(ids, table_size), vectors) for ids, vectors in item_text_batches(file, mine))
    fill_rows_by_mean(model, TEXT_TABLE, batches, ctx)
