"""Validation passes and early stopping, shared by pre-training and fine-tuning.

Every `validate_every` epochs (and after the last step) each rank streams its share of the `valid`
split through the model in eval mode (in lockstep: `evaluate.lockstep`) and the pass measures
`early_stopping_metric`: `loss` (the ranks sum the ESMM task loss and the row count) or `ctr_auc`
(scores spilled and ranked as `evaluate` does, `stream_metrics`). Either is global, so every rank
takes the same decision. A pass better than every earlier one saves the weights to a "best" checkpoint
(`<phase checkpoints>/best/pass_<index of the pass>`); `patience` passes without improvement stop
training; at the end the best checkpoint the record names is loaded back, so the phase exports the
best pass's weights. A domain without valid rows (`only_domain`) gets no passes: no early stopping.
A strategy that freezes the backbone validates from a prefix cache of the valid split (`ValidationInput`,
built in `phases/finetune.py`): the same scores without a lookup per pass.

Resume: the bookkeeping (`EarlyStopping.state_dict`) rides in the phase's train state and the best
checkpoints stay on disk. Best folders are named by pass index, not by step: a resume at another
world size renumbers the steps, never the passes. The best checkpoint the last regular checkpoint's
record names is kept until a later record names another (a crash between a best save and the next
regular checkpoint resumes with the older record); on resume, folders the record does not name
(passes after it) are removed, so a repeated pass never meets a stale folder of its index.
"""

from __future__ import annotations

import functools
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iak_dist.config import OptimConfig
from iak_dist.data.batch import Batch
from iak_dist.data.parquet import ParquetReader
from iak_dist.data.schema import Schema
from iak_dist.data.source import Split
from iak_dist.distributed.checkpoint import CheckpointManager
from iak_dist.distributed.context import DistContext, on_every_rank, on_main, sum_over_ranks
from iak_dist.distributed.sharding import DataParallelTableOptimizer
from iak_dist.distributed.zero import DenseEngine
from iak_dist.errors import UserError
from iak_dist.phases.evaluate import (
    Spill,
    cold_mask,
    first_row,
    lockstep,
    real_outputs,
    row_dtype,
    score,
    spill_folder,
    stream_metrics,
)
from iak_dist.phases.step import esmm_loss_per_row
from iak_dist.runtime import say

VALID_BATCH = 4096
"""Rows per rank and forward of a validation pass (no gradients: larger than a training batch)."""


@dataclass
class ValidationInput:
    """What a validation pass forwards: `pairs()` gives this rank's `(batch, real)` pairs of the valid
    split (a fresh `lockstep` stream each pass) and `model` scores them. Through the lookups: Parquet
    batches and the whole ranker; from a prefix cache of the valid split (a frozen backbone): cached
    batches and a `PrefixRanker` over the same modules, no lookups."""

    pairs: Callable[[], Iterator[tuple[Any, bool]]]
    model: torch.nn.Module


def lookup_input(reader: ParquetReader, ctx: DistContext, padding: Callable[[], Batch],
                 model: torch.nn.Module) -> ValidationInput:
    """A validation input that streams `reader`'s split from its files through `model`'s lookups."""
    return ValidationInput(lambda: lockstep(reader.epoch(0), ctx, padding), model)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, reader: ParquetReader, ctx: DistContext, padding: Callable[[], Batch],
                    domain: int | None = None) -> float | None:
    """`loss_over` the valid split streamed from `reader`'s files."""
    return loss_over(lookup_input(reader, ctx, padding, model), ctx, domain)


