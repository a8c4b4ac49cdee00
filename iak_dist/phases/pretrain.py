"""Pre-training: the backbone on all domains pooled; exports a plain backbone folder.

Reads top to bottom: build (data, sharded model, dense engine) -> restore -> loop -> save.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from iak_dist.config import DistributedConfig, GenerativeConfig, ModelConfig, OptimConfig
from iak_dist.data.batch import Batch
from iak_dist.data.parquet import DataPosition, ParquetReader
from iak_dist.data.schema import Schema
from iak_dist.data.source import Split
from iak_dist.data.splits import read_cold_slots
from iak_dist.distributed.checkpoint import CheckpointManager, export_backbone, read_backbone_meta
from iak_dist.distributed.context import DistContext, collective_device
from iak_dist.distributed.sharding import ShardedRanker, format_plan, init_tables, plan_rows, shard_ranker
from iak_dist.distributed.zero import DenseEngine
from iak_dist.errors import UserError
from iak_dist.io import atomic_write_json, atomic_write_text
from iak_dist.model.backbone import Backbone
from iak_dist.model.item_tower import load_item_text
from iak_dist.model.ranker import Ranker
from iak_dist.phases.calibration import calibrate_heads, fold_into_heads
from iak_dist.phases.loop import train_loop
from iak_dist.phases.validation import EarlyStopping
from iak_dist.runtime import say
from iak_dist.tracking import summary_writer

if TYPE_CHECKING:
    from iak_dist.phases.pretrain_generative import Transfer


def batches_from(reader: ParquetReader, step: int) -> Iterator[Batch]:
    """Endless batches from global step `step` of a run without a saved data position (benchmarks)."""
    return reader.batches(reader.resume_position(None, step))


def steps_for(cfg: OptimConfig, rows: int) -> int:
    """Steps of a phase; every rank must run the same number (collectives), so the fewest wins."""
    steps = cfg.steps if cfg.steps > 0 else max(1, math.ceil(cfg.epochs * rows / cfg.batch_size))
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([steps], device=collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        steps = int(t.item())  # once per phase: the host sync does not matter
    return steps


def resume_step(step: int, position: DataPosition, per_epoch: int, exact: bool, by_epochs: bool) -> int:
    """The global step a resumed phase goes on from.

    `step` is the checkpoint's; `position` is where reading goes on (`ParquetReader.resume_position`);
    `exact`: the checkpoint's data position applied as it was. Otherwise (another world size or
    other data) the epoch in progress ended and `position` is the start of the next one: a phase
    measured in epochs counts its steps at this world size, so it goes on from that epoch's first
    step (`total` is epochs x this world size's batches per epoch; at or past it the phase is done).
    A phase of a fixed number of steps (`by_epochs` False) keeps the checkpoint's step count.
    """
    if exact or not by_epochs:
        return step
    return position.epoch * per_epoch + position.batches


def build_pretrain(schema: Schema, model_cfg: ModelConfig, optim: OptimConfig, dist_cfg: DistributedConfig,
                   seed: int, ctx: DistContext, transfer: Transfer | None = None,
                   data_dir: Path | None = None) -> tuple[ShardedRanker, DenseEngine]:
    """The pre-train model: sharded tables (initialised from `seed`) and the dense engine.

    With `transfer` (generative pre-training), its tensors replace the initial ones, frozen or not,
    before the dense engine is built (DeepSpeed takes only what requires grad).
    """
    backbone = Backbone(schema, model_cfg, device=torch.device("meta"))
    sharded = shard_ranker(Ranker(backbone), ctx, dist_cfg.sharding, optim.lr_sparse, optim.batch_size,
                           frozen_tables=transfer.frozen_tables if transfer is not None else ())
    init_tables(sharded.model, sharded.ranker, seed)
    if transfer is not None:
        transfer.apply(sharded.model, backbone)
    if backbone.item_tower is not None:  # the items' text vectors, read once: checkpoints and exports carry them
        load_item_text(sharded.model, data_dir, backbone.item_tower.table_size, ctx)
    dense = DenseEngine(backbone.dense_modules(), optim.lr_dense, optim.weight_decay, dist_cfg.zero,
                        optim.batch_size, ctx.world_size)
    return sharded, dense


PLAN_RECORD = "sharding_plan.txt"
"""In the run folder (the seeds' parent): the sharding plan as last printed, for the other seeds."""
_printed_plans: set[str] = set()  # plans this process printed (torchrun / --no-ray: one process, every seed)


def show_plan(plan_text: str, world_size: int, run_dir: Path, ctx: DistContext) -> None:
    """Print the sharding plan once, not once per seed: every seed of a run gets the same plan.

    A plan this process printed, or that another seed's pre-training recorded in
    `run_dir/sharding_plan.txt` (Ray runs each phase in fresh worker processes), gets one line
    saying where it is. Two seeds starting at the same instant may both print it.
    """
    if not ctx.is_main:
        return
    header = f"sharding plan over {world_size} rank(s)"
    text = f"{header}:\n{plan_text}\n"
    record = run_dir / PLAN_RECORD
    recorded = record.is_file() and record.read_text() == text
    if text in _printed_plans or recorded:
        say(f"[pretrain] {header}: the same as before, in {record}")
    else:
        say(f"[pretrain] {text.rstrip()}")
    if not recorded:
        atomic_write_text(record, text, durable=False)  # a courtesy to the next seed, not a result
    _printed_plans.add(text)


def pretrain(
    data_dir: str | Path, model_cfg: ModelConfig, optim: OptimConfig, dist_cfg: DistributedConfig, seed: int,
    out_dir: str | Path, ctx: DistContext, show_progress: bool = True,
    on_checkpoint: Callable[[int, Path], None] | None = None, generative: GenerativeConfig | None = None,
) -> dict[str, float]:
    """Train a backbone on the pretrain split of `data_dir`; write it to `out_dir/backbone`.

    With `optim.objective` generative, the generative stage (`generative`, None: its defaults) runs
    first, into `out_dir/generative` (reused while its config holds: `phases/pretrain_generative.py`),
    and the backbone starts from what it transfers.

    Each rank streams its share of the split. Checkpoints go to `out_dir/checkpoints/pretrain` every
    `dist_cfg.checkpoint_every` steps (and at the end), with the data position; a re-run resumes
    from the newest complete one, at the same batch (at another world size: at the next epoch,
    see `ParquetReader.resume_position`). With `optim.validate_every`, validation passes over the
    `valid` split pick the best weights, which are exported (`phases/validation.py`; early stopping
    with `optim.patience`). With `optim.calibrate`, the exported heads are calibrated on the valid
    split (`phases/calibration.py`); checkpoints keep the uncalibrated weights, so a re-run fits
    the same calibration again. `on_checkpoint(step, path)` runs on
    every rank after each checkpoint (Ray Train reports it there). `show_progress`: a progress bar,
    and a closing line saying where the backbone went (pipelines log their own lines instead).
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    schema = Schema.load(data_dir / "schema.yaml")
    split = Split.open(data_dir, "pretrain", schema)
    if optim.calibrate:
        Split.open(data_dir, "valid", schema)  # a missing or empty valid split: refused now, not after training
    reader = ParquetReader(split, schema, optim.batch_size, ctx.rank, ctx.world_size, shuffle=True, seed=seed,
                           drop_last=True, split_mode=dist_cfg.data_split)
    transfer, generative_summary = None, {}
    if optim.objective == "generative":
        from iak_dist.phases.pretrain_generative import pretrain_generative, transfer_from

        generative = generative or GenerativeConfig()
        source, generative_summary = pretrain_generative(data_dir, model_cfg, generative, dist_cfg, seed,
                                                         out_dir / "generative", ctx, show_progress)
        transfer = transfer_from(source, schema, model_cfg, generative)
    torch.manual_seed(seed)
    sharded, dense = build_pretrain(schema, model_cfg, optim, dist_cfg, seed, ctx, transfer, data_dir)
    plan_text = format_plan(plan_rows(sharded.plan, sharded.ranker, ctx.world_size))
    show_plan(plan_text, ctx.world_size, out_dir.parent, ctx)
    checkpoints = CheckpointManager(out_dir / "checkpoints" / "pretrain", ctx, dist_cfg.keep_checkpoints)
    total = steps_for(optim, reader.num_rows)
    state = checkpoints.restore_latest(sharded.model, dense, warn=lambda m: say(m, ctx.rank),
                                       data_parallel_optimizer=sharded.data_parallel_optimizer)
    # what the tables started from: the stage's weights, which tensors came over and whether they are frozen
    stage = None if transfer is None else (f"{read_backbone_meta(transfer.source)['weights']} "
                                           f"{'+'.join(transfer.tensors)} {'frozen' if transfer.freeze else 'trained'}")
    if state and state.get("generative_weights") != stage:  # another stage, transfer or freezing (or none)
        raise UserError(f"{state['path']}: pre-training checkpoint started from generative weights "
                        f"{state.get('generative_weights')}, this run's are {stage}; move "
                        f"{checkpoints.root} aside to pre-train again from them")
    validation = None
    cold_slots = read_cold_slots(data_dir, schema)  # data.cold_items: their valid rows choose nothing here
    if optim.validate_every > 0:
        validation = EarlyStopping(data_dir, schema, optim, reader.num_rows, ctx, checkpoints.root, sharded.model,
                                   dense, sharded.data_parallel_optimizer, steps_for, skip_slots=cold_slots)
        validation.load_state_dict(state.get("valid") if state else None)
    saved = state.get("data") if state else None
    position = reader.resume_position(saved, int(state["step"]) if state else 0)
    per_epoch = reader.batches_per_epoch()
    note = reader.resume_note(saved)
    start = resume_step(int(state["step"]) if state else 0, position, per_epoch, note is None, optim.steps == 0)
    stopped_at = validation.stopped_at if validation is not None else None
    if stopped_at is not None:
        say(f"[pretrain] stopped early at step {stopped_at} (best {validation.record.best_step}): "
            f"nothing left to train", ctx.rank)
    elif state:
        say(f"[pretrain] resuming at step {start} of {total} from {state['path']} (epoch {position.epoch}, "
            f"batch {position.batches})", ctx.rank)
        if note is not None:
            say(f"[pretrain] {note}: epoch {saved['epoch']} ends there and reading goes on at epoch "
                f"{position.epoch}", ctx.rank)

    def save(step: int, loss_ema: float | None = None) -> None:
        """`loss_ema`: the final checkpoint's, reported again by a re-run that finds nothing left to train."""
        data = position.advanced(step - start, per_epoch).state_dict()  # the batches of steps done, not prefetched
        train_state = {"step": step, "data": data, "generative_weights": stage}
        if loss_ema is not None:
            train_state["loss_ema"] = loss_ema
        if validation is not None:
            train_state["valid"] = validation.state_dict()
        path = checkpoints.save(step, sharded.model, dense, train_state, plan_text,
                                data_parallel_optimizer=sharded.data_parallel_optimizer)
        if on_checkpoint is not None:
            on_checkpoint(step, path)

    def on_step_end(step: int) -> None:
        if dist_cfg.checkpoint_every and step % dist_cfg.checkpoint_every == 0 and step < total:
            save(step)

    writer = summary_writer(out_dir / "tb" / "pretrain", ctx)
    try:
        if stopped_at is not None:  # the loop would count from `start`, which is not where it stopped
            summary = {"train/steps": float(stopped_at), "train/seconds": 0.0,
                       "train/loss_ema": float(state.get("loss_ema", math.nan)) if state else math.nan}
        else:
            summary = train_loop(sharded.model, dense, reader.batches(position), total, optim,
                                 desc=f"pretrain seed {seed}", start_step=min(start, total),
                                 data_parallel_optimizer=sharded.data_parallel_optimizer, writer=writer,
                                 show_progress=show_progress and ctx.is_main, on_step_end=on_step_end,
                                 progress_path=out_dir / "progress.json" if ctx.is_main else None,
                                 overlap_input_dist=dist_cfg.overlap_input_dist, device=ctx.device,
                                 validation=validation)
            if start < total:  # early stopping: the step it stopped at
                save(int(summary["train/steps"]), summary["train/loss_ema"])
            elif state:  # the resumed position is at or past the end: the checkpoint stays as it is
                say(f"[pretrain] the checkpoint's position is at or past the end (step {start} of {total}): "
                    f"nothing left to train", ctx.rank)
        if validation is not None:
            validation.restore_best(lambda m: say(m, ctx.rank))
            summary |= validation.summary()
        summary |= generative_summary
        calibration = None
        if optim.calibrate:
            calibration = calibrate_heads(sharded.model, data_dir, schema, ctx, skip_slots=cold_slots)
            if calibration is None:
                say("[pretrain] the valid split has no rows: the heads are not calibrated", ctx.rank)
            else:
                summary |= calibration.summary()
                say(f"[pretrain] heads calibrated on the valid split: ESMM loss {calibration.valid_loss_before:.4f}"
                    f" -> {calibration.valid_loss_after:.4f} (ctr logit x{calibration.ctr_scale:.3f} "
                    f"{calibration.ctr_bias:+.3f}, cvr logit x{calibration.cvr_scale:.3f} "
                    f"{calibration.cvr_bias:+.3f})", ctx.rank)
        with dense.gathered():
            if calibration is not None:  # the live heads: only the export below reads them again
                backbone = sharded.ranker.backbone
                fold_into_heads(backbone.ctr_head, backbone.cvr_head, calibration)
            export_backbone(sharded.model, schema, model_cfg, out_dir / "backbone", ctx.rank,
                            pretrain_data=split.content_fingerprint())
        if ctx.is_main:
            atomic_write_json(out_dir / "backbone" / "train_summary.json", summary)
            atomic_write_text(out_dir / "backbone" / "plan.txt", plan_text + "\n")
        ctx.barrier()  # sync point: other ranks go on to read the exported backbone
    finally:
        if writer is not None:
            writer.close()
    if show_progress:
        say(f"[pretrain] seed {seed}: backbone written to {out_dir / 'backbone'}", ctx.rank)
    return summary
