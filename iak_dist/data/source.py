"""Where a split's Parquet files are, and reading them one row group at a time.

A split is one Parquet file, a directory (searched recursively; Hive folders such as
`dt=2026-11-01/` become string columns), or a glob, on the local file system or any file system
pyarrow reaches by URI (`file://`, `s3://`, ..., and through fsspec e.g. `memory://`).
`schema.yaml` may say where each split is (`splits:`); without it a split is `<name>.parquet`
beside schema.yaml.

Opening a split reads Parquet footers only: files, row groups and row counts, and the column
types (every file must agree with the schema and with the others). Values are checked as each row
group is read (`Split.read`), so nothing reads a whole split up front. Ranks are given their share
of the rows by `assign`. Imports only pyarrow, numpy and yaml (no torch): `data validate` uses it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from iak_dist.data.schema import Schema
from iak_dist.data.validate import one_line, schema_problems, value_problems
from iak_dist.errors import UserError

SPLITS = ("pretrain", "finetune", "valid", "test")
"""The splits a data folder holds, in pipeline and time order (the one list of them). `valid` lies
between fine-tune and test in time: early stopping and every choice of strategy or hyper-parameter
read it, so `test` is read only for the final report."""

_GLOB_CHARS = "*?["
_OPEN_FILES = 8  # Parquet files kept open per split (their footers are in memory, nothing else)


@dataclass(frozen=True)
class Part:
    """A run of rows of one row group of one file: the unit of reading and of rank assignment.

    `Split.parts` are whole row groups (`offset == 0`); `assign` may cut the two row groups at the
    ends of a rank's share, so that every rank gets the same number of rows to one row.
    """

    path: str
    """The file, as its file system names it (`Split.where(path)` is what messages show)."""
    row_group: int
    rows: int
    first_row: int
    """Row index, within its file, of this part's first row (error messages count rows this way)."""
    offset: int = 0
    """Rows of the row group before this part's first row."""


def split_locations(schema_path: str | Path) -> dict[str, str] | None:
    """The `splits:` mapping of a schema file (None when it has none: the one-file-per-split layout)."""
    schema_path = Path(schema_path)
    if not schema_path.is_file():
        return None
    raw = (yaml.safe_load(schema_path.read_text()) or {}).get("splits")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise UserError(f"{schema_path}: key splits: expected a mapping like `pretrain: pretrain/`, got {raw!r}")
    for name, location in raw.items():
        if name not in SPLITS:
            raise UserError(f"{schema_path}: key splits.{name}: unknown split; known: {', '.join(SPLITS)}")
        if not isinstance(location, str) or not location:
            raise UserError(f"{schema_path}: key splits.{name}: expected a file, folder, glob or URI, got {location!r}")
    return dict(raw)


def split_location(data_dir: str | Path, name: str) -> str:
    """Where split `name` of the data folder `data_dir` is (a local path or a URI)."""
    if name not in SPLITS:
        raise UserError(f"split {name!r}: unknown; known: {', '.join(SPLITS)}")
    data_dir = Path(data_dir)
    schema_path = data_dir / "schema.yaml"
    locations = split_locations(schema_path)
    if locations is None:
        return str(data_dir / f"{name}.parquet")
    if name not in locations:
        raise UserError(f"{schema_path}: splits lists no {name!r} split (it lists {', '.join(locations)}); "
                        f"add `{name}: <file, folder, glob or URI>` under splits")
    location = locations[name]
    if "://" in location or os.path.isabs(location):
        return location
    return str(data_dir / location)


def _filesystem(location: str) -> tuple[pafs.FileSystem, str, str]:
    """(file system, path within it, prefix that turns such a path back into what the user wrote)."""
    if "://" not in location:
        return pafs.LocalFileSystem(), os.path.abspath(location), ""
    scheme = location.split("://", 1)[0]
    if scheme == "file":
        return pafs.LocalFileSystem(), location[len("file://"):], ""
    pattern = None
    static = location
    if any(c in location for c in _GLOB_CHARS):  # from_uri would refuse the glob characters
        static, pattern = _glob_root(location)
    try:
        fs, path = pafs.FileSystem.from_uri(static)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as arrow_error:
        try:
            import fsspec

            spec_fs, path = fsspec.core.url_to_fs(static)
        except (ImportError, ValueError) as exc:
            raise UserError(f"{location}: no file system for {scheme}:// (pyarrow: {one_line(arrow_error)}; "
                            f"fsspec: {one_line(exc)})") from None
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(spec_fs))
    if pattern is not None:
        path = path.rstrip("/") + "/" + pattern
    return fs, path, f"{scheme}://"


