"""`moe_adaptor`: UniSRec's MoE-enhanced adaptor over item representations, gated per domain.

UniSRec (Hou et al., KDD 2022) adapts a frozen item representation x to a domain with a mixture of
parametric-whitening experts, `sum_e g_e (x - b_e) W_e`, the gate `g = softmax(x G)` choosing among
them. Here the experts are shared by the domains and each domain has its own gate, so a domain picks
its mixture of whitenings; the result is added to x (`W_e` start at zero: the adapted model starts
exactly at the pre-trained one). It sits on the embedding lookups of the configured item features,
before the sequence encoders and the interaction: the whole frozen backbone then reads the adapted
items (a history's target attention included, through the item it is the target of). Only the
adaptor trains. Since it changes the backbone's input, it cannot train from the prefix cache.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from iak_dist.config import at_least
from iak_dist.errors import UserError
from iak_dist.model.strategies.base import Adapter, DomainLinear, DomainRows, Overlay, register


@dataclass
class MoeAdaptorConfig:
    """Per-domain mixture of parametric-whitening experts over the item embeddings (UniSRec)."""

    experts: int = 4
    """Parametric-whitening experts `(x - b_e) W_e` (each `d x d`), shared by the domains."""
    features: list[str] = field(default_factory=lambda: ["item_id"])
    """The item features whose looked-up embedding the adaptor changes (single lookups, not sequence
    features: a history's items are read through its encoder, whose target is the item)."""

    def problems(self) -> dict[str, str]:
        found = at_least(self, experts=1)
        if not self.features:
            found["features"] = "name at least one item feature, e.g. [item_id]"
        return found


@register
class MoeAdaptor(Adapter):
    name = "moe_adaptor"
    config_class = MoeAdaptorConfig
    adapts_lookups = True
    # the experts are shared and train on every fine-tuned domain: a domain without rows mixes them with its
    # random gate (so it is no plain backbone, and a new domain could not start at it: no `grows_domains`)
    untrained_domain_is_backbone = False

    def __init__(self, num_domains: int, tower_widths: list[int], cfg: MoeAdaptorConfig,
                 embedding_dim: int | None = None) -> None:
        super().__init__(num_domains, tower_widths, cfg)
        if embedding_dim is None:
            raise ValueError("moe_adaptor adapts embeddings: build it with the backbone's embedding_dim")
        d, e = embedding_dim, cfg.experts
        self.embedding_dim = embedding_dim
        self.features = list(cfg.features)
        self.whitening_bias = nn.Parameter(torch.zeros(e, d))  # b_e
        self.whitening = nn.Parameter(torch.zeros(e, d, d))  # W_e: zero, so the adaptor starts as the identity
        self.gate = DomainLinear(num_domains, d, e, init_std=1.0 / math.sqrt(d))  # per-domain G_d, bias

    def check_schema(self, schema) -> None:
        singles = [f.name for f in schema.sparse if not f.sequence]
        for name in self.features:
            if name not in singles:
                raise UserError(f"finetune.moe_adaptor.features: {name!r} is not a single-lookup sparse feature "
                                f"of the schema (those are: {', '.join(singles)})")

    def adapt_lookups(self, pooled: Mapping[str, torch.Tensor], domain: torch.Tensor) -> Mapping[str, torch.Tensor]:
        """`x + known * sum_e softmax(x G_d)_e (x - b_e) W_e` for each configured feature's embedding x
        (rows of an unknown domain keep x)."""
        rows = DomainRows.of(domain, self.num_domains)
        return Overlay(pooled, {name: self(pooled[name].float(), rows) for name in self.features})

    def forward(self, x: torch.Tensor, rows: DomainRows) -> torch.Tensor:
        """One feature's adapted embeddings [B, d]. The experts are read here, in this module's forward:
        ZeRO-3 gathers a module's own parameters only when its forward runs."""
        gate = torch.softmax(self.gate(x, rows), dim=-1)  # [B, E]
        experts = torch.einsum("bei,eio->beo", x.unsqueeze(1) - self.whitening_bias, self.whitening)
        return x + rows.known * (gate.unsqueeze(2) * experts).sum(1)

