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

    NaN when only one class is present.
    """
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average rank within runs of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    avg = (starts + ends - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Mean of per-group AUCs weighted by group size, over groups holding both classes."""
    order = np.argsort(groups, kind="mergesort")
    g, y, s = groups[order], labels[order], scores[order]
    cuts = np.flatnonzero(np.diff(g)) + 1
    total, weight = 0.0, 0
    for yy, ss in zip(np.split(y, cuts), np.split(s, cuts), strict=True):
        if 0 < yy.sum() < len(yy):
            total += auc(yy, ss) * len(yy)
            weight += len(yy)
    return total / weight if weight else float("nan")


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(probs, eps, 1 - eps)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


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
