import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from iak_dist.data.parquet import ParquetReader
from iak_dist.data.schema import Schema, SparseFeature, hash_ids


def test_hash_ids_spreads_any_int64_into_the_table():
    ids = np.array([0, 1, -1, 2**63 - 1, -(2**63), 123456789012345], dtype=np.int64)
    out = hash_ids(ids, 1000)
    assert out.dtype == np.int64 and (out >= 0).all() and (out < 1000).all()
    np.testing.assert_array_equal(out, hash_ids(ids.copy(), 1000))
    dense_range = hash_ids(np.arange(100_000), 1000)
    counts = np.bincount(dense_range, minlength=1000)
    assert counts.min() > 50 and counts.max() < 150  # close to uniform (mean 100)


def test_reader_builds_keyed_jagged_tensor_with_multi_hot_lengths(tmp_path):
    schema = Schema(sparse=[SparseFeature("u", 10), SparseFeature("tags", 20, multi_hot=True)],
                    domains=["a", "b"], dense=["x"], user="u")
    table = pa.table({
        "label_click": pa.array([1, 0, 1], pa.int8()), "label_conversion": pa.array([1, 0, 0], pa.int8()),
        "domain": ["b", "a", "b"], "u": pa.array([5, 6, 7], pa.int64()),
        "tags": pa.array([[1, 2], [], [3, 4, 5]], pa.list_(pa.int64())), "x": pa.array([0.5, 1.5, 2.5], pa.float32()),
    })
    pq.write_table(table, tmp_path / "f.parquet")
    batch = next(ParquetReader(tmp_path / "f.parquet", schema, batch_size=3).epoch(0))
    assert batch.sparse.keys() == ["u", "tags"]
    tags = batch.sparse["tags"]
    assert tags.lengths().tolist() == [2, 0, 3]
    assert tags.values().tolist() == hash_ids(np.array([1, 2, 3, 4, 5]), 20).tolist()
    assert batch.sparse["u"].values().tolist() == hash_ids(np.array([5, 6, 7]), 10).tolist()
    assert batch.domain.tolist() == [1, 0, 1]
    assert batch.click.tolist() == [1, 0, 1] and batch.conversion.tolist() == [1, 0, 0]
    assert batch.dense[:, 0].tolist() == [0.5, 1.5, 2.5] and batch.user.tolist() == [5, 6, 7]


def test_ranks_read_disjoint_row_groups_covering_the_file(synth_dir):
    schema = Schema.load(synth_dir / "schema.yaml")
    path = synth_dir / "pretrain.parquet"
    seen = []
    for rank in range(2):
        reader = ParquetReader(path, schema, 100, rank=rank, world_size=2, shuffle=True, seed=3)
        users = np.concatenate([b.user.numpy() for b in reader.epoch(0)])
        assert len(users) == reader.num_rows
        seen.append(users)
    all_users = pq.read_table(path, columns=["user_id"]).column("user_id").to_numpy()
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.sort(all_users))


def test_shuffle_is_deterministic_per_epoch_and_skip_resumes(synth_dir):
    schema = Schema.load(synth_dir / "schema.yaml")
    reader = ParquetReader(synth_dir / "pretrain.parquet", schema, 128, shuffle=True, seed=5, drop_last=True)
    first = [b.user.numpy() for b in reader.epoch(0)]
    again = [b.user.numpy() for b in reader.epoch(0)]
    other = [b.user.numpy() for b in reader.epoch(1)]
    resumed = [b.user.numpy() for b in reader.epoch(0, skip_batches=3)]
    assert all((a == b).all() for a, b in zip(first, again, strict=True))
    assert not all((a == b).all() for a, b in zip(first, other, strict=True))
    assert all((a == b).all() for a, b in zip(first[3:], resumed, strict=True))


