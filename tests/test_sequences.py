"""Behaviour sequences: `hist_items` holds each impression's earlier items (no leakage), and the schema keys."""

from __future__ import annotations

import bisect
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from iak_dist.errors import UserError

LENGTH = 5
TODAYS_COLUMNS = ["label_click", "label_conversion", "domain", "user_id", "item_id", "genres", "gender", "occupation",
                  "age_group", "zip_region", "release_year", "user_age", "item_year", "timestamp"]


@pytest.fixture(scope="module")
def movielens():
    """The raw ratings, and the impressions without and with a history of `LENGTH`."""
    from iak_dist.config import DataConfig
    from iak_dist.data.movielens import build_impressions, fetch_raw

    raw = fetch_raw()
    return raw, build_impressions(raw, DataConfig()), build_impressions(raw, DataConfig(history_length=LENGTH))


def test_histories_of_hand_made_ratings():
    """Ties in time are ordered by item and are not each other's history; an unknown user has none."""
    from iak_dist.data.movielens import histories

    rated = np.array([[1, 10, 5], [1, 10, 3], [1, 20, 7], [1, 30, 1], [2, 5, 9]])
    rows = np.array([[1, 10], [1, 20], [1, 25], [1, 30], [1, 31], [2, 5], [2, 6], [3, 100], [0, 50]])
    got = histories(rated[:, 0], rated[:, 1], rated[:, 2], rows[:, 0], rows[:, 1], length=2).to_pylist()
    assert got == [[], [3, 5], [5, 7], [5, 7], [7, 1], [], [9], [], []]
    longer = histories(rated[:, 0], rated[:, 1], rated[:, 2], rows[:, 0], rows[:, 1], length=10).to_pylist()
    assert longer[4] == [3, 5, 7, 1] and longer[2] == [3, 5, 7]


def test_each_history_is_the_users_earlier_ratings_recomputed_from_the_raw_file(movielens):
    raw, _, (table, _) = movielens
    lines = [line.split("\t") for line in raw["inter"].splitlines()[1:] if line]
    rated_at = {(int(u), int(i)): int(float(t)) for u, i, _, t in lines}
    by_user: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for (user, item), when in rated_at.items():
        by_user[user].append((when, item))
    for ratings in by_user.values():
        ratings.sort()
    times = {user: [when for when, _ in ratings] for user, ratings in by_user.items()}

    users, items, whens, clicks = (table.column(c).to_pylist() for c in ("user_id", "item_id", "timestamp",
                                                                          "label_click"))
    history = table.column("hist_items").to_pylist()
    lengths, first_of_time = [], {}
    for user, item, when, click, hist in zip(users, items, whens, clicks, history, strict=True):
        earlier = bisect.bisect_left(times[user], when)  # ratings strictly before `when`
        assert hist == [i for _, i in by_user[user][max(0, earlier - LENGTH):earlier]]
        hist_times = [rated_at[user, h] for h in hist]
        assert (not hist_times or hist_times[-1] < when) and item not in hist  # no leakage
        assert hist_times == sorted(hist_times) and len(hist) == min(LENGTH, earlier)  # most recent last
        lengths.append(len(hist))
        if click:
            first_of_time[user, when] = hist
    for user, when, hist in zip(users, whens, history, strict=True):
        assert hist == first_of_time[user, when]  # a negative (and a rating in the same second) has its positive's
    assert min(lengths) == 0 and max(lengths) == LENGTH  # first impressions of a user have none


def test_no_history_writes_exactly_the_columns_and_schema_of_before(movielens, tmp_path):
    from iak_dist.data.schema import SparseFeature

    _, (plain, plain_schema), (table, schema) = movielens
    assert plain.column_names == TODAYS_COLUMNS
    assert table.drop_columns(["hist_items"]).equals(plain) and table.column_names[-1] == "hist_items"
    assert table.schema.field("hist_items").type == pa.list_(pa.int64())
    plain_schema.save(tmp_path / "schema.yaml")
    assert all(set(f) == {"name", "table_size", "multi_hot"} for f in yaml.safe_load(
        (tmp_path / "schema.yaml").read_text())["sparse"])
    assert schema.sparse[:-1] == plain_schema.sparse
    assert schema.sparse[-1] == SparseFeature("hist_items", 16384, multi_hot=True, sequence=True, pooling="mean",
                                              shares_table="item_id", max_length=LENGTH)
    assert schema.as_dict()["sparse"][-1] == {"name": "hist_items", "table_size": 16384, "multi_hot": True,
                                              "sequence": True, "pooling": "mean", "shares_table": "item_id",
                                              "max_length": LENGTH}


