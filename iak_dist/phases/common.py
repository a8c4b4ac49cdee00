"""Building a sharded Ranker from an exported backbone (+ adapter): shared by fine-tune, evaluate, export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from iak_dist.config import ModelConfig, ShardingConfig, to_dict
from iak_dist.data.schema import Schema
from iak_dist.distributed.checkpoint import ShardedWeights, backbone_weights, load_sharded, read_backbone_meta
from iak_dist.distributed.context import DistContext
from iak_dist.distributed.sharding import ShardedRanker, shard_ranker
from iak_dist.errors import UserError
from iak_dist.model.backbone import Backbone, backbone_identity
from iak_dist.model.ranker import Ranker
from iak_dist.model.strategies.base import Adapter


def check_schema_matches(data_schema: Schema, meta: dict[str, Any], data_dir: str | Path) -> None:
    """The data's sparse features must be the backbone's: names, table sizes and every key that says how they
    are looked up (a sequence's max_length decides which positions the backbone reads, pooling and
    shares_table what its bags hold): any other difference would be read silently wrong."""
    theirs = {f["name"]: f for f in meta["schema_obj"].as_dict()["sparse"]}
    mine = {f["name"]: f for f in data_schema.as_dict()["sparse"]}
    if theirs != mine:
        diff = sorted(f"{name}: {mine.get(name)} vs the backbone's {theirs.get(name)}"
                      for name in sorted(set(theirs) | set(mine)) if mine.get(name) != theirs.get(name))
        raise UserError(f"{data_dir}: the data's sparse features differ from the backbone's: {'; '.join(diff[:2])}")


def check_model_matches(model_cfg: ModelConfig, backbone_dir: str | Path) -> None:
    """The config's `model` section must be the one the backbone was pre-trained with.

    Fine-tuning, evaluation and export build the model from `backbone.json`; a config whose model
    section says otherwise (changed after pre-training) would silently not be what runs.
    """
    meta = read_backbone_meta(backbone_dir)
    # a key that came after the backbone was written counts as its default (what the backbone was built with)
    mine, theirs = to_dict(model_cfg), to_dict(meta["model_obj"])
    diff = [k for k in mine if mine[k] != theirs.get(k)]
    if diff:
        key = diff[0]
        raise UserError(f"model.{key}: the config says {mine[key]!r}, the backbone in {backbone_dir} was "
                        f"pre-trained with {theirs.get(key)!r}; use the backbone's value or pre-train again "
                        f"(another run_dir)")


def build_from_backbone(
    backbone_dir: str | Path, adapter: Adapter | None, ctx: DistContext, train_embeddings: bool,
    sharding: ShardingConfig | None = None, lr_sparse: float | None = None,
    backbone_override: ShardedWeights | None = None, batch_size: int = 512,
) -> tuple[ShardedRanker, dict[str, Any]]:
    """Sharded Ranker holding the exported backbone's weights, with `adapter` attached.

    Returns (sharded model, backbone meta). The exported backbone is world-size free: whatever the
    plan, each rank reads only the rows of the shards it owns (and the small replicated tensors).
    `backbone_override` replaces backbone tensors (an adapter of the `full` strategy carries its
    own backbone: `load_adapter`).
    """
    meta = read_backbone_meta(backbone_dir)
    if meta["identity"] != backbone_identity(meta["schema_obj"], meta["model_obj"]):
        raise UserError(f"{backbone_dir}: backbone.json is inconsistent (identity hash does not match)")
    weights = backbone_weights(backbone_dir, meta)  # the layout (a single-file backbone: verified) first
    backbone = Backbone(meta["schema_obj"], meta["model_obj"], device=torch.device("meta"))
    ranker = Ranker(backbone, adapter, freeze_embeddings=not train_embeddings)
    sharded = shard_ranker(ranker, ctx, sharding or ShardingConfig(), lr_sparse if train_embeddings else None,
                           batch_size)
    load_sharded(sharded.model, weights, prefix="backbone.", override=backbone_override)
    return sharded, meta
