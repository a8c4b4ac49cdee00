"""Fine-tuning's rows as one stream per domain, each rank reading 1/W of every domain's rows.

The batch-aware domain sampler (`sampler.DomainPicks`: each row of a batch picks domain d with
`p_d ∝ n_d ** alpha`) draws here from streams instead of an in-memory table, so a rank holds at
most K domains x (shuffle buffer + one part) rows, never the split.

- Counting: rank r counts the domain column of its counting parts,
  `assign(split.parts, r, world_size, seed, epoch=0, shuffle=True)` (disjoint, equal to one row).
  The ranks sum a dense [all counting parts x K] matrix (`count_share(..., all_reduce=...)`), so
  every rank knows every part's rows of every domain; the global `n_d` weigh the domains and are
  the `rows_per_domain` saved with the adapter.
- Share: a domain's rows, ordered by counting part (rank 0's parts first) then by row within the
  part, are cut into W contiguous ranges differing in size by at most one; rank r takes range
  `(r + d) % W` of domain d (the rotation spreads domains smaller than W over the ranks). Each rank
  thus holds 1/W of EVERY domain, whatever the files' layout (domain-partitioned files included),
  and its picks use the global `p_d`: the mix over ranks is `p_d ∝ n_d ** alpha`.
- The one exception: a domain with fewer rows than W leaves some ranks without any of its rows;
  there `p_d = 0` and the others are renormalised (`DomainStreams.missing`). This biases the mix
  by at most (W - 1) rows' worth of that domain's weight.
- A domain's stream: its pieces (part, first, end: a range of the part's rows of the domain), in
  an order seeded by (seed, rank, domain, epoch); a piece's part is read (values checked as they
  stream), filtered to the domain and sliced to the range, pieces gathered into a buffer of at
  least `buffer_rows` rows and shuffled; when the buffer is used up the next pieces fill it;
  after the last piece a new epoch reorders them.
- Position: the picks' RNG and per domain (epoch, first piece of the buffer, rows served from it),
  with what they are valid for (split fingerprint, batch size, world size). A restored stream
  re-reads its buffer's pieces and skips what was served: resume is exact. `DomainStreams.mismatch`
  names a change (other data, batch size or world size); the phase then starts the streams afresh.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from iak_dist.data.batch import domain_indices
from iak_dist.data.sampler import DomainPicks
from iak_dist.data.schema import Schema
from iak_dist.data.source import Part, Split, assign
from iak_dist.errors import UserError

BUFFER_ROWS = 16_384
"""Rows of a domain shuffled together (more pieces are read when pieces are smaller than this)."""

Piece = tuple[Part, int, int]
"""A part and the range [first, end) of its rows of one domain (counted after filtering to it)."""


@dataclass(frozen=True)
class DomainShare:
    """Every rank's counting parts with their rows per domain, seen from rank `rank` of `world_size`."""

    parts: list[Part]  # all ranks' counting parts, rank 0's first
    counts: np.ndarray  # [len(parts), K] rows of domain k in part p (summed over ranks: global)
    rank: int
    world_size: int

    @property
    def global_rows_per_domain(self) -> np.ndarray:
        """`n_d` over the whole split."""
        return self.counts.sum(axis=0)

    def range_of(self, domain: int, rank: int | None = None) -> tuple[int, int]:
        """Rank `rank`'s (default: this rank's) range [lo, hi) of `domain`'s rows (see module docstring)."""
        rank = self.rank if rank is None else rank
        n, k = int(self.global_rows_per_domain[domain]), (rank + domain) % self.world_size
        return n * k // self.world_size, n * (k + 1) // self.world_size

    def rows_of_rank(self, rank: int | None = None) -> np.ndarray:
        """Rows of each domain in rank `rank`'s (default: this rank's) share."""
        ranges = [self.range_of(d, rank) for d in range(self.counts.shape[1])]
        return np.array([hi - lo for lo, hi in ranges], dtype=np.int64)

    @property
    def rows_per_domain(self) -> np.ndarray:
        """Rows of each domain in this rank's share."""
        return self.rows_of_rank()

    def pieces(self, domain: int) -> list[Piece]:
        """This rank's pieces of `domain`: only the parts overlapping its range."""
        lo, hi = self.range_of(domain)
        mine, start = [], 0
        for part, n in zip(self.parts, self.counts[:, domain].tolist(), strict=True):
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                mine.append((part, a - start, b - start))
            start += n
            if start >= hi:
                break
        return mine


