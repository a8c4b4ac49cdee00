"""`patch`: PeterRec-style residual bottleneck per domain after every tower layer.

`y' = y + U_d relu(D_d y)`; `U_d` starts at zero so the patched model starts at the pre-trained one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from iak_dist.config import PatchConfig
from iak_dist.model.strategies.base import Adapter, DomainLinear, register


@register
class PatchAdapter(Adapter):
    name = "patch"

    def __init__(self, num_domains: int, tower_widths: list[int], cfg: PatchConfig) -> None:
        super().__init__(num_domains, tower_widths, cfg)
        b = cfg.bottleneck
        self.down = nn.ModuleList(
            DomainLinear(num_domains, w, b, init_std=1.0 / math.sqrt(w)) for w in tower_widths[1:]
        )
        self.up = nn.ModuleList(DomainLinear(num_domains, b, w, init_std=0.0) for w in tower_widths[1:])

    def adapt_activation(self, layer, y, rows):
        return y + self.up[layer](torch.relu(self.down[layer](y, rows)), rows), y.new_zeros(())