@torch.no_grad()
def loss_over(source: ValidationInput, ctx: DistContext, domain: int | None = None,
              held_out: list[int] | None = None, skip_slots: np.ndarray | None = None) -> float | None:
    """Mean ESMM task loss (CTR BCE + CTCVR BCE per row) over every rank's rows of `source`.

    With `domain`, only that domain's rows count (a model trained on one domain stops on its own
    loss); rows of `held_out` domains, and rows whose item is in `skip_slots` (cold items), never
    count. None when no rank has a row to count (every rank gets the same answer); NaN means the model
    diverged. The model is in eval mode during the pass (IAK: z = mu) and goes back to what it was.
    """
    sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss sum, rows: on the device, no syncs
    for batch, out in real_outputs(source.model, source.pairs(), ctx.device):
        per_row = esmm_loss_per_row(out, batch).double()
        counted = torch.ones_like(per_row) if domain is None else (batch.domain == domain).double()
        for index in held_out or []:  # finetune.hold_out_domains: their valid rows choose nothing
            counted = counted * (batch.domain != index).double()
        if skip_slots is not None:  # data.cold_items: unseen in pre-training, its choices included
            counted = counted * torch.from_numpy(~cold_mask(batch, skip_slots)).to(counted)
        sums += torch.stack([(per_row * counted).sum(), counted.sum()])
    # sync point: the loss is global, so every rank decides alike
    loss_sum, rows = sum_over_ranks(sums.cpu().numpy()).tolist()
    return loss_sum / rows if rows else None


@torch.no_grad()
def ctr_auc_over(source: ValidationInput, ctx: DistContext, schema: Schema, domain: int | None = None,
                 held_out: list[int] | None = None, skip_slots: np.ndarray | None = None) -> float | None:
    """CTR-AUC over every rank's rows of `source` (with `domain`: that domain's rows), as
    `evaluate` computes it (spilled scores, ranked bucket by bucket; memory bounded). None when no
    rank has a row to count or the rows hold one class only (no pass can be judged: a run of NaNs
    would stop training on weights no pass chose); NaN when the scores are not finite (diverged).
    Collective; the model goes back to the mode it was in."""
    was_training = source.model.training
    try:
        with spill_folder() as folder:
            spill = Spill(folder / "scored.bin", row_dtype(len(schema.domains)))
            keep = None
            if held_out:  # finetune.hold_out_domains: their valid rows are not scored (the last entry: domain -1)
                keep = np.ones(len(schema.domains) + 1, dtype=bool)
                keep[held_out] = False
            on_every_rank(score, source.model, source.pairs(), spill, ctx.device, keep, None, skip_slots)
            metrics = stream_metrics(spill, schema.domains, ctx, folder, has_conversion=False, has_user=False)
    finally:
        source.model.train(was_training)
    shared = on_main(ctx, lambda: metrics, share=True)  # rank 0 ranked the rows; the others get its numbers
    assert shared is not None
    entry = shared.get("overall" if domain is None else schema.domains[domain])
    if entry is None or not entry["rows"]:
        return None
    if entry["ctr_auc"] is None:
        one_class = entry["constant_logloss"] == 0.0  # every row clicked, or none
        return None if one_class else math.nan
    return float(entry["ctr_auc"])


@dataclass
class StoppingRecord:
    """The bookkeeping of early stopping: what each pass measured and when to stop."""

    patience: int
    metric: str = "loss"  # `OptimConfig.early_stopping_metric`: the loss is minimised, the AUC maximised
    best_value: float = math.nan  # nan: no pass yet
    best_step: int = -1
    best_pass: int = -1  # index of the best pass in `values`: names its checkpoint folder
    values: list[list[float]] = field(default_factory=list)  # [step, metric] per pass
    bad_passes: int = 0
    stopped: bool = False

    def better(self, value: float) -> bool:
        """Strictly better than the best pass so far (a NaN pass never is; any number beats no pass)."""
        if math.isnan(value):
            return False
        if math.isnan(self.best_value):
            return True
        return value > self.best_value if self.metric == "ctr_auc" else value < self.best_value

    def add(self, step: int, value: float) -> bool:
        """Record a pass; True when it is the best so far."""
        self.values.append([step, value])
        if self.better(value):
            self.best_value, self.best_step, self.bad_passes = value, step, 0
            self.best_pass = len(self.values) - 1
            return True
        self.bad_passes += 1
        self.stopped = self.patience > 0 and self.bad_passes >= self.patience
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "best_value": self.best_value, "best_step": self.best_step,
                "best_pass": self.best_pass, "values": self.values, "bad_passes": self.bad_passes,
                "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A record of another metric is refused: its best pass was chosen by a rule this run does not follow."""
        metric = state.get("metric", "loss")  # records before `early_stopping_metric`: the loss
        if metric != self.metric:
            raise UserError(f"the checkpoint's early stopping measured {metric}, the config says "
                            f"{self.metric}; set early_stopping_metric: {metric} or train this phase anew "
                            f"(move its checkpoints aside)")
        self.best_value = float(state.get("best_value", state.get("best_loss", math.nan)))
        self.best_step = int(state["best_step"])
        self.best_pass = int(state.get("best_pass", -1))  # -1: a record from before pass-named folders
        self.values = [list(pair) for pair in state.get("values", state.get("losses", []))]
        self.bad_passes, self.stopped = int(state["bad_passes"]), bool(state["stopped"])
        if self.best_step < 0:
            self.best_value = math.nan  # an old record's inf: no pass yet


