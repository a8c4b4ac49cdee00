"""What each phase does, and the in-process executor that runs phases in this process.

`run_phase` is the body of every phase type (prepare, pretrain, finetune, evaluate, export); the
in-process executor calls it here (alone, or on every rank under torchrun / srun, where phases are
collective), the Ray executor in its Ray tasks and Ray Train workers. Inside a phase, finished
work (a seed's backbone, a strategy's adapter, an evaluation) is skipped, so a restarted phase
continues where it stopped. The driver (`driver.py`) decides which phases run.
"""

from __future__ import annotations

import concurrent.futures as futures
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from iak_dist.config import PhaseSpec, PipelineConfig
from iak_dist.data.prepare import is_prepared, prepare
from iak_dist.data.schema import Schema
from iak_dist.distributed.context import DistContext, close_distributed, init_distributed, on_main
from iak_dist.errors import UserError
from iak_dist.io import atomic_write_json
from iak_dist.orchestration.outcome import Interrupted
from iak_dist.runtime import say

T = TypeVar("T")
OnCheckpoint = Callable[[int, Path], None]


def log(message: str) -> None:
    """A pipeline progress line, time-stamped (rank 0 only)."""
    say(f"[pipeline {time.strftime('%H:%M:%S')}] {message}")


def seed_dir(cfg: PipelineConfig, seed: int) -> Path:
    return Path(cfg.run_dir) / f"seed{seed}"


def ensure_data(cfg: PipelineConfig) -> Path:
    data_dir = Path(cfg.data.dir)
    if cfg.data.source != "parquet" and is_prepared(data_dir, cfg.data):
        log(f"data: {data_dir} is prepared, reusing it")
    else:
        log(f"data: checking {data_dir}" if cfg.data.source == "parquet"
            else f"data: preparing {cfg.data.source} into {data_dir}")
        prepare(cfg.data)
    return data_dir


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    """Strict JSON has no NaN: a metric that is not a finite number is recorded as null."""
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()
            if isinstance(v, (int, float, str)) or v is None}


def run_phase(cfg: PipelineConfig, phase: PhaseSpec, ctx: DistContext | None, show_progress: bool = False,
              on_checkpoint: OnCheckpoint | None = None) -> dict[str, Any]:
    """One phase's work on this process (every rank of a training phase calls it).

    Returns {"metrics": {...}, "checkpoint": path or None}; `ctx` may be None for prepare / export,
    which run on one process.
    """
    if phase.type == "prepare":
        on_main(ctx, lambda: ensure_data(cfg))
        return {"metrics": {}, "checkpoint": None}
    if phase.type == "export":
        from iak_dist.serving.export import export_run

        out = on_main(ctx, lambda: str(export_run(cfg)), share=True)
        log(f"export: {out}")
        return {"metrics": {}, "checkpoint": out}
    assert ctx is not None, f"a {phase.type} phase needs a process group"
    metrics: dict[str, Any] = {}
    if phase.type == "pretrain":
        from iak_dist.phases.pretrain import pretrain

        for seed in cfg.seeds:
            if (seed_dir(cfg, seed) / "backbone" / "backbone.json").is_file():
                backbone_of(cfg, seed)  # the config must still describe it
                log(f"seed {seed}: pre-trained backbone found, skipping pre-training")
                continue
            log(f"seed {seed}: pre-training on all domains pooled")
            summary = pretrain(cfg.data.dir, cfg.model, cfg.pretrain, cfg.distributed, seed, seed_dir(cfg, seed),
                               ctx, show_progress, on_checkpoint=on_checkpoint, generative=cfg.generative)
            metrics[f"pretrain/loss/seed{seed}"] = summary["train/loss_ema"]
    elif phase.type == "finetune":
        from iak_dist.phases.finetune import finetune

        for seed in cfg.seeds:
            for strategy in phase.strategies or cfg.finetune.strategies:
                adapter_dir = seed_dir(cfg, seed) / "adapters" / strategy
                if (adapter_dir / "adapter_config.json").is_file():
                    continue
                log(f"seed {seed}: fine-tuning every domain with `{strategy}`")
                summary = finetune(cfg.data.dir, backbone_of(cfg, seed), strategy, cfg.finetune, seed,
                                   adapter_dir, ctx, show_progress, cfg.distributed, on_checkpoint=on_checkpoint)
                if "train/loss_ema" in summary:
                    metrics[f"finetune/loss/{strategy}/seed{seed}"] = summary["train/loss_ema"]
    elif phase.type == "evaluate":
        run_dir = evaluate_and_report(cfg, ctx)
        agg = json.loads((run_dir / "report.json").read_text())["aggregate"]
        metrics = {f"eval/ctr_auc/{s}": agg[s]["overall"]["ctr_auc"]["mean"] for s in agg}
    else:
        raise UserError(f"phase {phase.name}: unknown type {phase.type!r}")
    return {"metrics": _finite(metrics), "checkpoint": None}


