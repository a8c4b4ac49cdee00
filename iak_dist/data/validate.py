"""Checks a Parquet file against its schema and reports every problem, each on one line.

Every problem names the file, the column and (for bad values) the first bad row, and says how to
fix it. Readers call `check_file` before reading anything, so bad input fails before any output
is written. Imports only pyarrow and numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from iak_dist.data.schema import Schema
from iak_dist.errors import UserError


def validate_file(path: str | Path, schema: Schema) -> list[str]:
    """Return every problem found in `path` (an empty list means the file is good)."""
    path = Path(path)
    if not path.is_file():
        return [f"{path}: no such file"]
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for non-Parquet bytes
        return [f"{path}: not a readable Parquet file ({exc}); rewrite it with pyarrow.parquet.write_table"]
    if pf.metadata.num_rows == 0:
        return [f"{path}: the file has no rows; write at least one impression or leave the file out"]
    arrow_schema = pf.schema_arrow
    problems: list[str] = []
    present = set(arrow_schema.names)
    wanted = schema.columns()
    for col in wanted:
        if col not in present:
            problems.append(
                f"{path}: column {col!r} is missing (named in the schema); columns present: "
                f"{', '.join(arrow_schema.names)}"
            )
    types_ok: list[str] = []
    for col in wanted:
        if col not in present:
            continue
        problem = _type_problem(path, col, arrow_schema.field(col).type, schema)
        if problem:
            problems.append(problem)
        else:
            types_ok.append(col)
    if not types_ok:
        return problems
    table = pf.read(columns=types_ok)
    for col in types_ok:
        problems.extend(_value_problems(path, col, table.column(col), schema))
    return problems


def check_file(path: str | Path, schema: Schema) -> None:
    """Raise a one-line `UserError` with the first problem in `path`, if any."""
    problems = validate_file(path, schema)
    if problems:
        more = f" ({len(problems) - 1} more: run `iak-dist data validate {path}`)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)


def _kind(col: str, schema: Schema) -> str:
    if col in schema.label_columns:
        return "label"
    if col == schema.domain:
        return "domain"
    for f in schema.sparse:
        if f.name == col:
            return "multi_hot" if f.multi_hot else "single_hot"
    if col in schema.dense:
        return "dense"
    return "user"


def _type_problem(path: Path, col: str, typ: pa.DataType, schema: Schema) -> str | None:
    kind = _kind(col, schema)
    where = f"{path}: column {col!r}"
    if kind == "label" and not (pa.types.is_integer(typ) or pa.types.is_boolean(typ) or pa.types.is_floating(typ)):
        return f"{where} has type {typ}; labels must be int (0/1), bool or float (0.0/1.0)"
    if kind == "domain" and not (pa.types.is_integer(typ) or pa.types.is_string(typ)
                                 or pa.types.is_large_string(typ) or pa.types.is_dictionary(typ)):
        return f"{where} has type {typ}; the domain must be a string or an int"
    if kind in ("single_hot", "user") and not pa.types.is_integer(typ):
        hint = " (a list column: set multi_hot: true in the schema)" if pa.types.is_list(typ) else ""
        return f"{where} has type {typ}; single-hot IDs must be int64{hint}"
    if kind == "multi_hot" and not (
        (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and pa.types.is_integer(typ.value_type)
    ):
        return f"{where} has type {typ}; multi-hot IDs must be list<int64> (or set multi_hot: false)"
    if kind == "dense" and not (pa.types.is_floating(typ) or pa.types.is_integer(typ)):
        return f"{where} has type {typ}; dense features must be float or int"
    return None


def _first_row(mask: pa.Array | pa.ChunkedArray | np.ndarray) -> int:
    arr = np.asarray(mask.to_numpy(zero_copy_only=False) if hasattr(mask, "to_numpy") else mask)
    return int(np.flatnonzero(arr)[0])


def _label_problems(where: str, data: pa.ChunkedArray) -> list[str]:
    """A label must be 0 or 1; float labels are accepted when exactly 0.0 / 1.0 (read as float anyway).

    Trap: a float column cannot be cast to int to compare (0.5 and NaN fail the cast), so floats are
    checked as floats, NaN first (NaN is not in any value set, and "label nan is not 0 or 1" hides why).
    """
    if pa.types.is_floating(data.type):
        nan = pc.is_nan(data)
        if pc.any(nan).as_py():
            count = pc.sum(pc.cast(nan, pa.int64())).as_py()
            return [f"{where} row {_first_row(nan)}: label is NaN ({count} NaN labels); "
                    f"labels must be 0 or 1: fill or drop these rows"]
        values = data
        allowed = pa.array([0.0, 1.0], data.type)
    else:
        values = pc.cast(data, pa.int64())
        allowed = pa.array([0, 1], pa.int64())
    bad = pc.invert(pc.is_in(values, value_set=allowed))
    if pc.any(bad).as_py():
        row = _first_row(bad)
        return [f"{where} row {row}: label {values[row].as_py()} is not 0 or 1"]
    return []


def _value_problems(path: Path, col: str, data: pa.ChunkedArray, schema: Schema) -> list[str]:
    kind = _kind(col, schema)
    where = f"{path}: column {col!r}"
    out: list[str] = []
    if data.null_count:
        row = _first_row(pc.is_null(data))
        out.append(f"{where} row {row}: null value ({data.null_count} nulls); fill or drop these rows")
        return out
    if kind == "label":
        out.extend(_label_problems(where, data))
    elif kind == "dense":
        if pa.types.is_floating(data.type):
            bad = pc.invert(pc.is_finite(data))
            if pc.any(bad).as_py():
                row = _first_row(bad)
                out.append(f"{where} row {row}: value {data[row].as_py()} is not finite; impute it")
    elif kind == "multi_hot":
        flat = pc.list_flatten(data)
        if flat.null_count:
            lengths = pc.list_value_length(data).to_numpy(zero_copy_only=False)
            nulls = pc.is_null(flat).to_numpy(zero_copy_only=False)
            row = int(np.searchsorted(np.cumsum(lengths), np.flatnonzero(nulls)[0], side="right"))
            out.append(f"{where} row {row}: the ID list holds a null; drop null IDs from the lists")
    elif kind == "domain":
        known = pa.array(schema.domains, pa.string())
        as_str = pc.cast(data.cast(data.type.value_type) if pa.types.is_dictionary(data.type) else data,
                         pa.string())
        bad = pc.invert(pc.is_in(as_str, value_set=known))
        if pc.any(bad).as_py():
            row = _first_row(bad)
            out.append(
                f"{where} row {row}: unknown domain {as_str[row].as_py()!r}; the schema knows "
                f"{', '.join(schema.domains)} (add it to the schema's domains list)"
            )
    return out
