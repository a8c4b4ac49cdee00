"""The one interface of every fine-tuning strategy, and the stacked per-domain layers they share.

A strategy is an `Adapter` (an `nn.Module` holding only its own parameters) plus a rule for which
backbone parameters train. The backbone calls the adapter's hooks in its forward:

* `adapt_preactivation(i, x, y, domain)`: tower layer i computed `y = W x + b`; return y' (LoRA).
* `adapt_activation(i, y, domain)`: after layer i's ReLU; return (y', aux_loss) (patch, IAK).
* `head_logits(h, domain)`: per-domain heads, or None to use the backbone's (head).

Parallel inference with domain activation: per-domain parameters are stacked `[K, ...]` and each
row gathers its own domain's slice in one pass (`DomainLinear`). A row whose domain is -1 (not
known to the adapter) gets no adaptation: it is scored by the plain backbone.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class DomainLinear(nn.Module):
    """K stacked linear maps; row b uses map `domain[b]`, rows with domain -1 get zeros.

    Two equivalent ways to apply it, picked by size: when all K outputs are narrow
    (`K * out_features <= gemm_limit`), one GEMM computes every domain's output and each row keeps
    its own (cheap for small kernels, and its backward is one GEMM too); otherwise each row gathers
    its own weight slice (`[B, in, out]`) so the cost stays flat in K.

    Args:
        num_domains: K.
        in_features, out_features: shape of each map.
        init_std: std of the Gaussian weight init; 0 gives a zero map (changes nothing at start).
    """

    def __init__(self, num_domains: int, in_features: int, out_features: int, init_std: float,
                 bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_domains, in_features, out_features) * init_std)
        self.bias = nn.Parameter(torch.zeros(num_domains, out_features)) if bias else None
        # decided here, not per call: the forward has no shape-dependent branch (it is fx-traced)
        self.one_gemm = num_domains * out_features <= self.gemm_limit

    gemm_limit = 4096

    def forward(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        idx = domain.clamp(min=0)
        if self.one_gemm:
            k, d_in, d_out = self.weight.shape
            every = (x @ self.weight.permute(1, 0, 2).reshape(d_in, k * d_out)).view(-1, k, d_out)
            y = every.gather(1, idx.view(-1, 1, 1).expand(-1, 1, d_out)).squeeze(1)
        else:
            y = torch.bmm(x.unsqueeze(1), self.weight[idx]).squeeze(1)
        if self.bias is not None:
            y = y + self.bias[idx]
        return y * (domain >= 0).unsqueeze(1).to(y.dtype)


class Adapter(nn.Module):
    """Base class: no adaptation. Subclasses override the hooks they need.

    Class attributes:
        name: the strategy's key in configs (`finetune.strategies`).
        trains_backbone: which backbone parameters train: "none", "heads" or "all".
    """

    name: ClassVar[str] = "none"
    trains_backbone: ClassVar[str] = "none"

    def __init__(self, num_domains: int, tower_widths: list[int], cfg: Any = None) -> None:
        super().__init__()
        self.num_domains = num_domains
        self.tower_widths = tower_widths
        self.cfg = cfg

    def adapt_preactivation(self, layer: int, x: torch.Tensor, y: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        return y

    def adapt_activation(self, layer: int, y: torch.Tensor, domain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return y, y.new_zeros(())

    def head_logits(self, h: torch.Tensor, domain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def on_step(self, step: int, total_steps: int) -> dict[str, float]:
        """Called before every fine-tune step (schedules); returns scalars worth logging."""
        return {}

    def init_from_backbone(self, backbone: nn.Module) -> None:
        """Copy whatever the adapter starts from out of the pre-trained backbone (e.g. heads)."""


_REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    _REGISTRY[cls.name] = cls
    return cls


register(Adapter)


def adapter_class(name: str) -> type[Adapter]:
    if name not in _REGISTRY:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def known_strategies() -> list[str]:
    return sorted(_REGISTRY)
