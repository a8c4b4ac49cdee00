"""A backbone pre-trained through the pipelined loop and exported: its served scores next to the sharded
model's (the check that serving scores as training does, for each way the backbone reads its features)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple


class ServedAndTrained(NamedTuple):
    run: Path  # the run folder (seed0/backbone, seed0/adapters/none)
    schema: Any
    rows: Any  # the first test rows (pyarrow Table)
    predictor: Any  # the exported artefact's Predictor
    sharded: Any  # the backbone as training builds it (eval mode)
    trained: Any  # numpy p_ctr of `rows` by `sharded`


def served_and_trained(data: Path, model_cfg, cfg, ctx, tmp_path: Path, rows: int = 512) -> ServedAndTrained:
    """Pre-train `model_cfg` for 5 steps on `data` (TorchRec's train pipeline traces the model), fine-tune
    `none`, export; score the first `rows` test rows with the sharded model."""
    import torch

    from iak_dist.data.batch import arrow_to_batch
    from iak_dist.data.parquet import read_table
    from iak_dist.data.schema import Schema
    from iak_dist.data.source import Split
    from iak_dist.phases.common import build_from_backbone
    from iak_dist.phases.finetune import finetune
    from iak_dist.phases.pretrain import pretrain
    from iak_dist.serving.artefact import export_artefact
    from iak_dist.serving.predictor import Predictor

    run = tmp_path / "run"
    pretrain(data, model_cfg, dataclasses.replace(cfg.pretrain, steps=5), cfg.distributed, 0, run / "seed0", ctx,
             show_progress=False)
    finetune(data, run / "seed0" / "backbone", "none", cfg.finetune, 0, run / "seed0" / "adapters" / "none", ctx,
             show_progress=False)
    predictor = Predictor.load(export_artefact(run, "none", tmp_path / "artefact"))
    schema = Schema.load(Path(data) / "schema.yaml")
    table = read_table(Split.open(data, "test", schema), schema).slice(0, rows)
    sharded, _ = build_from_backbone(run / "seed0" / "backbone", None, ctx, train_embeddings=False)
    sharded.model.eval()
    with torch.no_grad():
        trained = sharded.model(arrow_to_batch(table, schema)).p_ctr.numpy()
    return ServedAndTrained(run, schema, table, predictor, sharded, trained)