def test_a_prepared_history_reads_into_a_jagged_tensor_and_empty_bags_pool_to_zeros(movielens, tmp_path):
    import torch
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from iak_dist.config import DataConfig
    from iak_dist.data.batch import arrow_to_batch
    from iak_dist.data.schema import Schema, hash_ids, position_key
    from iak_dist.data.splits import write_splits
    from iak_dist.data.validate import value_problems

    _, _, (table, schema) = movielens
    write_splits(table, schema, DataConfig(history_length=LENGTH), tmp_path, time_column="timestamp")
    assert Schema.load(tmp_path / "schema.yaml") == schema
    part = pq.read_table(tmp_path / "pretrain.parquet").slice(0, 4096)
    assert value_problems("pretrain.parquet", part, schema) == []
    hist = part.column("hist_items").to_pylist()
    batch = arrow_to_batch(part, schema)
    assert batch.sequence_lengths[:, 0].tolist() == [len(h) for h in hist] and min(map(len, hist)) == 0
    by_key = batch.sparse.to_dict()
    for p in range(LENGTH):  # right-aligned: position LENGTH - 1 holds each row's most recent item
        held = [p >= LENGTH - len(h) for h in hist]
        want = np.array([h[len(h) - LENGTH + p] for h, there in zip(hist, held, strict=True) if there], dtype=np.int64)
        position = by_key[position_key("hist_items", p)]
        assert position.lengths().tolist() == [int(there) for there in held]
        assert position.values().tolist() == hash_ids(want, 16384).tolist()  # item_id's hashing: one ID space

    flat = torch.from_numpy(hash_ids(np.array([i for h in hist for i in h], dtype=np.int64), 16384))
    bag = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="item_table", embedding_dim=4, num_embeddings=16384,
                                                            feature_names=["hist_items"], pooling=PoolingType.MEAN)])
    lengths = torch.tensor([len(h) for h in hist], dtype=torch.int32)
    pooled = bag(KeyedJaggedTensor(["hist_items"], flat, lengths=lengths))["hist_items"]
    empty = torch.tensor([len(h) == 0 for h in hist])
    assert (pooled[empty] == 0).all() and (pooled[~empty] != 0).any(dim=1).all()

    shorter = Schema.load(tmp_path / "schema.yaml")
    shorter.sparse[-1].max_length = LENGTH - 1
    row = next(r for r, h in enumerate(hist) if len(h) == LENGTH)
    assert value_problems("pretrain.parquet", part, shorter) == [
        f"pretrain.parquet: column 'hist_items' row {row}: the list holds {LENGTH} IDs, more than the schema's "
        f"max_length {LENGTH - 1}; cut the lists (a sequence: to its last {LENGTH - 1}) or raise max_length"]


def test_a_folder_prepared_with_another_history_length_is_refused(movielens, tmp_path):
    from iak_dist.config import DataConfig
    from iak_dist.data.prepare import is_prepared
    from iak_dist.data.source import SPLITS

    _, (_, plain_schema), (_, schema) = movielens
    for name, written in (("plain", plain_schema), ("hist", schema)):
        (tmp_path / name).mkdir()
        written.save(tmp_path / name / "schema.yaml")
        for split in SPLITS:
            (tmp_path / name / f"{split}.parquet").touch()
    plain, hist = tmp_path / "plain", tmp_path / "hist"
    assert is_prepared(plain, DataConfig()) and is_prepared(hist, DataConfig(history_length=LENGTH))
    assert is_prepared(hist) and is_prepared(hist, DataConfig(source="parquet"))  # a parquet source: its schema says
    for folder, had, asked in ((plain, 0, 3), (hist, LENGTH, 0), (hist, LENGTH, LENGTH + 1)):
        with pytest.raises(UserError) as refused:
            is_prepared(folder, DataConfig(history_length=asked))
        example = f" (e.g. {folder}-hist{asked})" if asked else ""
        assert str(refused.value) == (
            f"{folder}: prepared with data.history_length {had}, the config asks {asked}; set data.dir to another "
            f"folder{example}, or prepare this one again (iak-dist data prepare movielens-100k --out {folder} "
            f"--set history_length={asked}) if no run reads it")


