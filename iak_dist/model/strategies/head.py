"""`head`: per-domain copies of the CTR and CVR heads, started from the pre-trained heads."""

from __future__ import annotations

import torch

from iak_dist.model.strategies.base import Adapter, DomainLinear, register


@register
class HeadFinetune(Adapter):
    name = "head"

    def __init__(self, num_domains: int, tower_widths: list[int], cfg=None) -> None:
        super().__init__(num_domains, tower_widths, cfg)
        hidden = tower_widths[-1]
        self.ctr = DomainLinear(num_domains, hidden, 1, init_std=0.0)
        self.cvr = DomainLinear(num_domains, hidden, 1, init_std=0.0)

    def init_from_backbone(self, backbone) -> None:
        with torch.no_grad():
            for mine, theirs in ((self.ctr, backbone.ctr_head), (self.cvr, backbone.cvr_head)):
                mine.weight.copy_(theirs.weight.t().unsqueeze(0).expand_as(mine.weight))
                mine.bias.copy_(theirs.bias.unsqueeze(0).expand_as(mine.bias))

    def head_logits(self, h, rows):
        return self.ctr(h, rows).squeeze(1), self.cvr(h, rows).squeeze(1)
