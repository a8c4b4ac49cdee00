"""Cost of one fine-tune step of every strategy, as a ratio to `full`, measured side by side.

    .venv/bin/python profiling/finetune_cost.py --backbone runs/movielens-100k-age/seed0/backbone \
        --data data/movielens-100k-age

Each strategy's model is built once; then rounds of `--steps` steps run strategy after strategy
(interleaved, so load on a shared machine hits all alike), and the median round time is kept.
Also reported: the pre-train step of the same backbone (embeddings training), as the reference a
frozen-backbone fine-tune step should stay far below.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

STRATEGIES = ["full", "head", "lora", "patch", "iak"]


def main() -> None:
    from iak_dist.config import FinetuneConfig, ZeroConfig
    from iak_dist.data.sampler import DomainBatchSampler
    from iak_dist.distributed.context import init_distributed
    from iak_dist.distributed.zero import DenseEngine
    from iak_dist.phases.finetune import build_finetune, sampled_batches
    from iak_dist.phases.loop import esmm_loss_per_row
    from iak_dist.runtime import configure_environment

    configure_environment()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args()
    ctx = init_distributed()
    cfg = FinetuneConfig()
    runs = {}
    for name in STRATEGIES:
        torch.manual_seed(0)
        run = build_finetune(args.data, args.backbone, name, cfg, ctx)
        dense = DenseEngine(run.trainable, 1e-3, 0.0, ZeroConfig(), args.batch, 1)
        sampler = DomainBatchSampler(run.domains, len(run.schema.domains), args.batch, 0.5, seed=0)
        batches = [next(sampled_batches(run.table, run.schema, sampler)) for _ in range(args.steps)]
        runs[name] = (run, dense, batches)

    def one_round(name: str) -> float:
        run, dense, batches = runs[name]
        run.model.train()
        start = time.perf_counter()
        for i, batch in enumerate(batches):
            run.adapter.on_step(i, len(batches))
            out = run.model(batch)
            loss = esmm_loss_per_row(out, batch).mean() + out.aux_loss
            dense.backward(loss)
            dense.step()
        return (time.perf_counter() - start) / len(batches)

    for name in STRATEGIES:  # warm-up
        one_round(name)
    times = {name: [] for name in STRATEGIES}
    for _ in range(args.rounds):
        for name in STRATEGIES:
            times[name].append(one_round(name))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"| strategy | ms per step (median of {args.rounds} rounds, batch {args.batch}) | vs `full` |")
    print("|---|---:|---:|")
    for name in STRATEGIES:
        print(f"| {name} | {1000 * med[name]:.2f} | {med[name] / med['full']:.2f}x |")


if __name__ == "__main__":
    main()
