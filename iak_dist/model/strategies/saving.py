"""Adapters as small files: `adapter_config.json` + `adapter_model.safetensors` (HF PEFT layout).

The config is stamped with the backbone's identity (hash of schema + model config), the hash of
its weights and the hash of the adapter's own weights file, so an adapter is never silently loaded
onto the wrong backbone, nor another run's weights file under this config. A strategy that
trains backbone weights (`full`) saves them as the exported backbone does: per-rank shards under
`backbone/` written by every rank (`save_backbone_state`), their layout and hashes in the config
(`backbone_state`). Adapters saved before that, with `backbone.` keys in their weights file, load too.

A strategy with one model per domain (`per_domain_models`: `full_per_domain`) saves a folder of
adapters: each domain's own under `domains/<name>/`, and a config of the same stamps listing them
with the hash of each one's config (`save_members`), so a member swapped in from another run or
another backbone is refused like a swapped weights file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from iak_dist.config import FinetuneConfig, from_dict, to_dict
from iak_dist.distributed.checkpoint import (
    SafetensorsFile,
    ShardedWeights,
    check_weights_hash,
    file_hash,
    read_json,
    remove_stale_shards,
    save_sharded,
    write_safetensors,
)
from iak_dist.errors import UserError
from iak_dist.io import atomic_write_json
from iak_dist.model.strategies import build_adapter, known_strategies
from iak_dist.model.strategies.base import Adapter, adapter_class

CONFIG_FILE, WEIGHTS_FILE, BACKBONE_FOLDER = "adapter_config.json", "adapter_model.safetensors", "backbone"
MEMBERS_FOLDER = "domains"
"""Where a per-domain strategy keeps each domain's own adapter: `<adapter>/domains/<domain name>/`."""
_REFINETUNE = "fine-tune this strategy again"


def save_backbone_state(model: nn.Module, out_dir: str | Path, rank: int | None = None) -> dict[str, Any]:
    """Write the backbone weights a `full` adapter trained into `out_dir/backbone/`, each rank its own shards.

    Collective: every rank calls it (no table is gathered). Returns the layout to pass to `save_adapter`.
    """
    return save_sharded(model, "backbone.", Path(out_dir), BACKBONE_FOLDER, rank)


