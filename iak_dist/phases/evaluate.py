"""Evaluation: score the test split with a backbone (+ adapter), metrics per domain and overall.

How N ranks compute the metrics (exact, and in memory that does not grow with the split; no rank
receives every score):

1. Each rank reads only its share of the split (`ParquetReader` over `Split.open`: rows
   `[r * N / W, (r + 1) * N / W)` of the split in file order, from its row groups; no shuffle).
2. The sharded model's forward is collective (TorchRec's all-to-all of table lookups), so every
   rank runs the same number of forwards: before each, the ranks agree (one all-reduce MAX)
   whether any still has a batch; a rank that has run out repeats a batch it scored and drops the
   output. The same all-reduce carries a failure flag: a read error on one rank (a file truncated
   under it) is raised on every rank, not left to the others waiting in the all-to-all.
3. Each rank appends compact records of its rows (`row_dtype`: float32 scores, int8 labels, int16
   domain (int32 past 32767 domains), int64 user: 20 bytes a row) to a spill file on local disk,
   in a temporary folder of its own (`spill_folder`, removed on success and on error).
4. The metrics are computed in buckets of at most `BUCKET_ROWS` rows (all ranks together), per key:
   the p_ctr score (CTR-AUC, LogLoss, rows), the p_ctcvr score (CTCVR-AUC) and a 32-bit hash of the
   user (GAUC). Buckets are ranges of the key's 32-bit code (`metrics.score_codes`: monotone in the
   score), so equal keys never straddle two buckets. Their bounds come from histograms all-reduced
   over the ranks (`bucket_starts`: 256 sub-ranges of each range holding more than a bucket, at most
   4 levels, one read of the spill each), so every world size cuts the same buckets. Each rank then
   splits its spill into one file per bucket (`partition`).
5. Bucket by bucket, in key order, rank 0 gathers that bucket from every rank (`gather_to_main`):
   for the scores, each rank's (domain, score, label) keys with their counts (ties compressed, so a
   bucket of one score value stays small); for users, the bucket's rows. Rank 0 feeds them to
   `metrics.StreamingAuc` (rank sums with running negative counts: exact, equal bit for bit to
   `metrics.auc` on all rows), `StreamingLogLoss` and `StreamingGauc` (per-user AUCs of complete
   users, `metrics.group_aucs`), then broadcasts the metrics dict, so every rank returns the same.
6. A user bucket still over `BUCKET_ROWS` (it is one hash code, which refinement cannot cut: one
   heavy user, or a few whose hashes collide) is never gathered whole (`heavy_users`): its rows are
   cut again into p_ctr score ranges (histograms of that bucket's rows only, as in 4), and rank 0
   gathers one range at a time as counted (user, domain, score, click) keys, fed to a `StreamingAuc`
   per user in the bucket (slots: the user's rows per domain and overall). Each user's AUC x rows
   is then added to GAUC where the slot holds both classes (`StreamingGauc.add_streamed`): the same
   AUC bits as `group_aucs` gives for that user.

Results do not depend on the world size (the buckets and what rank 0 computes from each do not).
AUCs equal the in-memory `metrics_by_domain` bit for bit (integer rank sums); GAUC and LogLoss equal
it to float rounding (about 1e-15 relative: their float sums run bucket by bucket, so they depend on
`BUCKET_ROWS` at that level, not on the world size). Each local step runs through `on_every_rank`:
a failure on one rank (a full disk, a vanished bucket file, a bug in rank 0's sums) is raised on
every rank.

Memory: rank 0 holds one bucket (`BUCKET_ROWS` rows: 16 bytes a distinct score key, 20 bytes a
user row or 24 bytes a heavy user's distinct key received, plus the sorts' temporaries), every rank
one spill read (`READ_ROWS` rows) or one bucket's send buffer, and the histograms (8 bytes x 256 x
the ranges being refined, at most rows / `BUCKET_ROWS` of them), also with users of any size (6.).
Measured (`profiling/eval_memory.py`, one process in rank 0's role, one user with 15 % of the rows):
+70 MiB at 2M rows and +79 MiB at 20M rows, 1.14x (the in-memory method: +170 MiB and +1630 MiB;
gathering the heavy user's bucket whole, as before 6.: +79 MiB and +299 MiB). Disk: 20 bytes a row
of the rank's share, plus one key's bucket files (20 bytes a row again; a heavy user's bucket and its
score-range files: twice its rows) at a time.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from iak_dist.config import ShardingConfig
from iak_dist.data.batch import Batch, arrow_to_batch
from iak_dist.data.parquet import ParquetReader
from iak_dist.data.schema import Schema
from iak_dist.data.source import Split
from iak_dist.data.splits import read_cold_slots
from iak_dist.distributed.checkpoint import ShardedWeights, read_backbone_meta
from iak_dist.distributed.context import (
    DistContext,
    collective_device,
    lockstep,
    on_every_rank,
    on_main,
    sum_over_ranks,
)
from iak_dist.errors import UserError
from iak_dist.metrics import (
    StreamingAuc,
    StreamingGauc,
    StreamingLogLoss,
    constant_predictor,
    finite_or_none,
    group_aucs,
    ranking_metrics,
    score_codes,
    score_values,
)
from iak_dist.model.backbone import ModelOutput
from iak_dist.model.strategies.base import Adapter, adapter_class
from iak_dist.model.strategies.saving import load_adapter, member_dirs
from iak_dist.phases.common import build_from_backbone, check_schema_matches
from iak_dist.report import COLD_ITEMS, TUNED_DOMAINS

T = TypeVar("T")

BUCKET_ROWS = 1 << 18
"""Most rows of a metric bucket, all ranks together (rank 0 holds one bucket at a time)."""
READ_ROWS = 1 << 18
"""Rows a rank reads from its spill at a time."""
COLD_FEATURE = "item_id"
"""The feature whose table slots `cold_items.json` lists (the rows marked cold by it)."""
HISTOGRAM_BINS = 256
"""Sub-ranges a too-full key range is cut into per refinement level (4 levels cover 32-bit codes)."""


def row_dtype(num_domains: int) -> np.dtype:
    """The packed record of one scored row: what a rank keeps and sends to rank 0 (20 bytes)."""
    domain = np.int16 if num_domains <= np.iinfo(np.int16).max else np.int32
    return np.dtype([("p_ctr", np.float32), ("p_ctcvr", np.float32), ("click", np.int8),
                     ("conversion", np.int8), ("domain", domain), ("user", np.int64)])


def first_row(source: Split, schema: Schema) -> Batch:
    """One row of `source` as a batch: `lockstep`'s padding for a rank without rows of its own."""
    return arrow_to_batch(source.read(source.parts[0]).slice(0, 1), schema)