def backbone_of(cfg: PipelineConfig, seed: int) -> Path:
    """The seed's pre-trained backbone folder, after checking the config's model section is its own."""
    from iak_dist.phases.common import check_model_matches

    backbone = seed_dir(cfg, seed) / "backbone"
    check_model_matches(cfg.model, backbone)
    return backbone


def eval_is_current(eval_file: Path, adapter_dir: Path) -> bool:
    """Whether `eval_file` (an adapter's eval.json / eval_valid.json) holds what an evaluation makes now: it
    exists, and an adapter fine-tuned with domains held out has its `TUNED_DOMAINS` entry (an evaluation
    made before that entry existed is made again, so every strategy's choice reads the same rows)."""
    from iak_dist.model.strategies.saving import CONFIG_FILE
    from iak_dist.report import TUNED_DOMAINS

    if not eval_file.is_file():
        return False
    held_out = json.loads((adapter_dir / CONFIG_FILE).read_text()).get("hold_out_domains")
    return not held_out or TUNED_DOMAINS in json.loads(eval_file.read_text())


def evaluate_and_report(cfg: PipelineConfig, ctx: DistContext, seeds: list[int] | None = None,
                        strategies: list[str] | None = None, require_all: bool = True,
                        say_line: Callable[[str], None] = log) -> Path:
    """Evaluate the fine-tuned (seed, strategy) pairs on the valid and test splits; write the comparison report.

    Each pair is scored on `valid` (`eval_valid.json`: what every choice reads, export's best strategy
    and sweeps) and on `test` (`eval.json`: the report's scores, read by nothing that chooses). Every
    adapter is checked (backbone, weights hash) before any is scored, so a bad one writes nothing.
    With `require_all` (the pipeline), a pair not fine-tuned yet is an error; otherwise
    (`iak-dist evaluate`) what exists is evaluated and the missing pairs are listed in one line.
    """
    from iak_dist.distributed.checkpoint import read_backbone_meta
    from iak_dist.metrics import format_metric
    from iak_dist.model.strategies.saving import verify_adapter
    from iak_dist.phases.evaluate import evaluate
    from iak_dist.report import write_report

    run_dir = Path(cfg.run_dir)
    seeds = list(seeds if seeds is not None else cfg.seeds)
    strategies = list(strategies or cfg.finetune.strategies)
    pairs = [(seed, s) for seed in seeds for s in strategies]
    missing = [(seed, s) for seed, s in pairs
               if not (seed_dir(cfg, seed) / "adapters" / s / "adapter_config.json").is_file()]
    if missing and (require_all or len(missing) == len(pairs)):
        seed, strategy = missing[0]
        raise UserError(f"{seed_dir(cfg, seed) / 'adapters' / strategy}: `{strategy}` (seed {seed}) is not "
                        f"fine-tuned yet; run `iak-dist finetune CONFIG --strategy {strategy} --seed {seed}` first")
    if missing:
        say_line("not fine-tuned yet, left out of the report: "
                 + ", ".join(f"`{s}` seed {seed}" for seed, s in missing))
    present = [pair for pair in pairs if pair not in missing]
    for seed in sorted({seed for seed, _ in present}):
        meta = read_backbone_meta(backbone_of(cfg, seed))
        for _, strategy in (pair for pair in present if pair[0] == seed):
            verify_adapter(seed_dir(cfg, seed) / "adapters" / strategy, meta)
    results: dict = {s: {} for s in strategies if any(p[1] == s for p in present)}
    valid_results: dict = {s: {} for s in results}
    costs: dict = {s: {"seconds": 0.0, "trainable_params": 0.0} for s in results}
    for seed, strategy in present:
        adapter_dir = seed_dir(cfg, seed) / "adapters" / strategy
        for split, eval_file, into, role in (("valid", adapter_dir / "eval_valid.json", valid_results, "chooses"),
                                             ("test", adapter_dir / "eval.json", results, "report only")):
            if not eval_is_current(eval_file, adapter_dir):
                metrics = evaluate(cfg.data.dir, seed_dir(cfg, seed) / "backbone", adapter_dir, ctx,
                                   cfg.evaluate.batch_size, split=split, sharding=cfg.distributed.sharding)
                # rank 0 writes; a failure (a full disk) is raised on every rank, not left to a collective's timeout
                on_main(ctx, functools.partial(atomic_write_json, eval_file, metrics))
                say_line(f"seed {seed}: `{strategy}` {split} split ({role}): CTR-AUC "
                         f"{format_metric(metrics['overall']['ctr_auc'])} CTCVR-AUC "
                         f"{format_metric(metrics['overall']['ctcvr_auc'])} LogLoss "
                         f"{format_metric(metrics['overall']['logloss'])}")  # None: n/a
            into[strategy][seed] = json.loads(eval_file.read_text())
        summary = json.loads((adapter_dir / "train_summary.json").read_text())
        runs = sum(1 for p in present if p[1] == strategy)
        costs[strategy]["seconds"] += summary.get("train/seconds", 0.0) / runs
        costs[strategy]["trainable_params"] = summary["finetune/trainable_params"]
    title = (f"{cfg.data.source} ({cfg.data.domain} domains)" if cfg.data.source == "movielens-100k"
             else f"{cfg.data.source} data")
    on_main(ctx, lambda: write_report(results, costs, run_dir, title,
                                      Schema.load(Path(cfg.data.dir) / "schema.yaml").domains, valid_results))
    say_line(f"report: {run_dir / 'report.md'} and {run_dir / 'report.png'}")
    return run_dir


