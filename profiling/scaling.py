"""Scaling curves measured in one run: throughput against batch size, table size, IAK domains K, ranks.

    .venv/bin/python -m profiling.scaling [--curves batch,tables,domains,ranks] [--max-rows 100000000]

Synthetic model and data, built through the phases' own code (TorchRec DMP with fused row-wise
Adagrad, DeepSpeed over the dense part): tables of `--dim` columns fed Zipf(1.1)-distributed IDs,
tower [128, 64]. The points of a curve are built side by side and take turns over their batches
(`profiling/steps.interleaved`); each curve's ratios are against its own first point.

- batch: pre-train samples/s at batch 256 ... 4096 (three tables of 1M, 100k, 1k rows);
- tables: one table of 1e5 ... `--max-rows` rows (batch 2048): pre-train samples/s, and a full
  fine-tune step against an IAK fine-tune step on the same table (IAK looks the table up under
  no_grad: no sparse backward, no optimizer state touched);
- domains: an IAK fine-tune step (batch 1024) as the number of stacked domain kernels K grows;
- ranks: pre-train samples/s per rank and in total on 1 and 2 ranks (torchrun, gloo on CPU,
  NCCL on GPUs), each rank with its own batch of 1024 (weak scaling).

Says on stderr what each curve measures before it starts and prints each point as soon as it is
measured; writes `--out/scaling.json` and `scaling.png`, and prints Markdown tables at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

THREE_TABLES = (1_000_000, 100_000, 1_000)


def synthetic_batch(n: int, table_rows: tuple[int, ...], domains: int, rng: np.random.Generator):
    """One batch: a Zipf(1.1) ID per table per row (hot IDs spread over the table), random labels."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from iak_dist.data.batch import Batch

    values = [torch.from_numpy((rng.zipf(1.1, n) * 2_654_435_761) % rows) for rows in table_rows]
    kjt = KeyedJaggedTensor(keys=[f"t{i}" for i in range(len(table_rows))], values=torch.cat(values),
                            lengths=torch.ones(len(table_rows) * n, dtype=torch.int32))
    labels = torch.from_numpy(rng.integers(0, 2, n).astype(np.float32))
    domain = torch.from_numpy(rng.integers(0, domains, n))
    return Batch(kjt, torch.zeros(n, 1), labels, labels * 0, domain, domain)


def build_model(table_rows: tuple[int, ...], dim: int, domains: int, strategy: str, batch: int, ctx,
                table_dtype: str = "fp32"):
    """(sharded ranker, dense engine) of a pre-train (`strategy="none"`) or fine-tune step.

    The fine-tune model is built the way `phases/finetune.py` builds one: `full` trains tables and
    tower, a frozen-backbone strategy trains only its adapter and looks the tables up under no_grad.
    `table_dtype` is `model.table_dtype` (fp32 or fp16 table storage).
    """
    from iak_dist.config import FinetuneConfig, ModelConfig, ShardingConfig, ZeroConfig
    from iak_dist.data.schema import Schema, SparseFeature
    from iak_dist.distributed.sharding import init_tables, shard_ranker
    from iak_dist.distributed.zero import DenseEngine
    from iak_dist.model.backbone import Backbone
    from iak_dist.model.ranker import Ranker
    from iak_dist.model.strategies import build_adapter

    schema = Schema(sparse=[SparseFeature(f"t{i}", rows) for i, rows in enumerate(table_rows)],
                    domains=[f"d{i}" for i in range(domains)], dense=[])
    backbone = Backbone(schema, ModelConfig(embedding_dim=dim, table_dtype=table_dtype), device=torch.device("meta"))
    adapter = build_adapter(strategy, domains, backbone.tower_widths, FinetuneConfig()) if strategy != "none" else None
    train_all = adapter is None or adapter.trains_backbone == "all"
    sharded = shard_ranker(Ranker(backbone, adapter, freeze_embeddings=not train_all), ctx, ShardingConfig(),
                           0.05 if train_all else None, batch)
    init_tables(sharded.model, sharded.ranker, 0)
    modules = dict(backbone.dense_modules()) if train_all else {}
    for p in backbone.dense_parameters():
        p.requires_grad_(train_all)
    if adapter is not None and any(True for _ in adapter.parameters()):
        modules["adapter"] = adapter
    return sharded, DenseEngine(modules, 1e-3, 0.0, ZeroConfig(), batch, ctx.world_size)


