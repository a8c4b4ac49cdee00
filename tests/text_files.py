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


def slot_texts(item_ids: np.ndarray, vectors: np.ndarray, table_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`(slots [S] ascending, texts [S, T] float64)`: each occupied slot of the item table and the mean of the
    text vectors of the items hashed to it (the reference for the text table and the ID matcher)."""
    from iak_dist.data.schema import hash_ids

    slots, index = np.unique(hash_ids(np.asarray(item_ids, np.int64), table_size), return_inverse=True)
    texts = np.zeros((len(slots), vectors.shape[1]), np.float64)
    np.add.at(texts, index, vectors)
    return slots, texts / np.bincount(index, minlength=len(slots))[:, None]


def read_item_text(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(item IDs [N], vectors [N, 384]) of `data_dir/item_text.parquet`, whole, through the checked reader
    (`open_item_text`, `item_text_batches`): what the tests compare tables with."""
    from iak_dist.data.item_text import item_text_batches, open_item_text

    parts = list(item_text_batches(open_item_text(data_dir)))
    return np.concatenate([ids for ids, _ in parts]), np.concatenate([vectors for _, vectors in parts])
