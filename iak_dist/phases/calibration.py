"""Calibration of the pre-trained heads on the valid split (`pretrain.calibrate`).

Why: the weights that rank best (highest valid CTR-AUC) are over-confident: their LogLoss is worse
than a constant predictor's. A scale and a bias of each head's logit,

    ctr' = a_ctr * ctr_logit + b_ctr        cvr' = a_cvr * cvr_logit + b_cvr,

fitted on the valid split by minimising the same ESMM loss the model trains on (CTR BCE + CTCVR BCE),
fix the probabilities without changing how either head orders rows. They are folded into the heads'
last Linear (`fold_into_heads`), so the exported backbone needs nothing new to score.

How, at any scale: one lockstep pass over each rank's share of the valid split writes the two logits
and the labels to a spill on disk (`evaluate.Spill`, 10 bytes a row); then damped Newton steps over the
4 parameters (`fit`), each evaluation a pass over the spill in chunks, with the loss, gradient and Hessian
summed over ranks (`sum_over_ranks`): every rank takes the same steps and ends with the same numbers.
Without a conversion label only the CTR pair is fitted (the CVR head stays as it is).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from iak_dist.data.batch import Batch
from iak_dist.data.parquet import ParquetReader
from iak_dist.data.schema import Schema
from iak_dist.data.source import Split
from iak_dist.distributed.context import DistContext, on_every_rank, sum_over_ranks
from iak_dist.phases.evaluate import Spill, cold_mask, first_row, lockstep, real_outputs, spill_folder

LOGITS = np.dtype([("ctr", np.float32), ("cvr", np.float32), ("click", np.int8), ("conversion", np.int8)])
"""One spilled valid row: both heads' logits and both labels."""
MAX_STEPS = 30
"""Newton steps at most (the loss is smooth in 4 parameters: 5-8 usually reach the tolerance)."""
TOLERANCE = 1e-10
"""Stop when a step lowers the mean loss by less than this."""
IDENTITY = (1.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class HeadCalibration:
    """The fitted maps of both heads' logits and what they did on the valid split."""

    ctr_scale: float
    ctr_bias: float
    cvr_scale: float
    cvr_bias: float
    valid_loss_before: float  # mean ESMM loss per row, identity maps
    valid_loss_after: float
    steps: int

    def summary(self) -> dict[str, float]:
        """The keys of a phase summary (train_summary.json)."""
        return {f"calibration/{k}": float(v) for k, v in asdict(self).items()}


def esmm_loss_sum(theta: torch.Tensor, rows: np.ndarray, with_conversion: bool) -> torch.Tensor:
    """Sum over `rows` of the ESMM loss with the logits mapped by `theta` = (a_ctr, b_ctr, a_cvr, b_cvr):
    the arithmetic of `step.esmm_loss_per_row`, in float64."""
    def column(key: str) -> torch.Tensor:  # a packed record's field is strided: copied to float64
        return torch.from_numpy(np.asarray(rows[key], dtype=np.float64))

    ctr = theta[0] * column("ctr") + theta[1]
    loss = F.binary_cross_entropy_with_logits(ctr, column("click"), reduction="sum")
    if with_conversion:
        cvr = theta[2] * column("cvr") + theta[3]
        conversion = column("conversion")
        log_p = F.logsigmoid(ctr) + F.logsigmoid(cvr)
        log_not_p = torch.log1p(-log_p.exp().clamp(max=1 - 1e-7))
        loss = loss - (conversion * log_p + (1 - conversion) * log_not_p).sum()
    return loss


def loss_grad_hessian(theta: np.ndarray, spill: Spill,
                      with_conversion: bool) -> tuple[float, np.ndarray, np.ndarray, int]:
    """(loss sum, gradient [4], Hessian [4, 4], rows) over every rank's spilled rows at `theta`.
    Collective: every rank calls it with the same `theta`."""
    sums = np.zeros(1 + 4 + 16 + 1)
    point = torch.tensor(theta, dtype=torch.float64)
    for chunk in spill.chunks():
        def loss(t: torch.Tensor, rows: np.ndarray = chunk) -> torch.Tensor:
            return esmm_loss_sum(t, rows, with_conversion)

        sums[0] += float(loss(point))
        sums[1:5] += torch.autograd.functional.jacobian(loss, point).numpy()
        sums[5:21] += torch.autograd.functional.hessian(loss, point).numpy().ravel()
        sums[21] += len(chunk)
    sums = sum_over_ranks(sums)  # sync point: every rank steps alike
    return float(sums[0]), sums[1:5], sums[5:21].reshape(4, 4), int(sums[21])


def fit(spill: Spill, with_conversion: bool) -> HeadCalibration | None:
    """Damped Newton (Levenberg-Marquardt) on the 4 parameters (2 without a conversion label); None when
    no rank has rows.

    The CTCVR term is not convex in the 4 parameters: where the Hessian is not positive definite, or a
    step does not lower the loss, the damping grows (towards a short gradient step) until one does, and
    shrinks again after each accepted step. The fit ends when a step lowers the mean loss by less than
    `TOLERANCE` or after `MAX_STEPS`. Collective: every rank computes the same steps.
    """
    free = [0, 1, 2, 3] if with_conversion else [0, 1]
    theta = np.array(IDENTITY)
    loss, grad, hessian, rows = loss_grad_hessian(theta, spill, with_conversion)
    if rows == 0:
        return None
    before, steps, damping = loss / rows, 0, 0.0
    while steps < MAX_STEPS:
        sub = hessian[np.ix_(free, free)]
        floor = 1e-6 * max(float(np.abs(np.diag(sub)).mean()), 1e-12)  # the smallest damping tried
        accepted = None
        for _ in range(40):
            try:
                factor = np.linalg.cholesky(sub + damping * np.eye(len(free)))
            except np.linalg.LinAlgError:  # not positive definite: not a descent direction yet
                damping = max(damping * 10, floor)
                continue
            direction = np.zeros(4)
            direction[free] = np.linalg.solve(factor.T, np.linalg.solve(factor, grad[free]))
            candidate = theta - direction
            found = loss_grad_hessian(candidate, spill, with_conversion)
            if found[0] <= loss:
                accepted = candidate, found
                break
            damping = max(damping * 10, floor)
        if accepted is None:  # no step lowers the loss: at the minimum up to rounding
            break
        improvement = (loss - accepted[1][0]) / rows
        theta, (loss, grad, hessian, _) = accepted
        steps, damping = steps + 1, damping / 10
        if improvement < TOLERANCE:
            break
    return HeadCalibration(*(float(v) for v in theta), valid_loss_before=before, valid_loss_after=loss / rows,
                           steps=steps)


def spill_logits(model: nn.Module, reader: ParquetReader, ctx: DistContext, padding: Callable[[], Batch],
                 spill: Spill, skip_slots: np.ndarray | None = None) -> None:
    """Append both logits and labels of this rank's valid rows to `spill` (eval mode, lockstep), less the
    rows whose item is in `skip_slots`."""
    for batch, out in real_outputs(model, lockstep(reader.epoch(0), ctx, padding), ctx.device):
        rows = np.empty(len(batch), dtype=LOGITS)
        for key, value in (("ctr", out.ctr_logit), ("cvr", out.cvr_logit), ("click", batch.click),
                           ("conversion", batch.conversion)):
            rows[key] = value.detach().cpu().numpy()
        spill.append(rows if skip_slots is None else rows[~cold_mask(batch, skip_slots)])


def calibrate_heads(model: nn.Module, data_dir: str | Path, schema: Schema, ctx: DistContext,
                    batch_size: int = 4096, spill_root: str | Path | None = None,
                    skip_slots: np.ndarray | None = None) -> HeadCalibration | None:
    """Fit the heads' calibration on the valid split of `data_dir` (None: the split has no rows), less the
    rows whose item is in `skip_slots` (pre-training's cold items). Collective; the model is not changed
    (`fold_into_heads` does that)."""
    split = Split.open(data_dir, "valid", schema)
    reader = ParquetReader(split, schema, batch_size, ctx.rank, ctx.world_size)
    with spill_folder(spill_root) as folder:
        spill = Spill(folder / "logits.bin", LOGITS)
        on_every_rank(spill_logits, model, reader, ctx, functools.partial(first_row, split, schema), spill,
                      skip_slots)
        return fit(spill, with_conversion=schema.conversion is not None)


@torch.no_grad()
def fold_into_heads(ctr_head: nn.Linear, cvr_head: nn.Linear, calibration: HeadCalibration) -> None:
    """Make each head's Linear compute its calibrated logit: W' = a W, b' = a b + c."""
    for head, scale, bias in ((ctr_head, calibration.ctr_scale, calibration.ctr_bias),
                              (cvr_head, calibration.cvr_scale, calibration.cvr_bias)):
        head.weight.mul_(scale)
        head.bias.mul_(scale).add_(bias)
