"""Fine-tuning: every domain at once with one strategy, on the frozen (or not, for `full`) backbone."""

from __future__ import annotations

import math
from collections.abc import Iterator
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
from iak_dist.model.strategies.saving import save_adapter
from iak_dist.phases.common import build_from_backbone, check_schema_matches
from iak_dist.phases.loop import train_loop
from iak_dist.tracking import summary_writer


def sampled_batches(table: pa.Table, schema: Schema, sampler: DomainBatchSampler) -> Iterator[Batch]:
    while True:
        yield arrow_to_batch(table.take(sampler.next_batch()), schema)


def count_trainable(model: torch.nn.Module, strategy: str) -> int:
    """Parameters that fine-tuning updates (embedding rows included for `full`)."""
    ranker = local_module(model)
    n = sum(p.numel() for p in ranker.adapter.parameters()) if ranker.adapter is not None else 0
    if strategy == "full":
        n += sum(p.numel() for p in ranker.backbone.dense_parameters())
        n += sum(c.num_embeddings * c.embedding_dim for c in ranker.backbone.embeddings._embedding_bag_configs)
    return n


def finetune(
    data_dir: str | Path, backbone_dir: str | Path, strategy: str, cfg: FinetuneConfig, seed: int,
    out_dir: str | Path, ctx: DistContext, show_progress: bool = True,
) -> dict[str, float]:
    """Fine-tune `strategy` on `data_dir/finetune.parquet`; save the adapter to `out_dir`."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    schema = Schema.load(data_dir / "schema.yaml")
    table = read_table(data_dir / "finetune.parquet", schema)
    torch.manual_seed(seed)
    num_domains = len(schema.domains)
    train_all = strategy == "full"
    meta = read_backbone_meta(backbone_dir)
    check_schema_matches(schema, meta, data_dir)
    adapter = build_adapter(strategy, num_domains, tower_widths(meta["schema_obj"], meta["model_obj"]), cfg)
    model, meta = build_from_backbone(backbone_dir, adapter, ctx, train_embeddings=train_all,
                                      lr_sparse=cfg.optim.lr_sparse)
    ranker = local_module(model)
    adapter.init_from_backbone(ranker.backbone)
    for p in ranker.backbone.dense_parameters():
        p.requires_grad_(train_all)
    dense_params = list(adapter.parameters())
    if train_all:
        dense_params += list(ranker.backbone.dense_parameters())
    domains = domain_indices(table.column(schema.domain), schema.domains)
    rows_per_domain = np.bincount(domains[domains >= 0], minlength=num_domains)
    steps = cfg.optim.steps if cfg.optim.steps > 0 else max(
        1, math.ceil(cfg.optim.epochs * table.num_rows / cfg.optim.batch_size))
    summary: dict[str, float] = {"finetune/trainable_params": float(count_trainable(model, strategy))}
    if strategy != "none" and dense_params:
        sampler = DomainBatchSampler(domains, num_domains, cfg.optim.batch_size, cfg.sampler_alpha, seed)
        writer = summary_writer(out_dir / "tb", ctx)
        try:
            summary |= train_loop(model, dense_params, sampled_batches(table, schema, sampler), steps, cfg.optim,
                                  desc=f"finetune {strategy} seed {seed}", writer=writer, adapter=adapter,
                                  num_domains=num_domains, show_progress=show_progress)
        finally:
            if writer is not None:
                writer.close()
    backbone_state = plain_state_dict(model, prefix="backbone.") if train_all else None
    if ctx.is_main:
        save_adapter(out_dir, adapter, schema.domains, meta, backbone_state,
                     extra={"rows_per_domain": rows_per_domain.tolist()})
        atomic_write_json(out_dir / "train_summary.json", summary)
    return summary
