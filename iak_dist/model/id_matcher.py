"""IDP-style ID matcher (issue 14 item 5): score items pre-training never saw through a pre-trained-like
ID embedding predicted from their text.

An item that no pre-train row holds keeps the ID row it was initialised with: the ranker reads noise
for it. The matcher fits a linear map from an item's text vector (`data.item_text`) to its pre-trained
ID embedding on the items pre-training did see (ridge regression in closed form, `fit_ridge`), and
writes the predicted row into the item table for the items it did not see. Everything else in the
backbone stays as it was.

It works on the item table's slots, as the model does: items hashed to one slot share their ID row,
so a slot's text is the mean of its items' vectors (as the text table `t_item_text` holds it), a slot is
warm when a pre-train row holds one of its items, and the slots matched are those of the items with text
that no pre-train row holds (with `data.cold_items`: the cold items, plus any item the split never
pre-trains).

Nothing is read whole: item_text.parquet is streamed three times (item IDs only, to find the slots several
items share; then every vector, into the fit's sums `RidgeSums`; then the cold items' vectors, mapped and
written), the ID rows of warm slots are read one at a time, and what is held beyond one batch is two
flags per table slot, the fit's sums, and a float64 text sum per slot that several items share (few
where the table is much larger than the catalogue, as tables of hashed IDs are sized).

How it is applied, so that it is verifiable: `match_items(BACKBONE, DATA, OUT)` (command line:
`iak-dist match-items BACKBONE --data DIR --out NEW_BACKBONE`) writes a new backbone
folder: the source's files, with the matched rows patched in place in the item table's shard files
(streamed: one row at a time, no table is read whole), each patched file's hash and the layout hash
(`weights`) recomputed, and `backbone.json` recording under `id_matcher` what was matched: the
source's weights hash, the data folder, the ridge, the warm and matched slots and the fit's R². An
adapter is stamped with the backbone's weights hash, so adapters are fine-tuned on the new backbone
(`none` needs none): nothing trained on the source is scored on it silently.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from iak_dist.errors import UserError

ITEM_FEATURE = "item_id"
ITEM_TABLE = f"embeddings.embedding_bags.t_{ITEM_FEATURE}.weight"
"""The item table's tensor in an exported backbone (`backbone.json`'s layout)."""


class RidgeSums:
    """The sufficient statistics of a ridge fit of targets [n, D] on features [n, F], added a batch at a time
    (float64): the count, the sums, and the feature-feature, feature-target and target-target products."""

    def __init__(self, features: int, targets: int) -> None:
        self.n = 0
        self.sx, self.sy = np.zeros(features), np.zeros(targets)
        self.sxx, self.sxy = np.zeros((features, features)), np.zeros((features, targets))
        self.syy = 0.0

    def add(self, features: np.ndarray, targets: np.ndarray) -> None:
        x, y = np.asarray(features, np.float64), np.asarray(targets, np.float64)
        self.n += len(x)
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += x.T @ x
        self.sxy += x.T @ y
        self.syy += float((y * y).sum())

    def solve(self, ridge: float) -> tuple[np.ndarray, np.ndarray]:
        """`(W [F, D], b [D])` minimising `|features W + b - targets|^2 + ridge |W|^2` (the bias not penalised).

        Closed form on the centred sums: `W = (Cxx + ridge I)^-1 Cxy`, `b = mean(y) - mean(x) W`, with
        `Cxx = Sxx - n mx mx^T`, `Cxy = Sxy - n mx my^T`, in float64 (solved, not inverted). `ridge` 0 is
        least squares (needs Cxx invertible).
        """
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.sxx - self.n * np.outer(mx, mx)
        cxy = self.sxy - self.n * np.outer(mx, my)
        weight = np.linalg.solve(cxx + ridge * np.eye(len(mx)), cxy)
        return weight, my - mx @ weight

    def r_squared(self, weight: np.ndarray, bias: np.ndarray) -> float:
        """1 - residual / total sum of squares of `features W + b` over every coordinate (the targets' own
        mean per column), from the sums alone."""
        cross = float((weight * self.sxy).sum() + bias @ self.sy)  # sum of <prediction, target>
        square = float((weight * (self.sxx @ weight)).sum() + 2 * bias @ (self.sx @ weight) + self.n * bias @ bias)
        residual = self.syy - 2 * cross + square
        total = self.syy - float(self.sy @ self.sy) / self.n
        return 1.0 - residual / total if total > 0 else float("nan")


def fit_ridge(features: np.ndarray, targets: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """`(W, b)` of the ridge fit of `targets` on `features` (`RidgeSums.solve` of one batch)."""
    sums = RidgeSums(features.shape[1], targets.shape[1])
    sums.add(features, targets)
    return sums.solve(ridge)


def warm_slot_mask(data_dir: str | Path, table_size: int) -> np.ndarray:
    """bool [table_size]: the item table slots the pre-train split's rows hold, read part by part (item_id only)."""
    from iak_dist.data.schema import Schema, hash_ids
    from iak_dist.data.source import Split

    split = Split.open(data_dir, "pretrain", Schema.load(Path(data_dir) / "schema.yaml"))
    seen = np.zeros(table_size, dtype=bool)
    try:
        for part in split.parts:
            seen[hash_ids(split.read(part, columns=[ITEM_FEATURE]).column(0).to_numpy(), table_size)] = True
    finally:
        split.close()
    return seen


