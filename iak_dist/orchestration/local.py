"""The whole pipeline in this process: prepare -> pre-train -> fine-tune every strategy -> evaluate -> report.

Each step writes its outputs atomically and is skipped when they already exist, so re-running a
run continues where it stopped. (The Ray-scheduled pipeline builds on the same phase functions.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from iak_dist.config import PipelineConfig, to_dict
from iak_dist.data.prepare import is_prepared, prepare
from iak_dist.data.schema import Schema
from iak_dist.distributed.context import DistContext, close_distributed, init_distributed
from iak_dist.errors import UserError
from iak_dist.io import atomic_write_json, atomic_write_text
from iak_dist.runtime import say


def log(message: str) -> None:
    """A pipeline progress line, time-stamped (rank 0 only)."""
    say(f"[pipeline {time.strftime('%H:%M:%S')}] {message}")


def seed_dir(cfg: PipelineConfig, seed: int) -> Path:
    return Path(cfg.run_dir) / f"seed{seed}"


def ensure_data(cfg: PipelineConfig) -> Path:
    data_dir = Path(cfg.data.dir)
    if is_prepared(data_dir) and cfg.data.source != "parquet":
        log(f"data: {data_dir} is prepared, reusing it")
    else:
        log(f"data: checking {data_dir}" if cfg.data.source == "parquet"
            else f"data: preparing {cfg.data.source} into {data_dir}")
        prepare(cfg.data)
    return data_dir


def train_all(cfg: PipelineConfig, ctx: DistContext, show_progress: bool = True) -> None:
    """Pre-train each seed's backbone and fine-tune every strategy on it (skipping finished work)."""
    from iak_dist.phases.finetune import finetune
    from iak_dist.phases.pretrain import pretrain

    for seed in cfg.seeds:
        backbone_dir = seed_dir(cfg, seed) / "backbone"
        if (backbone_dir / "backbone.json").is_file():
            log(f"seed {seed}: pre-trained backbone found, skipping pre-training")
        else:
            log(f"seed {seed}: pre-training on all domains pooled")
            pretrain(cfg.data.dir, cfg.model, cfg.pretrain, cfg.distributed, seed, seed_dir(cfg, seed), ctx,
                     show_progress)
        for strategy in cfg.finetune.strategies:
            adapter_dir = seed_dir(cfg, seed) / "adapters" / strategy
            if not (adapter_dir / "adapter_config.json").is_file():
                log(f"seed {seed}: fine-tuning every domain with `{strategy}`")
                finetune(cfg.data.dir, backbone_dir, strategy, cfg.finetune, seed, adapter_dir, ctx, show_progress,
                         cfg.distributed)


def evaluate_and_report(cfg: PipelineConfig, ctx: DistContext) -> Path:
    """Evaluate every fine-tuned (seed, strategy) on the test split and write the comparison report."""
    from iak_dist.metrics import format_metric
    from iak_dist.phases.evaluate import evaluate
    from iak_dist.report import write_report

    run_dir = Path(cfg.run_dir)
    results: dict = {s: {} for s in cfg.finetune.strategies}
    costs: dict = {s: {"seconds": 0.0, "trainable_params": 0.0} for s in cfg.finetune.strategies}
    for seed in cfg.seeds:
        for strategy in cfg.finetune.strategies:
            adapter_dir = seed_dir(cfg, seed) / "adapters" / strategy
            if not (adapter_dir / "adapter_config.json").is_file():
                raise UserError(f"{adapter_dir}: `{strategy}` (seed {seed}) is not fine-tuned yet; "
                                f"run `iak-dist finetune CONFIG --strategy {strategy} --seed {seed}` first")
            eval_file = adapter_dir / "eval.json"
            if not eval_file.is_file():
                metrics = evaluate(cfg.data.dir, seed_dir(cfg, seed) / "backbone", adapter_dir, ctx,
                                   cfg.evaluate.batch_size, sharding=cfg.distributed.sharding)
                if ctx.is_main:
                    atomic_write_json(eval_file, metrics)
                ctx.barrier()
                log(f"seed {seed}: `{strategy}` test CTR-AUC {format_metric(metrics['overall']['ctr_auc'])} "
                    f"CTCVR-AUC {format_metric(metrics['overall']['ctcvr_auc'])}")
            results[strategy][seed] = json.loads(eval_file.read_text())
            summary = json.loads((adapter_dir / "train_summary.json").read_text())
            costs[strategy]["seconds"] += summary.get("train/seconds", 0.0) / len(cfg.seeds)
            costs[strategy]["trainable_params"] = summary["finetune/trainable_params"]
    title = (f"{cfg.data.source} ({cfg.data.domain} domains)" if cfg.data.source == "movielens-100k"
             else f"{cfg.data.source} data")
    if ctx.is_main:
        write_report(results, costs, run_dir, title, Schema.load(Path(cfg.data.dir) / "schema.yaml").domains)
    log(f"report: {run_dir / 'report.md'} and {run_dir / 'report.png'}")
    return run_dir


def run_pipeline(cfg: PipelineConfig, show_progress: bool = True, ctx: DistContext | None = None) -> Path:
    """The whole pipeline; alone or under torchrun / SLURM (rank 0 prepares data and writes reports).

    Pass `ctx` to run several pipelines in one process (a sweep): the process group, and the
    DeepSpeed groups cached on it, must then outlive each pipeline.
    """
    run_dir = Path(cfg.run_dir)
    own_ctx = ctx is None
    ctx = ctx or init_distributed()
    try:
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
            ensure_data(cfg)
        ctx.barrier()
        train_all(cfg, ctx, show_progress)
        return evaluate_and_report(cfg, ctx)
    finally:
        if own_ctx:
            close_distributed(ctx)
