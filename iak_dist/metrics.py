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
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    codes, _ = _score_codes(np.asarray(scores))
    key = (codes << np.uint64(1)) | labels.astype(np.uint64)  # by score; the label rides along
    key.sort()
    run_first, run_end, positives_before = _tie_runs(key)
    # a run of equal scores at 0-based positions [a, b) has average rank (a + b + 1) / 2
    run_positives = positives_before[run_end] - positives_before[run_first]
    doubled_rank_sum = int(np.sum((run_first + run_end + 1) * run_positives))
    return float((doubled_rank_sum / 2 - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Mean of per-group AUCs (ties 1/2) weighted by group size, over groups holding both classes.

    Vectorised: one sort of packed 64-bit keys (group code, score code, label), then integer rank
    sums per run of equal scores and per group (`np.add.reduceat`), no Python loop over groups.
    Equal, bit for bit, to summing `auc` of each group times its size in ascending group order (the
    weighted sum is a sequential `np.cumsum`, the order of that loop), and independent of row order.
    """
    labels = np.asarray(labels).astype(bool)
    n = len(labels)
    if n == 0:
        return float("nan")
    score_codes, score_bits = _score_codes(np.asarray(scores))
    group_codes = _group_codes(np.asarray(groups), 63 - score_bits)
    key = (group_codes << np.uint64(score_bits + 1)) | (score_codes << np.uint64(1)) | labels.astype(np.uint64)
    del score_codes, group_codes
    key.sort()  # by group, then score
    run_first, run_end, positives_before = _tie_runs(key)
    group = key >> np.uint64(score_bits + 1)
    del key
    group_starts = np.r_[True, group[1:] != group[:-1]]
    del group
    group_first = np.flatnonzero(group_starts)
    group_end = np.r_[group_first[1:], n]
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


def _score_codes(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """Unsigned codes in the order of `scores` (equal scores, equal codes), and how many bits they use.

    float32 (what the model outputs): its IEEE bits made monotone (a negative's bits flipped, the
    sign bit of the rest set; -0.0 made 0.0 first, since the two compare equal). Other dtypes: the
    rank among the distinct values (`np.unique`, itself a sort).
    """
    if scores.dtype == np.float32:
        bits = (scores + np.float32(0.0)).view(np.uint32)
        return np.where(bits >> 31 != 0, ~bits, bits | np.uint32(1 << 31)).astype(np.uint64), 32
    distinct, codes = np.unique(scores, return_inverse=True)
    return codes.astype(np.uint64), max(1, (len(distinct) - 1).bit_length())


def _group_codes(groups: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes below 2**bits in the order of `groups`: the offset from the smallest id when it
    fits (user ids usually do), else the rank among the distinct ids (`np.unique`)."""
    if np.issubdtype(groups.dtype, np.integer) and len(groups):
        low = int(groups.min())
        if int(groups.max()) - low < 1 << bits:
            return groups.astype(np.uint64) - np.uint64(low % (1 << 64))  # modulo 2**64: exact offsets
    codes = np.unique(groups, return_inverse=True)[1].astype(np.uint64)
    if len(codes) and int(codes.max()) >= 1 << bits:
        raise ValueError(f"gauc: {len(codes)} rows have too many distinct groups to sort in 64-bit keys")
    return codes


def _tie_runs(key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first row, end row) of each run of equal keys ignoring the label bit, and positives before each row.

    `key` is sorted and holds the label in its lowest bit; `positives_before[i]` counts the
    positives among rows `[0, i)` (length n + 1).
    """
    positives_before = np.r_[0, np.cumsum(key & np.uint64(1), dtype=np.int64)]
    tie = key >> np.uint64(1)
    run_first = np.flatnonzero(np.r_[True, tie[1:] != tie[:-1]])
    return run_first, np.r_[run_first[1:], len(key)], positives_before


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