def shared_slot_mask(file: pq.ParquetFile, table_size: int) -> np.ndarray:
    """bool [table_size]: the slots two or more items of item_text.parquet (`file`) hash to (IDs read only)."""
    from iak_dist.data.schema import hash_ids

    once, shared = np.zeros(table_size, dtype=bool), np.zeros(table_size, dtype=bool)
    for batch in file.iter_batches(columns=["item_id"]):
        slots, counts = np.unique(hash_ids(batch.column(0).to_numpy(), table_size), return_counts=True)
        shared[slots[(counts > 1) | once[slots]]] = True
        once[slots] = True
    return shared


class _SharedSlots:
    """The text of the slots several items share (`shared_slot_mask`), summed as the batches go by: one
    float64 row per shared slot (what the table's rows there will be the mean of)."""

    def __init__(self, shared: np.ndarray, width: int) -> None:
        self.slots = np.flatnonzero(shared)  # ascending
        self.sums = np.zeros((len(self.slots), width))
        self.counts = np.zeros(len(self.slots))

    def add(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        """Add the vectors of items whose slots are shared ones."""
        at = np.searchsorted(self.slots, slots)
        np.add.at(self.sums, at, vectors)
        np.add.at(self.counts, at, 1.0)

    def means(self, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slots [S] ascending, mean texts [S, T]) of the shared slots where `keep[slot]`."""
        mine = keep[self.slots]
        return self.slots[mine], self.sums[mine] / self.counts[mine, None]


def match_items(backbone_dir: str | Path, data_dir: str | Path, out_dir: str | Path, ridge: float = 1.0) -> dict:
    """Write `out_dir`: the backbone of `backbone_dir` with the ID rows of the items pre-training never saw
    replaced by the ridge map of their text (fitted on the warm items). Returns the `id_matcher` record."""
    import torch

    from iak_dist.data.item_text import TEXT_DIM, item_text_batches, open_item_text
    from iak_dist.data.schema import Schema, hash_ids
    from iak_dist.data.source import Split
    from iak_dist.distributed.checkpoint import backbone_weights, file_hash, layout_hash, verify_backbone
    from iak_dist.io import atomic_write_json

    backbone_dir, data_dir, out_dir = Path(backbone_dir), Path(data_dir), Path(out_dir)
    meta = verify_backbone(backbone_dir)  # every source file against its hash before anything is copied
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: not empty; give --out a new folder (the matched backbone is written whole)")
    layout = meta.get("layout")
    if layout is None or ITEM_TABLE not in layout["tensors"]:
        raise UserError(f"{backbone_dir}: no {ITEM_TABLE} in its layout; the matcher needs a backbone exported "
                        f"with an {ITEM_FEATURE} table (run pre-training again)")
    table = layout["tensors"][ITEM_TABLE]
    table_size, width = table["shape"]
    dtype = {"F32": np.float32, "F16": np.float16}.get(table["dtype"])
    if dtype is None:
        raise UserError(f"{backbone_dir}: item table of dtype {table['dtype']}; the matcher writes F32 or F16 rows")
    pretrain = Split.open(data_dir, "pretrain", Schema.load(Path(data_dir) / "schema.yaml")).content_fingerprint()
    if meta.get("pretrain_data", pretrain) != pretrain:  # which items are warm is read off this folder
        raise UserError(f"{backbone_dir}: pre-trained on another pre-train split than {data_dir}'s (another "
                        f"data.cold_items, or other data): its warm items are not this folder's; give the data "
                        f"folder it was pre-trained on")
    texts = open_item_text(data_dir)
    warm, shared = warm_slot_mask(data_dir, table_size), shared_slot_mask(texts, table_size)
    weights = backbone_weights(backbone_dir, meta)

    def id_rows(slots: np.ndarray) -> np.ndarray:
        rows = np.empty((len(slots), width), np.float64)
        for i, slot in enumerate(slots.tolist()):  # one row at a time: the table is never read whole
            row = torch.from_numpy(np.empty((1, width), dtype))
            weights.read_into(ITEM_TABLE, row, (slot, 0))
            rows[i] = row.double().numpy()[0]
        return rows

    sums, several = None, _SharedSlots(shared, TEXT_DIM)
    for ids, vectors in item_text_batches(texts):  # the fit: warm slots, one item each, then the shared ones
        slots = hash_ids(ids, table_size)
        sums = sums or RidgeSums(vectors.shape[1], width)
        alone = ~shared[slots] & warm[slots]
        sums.add(vectors[alone], id_rows(slots[alone]))
        several.add(slots[shared[slots]], vectors[shared[slots]])
    warm_shared, warm_texts = several.means(warm)
    if sums is None or sums.n + len(warm_shared) < 2:
        raise UserError(f"{data_dir}: {0 if sums is None else sums.n + len(warm_shared)} items with text appear in "
                        f"the pre-train split; the matcher needs warm items to fit on")
    sums.add(warm_texts, id_rows(warm_shared))
    weight, bias = sums.solve(ridge)

    shutil.copytree(backbone_dir, out_dir, dirs_exist_ok=True)
    (out_dir / "backbone.json").unlink()  # written last: its presence means the folder is complete
    patcher = _RowPatcher(out_dir, table, dtype)
    matched: list[np.ndarray] = []
    for ids, vectors in item_text_batches(texts):  # the cold slots of one item each, mapped and written
        slots = hash_ids(ids, table_size)
        alone = ~shared[slots] & ~warm[slots]
        patcher.write(slots[alone], vectors[alone] @ weight + bias)
        matched.append(slots[alone])
    cold_shared, cold_texts = several.means(~warm)
    patcher.write(cold_shared, cold_texts @ weight + bias)
    for name in patcher.patched:
        layout["files"][name] = file_hash(out_dir / name)
    record: dict[str, Any] = {
        "source_weights": meta["weights"], "data_dir": str(data_dir), "ridge": ridge,
        "warm_slots": sums.n, "matched_slots": np.sort(np.concatenate([*matched, cold_shared])).tolist(),
        "fit_r2": sums.r_squared(weight, bias)}
    out_meta = {k: v for k, v in meta.items() if not k.endswith("_obj")}
    out_meta |= {"weights": layout_hash(layout), "layout": layout, "id_matcher": record}
    atomic_write_json(out_dir / "backbone.json", out_meta)
    return record


class _RowPatcher:
    """Writes rows of the item table in place, in the shard files of a copied backbone (no file read whole)."""

    def __init__(self, root: Path, table: dict[str, Any], dtype: type) -> None:
        from iak_dist.distributed.checkpoint import SafetensorsFile

        self.root, self.dtype, self.patched = root, np.dtype(dtype), set()
        self.pieces = []
        for piece in table["pieces"]:
            stored = SafetensorsFile(root / piece["file"], "match the source backbone again")
            self.pieces.append((piece, stored.start + stored.entries[piece["key"]][2][0]))

    def write(self, slots: np.ndarray, rows: np.ndarray) -> None:
        """Set the rows of `slots` [n] to `rows` [n, width] (cast to the table's dtype)."""
        for piece, begin in self.pieces:
            (r0, r1), (c0, c1) = piece["rows"], piece["cols"]
            inside = (slots >= r0) & (slots < r1)
            if not inside.any():
                continue
            row_bytes = (c1 - c0) * self.dtype.itemsize
            with open(self.root / piece["file"], "r+b") as f:
                for slot, values in zip(slots[inside].tolist(), rows[inside], strict=True):
                    f.seek(begin + (slot - r0) * row_bytes)
                    f.write(values[c0:c1].astype(self.dtype).tobytes())
            self.patched.add(piece["file"])
