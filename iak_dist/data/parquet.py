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
        rank, world_size: with `split="row_groups"` this reader yields row groups
            `rank, rank + world_size, ...`; with `split="batch_slices"` every rank reads the whole file
            in the same order and keeps slice `rank` of each global batch of `batch_size * world_size`
            rows (N ranks then see exactly what one rank with batch N * B sees).
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
        split: str = "row_groups",
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
        self.slices = split == "batch_slices"
        self.row_groups = groups if self.slices else groups[rank::world_size]
        if not self.row_groups:
            raise UserError(
                f"{self.path}: {len(groups)} row groups cannot feed {world_size} ranks; "
                f"rewrite it with smaller row groups (data prepare --set data.row_group_size=...)"
            )
        rows = sum(self._file.metadata.row_group(g).num_rows for g in self.row_groups)
        self.read_batch = batch_size * world_size if self.slices else batch_size
        self.num_rows = rows // world_size if self.slices else rows

    def batches_per_epoch(self) -> int:
        total = self.num_rows * self.world_size if self.slices else self.num_rows
        full, rest = divmod(total, self.read_batch)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def _emit(self, table: pa.Table) -> Batch:
        if self.slices:
            share = -(-table.num_rows // self.world_size)
            table = table.slice(self.rank * share, share)
        return arrow_to_batch(table, self.schema)

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
            while pending.num_rows >= self.read_batch:
                if index >= skip_batches:
                    yield self._emit(pending.slice(0, self.read_batch))
                index += 1
                pending = pending.slice(self.read_batch)
        if pending is not None and pending.num_rows and not self.drop_last and index >= skip_batches:
            yield self._emit(pending)


def read_table(path: str | Path, schema: Schema) -> pa.Table:
    """Validate and read a whole file (fine-tune and test splits, which are small by design)."""
    check_file(path, schema)
    return pq.read_table(path, columns=schema.columns())
