"""Validation passes and early stopping, shared by pre-training and fine-tuning.

Every `validate_every` epochs (and after the last step) each rank streams its share of the `valid`
split through the model in eval mode (in lockstep: `evaluate.lockstep`), and the ranks sum the
ESMM task loss and the row count: the validation loss is global, so every rank takes the same
decision. A pass better than every earlier one saves the weights to a "best" checkpoint
(`<phase checkpoints>/best`, one kept); `patience` passes without improvement stop training;
at the end the best checkpoint is loaded back, so the phase exports the best pass's weights.
A domain without valid rows (`only_domain`) gets no passes: no early stopping.

Resume: the bookkeeping (`EarlyStopping.state_dict`) rides in the phase's train state and the best
checkpoint stays on disk. A crash after a best save and before the next regular checkpoint makes
the re-run repeat those steps (resume is exact) and reach the same best pass again.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from iak_dist.config import OptimConfig
from iak_dist.data.batch import Batch, arrow_to_batch
from iak_dist.data.parquet import ParquetReader
from iak_dist.data.schema import Schema
from iak_dist.data.source import Split
from iak_dist.distributed.checkpoint import CheckpointManager
from iak_dist.distributed.context import DistContext, sum_over_ranks
from iak_dist.distributed.sharding import DataParallelTableOptimizer
from iak_dist.distributed.zero import DenseEngine
from iak_dist.phases.evaluate import lockstep
from iak_dist.phases.step import esmm_loss_per_row
from iak_dist.runtime import say

VALID_BATCH = 4096
"""Rows per rank and forward of a validation pass (no gradients: larger than a training batch)."""


@torch.no_grad()
def validation_loss(model: torch.nn.Module, reader: ParquetReader, ctx: DistContext, padding: Callable[[], Batch],
                    domain: int | None = None) -> float | None:
    """Mean ESMM task loss (CTR BCE + CTCVR BCE per row) over every rank's rows of `reader`'s split.

    With `domain`, only that domain's rows count (a model trained on one domain stops on its own
    loss). None when no rank has a row to count (every rank gets the same answer); NaN means the
    model diverged. The model is in eval mode during the pass (IAK: z = mu) and goes back to what it was.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss sum, rows: on the device, no syncs
    try:
        for batch, real in lockstep(reader.epoch(0), ctx, padding):
            batch = batch.to(ctx.device)
            out = model(batch)
            if not real:
                continue
            per_row = esmm_loss_per_row(out, batch).double()
            counted = torch.ones_like(per_row) if domain is None else (batch.domain == domain).double()
            sums += torch.stack([(per_row * counted).sum(), counted.sum()])
    finally:
        model.train(was_training)
    # sync point: the loss is global, so every rank decides alike
    loss_sum, rows = sum_over_ranks(sums.cpu().numpy()).tolist()
    return loss_sum / rows if rows else None


@dataclass
class StoppingRecord:
    """The bookkeeping of early stopping: what each pass measured and when to stop."""

    patience: int
    best_loss: float = math.inf
    best_step: int = -1
    losses: list[list[float]] = field(default_factory=list)  # [step, loss] per pass
    bad_passes: int = 0
    stopped: bool = False

    def add(self, step: int, loss: float) -> bool:
        """Record a pass; True when it is the best so far (a NaN loss never is)."""
        self.losses.append([step, loss])
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.bad_passes = loss, step, 0
            return True
        self.bad_passes += 1
        self.stopped = self.patience > 0 and self.bad_passes >= self.patience
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss, "best_step": self.best_step, "losses": self.losses,
                "bad_passes": self.bad_passes, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss, self.best_step = float(state["best_loss"]), int(state["best_step"])
        self.losses = [list(pair) for pair in state["losses"]]
        self.bad_passes, self.stopped = int(state["bad_passes"]), bool(state["stopped"])


class EarlyStopping:
    """Validation passes of one phase, the best checkpoint, and the decision to stop.

    Args:
        data_dir, schema: where the `valid` split is.
        cfg: the phase's loop (`validate_every`, `patience`, `batch_size`).
        rows: rows this rank trains on per epoch (as `steps_for` counts them).
        root: the phase's checkpoint folder; the best checkpoint goes to `root/best`.
        model, dense, data_parallel_optimizer: what is validated, saved and restored.
        domain: index of the one domain a phase trains on (its rows alone are validated), or None.
        steps_for: the phase's step count of an `OptimConfig` (agreed over ranks).
    """

    def __init__(self, data_dir: str | Path, schema: Schema, cfg: OptimConfig, rows: int, ctx: DistContext,
                 root: Path, model: torch.nn.Module, dense: DenseEngine | None,
                 data_parallel_optimizer: DataParallelTableOptimizer | None,
                 steps_for: Callable[[OptimConfig, int], int], domain: int | None = None) -> None:
        split = Split.open(data_dir, "valid", schema)
        self.reader = ParquetReader(split, schema, VALID_BATCH, ctx.rank, ctx.world_size)
        self.ctx, self.model, self.dense, self.domain = ctx, model, dense, domain
        self.dp_optimizer = data_parallel_optimizer
        self.every = steps_for(replace(cfg, steps=0, epochs=cfg.validate_every), rows)
        self.record = StoppingRecord(cfg.patience)
        self.best = CheckpointManager(root / "best", ctx, keep=1)
        self.what = "the valid split" if domain is None else f"domain {schema.domains[domain]!r}"
        self.no_rows = False  # set by the first pass that finds none: no more passes
        self._padding = lambda: arrow_to_batch(split.read(split.parts[0]).slice(0, 1), schema)

    def due(self, step: int, total: int) -> bool:
        """A pass runs after every `every` steps and after the last one (none once no rows were found)."""
        return not self.no_rows and (step % self.every == 0 or step == total)

    def validate(self, step: int, writer=None) -> bool:
        """One pass after `step` steps; saves the best checkpoint; True: stop training now.

        A pass without rows (a domain absent from the valid split) is no pass: it neither improves
        nor counts against patience (NaN, a diverged model, does count as a bad pass)."""
        loss = validation_loss(self.model, self.reader, self.ctx, self._padding, self.domain)
        if loss is None:
            self.no_rows = True
            say(f"[valid] {self.what} has no valid rows: no validation passes, so no early stopping", self.ctx.rank)
            return False
        if writer is not None:
            writer.add_scalar("valid/loss", loss, step)
        if self.record.add(step, loss):
            self.best.save(step, self.model, self.dense, {"step": step},
                           data_parallel_optimizer=self.dp_optimizer)
        return self.record.stopped

    def restore_best(self, warn: Callable[[str], None]) -> None:
        """Load the best pass's weights (a no-op when no pass ran)."""
        if self.record.best_step >= 0:
            self.best.restore_latest(self.model, self.dense, warn=warn, data_parallel_optimizer=self.dp_optimizer)

    def summary(self) -> dict[str, Any]:
        """The phase summary's keys (see the contract)."""
        return {"valid/best_loss": self.record.best_loss, "valid/best_step": float(self.record.best_step),
                "valid/losses": self.record.losses, "train/stopped_early": float(self.record.stopped)}

    def state_dict(self) -> dict[str, Any]:
        return self.record.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Resume the bookkeeping; None (a fresh start) removes a best checkpoint left by an earlier run,
        which a pass at the same step would otherwise take for its own (saves skip a complete step)."""
        if state:
            self.record.load_state_dict(state)
            return
        if self.ctx.is_main:
            shutil.rmtree(self.best.root, ignore_errors=True)
        self.ctx.barrier()  # sync point: no rank writes the new best before the old one is gone