class EarlyStopping:
    """Validation passes of one phase, the best checkpoint, and the decision to stop.

    Args:
        data_dir, schema: where the `valid` split is.
        cfg: the phase's loop (`validate_every`, `patience`, `early_stopping_metric`, `batch_size`).
        rows: rows this rank trains on per epoch (as `steps_for` counts them).
        root: the phase's checkpoint folder; the best checkpoints go to `root/best/pass_<index>`.
        model, dense, data_parallel_optimizer: what is validated, saved and restored.
        domain: index of the one domain a phase trains on (its rows alone are validated), or None.
        steps_for: the phase's step count of an `OptimConfig` (agreed over ranks).
        source: what the passes forward (`ValidationInput`); None: the valid split's files through
            `model`'s lookups. Checkpoints save and restore `model` either way.
        frozen_tables: the backbone's weights hash when its tables never change: the best checkpoints
            then leave them out (`CheckpointManager`).
        held_out: domain indices whose valid rows never count (`finetune.hold_out_domains`).
        skip_slots: item_id slots whose valid rows never count: pre-training's cold items
            (`data.cold_items`, `read_cold_slots`), unseen in pre-training, its choice of weights included.
    """

    def __init__(self, data_dir: str | Path, schema: Schema, cfg: OptimConfig, rows: int, ctx: DistContext,
                 root: Path, model: torch.nn.Module, dense: DenseEngine | None,
                 data_parallel_optimizer: DataParallelTableOptimizer | None,
                 steps_for: Callable[[OptimConfig, int], int], domain: int | None = None,
                 source: ValidationInput | None = None, frozen_tables: str | None = None,
                 held_out: list[int] | None = None, skip_slots: np.ndarray | None = None) -> None:
        if source is not None and skip_slots is not None:  # a cached batch has no item IDs to skip by
            raise ValueError("skip_slots needs the valid split's own rows (source=None), not a prefix cache")
        if source is None:
            split = Split.open(data_dir, "valid", schema)
            source = lookup_input(ParquetReader(split, schema, VALID_BATCH, ctx.rank, ctx.world_size), ctx,
                                  functools.partial(first_row, split, schema), model)
        self.source, self.frozen_tables = source, frozen_tables
        self.ctx, self.model, self.dense, self.domain = ctx, model, dense, domain
        self.held_out, self.skip_slots = held_out, skip_slots
        self.dp_optimizer = data_parallel_optimizer
        self.every = steps_for(replace(cfg, steps=0, epochs=cfg.validate_every), rows)
        self.record = StoppingRecord(cfg.patience, cfg.early_stopping_metric)
        self.schema = schema
        self.best_root = root / "best"
        self.what = "the valid split" if domain is None else f"domain {schema.domains[domain]!r}"
        self.no_rows = False  # set by the first pass that finds none: no more passes
        self._recorded_pass = -1  # the best pass the newest regular checkpoint's record names: kept

    def due(self, step: int, total: int) -> bool:
        """A pass runs after every `every` steps and after the last one (none once no rows were found)."""
        return not self.no_rows and (step % self.every == 0 or step == total)

    def best_folder(self, index: int) -> Path:
        return self.best_root / f"pass_{index:04d}"

    def validate(self, step: int, writer=None) -> bool:
        """One pass after `step` steps; saves the best checkpoint; True: stop training now.

        A pass without rows (a domain absent from the valid split) is no pass: it neither improves
        nor counts against patience (NaN, a diverged model, does count as a bad pass)."""
        if self.record.metric == "ctr_auc":
            value = ctr_auc_over(self.source, self.ctx, self.schema, self.domain, self.held_out, self.skip_slots)
        else:
            value = loss_over(self.source, self.ctx, self.domain, self.held_out, self.skip_slots)
        if value is None:
            self.no_rows = True
            why = "no valid rows" if self.record.metric == "loss" else "no valid rows of both classes"
            say(f"[valid] {self.what} has {why}: no validation passes, so no early stopping", self.ctx.rank)
            return False
        if writer is not None:
            writer.add_scalar(f"valid/{self.record.metric}", value, step)
        if self.record.add(step, value):
            best = self.record.best_pass
            CheckpointManager(self.best_folder(best), self.ctx, keep=1, frozen_tables=self.frozen_tables).save(
                step, self.model, self.dense, {"step": step}, data_parallel_optimizer=self.dp_optimizer)
            self._remove_best_folders(keep={best, self._recorded_pass})
        return self.record.stopped

    @property
    def stopped_at(self) -> int | None:
        """The step of the pass that stopped training (on resume: an earlier run's); None: not stopped."""
        return int(self.record.values[-1][0]) if self.record.stopped else None

    def restore_best(self, warn: Callable[[str], None]) -> None:
        """Load the weights of the best pass the record names (a no-op when no pass ran).

        Raises UserError when its checkpoint is missing or holds another step: the final weights
        would otherwise be exported silently as if they were the best."""
        if self.record.best_step < 0:
            return
        folder = self.best_folder(self.record.best_pass)
        state = CheckpointManager(folder, self.ctx, frozen_tables=self.frozen_tables).restore_latest(
            self.model, self.dense, warn=warn, data_parallel_optimizer=self.dp_optimizer)
        found = None if state is None else int(state["step"])
        if found != self.record.best_step:
            raise UserError(f"{folder}: the best validation pass (step {self.record.best_step}) has "
                            f"{'no checkpoint' if found is None else f'a checkpoint of step {found}'} there; "
                            f"move {self.best_root.parent} aside to train this phase again")

    def summary(self) -> dict[str, Any]:
        """The phase summary's keys: what the passes measured, each pass's [step, value], the best."""
        return {"valid/metric": self.record.metric, "valid/best": self.record.best_value,
                "valid/best_step": float(self.record.best_step), "valid/passes": self.record.values,
                "train/stopped_early": float(self.record.stopped)}

    def state_dict(self) -> dict[str, Any]:
        """The bookkeeping for a regular checkpoint: the best checkpoint it names is kept from now on."""
        self._recorded_pass = self.record.best_pass
        return {**self.record.state_dict(), "skipped_items": self._skipped_items()}

    def _skipped_items(self) -> int:
        """How many item slots the passes leave out (`skip_slots`): a record's values are of those rows."""
        return 0 if self.skip_slots is None else len(self.skip_slots)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Resume the bookkeeping and remove the best checkpoints its record does not name (a fresh
        start: every one): a pass of the same index would otherwise take a stale folder for its own
        (saves skip a complete step). A record whose passes read other rows (cold items counted then, left
        out now) is refused: its best value is not comparable with this run's passes."""
        if state:
            if int(state.get("skipped_items", 0)) != self._skipped_items():
                raise UserError(f"{self.best_root.parent}: the checkpoint's validation passes left out the valid "
                                f"rows of {int(state.get('skipped_items', 0))} item slots, this run's leave out "
                                f"{self._skipped_items()} (data.cold_items); move {self.best_root.parent} aside "
                                f"to train this phase again")
            self.record.load_state_dict(state)
        self._recorded_pass = self.record.best_pass
        self._remove_best_folders(keep={self._recorded_pass})
        self.ctx.barrier()  # sync point: no rank writes a new best before the stale ones are gone

    def _remove_best_folders(self, keep: set[int]) -> None:
        """Rank 0 removes every best folder but those of the passes in `keep` (by name, not step order)."""
        if not self.ctx.is_main or not self.best_root.is_dir():
            return
        kept = {self.best_folder(index).name for index in keep if index >= 0}
        for path in self.best_root.iterdir():
            if path.name not in kept:
                shutil.rmtree(path, ignore_errors=True)
