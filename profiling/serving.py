"""Serving latency and throughput: the eager `Predictor` and the Ray Serve endpoint, fp32 / fp16 / int8
tables, single- vs mixed-domain batches.

    OMP_NUM_THREADS=1 .venv/bin/python -m profiling.serving runs/movielens-100k-zip --strategy iak \\
        --data data/movielens-100k-zip/test.parquet

Exports the run's `--strategy` artefact in fp32, fp16 and int8 (into a temporary folder), reads
request rows from `--data` (a Parquet file; its first rows, as the list of dicts a JSON request
becomes), then prints Markdown tables:

1. eager: `Predictor.score` (fp32) per batch size: p50 / p99 latency of a call, rows/s;
2. table dtypes: the same per dtype at two batch sizes, and the max |score - fp32 score| over the rows;
3. domain activation: a batch of one domain, of every domain mixed, and of a domain the artefact does not
   know (scored by the backbone alone: no kernel), at the same size;
4. served: the endpoint (embedded Ray, one replica) under `--concurrency` closed-loop HTTP clients
   (threads, one keep-alive connection each) sending requests of `--request-rows`: p50 / p99 latency
   seen by the client, requests/s and rows/s.

The eager cases of one table take turns call by call (`interleaved`), so that load from other
processes that comes and goes hits each case alike.

The clients share the machine with the replica: on a 2-core machine the served figures include the
clients' own JSON and HTTP work. `--device cuda` scores on the GPU (eager and served).
"""

from __future__ import annotations

import argparse
import http.client
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SCORES = ("p_ctr", "p_cvr", "p_ctcvr")


def interleaved(cases: dict, seconds: float, min_rounds: int = 5) -> dict[str, np.ndarray]:
    """Seconds of each call of every case, the cases taking turns (one call each a round) for about
    `seconds` per case: on a shared machine, load that comes and goes then hits every case alike."""
    for fn in cases.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {label: [] for label in cases}
    spent = dict.fromkeys(cases, 0.0)
    rounds = 0
    while rounds < min_rounds or min(spent.values()) < seconds:
        for label, fn in cases.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            times[label].append(elapsed)
            spent[label] += elapsed
        rounds += 1
    return {label: np.asarray(t) for label, t in times.items()}


def latency_row(label: str, rows_per_call: int, times: np.ndarray) -> str:
    p50, p99 = np.percentile(times, [50, 99]) * 1000
    return f"| {label} | {rows_per_call} | {p50:.2f} | {p99:.2f} | {rows_per_call / times.mean():,.0f} |"


LATENCY_HEADER = "| case | rows / call | p50 ms | p99 ms | rows/s |\n|---|---|---|---|---|"