def test_movielens_100k_impressions_match_the_published_counts():
    from iak_dist.config import DataConfig
    from iak_dist.data.movielens import build_impressions, fetch_raw

    table, schema = build_impressions(fetch_raw(), DataConfig(domain="age", negatives_per_positive=1))
    click = table.column("label_click").to_numpy()
    conversion = table.column("label_conversion").to_numpy()
    assert click.sum() == 100_000  # every rating is a click
    assert conversion.sum() == 55_375  # ratings of 4 or 5 in ML-100K
    assert ((conversion == 1) <= (click == 1)).all()
    assert 99_000 < (click == 0).sum() <= 100_000  # one sampled negative per rating (a few clash and are dropped)
    assert schema.domains == ["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]


def test_split_by_user_time_keeps_each_users_latest_ratings_for_test(tmp_path):
    from iak_dist.config import DataConfig
    from iak_dist.data.splits import split_by_time

    user = np.array([1, 1, 1, 1, 2, 2, 2, 2])
    when = np.array([4, 1, 3, 2, 10, 40, 30, 20])
    split = split_by_time(user, when, [0.25, 0.25, 0.25, 0.25])
    assert split.tolist() == [3, 0, 2, 1, 0, 3, 2, 1]
    assert DataConfig().split_within == "user"


def movielens_like(rng: np.random.Generator, regular: int, bursty: int) -> pa.Table:
    """Ratings with two popularity-sampled negatives each at the same user and timestamp (as movielens.py).

    The first `regular` users rate at 100 distinct times (their four time quantiles fall between
    ratings, so each split gets exactly its fraction); the `bursty` others rate several films in the
    same second, as MovieLens users do.
    """
    users, when = [], []
    for u in range(regular + bursty):
        gaps = rng.integers(1, 5000, 100) if u < regular else rng.integers(1, 5000, 40) * (rng.random(40) < 0.6)
        users.append(np.full(len(gaps), u))
        when.append(880_000_000 + rng.integers(0, 10**6) + np.cumsum(gaps))
    pos_user, pos_when = np.concatenate(users), np.concatenate(when)
    user, ts = np.repeat(pos_user, 3), np.repeat(pos_when, 3)
    order = rng.permutation(len(user))  # rows in no particular order, as a real table
    user, ts = user[order], ts[order]
    click = (np.arange(len(order)) % 3 == 0)[order]
    return pa.table({
        "label_click": pa.array(click.astype(np.int8)), "label_conversion": pa.array(np.zeros(len(user), np.int8)),
        "domain": pa.array(np.array(["young", "mid", "old"])[user % 3]),  # a user attribute (age group)
        "user_id": pa.array(user.astype(np.int64)), "item_id": pa.array(rng.integers(0, 500, len(user))),
        "timestamp": pa.array(ts.astype(np.int64)),
    })


@pytest.mark.parametrize("split_within", ["user", "domain"])
def test_the_valid_split_lies_between_finetune_and_test_and_never_overlaps_test(tmp_path, split_within):
    from iak_dist.config import DataConfig
    from iak_dist.data.source import SPLITS
    from iak_dist.data.splits import write_splits

    regular, bursty = 24, 12
    table = movielens_like(np.random.default_rng(3), regular, bursty)
    schema = Schema(sparse=[SparseFeature("user_id", 64), SparseFeature("item_id", 512)],
                    domains=["young", "mid", "old"])
    cfg = DataConfig(split_fractions=[0.65, 0.15, 0.05, 0.15], split_within=split_within, row_group_size=1000)
    stats = write_splits(table, schema, cfg, tmp_path, time_column="timestamp")
    assert SPLITS == ("pretrain", "finetune", "valid", "test") and list(stats["splits"]) == list(SPLITS)
    parts = {s: pq.read_table(tmp_path / f"{s}.parquet").to_pandas() for s in SPLITS}
    assert [len(parts[s]) for s in SPLITS] == [stats["splits"][s]["rows"] for s in SPLITS]
    assert sum(len(p) for p in parts.values()) == table.num_rows
    assert len(parts["valid"]) > 0
    for earlier, later in zip(SPLITS, SPLITS[1:], strict=False):  # per user: strictly earlier in time
        last = parts[earlier].groupby("user_id")["timestamp"].max()
        first = parts[later].groupby("user_id")["timestamp"].min()
        both = last.index.intersection(first.index)
        assert len(both) > 0 and (last[both] < first[both]).all(), (earlier, later)
    keys = {s: set(zip(parts[s].user_id, parts[s].item_id, parts[s].timestamp, strict=True)) for s in SPLITS}
    assert not keys["valid"] & keys["test"]
    if split_within == "user":  # the four fractions, exactly, for users whose quantiles fall between ratings
        for s, fraction in zip(SPLITS, cfg.split_fractions, strict=True):
            rows = parts[s].user_id.value_counts().reindex(range(regular), fill_value=0)
            assert (rows == round(fraction * 300)).all(), s


def test_a_folder_with_three_splits_is_not_prepared(tmp_path, synth_dir):
    import shutil

    from iak_dist.data.prepare import is_prepared

    old = tmp_path / "old"
    old.mkdir()
    for name in ("schema.yaml", "pretrain.parquet", "finetune.parquet", "test.parquet"):  # before `valid`
        shutil.copy(synth_dir / name, old)
    assert is_prepared(synth_dir) and not is_prepared(old)
    shutil.copy(synth_dir / "valid.parquet", old)
    assert is_prepared(old)


@pytest.mark.parametrize("shift", [0.0, 2.0])
def test_synthetic_domain_shift_controls_how_much_domains_differ(shift):
    from iak_dist.config import DataConfig
    from iak_dist.data.synth import build_synthetic

    table, schema = build_synthetic(DataConfig(synth_rows=40_000, synth_domains=3, synth_domain_shift=shift))
    click = table.column("label_click").to_numpy()
    domain = np.array(table.column("domain").to_pylist())
    rates = [click[domain == d].mean() for d in schema.domains]
    spread = max(rates) - min(rates)
    assert (spread < 0.03) if shift == 0 else (spread > 0.05)
    ids = table.column("user_id").to_numpy()
    assert ids.max() > 2**50  # raw IDs scattered over a huge space