def real_outputs(model: torch.nn.Module, batches: Iterator[tuple[Batch, bool]],
                 device: torch.device | None = None) -> Iterator[tuple[Batch, ModelOutput]]:
    """`(batch, model output)` of the real batches of a `lockstep` stream, forwarded in eval mode without
    gradients (IAK: z = mu); padding batches are forwarded too (collectives) and dropped. The model goes
    back to the mode it was in when the stream ends."""
    was_training = model.training
    model.eval()
    try:
        for batch, real in batches:
            batch = batch.to(device) if device is not None else batch
            with torch.no_grad():
                out = model(batch)
            if real:
                yield batch, out
    finally:
        model.train(was_training)


class Spill:
    """This rank's scored records, appended to one file and read back in chunks (never all at once)."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype, self.rows = path, dtype, 0
        self.path.touch()

    def append(self, records: np.ndarray) -> None:
        with self.path.open("ab") as f:
            f.write(records.tobytes())
        self.rows += len(records)

    def chunks(self, rows: int | None = None) -> Iterator[np.ndarray]:
        """The records in file order, at most `rows` (None: `READ_ROWS`) at a time."""
        yield from read_chunks(self.path, self.dtype, rows)


def read_chunks(path: Path, dtype: np.dtype, rows: int | None = None) -> Iterator[np.ndarray]:
    """The `dtype` records of `path` (none if it does not exist), at most `rows` (None: `READ_ROWS`) at a time."""
    if not path.exists():
        return
    rows = rows or READ_ROWS
    total = path.stat().st_size // dtype.itemsize
    for lo in range(0, total, rows):
        yield np.fromfile(path, dtype=dtype, count=min(rows, total - lo), offset=lo * dtype.itemsize)


@contextmanager
def spill_folder(root: str | Path | None = None) -> Iterator[Path]:
    """A temporary folder of this rank's own (under `root`, None: the system's temp folder), removed
    when the block ends, also on error."""
    folder = Path(tempfile.mkdtemp(prefix="iak-eval-", dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def cold_mask(batch: Batch, slots: np.ndarray) -> np.ndarray:
    """bool [B]: the rows whose item (`COLD_FEATURE`, single-hot, hashed) is in `slots` (`read_cold_slots`)."""
    return np.isin(batch.sparse[COLD_FEATURE].values().cpu().numpy(), slots)


@torch.no_grad()
def score(model: torch.nn.Module, batches: Iterator[tuple[Batch, bool]], spill: Spill,
          device: torch.device | None = None, keep: np.ndarray | None = None,
          cold: tuple[np.ndarray, Spill] | None = None, skip_slots: np.ndarray | None = None,
          tuned: tuple[np.ndarray, Spill] | None = None) -> None:
    """Append this rank's scored rows to `spill` (inference: IAK uses z = mu); padding outputs dropped.

    `keep` (None: every row): [K + 1] booleans, which domains' rows this model scores (the last
    entry: rows of domains the schema does not know, domain -1); the other rows are dropped.
    `cold` (None: no cold items): (the cold items' item_id slots, ascending; a spill): the rows whose
    item is cold are also appended to that spill, as they are scored (`read_cold_slots`).
    `skip_slots` (None: none): rows whose item is in these slots are dropped (pre-training's validation
    leaves the cold items' rows out: they are unseen in pre-training, selection included).
    `tuned` (None: no domain held out): ([K + 1] booleans as `keep`, a spill): the rows of those domains
    are also appended to that spill (`TUNED_DOMAINS`: the domains fine-tuning did not hold out).
    A failure to write the spill (a full disk) is raised after the last forward, not at once: the
    other ranks' forwards wait for this rank's in the all-to-all.
    """
    model.eval()
    failure: Exception | None = None
    for batch, real in batches:
        out = model(batch.to(device) if device is not None else batch)
        if not real or failure is not None:
            continue
        rows = np.empty(len(batch), dtype=spill.dtype)
        for key, value in (("p_ctr", out.p_ctr), ("p_ctcvr", out.p_ctcvr), ("click", batch.click),
                           ("conversion", batch.conversion), ("domain", batch.domain), ("user", batch.user)):
            rows[key] = value.detach().cpu().numpy()
        is_cold = cold_mask(batch, cold[0]) if cold is not None else None
        if keep is not None or skip_slots is not None:
            kept = keep[rows["domain"]] if keep is not None else np.ones(len(rows), dtype=bool)  # -1: last entry
            if skip_slots is not None:
                kept &= ~cold_mask(batch, skip_slots)
            rows, is_cold = rows[kept], (is_cold[kept] if is_cold is not None else None)
        try:
            spill.append(rows)
            if cold is not None:
                cold[1].append(rows[is_cold])
            if tuned is not None:
                tuned[1].append(rows[tuned[0][rows["domain"]]])
        except OSError as exc:
            failure = exc
    if failure is not None:
        raise failure


def user_codes(users: np.ndarray) -> np.ndarray:
    """A 32-bit hash of each user id (as uint64): spreads users evenly over GAUC buckets."""
    mixed = np.asarray(users).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # wraps: Fibonacci hashing
    return mixed >> np.uint64(32)


def histogram(codes: Callable[[], Iterator[np.ndarray]], firsts: np.ndarray, width: int, bins: int) -> np.ndarray:
    """This rank's rows in each of `bins` equal sub-ranges of the ranges `[first, first + width)`."""
    sub = width // bins
    counts = np.zeros(len(firsts) * bins, dtype=np.int64)
    for chunk in codes():
        at = np.searchsorted(firsts, chunk, side="right") - 1
        inside = (at >= 0) & (chunk - firsts[np.maximum(at, 0)] < np.uint64(width))
        at, chunk = at[inside], chunk[inside]
        counts += np.bincount(at * bins + ((chunk - firsts[at]) // np.uint64(sub)).astype(np.int64),
                              minlength=len(counts))
    return counts


def bucket_starts(codes: Callable[[], Iterator[np.ndarray]], ctx: DistContext, bucket_rows: int) -> np.ndarray:
    """The first code of each bucket (ascending, the first 0): ranges of 32-bit codes of at most
    `bucket_rows` rows over all ranks, except a range of one code (ties cannot be cut).

    `codes()` yields this rank's codes chunk by chunk; it is read once per refinement level. Every
    rank gets the same starts (the histograms are all-reduced).
    """
    pending = np.array([0], dtype=np.uint64)  # ranges still too full: their first code ...
    width = 1 << 32  # ... and (the same) width
    done: list[tuple[np.ndarray, np.ndarray]] = []  # (first code, rows) of ranges small enough
    while len(pending):
        sub = max(1, width // HISTOGRAM_BINS)
        bins = min(HISTOGRAM_BINS, width)
        counts = sum_over_ranks(on_every_rank(histogram, codes, pending, width, bins))
        firsts = (pending[:, None] + np.arange(bins, dtype=np.uint64) * np.uint64(sub)).ravel()
        full = (counts > bucket_rows) & (sub > 1)
        done.append((firsts[(counts > 0) & ~full], counts[(counts > 0) & ~full]))
        pending, width = firsts[full], sub
    firsts = np.concatenate([f for f, _ in done])
    rows = np.concatenate([c for _, c in done])
    order = np.argsort(firsts)
    firsts, rows = firsts[order], rows[order]
    starts, filled = [0], 0
    for first, n in zip(firsts.tolist(), rows.tolist(), strict=True):  # greedy: ranges into buckets
        if filled and filled + n > bucket_rows:
            starts.append(first)
            filled = 0
        filled += n
    return np.array(starts, dtype=np.uint64)


def partition(spill: Spill, key: Callable[[np.ndarray], np.ndarray], starts: np.ndarray, folder: Path,
              name: str) -> list[Path]:
    """Split the spill into one file of records per bucket (`starts`: `bucket_starts`); the paths, in
    bucket order (a bucket with no rows on this rank has no file)."""
    paths = [folder / f"{name}-{b:07d}.bin" for b in range(len(starts))]
    for chunk in spill.chunks():
        bucket = np.searchsorted(starts, key(chunk), side="right") - 1
        order = np.argsort(bucket, kind="stable")
        chunk, bucket = chunk[order], bucket[order]
        cuts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
        for lo, hi in zip(cuts, np.r_[cuts[1:], len(chunk)], strict=True):
            with paths[bucket[lo]].open("ab") as f:
                f.write(chunk[lo:hi].tobytes())
    return paths


def gather_to_main(records: np.ndarray, ctx: DistContext) -> np.ndarray | None:
    """Every rank's `records` (one dtype everywhere), concatenated in rank order on rank 0 (None elsewhere)."""
    if ctx.world_size == 1:
        return records
    device = collective_device()
    sizes_t = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(ctx.world_size)]
    dist.all_gather(sizes_t, torch.tensor([records.nbytes], dtype=torch.int64, device=device))  # sync point
    sizes = [int(t.item()) for t in sizes_t]
    width = max(1, *sizes)
    send = torch.zeros(width, dtype=torch.uint8)
    send[:records.nbytes] = torch.from_numpy(records.view(np.uint8).reshape(-1))
    received = [torch.empty(width, dtype=torch.uint8, device=device) for _ in sizes] if ctx.is_main else None
    dist.gather(send.to(device), received, dst=0)  # sync point: one bucket of every rank
    if received is None:
        return None
    return np.concatenate([got[:n].cpu().numpy().view(records.dtype) for got, n in zip(received, sizes, strict=True)])


COUNTED = np.dtype([("key", np.uint64), ("count", np.int64)])
"""A (domain, score code, label) key packed as domain << 33 | code << 1 | label, and its rows."""


def counted_keys(path: Path, dtype: np.dtype, score: str, label: str) -> np.ndarray:
    """The distinct (domain, score, label) keys of a bucket file and their row counts (`COUNTED`),
    read chunk by chunk: a bucket of one tied score compresses to a few keys."""
    keys, counts = np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
    for chunk in read_chunks(path, dtype):
        packed = ((chunk["domain"].astype(np.uint64) << np.uint64(33)) | (score_codes(chunk[score]) << np.uint64(1))
                  | (chunk[label] != 0).astype(np.uint64))
        new_keys, new_counts = np.unique(packed, return_counts=True)
        keys, counts = merge_counted(np.r_[keys, new_keys], np.r_[counts, new_counts])
    out = np.empty(len(keys), dtype=COUNTED)
    out["key"], out["count"] = keys, counts
    return out


def read_bucket(path: Path, dtype: np.dtype) -> np.ndarray:
    """A bucket file's records (none where this rank has no rows in the bucket)."""
    return np.fromfile(path, dtype=dtype) if path.exists() else np.empty(0, dtype=dtype)


def merge_counted(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct `keys`, ascending, with their `counts` summed (so what follows does not depend
    on how the rows were split over ranks or chunks)."""
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    first = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.empty(0, dtype=np.int64)
    return keys[first], np.add.reduceat(counts, first) if len(first) else counts[:0]


USER_COUNTED = np.dtype([("user", np.int64), ("key", np.uint64), ("count", np.int64)])
"""A user's (domain, score code, label) key (packed as in `COUNTED`) and its rows."""


def user_counted_keys(path: Path, dtype: np.dtype) -> np.ndarray:
    """The distinct (user, domain, p_ctr score, click) keys of a bucket file and their row counts
    (`USER_COUNTED`), read chunk by chunk: what rank 0 needs of a heavy user's score range."""
    out = np.empty(0, dtype=USER_COUNTED)
    for chunk in read_chunks(path, dtype):
        records = np.empty(len(chunk), dtype=USER_COUNTED)
        records["user"], records["count"] = chunk["user"], 1
        records["key"] = ((chunk["domain"].astype(np.uint64) << np.uint64(33))
                          | (score_codes(chunk["p_ctr"]) << np.uint64(1)) | (chunk["click"] != 0).astype(np.uint64))
        out = merge_user_counted(np.r_[out, records])
    return out


def merge_user_counted(records: np.ndarray) -> np.ndarray:
    """The distinct (user, key) pairs of `USER_COUNTED` records, ascending, with their counts summed."""
    records = records[np.lexsort((records["key"], records["user"]))]
    if not len(records):
        return records
    first = np.flatnonzero(np.r_[True, (records["user"][1:] != records["user"][:-1])
                                | (records["key"][1:] != records["key"][:-1])])
    out = records[first]
    out["count"] = np.add.reduceat(records["count"], first)
    return out


def with_overall(key: np.ndarray, count: np.ndarray, overall: int) -> tuple[np.ndarray, ...]:
    """Distinct `COUNTED` keys (ascending) and counts, plus the same rows in slot `overall` (domain
    dropped), unpacked as `StreamingAuc.add` takes them: (slot, score code, label, count)."""
    all_rows, all_count = merge_counted(key & np.uint64((1 << 33) - 1), count)  # domain dropped
    key, count = np.r_[key, all_rows | np.uint64(overall << 33)], np.r_[count, all_count]  # ascending
    slot = (key >> np.uint64(33)).astype(np.int64)
    code, positive = (key >> np.uint64(1)) & np.uint64(0xFFFFFFFF), (key & np.uint64(1)).astype(np.int8)
    return slot, code, positive, count


def bucket_sizes(paths: list[Path], dtype: np.dtype) -> np.ndarray:
    """This rank's rows in each bucket file (0 where it has none)."""
    return np.array([p.stat().st_size // dtype.itemsize if p.exists() else 0 for p in paths], dtype=np.int64)


def stream_metrics(spill: Spill, domains: list[str], ctx: DistContext, folder: Path, has_conversion: bool = True,
                   has_user: bool = True, bucket_rows: int | None = None) -> dict[str, dict] | None:
    """Metrics of every rank's spilled rows, as `metrics_by_domain` gives them, on rank 0 (None elsewhere).

    Collective: every rank calls it. `folder` holds the bucket files (one key's at a time).
    `bucket_rows` None: `BUCKET_ROWS`. See the module docstring for the method.
    """
    bucket_rows = bucket_rows or BUCKET_ROWS
    overall = len(domains)  # the slot of all rows; slot d is domain d
    slots = overall + 1
    ctr, ctcvr, logloss, gauc = (StreamingAuc(slots), StreamingAuc(slots), StreamingLogLoss(slots),
                                 StreamingGauc(slots))

    def by_score(score: str, label: str, auc: StreamingAuc, with_logloss: bool) -> None:
        starts = bucket_starts(lambda: (score_codes(c[score]) for c in spill.chunks()), ctx, bucket_rows)
        paths = on_every_rank(partition, spill, lambda c: score_codes(c[score]), starts, folder, score)
        for path in paths:
            counted = gather_to_main(on_every_rank(counted_keys, path, spill.dtype, score, label), ctx)
            path.unlink(missing_ok=True)
            on_every_rank(add_score_bucket, counted, auc, with_logloss)

    def add_score_bucket(counted: np.ndarray | None, auc: StreamingAuc, with_logloss: bool) -> None:
        if counted is None:  # not rank 0
            return
        slot, code, positive, count = with_overall(*merge_counted(counted["key"], counted["count"]), overall)
        auc.add(slot, code, positive, count)
        if with_logloss:
            logloss.add(slot, positive, score_values(code), count)

    def by_user() -> None:
        starts = bucket_starts(lambda: (user_codes(c["user"]) for c in spill.chunks()), ctx, bucket_rows)
        paths = on_every_rank(partition, spill, lambda c: user_codes(c["user"]), starts, folder, "user")
        totals = sum_over_ranks(on_every_rank(bucket_sizes, paths, spill.dtype))
        for path, total in zip(paths, totals.tolist(), strict=True):
            if total > bucket_rows:  # one hash code (a heavy user, or a few colliding): by score range
                heavy_users(path)
                continue
            rows = gather_to_main(on_every_rank(read_bucket, path, spill.dtype), ctx)
            path.unlink(missing_ok=True)
            on_every_rank(add_user_bucket, rows)

    def heavy_users(path: Path) -> None:
        """GAUC parts of a user bucket over `bucket_rows`, never gathered whole: its rows cut into
        p_ctr score ranges (as `by_score` cuts all rows), rank 0 feeding each range's counted keys
        to a `StreamingAuc` per user (slots: the user's rows per domain and overall)."""
        bucket = Spill(path, spill.dtype)  # an empty file where this rank has no rows of it
        score_starts = bucket_starts(lambda: (score_codes(c["p_ctr"]) for c in bucket.chunks()), ctx, bucket_rows)
        parts = on_every_rank(partition, bucket, lambda c: score_codes(c["p_ctr"]), score_starts, folder,
                        f"{path.stem}-p_ctr")
        path.unlink(missing_ok=True)
        users: dict[int, StreamingAuc] = {}
        for part in parts:
            counted = gather_to_main(on_every_rank(user_counted_keys, part, spill.dtype), ctx)
            part.unlink(missing_ok=True)
            on_every_rank(add_heavy_range, counted, users)
        on_every_rank(add_heavy_users, users)

    def add_heavy_users(users: dict[int, StreamingAuc]) -> None:  # rank 0 (elsewhere: none)
        for user in sorted(users):
            gauc.add_streamed(users[user])

    def add_heavy_range(counted: np.ndarray | None, users: dict[int, StreamingAuc]) -> None:
        if counted is None or not len(counted):  # not rank 0, or no rows
            return
        counted = merge_user_counted(counted)
        cuts = np.flatnonzero(np.r_[True, counted["user"][1:] != counted["user"][:-1]])
        for lo, hi in zip(cuts, np.r_[cuts[1:], len(counted)], strict=True):  # a user at a time (a few)
            user = users.setdefault(int(counted["user"][lo]), StreamingAuc(slots))
            user.add(*with_overall(counted["key"][lo:hi], counted["count"][lo:hi], overall))

    def add_user_bucket(rows: np.ndarray | None) -> None:  # rank 0: every row of each user in `rows`
        if rows is None or not len(rows):  # not rank 0, or no rows
            return
        group_auc, size, _ = group_aucs(rows["click"], rows["p_ctr"], rows["user"])
        gauc.add(np.full(len(size), overall), group_auc, size)
        # per domain: groups are (domain, user) pairs, numbered in (domain, user) order
        order = np.lexsort((rows["user"], rows["domain"]))
        domain, user = rows["domain"][order], rows["user"][order]
        pair_first = np.r_[True, (domain[1:] != domain[:-1]) | (user[1:] != user[:-1])]
        pair = np.empty(len(rows), dtype=np.int64)
        pair[order] = np.cumsum(pair_first) - 1
        group_auc, size, code = group_aucs(rows["click"], rows["p_ctr"], pair)
        gauc.add(domain[pair_first].astype(np.int64)[code.astype(np.int64)], group_auc, size)

    by_score("p_ctr", "click", ctr, with_logloss=True)
    if has_conversion:
        by_score("p_ctcvr", "conversion", ctcvr, with_logloss=False)
    if has_user:
        by_user()
    if not ctx.is_main:
        return None

    def entry(slot: int) -> dict[str, float | None]:
        return {"ctr_auc": finite_or_none(ctr.result(slot)),
                "ctcvr_auc": finite_or_none(ctcvr.result(slot)) if has_conversion else None,
                "gauc": finite_or_none(gauc.result(slot)) if has_user else None,
                "logloss": finite_or_none(logloss.result(slot)), "rows": float(ctr.rows(slot)),
                **constant_predictor(int(ctr.positives[slot]), int(ctcvr.positives[slot]) if has_conversion else None,
                                     ctr.rows(slot))}

    out = {"overall": entry(overall)}
    out |= {name: entry(d) for d, name in enumerate(domains) if ctr.rows(d)}
    return out


def metrics_by_domain(
    scores: dict[str, np.ndarray], domains: list[str], has_conversion: bool = True, has_user: bool = True,
) -> dict[str, dict]:
    """`{"overall": {...}, "<domain>": {...}}` with CTR-AUC, CTCVR-AUC, GAUC, LogLoss and rows, from
    columns in memory: the reference `stream_metrics` is tested against.

    `has_conversion` / `has_user` False (the schema names no such column): CTCVR-AUC / GAUC are None
    (the batches hold zeros there, which would score as a number).
    """
    def subset(mask: np.ndarray | None) -> dict:  # None: every row (no copy of the columns)
        def rows(key: str) -> np.ndarray:
            return scores[key] if mask is None else scores[key][mask]

        return ranking_metrics(rows("click"), rows("conversion") if has_conversion else None, rows("p_ctr"),
                               rows("p_ctcvr"), rows("user") if has_user else None)

    out: dict[str, dict] = {"overall": subset(None)}
    for i, name in enumerate(domains):
        mask = scores["domain"] == i
        if mask.any():
            out[name] = subset(mask)
    return out


def mark_finetuned(metrics: dict[str, dict], finetune_rows: dict[str, int] | None, strategy: str | None,
                   held_out: list[str] | None = None) -> None:
    """With `finetune_rows` (the adapter's rows per domain) and a `strategy` that trains something, each
    domain's entry says whether it was fine-tuned: a domain with no fine-tune rows is scored with its
    never-trained adapter weights (zero-initialised: the plain backbone), which must show in the
    report, not pass as a result. A domain in `held_out` (`finetune.hold_out_domains`) says so: it had
    rows, and was left out on purpose (a zero-shot domain)."""
    if finetune_rows is None or strategy in (None, "none"):
        return
    for name, entry in metrics.items():
        if name in ("overall", TUNED_DOMAINS, COLD_ITEMS):
            continue
        entry |= finetune_status(strategy, int(finetune_rows.get(name, 0)))
        if name in (held_out or []):
            entry |= {"held_out": True, "note": f"held out of fine-tuning (finetune.hold_out_domains): "
                                                f"{entry['note'].split(': ', 1)[1]}"}


def finetune_status(strategy: str, rows: int) -> dict:
    """The metrics entry's record of whether `strategy` saw any fine-tune rows of the domain."""
    if rows > 0:
        return {"finetuned": True, "finetune_rows": rows}
    if strategy == "full":
        note = "no fine-tune rows: scored by the backbone fine-tuned on the other domains"
    elif adapter_class(strategy).per_domain_models:
        note = "no fine-tune rows: plain backbone (no model of its own)"
    elif not adapter_class(strategy).untrained_domain_is_backbone:
        note = "no fine-tune rows: scored by the adapter's shared weights, trained on the other domains"
    else:
        note = "no fine-tune rows: plain backbone (its adapter weights never trained)"
    return {"finetuned": False, "finetune_rows": 0, "note": note}


def scoring_models(adapter_dir: str | Path | None, adapter: Adapter | None, override: ShardedWeights | None,
                   adapter_cfg: dict | None, meta: dict) -> Iterator[tuple[Adapter | None, ShardedWeights | None,
                                                                   np.ndarray | None]]:
    """The models that score the split, one pass each: (adapter, backbone override, `keep` of `score`).

    One model for every row; for a per-domain adapter, each member on its own domain's rows (loaded
    when its pass comes), then the plain backbone on the rows of domains without a member.
    """
    if adapter is None or not adapter.per_domain_models:
        yield adapter, override, None
        return
    assert adapter_dir is not None and adapter_cfg is not None
    owned = np.zeros(len(adapter_cfg["domains"]) + 1, dtype=bool)  # the last entry: unknown domains
    for domain, member in member_dirs(adapter_dir, adapter_cfg).items():
        keep = np.zeros_like(owned)
        keep[adapter_cfg["domains"].index(domain)] = True
        owned |= keep
        member_adapter, member_override, _ = load_adapter(member, meta)
        yield member_adapter, member_override, keep
    if not owned.all():
        yield None, None, ~owned


def evaluate(
    data_dir: str | Path, backbone_dir: str | Path, adapter_dir: str | Path | None, ctx: DistContext,
    batch_size: int = 4096, split: str = "test", sharding: ShardingConfig | None = None,
    spill_root: str | Path | None = None,
) -> dict[str, dict]:
    """Per-domain metrics of the backbone with the adapter in `adapter_dir` (None: backbone alone).

    A data folder prepared with `data.cold_items` also gets an entry `COLD_ITEMS` ("cold items"):
    the metrics of the rows whose item pre-training never saw (all domains), marked as they are
    scored and computed as the others are, from a second spill of those rows only.
    An adapter fine-tuned with `finetune.hold_out_domains` also gets an entry `TUNED_DOMAINS`
    ("fine-tuned domains"): the metrics of every other domain's rows together, what choices read.

    A per-domain adapter (`full_per_domain`) scores each domain's rows with its own model, one pass
    over this rank's share per model, into the same spill (`scoring_models`).

    Metrics that cannot be computed are None (see `metrics_by_domain`). Each rank scores its own
    share of the split into a spill folder under `spill_root` (None: the system's temp folder);
    rank 0 computes the metrics bucket by bucket and sends them, so every rank returns the same (see
    the module docstring).
    """
    data_dir = Path(data_dir)
    schema = Schema.load(data_dir / "schema.yaml")
    meta = read_backbone_meta(backbone_dir)
    check_schema_matches(schema, meta, data_dir)
    adapter, override, adapter_cfg = None, None, None
    if adapter_dir is not None:
        adapter, override, adapter_cfg = load_adapter(adapter_dir, meta)
        unknown = sorted(set(schema.domains) - set(adapter_cfg["domains"]))
        if unknown:
            raise UserError(
                f"{data_dir / 'schema.yaml'}: domain {unknown[0]!r} was not fine-tuned by the adapter in "
                f"{adapter_dir} (it knows {', '.join(adapter_cfg['domains'])}); fine-tune it or evaluate without it"
            )
        if adapter_cfg["domains"] != schema.domains:
            raise UserError(f"{adapter_dir}: adapter domain order {adapter_cfg['domains']} differs from the schema's")
    source = Split.open(data_dir, split, schema)
    reader = ParquetReader(source, schema, batch_size, ctx.rank, ctx.world_size)  # this rank's rows only

    padding = functools.partial(first_row, source, schema)  # a rank without rows still joins every forward

    finetune_rows = None
    if adapter_cfg is not None and "rows_per_domain" in adapter_cfg:
        finetune_rows = dict(zip(adapter_cfg["domains"], adapter_cfg["rows_per_domain"], strict=True))
    cold_slots = read_cold_slots(data_dir, schema)
    held_out = (adapter_cfg or {}).get("hold_out_domains") or []
    with spill_folder(spill_root) as folder:
        spill = Spill(folder / "scored.bin", row_dtype(len(schema.domains)))
        cold = None if cold_slots is None else (cold_slots, Spill(folder / "cold.bin", spill.dtype))
        tuned = None
        if held_out:  # the rows choices read (`TUNED_DOMAINS`): every domain but those held out
            kept = np.ones(len(schema.domains) + 1, dtype=bool)
            kept[[schema.domains.index(name) for name in held_out]] = False
            tuned = (kept, Spill(folder / "tuned.bin", spill.dtype))
        for model_adapter, model_override, keep in scoring_models(adapter_dir, adapter, override, adapter_cfg, meta):
            sharded, _ = build_from_backbone(backbone_dir, model_adapter, ctx, train_embeddings=False,
                                             sharding=sharding, backbone_override=model_override,
                                             batch_size=batch_size)
            on_every_rank(score, sharded.model, lockstep(reader.epoch(0), ctx, padding), spill, ctx.device, keep,
                          cold, None, tuned)
            del sharded  # one model held at a time
        columns = {"has_conversion": schema.conversion is not None, "has_user": schema.user is not None}
        metrics = stream_metrics(spill, schema.domains, ctx, folder, **columns)
        for entry, extra in ((TUNED_DOMAINS, tuned), (COLD_ITEMS, cold)):  # by the same method (collective)
            if extra is not None:
                extra_metrics = stream_metrics(extra[1], schema.domains, ctx, folder, **columns)
                if metrics is not None and extra_metrics is not None:
                    metrics[entry] = extra_metrics["overall"]

    def share() -> dict[str, dict]:
        assert metrics is not None
        mark_finetuned(metrics, finetune_rows, adapter_cfg["strategy"] if adapter_cfg is not None else None,
                       adapter_cfg.get("hold_out_domains") if adapter_cfg is not None else None)
        return metrics

    # rank 0 computed the metrics; the others receive its dict (or its failure, raised on every rank)
    shared = on_main(ctx, share, share=True)
    assert shared is not None
    return shared
