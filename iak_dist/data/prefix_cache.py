"""The frozen backbone's prefix, computed once per row of the fine-tune split and read back in batches.

Every strategy but `full` leaves the backbone up to the first tower layer's output unchanged (adapters
hook in from `Adapter.adapt_preactivation` on), so `Backbone.prefix` (the interaction output and that
layer's output on it) is a fixed function of each row. One streamed pass over
the split computes it (the embedding lookups and, on several ranks, their all-to-all, paid once); the
fine-tune loop then draws its batches from the cache instead of the Parquet files and the tables.

Layout, under `<root>/<split>/<key>/` (`<root>`: `<seed dir>/prefix_cache`, shared by every strategy of the
seed; `<split>`: `finetune` for the training streams, `valid` for the validation passes):

    part-000000.rec ...  one file per row group of the split (`Split.parts`, in order), its rows in the row
                         group's order: the prefix matrix [rows, width] fp32, then one `META` record per row
                         (labels, domain index, user). Columnar: a batch's prefix rows are gathered from
                         a plain matrix (15x faster than out of records that interleave the labels)
    cache.json           written last, by rank 0: the key, the record layout, each file's rows, bytes and hash

`key` hashes the backbone's weights and identity, the split's fingerprint (paths, sizes, rows) with each
file's modification time (data rewritten in place at the same size) and the schema: another backbone or
changed data gives another folder, never a silent reuse. Two phases of one seed running at once (Ray
runs independent phases together) decide and build one at a time: `<root>/.lock` (`building_lock`).
A folder without `cache.json`, with a file of the wrong size (a truncated write) or of another key is rebuilt
(`phases.finetune.open_prefix_cache`); a file whose bytes differ from its recorded hash is refused
when this process first opens it.

Reading: `CachedSplit` answers `read(part)` as `Split` does, for the same rows (where each row's
record is, and its domain), so `DomainStreams` draws exactly the same rows in the same order from
the cache as from the files (the batch-aware domain sampler is unchanged); `to_batch` gathers the
drawn records; `batches` reads a rank's share in order (validation passes). At most `OPEN_FILES` files
are memory-mapped at a time: memory holds what the streams hold, whatever the size of the cache. Row
groups are not tied to ranks: a cache built on W ranks is read at any world size.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from iak_dist.data.batch import Batch, arrow_to_batch
from iak_dist.data.schema import Schema
from iak_dist.data.source import Part, Split
from iak_dist.distributed.checkpoint import file_hash
from iak_dist.distributed.context import on_every_rank
from iak_dist.errors import UserError
from iak_dist.io import atomic_write_json, fsync_file

FORMAT = 3
"""Version of the record layout: part of the key, so a cache of an older layout is rebuilt (3: the prefix
holds the first tower layer's output too)."""
MARKER = "cache.json"
ROW = "cache_row"  # `CachedSplit.read`'s column: where a row's record is
BUILD_ROWS = 4096  # rows per forward of the build pass
OPEN_FILES = 16  # cache files kept memory-mapped per process (one row group each)


META = np.dtype([("click", np.float32), ("conversion", np.float32), ("domain", np.int64), ("user", np.int64)])
"""What the loop and the sampler read of a cached row besides its prefix."""


def row_bytes(width: int) -> int:
    """Bytes one cached row takes in a file: its prefix and its `META` record."""
    return 4 * width + META.itemsize


@dataclass
class PrefixBatch:
    """A batch read from the cache: what `Batch` gives the loop, with the prefix in place of the IDs."""

    prefix: torch.Tensor  # [B, width] float32: the frozen backbone's `Backbone.prefix`
    click: torch.Tensor  # [B] float32
    conversion: torch.Tensor  # [B] float32
    domain: torch.Tensor  # [B] int64, -1 for a domain the schema does not know
    user: torch.Tensor  # [B] int64

    def __len__(self) -> int:
        return int(self.click.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> PrefixBatch:
        return PrefixBatch(*(t.to(device, non_blocking=non_blocking) for t in
                             (self.prefix, self.click, self.conversion, self.domain, self.user)))


def cache_key(backbone_meta: dict[str, Any], split: Split, schema: Schema) -> str:
    """What the cached prefix is a function of: the backbone (weights hash, identity), the data files
    (fingerprint) and the schema (columns, hashing, domain order)."""
    modified = {str(path): os.stat(path).st_mtime_ns for path in sorted({str(p.path) for p in split.parts})}
    blob = json.dumps({"format": FORMAT, "weights": backbone_meta["weights"], "identity": backbone_meta["identity"],
                       "data": split.fingerprint(), "modified": modified, "schema": schema.as_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def building_lock(root: Path, holder: bool) -> Iterator[None]:
    """An exclusive `flock` on `root/.lock` while a phase decides whether to build and builds (`holder`:
    this process takes it, rank 0 of a phase; the others wait at a barrier). Released with the process
    if it dies."""
    if not holder:
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # waits for another phase's build
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def shard_name(index: int) -> str:
    return f"part-{index:06d}.rec"


def cache_problem(folder: Path, key: str, split: Split) -> str | None:
    """Why `folder` is not a complete cache of `key` over `split`'s row groups (None: it is).

    Checks the marker and every file's size (cheap: no file is read); hashes are checked on read.
    """
    marker = folder / MARKER
    if not marker.is_file():
        return "no cache yet" if not folder.exists() else f"{MARKER} missing (an interrupted build)"
    try:
        meta = json.loads(marker.read_text())
        if meta.get("key") != key or meta.get("format") != FORMAT:
            return f"{MARKER} is for key {meta.get('key')}, not {key}"
        recorded = [(p["path"], p["row_group"], p["rows"]) for p in meta["parts"]]
        if recorded != [(p.path, p.row_group, p.rows) for p in split.parts]:
            return f"{MARKER} lists other row groups than the split's"
        itemsize = row_bytes(meta["width"])
        for p in meta["parts"]:
            path = folder / p["file"]
            size = path.stat().st_size if path.is_file() else None
            if size != p["bytes"] or size != p["rows"] * itemsize or not p.get("hash"):
                return f"{path.name} has {size} bytes, {MARKER} says {p['bytes']} (truncated or missing)"
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return f"{MARKER} unreadable"
    return None


class CachedSplit:
    """The cache read as a `Split` of the same row groups: `read(part)` gives, for each of `part`'s
    rows, where its record is (`ROW`) and its domain (under the schema's column name).

    `DomainStreams` takes it in place of the split: the same parts, pieces, filters and shuffles, so
    the same rows in the same order; what it shuffles and takes is two integer columns, and
    `to_batch` gathers the drawn rows' records from the memory-mapped files (a prefix row is ~10x
    the bytes of its IDs: moving those through Arrow's take cost more than the Parquet path).
    `fingerprint()` is the source split's, so a checkpoint's stream position carries over between
    the cache and the files.
    """

    def __init__(self, folder: Path, source: Split, schema: Schema) -> None:
        self.folder, self.source, self.schema = folder, source, schema
        self.name, self.location, self.parts = source.name, str(folder), source.parts
        meta = json.loads((folder / MARKER).read_text())
        self.width = int(meta["width"])
        self._files = [(p["file"], p["hash"], p["rows"]) for p in meta["parts"]]
        self._index = {(p["path"], p["row_group"]): i for i, p in enumerate(meta["parts"])}
        # file index -> its memory-mapped prefix matrix and META records
        self._open: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._verified: set[int] = set()
        # domain index -> the schema's name (-1 -> null): `domain_indices` maps it back to the index
        self._domain_names = pa.array(schema.domains, pa.string())

    def fingerprint(self) -> str:
        return self.source.fingerprint()

    def _records(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """File `index`'s prefix matrix and META records, memory-mapped (read when touched). Its hash is
        checked the first time this process opens it (the bytes must be what was written). At most
        `OPEN_FILES` stay mapped: the pages a mapping touched count in the process's memory until it is
        closed."""
        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        file, expected, rows = self._files[index]
        path = self.folder / file
        if index not in self._verified:
            if file_hash(path) != expected:
                raise UserError(f"{path}: hash differs from {MARKER} (damaged since it was written); delete "
                                f"{self.folder} and re-run: the cache is rebuilt")
            self._verified.add(index)
        prefix = np.memmap(path, dtype=np.float32, mode="r", shape=(rows, self.width))
        meta = np.memmap(path, dtype=META, mode="r", offset=4 * rows * self.width, shape=(rows,))
        self._open[index] = prefix, meta
        while len(self._open) > OPEN_FILES:
            self._open.popitem(last=False)  # unmapped when the last reference goes
        return self._open[index]

    def read(self, part: Part, columns: list[str] | None = None, check: bool = True) -> pa.Table:
        """`ROW` (file index << 32 | row in the file) and the domain of each of `part`'s rows (`columns`
        and `check` are ignored: the cache holds what training reads, checked when it was built)."""
        index = self._index[(part.path, part.row_group)]
        _, meta = self._records(index)
        rows = (np.int64(index) << 32) + np.arange(part.offset, part.offset + part.rows, dtype=np.int64)
        domain = np.asarray(meta["domain"][part.offset:part.offset + part.rows])
        names = pa.DictionaryArray.from_arrays(pa.array(domain.astype(np.int32), mask=domain < 0), self._domain_names)
        return pa.table({ROW: rows, self.schema.domain: names})

    def to_batch(self, table: pa.Table) -> PrefixBatch:
        """The records of the rows that `DomainStreams` drew from this cache, as the loop's batch."""
        where = table.column(ROW).to_numpy()
        files, rows = where >> 32, where & 0xFFFFFFFF
        prefix = np.empty((len(where), self.width), dtype=np.float32)
        meta = np.empty(len(where), dtype=META)
        for index in np.unique(files).tolist():
            mine = np.flatnonzero(files == index)
            file_prefix, file_meta = self._records(index)
            prefix[mine] = np.asarray(file_prefix)[rows[mine]]  # (a plain view: no memmap subclass per result)
            meta[mine] = np.asarray(file_meta)[rows[mine]]
        return PrefixBatch(torch.from_numpy(prefix), *(torch.from_numpy(np.ascontiguousarray(meta[name]))
                                                       for name in META.names))


    def batches(self, rank: int, world_size: int, rows: int) -> Iterator[PrefixBatch]:
        """Rank `rank`'s share of the cached rows (row groups rank, rank + W, ...) in order, `rows` at a
        time: a pass over the whole split (validation), one row group mapped at a time."""
        for part in self.parts[rank::world_size]:
            where = self.read(part)
            for lo in range(0, where.num_rows, rows):
                yield self.to_batch(where.slice(lo, rows))

    def first_row(self) -> PrefixBatch:
        """One cached row as a batch: `lockstep`'s padding for a rank without rows of its own."""
        return self.to_batch(self.read(self.parts[0]).slice(0, 1))


def _chunks(split: Split, schema: Schema, indices: list[int]) -> Iterator[tuple[int, Batch, bool]]:
    """(row group index, batch of at most `BUILD_ROWS` of its rows, last of the row group) for each
    row group in `indices`, in row order (one row group in memory at a time, as the streams read)."""
    for i in indices:
        table = split.read(split.parts[i], columns=schema.columns())
        for lo in range(0, table.num_rows, BUILD_ROWS):
            rows = table.slice(lo, BUILD_ROWS)
            yield i, arrow_to_batch(rows, schema), lo + BUILD_ROWS >= table.num_rows


class ShardWriter:
    """Writes one row group's file: its prefix rows as they come (hashed as they go out), its META
    records (small) after them at `finish`; renamed when whole."""

    def __init__(self, folder: Path, index: int, part: Part) -> None:
        self.final = folder / shard_name(index)
        self.temp = self.final.with_suffix(".tmp")
        self.entry: dict[str, Any] = {"path": part.path, "row_group": part.row_group, "rows": part.rows,
                                      "file": self.final.name, "bytes": 0}
        self.digest = hashlib.sha256()
        self.meta: list[np.ndarray] = []
        self.out = self.temp.open("wb")

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.digest.update(data)
        self.entry["bytes"] += len(data)

    def append(self, prefix: np.ndarray, meta: np.ndarray) -> None:
        self._write(np.ascontiguousarray(prefix, dtype=np.float32).tobytes())
        self.meta.append(meta)

    def finish(self) -> dict[str, Any]:
        """Write the META records, close and name the file (the marker, written later, vouches for it);
        its marker entry."""
        self._write(np.concatenate(self.meta).tobytes())
        self.out.close()
        fsync_file(self.temp)
        os.replace(self.temp, self.final)
        return {**self.entry, "hash": self.digest.hexdigest()[:16]}  # as `file_hash` gives it


def build_prefix_cache(folder: Path, key: str, split: Split, schema: Schema, width: int,
                       prefix_of: Callable[[Batch], torch.Tensor], rank: int, world_size: int,
                       lockstep: Callable[[Iterator, Callable[[], Any]], Iterator[tuple[Any, bool]]],
                       device: torch.device | None = None) -> dict[str, Any]:
    """Write the cache of `split` into `folder` (collective: every rank calls it; `folder` is empty).

    Rank r computes row groups r, r + W, ...: `prefix_of(batch)` ([B, width], no grad) for each batch
    of `BUILD_ROWS` rows. `lockstep` keeps the ranks' forwards matched (the sharded lookups are
    collective; a rank with fewer batches forwards padding, whose output is dropped). A failure to
    write (a full disk) is raised after the last forward, on every rank, not at once (the others'
    forwards would wait for this rank's). Rank 0 writes `cache.json` last, once every rank's files
    are in place (the all-gather of their hashes is the barrier). Returns the marker's content.
    """
    mine: list[dict[str, Any]] = []
    writer: ShardWriter | None = None
    failure: OSError | None = None

    def padding() -> tuple[int, Batch, bool]:
        return -1, arrow_to_batch(split.read(split.parts[0]).slice(0, 1), schema), False

    ours = list(range(rank, len(split.parts), world_size))
    for (index, batch, last), real in lockstep(_chunks(split, schema, ours), padding):
        prefix = prefix_of(batch if device is None else batch.to(device))
        if not real or failure is not None:
            continue
        meta = np.empty(len(batch), dtype=META)
        for name in META.names:
            meta[name] = getattr(batch, name).numpy()
        try:
            writer = writer or ShardWriter(folder, index, split.parts[index])
            writer.append(prefix.detach().float().cpu().numpy(), meta)
            if last:
                mine.append(writer.finish())
                writer = None
        except OSError as exc:
            failure = exc
    if writer is not None:
        writer.out.close()

    def written() -> None:
        if failure is not None:
            raise failure

    on_every_rank(written, what=f"prefix cache {folder}")
    everyone: list[list[dict[str, Any]]] = [mine]
    if world_size > 1:
        everyone = [[] for _ in range(world_size)]
        dist.all_gather_object(everyone, mine)  # sync point: a few bytes per row group
    by_file = {p["file"]: p for ps in everyone for p in ps}
    meta = {"key": key, "format": FORMAT, "width": width, "rows": split.num_rows, "source": split.location,
            "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "parts": [by_file[shard_name(i)] for i in range(len(split.parts))]}
    if rank == 0:
        atomic_write_json(folder / MARKER, meta)
    return meta


def clear_folder(folder: Path) -> None:
    """Remove a stale or partial cache folder and other keys' folders beside it (one cache per seed)."""
    if folder.parent.is_dir():
        for other in folder.parent.iterdir():
            if other.is_dir():
                shutil.rmtree(other, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
