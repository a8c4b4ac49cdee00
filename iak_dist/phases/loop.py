"""The one training loop: forward, ESMM loss (+ adapter loss), backward, step. Used by every phase."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from iak_dist.config import OptimConfig
from iak_dist.data.batch import Batch
from iak_dist.distributed.sharding import DataParallelTableOptimizer, set_sparse_lr
from iak_dist.distributed.zero import DenseEngine
from iak_dist.faults import fault_point
from iak_dist.io import atomic_write_json
from iak_dist.model.strategies.base import Adapter
from iak_dist.phases.schedule import lr_factor
from iak_dist.phases.step import forward_loss, train_step
from iak_dist.phases.validation import EarlyStopping


def train_loop(
    model: torch.nn.Module,
    dense: DenseEngine | None,
    batches: Iterable[Batch],
    total_steps: int,
    cfg: OptimConfig,
    desc: str,
    start_step: int = 0,
    data_parallel_optimizer: DataParallelTableOptimizer | None = None,
    writer=None,
    adapter: Adapter | None = None,
    num_domains: int | None = None,
    show_progress: bool = True,
    on_step_end: Callable[[int], None] | None = None,
    progress_path: Path | None = None,
    overlap_input_dist: bool = False,
    device: torch.device | None = None,
    validation: EarlyStopping | None = None,
) -> dict[str, float]:
    """Train from `start_step` to `total_steps`; returns summary metrics (final loss, samples/s).

    Sparse parameters (if they train) are updated inside backward by TorchRec's fused optimizer;
    the dense ones by DeepSpeed (`dense`); both at `lr_factor(step, total_steps, cfg)` of their base
    rate. With `num_domains`, each domain's mean loss is averaged (dynamic batch-aware training),
    else rows are averaged. With `validation`, its passes run when due and may stop training early
    (the best weights are restored by the phase). `on_step_end(step)` runs after each step (and
    pass) with the number of steps done (checkpointing hooks in there). With `progress_path`, the
    step, loss and throughput are written there as JSON (`iak-dist pipeline status` reads it).
    With `overlap_input_dist`, steps run through TorchRec's sparse-dist train pipeline (the next
    batch's input distribution overlaps this batch's compute); the arithmetic is the same.
    """
    pipeline = None
    if overlap_input_dist:
        from iak_dist.distributed.pipeline import SparseDistPipeline

        pipeline = SparseDistPipeline(model, functools.partial(forward_loss, model, num_domains=num_domains), dense,
                                      data_parallel_optimizer, device or torch.device("cpu"))
    model.train()
    samples, start = 0, time.perf_counter()
    ema, losses = None, []
    pending: list[torch.Tensor] = []  # losses of the steps since the last log point, still on the device
    bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", disable=not show_progress,
               mininterval=2.0)
    it: Iterator[Batch] = iter(batches)
    factor, done = None, start_step
    for step in range(start_step, total_steps):
        logs = adapter.on_step(step, total_steps) if adapter is not None else {}
        if (new_factor := lr_factor(step, total_steps, cfg)) != factor:  # constant: set once
            factor = new_factor
            if dense is not None:
                dense.set_lr(cfg.lr_dense * factor)
            set_sparse_lr(model, data_parallel_optimizer, cfg.lr_sparse * factor)
        if pipeline is not None:
            batch, task, out = pipeline.progress(it)  # forward, backward, steps: see distributed/pipeline.py
            loss = task + out.aux_loss
        else:
            batch = next(it)
            loss, (batch, task, out) = train_step(model, dense, batch if device is None
                                                  else batch.to(device, non_blocking=True),
                                                  num_domains, data_parallel_optimizer)
        samples += len(batch)
        pending.append(loss.detach())
        bar.update(1)
        if step % cfg.log_every == 0 or step == total_steps - 1:
            # sync point: the losses reach the host once per log_every steps (float(loss) each step
            # would stall a GPU's queue every step)
            values = torch.stack(pending).tolist()
            pending.clear()
            for value in values:
                ema = value if ema is None else 0.98 * ema + 0.02 * value
            losses.extend(values)
            value = values[-1]
            bar.set_postfix(loss=f"{ema:.4f}")
            if writer is not None:
                writer.add_scalar("train/loss", value, step)
                writer.add_scalar("train/lr_dense", cfg.lr_dense * factor, step)
                writer.add_scalar("train/lr_sparse", cfg.lr_sparse * factor, step)
                writer.add_scalar("train/task_loss", float(task.detach()), step)
                writer.add_scalar("train/aux_loss", float(out.aux_loss.detach()), step)
                for k, v in logs.items():
                    writer.add_scalar(f"train/{k}", v, step)
            if progress_path is not None:
                atomic_write_json(progress_path, {
                    "desc": desc, "step": step + 1, "total": total_steps, "loss": ema, "updated": time.time(),
                    "samples_per_s": samples / max(time.perf_counter() - start, 1e-9)}, durable=False)
        fault_point("step", step + 1, int(os.environ.get("RANK", "0")))
        done = step + 1
        stop = False
        if validation is not None and validation.due(done, total_steps):
            if pipeline is not None:  # the pipeline rewrote the tables' forward: plain forwards need it back
                pipeline.detach()
            stop = validation.validate(done, writer)
            if pipeline is not None:
                pipeline.attach()
        if on_step_end is not None:
            on_step_end(done)
        if stop:
            break
    if pending:  # stopped early between log points
        for value in torch.stack(pending).tolist():
            ema = 0.98 * ema + 0.02 * value if ema is not None else value
            losses.append(value)
    bar.close()
    seconds = time.perf_counter() - start
    pipelined = len(pipeline._pipelined_modules) if pipeline is not None else 0
    if pipeline is not None:  # forwards after the loop (calibration, a test's check) need the tables' own
        pipeline.detach()
    return {"train/loss_ema": float(ema or 0.0), "train/samples_per_s": samples / max(seconds, 1e-9),
            "train/seconds": seconds, "train/steps": float(done), "train/losses": losses,
            # sharded modules whose input dist the pipeline overlaps (0: plain loop)
            "train/pipelined_modules": float(pipelined)}