def _glob_root(path: str) -> tuple[str, str]:
    """Split a glob into its folder without glob characters and the pattern below it."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in _GLOB_CHARS):
            return "/".join(parts[:i]) or "/", "/".join(parts[i:])
    return path, ""


def _is_data_file(relative: str) -> bool:
    """A Parquet file, not hidden or a writer's side file (`_SUCCESS`, `_metadata`, `.crc`)."""
    return relative.endswith(".parquet") and not any(c.startswith((".", "_")) for c in relative.split("/"))


def _partition_values(relative: str) -> dict[str, str]:
    """Hive partition columns of a file from its folders below the split's root (`dt=2026-11-01/`)."""
    out = {}
    for folder in relative.split("/")[:-1]:
        key, sep, value = folder.partition("=")
        if sep and key:
            out[unquote(key)] = unquote(value)
    return out


class Split:
    """The Parquet files of one split, known from their footers; reads one part at a time.

    Example::

        split = Split.open("data/synth", "pretrain")
        for part in assign(split.parts, rank=0, world_size=2, seed=0, epoch=0, shuffle=True):
            table = split.read(part)  # one row group (or the end of one), values checked
    """

    def __init__(self, name: str, location: str, schema: Schema, filesystem: pafs.FileSystem, prefix: str,
                 files: list[str], sizes: list[int | None], partitions: dict[str, dict[str, str]],
                 parts: list[Part], file_rows: dict[str, int]) -> None:
        self.name = name
        self.location = location
        self.schema = schema
        self.filesystem = filesystem
        self.files = files
        self.parts = parts
        self.num_rows = sum(p.rows for p in parts)
        self._prefix = prefix
        self._sizes = dict(zip(files, sizes, strict=True))
        self._partitions = partitions
        # Per file only its row count (and the parts' row-group counts): whole footers grow with files x
        # row groups x columns on every rank; a file's footer is read again when it is opened.
        self._file_rows = file_rows
        self._fingerprint: str | None = None
        self._open: OrderedDict[str, pq.ParquetFile] = OrderedDict()
        self._checked: set[tuple[Part, tuple[str, ...]]] = set()  # read and found good: not checked again

    @classmethod
    def open(cls, data_dir: str | Path, name: str, schema: Schema | None = None) -> Split:
        """Split `name` of the data folder `data_dir` (where schema.yaml is), checked from its footers."""
        schema = schema or Schema.load(Path(data_dir) / "schema.yaml")
        return cls.at(split_location(data_dir, name), schema, name)

    @classmethod
    def at(cls, location: str | Path, schema: Schema, name: str = "") -> Split:
        """The split at `location` (file, folder, glob or URI); the first problem raises a one-line UserError."""
        split, problems = cls.scan(location, schema, name)
        if problems:
            more = (f" ({len(problems) - 1} more: run `iak-dist data validate {location}`)"
                    if len(problems) > 1 else "")
            raise UserError(problems[0] + more)
        assert split is not None
        return split

    @classmethod
    def scan(cls, location: str | Path, schema: Schema, name: str = "") -> tuple[Split | None, list[str]]:
        """The split and every problem its footers show (None when it cannot be opened at all)."""
        location = str(location)
        fs, path, prefix = _filesystem(location)
        try:
            files, root = _list_files(fs, path, location)
        except UserError as exc:
            return None, [str(exc)]

        def where(p: str) -> str:
            return prefix + p if prefix else p

        def footer(file: pafs.FileInfo) -> pq.FileMetaData | str:
            try:
                with fs.open_input_file(file.path) as f:
                    return pq.ParquetFile(f).metadata
            except Exception as exc:  # noqa: BLE001  (pyarrow raises ArrowInvalid / OSError for bad bytes)
                return (f"{where(file.path)}: not a readable Parquet file ({one_line(exc)}); "
                        f"rewrite it with pyarrow.parquet.write_table")

        with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:  # footers of a remote store: latency
            footers = list(pool.map(footer, files))
        problems = [f for f in footers if isinstance(f, str)]
        wanted = schema.columns()
        reference: tuple[str, dict[str, pa.DataType]] | None = None
        parts: list[Part] = []
        partitions: dict[str, dict[str, str]] = {}
        file_rows: dict[str, int] = {}
        for info, meta in zip(files, footers, strict=True):
            if isinstance(meta, str):
                continue
            relative = info.path[len(root):].lstrip("/") if root else info.base_name
            partitions[info.path] = _partition_values(relative)
            arrow = meta.schema.to_arrow_schema()
            types = {n: arrow.field(n).type for n in arrow.names}
            for key in partitions[info.path]:
                if key in types:
                    problems.append(f"{where(info.path)}: column {key!r} is both in the file and a Hive folder "
                                    f"({key}=...); drop one of them")
                types[key] = pa.string()
            types = {c: types[c] for c in wanted if c in types}
            if reference is None:
                reference = (info.path, types)
                problems.extend(schema_problems(where(info.path), types, schema))
            else:
                problems.extend(_disagreement(where(reference[0]), reference[1], where(info.path), types))
            first = 0
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                if rows:
                    parts.append(Part(info.path, g, rows, first))
                first += rows
            file_rows[info.path] = meta.num_rows
        if not problems and not parts:
            what = "the file has no rows" if len(files) == 1 and files[0].path == path else \
                f"its {len(files)} Parquet file(s) have no rows"
            problems.append(f"{location}: {what}; write at least one impression or leave the file out")
        split = cls(name, location, schema, fs, prefix, [f.path for f in files], [f.size for f in files],
                    partitions, parts, file_rows)
        return split, problems

    def where(self, path: str) -> str:
        """A file of this split as messages show it (with the URI scheme for a remote store)."""
        return self._prefix + path

    def read(self, part: Part, columns: list[str] | None = None, check: bool = True) -> pa.Table:
        """The rows of `part` (columns: default the schema's, Hive folder values included).

        With `check`, a bad value raises a one-line UserError naming file and row (a part is checked
        the first time this process reads it: later epochs do not pay again; a file whose size
        changed is refused). A file that vanished or was truncated since the split was opened
        raises a UserError naming it.
        """
        columns = columns or self.schema.columns()
        from_folders = self._partitions.get(part.path, {})
        try:
            file = self._file(part.path)
            table = file.read_row_group(part.row_group, columns=[c for c in columns if c not in from_folders])
        except Exception as exc:  # noqa: BLE001  (FileNotFoundError, OSError, ArrowInvalid: all mean the same here)
            stale = self._open.pop(part.path, None)
            if stale is not None:
                _close_file(stale)
            raise UserError(f"{self.where(part.path)}: row group {part.row_group} could not be read "
                            f"({one_line(exc)}); the file changed or vanished after the split was opened: "
                            f"restore it and re-run (training resumes from its last checkpoint)") from None
        if part.offset or part.rows != table.num_rows:
            table = table.slice(part.offset, part.rows)
        for key, value in from_folders.items():
            if key in columns:
                table = table.append_column(key, pa.repeat(pa.scalar(value, pa.string()), table.num_rows))
        table = table.select(columns)
        if check and (part, tuple(columns)) not in self._checked:
            problems = value_problems(self.where(part.path), table, self.schema, part.first_row)
            if problems:
                raise UserError(problems[0])
            self._checked.add((part, tuple(columns)))
        return table

    def close(self) -> None:
        """Close the open files: the next read opens them again, so a file replaced or removed since is seen."""
        while self._open:
            _close_file(self._open.popitem(last=False)[1])

    def _file(self, path: str) -> pq.ParquetFile:
        """An open Parquet file (a few stay open: a rank reads its parts of one file in a row)."""
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        stream = self.filesystem.open_input_file(path)
        try:
            size = self._sizes.get(path)
            if size is not None and stream.size() != size:
                raise OSError(f"it now has {stream.size()} bytes, not {size}")
            file = pq.ParquetFile(stream)
        except BaseException:
            stream.close()
            raise
        self._open[path] = file
        while len(self._open) > _OPEN_FILES:
            _close_file(self._open.popitem(last=False)[1])
        return file

    def content_fingerprint(self) -> str:
        """`fingerprint` by file name instead of path: the same for a copy of the folder elsewhere (what a
        backbone records of the split it was pre-trained on)."""
        h = hashlib.sha256()
        for path in self.files:
            h.update(f"{Path(str(path)).name}\0{self._sizes[path]}\0{self._file_rows.get(path, 0)}\n".encode())
        return h.hexdigest()[:16]

    def fingerprint(self) -> str:
        """Hash of (file, size, rows) of every file: a cache key, provenance, and a resume's check
        that the data position refers to the same files."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for path in self.files:
                h.update(f"{path}\0{self._sizes[path]}\0{self._file_rows.get(path, 0)}\n".encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


def _close_file(file: pq.ParquetFile) -> None:
    """Close a Parquet file and the stream under it (`ParquetFile.close` leaves a given stream open)."""
    file.close(force=True)


def _list_files(fs: pafs.FileSystem, path: str, shown: str) -> tuple[list[pafs.FileInfo], str]:
    """The Parquet files at `path` (a file, a folder searched recursively or a glob), sorted; and their root.

    `shown` is the location as the user wrote it (with its URI scheme): messages name that.
    A glob matches path segment by segment (`*`, `?`, `[...]` never cross `/`; `**` matches any
    number of folders) and keeps Parquet files only, as a folder does.
    """
    if any(c in path for c in _GLOB_CHARS):
        root, pattern = _glob_root(path)
        infos = _walk(fs, root, shown) if fs.get_file_info(root).type == pafs.FileType.Directory else []
        wanted = pattern.split("/")
        found = [i for i in infos if _is_data_file(i.path[len(root):].lstrip("/"))
                 and _glob_match(i.path[len(root):].lstrip("/").split("/"), wanted)]
        if not found:
            raise UserError(f"{shown}: the glob matches no file (Parquet files: *.parquet; `*` stays within a "
                            f"folder, `**` crosses folders)")
        return sorted(found, key=lambda i: i.path), root
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [info], ""
    if info.type != pafs.FileType.Directory:
        raise UserError(f"{shown}: no such file or folder")
    found = [i for i in _walk(fs, path, shown) if _is_data_file(i.path[len(path):].lstrip("/"))]
    if not found:
        raise UserError(f"{shown}: the folder holds no Parquet files (*.parquet, searched recursively)")
    return sorted(found, key=lambda i: i.path), path


def _glob_match(segments: list[str], pattern: list[str]) -> bool:
    """Whether path segments match glob segments: one segment each, `**` any number of them."""
    if not pattern:
        return not segments
    if pattern[0] == "**":
        return any(_glob_match(segments[i:], pattern[1:]) for i in range(len(segments) + 1))
    return bool(segments) and fnmatch.fnmatchcase(segments[0], pattern[0]) and _glob_match(segments[1:], pattern[1:])


def _walk(fs: pafs.FileSystem, root: str, shown: str) -> list[pafs.FileInfo]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except (FileNotFoundError, OSError) as exc:
        raise UserError(f"{shown}: cannot list {root} ({one_line(exc)})") from None
    return [i for i in infos if i.type == pafs.FileType.File]


def _disagreement(first: str, want: dict[str, pa.DataType], other: str, got: dict[str, pa.DataType]) -> list[str]:
    """Columns whose presence or type differs between two files of a split (named both)."""
    out = []
    for col in want.keys() | got.keys():
        if col not in got:
            out.append(f"{other}: column {col!r} is missing but {first} has it; files of a split must agree")
        elif col not in want:
            out.append(f"{other}: column {col!r} is present but {first} lacks it; files of a split must agree")
        elif got[col] != want[col]:
            out.append(f"{other}: column {col!r} has type {got[col]} but {want[col]} in {first}; "
                       f"files of a split must agree (rewrite one with the other's types)")
    return sorted(out)


def assign(parts: list[Part], rank: int, world_size: int, seed: int, epoch: int, shuffle: bool) -> list[Part]:
    """This rank's parts of an epoch: disjoint across ranks, covering all rows, equal to one row.

    The parts are put in an order that depends only on (seed, epoch) (file order without
    `shuffle`), and rank r takes rows [r * N / W, (r + 1) * N / W) of that sequence, cutting at most
    the two row groups at the ends of its share. The order is the same for every world size, so a
    rank's share is a contiguous run of it.
    """
    order = [parts[i] for i in np.random.default_rng([seed, epoch]).permutation(len(parts))] if shuffle else parts
    total = sum(p.rows for p in order)
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size
    mine, start = [], 0
    for p in order:
        end = start + p.rows
        a, b = max(lo, start), min(hi, end)
        if a < b:
            skip = a - start
            mine.append(p if (a, b) == (start, end) else
                        Part(p.path, p.row_group, b - a, p.first_row + skip, p.offset + skip))
        start = end
        if start >= hi:
            break
    return mine


def share_rows(total: int, rank: int, world_size: int) -> int:
    """Rows `assign` gives `rank` of `total` (N // W or one more)."""
    return total * (rank + 1) // world_size - total * rank // world_size


def validate(location: str | Path, schema: Schema, progress: bool = False) -> tuple[Split | None, list[str]]:
    """Every problem of the split at `location`: footers first, then values one row group at a time.

    Memory holds one row group, whatever the size of the split. Value problems of one file and
    column are reported once, at the first bad row, with the number of row groups that have more.
    """
    split, problems = Split.scan(location, schema)
    if split is None or problems:
        return split, problems
    first: dict[tuple[str, str], str] = {}
    repeats: dict[tuple[str, str], int] = {}
    for part, found in _stream_problems(split, progress):
        for problem in found:
            key = (part.path, problem.split(" row ", 1)[0])
            if key in first:
                repeats[key] = repeats.get(key, 0) + 1
            else:
                first[key] = problem
    for key, problem in first.items():
        problems.append(problem + (f" (and in {repeats[key]} more row group(s))" if key in repeats else ""))
    return split, problems


def _stream_problems(split: Split, progress: bool) -> Iterator[tuple[Part, list[str]]]:
    from tqdm import tqdm

    with tqdm(total=split.num_rows, unit="rows", unit_scale=True, disable=not progress,
              desc=f"validate {split.location}", leave=False) as bar:
        for part in split.parts:
            table = split.read(part, check=False)
            yield part, value_problems(split.where(part.path), table, split.schema, part.first_row)
            bar.update(part.rows)
