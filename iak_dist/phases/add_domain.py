"""Adding a domain to a trained adapter: K domains -> K+1, training only the new domain's kernel.

`iak-dist finetune CONFIG --strategy iak --add-domain NAME --from ADAPTER_DIR`. The data's schema
lists the adapter's K domains in its order, then NAME. The grown adapter is built with K+1 domains,
takes the K trained domains' rows from ADAPTER_DIR (`Adapter.grow_domains`: their gradients are
masked, shared parameters frozen) and fine-tunes on NAME's rows alone (`finetune(only_domain=...)`).
The new kernel starts as the pre-trained model (zero decoder), and the K trained domains' parameters
leave the run bitwise unchanged: checked on the written adapter before its config is completed
(rows of every domain, where it was grown from).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iak_dist.config import DistributedConfig, FinetuneConfig, from_dict, to_dict
from iak_dist.data.schema import Schema
from iak_dist.distributed.checkpoint import read_backbone_meta
from iak_dist.distributed.context import DistContext, on_main
from iak_dist.errors import UserError
from iak_dist.io import atomic_write_json
from iak_dist.model.strategies import known_strategies
from iak_dist.model.strategies.base import Adapter, adapter_class
from iak_dist.model.strategies.saving import CONFIG_FILE, load_adapter, verify_adapter
from iak_dist.phases.finetune import finetune
from iak_dist.runtime import say


@dataclasses.dataclass
class Growth:
    """What a grown adapter starts from, checked before anything is built."""

    source: Path
    source_config: dict[str, Any]
    domain: str
    cfg: FinetuneConfig
    """The fine-tune config with the source adapter's own strategy settings (its shapes must match)."""

    @property
    def trained_domains(self) -> list[str]:
        return list(self.source_config["domains"])


def growable() -> list[str]:
    """Strategies whose adapters can take a new domain."""
    return [name for name in known_strategies() if adapter_class(name).grows_domains]


def check_growth(data_dir: str | Path, backbone_dir: str | Path, strategy: str, cfg: FinetuneConfig,
                 source: str | Path, domain: str, out_dir: str | Path) -> Growth:
    """The one-line errors of `--add-domain`, before any model is built (every rank checks alike)."""
    source, data_dir = Path(source), Path(data_dir)
    if not adapter_class(strategy).grows_domains:
        raise UserError(f"--strategy {strategy}: --add-domain needs per-domain kernels, which {strategy} has not; "
                        f"strategies that can: {', '.join(growable())}")
    if source.resolve() == Path(out_dir).resolve():
        raise UserError(f"--from {source}: the grown adapter would overwrite it; write it elsewhere")
    if cfg.optim.weight_decay > 0:
        raise UserError(f"finetune.optim.weight_decay: must be 0 with --add-domain (decay would change the "
                        f"trained domains' parameters), got {cfg.optim.weight_decay}")
    config = verify_adapter(source, read_backbone_meta(backbone_dir))  # another backbone: one line, here
    if config["strategy"] != strategy:
        raise UserError(f"--from {source}: an adapter of strategy {config['strategy']}, not {strategy}")
    trained = list(config["domains"])
    if domain in trained:
        raise UserError(f"--add-domain {domain}: the adapter in {source} already has this domain "
                        f"(it knows {', '.join(trained)})")
    schema_path = data_dir / "schema.yaml"
    domains = Schema.load(schema_path).domains
    if domains != [*trained, domain]:
        raise UserError(f"{schema_path}: domains {domains} must be the adapter's {trained} followed by {domain!r}")
    section_cls = adapter_class(strategy).config_class
    if section_cls is not None:
        section = from_dict(section_cls, config["strategy_config"], str(source / CONFIG_FILE))
        cfg = dataclasses.replace(cfg, settings={**cfg.settings, strategy: section})
    return Growth(source, config, domain, cfg)


def add_domain(
    data_dir: str | Path, backbone_dir: str | Path, strategy: str, cfg: FinetuneConfig, seed: int,
    source: str | Path, domain: str, out_dir: str | Path, ctx: DistContext, show_progress: bool = True,
    dist_cfg: DistributedConfig | None = None,
) -> dict[str, float]:
    """Grow the adapter in `source` by `domain`, fine-tune only that domain's kernel, save to `out_dir`.

    The strategy's settings are the source adapter's (a config that says otherwise is named in a
    line). Returns the fine-tune summary.
    """
    growth = check_growth(data_dir, backbone_dir, strategy, cfg, source, domain, out_dir)
    meta = read_backbone_meta(backbone_dir)
    asked, used = to_dict(cfg.settings.get(strategy)) or {}, growth.source_config["strategy_config"] or {}
    differing = sorted(key for key in asked if asked[key] != used.get(key))
    if differing:
        say(f"[add-domain] the {strategy} settings are the adapter's in {growth.source}; the config's differ "
            f"in {', '.join(differing)}", ctx.rank)
    trained_adapter, _, _ = load_adapter(growth.source, meta)
    trained = {k: v.detach().clone() for k, v in trained_adapter.state_dict().items()}
    del trained_adapter
    trained_rows = growth.source_config.get("rows_per_domain")
    k = len(growth.trained_domains)

    def grow(adapter: Adapter) -> None:
        adapter.grow_domains(trained, k, None if trained_rows is None else np.asarray(trained_rows))

    summary = finetune(data_dir, backbone_dir, strategy, growth.cfg, seed, out_dir, ctx,
                       show_progress=show_progress, dist_cfg=dist_cfg, only_domain=domain, prepare_adapter=grow)
    on_main(ctx, lambda: complete_config(Path(out_dir), growth, trained, meta))
    ctx.barrier()
    if show_progress:
        say(f"[add-domain] {domain} added to the {k} domains of {growth.source}: {out_dir}", ctx.rank)
    return summary


def complete_config(out_dir: Path, growth: Growth, trained: dict[str, torch.Tensor], meta: dict) -> None:
    """Check the written adapter kept the trained domains bitwise, then record their rows and the source.

    A failure here means the run trained from other weights (a checkpoint of another run in the
    checkpoint folder): the adapter is not what `--from` promised.
    """
    grown, _, config = load_adapter(out_dir, meta)
    k = len(growth.trained_domains)
    for name, value in grown.state_dict().items():
        old = trained[name]
        kept = value[:k] if value.shape != old.shape else value
        if not torch.equal(kept, old.to(kept.dtype)):
            raise UserError(f"{out_dir}: {name} of the trained domains changed while adding {growth.domain!r} "
                            f"(resumed from another run's checkpoint?); remove its checkpoints and run again")
    rows = list(config["rows_per_domain"])
    rows[:k] = growth.source_config.get("rows_per_domain", [0] * k)
    atomic_write_json(out_dir / CONFIG_FILE, {**config, "rows_per_domain": rows, "grown_from": {
        "adapter": str(growth.source), "adapter_weights": growth.source_config["adapter_weights"],
        "domains": growth.trained_domains, "added": growth.domain,
    }})