def domain_index(schema: Schema, name: str, where: str) -> int:
    """Index of domain `name` in the schema; an unknown name is a UserError naming the known ones."""
    if name not in schema.domains:
        raise UserError(f"{where}: domain {name!r} is not in the schema; known: {', '.join(schema.domains)}")
    return schema.domains.index(name)


def count_share(split: Split, schema: Schema, rank: int, world_size: int, seed: int,
                all_reduce: Callable[[np.ndarray], np.ndarray] | None = None,
                only_domain: str | None = None) -> DomainShare:
    """Rank `rank`'s view of every domain's rows (see module docstring), from the domain column alone.

    `all_reduce` sums an int64 matrix over ranks (the phase passes a collective; every rank calls
    it once). Without it this process counts every rank's counting parts itself (one process, tests).
    With `only_domain`, the other domains count zero rows: streams over the share read that domain alone.

    Raises UserError on every rank alike (the checks use the summed counts) when some rank's share
    would be empty (always with fewer rows of known domains than ranks; possible with a few more
    spread over tiny domains).
    """
    where = f"{split.name or 'fine-tune'} split at {split.location}"
    keep = None if only_domain is None else domain_index(schema, only_domain, where)
    per_rank = [assign(split.parts, r, world_size, seed, 0, shuffle=True) for r in range(world_size)]
    parts = [p for ps in per_rank for p in ps]
    counts = np.zeros((len(parts), len(schema.domains)), dtype=np.int64)
    first = sum(len(ps) for ps in per_rank[:rank])
    counting = range(first, first + len(per_rank[rank])) if all_reduce is not None else range(len(parts))
    for i in counting:
        index = domain_indices(split.read(parts[i], columns=[schema.domain]).column(schema.domain), schema.domains)
        counts[i] = np.bincount(index[index >= 0], minlength=len(schema.domains))
    if all_reduce is not None:
        counts = all_reduce(counts)
    if keep is not None:
        counts[:, np.arange(counts.shape[1]) != keep] = 0
    share = DomainShare(parts, counts, rank, world_size)
    empty = [r for r in range(world_size) if share.rows_of_rank(r).sum() == 0]
    if empty:
        which = "with a known domain" if only_domain is None else f"of domain {only_domain!r}"
        raise UserError(f"{where}: {int(counts.sum())} rows {which} for {world_size} ranks, rank {empty[0]} "
                        f"would get none: use fewer ranks or more data")
    return share


