"""Fine-tuning: every domain at once with one strategy, on the frozen (or not, for `full`) backbone."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from iak_dist.config import FinetuneConfig
from iak_dist.data.batch import Batch, arrow_to_batch, domain_indices
from iak_dist.data.parquet import read_table
from iak_dist.data.sampler import DomainBatchSampler
from iak_dist.data.schema import Schema
from iak_dist.distributed.checkpoint import plain_state_dict, read_backbone_meta
from iak_dist.distributed.context import DistContext
from iak_dist.distributed.sharding import local_module
from iak_dist.io import atomic_write_json
from iak_dist.model.backbone import tower_widths
from iak_dist.model.strategies import build_adapter
from iak_dist.model.strategies.base import Adapter, adapter_class
from iak_dist.model.strategies.saving import save_adapter
from iak_dist.phases.common import build_from_backbone, check_schema_matches
from iak_dist.phases.loop import train_loop
from iak_dist.phases.pretrain import steps_for
from iak_dist.tracking import summary_writer


def sampled_batches(table: pa.Table, schema: Schema, sampler: DomainBatchSampler) -> Iterator[Batch]:
    while True:
        yield arrow_to_batch(table.take(sampler.next_batch()), schema)


def count_trainable(model: torch.nn.Module, strategy: str) -> int:
    """Parameters that fine-tuning updates (embedding rows included for `full`)."""
    ranker = local_module(model)
    n = sum(p.numel() for p in ranker.adapter.parameters()) if ranker.adapter is not None else 0
    if adapter_class(strategy).trains_backbone == "all":
        n += sum(p.numel() for p in ranker.backbone.dense_parameters())
        n += sum(c.num_embeddings * c.embedding_dim for c in ranker.backbone.embeddings._embedding_bag_configs)
    return n


@dataclass
class FinetuneSetup:
    """Everything a fine-tune run holds, built before its loop (tests reuse it)."""

    model: torch.nn.Module
    adapter: Adapter
    meta: dict
    schema: Schema
    table: pa.Table
    domains: np.ndarray
    dense_params: list[torch.nn.Parameter]


def build_finetune(
    data_dir: str | Path, backbone_dir: str | Path, strategy: str, cfg: FinetuneConfig, ctx: DistContext
) -> FinetuneSetup:
    """Load the fine-tune split and the backbone, attach `strategy`'s adapter, freeze what must not train."""
    data_dir = Path(data_dir)
    schema = Schema.load(data_dir / "schema.yaml")
    table = read_table(data_dir / "finetune.parquet", schema)
    train_all = adapter_class(strategy).trains_backbone == "all"
    meta = read_backbone_meta(backbone_dir)
    check_schema_matches(schema, meta, data_dir)
    widths = tower_widths(meta["schema_obj"], meta["model_obj"])
    adapter = build_adapter(strategy, len(schema.domains), widths, cfg)
    model, meta = build_from_backbone(backbone_dir, adapter, ctx, train_embeddings=train_all,
                                      lr_sparse=cfg.optim.lr_sparse)
    backbone = local_module(model).backbone
    adapter.init_from_backbone(backbone)
    for p in backbone.dense_parameters():
        p.requires_grad_(train_all)
    dense_params = list(adapter.parameters()) + (backbone.dense_parameters() if train_all else [])
    domains = domain_indices(table.column(schema.domain), schema.domains)
    return FinetuneSetup(model, adapter, meta, schema, table, domains, dense_params)


def finetune(
    data_dir: str | Path, backbone_dir: str | Path, strategy: str, cfg: FinetuneConfig, seed: int,
    out_dir: str | Path, ctx: DistContext, show_progress: bool = True,
) -> dict[str, float]:
    """Fine-tune `strategy` on `data_dir/finetune.parquet`; save the adapter to `out_dir`."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    run = build_finetune(data_dir, backbone_dir, strategy, cfg, ctx)
    num_domains = len(run.schema.domains)
    steps = steps_for(cfg.optim, run.table.num_rows)
    summary: dict[str, float] = {"finetune/trainable_params": float(count_trainable(run.model, strategy))}
    if run.dense_params:
        sampler = DomainBatchSampler(run.domains, num_domains, cfg.optim.batch_size, cfg.sampler_alpha, seed)
        writer = summary_writer(out_dir / "tb", ctx)
        try:
            summary |= train_loop(run.model, run.dense_params, sampled_batches(run.table, run.schema, sampler),
                                  steps, cfg.optim, desc=f"finetune {strategy} seed {seed}", writer=writer,
                                  adapter=run.adapter, num_domains=num_domains, show_progress=show_progress)
        finally:
            if writer is not None:
                writer.close()
    train_all = run.adapter.trains_backbone == "all"
    backbone_state = plain_state_dict(run.model, prefix="backbone.") if train_all else None
    if ctx.is_main:
        rows_per_domain = np.bincount(run.domains[run.domains >= 0], minlength=num_domains)
        save_adapter(out_dir, run.adapter, run.schema.domains, run.meta, backbone_state,
                     extra={"rows_per_domain": rows_per_domain.tolist()})
        atomic_write_json(out_dir / "train_summary.json", summary)
    return summary
