"""`patch`: PeterRec-style residual bottleneck per domain after every tower layer.

`y' = y + U_d relu(D_d y)`; `U_d` starts at zero so the patched model starts at the pre-trained one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from iak_dist.config import at_least
from iak_dist.model.strategies.base import Adapter, DomainLinear, register


@dataclass
class PatchConfig:
    """PeterRec-style residual bottleneck per domain after every tower layer."""

    bottleneck: int = 8
    """Width of the bottleneck; its up-projection starts at zero."""

    def problems(self) -> dict[str, str]:
        return at_least(self, bottleneck=1)


@register
class PatchAdapter(Adapter):
    name = "patch"
    config_class = PatchConfig

    def __init__(self, num_domains: int, tower_widths: list[int], cfg: PatchConfig) -> None:
        super().__init__(num_domains, tower_widths, cfg)
        b = cfg.bottleneck
        self.down = nn.ModuleList(
            DomainLinear(num_domains, w, b, init_std=1.0 / math.sqrt(w)) for w in tower_widths[1:]
        )
        self.up = nn.ModuleList(DomainLinear(num_domains, b, w, init_std=0.0) for w in tower_widths[1:])

    def adapt_activation(self, layer, y, rows):
        return y + self.up[layer](torch.relu(self.down[layer](y, rows)), rows), y.new_zeros(())
