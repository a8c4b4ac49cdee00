"""Fine-tuning's rows as one stream per domain over this rank's share of the split.

The batch-aware domain sampler (`sampler.DomainPicks`: each row of a batch picks domain d with
`p_d ∝ n_d ** alpha`) draws here from streams instead of an in-memory table, so a rank holds at
most K domains x (shuffle buffer + one part) rows, never the split.

- Share: this rank's parts are `assign(split.parts, rank, world_size, seed, epoch=0, shuffle=True)`,
  fixed for the phase: disjoint, equal to one row (a one-row-group `finetune.parquet` is cut into
  row ranges), the same for every domain stream.
- Counts: one pass reads only the domain column of this rank's parts (`count_share`): rows per
  (part, domain). The phase sums them over ranks: the global `n_d` weigh the domains on every rank
  (the same `p_d` everywhere) and are the `rows_per_domain` saved with the adapter.
- A domain with no row in this rank's share is never picked on this rank (`p_d = 0` there, the
  others renormalised); the ranks holding its rows train it. Nothing waits for rows that are not
  there. `p_d` then differs between ranks (`DomainStreams.missing` names such domains).
- A domain's stream: the parts holding that domain (known from the count), in an order seeded by
  (seed, rank, domain, epoch); parts are read in turn (values checked as they stream), filtered to
  the domain, gathered into a buffer of at least `buffer_rows` rows and shuffled; when the buffer
  is used up the next parts fill it; after the last part a new epoch reorders the parts.
- Position: the picks' RNG and per domain (epoch, first part of the buffer, rows served from it).
  A restored stream re-reads its buffer's parts and skips what was served: resume is exact (same
  world size; another world size gives other shares, and the phase starts the streams afresh).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from iak_dist.data.batch import domain_indices
from iak_dist.data.sampler import DomainPicks
from iak_dist.data.schema import Schema
from iak_dist.data.source import Part, Split, assign

BUFFER_ROWS = 16_384
"""Rows of a domain shuffled together (more parts are read when parts are smaller than this)."""


@dataclass(frozen=True)
class DomainShare:
    """This rank's parts of a split and its rows of each domain in each of them."""

    parts: list[Part]
    counts: np.ndarray  # [len(parts), K] rows of domain k in part p

    @property
    def rows_per_domain(self) -> np.ndarray:
        return self.counts.sum(axis=0)


def count_share(split: Split, schema: Schema, rank: int, world_size: int, seed: int) -> DomainShare:
    """This rank's share of `split` (see module docstring), counted per domain from the domain column alone."""
    parts = assign(split.parts, rank, world_size, seed, 0, shuffle=True)
    counts = np.zeros((len(parts), len(schema.domains)), dtype=np.int64)
    for i, part in enumerate(parts):
        index = domain_indices(split.read(part, columns=[schema.domain]).column(schema.domain), schema.domains)
        counts[i] = np.bincount(index[index >= 0], minlength=len(schema.domains))
    return DomainShare(parts, counts)


