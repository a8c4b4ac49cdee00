import numpy as np
import pytest

from iak_dist.metrics import auc, gauc, logloss


def brute_force_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500) + 0.3 * y, 1)  # rounding creates many ties
    assert auc(y, s) == pytest.approx(brute_force_auc(y, s), abs=1e-12)


def test_auc_extremes_and_single_class():
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auc(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.8, 0.9])) == 0.0
    assert np.isnan(auc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_gauc_weights_groups_by_size_and_skips_one_class_groups():
    y = np.array([1, 0, 0, 1, 0, 1, 1])
    s = np.array([0.9, 0.1, 0.5, 0.2, 0.3, 0.4, 0.6])
    g = np.array([7, 7, 7, 3, 3, 5, 5])  # group 5 has one class only
    expected = (3 * auc(y[:3], s[:3]) + 2 * auc(y[3:5], s[3:5])) / 5
    assert gauc(y, s, g) == pytest.approx(expected)


def loop_auc(labels, scores):
    """AUC as it was before GAUC was vectorised (float average ranks after a mergesort): a reference."""
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


def loop_gauc(labels, scores, groups):
    """The per-user loop GAUC was before it was vectorised: the reference the vectorised one must equal."""
    order = np.argsort(groups, kind="mergesort")
    g, y, s = groups[order], labels[order], scores[order]
    cuts = np.flatnonzero(np.diff(g)) + 1
    total, weight = 0.0, 0
    for yy, ss in zip(np.split(y, cuts), np.split(s, cuts), strict=True):
        if 0 < yy.sum() < len(yy):
            total += loop_auc(yy, ss) * len(yy)
            weight += len(yy)
    return total / weight if weight else float("nan")


@pytest.mark.parametrize("seed, score_dtype, id_spread", [
    (0, np.float32, 7919), (1, np.float32, 7919), (2, np.float64, 7919), (3, np.float32, 10**12), (4, np.int8, 1)])
def test_vectorised_gauc_equals_the_per_user_loop(seed, score_dtype, id_spread):
    """Many ties (scores on a coarse grid, -0.0 and 0.0 among them), users of one class only, users of
    one row, unsorted ids; user ids close together (packed as offsets) and spread wide (ranked), float32
    scores (packed as bits) and others (ranked)."""
    rng = np.random.default_rng(seed)
    n = 20_000
    users = rng.permutation(4000)[rng.integers(0, 4000, n)].astype(np.int64) * id_spread - 10**6  # negative too
    y = (rng.random(n) < rng.choice([0.0, 0.3, 1.0], 4000)[users % 4000]).astype(np.float32)
    s = (np.round(rng.random(n) + 0.2 * y, 1) * (10 if score_dtype == np.int8 else 1) - 0.5).astype(score_dtype)
    s[rng.random(n) < 0.05] = -0.0
    assert len(np.unique(s)) <= 15
    want = loop_gauc(y, s, users)
    assert gauc(y, s, users) == pytest.approx(want, abs=1e-12, rel=0)
    assert auc(y, s) == loop_auc(y, s)
    shuffled = rng.permutation(n)  # row order does not matter (rows come gathered in rank order)
    assert gauc(y[shuffled], s[shuffled], users[shuffled]) == gauc(y, s, users)


def test_gauc_without_any_two_class_group_is_nan():
    assert np.isnan(gauc(np.array([1, 1, 0]), np.array([0.1, 0.2, 0.3]), np.array([1, 1, 2])))
    assert np.isnan(gauc(np.array([]), np.array([]), np.array([], dtype=np.int64)))


def test_metrics_do_not_depend_on_row_order():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 5000).astype(np.int8)
    p = rng.random(5000).astype(np.float32)
    perm = rng.permutation(5000)
    assert auc(y[perm], p[perm]) == auc(y, p) and logloss(y[perm], p[perm]) == logloss(y, p)


def test_logloss_closed_form():
    assert logloss(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2)


def test_unavailable_metrics_are_none_not_nan_or_a_stand_in():
    """No user column: GAUC is None (one all-rows group would repeat the CTR-AUC under GAUC's name);
    no conversion label: CTCVR-AUC is None; one class only: the AUC is None, not NaN."""
    from iak_dist.metrics import format_metric, ranking_metrics

    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 2, 200), rng.random(200)
    full = ranking_metrics(y, y, p, p, rng.integers(0, 5, 200))
    assert all(isinstance(full[k], float) for k in ("ctr_auc", "ctcvr_auc", "gauc", "logloss"))
    bare = ranking_metrics(y, None, p, p, None)
    assert bare["gauc"] is None and bare["ctcvr_auc"] is None and bare["ctr_auc"] == full["ctr_auc"]
    one_class = ranking_metrics(np.ones(10), np.ones(10), p[:10], p[:10], np.arange(10))
    assert one_class["ctr_auc"] is None and one_class["ctcvr_auc"] is None and one_class["gauc"] is None
    assert format_metric(None) == format_metric(float("nan")) == "n/a" and format_metric(0.5) == "0.5000"