def eager_tables(predictors: dict, rows: list[dict], batch_sizes: list[int], seconds: float) -> None:
    print("\n### Eager `Predictor.score` (fp32), list-of-dicts input\n")
    print(LATENCY_HEADER)
    times = interleaved({n: lambda n=n: predictors["fp32"].score(rows[:n]) for n in batch_sizes}, seconds)
    for n in batch_sizes:
        print(latency_row("fp32", n, times[n]))

    print("\n### Table dtypes\n")
    reference = predictors["fp32"].score(rows)
    print("| dtype | rows / call | p50 ms | p99 ms | rows/s | max abs drift vs fp32 |\n|---|---|---|---|---|---|")
    sizes = (batch_sizes[len(batch_sizes) // 2], batch_sizes[-1])
    times = interleaved({(dtype, n): lambda n=n, p=predictor: p.score(rows[:n])
                         for dtype, predictor in predictors.items() for n in sizes}, seconds)
    for dtype, predictor in predictors.items():
        scores = predictor.score(rows)
        drift = max(float(np.abs(scores[k] - reference[k]).max()) for k in SCORES)
        for n in sizes:
            print(latency_row(dtype, n, times[dtype, n]) + f" {drift:.1e} |")


def domain_table(predictor, rows: list[dict], n: int, seconds: float) -> None:
    column = predictor.schema.domain
    first = predictor.domains[0]
    mixed = rows[:n]
    single = [{**row, column: first} for row in mixed]
    unknown = [{**row, column: "__not_a_domain__"} for row in mixed]
    print(f"\n### Domain activation (K = {len(predictor.domains)} domains, fp32, {n} rows)\n")
    print(LATENCY_HEADER)
    batches = {f"one domain ({first})": single, f"mixed ({len({r[column] for r in mixed})} domains)": mixed,
               "unknown domain: backbone only": unknown}
    times = interleaved({label: lambda b=batch: predictor.score(b) for label, batch in batches.items()}, seconds)
    for label in batches:
        print(latency_row(label, n, times[label]))


def client_load(host: str, port: int, bodies: list[bytes], concurrency: int, seconds: float) -> tuple[np.ndarray, int]:
    """Closed-loop clients for `seconds`: (latencies of the answered requests, requests that failed)."""
    latencies: list[float] = []
    failed = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        k = i
        while time.perf_counter() < stop:
            body = bodies[k % len(bodies)]
            k += concurrency
            start = time.perf_counter()
            conn.request("POST", "/score", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            elapsed = time.perf_counter() - start
            with lock:
                if response.status == 200:
                    latencies.append(elapsed)
                else:
                    failed[0] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return np.asarray(latencies), failed[0]


def served_table(artefact: Path, rows: list[dict], concurrencies: list[int], request_rows: list[int],
                 seconds: float, device: str, max_batch_size: int, batch_wait_ms: float) -> None:
    from iak_dist.orchestration.ray_pipeline import _free_port
    from iak_dist.serving.service import serve

    port = _free_port()
    handle = serve(artefact, port=port, replicas=1, device=device, max_batch_size=max_batch_size,
                   max_request_rows=min(max_batch_size, max(request_rows)), batch_wait_timeout_s=batch_wait_ms / 1000,
                   blocking=False)
    try:
        print(f"\n### Served endpoint (1 replica, batches of up to {max_batch_size} rows, {batch_wait_ms:g} ms wait)\n")
        print("| rows / request | clients | p50 ms | p99 ms | requests/s | rows/s | failed |")
        print("|---|---|---|---|---|---|---|")
        for n in request_rows:
            bodies = [json.dumps({"rows": rows[lo:lo + n]}).encode() for lo in range(0, len(rows) - n + 1, n)][:64]
            client_load("127.0.0.1", port, bodies, 1, 1.0)  # warm-up
            for c in concurrencies:
                times, failed = client_load("127.0.0.1", port, bodies, c, seconds)
                p50, p99 = np.percentile(times, [50, 99]) * 1000
                rate = len(times) / seconds
                print(f"| {n} | {c} | {p50:.2f} | {p99:.2f} | {rate:,.0f} | {rate * n:,.0f} | {failed} |")
    finally:
        handle.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--strategy", default="iak")
    parser.add_argument("--data", type=Path, required=True, help="Parquet file whose first rows are the requests")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--batch-sizes", default="1,16,256,4096")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--request-rows", default="1,32,256")
    parser.add_argument("--max-batch-size", type=int, default=1024)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measured point")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parts", default="eager,served", help="which tables: eager (1-3), served (4)")
    args = parser.parse_args()

    import pyarrow.dataset as ds
    import torch

    from iak_dist.runtime import configure_environment
    from iak_dist.serving.artefact import TABLE_DTYPES, export_artefact
    from iak_dist.serving.predictor import Predictor

    configure_environment()
    with tempfile.TemporaryDirectory(prefix="iak-serving-bench-") as tmp:
        artefacts = {dtype: export_artefact(args.run_dir, args.strategy, Path(tmp) / dtype, table_dtype=dtype)
                     for dtype in TABLE_DTYPES}
        predictors = {d: Predictor.load(a, device=args.device) for d, a in artefacts.items()}
        columns = predictors["fp32"].request_columns()
        rows = ds.dataset(args.data).head(args.rows, columns=columns).to_pylist()  # the first rows only
        print(f"## {args.run_dir} `{args.strategy}` on {args.device} (torch threads {torch.get_num_threads()}), "
              f"{len(rows)} request rows from {args.data}")
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if int(b) <= len(rows)]
        parts = args.parts.split(",")
        if "eager" in parts:
            eager_tables(predictors, rows, batch_sizes, args.seconds)
            domain_table(predictors["fp32"], rows, min(1024, len(rows)), args.seconds)
        if "served" in parts:
            served_table(artefacts["fp32"], rows, [int(c) for c in args.concurrency.split(",")],
                         [int(r) for r in args.request_rows.split(",")], args.seconds, args.device,
                         args.max_batch_size, args.batch_wait_ms)


if __name__ == "__main__":
    main()
