"""Trains one huge embedding table (default: a billion fp16 rows) next to a 100k-row one, in one run.

    .venv/bin/python -m profiling.largest_table --rows 1000000000 --dim 4 --table-dtype fp16

Builds one-table backbones through the same code as pre-training (TorchRec DMP, FBGEMM fused
row-wise Adagrad, DeepSpeed over the dense part; `profiling/scaling.build_model`): first the
100k-row baseline, then the big table, in one worker process. Both train on Zipf(1.1) IDs, taking
turns (`profiling/steps.interleaved`), so their samples/s ratio holds on a shared, noisy machine.
Prints per table: rows, bytes of weights and of optimizer state (counted from the tensors), resident
memory growth while building it, build seconds (allocation + initialisation), samples/s; and the
worker's peak RSS. `--out` also gets the numbers as JSON.

Memory safety (the machine is shared): before starting, the weights + optimizer state plus
`--margin-gib` must fit in what the kernel reports available; while the worker runs, it is killed
as soon as available memory drops under `--floor-gib`, so it cannot push the machine into the OOM
killer. Either way the script says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BASELINE_ROWS = 100_000
BYTES = {"fp32": 4, "fp16": 2}
ROWWISE_STATE_BYTES = 4  # row-wise Adagrad: one fp32 accumulator per row, whatever the table dtype


def stop(message: str) -> None:
    """One line on stderr and exit code 2 (the run did not happen or was ended on purpose)."""
    print(f"[largest_table] {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def available_gib() -> float:
    """MemAvailable: what can be allocated without swapping or evicting others' working sets."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def expected_bytes(rows: int, dim: int, table_dtype: str) -> int:
    """Weights + row-wise Adagrad state of one table."""
    return rows * (dim * BYTES[table_dtype] + ROWWISE_STATE_BYTES)


def held_bytes(sharded) -> tuple[int, int]:
    """(table weights, fused optimizer state) bytes this process holds, counted from the tensors."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    def size(t) -> int:
        pieces = [s.tensor for s in t.local_shards()] if isinstance(t, ShardedTensor) else [t]
        return sum(p.numel() * p.element_size() for p in pieces)

    weights = sum(size(v) for k, v in sharded.model.state_dict().items() if k.startswith("backbone.embeddings."))
    state = sum(size(v) for per_table in sharded.model.fused_optimizer.state_dict()["state"].values()
                for v in per_table.values() if hasattr(v, "dtype"))
    return weights, state


def worker(args: argparse.Namespace) -> None:
    """Build baseline then big table, train both taking turns, write the numbers to `args.worker`."""
    from iak_dist.distributed.context import init_distributed
    from iak_dist.runtime import configure_environment, say
    from profiling.scaling import build_model, stepper, synthetic_batch
    from profiling.steps import interleaved

    configure_environment()
    ctx = init_distributed()
    tables, steppers, batches = {}, {}, {}
    for name, rows in (("baseline", BASELINE_ROWS), ("big", args.rows)):
        say(f"[largest_table] building {rows:,} x {args.dim} {args.table_dtype} rows ...")
        before, start = rss_gib(), time.perf_counter()
        sharded, dense = build_model((rows,), args.dim, 1, "none", args.batch, ctx, args.table_dtype)
        build_s, growth = time.perf_counter() - start, rss_gib() - before
        weights, state = held_bytes(sharded)
        tables[name] = {"rows": rows, "dim": args.dim, "dtype": args.table_dtype, "weight_bytes": weights,
                        "state_bytes": state, "rss_growth_gib": growth, "build_s": build_s}
        steppers[name] = stepper(sharded, dense)
        rng = np.random.default_rng(0)
        batches[name] = [synthetic_batch(args.batch, (rows,), 1, rng) for _ in range(args.steps)]
        say(f"[largest_table]   {weights / 2**30:.2f} GiB weights + {state / 2**30:.2f} GiB optimizer state, "
            f"RSS +{growth:.2f} GiB, built in {build_s:.1f} s")
    say(f"[largest_table] training both, taking turns ({args.rounds} x {args.steps} steps of {args.batch}) ...")
    step_s = {name: t["step"] for name, t in interleaved(steppers, batches, args.rounds).items()}
    for name, t in tables.items():
        t["samples_per_s"] = args.batch / step_s[name]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    Path(args.worker).write_text(json.dumps({"tables": tables, "peak_rss_gib": peak, "batch": args.batch}))


def run_guarded(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """The worker in a child process, killed if the machine's available memory falls under the floor."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        child = subprocess.Popen([sys.executable, "-m", "profiling.largest_table", *argv, "--worker", str(out)])
        lowest = available_gib()
        while child.poll() is None:
            lowest = min(lowest, available_gib())
            if lowest < args.floor_gib:
                child.kill()
                child.wait()
                stop(f"stopped: available memory fell to {lowest:.1f} GiB (< --floor-gib {args.floor_gib}); "
                     "the worker was killed before the machine ran out")
            time.sleep(0.2)
        if child.returncode != 0:
            stop(f"the worker failed with exit code {child.returncode}")
        result = json.loads(out.read_text())
    result["lowest_available_gib"] = lowest
    return result


def markdown(result: dict[str, Any]) -> str:
    base = result["tables"]["baseline"]
    lines = ["| table rows | dim | dtype | weights GiB | optimizer state GiB | RSS growth GiB | build s | "
             "samples/s | vs 100k rows |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for t in result["tables"].values():
        lines.append(f"| {t['rows']:,} | {t['dim']} | {t['dtype']} | {t['weight_bytes'] / 2**30:.2f} | "
                     f"{t['state_bytes'] / 2**30:.2f} | {t['rss_growth_gib']:.2f} | {t['build_s']:.1f} | "
                     f"{t['samples_per_s']:,.0f} | {t['samples_per_s'] / base['samples_per_s']:.2f}x |")
    lines += ["", f"Peak RSS of the worker: {result['peak_rss_gib']:.2f} GiB; lowest available memory on the "
              f"machine meanwhile: {result['lowest_available_gib']:.1f} GiB; batch {result['batch']}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000_000)
    parser.add_argument("--dim", type=int, default=4)
    parser.add_argument("--table-dtype", choices=sorted(BYTES), default="fp16")
    parser.add_argument("--steps", type=int, default=100, help="batches per pass (each table its own)")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes, the tables taking turns")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--margin-gib", type=float, default=3.0,
                        help="available memory that must remain after the tables are allocated")
    parser.add_argument("--floor-gib", type=float, default=1.0,
                        help="kill the worker when the machine's available memory falls under this")
    parser.add_argument("--out", type=Path, help="also write the numbers here as JSON")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    need = (expected_bytes(args.rows, args.dim, args.table_dtype)
            + expected_bytes(BASELINE_ROWS, args.dim, args.table_dtype)) / 2**30
    free = available_gib()
    if need + args.margin_gib > free:
        stop(f"not started: {args.rows:,} x {args.dim} {args.table_dtype} rows need {need:.1f} GiB (weights + "
             f"optimizer state) + {args.margin_gib} GiB margin, {free:.1f} GiB is available now")
    print(f"[largest_table] {need:.1f} GiB of tables + state expected, {free:.1f} GiB available", file=sys.stderr)
    result = run_guarded(args, sys.argv[1:])
    if args.out:
        from iak_dist.io import atomic_write_json

        atomic_write_json(args.out, result)
    print(markdown(result), flush=True)


if __name__ == "__main__":
    main()
