"""One training step's arithmetic: forward, the task loss the phases optimise, backward, update.

The training loop (`phases/loop.py`) and the profiler (`profiling/steps.py`) both run these, so a
profiled step is the step that trains: fine-tuning averages each domain's mean loss
(`domain_normalised_mean`), pre-training averages rows; the adapter's auxiliary loss is added.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from iak_dist.data.batch import Batch
from iak_dist.data.sampler import domain_normalised_mean
from iak_dist.distributed.sharding import DataParallelTableOptimizer
from iak_dist.distributed.zero import DenseEngine
from iak_dist.model.backbone import ModelOutput


def esmm_loss_per_row(out: ModelOutput, batch: Batch) -> torch.Tensor:
    """BCE(p_ctr, click) + BCE(p_ctcvr, click AND convert), per row (ESMM's two supervised tasks)."""
    ctr = F.binary_cross_entropy_with_logits(out.ctr_logit, batch.click, reduction="none")
    log_p = F.logsigmoid(out.ctr_logit) + F.logsigmoid(out.cvr_logit)  # log p_ctcvr, stable
    log_not_p = torch.log1p(-log_p.exp().clamp(max=1 - 1e-7))
    ctcvr = -(batch.conversion * log_p + (1 - batch.conversion) * log_not_p)
    return ctr + ctcvr


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
               data_parallel_optimizer: DataParallelTableOptimizer | None = None,
               ) -> tuple[torch.Tensor, tuple[Batch, torch.Tensor, ModelOutput]]:
    """One un-pipelined step (forward, backward with the fused sparse update, dense step); returns what
    `forward_loss` does, not synchronised (reading the loss is a host sync on CUDA)."""
    loss, extras = forward_loss(model, batch, num_domains)
    if dense is not None:
        dense.backward(loss)  # sync point: the fused sparse update and the dense all-reduce
        dense.step()
    else:
        loss.backward()
    if data_parallel_optimizer is not None:
        data_parallel_optimizer.step()
    return loss, extras
