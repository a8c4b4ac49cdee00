"""Input distribution overlapped with compute: TorchRec's `TrainPipelineSparseDist`, DeepSpeed stepping.

While batch i runs forward and backward, the pipeline has already started batch i+1's input
distribution (the all-to-all that sends each rank the IDs of the table shards it holds) and loaded
batch i+2. TorchRec finds which attribute of the batch feeds the sharded tables by tracing the
model's forward, which is why `Ranker.forward` takes the whole `Batch`.

Only backward and the optimizer step are ours: DeepSpeed owns the dense gradients (all-reduce,
ZeRO partitions), so `_backward` / `_optimizer_step` hand over to the `DenseEngine`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from iak_dist.distributed.sharding import DataParallelTableOptimizer
from iak_dist.distributed.zero import DenseEngine


class _NoZeroGrad(torch.optim.Optimizer):
    """The pipeline calls `optimizer.zero_grad()` each step; DeepSpeed zeroes its own gradients."""

    def __init__(self) -> None:
        self.param_groups, self.state, self.defaults = [], {}, {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def step(self, closure=None) -> None:
        return None


class SparseDistPipeline(TrainPipelineSparseDist):
    """`progress(batches)` runs one training step of `model` with the next batch's input dist in flight.

    Args:
        model: the DMP-wrapped Ranker.
        loss_fn: batch -> (loss, extras) computed from `model(batch)`; extras are returned by `progress`.
        dense: the DeepSpeed engine of the dense modules (None when nothing dense trains).
        data_parallel_optimizer: the optimizer of data-parallel tables, if any.
        device: where batches go.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[Any], tuple[torch.Tensor, Any]],
                 dense: DenseEngine | None, data_parallel_optimizer: DataParallelTableOptimizer | None,
                 device: torch.device) -> None:
        super().__init__(model, _NoZeroGrad(), device, execute_all_batches=True, custom_model_fwd=loss_fn)
        self._dense = dense
        self._data_parallel_optimizer = data_parallel_optimizer

    def _backward(self, losses: torch.Tensor) -> None:
        if self._dense is not None:
            self._dense.backward(losses)  # sync point: fused sparse update + dense all-reduce
        else:
            losses.backward()

    def _optimizer_step(self) -> None:
        if self._dense is not None:
            self._dense.step()
        if self._data_parallel_optimizer is not None:
            self._data_parallel_optimizer.step()
