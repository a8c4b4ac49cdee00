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
    group_auc, size, _ = group_aucs(labels, scores, groups)
    if not len(size):
        return float("nan")
    return float(np.cumsum(group_auc * size)[-1] / int(size.sum()))


def group_aucs(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(AUC, rows, code) of each group holding both classes, in ascending group order: `gauc`'s parts.

    The code is the group's place in the order of `groups` (`_group_codes`: the offset from the
    smallest id, or the rank among the distinct ids), so parts of groups can be told apart.
    """
    labels = np.asarray(labels).astype(bool)
    n = len(labels)
    if n == 0:
        return np.empty(0), np.empty(0, dtype=np.int64), np.empty(0, dtype=np.uint64)
    score_codes, score_bits = _score_codes(np.asarray(scores))
    group_codes = _group_codes(np.asarray(groups), 63 - score_bits)
    key = (group_codes << np.uint64(score_bits + 1)) | (score_codes << np.uint64(1)) | labels.astype(np.uint64)
    del score_codes, group_codes
    key.sort()  # by group, then score
    run_first, run_end, positives_before = _tie_runs(key)
    group = key >> np.uint64(score_bits + 1)
    del key
    group_starts = np.r_[True, group[1:] != group[:-1]]
    group_first = np.flatnonzero(group_starts)
    code = group[group_first]
    del group
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
    n_pos, size, doubled_rank_sum, code = n_pos[both], size[both], doubled_rank_sum[both], code[both]
    group_auc = (doubled_rank_sum / 2 - n_pos * (n_pos + 1) / 2.0) / (n_pos * (size - n_pos)).astype(np.float64)
    return group_auc, size, code


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
    terms = logloss_terms(labels, probs, eps)
    return float(np.sum(np.sort(terms)) / len(terms)) if len(terms) else float("nan")


def score_codes(scores: np.ndarray) -> np.ndarray:
    """float32 scores as uint64 codes below 2**32 in score order (equal scores, equal codes): the keys
    by which streamed AUCs cut rows into score ranges (`_score_codes`; `score_values` inverts it)."""
    codes, bits = _score_codes(np.asarray(scores, dtype=np.float32))
    assert bits == 32
    return codes


def score_values(codes: np.ndarray) -> np.ndarray:
    """The float32 scores of `score_codes` (-0.0 comes back as 0.0)."""
    codes = np.asarray(codes).astype(np.uint32)
    top = np.uint32(1 << 31)
    return np.where(codes & top != 0, codes ^ top, ~codes).astype(np.uint32).view(np.float32)


def logloss_terms(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Each row's binary cross-entropy (float64), probabilities clipped to [eps, 1 - eps]."""
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def _slot_sums(slots: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct slots, sum of `values` per slot), summed in the given row order within each slot."""
    order = np.argsort(slots, kind="stable")
    slots, values = slots[order], values[order]
    first = np.flatnonzero(np.r_[True, slots[1:] != slots[:-1]]) if len(slots) else np.empty(0, dtype=np.int64)
    return slots[first], np.add.reduceat(values, first) if len(first) else values[:0]


class StreamingAuc:
    """Exact AUC (ties 1/2) per slot (e.g. each domain and overall) of rows fed in ascending score ranges.

    The rank-sum statistic: each positive scores 1 for every negative below it and 1/2 for every
    negative tied with it. Rows come in batches whose scores all lie above every score of earlier
    batches (and ties never straddle two batches), so the negatives below a batch are the running
    count. The sum is kept doubled, as an integer: the result equals `auc` on all rows, bit for bit
    (while the counts stay below 2**52), whatever the batches and their row order.
    """

    def __init__(self, slots: int) -> None:
        self.positives = np.zeros(slots, dtype=np.int64)
        self.negatives = np.zeros(slots, dtype=np.int64)
        self.doubled_wins = [0] * slots  # Python ints: no overflow

    def add(self, slots: np.ndarray, codes: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> None:
        """`counts[i]` rows of slot `slots[i]`, score code `codes[i]` (`score_codes`), label `labels[i]`."""
        if not len(codes):
            return
        key = (np.asarray(slots).astype(np.uint64) << np.uint64(33)) | (np.asarray(codes).astype(np.uint64)
                                                                       << np.uint64(1)) | (np.asarray(labels) != 0)
        order = np.argsort(key, kind="stable")  # timsort: fast on the sorted runs it is usually given
        key, counts = key[order], np.asarray(counts, dtype=np.int64)[order]
        run_key = key >> np.uint64(1)  # (slot, score)
        run_first = np.flatnonzero(np.r_[True, run_key[1:] != run_key[:-1]])
        positives = np.add.reduceat(counts * (key & np.uint64(1)).astype(np.int64), run_first)
        negatives = np.add.reduceat(counts, run_first) - positives
        run_slot = (run_key[run_first] >> np.uint64(32)).astype(np.int64)
        slot_first = np.flatnonzero(np.r_[True, run_slot[1:] != run_slot[:-1]])
        slot_of_run = np.cumsum(np.r_[True, run_slot[1:] != run_slot[:-1]]) - 1
        negatives_before = np.cumsum(negatives) - negatives  # within this batch, all slots
        negatives_before = negatives_before - negatives_before[slot_first][slot_of_run] + self.negatives[run_slot]
        doubled = np.add.reduceat(positives * (2 * negatives_before + negatives), slot_first)
        for slot, wins, pos, neg in zip(run_slot[slot_first].tolist(), doubled.tolist(),
                                        np.add.reduceat(positives, slot_first).tolist(),
                                        np.add.reduceat(negatives, slot_first).tolist(), strict=True):
            self.doubled_wins[slot] += wins
            self.positives[slot] += pos
            self.negatives[slot] += neg

    def rows(self, slot: int) -> int:
        return int(self.positives[slot] + self.negatives[slot])

    def result(self, slot: int) -> float:
        """The slot's AUC; NaN with one class only (as `auc`)."""
        n_pos, n_neg = int(self.positives[slot]), int(self.negatives[slot])
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        return float((self.doubled_wins[slot] / 2) / (n_pos * n_neg))