BAD_SCHEMAS = [
    ({"sequence": True, "multi_hot": False},
     "schema: sparse feature hist: sequence: true needs multi_hot: true (a sequence is a list of IDs)"),
    ({"shares_table": "items"},
     "schema: sparse feature hist: shares_table names no other sparse feature: 'items'; features: item_id, other"),
    ({"shares_table": "hist"},
     "schema: sparse feature hist: shares_table names no other sparse feature: 'hist'; features: item_id, other"),
    ({"shares_table": "other"},
     "schema: sparse feature hist: shares_table: other itself looks up item_id's table; name the table's owner, "
     "item_id"),
    ({"table_size": 32},
     "schema: sparse feature hist: table_size 32 differs from item_id's 16; a shared table needs the same size "
     "(IDs are hashed into it)"),
    ({"max_length": 0}, "schema: sparse feature hist: max_length must be > 0 on a multi_hot feature, got 0"),
    ({"pooling": "max"}, "{path}: key sparse[2].pooling: 'max' is not one of 'sum', 'mean'"),
    ({"max_length": None}, "schema: sparse feature hist: sequence: true needs max_length (its positions: the batch "
                           "carries one lookup per position)"),
]


def test_a_feature_cannot_share_the_table_of_a_sequence():
    from iak_dist.data.schema import Schema, SparseFeature

    with pytest.raises(UserError, match=r"^schema: sparse feature again: shares_table: hist is a sequence \(looked up "
                                        r"by position\); share the table of the feature it holds IDs of$"):
        Schema(sparse=[SparseFeature("hist", 16, multi_hot=True, sequence=True, max_length=4),
                       SparseFeature("again", 16, shares_table="hist")], domains=["a"])


@pytest.mark.parametrize(("change", "message"), BAD_SCHEMAS)
def test_bad_sequence_keys_are_one_line_errors(tmp_path, change, message):
    from iak_dist.data.schema import Schema

    hist = {"name": "hist", "table_size": 16, "multi_hot": True, "sequence": True, "pooling": "mean",
            "shares_table": "item_id", "max_length": 4}
    sparse = [{"name": "item_id", "table_size": 16}, {"name": "other", "table_size": 16, "shares_table": "item_id"},
              {**hist, **change}]
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump({"sparse": sparse, "domains": ["a"]}))
    with pytest.raises(UserError) as bad:
        Schema.load(path)
    assert str(bad.value) == message.format(path=path)


def test_history_length_is_checked_with_the_config():
    from iak_dist.config import load_config

    assert load_config(None, ["data.history_length=20"]).data.history_length == 20
    with pytest.raises(UserError, match=r"data.history_length: must be >= 0, got -1$"):
        load_config(None, ["data.history_length=-1"])
    with pytest.raises(UserError) as other:
        load_config(None, ["data.source=synth", "data.history_length=3"])
    assert str(other.value).endswith("data.history_length: only movielens-100k data is prepared with a history, "
                                     "got source synth (a parquet source lists its sequence features in schema.yaml)")


def history_schema():
    from iak_dist.data.schema import Schema, SparseFeature

    return Schema(sparse=[SparseFeature("user_id", 32), SparseFeature("item_id", 64),
                          SparseFeature("hist_items", 64, multi_hot=True, sequence=True, pooling="mean",
                                        shares_table="item_id", max_length=4)], domains=["a"], dense=[],
                  conversion=None)