def stepper(sharded, dense):
    """One training step of a synthetic model, timed whole (a `profiling.steps.Stepper`)."""
    from iak_dist.phases.step import train_step
    from profiling.steps import clock

    sharded.model.train()
    adapter = sharded.ranker.adapter
    num_domains = adapter.num_domains if adapter is not None else None  # fine-tuning: per-domain means

    def step(b) -> dict[str, float]:
        start = clock(b.dense.device)
        train_step(sharded.model, dense, b, num_domains, sharded.data_parallel_optimizer)
        return {"step": clock(b.dense.device) - start}

    return step


def measure(configs: dict[str, tuple[tuple[int, ...], int, str, int]], dim: int, ctx, steps: int = 20,
            rounds: int = 3, seed: int = 0) -> dict[str, float]:
    """Median seconds per step of synthetic configurations `{name: (table rows, domains K, strategy,
    batch)}` (strategy `"none"`: pre-training), built side by side and taking turns
    (`steps.interleaved`), so that their ratios do not depend on the machine's load drifting."""
    from profiling.steps import interleaved

    gc.collect()  # the previous configurations' tables go before these are allocated
    steppers, batches = {}, {}
    for name, (table_rows, domains, strategy, batch) in configs.items():
        steppers[name] = stepper(*build_model(table_rows, dim, domains, strategy, batch, ctx))
        rng = np.random.default_rng(seed)
        batches[name] = [synthetic_batch(batch, table_rows, domains, rng) for _ in range(steps)]
    return {name: t["step"] for name, t in interleaved(steppers, batches, rounds).items()}


# Each curve yields its points as they are measured (the points of one `measure` call come together).
BATCH_SIZES = (256, 512, 1024, 2048, 4096)
DOMAIN_COUNTS = (2, 8, 32, 128, 512)
RANK_COUNTS = (1, 2)


def table_sizes(max_rows: int) -> list[int]:
    return [10**e for e in range(5, 10) if 10**e <= max_rows]


def batch_curve(ctx, dim: int) -> Iterator[dict[str, Any]]:
    steps = measure({str(b): (THREE_TABLES, 1, "none", b) for b in BATCH_SIZES}, dim, ctx)
    for b in BATCH_SIZES:
        yield {"batch": b, "samples_per_s": b / steps[str(b)]}


def table_curve(ctx, dim: int, max_rows: int) -> Iterator[dict[str, Any]]:
    sizes = table_sizes(max_rows)
    # pre-training: every size at once, taking turns; then full against IAK, size by size
    pretrain = measure({str(rows): ((rows,), 8, "none", 2048) for rows in sizes}, dim, ctx)
    for rows in sizes:
        finetune = measure({"full": ((rows,), 8, "full", 2048), "iak": ((rows,), 8, "iak", 2048)}, dim, ctx)
        yield {"rows": rows, "table_gib": rows * dim * 4 / 2**30, "samples_per_s": 2048 / pretrain[str(rows)],
               "full_step_s": finetune["full"], "iak_step_s": finetune["iak"]}


def domain_curve(ctx, dim: int) -> Iterator[dict[str, Any]]:
    steps = measure({str(k): (THREE_TABLES, k, "iak", 1024) for k in DOMAIN_COUNTS}, dim, ctx)
    for k in DOMAIN_COUNTS:
        yield {"domains": k, "iak_step_s": steps[str(k)]}


