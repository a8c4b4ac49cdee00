"""Ranking metrics: AUC (rank statistic with ties), GAUC (per-user AUC, impression-weighted), LogLoss."""

from __future__ import annotations

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


def ranking_metrics(click, conversion, p_ctr, p_ctcvr, user) -> dict[str, float]:
    """The per-domain metric set of reports: CTR-AUC, CTCVR-AUC, GAUC (CTR, by user), LogLoss (CTR)."""
    return {
        "ctr_auc": auc(click, p_ctr),
        "ctcvr_auc": auc(conversion, p_ctcvr),
        "gauc": gauc(click, p_ctr, user),
        "logloss": logloss(click, p_ctr),
        "rows": float(len(click)),
    }