def history_rows(history):
    return pa.table({"label_click": pa.array([0] * len(history), pa.int8()), "domain": ["a"] * len(history),
                     "user_id": pa.array(range(len(history)), pa.int64()),
                     "item_id": pa.array([5, 9, 17, 3][:len(history)], pa.int64()),
                     "hist_items": pa.array(history, pa.list_(pa.int64()))})


def test_a_history_shares_its_items_table_and_pools_by_mean():
    """One table for item_id and hist_items' positions (a history item and the target item have one
    embedding); the pooled history is the mean of its items' rows, an empty history pools to zeros."""
    import torch
    from torchrec.modules.embedding_configs import PoolingType

    from iak_dist.config import ModelConfig
    from iak_dist.data.batch import arrow_to_batch
    from iak_dist.data.schema import hash_ids
    from iak_dist.model.backbone import Backbone

    torch.manual_seed(0)
    schema = history_schema()
    backbone = Backbone(schema, ModelConfig(embedding_dim=4, tower=[8]))
    positions = [f"hist_items#{p}" for p in range(4)]
    assert [(t.name, t.feature_names, t.pooling) for t in backbone.table_configs] == [
        ("t_user_id", ["user_id"], PoolingType.SUM), ("t_item_id", ["item_id", *positions], PoolingType.SUM)]
    history = [[1, 2, 60], [], [33], [7, 8, 9, 10, 11]]
    batch = arrow_to_batch(history_rows(history), schema)
    assert batch.sequence_lengths[:, 0].tolist() == [3, 0, 1, 4]
    with torch.no_grad():
        pooled = backbone.embed(batch.sparse, batch.sequence_lengths)
    table = backbone.embeddings.embedding_bags["t_item_id"].weight.detach()

    def rows(ids):
        return table[torch.from_numpy(hash_ids(np.array(ids, dtype=np.int64), 64))]

    torch.testing.assert_close(pooled[:, 1], rows([5, 9, 17, 3]))
    torch.testing.assert_close(pooled[0, 2], rows([1, 2, 60]).mean(0))
    assert torch.equal(pooled[1, 2], torch.zeros(4))
    torch.testing.assert_close(pooled[2, 2], rows([33])[0])
    torch.testing.assert_close(pooled[3, 2], rows([8, 9, 10, 11]).mean(0))  # the last max_length items


def test_the_transformer_reads_only_held_positions_causally_and_gives_zeros_without_history():
    import torch

    from iak_dist.config import ModelConfig
    from iak_dist.data.batch import arrow_to_batch
    from iak_dist.model.backbone import Backbone
    from iak_dist.model.sequence import CausalBlock, valid_positions

    torch.manual_seed(0)
    backbone = Backbone(history_schema(), ModelConfig(embedding_dim=4, tower=[8], sequence_encoder="transformer",
                                                      sequence_heads=2))
    encoder = backbone.sequence_encoders["hist_items"]
    batch = arrow_to_batch(history_rows([[1, 2, 60], [], [33], [7, 8, 9, 10, 11]]), history_schema())
    vectors = backbone.embed(batch.sparse, batch.sequence_lengths)
    assert torch.isfinite(vectors).all() and torch.equal(vectors[1, 2], torch.zeros(4))
    vectors.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters() if p.grad is not None)

    # what the padded positions hold does not matter; each row is scored on its own
    items, target = torch.randn(3, 4, 4), torch.randn(3, 4)
    lengths = torch.tensor([2, 0, 4])
    noisy = items.clone()
    noisy[0, :2] = torch.randn(2, 4) * 100  # row 0 holds positions 2, 3 only
    with torch.no_grad():
        clean, dirty = encoder(items, lengths, target), encoder(noisy, lengths, target)
        alone = encoder(items[2:], lengths[2:], target[2:])
    torch.testing.assert_close(clean, dirty)
    torch.testing.assert_close(clean[2:], alone)
    assert torch.equal(clean[1], torch.zeros(4)) and not torch.equal(clean[0], torch.zeros(4))

    # causal: a position's state reads itself and the older positions only
    block = CausalBlock(4, 2)
    mask = torch.zeros(1, 1, 4, 4).masked_fill(~(encoder.causal & valid_positions(torch.tensor([4]), 4)), -1e9)
    later = items[2:].clone()
    later[0, 3] += 1.0
    with torch.no_grad():
        before, after = block(items[2:], mask), block(later, mask)
    torch.testing.assert_close(before[0, :3], after[0, :3])
    assert not torch.allclose(before[0, 3], after[0, 3])


