"""Evaluation: score the test split with a backbone (+ adapter), metrics per domain and overall.

How N ranks compute the metrics (exact; only rank 0 gathers, in bounded rounds):

1. Each rank reads only its share of the split (`ParquetReader` over `Split.open`: rows
   `[r * N / W, (r + 1) * N / W)` of the split in file order, from its row groups; no shuffle).
2. The sharded model's forward is collective (TorchRec's all-to-all of table lookups), so every
   rank runs the same number of forwards: before each, the ranks agree (one all-reduce MAX)
   whether any still has a batch; a rank that has run out repeats a batch it scored and drops the
   output. The same all-reduce carries a failure flag: a read error on one rank (a file truncated
   under it) is raised on every rank, not left to the others waiting in the all-to-all.
3. Each rank keeps compact columns of its rows (`row_dtype`: float32 scores, int8 labels, int16
   domain (int32 past 32767 domains), int64 user: 20 bytes a row).
4. Rank 0 gathers them in rounds of at most `GATHER_ROWS` rows per rank (`dist.gather` of packed
   bytes), computes the metrics exactly (AUC and GAUC from ranks with ties, no binning; they do
   not depend on row order) and broadcasts the dict, so every rank returns the same metrics.

Memory: rank 0 holds the compact columns of every test row (20 bytes a row) plus, while one metric
set is computed, temporaries of about 64 bytes a row of that set (`profiling/metrics_speed.py`);
every other rank holds only its share's columns and one round's buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from iak_dist.config import ShardingConfig
from iak_dist.data.batch import Batch, arrow_to_batch
from iak_dist.data.parquet import ParquetReader
from iak_dist.data.schema import Schema
from iak_dist.data.source import Split
from iak_dist.distributed.checkpoint import read_backbone_meta
from iak_dist.distributed.context import DistContext
from iak_dist.errors import UserError
from iak_dist.metrics import ranking_metrics
from iak_dist.model.strategies.saving import load_adapter
from iak_dist.orchestration.local import on_main
from iak_dist.phases.common import build_from_backbone, check_schema_matches
from iak_dist.phases.pretrain import collective_device

GATHER_ROWS = 1 << 18
"""Rows a rank sends to rank 0 per gather round (rank 0 receives up to world_size x 20 bytes x this)."""


def row_dtype(num_domains: int) -> np.dtype:
    """The packed record of one scored row: what a rank keeps and sends to rank 0 (20 bytes)."""
    domain = np.int16 if num_domains <= np.iinfo(np.int16).max else np.int32
    return np.dtype([("p_ctr", np.float32), ("p_ctcvr", np.float32), ("click", np.int8),
                     ("conversion", np.int8), ("domain", domain), ("user", np.int64)])


def lockstep(batches: Iterator[Batch], ctx: DistContext, padding: Callable[[], Batch]) -> Iterator[tuple[Batch, bool]]:
    """`(batch, real)` pairs, as many on every rank as the rank with the most batches has.

    A rank that has run out yields a batch it already yielded (or `padding()` if it had none) with
    `real` False: its forward keeps the collectives matched, its output is dropped. A failure
    reading a batch on any rank is raised on every rank.
    """
    last: Batch | None = None
    while True:
        batch, failure = None, None
        try:
            batch = next(batches, None)
        except Exception as exc:  # noqa: BLE001  (raised below, on every rank)
            failure = exc
        if ctx.world_size > 1:  # sync point: does any rank still have a batch, did any fail
            flags = torch.tensor([batch is not None, failure is not None], dtype=torch.int32,
                                 device=collective_device())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            more, failed = (bool(v) for v in flags.tolist())
            if failed:
                raise_everywhere(failure, ctx)
        else:
            if failure is not None:
                raise failure
            more = batch is not None
        if not more:
            return
        if batch is not None:
            last = batch
            yield batch, True
        else:
            last = last if last is not None else padding()
            yield last, False


def raise_everywhere(failure: BaseException | None, ctx: DistContext) -> None:
    """Raise `failure` on its rank and the first rank's failure, in one line, on every other rank."""
    failures: list = [None] * ctx.world_size
    line = None if failure is None else (isinstance(failure, UserError), str(failure).splitlines()[0]
                                         if str(failure) else type(failure).__name__)
    dist.all_gather_object(failures, line)
    if failure is not None:
        raise failure
    rank, (is_user, message) = next((r, f) for r, f in enumerate(failures) if f is not None)
    raise UserError(message) if is_user else RuntimeError(f"rank {rank} failed: {message}")


@torch.no_grad()
def score(model: torch.nn.Module, batches: Iterator[tuple[Batch, bool]], dtype: np.dtype,
          device: torch.device | None = None) -> np.ndarray:
    """This rank's scored rows as `dtype` records (inference: IAK uses z = mu); padding outputs dropped."""
    model.eval()
    records = []
    for batch, real in batches:
        out = model(batch.to(device) if device is not None else batch)
        if not real:
            continue
        rows = np.empty(len(batch), dtype=dtype)
        for key, value in (("p_ctr", out.p_ctr), ("p_ctcvr", out.p_ctcvr), ("click", batch.click),
                           ("conversion", batch.conversion), ("domain", batch.domain), ("user", batch.user)):
            rows[key] = value.detach().cpu().numpy()
        records.append(rows)
    return np.concatenate(records) if records else np.empty(0, dtype=dtype)


