"""Trains the largest embedding table that fits this machine, next to a small one, in one run.

    .venv/bin/python profiling/largest_table.py --rows 100000000 --dim 32 --steps 200

Builds a one-table backbone through the same code as pre-training (TorchRec DMP, fused row-wise
Adagrad, DeepSpeed over the dense part; `profiling/scaling.build_model`), feeds it Zipf-distributed
IDs, and prints rows, bytes
(weights + optimizer state, measured as the process's resident memory growth) and samples/s, with
the same measurement on a 100k-row table as the baseline (ratio printed: machines here are shared
and noisy, absolute times only mean something side by side).
"""

from __future__ import annotations

import argparse
import resource

import numpy as np


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def measure(rows: int, dim: int, steps: int, batch: int, ctx) -> dict[str, float]:
    from profiling.scaling import build_model, stepper, synthetic_batch
    from profiling.steps import interleaved

    before = rss_gib()
    sharded, dense = build_model((rows,), dim, 1, "none", batch, ctx)
    allocated = rss_gib() - before
    rng = np.random.default_rng(0)
    batches = [synthetic_batch(batch, (rows,), 1, rng) for _ in range(steps)]
    step_s = interleaved({"one": stepper(sharded, dense)}, batches, rounds=1)["one"]["step"]
    return {"rows": rows, "dim": dim, "weight_gib": rows * dim * 4 / 2**30, "rss_growth_gib": allocated,
            "samples_per_s": batch / step_s}


def main() -> None:
    from iak_dist.distributed.context import init_distributed
    from iak_dist.runtime import configure_environment

    configure_environment()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=2048)
    args = parser.parse_args()
    ctx = init_distributed()
    measure(100_000, args.dim, 20, args.batch, ctx)  # one-time start-up costs, discarded
    base = measure(100_000, args.dim, args.steps, args.batch, ctx)
    big = measure(args.rows, args.dim, args.steps, args.batch, ctx)
    print("| table rows | dim | weights GiB | RSS growth GiB | samples/s | vs 100k rows |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in (base, big):
        print(f"| {r['rows']:,} | {r['dim']} | {r['weight_gib']:.2f} | {r['rss_growth_gib']:.2f} | "
              f"{r['samples_per_s']:,.0f} | {r['samples_per_s'] / base['samples_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
