"""Pre-training: the backbone on all domains pooled; exports a plain backbone folder."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from iak_dist.config import ModelConfig, OptimConfig
from iak_dist.data.batch import Batch
from iak_dist.data.parquet import ParquetReader
from iak_dist.data.schema import Schema
from iak_dist.distributed.checkpoint import export_backbone
from iak_dist.distributed.context import DistContext
from iak_dist.distributed.sharding import local_module, shard_ranker
from iak_dist.io import atomic_write_json
from iak_dist.model.backbone import Backbone
from iak_dist.model.ranker import Ranker
from iak_dist.phases.loop import train_loop
from iak_dist.tracking import summary_writer


def epochs_of(reader: ParquetReader) -> Iterator[Batch]:
    epoch = 0
    while True:
        yield from reader.epoch(epoch)
        epoch += 1


def steps_for(cfg: OptimConfig, rows: int) -> int:
    return cfg.steps if cfg.steps > 0 else max(1, math.ceil(cfg.epochs * rows / cfg.batch_size))


def pretrain(
    data_dir: str | Path, model_cfg: ModelConfig, optim: OptimConfig, seed: int, out_dir: str | Path,
    ctx: DistContext, show_progress: bool = True,
) -> dict[str, float]:
    """Train a backbone on `data_dir/pretrain.parquet`; write it to `out_dir/backbone`."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    schema = Schema.load(data_dir / "schema.yaml")
    reader = ParquetReader(data_dir / "pretrain.parquet", schema, optim.batch_size, ctx.rank, ctx.world_size,
                           shuffle=True, seed=seed, drop_last=True)
    torch.manual_seed(seed)
    ranker = Ranker(Backbone(schema, model_cfg, device=torch.device("meta")))
    model = shard_ranker(ranker, ctx, lr_sparse=optim.lr_sparse)
    dense_params = local_module(model).backbone.dense_parameters()
    writer = summary_writer(out_dir / "tb" / "pretrain", ctx)
    try:
        summary = train_loop(model, dense_params, epochs_of(reader), steps_for(optim, reader.num_rows), optim,
                             desc=f"pretrain seed {seed}", writer=writer, show_progress=show_progress)
        export_backbone(model, schema, model_cfg, out_dir / "backbone", ctx.rank)
        if ctx.is_main:
            atomic_write_json(out_dir / "backbone" / "train_summary.json", summary)
    finally:
        if writer is not None:
            writer.close()
    return summary
