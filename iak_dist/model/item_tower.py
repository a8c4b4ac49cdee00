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

The text vectors sit in a buffer of the item table's size, indexed by the same hashed slot as the
ID table (`hash_ids(item_id, table_size)`), so the tower reads the batch's own IDs. Items whose
IDs hash to one slot share their ID row already; their text vectors are averaged there
(`set_text` returns how many items share a slot: 175 of the 1682 MovieLens items at 16384 slots).
The buffer is persistent: a checkpoint and an exported backbone carry the text they were trained
with, so fine-tuning, evaluation and serving need no data folder (16384 x 384 float32: 25 MB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from iak_dist.data.item_text import TEXT_DIM, read_item_text
from iak_dist.data.schema import Schema, hash_ids
from iak_dist.errors import UserError

ITEM_TOWER_MODES = ("id", "text", "id+text")
MAX_TEXT_BYTES = 2**30
"""The largest text buffer an item tower holds: it is a dense buffer, whole on every rank (MovieLens: 25 MB)."""
ItemTowerMode = Literal["id", "text", "id+text"]
ITEM_FEATURE = "item_id"
"""The sparse feature the text describes: item_text.parquet is keyed by the splits' `item_id` column."""


class ItemTower(nn.Module):
    """The item feature's vector from its text (`text`) or its ID embedding plus its text (`id+text`).

    Args:
        mode: `text` or `id+text` (`id` needs no tower).
        embedding_dim: the backbone's `embedding_dim`.
        table_size: the item feature's table size (the text buffer has one row per hashed slot).
        text_dim: width of the text vectors (all-MiniLM-L6-v2: 384).

    Example::

        tower = ItemTower("text", embedding_dim=16, table_size=16384)
        tower.load_text("data/ml-100k-text")               # item_text.parquet, checked
        item = tower(sparse["item_id"].values(), id_vectors)   # [B, 16] from the hashed item IDs
    """

    def __init__(self, mode: ItemTowerMode, embedding_dim: int, table_size: int, text_dim: int = TEXT_DIM) -> None:
        super().__init__()
        if mode not in ("text", "id+text"):
            raise ValueError(f"an item tower is built for modes text and id+text, got {mode!r}")
        self.mode = mode
        self.feature = ITEM_FEATURE
        self.project = nn.Linear(text_dim, embedding_dim)
        if mode == "id+text":  # starts as the ID-only model; the gradient of W is g t^T, not zero
            nn.init.zeros_(self.project.weight)
            nn.init.zeros_(self.project.bias)
        self.register_buffer("text", torch.zeros(table_size, text_dim))

    @classmethod
    def for_schema(cls, schema: Schema, mode: ItemTowerMode, embedding_dim: int) -> ItemTower | None:
        """The tower of `model.item_tower` `mode` over the schema's item feature; None for `id`."""
        if mode == "id":
            return None
        feature = next((f for f in schema.sparse if f.name == ITEM_FEATURE), None)
        if feature is None or feature.multi_hot:
            raise UserError(f"model.item_tower {mode}: needs a single-hot sparse feature {ITEM_FEATURE} (the items "
                            f"item_text.parquet describes); the schema has "
                            f"{'a multi-hot one' if feature is not None else 'none'}")
        size = feature.table_size * TEXT_DIM * 4
        if size > MAX_TEXT_BYTES:  # the buffer is whole on every rank (the sharded text table does not exist yet)
            raise UserError(f"model.item_tower {mode}: the text of {feature.table_size:,} item slots would take "
                            f"{size / 2**30:.1f} GiB on every rank (at most {MAX_TEXT_BYTES / 2**30:.0f} GiB until "
                            f"the text is a sharded table); use item_tower: id for this table")
        return cls(mode, embedding_dim, feature.table_size)

    def forward(self, slots: torch.Tensor, id_vectors: torch.Tensor) -> torch.Tensor:
        """[B, d] item vectors from the hashed item IDs `slots` [B] and their ID embeddings [B, d]."""
        projected = self.project(F.embedding(slots, self.text))
        return projected if self.mode == "text" else id_vectors + projected

    @torch.no_grad()
    def set_text(self, item_ids: np.ndarray, vectors: np.ndarray) -> int:
        """Fill the buffer from raw item IDs [N] and their text vectors [N, text_dim]: each slot holds the
        mean of the items hashed to it, zeros where none is. Returns how many items share a slot."""
        table_size, text_dim = self.text.shape
        if vectors.shape != (len(item_ids), text_dim):
            raise ValueError(f"text vectors of shape {vectors.shape} for {len(item_ids)} items of width {text_dim}")
        slots = torch.from_numpy(hash_ids(np.asarray(item_ids, np.int64), table_size))
        counts = torch.bincount(slots, minlength=table_size).to(self.text.dtype)
        total = torch.zeros_like(self.text).index_add_(0, slots, torch.tensor(vectors, dtype=self.text.dtype))
        self.text.copy_(total / counts.clamp(min=1).unsqueeze(1))
        return int(counts[counts > 1].sum())

    def load_text(self, data_dir: str | Path) -> int:
        """`set_text` from `data_dir/item_text.parquet` (its encoder, weights and template checked)."""
        return self.set_text(*read_item_text(data_dir))
