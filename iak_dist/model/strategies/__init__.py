"""Fine-tuning strategies behind one interface (`Adapter`), chosen by name.

A strategy is one file here: its config class (settings, defaults, checks) and its `Adapter`
subclass, decorated with `@register`. Registering it is adding its module to `BUILT_IN`; the
order is the default order of `finetune.strategies` (and of the report).
"""

import importlib

from iak_dist.model.strategies.base import Adapter, adapter_class, known_strategies, registered_configs

BUILT_IN = ("full", "full_per_domain", "head", "lora", "patch", "iak", "moe_adaptor")
"""The strategy modules imported (hence registered) with this package, after `none` (in base.py)."""

for _module in BUILT_IN:
    importlib.import_module(f"{__name__}.{_module}")


def build_adapter(name: str, num_domains: int, tower_widths: list[int], finetune_cfg,
                  embedding_dim: int | None = None) -> Adapter:
    """The adapter of strategy `name`, with its own section of the fine-tune config (defaults if None).
    `embedding_dim`: the backbone's, for a strategy that `adapts_lookups`."""
    cls = adapter_class(name)
    section = finetune_cfg.settings.get(name) if finetune_cfg is not None else None
    if section is None and cls.config_class is not None:
        section = cls.config_class()
    if cls.adapts_lookups:
        return cls(num_domains, tower_widths, section, embedding_dim=embedding_dim)
    return cls(num_domains, tower_widths, section)


__all__ = ["Adapter", "build_adapter", "known_strategies", "registered_configs"]