def save_adapter(
    out_dir: str | Path,
    adapter: Adapter,
    domains: list[str],
    backbone_meta: dict[str, Any],
    backbone_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the adapter (`state`, default its state_dict) and its stamped config into `out_dir`.

    `backbone_state`: the layout `save_backbone_state` returned, for a strategy that trains the backbone.
    """
    out_dir = Path(out_dir)
    state = adapter.state_dict() if state is None else state
    tensors = {f"adapter.{k}": v.detach().cpu().float().contiguous() for k, v in state.items()}
    weights_hash = write_safetensors(out_dir / WEIGHTS_FILE, tensors)
    atomic_write_json(out_dir / CONFIG_FILE, {
        "strategy": adapter.name,
        "strategy_config": to_dict(adapter.cfg) if adapter.cfg is not None else None,
        "domains": domains,
        "tower_widths": adapter.tower_widths,
        **({"embedding_dim": adapter.embedding_dim} if adapter.adapts_lookups else {}),
        "backbone_identity": backbone_meta["identity"],
        "backbone_weights": backbone_meta["weights"],
        "adapter_weights": weights_hash,  # load_adapter checks the weights file against it
        **({"backbone_state": backbone_state} if backbone_state is not None else {}),
        **(extra or {}),
    })
    remove_stale_shards(out_dir, backbone_state or {"files": {}}, BACKBONE_FOLDER)


def verify_adapter(path: str | Path, backbone_meta: dict[str, Any], every_file: bool = False) -> dict[str, Any]:
    """The adapter's config after checking it goes with this backbone and with its own weights file.

    Cheap (no model is built): check every adapter before scoring or copying any. `every_file`: also
    hash the backbone shards a `full` adapter carries (before a copy; a load checks each shard it reads).
    A per-domain folder: its stamps, then each member's, and each member's config against its recorded hash.
    """
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"{path}: no {CONFIG_FILE}; not an adapter folder")
    config = read_json(path / CONFIG_FILE, _REFINETUNE)
    per_domain = is_per_domain(config)
    missing = sorted({"strategy", "domains", "tower_widths", "backbone_identity", "backbone_weights",
                      "members" if per_domain else "adapter_weights"} - config.keys())
    if missing:
        raise UserError(f"{path / CONFIG_FILE}: no {', '.join(missing)} (written by another version of "
                        f"iak-dist?); {_REFINETUNE}")
    for key, meta_key in (("backbone_identity", "identity"), ("backbone_weights", "weights")):
        if config[key] != backbone_meta[meta_key]:
            raise UserError(
                f"{path}: adapter was trained on backbone {key.split('_')[1]} {config[key]}, "
                f"this backbone has {backbone_meta[meta_key]}; load it onto the backbone it was fine-tuned from"
            )
    if per_domain:
        for domain, member in member_dirs(path, config).items():
            verify_member(path, domain, member, config["members"][domain], backbone_meta, every_file)
        return config
    check_weights_hash(path / WEIGHTS_FILE, config["adapter_weights"], path / CONFIG_FILE, _REFINETUNE)
    if every_file and "backbone_state" in config:
        ShardedWeights(path, config["backbone_state"], path / CONFIG_FILE, _REFINETUNE).verify()
    return config


def load_adapter(path: str | Path, backbone_meta: dict[str, Any]) -> tuple[Adapter, ShardedWeights | None, dict]:
    """Rebuild the adapter saved in `path`; returns (adapter, the backbone tensors it overrides, config).

    The override is not read here: `build_from_backbone` reads each rank's rows of it. A per-domain
    folder gives its parameter-free adapter and no override: load each member (`member_dirs`) to score.
    """
    path = Path(path)
    config = verify_adapter(path, backbone_meta)
    name = config["strategy"]
    try:
        section_cls = adapter_class(name).config_class
    except KeyError as exc:
        raise UserError(f"{path / CONFIG_FILE}: strategy {name!r} is not registered here "
                        f"(known: {', '.join(known_strategies())})") from exc
    holder = FinetuneConfig()
    if section_cls is not None:
        holder.settings[name] = from_dict(section_cls, config["strategy_config"], str(path / CONFIG_FILE))
    if adapter_class(name).adapts_lookups and "embedding_dim" not in config:
        raise UserError(f"{path / CONFIG_FILE}: strategy {name} needs the backbone's embedding_dim, which this "
                        f"file does not record (written by another version of iak-dist?); {_REFINETUNE}")
    adapter = build_adapter(name, len(config["domains"]), config["tower_widths"], holder, config.get("embedding_dim"))
    if adapter.per_domain_models:
        return adapter, None, config
    weights = SafetensorsFile(path / WEIGHTS_FILE, _REFINETUNE)  # its hash was checked above
    own = {k[len("adapter."):]: weights.read(k, 0, shape[0] if shape else 1).view(shape)
           for k, (_, shape, _) in weights.entries.items() if k.startswith("adapter.")}
    adapter.load_state_dict(own, strict=True)
    if "backbone_state" in config:
        override = ShardedWeights(path, config["backbone_state"], path / CONFIG_FILE, _REFINETUNE)
    elif any(k.startswith("backbone.") for k in weights.entries):  # saved before the shards
        override = ShardedWeights.single_file(path, WEIGHTS_FILE, config["adapter_weights"], path / CONFIG_FILE,
                                              _REFINETUNE, prefix="backbone.")
    else:
        override = None
    return adapter, override, config


def is_per_domain(config: dict[str, Any]) -> bool:
    """Whether an adapter config is a folder of per-domain models (its strategy's `per_domain_models`)."""
    try:
        return adapter_class(config.get("strategy", "")).per_domain_models
    except KeyError:  # not registered here: load_adapter says so
        return False


def member_dirs(path: str | Path, config: dict[str, Any]) -> dict[str, Path]:
    """Domain name -> the folder of its own model, for each member of the per-domain adapter in `path`."""
    return {domain: Path(path) / MEMBERS_FOLDER / domain for domain in config["members"]}


def verify_member(path: Path, domain: str, member: Path, recorded_hash: str, backbone_meta: dict[str, Any],
                  every_file: bool) -> dict[str, Any]:
    """The member's config after checking it is the one `path`'s config recorded, then as an adapter."""
    if not (member / CONFIG_FILE).is_file():
        raise UserError(f"{member}: the model of domain {domain!r} listed in {path / CONFIG_FILE} is missing; "
                        f"{_REFINETUNE}")
    actual = file_hash(member / CONFIG_FILE)
    if actual != recorded_hash:
        raise UserError(f"{member / CONFIG_FILE}: hash {actual} differs from {recorded_hash} recorded in "
                        f"{path / CONFIG_FILE} (a member of another run?); {_REFINETUNE}")
    return verify_adapter(member, backbone_meta, every_file)


def save_members(out_dir: str | Path, strategy: str, domains: list[str], tower_widths: list[int],
                 backbone_meta: dict[str, Any], members: list[str]) -> dict[str, Any]:
    """Write the config of per-domain adapter folder `out_dir`, whose `members` (domain names) are saved
    under `domains/<name>/`: the stamps `save_adapter` writes, each member's config hash, and each
    domain's fine-tune rows (its member's; 0 for a domain without a member). Returns the config."""
    out_dir = Path(out_dir)
    member_configs = {d: read_json(out_dir / MEMBERS_FOLDER / d / CONFIG_FILE, _REFINETUNE) for d in members}
    config = {
        "strategy": strategy,
        "strategy_config": None,
        "domains": domains,
        "tower_widths": tower_widths,
        "backbone_identity": backbone_meta["identity"],
        "backbone_weights": backbone_meta["weights"],
        "members": {d: file_hash(out_dir / MEMBERS_FOLDER / d / CONFIG_FILE) for d in members},
        "rows_per_domain": [own_rows(member_configs[d], d) if d in member_configs else 0 for d in domains],
    }
    atomic_write_json(out_dir / CONFIG_FILE, config)
    return config


def own_rows(member_config: dict[str, Any], domain: str) -> int:
    """The fine-tune rows of `domain` a member's config records (its `rows_per_domain`, by its own domain order)."""
    return int(member_config["rows_per_domain"][member_config["domains"].index(domain)])
