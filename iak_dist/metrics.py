"""Ranking metrics: AUC (rank statistic with ties), GAUC (per-user AUC, impression-weighted), LogLoss.

A metric that cannot be computed is `None`, never NaN: NaN is not JSON (strict parsers reject the bare
`NaN` token Python writes) and a NaN in a table reads as a number. `None` is written as `null` in
JSON and shown as `n/a` in reports.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties count 1/2.

    NaN when only one class is present. Exact and independent of row order: ranks are summed as
    integers (doubled, so tie averages stay integral), so rows gathered from ranks in any order give
    the same bits.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    run_first = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    run_end = np.r_[run_first[1:], len(scores)]
    positives_before = np.r_[0, np.cumsum(labels[order], dtype=np.int64)]
    # a run of equal scores at 0-based positions [a, b) has average rank (a + b + 1) / 2
    run_positives = positives_before[run_end] - positives_before[run_first]
    doubled_rank_sum = int(np.sum((run_first + run_end + 1) * run_positives))
    return float((doubled_rank_sum / 2 - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Mean of per-group AUCs (ties 1/2) weighted by group size, over groups holding both classes.

    Vectorised: a sort by (group, score), then integer rank sums per run of equal scores and per
    group (`np.add.reduceat`), no Python loop over groups. Equal, bit for bit, to summing `auc` of
    each group times its size in ascending group order (the weighted sum is a sequential
    `np.cumsum`, the order of that loop), and independent of row order.
    """
    labels = np.asarray(labels).astype(bool)
    scores, groups = np.asarray(scores), np.asarray(groups)
    n = len(labels)
    if n == 0:
        return float("nan")
    # by group, then score (two stable sorts: faster than np.lexsort, same order up to equal pairs)
    order = np.argsort(scores, kind="stable")
    order = order[np.argsort(groups[order], kind="stable")]
    g, s = groups[order], scores[order]
    group_starts = np.r_[True, g[1:] != g[:-1]]
    run_starts = group_starts | np.r_[True, s[1:] != s[:-1]]
    group_first = np.flatnonzero(group_starts)
    group_end = np.r_[group_first[1:], n]
    run_first = np.flatnonzero(run_starts)
    run_end = np.r_[run_first[1:], n]
    positives_before = np.r_[0, np.cumsum(labels[order], dtype=np.int64)]
    run_positives = positives_before[run_end] - positives_before[run_first]
    run_group = np.cumsum(group_starts)[run_first] - 1
    # positions within the group: a run at [a, b) has average rank (a + b + 1) / 2
    offset = group_first[run_group]
    doubled = (run_first - offset + run_end - offset + 1) * run_positives
    doubled_rank_sum = np.add.reduceat(doubled, np.flatnonzero(group_starts[run_first]))
    size = group_end - group_first
    n_pos = positives_before[group_end] - positives_before[group_first]
    both = (n_pos > 0) & (n_pos < size)
    if not both.any():
        return float("nan")
    n_pos, size, doubled_rank_sum = n_pos[both], size[both], doubled_rank_sum[both]
    group_auc = (doubled_rank_sum / 2 - n_pos * (n_pos + 1) / 2.0) / (n_pos * (size - n_pos)).astype(np.float64)
    return float(np.cumsum(group_auc * size)[-1] / int(size.sum()))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, probabilities clipped to [eps, 1 - eps].

    Summed in float64 over the sorted per-row terms, so the value does not depend on row order
    (ranks' rows are gathered in rank order, not file order).
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    terms = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(np.sum(np.sort(terms)) / len(terms)) if len(terms) else float("nan")


def finite_or_none(value: float | None) -> float | None:
    """`value`, or None where it is missing or not finite (a metric undefined on the rows given)."""
    return None if value is None or not math.isfinite(value) else float(value)


def strict_json(data: Any) -> Any:
    """`data` with every non-finite float replaced by None, so `json.dumps(allow_nan=False)` holds."""
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [strict_json(v) for v in data]
    if isinstance(data, float):
        return finite_or_none(data)
    return data


def format_metric(value: float | None, spec: str = ".4f") -> str:
    """A metric for text: `n/a` where it is not available (None or NaN)."""
    value = finite_or_none(value)
    return "n/a" if value is None else format(value, spec)


def ranking_metrics(click: np.ndarray, conversion: np.ndarray | None, p_ctr: np.ndarray, p_ctcvr: np.ndarray,
                    user: np.ndarray | None) -> dict[str, float | None]:
    """The per-domain metric set of reports: CTR-AUC, CTCVR-AUC, GAUC (CTR, by user), LogLoss (CTR).

    `conversion` None (the schema has no conversion label): CTCVR-AUC is None. `user` None (the
    schema names no user column): GAUC is None; grouping every row into one user would silently
    report the CTR-AUC under GAUC's name. An AUC over rows of one class is None too.
    """
    return {
        "ctr_auc": finite_or_none(auc(click, p_ctr)),
        "ctcvr_auc": None if conversion is None else finite_or_none(auc(conversion, p_ctcvr)),
        "gauc": None if user is None else finite_or_none(gauc(click, p_ctr, user)),
        "logloss": finite_or_none(logloss(click, p_ctr)),
        "rows": float(len(click)),
    }
