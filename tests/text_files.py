"""item_text.parquet with given vectors (no encoder needed), for the item tower and ID matcher tests."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def fake_item_text(data_dir: Path, item_ids: np.ndarray, vectors: np.ndarray,
                   row_group_size: int | None = None) -> None:
    """`data_dir/item_text.parquet` as `write_item_text` writes it, with the given vectors; `row_group_size`
    small to make several row groups (the ranks share them)."""
    from iak_dist.data.item_text import _META, _META_PREFIX, TEXT_DIM
    from iak_dist.data.prepare import ITEM_TEXT_FILE

    table = pa.table({"item_id": pa.array(item_ids, pa.int64()), "text": pa.array([str(i) for i in item_ids]),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()),
                                                                     TEXT_DIM)})
    pq.write_table(table.replace_schema_metadata({_META_PREFIX + k: v for k, v in _META.items()}),
                   Path(data_dir) / ITEM_TEXT_FILE, row_group_size=row_group_size)
