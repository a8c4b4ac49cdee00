"""Fine-tuning strategies behind one interface (`Adapter`), chosen by name.

Importing this package registers every built-in strategy.
"""

from iak_dist.model.strategies import full, head, iak, lora, patch  # noqa: F401  (register)
from iak_dist.model.strategies.base import Adapter, adapter_class, known_strategies


def build_adapter(name: str, num_domains: int, tower_widths: list[int], finetune_cfg) -> Adapter:
    """The adapter of strategy `name`, with its own section of the fine-tune config."""
    cls = adapter_class(name)
    section = getattr(finetune_cfg, name, None) if finetune_cfg is not None else None
    return cls(num_domains, tower_widths, section)


__all__ = ["Adapter", "build_adapter", "known_strategies"]
