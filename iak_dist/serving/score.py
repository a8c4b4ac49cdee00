"""`iak-dist score`: batch scoring of a Parquet file or folder with a serving artefact.

Streams the input batch by batch (`pyarrow.dataset`: a file, or a folder read recursively with Hive
`key=value/` folders; one batch and one file read ahead at most), scores each with the `Predictor`
and appends it to the output, so memory stays one batch whatever the input's size. The output holds
the input's key columns (the schema's user column, its single-hot ID columns, its domain column) and
`p_ctr`, `p_cvr`, `p_ctcvr`, in input order; it appears complete or not at all (`io.atomic_path`).
Labels are not needed (and not copied). Rows of unknown domains are scored by the backbone and counted.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from tqdm import tqdm

from iak_dist.data.schema import Schema
from iak_dist.errors import UserError
from iak_dist.io import atomic_path
from iak_dist.runtime import say

SCORES = ("p_ctr", "p_cvr", "p_ctcvr")


def key_columns(schema: Schema) -> list[str]:
    """The columns that identify a scored row: user, single-hot IDs (item ...), domain (each once)."""
    keys = [schema.user] if schema.user else []
    keys += [f.name for f in schema.sparse if not f.multi_hot]
    keys.append(schema.domain)
    return list(dict.fromkeys(keys))


def open_input(data: Path) -> ds.Dataset:
    """The Parquet rows at `data` (a file or a folder) as a dataset; one-line UserError when unreadable."""
    if not data.exists():
        raise UserError(f"{data}: no such file or folder")
    try:
        return ds.dataset(str(data), format="parquet", partitioning="hive")
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{data}: not readable as Parquet ({str(exc).splitlines()[0]})") from None


def score_parquet(artefact: Path, data: Path, out: Path, batch_size: int = 65536, show_progress: bool = True) -> int:
    """Score every row of `data` with the artefact in `artefact`; write keys + scores to `out`. Returns rows written."""
    from iak_dist.serving.predictor import Predictor, RequestError

    artefact, data, out = Path(artefact), Path(data), Path(out)
    if batch_size < 1:
        raise UserError(f"batch size {batch_size}: must be at least 1")
    predictor = Predictor.load(artefact)
    dataset = open_input(data)
    keys = key_columns(predictor.schema)
    needed = list(dict.fromkeys([*keys, *predictor.request_columns()]))
    missing = [c for c in needed if c not in dataset.schema.names]
    if missing:
        raise UserError(f"{data}: no column {missing[0]!r} (a request needs {', '.join(predictor.request_columns())})")
    out_schema = pa.schema([dataset.schema.field(c) for c in keys] + [pa.field(s, pa.float32()) for s in SCORES])
    written = 0
    with (tqdm(total=dataset.count_rows(), unit="rows", unit_scale=True, desc="score", disable=not show_progress)
          as bar, atomic_path(out) as tmp, pq.ParquetWriter(tmp, out_schema) as writer):
        for batch in dataset.to_batches(columns=needed, batch_size=batch_size, batch_readahead=1,
                                        fragment_readahead=1):
            if not batch.num_rows:
                continue
            table = pa.Table.from_batches([batch])
            try:
                scores = predictor.score(table)
            except RequestError as exc:
                raise UserError(f"{data}: rows {written}-{written + batch.num_rows - 1}: {exc}") from None
            columns = [table.column(c) for c in keys] + [pa.array(scores[s]) for s in SCORES]
            writer.write_table(pa.Table.from_arrays(columns, schema=out_schema))
            written += batch.num_rows
            bar.update(batch.num_rows)
    if predictor.unknown_rows:
        say(f"[score] {predictor.unknown_rows} row(s) of domains the artefact does not know "
            f"(it knows {', '.join(predictor.domains)}): scored by the backbone alone")
    return written