def test_features_that_share_a_table_but_pool_differently_are_refused():
    from iak_dist.config import ModelConfig
    from iak_dist.data.schema import Schema, SparseFeature
    from iak_dist.model.backbone import Backbone

    schema = Schema(sparse=[SparseFeature("tags", 64, multi_hot=True),
                            SparseFeature("hist_tags", 64, multi_hot=True, pooling="mean", shares_table="tags")],
                    domains=["a"])
    with pytest.raises(UserError, match=r"^schema: features tags, hist_tags share table t_tags but pool by mean and "
                                        r"sum; TorchRec pools per table: give them one pooling$"):
        Backbone(schema, ModelConfig(embedding_dim=4, tower=[8]))


@pytest.mark.parametrize("encoder", ["pool", "transformer"])
def test_a_served_history_scores_as_the_trained_model_does(encoder, small_cfg, ctx, tmp_path):
    """A backbone with a history on the item table, pre-trained through the pipelined loop (TorchRec's
    train pipeline traces it), exported: the `Predictor`'s scores are the sharded model's."""
    import dataclasses

    from served import served_and_trained

    from iak_dist.config import DataConfig
    from iak_dist.data.prepare import prepare

    data = prepare(DataConfig(history_length=LENGTH, dir=str(tmp_path / "data")))
    got = served_and_trained(data, dataclasses.replace(small_cfg.model, sequence_encoder=encoder), small_cfg, ctx,
                             tmp_path)
    run, schema, rows, predictor = got.run, got.schema, got.rows, got.predictor
    np.testing.assert_allclose(predictor.score(rows)["p_ctr"], got.trained, rtol=1e-6, atol=1e-7)
    assert not any(by_mean for _, _, by_mean in predictor.lookups)  # history positions: bags of one (encoder pools)

    # as training's data check: a request whose list is longer than the history the backbone reads is refused
    from iak_dist.serving.predictor import RequestError

    longer = rows.slice(0, 2).to_pylist()
    longer[1]["hist_items"] = list(range(LENGTH + 1))
    with pytest.raises(RequestError, match=rf"^column 'hist_items' row 1: the list holds {LENGTH + 1} IDs, more than "
                                           rf"the schema's max_length {LENGTH}$"):
        predictor.score(longer)

    # data whose history has another length than the backbone's is refused before anything is read
    if encoder == "pool":
        from iak_dist.distributed.checkpoint import read_backbone_meta
        from iak_dist.phases.common import check_schema_matches

        other = dataclasses.replace(schema, sparse=[dataclasses.replace(f, max_length=LENGTH + 2) if f.sequence else f
                                                    for f in schema.sparse])
        with pytest.raises(UserError, match=r"the data's sparse features differ from the backbone's: hist_items: "):
            check_schema_matches(other, read_backbone_meta(run / "seed0" / "backbone"), data)


def test_a_backbone_from_before_the_sequence_keys_matches_the_default_config(backbone_dir, small_cfg, tmp_path):
    """backbone.json written before model.sequence_* existed: the keys count as their defaults; a config
    that asks for another encoder is refused naming the key."""
    import dataclasses
    import json
    import shutil

    from iak_dist.phases.common import check_model_matches

    old = tmp_path / "backbone"
    shutil.copytree(backbone_dir, old)
    meta = json.loads((old / "backbone.json").read_text())
    meta["model"] = {k: v for k, v in meta["model"].items() if not k.startswith("sequence_")}
    (old / "backbone.json").write_text(json.dumps(meta))
    check_model_matches(small_cfg.model, old)
    with pytest.raises(UserError, match=r"^model.sequence_encoder: the config says 'transformer', the backbone in "
                                        r".* was pre-trained with 'pool'; use the backbone's value"):
        check_model_matches(dataclasses.replace(small_cfg.model, sequence_encoder="transformer"), old)
