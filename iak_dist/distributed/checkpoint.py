"""Backbone weights in and out of a sharded model without gathering a table, and training checkpoints.

An exported backbone is a folder with `backbone.json` (schema, model config, identity hash, the
layout of its weights) and the weights as per-rank shard files that every rank writes in parallel:

    backbone.json
    dense.safetensors                    rank 0: every replicated tensor (dense weights, data-parallel tables)
    shards/rank-00000-of-00002.safetensors   rank 0's table shards
    shards/rank-00001-of-00002.safetensors   rank 1's table shards

`backbone.json["layout"]` gives each tensor's global shape and dtype and which file holds which
row/column range of it (`pieces`), and the SHA-256 (first 16 hex digits) of every file. Loading at
any world size and plan reads, on each rank, only the rows of the shards that rank owns, in chunks
of at most `CHUNK_BYTES`, and checks the hash of each file it reads first. Backbones exported
before (one `model.safetensors` of full tensors) still load, the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from iak_dist.config import ModelConfig, from_dict, to_dict
from iak_dist.data.schema import Schema
from iak_dist.distributed.context import on_every_rank
from iak_dist.errors import UserError
from iak_dist.faults import fault_point
from iak_dist.io import atomic_path, atomic_write_json, atomic_write_text, fsync_dir, fsync_tree
from iak_dist.model.backbone import backbone_identity
from iak_dist.runtime import uninterrupted

CHUNK_BYTES = 32 << 20
"""Most bytes of one tensor held at once beyond the model itself while exporting or loading."""
DENSE_FILE, SHARD_DIR, LEGACY_FILE = "dense.safetensors", "shards", "model.safetensors"
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _DTYPES.items()}


def shard_file(rank: int, world_size: int) -> str:
    return f"{SHARD_DIR}/rank-{rank:05d}-of-{world_size:05d}.safetensors"


def _rows(shape: torch.Size | list[int]) -> tuple[int, int]:
    """A tensor seen as a matrix: (rows, row length); pieces and chunks split the rows."""
    shape = list(shape)
    if not shape:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def _chunk_rows(row_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(1, row_bytes))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write `tensors` as a safetensors file row chunk by row chunk; returns the file's `file_hash`.

    Trap: safetensors' `save_file` turns every tensor into a `bytes` copy first, so its peak memory is
    twice what it writes; here at most one chunk (`CHUNK_BYTES`) is copied, and only when a chunk is
    not contiguous or not on the CPU. The hash is taken as the bytes go out (no second read).
    """
    header: dict[str, Any] = {}
    offset = 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        def out(data) -> None:
            digest.update(data)
            f.write(data)

        out(struct.pack("<Q", len(raw)) + raw)
        for tensor in tensors.values():
            rows, width = _rows(tensor.shape)
            flat = tensor.detach().reshape(rows, width)
            step = _chunk_rows(width * tensor.element_size())
            for start in range(0, rows, step):
                chunk = flat[start:start + step].cpu().contiguous()
                out(chunk.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()[:16]


class SafetensorsFile:
    """Reads row ranges of the tensors of one safetensors file with plain file reads.

    Not `safe_open`: it memory-maps the file, and every page read through the map counts in the
    process's RSS until the map is closed; a seek and a read into a fresh tensor hold one chunk.
    """

    def __init__(self, path: Path, remedy: str) -> None:
        self.path, self.remedy = path, remedy
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > size - 8:
                    raise ValueError(f"header of {length} bytes in a file of {size}")
                header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            self.start = 8 + length
            self.entries = {k: (_TORCH_DTYPES[v["dtype"]], list(v["shape"]), v["data_offsets"])
                            for k, v in header.items()}
            end = max((e[2][1] for e in self.entries.values()), default=0)
            if self.start + end != size:
                raise ValueError(f"{size} bytes, the header describes {self.start + end}")
        except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise self.error(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None

    def error(self, what: str) -> UserError:
        return UserError(f"{self.path}: not a readable safetensors file ({what}); {self.remedy}")

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `key` seen as a matrix (`_rows`)."""
        if key not in self.entries:
            raise self.error(f"no tensor {key}")
        dtype, shape, (begin, _) = self.entries[key]
        _, width = _rows(shape)
        out = torch.empty(stop - start, width, dtype=dtype)
        row_bytes = width * out.element_size()
        with open(self.path, "rb") as f:
            f.seek(self.start + begin + start * row_bytes)
            if f.readinto(out.view(torch.uint8).numpy()) != out.numel() * out.element_size():
                raise self.error(f"tensor {key} ends early")
        return out


class ShardedWeights:
    """Stored tensors, each as pieces (row/column ranges) in safetensors files under `root`.

    `layout` is the `layout` of `backbone.json` (or of a `full` adapter's config): tensors
    {name: {shape, dtype, pieces: [{file, key, rows: [r0, r1], cols: [c0, c1]}]}} (a tensor of other than
    2 dimensions is seen as a matrix of its first dimension's rows) and files {relative path: hash}.
    Each file is checked against its hash the first time it is read (`recorded_in` names where the
    hash was recorded, `remedy` what to do about a mismatch).
    """

    def __init__(self, root: Path, layout: dict[str, Any], recorded_in: Path, remedy: str) -> None:
        self.root, self.layout, self.recorded_in, self.remedy = Path(root), layout, recorded_in, remedy
        self.tensors: dict[str, dict[str, Any]] = layout["tensors"]
        self._files: dict[str, SafetensorsFile] = {}

    @classmethod
    def single_file(cls, root: Path, file: str, file_hash_: str, recorded_in: Path, remedy: str,
                    prefix: str = "") -> ShardedWeights:
        """Full tensors under keys `prefix + name` in one file (backbones exported before the shards)."""
        weights = cls(root, {"tensors": {}, "files": {file: file_hash_}}, recorded_in, remedy)
        for key, (dtype, shape, _) in weights.file(file).entries.items():
            if key.startswith(prefix):
                rows, width = _rows(shape)
                weights.tensors[key[len(prefix):]] = {
                    "shape": shape, "dtype": _DTYPES[dtype],
                    "pieces": [{"file": file, "key": key, "rows": [0, rows], "cols": [0, width]}]}
        return weights

    def file(self, name: str) -> SafetensorsFile:
        """The file `name`, its hash checked against the recorded one on first use."""
        if name not in self._files:
            check_weights_hash(self.root / name, self.layout["files"][name], self.recorded_in, self.remedy)
            self._files[name] = SafetensorsFile(self.root / name, self.remedy)
        return self._files[name]

    def verify(self) -> None:
        """Check every file's hash (a copy must be what its files claim; reads whole files, holds nothing)."""
        for name in self.layout["files"]:
            self.file(name)

    def load_into(self, name: str, target: torch.Tensor) -> None:
        """Fill `target` (a plain tensor, or this rank's shards of a sharded table) with tensor `name`:
        each rank reads only the rows of the shards it owns."""
        if isinstance(target, ShardedTensor):
            for shard in target.local_shards():
                self.read_into(name, shard.tensor, tuple(shard.metadata.shard_offsets))
        else:
            self.read_into(name, target)

    def read_into(self, name: str, target: torch.Tensor, offsets: tuple[int, int] = (0, 0)) -> None:
        """Fill `target`, the block of tensor `name` at (row, column) `offsets`, from the pieces it overlaps.

        Reads only those rows, at most `CHUNK_BYTES` of one piece at a time.
        """
        info = self.tensors[name]
        dtype = _TORCH_DTYPES[info["dtype"]]
        matrix = target if target.dim() == 2 else target.view(*_rows(target.shape))
        r0, c0 = offsets
        r1, c1 = r0 + matrix.shape[0], c0 + matrix.shape[1]
        covered = 0
        for piece in info["pieces"]:
            (pr0, pr1), (pc0, pc1) = piece["rows"], piece["cols"]
            lo, hi, left, right = max(r0, pr0), min(r1, pr1), max(c0, pc0), min(c1, pc1)
            if lo >= hi or left >= right:
                continue
            covered += (hi - lo) * (right - left)
            source = self.file(piece["file"])
            step = _chunk_rows((pc1 - pc0) * dtype.itemsize)
            for start in range(lo, hi, step):
                stop = min(hi, start + step)
                chunk = source.read(piece["key"], start - pr0, stop - pr0)
                if chunk.shape[1] != pc1 - pc0:
                    raise source.error(f"tensor {piece['key']} has rows of {chunk.shape[1]}, "
                                       f"{self.recorded_in.name} says {pc1 - pc0}")
                matrix[start - r0:stop - r0, left - c0:right - c0].copy_(chunk[:, left - pc0:right - pc0])
                del chunk  # freed before the next chunk is read: one chunk at a time
        if covered != matrix.numel():
            raise UserError(f"{self.recorded_in}: the stored pieces of {name} do not cover rows {r0}:{r1}, "
                            f"columns {c0}:{c1}; {self.remedy}")

    def full(self, name: str) -> torch.Tensor:
        """Tensor `name` whole, in memory (for small tensors and one-process consumers)."""
        info = self.tensors[name]
        out = torch.empty(info["shape"], dtype=_TORCH_DTYPES[info["dtype"]])
        self.read_into(name, out)
        return out

    def row_chunks(self, name: str, rows: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows) of tensor `name` in chunks of `rows` rows (default: `CHUNK_BYTES`'s worth).

        How a one-process consumer (serving) reads a whole table without holding it.
        """
        info = self.tensors[name]
        total, width = _rows(info["shape"])
        rows = rows or _chunk_rows(width * _TORCH_DTYPES[info["dtype"]].itemsize)
        for start in range(0, total, rows):
            out = torch.empty(min(rows, total - start), *info["shape"][1:], dtype=_TORCH_DTYPES[info["dtype"]])
            self.read_into(name, out, (start, 0))
            yield start, out


def save_sharded(model: nn.Module, prefix: str, root: Path, folder: str = "",
                 rank: int | None = None) -> dict[str, Any]:
    """Write the tensors of `model.state_dict()` under `prefix` into `root/folder`: each rank its own shards.

    Collective: every rank calls it. Rank r writes its local table shards to `shard_file(r, N)`;
    rank 0 also writes the replicated tensors (dense weights, data-parallel tables) to `DENSE_FILE`.
    Returns the layout (see `ShardedWeights`), the same on every rank, paths relative to `root`.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = (dist.get_rank() if dist.is_initialized() else 0) if rank is None else rank
    base = f"{folder}/" if folder else ""
    mine, replicated, tensors = {}, {}, {}
    pieces: dict[str, list[dict[str, Any]]] = {}
    for key, value in model.state_dict().items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if isinstance(value, ShardedTensor):
            props = value.metadata().tensor_properties
            tensors[name] = {"shape": list(value.size()), "dtype": _DTYPES[props.dtype]}
            shards = value.local_shards()
            for i, shard in enumerate(shards):
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                part = name if len(shards) == 1 else f"{name}#{i}"  # a rank may hold two column blocks
                mine[part] = shard.tensor
                pieces.setdefault(name, []).append({"file": base + shard_file(rank, world), "key": part,
                                                    "rows": [r0, r0 + nr], "cols": [c0, c0 + nc]})
        else:
            rows, width = _rows(value.shape)
            tensors[name] = {"shape": list(value.shape), "dtype": _DTYPES[value.dtype]}
            replicated[name] = value
            if rank == 0:
                pieces[name] = [{"file": base + DENSE_FILE, "key": name, "rows": [0, rows], "cols": [0, width]}]

    def write() -> dict[str, str]:
        written = {}
        if mine:
            written[base + shard_file(rank, world)] = write_safetensors(root / base / shard_file(rank, world), mine)
        if rank == 0:
            written[base + DENSE_FILE] = write_safetensors(root / base / DENSE_FILE, replicated)
        return written

    files = on_every_rank(write, what=str(root / folder))
    parts = [(pieces, files)]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (pieces, files))  # sync point: every rank's files are written
    layout: dict[str, Any] = {"tensors": tensors, "files": {}}
    for rank_pieces, rank_files in parts:
        layout["files"].update(rank_files)
        for name, found in rank_pieces.items():
            tensors[name].setdefault("pieces", []).extend(found)
    return layout


def layout_hash(layout: dict[str, Any]) -> str:
    """One hash for a sharded state (its files' hashes and their layout): what adapters are stamped with."""
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]


def remove_stale_shards(root: Path, layout: dict[str, Any], folder: str = "") -> None:
    """Delete shard files in `root/folder` that `layout` does not name (an export at another world size)."""
    base = root / folder
    keep = {root / name for name in layout["files"]}
    for path in [base / LEGACY_FILE, *(base / SHARD_DIR).glob("rank-*-of-*.safetensors")]:
        if path not in keep:
            path.unlink(missing_ok=True)


@torch.no_grad()
def load_sharded(model: nn.Module, weights: ShardedWeights, prefix: str = "",
                 override: ShardedWeights | None = None) -> None:
    """Copy stored tensors into `model` in place; each rank reads only the rows of the shards it owns.

    `override`'s tensors replace `weights`' (a `full` adapter carries its own backbone). Collective:
    a file that fails to load on one rank is raised on every rank.
    """
    sources = {name: weights for name in weights.tensors}
    if override is not None:
        sources |= {name: override for name in override.tensors}
    own = {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}

    def load() -> None:
        missing, unexpected = sorted(own.keys() - sources.keys()), sorted(sources.keys() - own.keys())
        if missing or unexpected:
            raise UserError(f"{weights.recorded_in}: the stored weights do not match the model: "
                            f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, target in own.items():
            source = sources[name]
            stored = source.tensors[name]["shape"]
            if list(target.size()) != list(stored):
                raise UserError(f"{source.recorded_in}: tensor {name} has shape {tuple(stored)}, the model "
                                f"expects {tuple(target.size())} (a different model config or schema)")
            source.load_into(name, target)

    on_every_rank(load, what=str(weights.root))


def plain_state_dict(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Full tensors of `model.state_dict()` whose keys start with `prefix` (prefix removed).

    Gathers every sharded table whole on every rank (collective: all ranks must call): for tests and
    checks on small models only. Phases never call it: exports and adapters write per-rank shards
    (`save_sharded`).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if isinstance(value, ShardedTensor):
            full = torch.zeros(value.size(), dtype=value.dtype, device=collective_device(value))
            for shard in value.local_shards():
                off, size = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                full[off[0]:off[0] + size[0], off[1]:off[1] + size[1]] = shard.tensor.detach()
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(full)  # shards are disjoint: the sum assembles the table
            out[name] = full.cpu()
        else:
            out[name] = value.detach().cpu().clone()
    return out


def collective_device(value: ShardedTensor) -> torch.device:
    """Where a collective over `value`'s full tensor must run.

    Trap: NCCL only takes CUDA tensors, so the table is assembled on the shards' device (or the
    rank's GPU when it holds no shard of it) and moved to the CPU after the all-reduce.
    """
    shards = value.local_shards()
    if shards:
        return shards[0].tensor.device
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def file_hash(path: str | Path) -> str:
    """First 16 hex digits of the file's SHA-256, read in 1 MiB blocks (weights files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def export_backbone(model: nn.Module, schema: Schema, cfg: ModelConfig, out_dir: str | Path, rank: int = 0,
                    pretrain_data: str | None = None) -> None:
    """Write the backbone of a (sharded) Ranker as a world-size-free folder, each rank its own shards.

    Collective: every rank calls it. `backbone.json` is written last (by rank 0), after every rank's
    files: its presence means the export is complete. `pretrain_data`: the fingerprint of the split it
    was pre-trained on, recorded (what saw which items: the ID matcher checks it).
    """
    out_dir = Path(out_dir)
    if rank == 0:
        (out_dir / "backbone.json").unlink(missing_ok=True)  # a crash below must not leave the old one
    layout = save_sharded(model, "backbone.", out_dir, rank=rank)
    if rank != 0:
        return
    atomic_write_json(out_dir / "backbone.json", {
        "schema": schema.as_dict(),
        "model": to_dict(cfg),
        "identity": backbone_identity(schema, cfg),
        "weights": layout_hash(layout),
        "layout": layout,
        **({"pretrain_data": pretrain_data} if pretrain_data is not None else {}),
    })
    remove_stale_shards(out_dir, layout)


_REEXPORT = "re-export the backbone (run pre-training again)"
LEGACY_TEXT_BUFFER = "item_tower.text"
"""Where the item text lived before it was the table `t_item_text`: a buffer whole on every rank."""
LEGACY_TEXT_REFUSAL = ("{path}: pre-trained when the item text was a buffer on every rank (item_tower.text); this "
                       "version keeps it as the sharded table t_item_text: pre-train again")


def read_backbone_meta(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / "backbone.json"
    if not meta_path.is_file():
        raise UserError(f"{path}: no exported backbone here (backbone.json missing); run pre-training first")
    meta = read_json(meta_path, _REEXPORT)
    if LEGACY_TEXT_BUFFER in meta.get("layout", {}).get("tensors", {}):
        raise UserError(LEGACY_TEXT_REFUSAL.format(path=path))
    meta["schema_obj"] = from_dict(Schema, meta["schema"], str(meta_path))
    meta["model_obj"] = from_dict(ModelConfig, meta["model"], str(meta_path))
    return meta


def read_json(path: Path, remedy: str) -> dict[str, Any]:
    """A JSON file we wrote; unreadable (truncated, edited) -> UserError naming it and `remedy`."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({str(exc).splitlines()[0]}); {remedy}") from None


def check_weights_hash(path: Path, expected_hash: str, recorded_in: Path, remedy: str) -> None:
    """UserError unless `path` exists and its `file_hash` is the one recorded in the JSON file `recorded_in`.

    The JSON files name the weights they go with; comparing only their strings would let a weights file
    swapped in from another seed or backbone (same shapes) load silently. `file_hash` streams the file.
    """
    if not path.is_file():
        raise UserError(f"{path}: missing; {remedy}")
    actual = file_hash(path)
    if actual != expected_hash:
        raise UserError(f"{path}: weights hash {actual} differs from {expected_hash} recorded in {recorded_in.name} "
                        f"(the file was replaced or damaged); {remedy}")


def backbone_weights(path: str | Path, meta: dict[str, Any] | None = None) -> ShardedWeights:
    """The exported backbone's stored tensors (nothing is read yet but the layout).

    A backbone exported before the shards (one `model.safetensors`) is checked against its hash here,
    since every rank reads that one file.
    """
    path = Path(path)
    meta = read_backbone_meta(path) if meta is None else meta
    if "layout" in meta:
        return ShardedWeights(path, meta["layout"], path / "backbone.json", _REEXPORT)
    return ShardedWeights.single_file(path, LEGACY_FILE, meta["weights"], path / "backbone.json", _REEXPORT)


def verify_backbone(path: str | Path) -> dict[str, Any]:
    """The backbone's meta after checking every weights file's hash, without loading them (for copies: export)."""
    meta = read_backbone_meta(path)
    backbone_weights(path, meta).verify()
    return meta


def load_backbone_weights(path: str | Path, meta: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the exported backbone whole, each file verified against its hash.

    Holds every table in memory: for one process and small backbones (tests, inspection). Phases load
    with `load_sharded` (owned rows only); a consumer of a large table reads `row_chunks`.
    """
    weights = backbone_weights(path, meta)
    return {name: weights.full(name) for name in weights.tensors}


# ---------------------------------------------------------------------------------------------
# Training checkpoints: sparse shards + fused optimizer (DCP), dense engine (DeepSpeed), train state


SPARSE_PREFIX = "backbone.embeddings."
_STEP_DIR = re.compile(r"step_\d+")


def _sparse_state(model: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(SPARSE_PREFIX)}


def _fused_optimizer_state(model: nn.Module) -> dict[str, Any]:
    """The fused optimizer's state with empty per-table entries dropped.

    Trap: DCP fails to load a table's optimizer state when it is empty (SGD keeps none) and some
    rank holds no shard of that table.
    """
    state = model.fused_optimizer.state_dict()
    state["state"] = {k: v for k, v in state["state"].items() if v}
    return state


def _sparse_checkpoint(model: nn.Module) -> dict[str, Any]:
    """What DCP saves and loads of the sparse side: the tables, and their fused optimizer's state if any.

    Trap: a frozen-embedding model (fine-tuning an adapter) has a fused optimizer whose state dict is
    `{"state": {}}`; saved as such on 2 ranks, DCP then fails to load it ("Missing key in checkpoint
    state_dict: optim."). It is left out: there is nothing to resume.
    """
    optim = _fused_optimizer_state(model)
    has_optimizer = bool(optim["state"]) or bool(optim.get("param_groups"))
    return {"model": _sparse_state(model), **({"optim": optim} if has_optimizer else {})}


FROZEN_TABLES = "frozen_tables.txt"
"""In a checkpoint without tables: the weights hash of the backbone whose frozen tables it was trained on."""


class CheckpointManager:
    """Atomic, resumable checkpoints of one training phase under `root`.

    A checkpoint is written into `step_XXXXXXXX.partial/` by every rank, then rank 0 marks it
    `COMPLETE` and renames it to `step_XXXXXXXX/` after a barrier: a crash during a save leaves the
    previous checkpoint intact, and a folder without `COMPLETE` is never loaded. Restoring walks
    from the newest complete checkpoint back and skips (with a warning) any that fails to load.

    `frozen_tables`: the weights hash of the backbone whose tables a phase never changes (fine-tuning an
    adapter). Its checkpoints then hold no tables (a production table is gigabytes; the phase rebuilds
    them from the backbone), only that hash (`FROZEN_TABLES`), and load only where the phase's
    backbone has the same hash: an adapter is never resumed onto another backbone's tables.
    """

    def __init__(self, root: str | Path, ctx, keep: int = 2, frozen_tables: str | None = None) -> None:
        self.root = Path(root)
        self.ctx = ctx
        self.keep = keep
        self.frozen_tables = frozen_tables

    def complete(self) -> list[Path]:
        """Checkpoints marked complete, oldest first (`step_X.partial` / `step_X.corrupt` never count)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if _STEP_DIR.fullmatch(p.name) and p.is_dir()
                      and (p / "COMPLETE").is_file())

    def save(self, step: int, model: nn.Module, dense, extra: dict[str, Any], plan_text: str = "",
             data_parallel_optimizer=None) -> Path:
        """Checkpoint `step`: sparse shards + fused optimizer, the dense engine, `extra` train state and
        the optimizer of data-parallel tables (which TorchRec's fused optimizer does not cover)."""
        with uninterrupted():  # SIGTERM waits for the checkpoint to be complete (or not started)
            return self._save(step, model, dense, extra, plan_text, data_parallel_optimizer)

    def _save(self, step: int, model: nn.Module, dense, extra: dict[str, Any], plan_text: str,
              data_parallel_optimizer) -> Path:
        import torch.distributed.checkpoint as dcp

        final = self.root / f"step_{step:08d}"
        partial = self.root / f"step_{step:08d}.partial"
        if (final / "COMPLETE").is_file():
            return final  # this step was saved before a restart
        def prepare() -> None:
            if self.ctx.is_main:
                _remove_tree(partial)  # left by a crash during an earlier save of this step
                partial.mkdir(parents=True)

        self._together(prepare)
        if self.frozen_tables is None:
            dcp.save(_sparse_checkpoint(model), checkpoint_id=str(partial / "sparse"))
        fault_point("save", step, self.ctx.rank)
        if dense is not None:
            dense.engine.save_checkpoint(str(partial / "dense"), tag="state")
        if data_parallel_optimizer is not None:
            extra = {**extra, "dp_optimizer": data_parallel_optimizer.state_dict()}
        rng = {"rng": torch.get_rng_state()}
        if self.ctx.device.type == "cuda":  # IAK samples its noise on the device: resume must restore it too
            rng["cuda_rng"] = torch.cuda.get_rng_state(self.ctx.device)
        def save_state() -> None:
            fault_point("save_state", step, self.ctx.rank)
            torch.save({"world_size": self.ctx.world_size, **rng, **extra},
                       partial / f"train_state_rank{self.ctx.rank}.pt")

        self._together(save_state)

        def complete() -> None:
            if self.ctx.is_main:
                atomic_write_text(partial / "plan.txt", plan_text, durable=False)
                atomic_write_text(partial / "tables.json", json.dumps(_table_shapes(model)), durable=False)
                if self.frozen_tables is not None:
                    atomic_write_text(partial / FROZEN_TABLES, self.frozen_tables, durable=False)
                fsync_tree(partial)  # every rank's files are on disk before COMPLETE can be
                atomic_write_text(partial / "COMPLETE", f"{self.ctx.world_size}\n")
                partial.rename(final)
                fsync_dir(self.root)
                for old in self.complete()[:-self.keep]:
                    _remove_tree(old)

        self._together(complete)
        return final

    def _together(self, write: Callable[[], None]) -> None:
        """Run `write` on this rank; if it fails on any rank, raise on every rank.

        Sync point. A rank-local failure (a full disk, a read-only folder) would otherwise leave
        the other ranks waiting in the next collective until its timeout (30 min), with the cause
        lost; here the failing rank raises its own error and the others say which path it was.
        """
        error: BaseException | None = None
        try:
            write()
        except Exception as exc:  # noqa: BLE001  (re-raised below, once every rank knows)
            error = exc
        if not self._everywhere(error is None):
            if error is not None:
                raise error
            raise UserError(f"{self.root}: another rank failed to write its part of the checkpoint (see its error)")

    def restore_latest(self, model: nn.Module, dense, warn=print,
                       data_parallel_optimizer=None) -> dict[str, Any] | None:
        """Load the newest loadable checkpoint; returns its train state (None: no checkpoint, start fresh).

        Newer checkpoints that fail to load are renamed `step_X.corrupt` once an older one has loaded:
        left in place, they would count as the newest for retention, which would delete the good one.
        When checkpoints exist but none loads, the phase is not silently restarted: UserError.
        """
        candidates = self.complete()
        failed: list[tuple[Path, str]] = []
        for path in reversed(candidates):
            state, error = self._try_load(path, model, dense, data_parallel_optimizer)
            if self._everywhere(error is None):  # sync point: every rank loads the same checkpoint
                self._move_aside([p for p, _ in failed], warn)
                return state
            error = error or "it failed to load on another rank"
            warn(f"[checkpoint] {path} cannot be loaded ({error}); falling back to the one before")
            failed.append((path, error))
        if failed:
            raise UserError(
                f"{self.root}: none of the {len(failed)} checkpoints here loads (newest {failed[0][0].name}: "
                f"{failed[0][1]}); move {self.root} aside to start this phase from step 0"
            )
        return None

    def _try_load(self, path: Path, model: nn.Module, dense,
                  data_parallel_optimizer) -> tuple[dict[str, Any] | None, str | None]:
        """(train state, None), or (None, a one-line reason); a UserError (wrong model) is raised."""
        try:
            return self._load(path, model, dense, data_parallel_optimizer), None
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001
            return None, _one_line(exc)
        except BaseException as exc:  # DCP's CheckpointException derives from BaseException
            if type(exc).__name__ != "CheckpointException":
                raise
            return None, _one_line(exc)

    def _everywhere(self, ok: bool) -> bool:
        """True when `ok` holds on every rank (a rank-local failure must not split the ranks)."""
        if self.ctx.world_size == 1:
            return ok
        flag = torch.tensor([int(ok)], device=self.ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _move_aside(self, paths: list[Path], warn) -> None:
        if not self.ctx.is_main:
            return
        for path in paths:
            target = path.with_name(path.name + ".corrupt")
            _remove_tree(target)  # an earlier corrupt copy of the same step
            path.rename(target)
            warn(f"[checkpoint] moved {path} aside to {target.name} (it does not load)")

    def _load(self, path: Path, model: nn.Module, dense, data_parallel_optimizer=None) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp

        saved_world = int((path / "COMPLETE").read_text().strip() or 1)
        saved_tables, own_tables = json.loads((path / "tables.json").read_text()), _table_shapes(model)
        if saved_tables != own_tables:
            bad = sorted(k for k in saved_tables.keys() | own_tables.keys()
                         if saved_tables.get(k) != own_tables.get(k))
            raise UserError(f"{path}: checkpoint is from a different model config: tables "
                            + ", ".join(f"{k} (checkpoint {saved_tables.get(k)}, model {own_tables.get(k)})"
                                        for k in bad[:4]))
        frozen = (path / FROZEN_TABLES).read_text().strip() if (path / FROZEN_TABLES).is_file() else None
        if frozen is not None and frozen != self.frozen_tables:
            raise UserError(f"{path}: checkpoint of an adapter on the backbone with weights {frozen}, this phase's "
                            f"backbone has {self.frozen_tables or 'trainable tables'}; move {self.root} aside "
                            f"to train this phase anew")
        if frozen is None:  # the checkpoint holds the tables (a phase that trains them, or one from before)
            checkpoint = _sparse_checkpoint(model)
            dcp.load(checkpoint, checkpoint_id=str(path / "sparse"))
            model.load_state_dict(checkpoint["model"], strict=False)
            if "optim" in checkpoint and checkpoint["optim"]["state"]:
                model.fused_optimizer.load_state_dict(checkpoint["optim"])
        if dense is not None:
            if saved_world != self.ctx.world_size and dense.engine.zero_optimization_stage() > 0:
                raise UserError(f"{path}: ZeRO stage {dense.engine.zero_optimization_stage()} state saved on "
                                f"{saved_world} ranks cannot be resumed on {self.ctx.world_size}; resume on "
                                f"{saved_world} ranks, or export the backbone and start a new phase from it")
            load_path, _ = dense.engine.load_checkpoint(str(path / "dense"), tag="state",
                                                        load_module_strict=True, load_optimizer_states=True,
                                                        load_lr_scheduler_states=False)
            if load_path is None:
                raise RuntimeError("DeepSpeed found no dense state")
        rank_file = path / f"train_state_rank{min(self.ctx.rank, saved_world - 1)}.pt"
        state = torch.load(rank_file, weights_only=True)
        torch.set_rng_state(state.pop("rng"))
        if "cuda_rng" in state and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(state.pop("cuda_rng"), self.ctx.device)
        state.pop("cuda_rng", None)
        if data_parallel_optimizer is not None and "dp_optimizer" in state:
            data_parallel_optimizer.load_state_dict(state.pop("dp_optimizer"))
        state["path"] = str(path)
        return state


def _one_line(exc: BaseException, limit: int = 160) -> str:
    """The cause of a failed load in one short line.

    DCP's CheckpointException text is every rank's traceback: its last line holds the cause.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[-1] if type(exc).__name__ == "CheckpointException" else f"{type(exc).__name__}: {lines[0]}"
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _table_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k[len(SPARSE_PREFIX):]: list(v.size()) for k, v in _sparse_state(model).items()}


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
