"""Scaling curves measured in one run: pre-train throughput vs batch size, IAK fine-tune step vs K domains.

    .venv/bin/python profiling/scaling.py

Random Zipf IDs over three tables (1M, 100k, 1k rows, dim 16), tower [128, 64], one rank. The IAK
curve keeps the batch fixed and grows the number of stacked domain kernels K: with per-row domain
activation the step should stay nearly flat in K. Ratios are against the first point of each curve.
"""

from __future__ import annotations

import time

import numpy as np
import torch


def _batch(n: int, domains: int, rng: np.random.Generator):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from iak_dist.data.batch import Batch

    sizes = (1_000_000, 100_000, 1_000)
    values = [torch.from_numpy(rng.zipf(1.1, n) % s) for s in sizes]
    kjt = KeyedJaggedTensor(keys=["a", "b", "c"], values=torch.cat(values),
                            lengths=torch.ones(3 * n, dtype=torch.int32))
    labels = torch.from_numpy(rng.integers(0, 2, n).astype(np.float32))
    domain = torch.from_numpy(rng.integers(0, domains, n))
    return Batch(kjt, torch.zeros(n, 1), labels, labels * 0, domain, domain)


def _setup(domains: int, strategy: str, batch: int, ctx):
    from iak_dist.config import FinetuneConfig, ModelConfig, ShardingConfig, ZeroConfig
    from iak_dist.data.schema import Schema, SparseFeature
    from iak_dist.distributed.sharding import init_tables, shard_ranker
    from iak_dist.distributed.zero import DenseEngine
    from iak_dist.model.backbone import Backbone
    from iak_dist.model.ranker import Ranker
    from iak_dist.model.strategies import build_adapter

    schema = Schema(sparse=[SparseFeature("a", 1_000_000), SparseFeature("b", 100_000), SparseFeature("c", 1_000)],
                    domains=[f"d{i}" for i in range(domains)], dense=[])
    backbone = Backbone(schema, ModelConfig(), device=torch.device("meta"))
    adapter = build_adapter(strategy, domains, backbone.tower_widths, FinetuneConfig()) if strategy != "none" else None
    pretraining = adapter is None
    sharded = shard_ranker(Ranker(backbone, adapter, freeze_embeddings=not pretraining), ctx, ShardingConfig(),
                           0.05 if pretraining else None, batch)
    init_tables(sharded.model, sharded.ranker, 0)
    modules = backbone.dense_modules() if pretraining else {"adapter": adapter}
    if not pretraining:
        for p in backbone.dense_parameters():
            p.requires_grad_(False)
    return sharded.model, DenseEngine(modules, 1e-3, 0.0, ZeroConfig(), batch, 1)


def _step_time(model, dense, batches) -> float:
    from iak_dist.phases.loop import esmm_loss_per_row

    model.train()
    times = []
    for i, b in enumerate(batches):
        start = time.perf_counter()
        out = model(b)
        loss = esmm_loss_per_row(out, b).mean() + out.aux_loss
        dense.backward(loss)
        dense.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    from iak_dist.distributed.context import init_distributed
    from iak_dist.runtime import configure_environment

    configure_environment()
    ctx = init_distributed()
    rng = np.random.default_rng(0)
    print("| pre-train batch size | samples/s | vs batch 256 |\n|---:|---:|---:|")
    base = None
    for batch in (256, 512, 1024, 2048, 4096):
        model, dense = _setup(1, "none", batch, ctx)
        t = _step_time(model, dense, [_batch(batch, 1, rng) for _ in range(23)])
        base = base or batch / t
        print(f"| {batch} | {batch / t:,.0f} | {batch / t / base:.2f}x |")
    print("\n| IAK domains K | ms per fine-tune step (batch 1024) | vs K = 2 |\n|---:|---:|---:|")
    base = None
    for k in (2, 8, 32, 128):
        model, dense = _setup(k, "iak", 1024, ctx)
        t = _step_time(model, dense, [_batch(1024, k, rng) for _ in range(23)])
        base = base or t
        print(f"| {k} | {1000 * t:.2f} | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