def test_streamed_metrics_fed_in_score_ranges_equal_the_in_memory_ones():
    """Rows fed in ascending score ranges (a call each, its rows shuffled), per domain and overall: AUC
    equal to the bit, LogLoss and GAUC (whole users a call) to rounding."""
    from iak_dist.metrics import StreamingAuc, StreamingGauc, StreamingLogLoss, group_aucs, score_codes, score_values

    rng = np.random.default_rng(5)
    n = 4000
    s = np.round(rng.random(n), 2).astype(np.float32)
    s[:300] = -0.0
    s[300:400] = 0.0  # ties -0.0
    y = (rng.random(n) < 0.2 + 0.5 * s).astype(np.int8)
    d = rng.integers(0, 3, n)
    users = rng.integers(0, 500, n)
    codes = score_codes(s)
    assert (score_values(codes) == s).all()
    aucs, losses, gaucs = StreamingAuc(4), StreamingLogLoss(4), StreamingGauc(4)
    cut = np.searchsorted(np.unique(codes)[::9], codes, side="right")
    for k in np.unique(cut):
        part = rng.permutation(np.flatnonzero(cut == k))
        slot, one = np.r_[d[part], np.full(len(part), 3)], np.ones(2 * len(part), dtype=np.int64)
        aucs.add(slot, np.r_[codes[part], codes[part]], np.r_[y[part], y[part]], one)
        losses.add(slot, np.r_[y[part], y[part]], np.r_[s[part], s[part]], one)
    for k in range(5):  # users by residue: complete users per call
        part = np.flatnonzero(users % 5 == k)
        group_auc, size, _ = group_aucs(y[part], s[part], users[part])
        gaucs.add(np.full(len(size), 3), group_auc, size)
    for slot, rows in [(0, d == 0), (1, d == 1), (2, d == 2), (3, np.ones(n, dtype=bool))]:
        assert aucs.result(slot) == auc(y[rows], s[rows]) and aucs.rows(slot) == rows.sum()
        assert losses.result(slot) == pytest.approx(logloss(y[rows], s[rows]), rel=1e-13, abs=0)
    assert gaucs.result(3) == pytest.approx(gauc(y, s, users), rel=1e-13, abs=0)
    assert np.isnan(StreamingAuc(1).result(0)) and np.isnan(StreamingGauc(1).result(0))


def test_a_group_streamed_in_score_ranges_adds_the_same_auc_bits_as_its_group_aucs_part():
    """One user's rows fed in score ranges (`StreamingGauc.add_streamed`) count the AUC `group_aucs` gives,
    bit for bit, per domain slot and overall; slots of one class are left out."""
    from iak_dist.metrics import StreamingAuc, StreamingGauc, group_aucs, score_codes

    rng = np.random.default_rng(9)
    n = 900
    s = np.round(rng.random(n), 2).astype(np.float32)
    y = (rng.random(n) < 0.3).astype(np.int8)
    d = rng.integers(0, 3, n)
    y[d == 2] = 1  # slot 2: one class
    codes = score_codes(s)
    user = StreamingAuc(4)
    cut = np.searchsorted(np.unique(codes)[::7], codes, side="right")
    for k in np.unique(cut):
        part = np.flatnonzero(cut == k)
        user.add(np.r_[d[part], np.full(len(part), 3)], np.r_[codes[part], codes[part]], np.r_[y[part], y[part]],
                 np.ones(2 * len(part), dtype=np.int64))
    streamed, whole = StreamingGauc(4), StreamingGauc(4)
    streamed.add_streamed(user)
    for slot, rows in [(0, d == 0), (1, d == 1), (2, d == 2), (3, np.ones(n, dtype=bool))]:
        group_auc, size, _ = group_aucs(y[rows], s[rows], np.zeros(rows.sum(), dtype=np.int64))
        whole.add(np.full(len(size), slot), group_auc, size)
    assert (streamed.weighted == whole.weighted).all() and (streamed.weight == whole.weight).all()
    assert streamed.weight[2] == 0 and np.isnan(streamed.result(2)) and streamed.weight[3] == n
