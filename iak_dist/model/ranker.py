"""`Ranker`: the backbone with an optional fine-tuning adapter attached; what gets sharded."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

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

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor, domain: torch.Tensor) -> ModelOutput:
        if self.freeze_embeddings:
            with torch.no_grad():
                embedded = self.backbone.embed(sparse)
        else:
            embedded = self.backbone.embed(sparse)
        return self.backbone.dense_part(embedded, dense, self.adapter, domain)
