"""The one training loop: forward, ESMM loss (+ adapter loss), backward, step. Used by every phase."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from iak_dist.config import OptimConfig
from iak_dist.data.batch import Batch
from iak_dist.data.sampler import domain_normalised_mean
from iak_dist.model.backbone import ModelOutput
from iak_dist.model.strategies.base import Adapter


def esmm_loss_per_row(out: ModelOutput, batch: Batch) -> torch.Tensor:
    """BCE(p_ctr, click) + BCE(p_ctcvr, click AND convert), per row (ESMM's two supervised tasks)."""
    ctr = F.binary_cross_entropy_with_logits(out.ctr_logit, batch.click, reduction="none")
    log_p = F.logsigmoid(out.ctr_logit) + F.logsigmoid(out.cvr_logit)  # log p_ctcvr, stable
    log_not_p = torch.log1p(-log_p.exp().clamp(max=1 - 1e-7))
    ctcvr = -(batch.conversion * log_p + (1 - batch.conversion) * log_not_p)
    return ctr + ctcvr


def train_loop(
    model: torch.nn.Module,
    dense_params: list[torch.nn.Parameter],
    batches: Iterable[Batch],
    total_steps: int,
    cfg: OptimConfig,
    desc: str,
    writer=None,
    adapter: Adapter | None = None,
    num_domains: int | None = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """Train for `total_steps` batches; returns summary metrics (final loss, samples/s).

    Sparse parameters (if they train) are updated inside backward by TorchRec's fused optimizer;
    the dense ones by AdamW here. With `num_domains`, each domain's mean loss is averaged
    (dynamic batch-aware training), else rows are averaged.
    """
    optimizer = None
    if dense_params:
        optimizer = torch.optim.AdamW(dense_params, lr=cfg.lr_dense, weight_decay=cfg.weight_decay)
    model.train()
    samples, start = 0, time.perf_counter()
    ema = None
    bar = tqdm(total=total_steps, desc=desc, unit="step", disable=not show_progress, mininterval=2.0)
    it: Iterator[Batch] = iter(batches)
    for step in range(total_steps):
        logs = adapter.on_step(step, total_steps) if adapter is not None else {}
        batch = next(it)
        out = model(batch.sparse, batch.dense, batch.domain)
        per_row = esmm_loss_per_row(out, batch)
        task = domain_normalised_mean(per_row, batch.domain, num_domains) if num_domains else per_row.mean()
        loss = task + out.aux_loss
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        samples += len(batch)
        value = float(loss.detach())
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        bar.update(1)
        if step % cfg.log_every == 0 or step == total_steps - 1:
            bar.set_postfix(loss=f"{ema:.4f}")
            if writer is not None:
                writer.add_scalar("train/loss", value, step)
                writer.add_scalar("train/task_loss", float(task.detach()), step)
                writer.add_scalar("train/aux_loss", float(out.aux_loss.detach()), step)
                for k, v in logs.items():
                    writer.add_scalar(f"train/{k}", v, step)
    bar.close()
    seconds = time.perf_counter() - start
    return {"train/loss_ema": float(ema or 0.0), "train/samples_per_s": samples / max(seconds, 1e-9),
            "train/seconds": seconds, "train/steps": float(total_steps)}