class InProcessExecutor:
    """Phases in this process, one after another: alone, or as one rank of a torchrun / srun launch
    (every rank runs the driver loop in the same order; only rank 0 writes the manifest).

    Pass `ctx` to run several pipelines in one process (a sweep): the process group, and the
    DeepSpeed groups cached on it, must then outlive each pipeline.
    """

    name = "in-process"

    def __init__(self, cfg: PipelineConfig, show_progress: bool = True, ctx: DistContext | None = None) -> None:
        self.cfg = cfg
        self.show_progress = show_progress
        self.ctx = ctx
        self._own_ctx = ctx is None

    def __enter__(self) -> InProcessExecutor:
        if self.ctx is None:
            self.ctx = init_distributed()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._own_ctx and self.ctx is not None:
            close_distributed(self.ctx)

    @property
    def is_main(self) -> bool:
        return self.ctx is None or self.ctx.is_main

    def main_only(self, fn: Callable[[], T], share: bool = False) -> T | None:
        return on_main(self.ctx, fn, share)

    def start(self, lock: Any) -> None:
        """Nothing to start: the process group exists since `__enter__`."""

    def ready(self) -> None:
        """Always ready."""

    def submit(self, phase: PhaseSpec) -> futures.Future:
        """Run `phase` now; its result or error comes back as a finished future. An interruption
        (a BaseException such as the driver's `Interrupted`) propagates at once."""
        fut: futures.Future = futures.Future()
        try:
            fut.set_result(run_phase(self.cfg, phase, self.ctx, self.show_progress))
        except (KeyboardInterrupt, SystemExit, Interrupted):
            raise
        except BaseException as exc:  # noqa: BLE001  (the driver records it; DCP's CheckpointException is a BaseException)
            fut.set_exception(exc)
        return fut

    def stop(self) -> None:
        """Nothing to stop."""