class DomainStream:
    """One domain's rows of this rank's share, shuffled within a buffer, cycling forever.

    Args:
        split, schema: what is read (all of `schema.columns()`, values checked).
        share: this rank's parts and per-domain counts (`count_share`).
        domain: index of the domain in `schema.domains`; the share must hold rows of it.
        seed: with `domain`, seeds the order of parts of each epoch and each buffer's shuffle.
        buffer_rows: rows shuffled together (the buffer also holds the rest of its last part).
    """

    def __init__(self, split: Split, schema: Schema, share: DomainShare, domain: int, seed: int,
                 buffer_rows: int = BUFFER_ROWS) -> None:
        self.split, self.schema, self.share, self.domain = split, schema, share, domain
        self.seed, self.buffer_rows = seed, buffer_rows
        self.parts = [p for p, n in zip(share.parts, share.counts[:, domain], strict=True) if n > 0]
        if not self.parts:
            raise ValueError(f"no rows of domain {schema.domains[domain]!r} in this share")
        self.epoch, self.cursor, self.offset = 0, 0, 0  # position: see state_dict
        self._buffer: pa.Table | None = None
        self._next_cursor = 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.domain, self.epoch]).permutation(len(self.parts))

    def _fill(self) -> None:
        """Read the parts from `cursor` until the buffer holds `buffer_rows` rows (or the epoch's parts end)."""
        order, pieces, rows, c = self._order(), [], 0, self.cursor
        while rows < self.buffer_rows and c < len(order):
            table = self.split.read(self.parts[order[c]], columns=self.schema.columns())
            mine = domain_indices(table.column(self.schema.domain), self.schema.domains) == self.domain
            pieces.append(table.filter(pa.array(mine)))
            rows += pieces[-1].num_rows
            c += 1
        shuffle = np.random.default_rng([self.seed, self.domain, self.epoch, self.cursor]).permutation(rows)
        self._buffer, self._next_cursor = pa.concat_tables(pieces).take(shuffle), c

    def take(self, n: int) -> pa.Table:
        """The stream's next `n` rows."""
        taken = []
        while n > 0:
            if self._buffer is None:
                self._fill()
            k = min(n, self._buffer.num_rows - self.offset)
            taken.append(self._buffer.slice(self.offset, k))
            self.offset += k
            n -= k
            if self.offset == self._buffer.num_rows:
                self._buffer, self.offset, self.cursor = None, 0, self._next_cursor
                if self.cursor == len(self.parts):
                    self.epoch, self.cursor = self.epoch + 1, 0
        return pa.concat_tables(taken)

    @property
    def held_rows(self) -> int:
        """Rows in memory now (at most `buffer_rows` + one part)."""
        return 0 if self._buffer is None else self._buffer.num_rows

    def state_dict(self) -> list[int]:
        return [self.epoch, self.cursor, self.offset]

    def load_state_dict(self, state: list[int]) -> None:
        self.epoch, self.cursor, self.offset = (int(v) for v in state)
        self._buffer = None  # re-read from `cursor` on the next take, which goes on from `offset`


class DomainStreams:
    """Batches of rows (Arrow tables) drawn across domains from per-domain streams.

    Args:
        split, schema: the fine-tune split and its schema.
        share: this rank's share (`count_share`).
        global_counts: rows per domain over all ranks (`n_d` of `p_d ∝ n_d ** alpha`, the same on every rank).
        batch_size, alpha: as `DomainPicks`.
        seed: the phase's seed; `rank` makes each rank's picks and orders its own.
        buffer_rows: rows shuffled together per domain.

    Example::

        share = count_share(split, schema, rank, world_size, seed)
        streams = DomainStreams(split, schema, share, share.rows_per_domain, 512, 0.5, seed)
        table = streams.next_batch()  # 512 rows; `state_dict()` before it regenerates it
    """

    def __init__(self, split: Split, schema: Schema, share: DomainShare, global_counts: np.ndarray, batch_size: int,
                 alpha: float, seed: int, rank: int = 0, buffer_rows: int = BUFFER_ROWS) -> None:
        local = share.rows_per_domain
        self.missing = [schema.domains[d] for d in np.flatnonzero((local == 0) & (np.asarray(global_counts) > 0))]
        self.picks = DomainPicks(np.where(local > 0, global_counts, 0), alpha, batch_size, seed * 100_003 + rank)
        self.streams = {d: DomainStream(split, schema, share, d, seed * 100_003 + rank, buffer_rows)
                        for d in np.flatnonzero(local > 0).tolist()}

    def next_batch(self) -> pa.Table:
        """The next batch's rows, each in the slot of its pick."""
        pieces, where, start = [], [], 0
        for d, slots in self.picks.next_batch():
            pieces.append(self.streams[d].take(len(slots)))
            where.append((slots, start))
            start += len(slots)
        position = np.empty(start, dtype=np.int64)
        for slots, first in where:
            position[slots] = np.arange(first, first + len(slots))
        return pa.concat_tables(pieces).take(position)

    def state_dict(self) -> dict[str, Any]:
        return {"picks": self.picks.state_dict(), "streams": {str(d): s.state_dict() for d, s in self.streams.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.picks.load_state_dict(state["picks"])
        for d, stream in self.streams.items():
            stream.load_state_dict(state["streams"][str(d)])
