"""One training step's arithmetic: forward, the task loss the phases optimise, backward, update.

The training loop (`phases/loop.py`) and the profiler (`profiling/steps.py`) both run these, so a
profiled step is the step that trains: fine-tuning averages each domain's mean loss
(`domain_normalised_mean`), pre-training averages rows; the adapter's auxiliary loss is added.
"""

from __future__ import annotations

import torch

from iak_dist.data.batch import Batch
from iak_dist.data.sampler import domain_normalised_mean
from iak_dist.distributed.sharding import DataParallelTableOptimizer
from iak_dist.distributed.zero import DenseEngine
from iak_dist.model.backbone import ModelOutput
from iak_dist.phases.loop import esmm_loss_per_row


def task_loss(out: ModelOutput, batch: Batch, num_domains: int | None) -> torch.Tensor:
    """ESMM loss of the batch: the mean over domains of each domain's mean (with `num_domains`), else
    the mean over rows."""
    per_row = esmm_loss_per_row(out, batch)
    return domain_normalised_mean(per_row, batch.domain, num_domains) if num_domains else per_row.mean()


def forward_loss(model: torch.nn.Module, batch: Batch, num_domains: int | None,
                 ) -> tuple[torch.Tensor, tuple[Batch, torch.Tensor, ModelOutput]]:
    """(task + auxiliary loss, (batch, task loss, model output)): the shape TorchRec's train pipeline
    wants of its forward function."""
    out = model(batch)
    task = task_loss(out, batch, num_domains)
    return task + out.aux_loss, (batch, task, out)


def train_step(model: torch.nn.Module, dense: DenseEngine | None, batch: Batch, num_domains: int | None,
               data_parallel_optimizer: DataParallelTableOptimizer | None = None) -> torch.Tensor:
    """One un-pipelined step (forward, backward with the fused sparse update, dense step); returns the
    loss, not synchronised (reading it is a host sync on CUDA)."""
    loss, _ = forward_loss(model, batch, num_domains)
    if dense is not None:
        dense.backward(loss)  # sync point: the fused sparse update and the dense all-reduce
        dense.step()
    else:
        loss.backward()
    if data_parallel_optimizer is not None:
        data_parallel_optimizer.step()
    return loss