class StreamingGauc:
    """GAUC per slot from `group_aucs` parts of complete groups (every row of a group in one batch), or
    from a group's `StreamingAuc` (a group too large for one batch, fed in score ranges: `add_streamed`).

    Equal to `gauc` on all rows up to the order of the float sum (groups come batch by batch, not in
    ascending group order): within about 1e-15 relative. Each group's AUC is the same bits either way.
    """

    def __init__(self, slots: int) -> None:
        self.weighted = np.zeros(slots, dtype=np.float64)
        self.weight = np.zeros(slots, dtype=np.int64)

    def add(self, slots: np.ndarray, group_auc: np.ndarray, size: np.ndarray) -> None:
        """Groups' AUCs and sizes (`group_aucs`), each counted in its slot."""
        present, sums = _slot_sums(np.asarray(slots, dtype=np.int64), group_auc * size)
        self.weighted[present] += sums
        self.weight[present] += _slot_sums(np.asarray(slots, dtype=np.int64), np.asarray(size, dtype=np.int64))[1]

    def add_streamed(self, group: StreamingAuc) -> None:
        """One group's AUC per slot, streamed (its slots: e.g. the group's rows per domain and overall),
        counted in each slot where it holds both classes, as `add` counts `group_aucs` parts."""
        both = np.flatnonzero((group.positives > 0) & (group.negatives > 0))
        self.add(both, np.array([group.result(int(s)) for s in both], dtype=np.float64),
                 group.positives[both] + group.negatives[both])

    def result(self, slot: int) -> float:
        return float(self.weighted[slot] / self.weight[slot]) if self.weight[slot] else float("nan")


class StreamingLogLoss:
    """Mean LogLoss per slot of counted rows fed in batches (float64 sums; equal to `logloss` on all rows
    up to the order of the sum: within about 1e-15 relative)."""

    def __init__(self, slots: int) -> None:
        self.total = np.zeros(slots, dtype=np.float64)
        self.rows = np.zeros(slots, dtype=np.int64)

    def add(self, slots: np.ndarray, labels: np.ndarray, probs: np.ndarray, counts: np.ndarray) -> None:
        slots = np.asarray(slots, dtype=np.int64)
        present, sums = _slot_sums(slots, logloss_terms(labels, probs) * counts)
        self.total[present] += sums
        self.rows[present] += _slot_sums(slots, np.asarray(counts, dtype=np.int64))[1]

    def result(self, slot: int) -> float:
        return float(self.total[slot] / self.rows[slot]) if self.rows[slot] else float("nan")


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


def constant_logloss(positives: int, rows: int) -> float | None:
    """LogLoss of the constant predictor that scores every row at the rows' positive rate r:
    -(r ln r + (1 - r) ln(1 - r)), the entropy of the labels (0 where r is 0 or 1; None without rows).

    The floor a model must beat to have learnt anything a base rate does not know: the lowest LogLoss
    any constant score reaches on these rows.
    """
    if rows <= 0:
        return None
    rate = positives / rows
    return float(-sum(p * math.log(p) for p in (rate, 1.0 - rate) if p > 0.0))


def constant_predictor(clicks: int, conversions: int | None, rows: int) -> dict[str, float | None]:
    """The constant predictor's CTR and CTCVR LogLoss (`constant_logloss`) on rows holding `clicks`
    clicks and `conversions` conversions (None: the schema has no conversion label)."""
    return {"constant_logloss": constant_logloss(clicks, rows),
            "constant_ctcvr_logloss": None if conversions is None else constant_logloss(conversions, rows)}


def ranking_metrics(click: np.ndarray, conversion: np.ndarray | None, p_ctr: np.ndarray, p_ctcvr: np.ndarray,
                    user: np.ndarray | None) -> dict[str, float | None]:
    """The per-domain metric set of reports: CTR-AUC, CTCVR-AUC, GAUC (CTR, by user), LogLoss (CTR),
    and the constant predictor's CTR / CTCVR LogLoss on the same rows (`constant_predictor`).

    `conversion` None (the schema has no conversion label): CTCVR-AUC is None. `user` None (the
    schema names no user column): GAUC is None; grouping every row into one user would silently
    report the CTR-AUC under GAUC's name. An AUC over rows of one class is None too.
    """
    conversions = None if conversion is None else int(np.count_nonzero(conversion))
    return {
        "ctr_auc": finite_or_none(auc(click, p_ctr)),
        "ctcvr_auc": None if conversion is None else finite_or_none(auc(conversion, p_ctcvr)),
        "gauc": None if user is None else finite_or_none(gauc(click, p_ctr, user)),
        "logloss": finite_or_none(logloss(click, p_ctr)),
        "rows": float(len(click)),
        **constant_predictor(int(np.count_nonzero(click)), conversions, len(click)),
    }
