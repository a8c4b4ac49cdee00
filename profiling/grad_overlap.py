"""How much of the dense gradient all-reduce is left after backward, with and without the overlap.

    .venv/bin/python -m profiling.grad_overlap configs/movielens_age.yaml --nproc 2

End-to-end throughput on a shared 2-core machine moves by 10-20 % between runs, more than this
change can move it; the time a step waits for the dense gradients after backward is the direct
measure. On the config's model, plan and pre-train batches, two `DenseEngine`s take turns
(`profiling/steps.interleaved`): ours (stage 0: buckets all-reduced from gradient hooks during
backward, `OverlappedGradReduce`) and the same with `zero_optimization.overlap_comm: false`
(DeepSpeed's one all-reduce after backward). Each step is timed by part: forward, backward (the
sparse all-to-all and fused update included; with the overlap, the buckets leave during it), the
all-reduce left after backward (the wait for the buckets, or DeepSpeed's whole all-reduce), the
dense optimizer. The plain TorchRec DMP loop (`profiling.steps.plain_torchrec_model`: DDP around the
dense part, our update) takes its turn too, timed by the same parts: its DDP waits for its all-reduce
inside backward, so it leaves nothing after. Prints the medians (rank 0).
"""

from __future__ import annotations

import argparse
from pathlib import Path

PARTS = ("forward", "backward", "dense all-reduce left after backward", "dense optimizer")


def main() -> None:
    import subprocess
    import sys

    import torch

    from iak_dist.config import load_config
    from iak_dist.data.parquet import ParquetReader
    from iak_dist.data.schema import Schema
    from iak_dist.data.source import Split
    from iak_dist.distributed.context import close_distributed, init_distributed, torchrun_command
    from iak_dist.phases.pretrain import build_pretrain
    from iak_dist.phases.step import esmm_loss_per_row, task_loss
    from iak_dist.runtime import configure_environment, exit_launched_rank, is_launched_rank
    from profiling.steps import TURN, clip_and_step, clock, interleaved, overlap_off, plain_torchrec_model

    configure_environment()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=2, help="ranks on this machine (re-runs itself under torchrun)")
    args = parser.parse_args()
    if args.nproc > 1 and not is_launched_rank():
        sys.exit(subprocess.call(torchrun_command(args.nproc, "profiling.grad_overlap", [
            args.config, "--steps", str(args.steps), "--rounds", str(args.rounds)])))
    cfg = load_config(args.config)
    ctx = init_distributed()
    schema = Schema.load(Path(cfg.data.dir) / "schema.yaml")
    bs = cfg.pretrain.batch_size
    reader = ParquetReader(Split.open(cfg.data.dir, "pretrain", schema), schema, bs, ctx.rank, ctx.world_size,
                           shuffle=True, drop_last=True, split_mode=cfg.distributed.data_split)
    batches = [b.to(ctx.device) for b, _ in zip(reader.epoch(0), range(args.steps), strict=False)]

    def stepper(overlap: bool):
        torch.manual_seed(0)
        distributed = cfg.distributed if overlap else overlap_off(cfg.distributed)
        sharded, dense = build_pretrain(schema, cfg.model, cfg.pretrain, distributed, 0, ctx)
        engine = dense.engine
        if ctx.world_size > 1 and overlap != (dense.overlap is not None):
            raise SystemExit(f"the engine's overlap is {dense.overlap is not None}, expected {overlap}: "
                             "it only runs at ZeRO stage 0 on several ranks")
        reduce_after = engine.enable_backward_allreduce
        engine.enable_backward_allreduce = False  # DeepSpeed's all-reduce, if any, is timed on its own below

        def step(batch) -> dict[str, float]:
            t0 = clock(batch.dense.device)
            loss = task_loss(sharded.model(batch), batch, None)
            t1 = clock(batch.dense.device)
            if dense.overlap is not None:
                dense.overlap.start()
            engine.backward(loss)
            t2 = clock(batch.dense.device)
            if dense.overlap is not None:
                dense.overlap.finish()  # sync point: the buckets started during backward
            elif reduce_after:
                engine.allreduce_gradients()  # what DeepSpeed's backward ends with
            t3 = clock(batch.dense.device)
            dense.step()
            t4 = clock(batch.dense.device)
            return dict(zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True))

        return step, sharded.plan

    def plain_stepper(plan):
        """The plain TorchRec DMP loop with DDP and our update, timed by the same parts."""
        model = plain_torchrec_model(cfg, schema, ctx, plan)
        params = model.module.dense_parameters()
        opt = torch.optim.AdamW(params, lr=cfg.pretrain.lr_dense, fused=cfg.distributed.zero.fused_optimizer or None)

        def step(batch) -> dict[str, float]:
            t0 = clock(batch.dense.device)
            loss = esmm_loss_per_row(model(batch.sparse, batch.dense), batch).mean()
            t1 = clock(batch.dense.device)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # sync point: DDP waits for its all-reduces at backward's end
            t2 = clock(batch.dense.device)
            clip_and_step(params, opt, cfg.distributed.zero)
            t3 = clock(batch.dense.device)
            return dict(zip(PARTS, (t1 - t0, t2 - t1, 0.0, t3 - t2), strict=True))

        return step

    steppers = {}
    for name, on in {"overlap on (now)": True, "overlap off (before)": False}.items():
        steppers[name], plan = stepper(on)
    steppers["plain TorchRec DMP + DDP"] = plain_stepper(plan)
    names = list(steppers)
    times = interleaved(steppers, batches, args.rounds, turn=TURN)
    if ctx.is_main:
        print(f"| part, {ctx.world_size} rank(s) ({args.rounds} rounds of {args.steps} steps, batch {bs}), ms | "
              + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for part in (*PARTS, "step"):
            row = [sum(t.values()) if part == "step" else t[part] for t in times.values()]
            print(f"| {part} | " + " | ".join(f"{1000 * v:.2f}" for v in row) + " |")
    ctx.barrier()
    close_distributed(ctx)
    if is_launched_rank():
        exit_launched_rank(0)


if __name__ == "__main__":
    main()
