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
    split = split_by_time(user, when, [0.5, 0.25, 0.25])
    assert split.tolist() == [2, 0, 1, 0, 0, 2, 1, 0]
    assert DataConfig().split_within == "user"


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
