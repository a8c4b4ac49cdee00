"""`Ranker`: the backbone with an optional fine-tuning adapter attached; what gets sharded."""

from __future__ import annotations

import torch
from torch import nn

from iak_dist.data.batch import Batch
from iak_dist.model.backbone import Backbone, ModelOutput
from iak_dist.model.strategies.base import Adapter


class Ranker(nn.Module):
    """Backbone + adapter.

    With `freeze_embeddings`, tables are only looked up (under no_grad): no sparse backward, no
    sparse optimizer state, no gradient exchange for them.
    """

    def __init__(self, backbone: Backbone, adapter: Adapter | None = None, freeze_embeddings: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter
        self.freeze_embeddings = freeze_embeddings

    def forward(self, batch: Batch) -> ModelOutput:
        """Scores of one batch. Takes the whole `Batch` (TorchRec's train pipeline traces which of
        its attributes feed the sharded tables, to distribute the next batch's IDs early)."""
        if self.adapter is not None and self.adapter.adapts_lookups:  # the adapter changes the lookups' output
            if self.freeze_embeddings:
                with torch.no_grad():
                    pooled = self.backbone.lookup(batch.sparse)
            else:
                pooled = self.backbone.lookup(batch.sparse)
            pooled = self.adapter.adapt_lookups(pooled, batch.domain)
            embedded = self.backbone.feature_vectors(pooled, batch.sequence_lengths)
        elif self.freeze_embeddings:
            with torch.no_grad():
                embedded = self.backbone.embed(batch.sparse, batch.sequence_lengths)
        else:
            embedded = self.backbone.embed(batch.sparse, batch.sequence_lengths)
        return self.backbone.dense_part(embedded, batch.dense, self.adapter, batch.domain)


class PrefixRanker(nn.Module):
    """The ranker from the frozen backbone's prefix on (`Backbone.after_prefix`): what fine-tuning from
    the prefix cache trains. Holds the same backbone and adapter modules as the sharded `Ranker`."""

    def __init__(self, backbone: Backbone, adapter: Adapter | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter

    def forward(self, batch) -> ModelOutput:
        """Scores of a `data.prefix_cache.PrefixBatch` (its `prefix` is `Backbone.prefix`)."""
        return self.backbone.after_prefix(batch.prefix, self.adapter, batch.domain)
