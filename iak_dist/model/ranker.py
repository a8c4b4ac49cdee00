"""`Ranker`: the backbone with an optional fine-tuning adapter attached; what gets sharded."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from iak_dist.model.backbone import Backbone, ModelOutput
from iak_dist.model.strategies.base import Adapter


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class Ranker(nn.Module):
    """Backbone + adapter.

    With `freeze_embeddings`, tables are only looked up (under no_grad): no sparse backward, no
    sparse optimizer state, no gradient exchange for them. `sparse_grad_scale` multiplies the
    gradient reaching the embedding tables; the sharding code sets it to 1 / world_size, since
    DeepSpeed averages dense gradients over ranks but model-parallel tables receive every rank's
    per-sample gradients unaveraged (so both sides follow the global-batch mean loss).
    """

    def __init__(self, backbone: Backbone, adapter: Adapter | None = None, freeze_embeddings: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter
        self.freeze_embeddings = freeze_embeddings
        self.sparse_grad_scale = 1.0

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor, domain: torch.Tensor) -> ModelOutput:
        if self.freeze_embeddings:
            with torch.no_grad():
                embedded = self.backbone.embed(sparse)
        else:
            embedded = self.backbone.embed(sparse)
            if self.sparse_grad_scale != 1.0 and embedded.requires_grad:
                embedded = _ScaleGrad.apply(embedded, self.sparse_grad_scale)
        return self.backbone.dense_part(embedded, dense, self.adapter, domain)
