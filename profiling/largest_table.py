"""Trains the largest embedding table that fits this machine, next to a small one, in one run.

    .venv/bin/python profiling/largest_table.py --rows 100000000 --dim 32 --steps 200

Builds a one-table backbone through the same code as pre-training (TorchRec DMP, fused row-wise
Adagrad, DeepSpeed over the dense part), feeds it Zipf-distributed IDs, and prints rows, bytes
(weights + optimizer state, measured as the process's resident memory growth) and samples/s, with
the same measurement on a 100k-row table as the baseline (ratio printed: machines here are shared
and noisy, absolute times only mean something side by side).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def measure(rows: int, dim: int, steps: int, batch: int, ctx) -> dict[str, float]:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from iak_dist.config import ModelConfig, ShardingConfig, TablePlan, ZeroConfig
    from iak_dist.data.batch import Batch
    from iak_dist.data.schema import Schema, SparseFeature
    from iak_dist.distributed.sharding import init_tables, shard_ranker
    from iak_dist.distributed.zero import DenseEngine
    from iak_dist.model.backbone import Backbone
    from iak_dist.model.ranker import Ranker

    schema = Schema(sparse=[SparseFeature("id", rows)], domains=["all"], dense=[])
    before = rss_gib()
    backbone = Backbone(schema, ModelConfig(embedding_dim=dim, tower=[64, 32]), device=torch.device("meta"))
    sharding = ShardingConfig(plan={"id": TablePlan("table_wise", "fused")})
    sharded = shard_ranker(Ranker(backbone), ctx, sharding, lr_sparse=0.05, batch_size=batch)
    init_tables(sharded.model, sharded.ranker, seed=0)
    dense = DenseEngine(backbone.dense_modules(), 1e-3, 0.0, ZeroConfig(), batch, 1)
    allocated = rss_gib() - before
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, 1_000_001) ** 1.05
    ranks = rng.choice(len(weights), size=(steps + 5) * batch, p=weights / weights.sum())
    ids = torch.from_numpy((ranks * 2_654_435_761) % rows)  # spread hot ranks over the table
    dense_x = torch.zeros(batch, 1)
    domain = torch.zeros(batch, dtype=torch.long)
    labels = torch.from_numpy(rng.integers(0, 2, batch).astype(np.float32))

    def step(i: int) -> None:
        kjt = KeyedJaggedTensor(keys=["id"], values=ids[i * batch:(i + 1) * batch],
                                lengths=torch.ones(batch, dtype=torch.int32))
        out = sharded.model(Batch(kjt, dense_x, labels, labels, domain, domain))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.ctr_logit, labels)
        dense.backward(loss)
        dense.step()

    for i in range(5):  # warm-up
        step(i)
    start = time.perf_counter()
    for i in range(5, steps + 5):
        step(i)
    seconds = time.perf_counter() - start
    return {"rows": rows, "dim": dim, "weight_gib": rows * dim * 4 / 2**30, "rss_growth_gib": allocated,
            "samples_per_s": steps * batch / seconds}


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
