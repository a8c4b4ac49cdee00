"""`full`: every backbone parameter trains (embeddings too), one shared model for all domains.

Per-domain copies of a billion-row backbone are not servable from one graph, so `full` is the
shared full fine-tune on the domains' recent data: the upper bound of cost, the usual baseline.
"""

from __future__ import annotations

from iak_dist.model.strategies.base import Adapter, register


@register
class FullFinetune(Adapter):
    name = "full"
    trains_backbone = "all"
