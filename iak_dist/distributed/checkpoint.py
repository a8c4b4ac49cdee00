"""Plain (unsharded) weights in and out of a sharded model, and the backbone export format.

An exported backbone is a folder with `model.safetensors` (full tables, every dense weight) and
`backbone.json` (schema, model config, identity hash, weights hash). It loads onto any sharding
plan at any world size: each rank copies its own shards out of the full tensors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from iak_dist.config import ModelConfig, from_dict, to_dict
from iak_dist.data.schema import Schema
from iak_dist.errors import UserError
from iak_dist.io import atomic_path, atomic_write_json
from iak_dist.model.backbone import backbone_identity


def plain_state_dict(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Full tensors of `model.state_dict()` whose keys start with `prefix` (prefix removed).

    Sharded tables are gathered to full tensors on every rank (collective: all ranks must call).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if isinstance(value, ShardedTensor):
            full = torch.zeros(value.size(), dtype=value.dtype)
            for shard in value.local_shards():
                off, size = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                full[off[0]:off[0] + size[0], off[1]:off[1] + size[1]] = shard.tensor.detach().cpu()
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(full)  # shards are disjoint: the sum assembles the table
            out[name] = full
        else:
            out[name] = value.detach().cpu().clone()
    return out


@torch.no_grad()
def load_plain_state_dict(model: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Copy full tensors into `model` in place, each rank taking its own shard of sharded tables."""
    own = model.state_dict()
    expected = {k[len(prefix):] for k in own if k.startswith(prefix)}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise UserError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name in expected:
        target, source = own[prefix + name], state[name]
        if tuple(target.size()) != tuple(source.shape):
            raise UserError(
                f"checkpoint tensor {name} has shape {tuple(source.shape)}, the model expects "
                f"{tuple(target.size())} (a different model config or schema)"
            )
        if isinstance(target, ShardedTensor):
            for shard in target.local_shards():
                off, size = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(source[off[0]:off[0] + size[0], off[1]:off[1] + size[1]])
        else:
            target.copy_(source)


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def export_backbone(model: nn.Module, schema: Schema, cfg: ModelConfig, out_dir: str | Path, rank: int = 0) -> None:
    """Write the backbone of a (sharded) Ranker as a plain, world-size-free folder."""
    state = plain_state_dict(model, prefix="backbone.")
    if rank != 0:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    atomic_write_json(out_dir / "backbone.json", {
        "schema": to_dict(schema),
        "model": to_dict(cfg),
        "identity": backbone_identity(schema, cfg),
        "weights": file_hash(out_dir / "model.safetensors"),
    })


def read_backbone_meta(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / "backbone.json"
    if not meta_path.is_file():
        raise UserError(f"{path}: no exported backbone here (backbone.json missing); run pre-training first")
    meta = json.loads(meta_path.read_text())
    meta["schema_obj"] = from_dict(Schema, meta["schema"], str(meta_path))
    meta["model_obj"] = from_dict(ModelConfig, meta["model"], str(meta_path))
    return meta


def load_backbone_weights(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))
