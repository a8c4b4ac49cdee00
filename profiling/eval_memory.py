"""Evaluation's metric stage (scored records in, metrics out): peak RSS growth at N and 10 N rows.

    .venv/bin/python -m profiling.eval_memory [--rows 2000000] [--users-per-row 0.1] [--heavy-share 0.15]
        [--domains 4]

Synthetic scored records (`phases.evaluate.row_dtype`: float32 scores of a logistic model, 20 %
clicks, conversions among them, users with 10 rows on average, except one heavy user holding
`--heavy-share` of all rows, as the head of a Zipf distribution does: 300k rows at N = 2M, more than
a bucket, so both runs take `stream_metrics`' heavy-user path) are written to a spill file, as a
rank's `score` writes them; then, each in a fresh process (so its peak RSS is its own), one method
computes the per-domain metrics from that file:

- `stream`: `stream_metrics` (buckets of `BUCKET_ROWS`, one process = one rank: the rank-0 role);
- `memory`: the method it replaced (every record read into columns, `metrics_by_domain`).

Printed: each method's RSS growth over its process after imports (VmHWM minus VmRSS before the
stage) and wall seconds, at N and 10 N rows, the 10 N / N ratio of the growth (target for
`stream`: at most 1.2x) and whether the two methods agree (AUCs exactly, GAUC / LogLoss to 1e-12).

Measured with the defaults (2M and 20M rows, the heavy user 300k and 3M rows; 2 shared cores):
`stream` +69.7 MiB and +79.4 MiB (1.14x; 5.3 s and 49.1 s), `memory` +170 MiB and +1630 MiB (9.57x);
the methods agree at both sizes. Before heavy users were streamed by score range (their bucket was
gathered whole), `stream` grew +78.7 MiB and +298.9 MiB on the same records (3.80x).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_kib(field: str) -> int:
    """`VmRSS` (now) or `VmHWM` (peak) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def write_records(path: Path, rows: int, users_per_row: float, domains: int, heavy_share: float = 0.0,
                  chunk: int = 1 << 20) -> None:
    """`rows` synthetic scored records appended to `path` chunk by chunk (never all in memory); user 1
    holds about `heavy_share` of them."""
    from iak_dist.phases.evaluate import Spill, row_dtype

    spill = Spill(path, row_dtype(domains))
    rng = np.random.default_rng(0)
    users = max(1, int(rows * users_per_row))
    for lo in range(0, rows, chunk):
        n = min(chunk, rows - lo)
        records = np.empty(n, dtype=spill.dtype)
        logit = rng.normal(-1.5, 1.0, n)
        records["p_ctr"] = 1 / (1 + np.exp(-logit))
        records["click"] = rng.random(n) < records["p_ctr"]
        records["p_ctcvr"] = records["p_ctr"] * 0.1
        records["conversion"] = records["click"] & (rng.random(n) < 0.1)
        records["domain"] = rng.integers(0, domains, n)
        records["user"] = rng.integers(0, users, n) * 7919
        records["user"][rng.random(n) < heavy_share] = 1  # the heavy user (no other id is 1)
        spill.append(records)


def child(path: Path, method: str, domains: int) -> None:
    """One method's metric stage on the records in `path`; prints a JSON line (KiB, seconds, metrics)."""
    from iak_dist.distributed.context import init_distributed
    from iak_dist.phases.evaluate import Spill, metrics_by_domain, row_dtype, spill_folder, stream_metrics

    names = [f"d{i}" for i in range(domains)]
    ctx = init_distributed()
    before = rss_kib("VmRSS")
    start = time.perf_counter()
    if method == "stream":
        spill = Spill(path, row_dtype(domains))
        spill.rows = path.stat().st_size // spill.dtype.itemsize
        with spill_folder(path.parent) as folder:
            metrics = stream_metrics(spill, names, ctx, folder)
    else:
        records = np.fromfile(path, dtype=row_dtype(domains))
        columns = {name: np.ascontiguousarray(records[name]) for name in records.dtype.names}
        del records
        metrics = metrics_by_domain(columns, names)
    seconds = time.perf_counter() - start
    print(json.dumps({"growth_kib": rss_kib("VmHWM") - before, "seconds": seconds, "metrics": metrics}))


def run_child(path: Path, method: str, domains: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "profiling.eval_memory", "--child", str(path), "--method", method,
                          "--domains", str(domains)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def agree(a: dict, b: dict) -> bool:
    """AUCs and rows equal, GAUC and LogLoss within 1e-12 relative, every domain."""
    for domain, metrics in b.items():
        for name, value in metrics.items():
            other = a[domain][name]
            if name in ("gauc", "logloss") and value is not None:
                if other is None or abs(other - value) > 1e-12 * abs(value):
                    return False
            elif other != value:
                return False
    return a.keys() == b.keys()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="N (the second run has 10 N)")
    parser.add_argument("--users-per-row", type=float, default=0.1)
    parser.add_argument("--heavy-share", type=float, default=0.15, help="share of the rows held by one user")
    parser.add_argument("--domains", type=int, default=4)
    parser.add_argument("--methods", default="stream,memory")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.method, args.domains)
        return

    methods = args.methods.split(",")
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="eval-memory-") as tmp:
        for rows in (args.rows, 10 * args.rows):
            path = Path(tmp) / f"records-{rows}.bin"
            write_records(path, rows, args.users_per_row, args.domains, args.heavy_share)
            for method in methods:
                results[method, rows] = got = run_child(path, method, args.domains)
                print(f"{method:6s} {rows:>12,} rows: RSS growth {got['growth_kib'] / 1024:8.1f} MiB "
                      f"({got['growth_kib'] * 1024 / rows:5.1f} B/row), {got['seconds']:7.1f} s", flush=True)
            if len(methods) == 2:
                same = agree(*(results[m, rows]["metrics"] for m in methods))
                print(f"       methods agree at {rows:,} rows: {same}")
            path.unlink()
    for method in methods:
        small, large = results[method, args.rows], results[method, 10 * args.rows]
        print(f"{method:6s} RSS growth 10N / N: {large['growth_kib'] / max(1, small['growth_kib']):.2f}x, "
              f"time 10N / N: {large['seconds'] / small['seconds']:.1f}x")
    if len(methods) == 2:
        a, b = methods
        print(f"time {a} / {b} at {10 * args.rows:,} rows: "
              f"{results[a, 10 * args.rows]['seconds'] / results[b, 10 * args.rows]['seconds']:.2f}x")


if __name__ == "__main__":
    main()
