"""GAUC: the vectorised `iak_dist.metrics.gauc` against the per-user Python loop it replaced.

    .venv/bin/python -m profiling.metrics_speed [--rows 5000000] [--users 500000] [--repeats 3]

Random impressions (scores on a 0.001 grid, so many ties; users of one class and of one row among
them), both implementations in the same run on the same arrays. Prints each one's best time, the
speed-up ratio and whether the two values are equal (they must be, to 1e-12; the test
tests/test_metrics.py checks the same on small data). Then what the in-memory metric set costs
(`ranking_metrics`: two AUCs, GAUC, LogLoss, as `phases.evaluate.metrics_by_domain` runs it): the
compact columns (`phases.evaluate.row_dtype`, bytes a row) and the peak of its temporaries, in bytes
a row (tracemalloc). Evaluation itself streams the metrics in buckets: `profiling/eval_memory.py`.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from iak_dist.metrics import gauc, ranking_metrics


def loop_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUC as it was before vectorising (float average ranks after a mergesort), as the loop called it."""
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    ranks[order] = np.repeat((starts + ends - 1) / 2.0 + 1.0, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def loop_gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """GAUC as it was before vectorising: one AUC per user in a Python loop (the baseline; the same
    reference as tests/test_metrics.py's)."""
    order = np.argsort(groups, kind="mergesort")
    g, y, s = groups[order], labels[order], scores[order]
    cuts = np.flatnonzero(np.diff(g)) + 1
    total, weight = 0.0, 0
    for yy, ss in zip(np.split(y, cuts), np.split(s, cuts), strict=True):
        if 0 < yy.sum() < len(yy):
            total += loop_auc(yy, ss) * len(yy)
            weight += len(yy)
    return total / weight if weight else float("nan")


def best_time(fn: Callable[[], float], repeats: int) -> tuple[float, float]:
    """(fastest wall seconds over `repeats` calls, the value returned)."""
    best, value = float("inf"), float("nan")
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--users", type=int, default=500_000)
    parser.add_argument("--repeats", type=int, default=3, help="vectorised runs (the loop runs once)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    users = rng.integers(0, args.users, args.rows, dtype=np.int64)
    labels = (rng.random(args.rows) < 0.2).astype(np.int8)
    scores = np.round(rng.random(args.rows) * 0.8 + 0.2 * labels, 3).astype(np.float32)

    fast, fast_value = best_time(lambda: gauc(labels, scores, users), args.repeats)
    slow, slow_value = best_time(lambda: loop_gauc(labels, scores, users), 1)
    print(f"GAUC on {args.rows:,} rows / {args.users:,} users")
    print(f"  per-user loop : {slow:8.2f} s  gauc={slow_value!r}")
    print(f"  vectorised    : {fast:8.2f} s  gauc={fast_value!r}")
    print(f"  speed-up      : {slow / fast:8.1f}x  |difference| = {abs(fast_value - slow_value):.1e}")

    from iak_dist.phases.evaluate import row_dtype

    tracemalloc.start()
    start = time.perf_counter()
    ranking_metrics(labels, labels, scores, scores, users)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"in memory: columns {row_dtype(1).itemsize} bytes a row; one metric set (CTR-AUC, "
          f"CTCVR-AUC, GAUC, LogLoss) {seconds:.2f} s, temporaries peak {peak / args.rows:.0f} bytes a row")


if __name__ == "__main__":
    main()
