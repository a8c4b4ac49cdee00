"""`full_per_domain`: the traditional fine-tuning baseline, one full fine-tune per domain (K models).

Each domain with fine-tune rows gets its own copy of the whole backbone (tables included), trained
as `full` on that domain's rows only; a domain is scored by its own model, a domain without rows by
the plain backbone. It holds no parameters itself: its folder holds one `full` adapter per domain
under `domains/<name>/` (`phases/per_domain.py`), so its cost is K times `full`'s.
"""

from __future__ import annotations

from iak_dist.model.strategies.base import Adapter, register


@register
class FullPerDomain(Adapter):
    name = "full_per_domain"
    trains_backbone = "all"
    per_domain_models = True
    member_strategy = "full"
    """The strategy each domain's own model is fine-tuned with (`full` on that domain's rows)."""