def gather_columns(rows: np.ndarray, ctx: DistContext, round_rows: int | None = None) -> dict[str, np.ndarray] | None:
    """Every rank's `rows`, in rank order, as one contiguous array per field on rank 0 (None elsewhere).

    Sent in rounds of at most `round_rows` rows per rank (`dist.gather` of the records' bytes),
    so no buffer holds more than a round; rank 0 writes each round straight into its columns.
    `round_rows` None: `GATHER_ROWS`.
    """
    round_rows = round_rows or GATHER_ROWS
    if ctx.world_size == 1:
        return {name: np.ascontiguousarray(rows[name]) for name in rows.dtype.names}
    device = collective_device()
    counts_t = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(ctx.world_size)]
    dist.all_gather(counts_t, torch.tensor([len(rows)], dtype=torch.int64, device=device))
    counts = [int(c.item()) for c in counts_t]
    size = rows.dtype.itemsize
    starts = np.cumsum([0, *counts])
    columns = ({name: np.empty(starts[-1], dtype=rows.dtype[name]) for name in rows.dtype.names}
               if ctx.is_main else None)
    raw = rows.view(np.uint8)
    for lo in range(0, max(counts), round_rows):
        width = min(round_rows, max(counts) - lo)  # the same on every rank (it knows every count)
        piece = raw[lo * size:min(len(rows), lo + width) * size]
        send = torch.zeros(width * size, dtype=torch.uint8)
        send[:len(piece)] = torch.from_numpy(piece)
        received = [torch.empty(width * size, dtype=torch.uint8, device=device)
                    for _ in range(ctx.world_size)] if ctx.is_main else None
        dist.gather(send.to(device), received, dst=0)  # sync point: one round of every rank's rows
        if columns is not None and received is not None:
            for rank, got in enumerate(received):
                n = min(width, max(0, counts[rank] - lo))
                if n:
                    records = got[:n * size].cpu().numpy().view(rows.dtype)
                    at = starts[rank] + lo
                    for name in rows.dtype.names:
                        columns[name][at:at + n] = records[name]
    return columns


def metrics_by_domain(
    scores: dict[str, np.ndarray], domains: list[str], has_conversion: bool = True, has_user: bool = True,
    finetune_rows: dict[str, int] | None = None, strategy: str | None = None,
) -> dict[str, dict]:
    """`{"overall": {...}, "<domain>": {...}}` with CTR-AUC, CTCVR-AUC, GAUC, LogLoss and rows.

    `has_conversion` / `has_user` False (the schema names no such column): CTCVR-AUC / GAUC are None
    (the batches hold zeros there, which would score as a number). With `finetune_rows` (the
    adapter's rows per domain) and a `strategy` that trains something, each domain says whether it
    was fine-tuned: a domain with no fine-tune rows is scored with its never-trained adapter weights
    (zero-initialised: the plain backbone), which must show in the report, not pass as a result.
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
            if finetune_rows is not None and strategy not in (None, "none"):
                out[name] |= finetune_status(strategy, int(finetune_rows.get(name, 0)))
    return out


def finetune_status(strategy: str, rows: int) -> dict:
    """The metrics entry's record of whether `strategy` saw any fine-tune rows of the domain."""
    if rows > 0:
        return {"finetuned": True, "finetune_rows": rows}
    note = ("no fine-tune rows: scored by the backbone fine-tuned on the other domains" if strategy == "full"
            else "no fine-tune rows: plain backbone (its adapter weights never trained)")
    return {"finetuned": False, "finetune_rows": 0, "note": note}


def evaluate(
    data_dir: str | Path, backbone_dir: str | Path, adapter_dir: str | Path | None, ctx: DistContext,
    batch_size: int = 4096, split: str = "test", sharding: ShardingConfig | None = None,
) -> dict[str, dict]:
    """Per-domain metrics of the backbone with the adapter in `adapter_dir` (None: backbone alone).

    Metrics that cannot be computed are None (see `metrics_by_domain`). Each rank scores its own
    share of the split; rank 0 gathers the compact scores, computes and sends the metrics, so every
    rank returns the same (see the module docstring).
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
    sharded, _ = build_from_backbone(backbone_dir, adapter, ctx, train_embeddings=False, sharding=sharding,
                                     backbone_override=override, batch_size=batch_size)

    def padding() -> Batch:  # a rank without rows of its own still joins every forward
        return arrow_to_batch(source.read(source.parts[0]).slice(0, 1), schema)

    rows = score(sharded.model, lockstep(reader.epoch(0), ctx, padding), row_dtype(len(schema.domains)), ctx.device)
    columns = gather_columns(rows, ctx)
    del rows
    finetune_rows = None
    if adapter_cfg is not None and "rows_per_domain" in adapter_cfg:
        finetune_rows = dict(zip(adapter_cfg["domains"], adapter_cfg["rows_per_domain"], strict=True))

    def compute() -> dict[str, dict]:
        assert columns is not None
        return metrics_by_domain(columns, schema.domains, has_conversion=schema.conversion is not None,
                                 has_user=schema.user is not None, finetune_rows=finetune_rows,
                                 strategy=adapter_cfg["strategy"] if adapter_cfg is not None else None)

    # rank 0 computes; the others receive its dict (or its failure, raised on every rank)
    metrics = on_main(ctx, compute, share=True)
    assert metrics is not None
    return metrics