class DomainStream:
    """One domain's rows of this rank's share, shuffled within a buffer, cycling forever.

    Args:
        split, schema: what is read (all of `schema.columns()`, values checked).
        share: the counted split (`count_share`); the stream reads `share.pieces(domain)`.
        domain: index of the domain in `schema.domains`; this rank's share must hold rows of it.
        seed: with `domain`, seeds the order of pieces of each epoch and each buffer's shuffle.
        buffer_rows: rows shuffled together (the buffer also holds the rest of its last piece).
    """

    def __init__(self, split: Split, schema: Schema, share: DomainShare, domain: int, seed: int,
                 buffer_rows: int = BUFFER_ROWS) -> None:
        self.split, self.schema, self.share, self.domain = split, schema, share, domain
        self.seed, self.buffer_rows = seed, buffer_rows
        self.pieces = share.pieces(domain)
        if not self.pieces:
            raise ValueError(f"no rows of domain {schema.domains[domain]!r} in this share")
        self.epoch, self.cursor, self.offset = 0, 0, 0  # position: see state_dict
        self._buffer: pa.Table | None = None
        self._next_cursor = 0

    @property
    def parts(self) -> list[Part]:
        """The parts this stream reads."""
        return [part for part, _, _ in self.pieces]

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.domain, self.epoch]).permutation(len(self.pieces))

    def _fill(self) -> None:
        """Read the pieces from `cursor` until the buffer holds `buffer_rows` rows (or the epoch's pieces end)."""
        order, tables, rows, c = self._order(), [], 0, self.cursor
        while rows < self.buffer_rows and c < len(order):
            part, first, end = self.pieces[order[c]]
            table = self.split.read(part, columns=self.schema.columns())
            mine = domain_indices(table.column(self.schema.domain), self.schema.domains) == self.domain
            tables.append(table.filter(pa.array(mine)).slice(first, end - first))
            rows += tables[-1].num_rows
            c += 1
        shuffle = np.random.default_rng([self.seed, self.domain, self.epoch, self.cursor]).permutation(rows)
        self._buffer, self._next_cursor = pa.concat_tables(tables).take(shuffle), c

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
                if self.cursor == len(self.pieces):
                    self.epoch, self.cursor = self.epoch + 1, 0
        return pa.concat_tables(taken)

    @property
    def held_rows(self) -> int:
        """Rows in memory now (at most `buffer_rows` + one piece)."""
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
        share: the counted split, seen from this rank (`count_share`): `p_d` uses its global `n_d`.
        batch_size, alpha: as `DomainPicks`.
        seed: the phase's seed; `share.rank` makes each rank's picks and orders its own.
        buffer_rows: rows shuffled together per domain.

    Example::

        share = count_share(split, schema, rank, world_size, seed, all_reduce)
        streams = DomainStreams(split, schema, share, 512, 0.5, seed)
        table = streams.next_batch()  # 512 rows; `state_dict()` before it regenerates it
    """

    def __init__(self, split: Split, schema: Schema, share: DomainShare, batch_size: int, alpha: float, seed: int,
                 buffer_rows: int = BUFFER_ROWS) -> None:
        local, counts = share.rows_per_domain, share.global_rows_per_domain
        self.missing = [schema.domains[d] for d in np.flatnonzero((local == 0) & (counts > 0))]
        self.picks = DomainPicks(np.where(local > 0, counts, 0), alpha, batch_size, seed * 100_003 + share.rank)
        self.streams = {d: DomainStream(split, schema, share, d, seed * 100_003 + share.rank, buffer_rows)
                        for d in np.flatnonzero(local > 0).tolist()}
        self.valid_for = {"fingerprint": split.fingerprint(), "batch_size": batch_size,
                          "world_size": share.world_size}
        """What a position is valid for: saved with it, compared by `mismatch`."""

    def next_batch(self) -> pa.Table:
        """The next batch's rows, grouped by domain in domain order (`DomainPicks.next_batch`)."""
        return pa.concat_tables([self.streams[d].take(n) for d, n in self.picks.next_batch()])

    def state_dict(self) -> dict[str, Any]:
        return {**self.valid_for, "picks": self.picks.state_dict(),
                "streams": {str(d): s.state_dict() for d, s in self.streams.items()}}

    def mismatch(self, state: dict[str, Any]) -> str | None:
        """Why `state` cannot position these streams (None: it can): its data, batch size or world size differ."""
        changed = [f"{key} {state.get(key)} -> {now}" for key, now in self.valid_for.items() if state.get(key) != now]
        return ", ".join(changed) or None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position; `mismatch(state)` must be None (offsets of other data mean nothing here)."""
        if (why := self.mismatch(state)) is not None:
            raise ValueError(f"stream state is for other streams: {why}")
        self.picks.load_state_dict(state["picks"])
        for d, stream in self.streams.items():
            stream.load_state_dict(state["streams"][str(d)])
