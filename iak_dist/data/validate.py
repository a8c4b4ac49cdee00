"""Checks of Parquet data against its schema: column types from file metadata, values per table.

Every problem is one line naming the file, the column and (for bad values) the first bad row,
and says how to fix it. `schema_problems` needs only a file's footer; `value_problems` runs on
each row group as it is read (`iak_dist.data.source`), with the row numbers of the file. Imports
only pyarrow and numpy.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from iak_dist.data.schema import Schema


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (pyarrow's span several), cut to `limit` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def schema_problems(where: str, types: dict[str, pa.DataType], schema: Schema) -> list[str]:
    """Problems of a file's columns (`types`: column -> Arrow type, from its footer) against `schema`."""
    problems = [
        f"{where}: column {col!r} is missing (named in the schema); columns present: {', '.join(types)}"
        for col in schema.columns() if col not in types
    ]
    for col in schema.columns():
        if col in types:
            problem = _type_problem(where, col, types[col], schema)
            if problem:
                problems.append(problem)
    return problems


def value_problems(where: str, table: pa.Table, schema: Schema, first_row: int = 0) -> list[str]:
    """Bad values in `table` (rows of a file starting at row `first_row`), at most one per column."""
    out: list[str] = []
    for col in schema.columns():
        if col in table.column_names:
            out.extend(_value_problems(where, col, table.column(col), schema, first_row))
    return out


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


def _type_problem(path: str, col: str, typ: pa.DataType, schema: Schema) -> str | None:
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


def _label_problems(where: str, data: pa.ChunkedArray, first_row: int) -> list[str]:
    """A label must be 0 or 1; float labels are accepted when exactly 0.0 / 1.0 (read as float anyway).

    Trap: a float column cannot be cast to int to compare (0.5 and NaN fail the cast), so floats are
    checked as floats, NaN first (NaN is not in any value set, and "label nan is not 0 or 1" hides why).
    """
    if pa.types.is_floating(data.type):
        nan = pc.is_nan(data)
        if pc.any(nan).as_py():
            count = pc.sum(pc.cast(nan, pa.int64())).as_py()
            return [f"{where} row {first_row + _first_row(nan)}: label is NaN ({count} NaN labels); "
                    f"labels must be 0 or 1: fill or drop these rows"]
        values = data
        allowed = pa.array([0.0, 1.0], data.type)
    else:
        values = pc.cast(data, pa.int64())
        allowed = pa.array([0, 1], pa.int64())
    bad = pc.invert(pc.is_in(values, value_set=allowed))
    if pc.any(bad).as_py():
        row = _first_row(bad)
        return [f"{where} row {first_row + row}: label {values[row].as_py()} is not 0 or 1"]
    return []


def _value_problems(path: str, col: str, data: pa.ChunkedArray, schema: Schema, first_row: int) -> list[str]:
    kind = _kind(col, schema)
    where = f"{path}: column {col!r}"
    out: list[str] = []
    if data.null_count:
        row = _first_row(pc.is_null(data))
        out.append(f"{where} row {first_row + row}: null value ({data.null_count} nulls); fill or drop these rows")
        return out
    if kind == "label":
        out.extend(_label_problems(where, data, first_row))
    elif kind == "dense":
        if pa.types.is_floating(data.type):
            bad = pc.invert(pc.is_finite(data))
            if pc.any(bad).as_py():
                row = _first_row(bad)
                out.append(f"{where} row {first_row + row}: value {data[row].as_py()} is not finite; impute it")
    elif kind == "multi_hot":
        flat = pc.list_flatten(data)
        if flat.null_count:
            lengths = pc.list_value_length(data).to_numpy(zero_copy_only=False)
            nulls = pc.is_null(flat).to_numpy(zero_copy_only=False)
            row = int(np.searchsorted(np.cumsum(lengths), np.flatnonzero(nulls)[0], side="right"))
            out.append(f"{where} row {first_row + row}: the ID list holds a null; drop null IDs from the lists")
        longest = next(f.max_length for f in schema.sparse if f.name == col)
        if longest is not None:
            too_long = pc.greater(pc.list_value_length(data), longest)
            if pc.any(too_long).as_py():
                row = _first_row(too_long)
                out.append(f"{where} row {first_row + row}: the list holds {len(data[row])} IDs, more than the "
                           f"schema's max_length {longest}; cut the lists (a sequence: to its last {longest}) "
                           f"or raise max_length")
    elif kind == "domain":
        known = pa.array(schema.domains, pa.string())
        as_str = pc.cast(data.cast(data.type.value_type) if pa.types.is_dictionary(data.type) else data,
                         pa.string())
        bad = pc.invert(pc.is_in(as_str, value_set=known))
        if pc.any(bad).as_py():
            row = _first_row(bad)
            out.append(
                f"{where} row {first_row + row}: unknown domain {as_str[row].as_py()!r}; the schema knows "
                f"{', '.join(schema.domains)} (add it to the schema's domains list)"
            )
    return out
