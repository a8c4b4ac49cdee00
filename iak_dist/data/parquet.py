"""Streaming Parquet reader: this rank's parts of a split -> shuffled `Batch`es, one buffer at a time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from iak_dist.data.batch import Batch, arrow_to_batch
from iak_dist.data.schema import Schema
from iak_dist.data.source import Part, Split, assign, share_rows
from iak_dist.errors import UserError

SPLIT_MODES = ("row_groups", "batch_slices")


@dataclass(frozen=True)
class DataPosition:
    """Where a training phase is in its data: `batches` done of epoch `epoch`, at `world_size` ranks.

    Checkpointed (`state_dict`) so that a resume reads on from exactly there. `fingerprint` (of the
    split's files), `batch_size` and `split_mode` say which assignment the offsets refer to: a
    resume with other values cannot apply them (see `ParquetReader.resume_note`).
    """

    epoch: int
    batches: int
    world_size: int
    fingerprint: str = ""
    batch_size: int = 0
    split_mode: str = ""

    def state_dict(self) -> dict[str, int | str]:
        return {"epoch": self.epoch, "batches": self.batches, "world_size": self.world_size,
                "fingerprint": self.fingerprint, "batch_size": self.batch_size, "split_mode": self.split_mode}

    def advanced(self, batches: int, per_epoch: int) -> DataPosition:
        """The position `batches` (>= 0) batches later (epochs of `per_epoch` batches)."""
        if batches < 0:
            raise ValueError(f"a data position cannot go back ({batches} batches)")
        epoch, done = divmod(self.batches + batches, per_epoch)
        return replace(self, epoch=self.epoch + epoch, batches=done)


class ParquetReader:
    """Reads this rank's share of a split in batches, streaming one buffer of parts at a time.

    Args:
        split: a `Split` (see `iak_dist.data.source`), or a location `Split.at` opens: a Parquet
            file, a folder, a glob or a URI.
        schema: names the columns and tables.
        batch_size: rows per batch.
        rank, world_size: with `split_mode="row_groups"` this rank reads the parts `assign` gives it
            (an equal share of the rows, a new assignment each epoch); with `"batch_slices"` every
            rank reads every row in the same order and keeps slice `rank` of each global batch of
            `batch_size * world_size` rows (N ranks then see exactly what one rank with batch N * B
            sees: a test mode, since every rank reads all the data).
        shuffle: a new part order per epoch, and rows shuffled within a buffer of `shuffle_groups` parts.
        seed: seed of the shuffle and of the assignment (with the epoch).
        drop_last: every rank yields `batches_per_epoch()` full batches (the same on every rank) and
            drops the rest of its share; without it the last batch may be short, and ranks may
            differ by one batch.

    Example::

        split = Split.open("data/ml", "pretrain")
        reader = ParquetReader(split, split.schema, 512, rank=0, world_size=2, shuffle=True)
        for batch in reader.epoch(0):
            ...
    """

    def __init__(
        self,
        split: Split | str | Path,
        schema: Schema,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        shuffle_groups: int = 8,
        split_mode: str = "row_groups",
    ) -> None:
        if split_mode not in SPLIT_MODES:
            raise UserError(f"split mode {split_mode!r}: unknown; known: {', '.join(SPLIT_MODES)}")
        self.split = split if isinstance(split, Split) else Split.at(str(split), schema)
        self.schema = schema
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.shuffle_groups = shuffle_groups
        self.slices = split_mode == "batch_slices"
        total = self.split.num_rows
        if total < world_size:
            raise UserError(f"{self.split.location}: {total} rows cannot feed {world_size} ranks")
        self.read_batch = batch_size * world_size if self.slices else batch_size
        self.read_rows = total if self.slices else share_rows(total, rank, world_size)
        """Rows this rank reads per epoch (every row of the split with batch slices)."""
        self.num_rows = total // world_size if self.slices else self.read_rows
        """Rows this rank trains on per epoch."""
        # with drop_last, the rank with the smallest share sets the epoch's length on every rank
        self._full_batches = (total if self.slices else total // world_size) // self.read_batch
        if drop_last and self._full_batches == 0:
            raise UserError(f"{self.split.location}: {total} rows over {world_size} rank(s) make no full batch of "
                            f"{batch_size} rows; lower the batch size")

    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self._full_batches
        return -(-self.read_rows // self.read_batch)

    def parts(self, epoch: int) -> list[Part]:
        """The parts this rank reads in `epoch`, in reading order."""
        if self.slices:
            return assign(self.split.parts, 0, 1, self.seed, epoch, self.shuffle)
        return assign(self.split.parts, self.rank, self.world_size, self.seed, epoch, self.shuffle)

    def _emit(self, table: pa.Table) -> Batch:
        if self.slices:
            share = -(-table.num_rows // self.world_size)
            table = table.slice(self.rank * share, share)
        return arrow_to_batch(table, self.schema)

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[Batch]:
        """Yield the batches of one epoch (deterministic in `seed` and `epoch`), from `skip_batches` on.

        Skipped batches are not read: whole buffers before the first wanted row are passed over
        by their row counts (from the footers); rows of a buffer are shuffled by a generator of
        their own (seed, epoch, buffer), so the batches after a skip are those of a full epoch.
        """
        self.split.close()  # a file that vanished or changed since the last epoch fails here, named
        parts = self.parts(epoch)
        buffers = [parts[i:i + self.shuffle_groups] for i in range(0, len(parts), self.shuffle_groups)]
        last = self.batches_per_epoch() if self.drop_last else None
        index = skip_batches
        skip_rows = skip_batches * self.read_batch  # rows of this epoch's stream to pass over
        pending: pa.Table | None = None
        for b, buffer in enumerate(buffers):
            rows = sum(p.rows for p in buffer)
            if skip_rows >= rows:
                skip_rows -= rows
                continue
            if last is not None and index >= last:
                return
            chunk = pa.concat_tables([self.split.read(p) for p in buffer], promote_options="default")
            if self.shuffle:
                chunk = chunk.take(np.random.default_rng([self.seed, epoch, b + 1]).permutation(chunk.num_rows))
            if skip_rows:
                chunk, skip_rows = chunk.slice(skip_rows), 0
            pending = chunk if pending is None else pa.concat_tables([pending, chunk], promote_options="default")
            while pending.num_rows >= self.read_batch:
                if last is not None and index >= last:
                    return
                yield self._emit(pending.slice(0, self.read_batch))
                index += 1
                pending = pending.slice(self.read_batch)
        if pending is not None and pending.num_rows and not self.drop_last:
            yield self._emit(pending)

    def position(self, epoch: int, batches: int) -> DataPosition:
        """A position in this reader's data (with what identifies its assignment)."""
        return DataPosition(epoch, batches, self.world_size, self.split.fingerprint(), self.batch_size,
                            "batch_slices" if self.slices else "row_groups")

    def resume_note(self, saved: dict | None) -> str | None:
        """Why a saved position's offsets do not apply to this reader (None: they do).

        Another world size, other files (a file added, removed or rewritten: the fingerprint), another
        batch size or split mode: each gives another assignment of rows to batches. A checkpoint
        from before a key existed is not compared on it.
        """
        if saved is None:
            return None
        here = self.position(0, 0).state_dict()
        for key, what in (("world_size", "rank(s)"), ("fingerprint", "split fingerprint"),
                          ("batch_size", "batch size"), ("split_mode", "split mode")):
            if key in saved and saved[key] not in ("", 0) and str(saved[key]) != str(here[key]):
                return f"the checkpoint's data position is for {what} {saved[key]}, this run has {here[key]}"
        return None

    def resume_position(self, saved: dict | None, step: int) -> DataPosition:
        """Where to read on from after restoring a checkpoint of global step `step`.

        `saved` is the checkpoint's data position (None: none, or a checkpoint older than positions:
        derived from the step). When it applies (`resume_note` is None) reading continues at the
        exact batch. Otherwise (another world size, other files, batch size or split mode) the
        assignment differs, so the epoch in progress ends there: reading continues at the start
        of the next epoch, assigned anew (no row of the finished part of the epoch is read twice;
        the unread rest of that epoch is skipped). A position at an epoch's start stays there.
        """
        if saved is None:
            epoch, batches = divmod(step, self.batches_per_epoch())
            return self.position(epoch, batches)
        if self.resume_note(saved) is None or int(saved["batches"]) == 0:
            return self.position(int(saved["epoch"]), int(saved["batches"]))
        return self.position(int(saved["epoch"]) + 1, 0)

    def batches(self, start: DataPosition) -> Iterator[Batch]:
        """Endless batches from `start` on, epoch after epoch."""
        epoch, skip = start.epoch, start.batches
        while True:
            yield from self.epoch(epoch, skip_batches=skip)
            epoch, skip = epoch + 1, 0


def read_table(split: Split | str | Path, schema: Schema) -> pa.Table:
    """Read a whole split, values checked (small splits only: everything is in memory at once)."""
    split = split if isinstance(split, Split) else Split.at(str(split), schema)
    return pa.concat_tables([split.read(p) for p in split.parts], promote_options="default")