def rank_curve(dim: int) -> Iterator[dict[str, Any]]:
    """1 and 2 ranks, each a fresh torchrun job running `--ranks-worker`."""
    from iak_dist.distributed.context import torchrun_command

    for n in RANK_COUNTS:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "ranks.json"
            subprocess.run(torchrun_command(n, "profiling.scaling", ["--ranks-worker", str(result), "--dim", str(dim)]),
                           check=True, env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // n))})
            yield json.loads(result.read_text())


def announce(curve: str, dim: int, max_rows: int) -> str:
    """What `curve` measures, said before it starts (a curve takes from seconds to minutes)."""
    sizes = ", ".join(f"{r:,}" for r in table_sizes(max_rows))
    return {
        "ranks": f"ranks: pre-train samples/s on {' then '.join(map(str, RANK_COUNTS))} rank(s) "
                 "(torchrun, batch 1024 per rank)",
        "batch": f"batch: pre-train samples/s at batch {', '.join(map(str, BATCH_SIZES))} (taking turns)",
        "domains": f"domains: IAK fine-tune step (batch 1024) with K = {', '.join(map(str, DOMAIN_COUNTS))} "
                   "domains (taking turns)",
        "tables": f"tables: pre-train samples/s with one table of {sizes} rows, then a full against an IAK "
                  "fine-tune step, size by size (batch 2048)",
    }[curve] + f", dim {dim}..."


def point_line(curve: str, p: dict[str, Any]) -> str:
    """One measured point, for the progress output."""
    if curve == "batch":
        return f"batch {p['batch']}: {p['samples_per_s']:,.0f} samples/s"
    if curve == "tables":
        return (f"{p['rows']:,} rows ({p['table_gib']:.2f} GiB): pre-train {p['samples_per_s']:,.0f} samples/s; "
                f"fine-tune step full {1000 * p['full_step_s']:.2f} ms, IAK {1000 * p['iak_step_s']:.2f} ms")
    if curve == "domains":
        return f"K = {p['domains']}: IAK fine-tune step {1000 * p['iak_step_s']:.2f} ms"
    per_rank = ", ".join(f"{s:,.0f}" for s in p["per_rank_samples_per_s"])
    return f"{p['ranks']} rank(s): {p['total_samples_per_s']:,.0f} samples/s in total ({per_rank} per rank)"


def collect(curve: str, points: Iterator[dict[str, Any]], dim: int, max_rows: int) -> list[dict[str, Any]]:
    """The points of `curve`, each printed (stderr, flushed) as soon as it is measured."""
    from iak_dist.runtime import say

    say(f"[scaling] {announce(curve, dim, max_rows)}")
    out = []
    for point in points:
        say(f"[scaling]   {point_line(curve, point)}")
        out.append(point)
    return out


def ranks_worker(out: Path, dim: int) -> None:
    import torch.distributed as dist

    from iak_dist.distributed.context import close_distributed, init_distributed
    from iak_dist.runtime import exit_launched_rank

    ctx = init_distributed()
    step = measure({"x": (THREE_TABLES, 1, "none", 1024)}, dim, ctx, seed=ctx.rank)["x"]
    steps = [None] * ctx.world_size
    dist.all_gather_object(steps, step)
    if ctx.is_main:
        out.write_text(json.dumps({"ranks": ctx.world_size, "per_rank_samples_per_s": [1024 / s for s in steps],
                                   "total_samples_per_s": ctx.world_size * 1024 / max(steps)}))
    ctx.barrier()
    close_distributed(ctx)
    exit_launched_rank(0)


def _table(header: str, rows: list[str]) -> list[str]:
    """A Markdown table: `header` cells separated by ` | `, the first left-aligned, the rest right."""
    n = header.count("|") + 1
    return [f"| {header} |", "|---|" + "---:|" * (n - 1), *rows, ""]


def markdown(result: dict[str, Any]) -> str:
    def vs(p: dict, c: list[dict], key: str) -> str:
        return f"{p[key] / c[0][key]:.2f}x"

    lines: list[str] = []
    if "batch" in result:
        c = result["batch"]
        lines += _table("pre-train batch | samples/s | vs first",
                        [f"| {p['batch']} | {p['samples_per_s']:,.0f} | {vs(p, c, 'samples_per_s')} |" for p in c])
    if "tables" in result:
        c = result["tables"]
        lines += _table("table rows | GiB (weights) | pre-train samples/s | vs first | full fine-tune ms "
                        "| IAK fine-tune ms | IAK vs full",
                        [f"| {p['rows']:,} | {p['table_gib']:.2f} | {p['samples_per_s']:,.0f} | "
                         f"{vs(p, c, 'samples_per_s')} | {1000 * p['full_step_s']:.2f} | "
                         f"{1000 * p['iak_step_s']:.2f} | {p['iak_step_s'] / p['full_step_s']:.2f}x |" for p in c])
    if "domains" in result:
        c = result["domains"]
        lines += _table("IAK domains K | ms per fine-tune step | vs first",
                        [f"| {p['domains']} | {1000 * p['iak_step_s']:.2f} | {vs(p, c, 'iak_step_s')} |" for p in c])
    if "ranks" in result:
        c = result["ranks"]
        lines += _table("ranks | samples/s per rank | total samples/s | total vs 1 rank",
                        [f"| {p['ranks']} | {', '.join(f'{s:,.0f}' for s in p['per_rank_samples_per_s'])} | "
                         f"{p['total_samples_per_s']:,.0f} | {vs(p, c, 'total_samples_per_s')} |" for p in c])
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    from iak_dist.io import atomic_path

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [k for k in ("batch", "tables", "domains", "ranks") if k in result]
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.8), squeeze=False)
    for ax, name in zip(axes[0], curves, strict=True):
        c = result[name]
        if name == "batch":
            ax.plot([p["batch"] for p in c], [p["samples_per_s"] for p in c], "o-")
            ax.set_xscale("log", base=2)
            ax.set_xticks([p["batch"] for p in c], [str(p["batch"]) for p in c])
            ax.set(xlabel="batch size", ylabel="samples/s", title="pre-train vs batch", ylim=(0, None))
        elif name == "tables":
            x = [p["rows"] for p in c]
            ax.plot(x, [2048 / p["full_step_s"] for p in c], "o-", label="full fine-tune")
            ax.plot(x, [2048 / p["iak_step_s"] for p in c], "s-", label="IAK fine-tune")
            ax.plot(x, [p["samples_per_s"] for p in c], "^-", label="pre-train")
            ax.set(xscale="log", xlabel="table rows", ylabel="samples/s", title="vs table size", ylim=(0, None))
            ax.legend()
        elif name == "domains":
            ax.plot([p["domains"] for p in c], [1000 * p["iak_step_s"] for p in c], "o-")
            ax.set_xscale("log", base=2)
            ax.set_xticks([p["domains"] for p in c], [str(p["domains"]) for p in c])
            ax.set(xlabel="domains K", ylabel="ms per IAK step", title="IAK step vs K", ylim=(0, None))
        else:
            ax.bar([str(p["ranks"]) for p in c], [p["total_samples_per_s"] for p in c])
            ax.set(xlabel="ranks", ylabel="total samples/s", title="vs ranks")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main() -> None:
    from iak_dist.distributed.context import init_distributed
    from iak_dist.io import atomic_write_json
    from iak_dist.runtime import configure_environment, say

    configure_environment()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curves", default="batch,tables,domains,ranks")
    parser.add_argument("--max-rows", type=int, default=100_000_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--out", default="runs/scaling")
    parser.add_argument("--ranks-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ranks_worker:
        ranks_worker(args.ranks_worker, args.dim)
        return
    curves = args.curves.split(",")
    unknown = [c for c in curves if c not in ("batch", "tables", "domains", "ranks")]
    if unknown:
        parser.error(f"--curves: unknown {', '.join(unknown)}; known: batch, tables, domains, ranks")
    result: dict[str, Any] = {"dim": args.dim}
    dim, rows = args.dim, args.max_rows
    if "ranks" in curves:  # first: its ranks start from a fresh process, before this one holds big tables
        result["ranks"] = collect("ranks", rank_curve(dim), dim, rows)
    ctx = init_distributed()
    if "batch" in curves:
        result["batch"] = collect("batch", batch_curve(ctx, dim), dim, rows)
    if "domains" in curves:
        result["domains"] = collect("domains", domain_curve(ctx, dim), dim, rows)
    if "tables" in curves:
        result["tables"] = collect("tables", table_curve(ctx, dim, rows), dim, rows)
    out = Path(args.out)
    atomic_write_json(out / "scaling.json", result)
    plot(result, out / "scaling.png")
    say(f"[scaling] wrote {out / 'scaling.json'} and {out / 'scaling.png'}")
    print(markdown(result), flush=True)


if __name__ == "__main__":
    main()
