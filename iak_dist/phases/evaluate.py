"""Evaluation: score the test split with a backbone (+ adapter), metrics per domain and overall."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from iak_dist.config import ShardingConfig
from iak_dist.data.parquet import ParquetReader
from iak_dist.data.schema import Schema
from iak_dist.distributed.checkpoint import read_backbone_meta
from iak_dist.distributed.context import DistContext
from iak_dist.errors import UserError
from iak_dist.metrics import ranking_metrics
from iak_dist.model.strategies.saving import load_adapter
from iak_dist.phases.common import build_from_backbone, check_schema_matches


@torch.no_grad()
def score(model: torch.nn.Module, reader: ParquetReader, device: torch.device | None = None) -> dict[str, np.ndarray]:
    """Scores and labels of every row the reader yields (inference: IAK uses z = mu)."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("p_ctr", "p_ctcvr", "click", "conversion", "domain", "user")}
    for batch in reader.epoch(0):
        batch = batch.to(device) if device is not None else batch
        out = model(batch)
        for key, value in (("p_ctr", out.p_ctr), ("p_ctcvr", out.p_ctcvr), ("click", batch.click),
                           ("conversion", batch.conversion), ("domain", batch.domain), ("user", batch.user)):
            parts[key].append(value.detach().cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


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
    def subset(mask: np.ndarray) -> dict:
        return ranking_metrics(scores["click"][mask], scores["conversion"][mask] if has_conversion else None,
                               scores["p_ctr"][mask], scores["p_ctcvr"][mask],
                               scores["user"][mask] if has_user else None)
    out: dict[str, dict] = {"overall": subset(np.ones(len(scores["click"]), dtype=bool))}
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

    Metrics that cannot be computed are None (see `metrics_by_domain`). Each rank scores its own row
    groups; the scores are gathered so every rank returns the same metrics.
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
    sharded, _ = build_from_backbone(backbone_dir, adapter, ctx, train_embeddings=False, sharding=sharding,
                                     backbone_override=override, batch_size=batch_size)
    # batch slices: every row is scored exactly once whatever the number of row groups per rank
    reader = ParquetReader(data_dir / f"{split}.parquet", schema, batch_size, ctx.rank, ctx.world_size,
                           split="batch_slices")
    scores = score(sharded.model, reader, ctx.device)
    if ctx.world_size > 1:  # sync point: every rank's scores, in rank order
        parts: list = [None] * ctx.world_size
        dist.all_gather_object(parts, scores)
        scores = {k: np.concatenate([p[k] for p in parts]) for k in scores}
    finetune_rows = None
    if adapter_cfg is not None and "rows_per_domain" in adapter_cfg:
        finetune_rows = dict(zip(adapter_cfg["domains"], adapter_cfg["rows_per_domain"], strict=True))
    return metrics_by_domain(scores, schema.domains, has_conversion=schema.conversion is not None,
                             has_user=schema.user is not None, finetune_rows=finetune_rows,
                             strategy=adapter_cfg["strategy"] if adapter_cfg is not None else None)
