"""Sequence encoders: a behaviour sequence's item embeddings [B, L, d] -> one vector [B, d] per row.

The batch carries a sequence feature as L right-aligned position lookups on the item table (schema
`lookup_keys`: the most recent item at position L - 1, a row of n < L items has positions 0 .. L - n - 1
empty) and how many items each row holds (`Batch.sequence_lengths`). Both encoders read only those
positions; a row without history gets a zero vector (never NaN: an attention over no keys is made
finite and then zeroed).

* `SequencePool`: the items' embeddings summed or averaged (the feature's schema `pooling`).
* `SequenceTransformer`: learned position embeddings, `layers` pre-norm causal self-attention blocks
  (each position sees itself and the older ones), then target attention (DIN / BST): the target item's
  embedding asks which of the encoded history matters for it.

Both are fx-traceable (TorchRec's train pipeline traces the backbone's forward): no Python branch on
tensor values or shapes; every size comes from `__init__`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MASKED = -1e9
"""Additive attention score of a key that may not be read: finite, so that a query with no key to read
(a padded position, a row without history) gets finite garbage, which is then zeroed, not NaN."""


def valid_positions(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """[B, L] bool: position p holds an item (`p >= L - n` for a row of n items, right-aligned)."""
    return torch.arange(length, device=lengths.device).unsqueeze(0) >= (length - lengths).unsqueeze(1)


class SequencePool(nn.Module):
    """Sum or mean of the items a row holds (empty positions are zero vectors already)."""

    def __init__(self, pooling: str) -> None:
        super().__init__()
        self.mean = pooling == "mean"

    def forward(self, items: torch.Tensor, lengths: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        total = items.sum(dim=1)
        if not self.mean:
            return total
        return total / lengths.clamp(min=1).to(total.dtype).unsqueeze(1)


class CausalBlock(nn.Module):
    """Pre-norm self-attention (causal, padding masked) + feed-forward, both residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(dim // heads)
        self.norm_attention = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, scores_mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, d]; scores_mask [B, 1, L, L] additive (0 or `MASKED`)."""
        b, length, dim = x.shape
        q, k, v = self.qkv(self.norm_attention(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, length, self.heads, dim // self.heads).transpose(1, 2) for t in (q, k, v))
        # explicit attention: at these sizes (L ~ 20, head width ~ 8) two batched GEMMs and a softmax cost a
        # third of the forward + backward of CPU `F.scaled_dot_product_attention`'s flash kernel (measured)
        weights = torch.softmax(q @ k.transpose(-2, -1) * self.scale + scores_mask, dim=-1)
        attended = weights @ v
        x = x + self.out(attended.transpose(1, 2).reshape(b, length, dim))
        return x + self.ff(self.norm_ff(x))


class SequenceTransformer(nn.Module):
    """Causal Transformer over the history, then target attention with the target item as the query."""

    def __init__(self, length: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.length = length
        self.positions = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.blocks = nn.ModuleList(CausalBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)
        self.register_buffer("causal", torch.ones(length, length).tril().bool(), persistent=False)

    def encode(self, items: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal states [B, L, d] before target attention, and which positions hold an item [B, L].

        State p has read the items at positions <= p only: the state at the newest position (L - 1) sums up
        the whole history, which generative pre-training (`phases/pretrain_generative.py`) asks to predict
        the next item. Padded positions hold finite garbage (read `valid`)."""
        valid = valid_positions(lengths, self.length)  # [B, L]
        readable = self.causal.unsqueeze(0) & valid.unsqueeze(1)  # [B, query, key]
        scores_mask = torch.zeros(readable.shape, dtype=items.dtype, device=items.device).masked_fill(
            ~readable, MASKED).unsqueeze(1)
        x = items + self.positions
        for block in self.blocks:
            x = block(x, scores_mask)
        return self.norm(x), valid

    def forward(self, items: torch.Tensor, lengths: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        x, valid = self.encode(items, lengths)
        # target attention: which encoded positions matter for this target item (the newest if no target)
        query = self.query(target if target is not None else x[:, -1])
        scores = (x @ query.unsqueeze(2)).squeeze(2) * self.scale
        weights = torch.softmax(scores.masked_fill(~valid, MASKED), dim=1)
        pooled = (weights.unsqueeze(2) * x).sum(dim=1)
        return pooled * (lengths > 0).to(pooled.dtype).unsqueeze(1)
