"""Adapters as small files: `adapter_config.json` + `adapter_model.safetensors` (HF PEFT layout).

The config is stamped with the backbone's identity (hash of schema + model config), the hash of
its weights and the hash of the adapter's own weights file, so an adapter is never silently loaded
onto the wrong backbone, nor another run's weights file under this config. A strategy that
trains backbone weights (`full`) saves them under `backbone.` keys in the same file.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from iak_dist.config import FinetuneConfig, from_dict, to_dict
from iak_dist.distributed.checkpoint import check_weights_hash, file_hash, load_safetensors, read_json
from iak_dist.errors import UserError
from iak_dist.io import atomic_path, atomic_write_json
from iak_dist.model.strategies import build_adapter
from iak_dist.model.strategies.base import Adapter

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_REFINETUNE = "fine-tune this strategy again"


def save_adapter(
    out_dir: str | Path,
    adapter: Adapter,
    domains: list[str],
    backbone_meta: dict[str, Any],
    backbone_state: dict[str, torch.Tensor] | None = None,
    extra: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the adapter (`state`, default its state_dict) and its stamped config into `out_dir`."""
    out_dir = Path(out_dir)
    state = adapter.state_dict() if state is None else state
    tensors = {f"adapter.{k}": v.detach().cpu().float().contiguous() for k, v in state.items()}
    for k, v in (backbone_state or {}).items():
        tensors[f"backbone.{k}"] = v.contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
        weights_hash = file_hash(tmp)
    atomic_write_json(out_dir / CONFIG_FILE, {
        "strategy": adapter.name,
        "strategy_config": to_dict(adapter.cfg) if adapter.cfg is not None else None,
        "domains": domains,
        "tower_widths": adapter.tower_widths,
        "backbone_identity": backbone_meta["identity"],
        "backbone_weights": backbone_meta["weights"],
        "adapter_weights": weights_hash,  # load_adapter checks the weights file against it
        **(extra or {}),
    })


def verify_adapter(path: str | Path, backbone_meta: dict[str, Any]) -> dict[str, Any]:
    """The adapter's config after checking it goes with this backbone and with its own weights file.

    Cheap (no model is built): check every adapter before scoring or copying any.
    """
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"{path}: no {CONFIG_FILE}; not an adapter folder")
    config = read_json(path / CONFIG_FILE, _REFINETUNE)
    missing = sorted({"strategy", "domains", "tower_widths", "backbone_identity", "backbone_weights",
                      "adapter_weights"} - config.keys())
    if missing:
        raise UserError(f"{path / CONFIG_FILE}: no {', '.join(missing)} (written by another version of "
                        f"iak-dist?); {_REFINETUNE}")
    for key, meta_key in (("backbone_identity", "identity"), ("backbone_weights", "weights")):
        if config[key] != backbone_meta[meta_key]:
            raise UserError(
                f"{path}: adapter was trained on backbone {key.split('_')[1]} {config[key]}, "
                f"this backbone has {backbone_meta[meta_key]}; load it onto the backbone it was fine-tuned from"
            )
    check_weights_hash(path / WEIGHTS_FILE, config["adapter_weights"], path / CONFIG_FILE, _REFINETUNE)
    return config


def load_adapter(path: str | Path, backbone_meta: dict[str, Any]) -> tuple[Adapter, dict[str, torch.Tensor], dict]:
    """Rebuild the adapter saved in `path`; returns (adapter, backbone tensors it overrides, config)."""
    path = Path(path)
    config = verify_adapter(path, backbone_meta)
    name = config["strategy"]
    section_cls = typing.get_type_hints(FinetuneConfig).get(name)
    section = from_dict(section_cls, config["strategy_config"], str(path / CONFIG_FILE)) if section_cls else None
    holder = FinetuneConfig()
    if section is not None:
        setattr(holder, name, section)
    adapter = build_adapter(name, len(config["domains"]), config["tower_widths"], holder)
    tensors = load_safetensors(path / WEIGHTS_FILE, _REFINETUNE)  # its hash was checked above
    own = {k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")}
    adapter.load_state_dict(own, strict=True)
    backbone = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    return adapter, backbone, config
