"""Streaming Parquet reader: row groups -> shuffled `Batch`es, split across ranks by row group."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from iak_dist.data.batch import Batch, arrow_to_batch
from iak_dist.data.schema import Schema
from iak_dist.data.validate import check_file
from iak_dist.errors import UserError


class ParquetReader:
    """Reads one Parquet file of impressions in batches.

    Args:
        path: the Parquet file (validated against `schema` on construction; a bad file raises a
            one-line `UserError` before anything is read).
        schema: names the columns and tables.
        batch_size: rows per batch.
        rank, world_size: this reader yields row groups `rank, rank + world_size, ...`.
        shuffle: permute row groups per epoch and rows within a buffer of `shuffle_groups` groups.
        seed: base seed of the shuffle (epoch `e` uses `seed + e`).
        drop_last: drop the last, short batch of an epoch (training wants equal batch sizes).

    Example::

        reader = ParquetReader("data/ml/pretrain.parquet", Schema.load("data/ml/schema.yaml"), 512)
        for batch in reader.epoch(0):
            ...
    """

    def __init__(
        self,
        path: str | Path,
        schema: Schema,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        shuffle_groups: int = 8,
    ) -> None:
        check_file(path, schema)
        self.path = Path(path)
        self.schema = schema
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.shuffle_groups = shuffle_groups
        self._file = pq.ParquetFile(self.path)
        groups = list(range(self._file.num_row_groups))
        self.row_groups = groups[rank::world_size]
        if not self.row_groups:
            raise UserError(
                f"{self.path}: {len(groups)} row groups cannot feed {world_size} ranks; "
                f"rewrite it with smaller row groups (data prepare --set data.row_group_size=...)"
            )
        self.num_rows = sum(self._file.metadata.row_group(g).num_rows for g in self.row_groups)

    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_rows, self.batch_size)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[Batch]:
        """Yield the batches of one epoch (deterministic in `seed` and `epoch`), from `skip_batches` on."""
        rng = np.random.default_rng(self.seed + epoch)
        order = rng.permutation(self.row_groups) if self.shuffle else self.row_groups
        pending: pa.Table | None = None
        index = 0
        columns = self.schema.columns()
        for start in range(0, len(order), self.shuffle_groups):
            chunk = self._file.read_row_groups([int(g) for g in order[start:start + self.shuffle_groups]],
                                               columns=columns)
            if self.shuffle:
                chunk = chunk.take(rng.permutation(chunk.num_rows))
            pending = chunk if pending is None else pa.concat_tables([pending, chunk])
            while pending.num_rows >= self.batch_size:
                if index >= skip_batches:
                    yield arrow_to_batch(pending.slice(0, self.batch_size), self.schema)
                index += 1
                pending = pending.slice(self.batch_size)
        if pending is not None and pending.num_rows and not self.drop_last and index >= skip_batches:
            yield arrow_to_batch(pending, self.schema)


def read_table(path: str | Path, schema: Schema) -> pa.Table:
    """Validate and read a whole file (fine-tune and test splits, which are small by design)."""
    check_file(path, schema)
    return pq.read_table(path, columns=schema.columns())
