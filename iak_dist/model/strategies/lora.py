"""`lora`: per-domain low-rank updates of every tower layer (MLoRA-style).

Layer i computes `y = W x + b + (alpha / r) * B_d(A_d x)`; `B_d` starts at zero so the adapted
model starts exactly at the pre-trained one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from iak_dist.config import at_least
from iak_dist.model.strategies.base import Adapter, DomainLinear, register


@dataclass
class LoraConfig:
    """Per-domain low-rank update of every tower layer (MLoRA-style)."""

    rank: int = 4
    """Rank r of `B_d A_d`; `B_d` starts at zero."""
    alpha: float = 8.0
    """Scale: the update is `(alpha / rank) * B_d A_d x`."""

    def problems(self) -> dict[str, str]:
        return at_least(self, rank=1)


@register
class LoraAdapter(Adapter):
    name = "lora"
    config_class = LoraConfig

    def __init__(self, num_domains: int, tower_widths: list[int], cfg: LoraConfig) -> None:
        super().__init__(num_domains, tower_widths, cfg)
        r = cfg.rank
        self.scale = cfg.alpha / r
        self.down = nn.ModuleList(
            DomainLinear(num_domains, w, r, init_std=1.0 / math.sqrt(w), bias=False) for w in tower_widths[:-1]
        )
        self.up = nn.ModuleList(
            DomainLinear(num_domains, r, w, init_std=0.0, bias=False) for w in tower_widths[1:]
        )

    def adapt_preactivation(self, layer, x, y, rows, linear):
        # y + (alpha / r) B_d A_d x, the sum done by the up-projection's GEMM where it can
        return self.up[layer](self.scale * self.down[layer](x, rows), rows, residual=y), y.new_zeros(())
