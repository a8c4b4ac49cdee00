"""IDP-style ID matcher (issue 14 item 5): score items pre-training never saw through a pre-trained-like
ID embedding predicted from their text.

An item that no pre-train row holds keeps the ID row it was initialised with: the ranker reads noise
for it. The matcher fits a linear map from an item's text vector (`data.item_text`) to its pre-trained
ID embedding on the items pre-training did see (ridge regression in closed form, `fit_ridge`), and
writes the predicted row into the item table for the items it did not see. Everything else in the
backbone stays as it was.

It works on the item table's slots, as the model does: items hashed to one slot share their ID row,
so a slot's text is the mean of its items' vectors (as `ItemTower.set_text`), a slot is warm when a
pre-train row holds one of its items, and the slots matched are those of the items with text that no
pre-train row holds (with `data.cold_items`: the cold items, plus any item the split never pre-trains).

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

from iak_dist.errors import UserError

ITEM_FEATURE = "item_id"
ITEM_TABLE = f"embeddings.embedding_bags.t_{ITEM_FEATURE}.weight"
"""The item table's tensor in an exported backbone (`backbone.json`'s layout)."""


def fit_ridge(features: np.ndarray, targets: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """`(W [F, D], b [D])` minimising `|features W + b - targets|^2 + ridge |W|^2` (the bias not penalised).

    Closed form on centred data: `W = (Xc^T Xc + ridge I)^-1 Xc^T Yc`, `b = mean(Y) - mean(X) W`, in
    float64 (solved, not inverted). `ridge` 0 is least squares (needs Xc^T Xc invertible).
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    x = np.asarray(features, np.float64)
    y = np.asarray(targets, np.float64)
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - x_mean, y - y_mean
    weight = np.linalg.solve(xc.T @ xc + ridge * np.eye(x.shape[1]), xc.T @ yc)
    return weight, y_mean - x_mean @ weight


def slot_texts(item_ids: np.ndarray, vectors: np.ndarray, table_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`(slots [S] ascending, texts [S, T])`: each occupied slot of the item table and the mean of the
    text vectors of the items hashed to it (what an item tower reads there)."""
    from iak_dist.data.schema import hash_ids

    slots, index = np.unique(hash_ids(np.asarray(item_ids, np.int64), table_size), return_inverse=True)
    texts = np.zeros((len(slots), vectors.shape[1]), np.float64)
    np.add.at(texts, index, vectors)
    return slots, texts / np.bincount(index, minlength=len(slots))[:, None]


def pretrained_slots(data_dir: str | Path, table_size: int) -> np.ndarray:
    """The item table slots the pre-train split's rows hold (ascending), read part by part (item_id only)."""
    from iak_dist.data.schema import Schema, hash_ids
    from iak_dist.data.source import Split

    split = Split.open(data_dir, "pretrain", Schema.load(Path(data_dir) / "schema.yaml"))
    seen = np.zeros(table_size, dtype=bool)
    try:
        for part in split.parts:
            seen[hash_ids(split.read(part, columns=[ITEM_FEATURE]).column(0).to_numpy(), table_size)] = True
    finally:
        split.close()
    return np.flatnonzero(seen)


def r_squared(predicted: np.ndarray, targets: np.ndarray) -> float:
    """1 - residual / total sum of squares, over every coordinate (the targets' own mean per column)."""
    residual = ((targets - predicted) ** 2).sum()
    total = ((targets - targets.mean(axis=0)) ** 2).sum()
    return float(1.0 - residual / total) if total > 0 else float("nan")


def match_items(backbone_dir: str | Path, data_dir: str | Path, out_dir: str | Path, ridge: float = 1.0) -> dict:
    """Write `out_dir`: the backbone of `backbone_dir` with the ID rows of the items pre-training never saw
    replaced by the ridge map of their text (fitted on the warm items). Returns the `id_matcher` record."""
    import torch

    from iak_dist.data.item_text import read_item_text
    from iak_dist.distributed.checkpoint import (
        SafetensorsFile,
        backbone_weights,
        file_hash,
        layout_hash,
        verify_backbone,
    )
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
    from iak_dist.data.schema import Schema
    from iak_dist.data.source import Split

    pretrain = Split.open(data_dir, "pretrain", Schema.load(Path(data_dir) / "schema.yaml")).content_fingerprint()
    if meta.get("pretrain_data", pretrain) != pretrain:  # which items are warm is read off this folder
        raise UserError(f"{backbone_dir}: pre-trained on another pre-train split than {data_dir}'s (another "
                        f"data.cold_items, or other data): its warm items are not this folder's; give the data "
                        f"folder it was pre-trained on")
    slots, texts = slot_texts(*read_item_text(data_dir), table_size)
    warm_mask = np.isin(slots, pretrained_slots(data_dir, table_size))
    warm, cold = slots[warm_mask], slots[~warm_mask]
    if len(warm) < 2:
        raise UserError(f"{data_dir}: {len(warm)} items with text appear in the pre-train split; the matcher "
                        f"needs warm items to fit on")

    weights = backbone_weights(backbone_dir, meta)
    targets = np.empty((len(warm), width), np.float64)
    for i, slot in enumerate(warm.tolist()):  # one row at a time: the table is never read whole
        row = torch.from_numpy(np.empty((1, width), dtype))
        weights.read_into(ITEM_TABLE, row, (slot, 0))
        targets[i] = row.double().numpy()[0]
    weight, bias = fit_ridge(texts[warm_mask], targets, ridge)
    matched = texts[~warm_mask] @ weight + bias

    shutil.copytree(backbone_dir, out_dir, dirs_exist_ok=True)
    (out_dir / "backbone.json").unlink()  # written last: its presence means the folder is complete
    patched: set[str] = set()
    for piece in table["pieces"]:
        (r0, r1), (c0, c1) = piece["rows"], piece["cols"]
        inside = (cold >= r0) & (cold < r1)
        if not inside.any():
            continue
        stored = SafetensorsFile(out_dir / piece["file"], "match the source backbone again")
        begin = stored.start + stored.entries[piece["key"]][2][0]
        row_bytes = (c1 - c0) * np.dtype(dtype).itemsize
        with open(out_dir / piece["file"], "r+b") as f:
            for slot, values in zip(cold[inside].tolist(), matched[inside], strict=True):
                f.seek(begin + (slot - r0) * row_bytes)
                f.write(values[c0:c1].astype(dtype).tobytes())
        patched.add(piece["file"])
    for name in patched:
        layout["files"][name] = file_hash(out_dir / name)
    record: dict[str, Any] = {
        "source_weights": meta["weights"], "data_dir": str(data_dir), "ridge": ridge,
        "warm_slots": len(warm), "matched_slots": cold.tolist(),
        "fit_r2": r_squared(texts[warm_mask] @ weight + bias, targets)}
    out_meta = {k: v for k, v in meta.items() if not k.endswith("_obj")}
    out_meta |= {"weights": layout_hash(layout), "layout": layout, "id_matcher": record}
    atomic_write_json(out_dir / "backbone.json", out_meta)
    return record
