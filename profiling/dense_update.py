"""The dense update of a pre-train step: our DeepSpeed engine against DeepSpeed's defaults and plain loops.

    .venv/bin/python -m profiling.dense_update configs/movielens_age.yaml [--nproc 2]

On the config's model, sharding plan and pre-train batches, the same forward and backward through
these dense updates, taking turns (`profiling/steps.interleaved`):

- `DenseEngine` as the phases build it (clipping with PyTorch's foreach kernel, fused AdamW,
  no all-reduce over one rank);
- a DeepSpeed ZeRO-0 engine with DeepSpeed's own handling: its clipping at the config's norm,
  unfused AdamW, its gradient all-reduce (how `DenseEngine` ran before docs/performance.md's fix);
- plain TorchRec DMP (DDP around the dense part) with `torch.optim.AdamW`'s defaults, no clipping;
- the same doing our update: fused AdamW and foreach clipping;
- on more than one rank, the same again with DDP replaced by one all-reduce of the dense
  gradients after backward, which is what DeepSpeed does at stage 0 (no overlap with backward).

Prints ms per step (forward + backward + update, rank 0) and the ratio to `DenseEngine`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

KINDS = ("DenseEngine (ours)", "DeepSpeed ZeRO-0 defaults", "DMP + DDP, AdamW defaults, no clipping",
         "DMP + DDP, our update (fused AdamW + foreach clipping)",
         "DMP, our update, one all-reduce after backward")


def main() -> None:
    import os
    import subprocess
    import sys

    import torch
    import torch.distributed as dist

    from iak_dist.config import load_config
    from iak_dist.data.parquet import ParquetReader
    from iak_dist.data.schema import Schema
    from iak_dist.distributed.context import close_distributed, exit_launched_rank, init_distributed, is_launched_rank
    from iak_dist.distributed.sharding import EBC_PATH, init_tables, shard_ranker
    from iak_dist.distributed.zero import DenseEngine, deepspeed_config
    from iak_dist.model.backbone import Backbone
    from iak_dist.model.ranker import Ranker
    from iak_dist.phases.loop import esmm_loss_per_row
    from iak_dist.runtime import configure_environment
    from profiling.steps import clip_and_step, interleaved

    configure_environment()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=1, help="ranks on this machine (re-runs itself under torchrun)")
    args = parser.parse_args()
    if args.nproc > 1 and "RANK" not in os.environ:
        sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc-per-node={args.nproc}", "-m", "profiling.dense_update", args.config,
                                  "--steps", str(args.steps), "--rounds", str(args.rounds)]))
    cfg = load_config(args.config)
    ctx = init_distributed()
    schema = Schema.load(Path(cfg.data.dir) / "schema.yaml")
    bs, zero, lr = cfg.pretrain.batch_size, cfg.distributed.zero, cfg.pretrain.lr_dense
    reader = ParquetReader(Path(cfg.data.dir) / "pretrain.parquet", schema, bs, ctx.rank, ctx.world_size,
                           shuffle=True, drop_last=True, split=cfg.distributed.data_split)
    batches = [b for b, _ in zip(reader.epoch(0), range(args.steps), strict=False)]

    def ours_or_deepspeed(kind: str):
        import deepspeed

        torch.manual_seed(0)
        backbone = Backbone(schema, cfg.model, device=torch.device("meta"))
        sharded = shard_ranker(Ranker(backbone), ctx, cfg.distributed.sharding, cfg.pretrain.lr_sparse, bs)
        init_tables(sharded.model, sharded.ranker, 0)
        if kind == KINDS[0]:
            engine = DenseEngine(backbone.dense_modules(), lr, 0.0, zero, bs, ctx.world_size)
        else:
            params = backbone.dense_parameters()
            engine, _, _, _ = deepspeed.initialize(
                model=torch.nn.ModuleDict(backbone.dense_modules()), optimizer=torch.optim.AdamW(params, lr=lr),
                model_parameters=params, config=deepspeed_config(zero, bs, ctx.world_size), dist_init_required=False)

        def step(batch) -> dict[str, float]:
            start = time.perf_counter()
            engine.backward(esmm_loss_per_row(sharded.model(batch), batch).mean())
            engine.step()
            return {"step": time.perf_counter() - start}

        return step, sharded.plan

    def plain(kind: str, plan):
        from torchrec.distributed import DistributedModelParallel
        from torchrec.distributed.types import ShardingPlan
        from torchrec.optim import RowWiseAdagrad
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

        torch.manual_seed(0)
        backbone = Backbone(schema, cfg.model, device=torch.device("meta"))
        apply_optimizer_in_backward(RowWiseAdagrad, backbone.embeddings.parameters(), {"lr": cfg.pretrain.lr_sparse})
        ddp = "DDP" in kind
        model = DistributedModelParallel(backbone, device=ctx.device, init_data_parallel=ddp,
                                         plan=ShardingPlan({"embeddings": plan.plan[EBC_PATH]}))
        params = backbone.dense_parameters()
        ours = "our update" in kind
        opt = torch.optim.AdamW(params, lr=lr, fused=True if ours else None)

        def step(batch) -> dict[str, float]:
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            esmm_loss_per_row(model(batch.sparse, batch.dense), batch).mean().backward()
            if not ddp and ctx.world_size > 1:  # DeepSpeed stage 0's way: average after backward
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                dist.all_reduce(flat)
                flat /= ctx.world_size
                for p, g in zip(params, torch.split(flat, [p.numel() for p in params]), strict=True):
                    p.grad.copy_(g.view_as(p))
            if ours:
                clip_and_step(params, opt, zero)
            else:
                opt.step()
            return {"step": time.perf_counter() - start}

        return step

    steppers = {}
    for kind in KINDS[:2]:
        steppers[kind], plan = ours_or_deepspeed(kind)
    for kind in KINDS[2:] if ctx.world_size > 1 else KINDS[2:4]:
        steppers[kind] = plain(kind, plan)
    times = interleaved(steppers, batches, args.rounds)
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
