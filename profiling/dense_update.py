"""The dense update of a pre-train step: our DeepSpeed engine against DeepSpeed's defaults and plain loops.

    .venv/bin/python -m profiling.dense_update configs/movielens_age.yaml [--nproc 2] [--set key=value ...]

On the config's model, sharding plan and pre-train batches, the same forward and backward through
these dense updates, taking turns (`profiling/steps.interleaved`):

- `DenseEngine` as the phases build it (clipping with PyTorch's foreach kernel, fused AdamW,
  no all-reduce over one rank; on several ranks the gradient all-reduce overlapped with backward);
- on more than one rank, the same with that overlap off (`zero_optimization.overlap_comm: false`:
  DeepSpeed's one all-reduce after backward, how `DenseEngine` ran before);
- a DeepSpeed engine (ZeRO-0 unless `--set distributed.zero.stage=N`) with DeepSpeed's own handling:
  its clipping at the config's norm, unfused AdamW, its gradient all-reduce (how `DenseEngine` ran
  before docs/performance.md's fix);
- plain TorchRec DMP (DDP around the dense part) with `torch.optim.AdamW`'s defaults, no clipping;
- the same doing our update: fused AdamW and foreach clipping;
- on more than one rank, the same again with DDP replaced by one all-reduce of the dense
  gradients after backward, which is what DeepSpeed does at stage 0 (no overlap with backward).

Prints ms per step (forward + backward + update, rank 0) and the ratio to `DenseEngine`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

KINDS = ("DenseEngine (ours)", "DenseEngine, overlap off (all-reduce after backward)",
         "DeepSpeed with its own defaults",
         "DMP + DDP, AdamW defaults, no clipping",
         "DMP + DDP, our update (fused AdamW + foreach clipping)",
         "DMP, our update, one all-reduce after backward")


def main() -> None:
    import subprocess
    import sys

    import torch

    from iak_dist.config import load_config
    from iak_dist.data.parquet import ParquetReader
    from iak_dist.data.schema import Schema
    from iak_dist.data.source import Split
    from iak_dist.distributed.context import close_distributed, init_distributed, torchrun_command
    from iak_dist.distributed.zero import deepspeed_config
    from iak_dist.phases.pretrain import build_pretrain
    from iak_dist.phases.step import task_loss
    from iak_dist.runtime import configure_environment, exit_launched_rank, is_launched_rank
    from profiling.steps import TURN, clock, interleaved, overlap_off, plain_torchrec_stepper

    configure_environment()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=1, help="ranks on this machine (re-runs itself under torchrun)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args()
    if args.nproc > 1 and not is_launched_rank():
        sys.exit(subprocess.call(torchrun_command(args.nproc, "profiling.dense_update", [
            args.config, "--steps", str(args.steps), "--rounds", str(args.rounds),
            *(f"--set={kv}" for kv in args.set)])))
    cfg = load_config(args.config, args.set)
    ctx = init_distributed()
    schema = Schema.load(Path(cfg.data.dir) / "schema.yaml")
    bs = cfg.pretrain.batch_size
    reader = ParquetReader(Split.open(cfg.data.dir, "pretrain", schema), schema, bs, ctx.rank, ctx.world_size,
                           shuffle=True, drop_last=True, split_mode=cfg.distributed.data_split)
    batches = [b for b, _ in zip(reader.epoch(0), range(args.steps), strict=False)]

    def engine_stepper(kind: str):
        """Ours as the phases build it, or the same model under a DeepSpeed engine left to its defaults."""
        import deepspeed

        torch.manual_seed(0)
        distributed = overlap_off(cfg.distributed) if kind == KINDS[1] else cfg.distributed
        sharded, engine = build_pretrain(schema, cfg.model, cfg.pretrain, distributed, 0, ctx)
        if kind == KINDS[2]:
            modules = engine.container
            params = [p for p in modules.parameters() if p.requires_grad]
            engine, _, _, _ = deepspeed.initialize(
                model=modules, optimizer=torch.optim.AdamW(params, lr=cfg.pretrain.lr_dense), model_parameters=params,
                config=deepspeed_config(cfg.distributed.zero, bs, ctx.world_size), dist_init_required=False)

        def step(batch) -> dict[str, float]:
            start = clock(batch.dense.device)
            engine.backward(task_loss(sharded.model(batch), batch, None))  # pre-training's loss
            engine.step()
            return {"step": clock(batch.dense.device) - start}

        return step, sharded.plan

    steppers = {}
    for kind in KINDS[:3] if ctx.world_size > 1 else KINDS[0:3:2]:
        steppers[kind], plan = engine_stepper(kind)
    for kind in KINDS[3:] if ctx.world_size > 1 else KINDS[3:5]:
        steppers[kind] = plain_torchrec_stepper(cfg, schema, ctx, plan, ddp="DDP" in kind,
                                                our_update="our update" in kind)
    times = interleaved(steppers, batches, args.rounds, turn=TURN)
    if ctx.is_main:
        ours = times[KINDS[0]]["step"]
        print(f"| dense update, {ctx.world_size} rank(s) ({args.rounds} rounds of {args.steps} steps, batch {bs}) "
              "| ms per step | vs ours |")
        print("|---|---:|---:|")
        for kind, t in times.items():
            print(f"| {kind} | {1000 * t['step']:.2f} | {t['step'] / ours:.2f}x |")
    ctx.barrier()
    close_distributed(ctx)
    if is_launched_rank():
        exit_launched_rank(0)


if __name__ == "__main__":
    main()
