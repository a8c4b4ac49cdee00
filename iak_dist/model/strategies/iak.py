"""`iak`: the information-aware adaptive kernel, as a variational information bottleneck.

Our design (docs/iak.md), after Jiang et al., "Pre-train and Fine-tune: Recommenders as Large
Models" (WWW 2025 Companion): fine-tuning finds knowledge G' minimising
`-I(G'; T) + beta * I(G'; G)`. For domain d, at the tower output h (or after every tower layer):

* encoder (knowledge compression): `q_d(z | h) = N(mu_d(h), diag(sigma_d(h)^2))`, z of width k;
* adaptive prior: `p_d(z) = N(m_d, diag(s_d^2))`, learned per domain;
* decoder (knowledge matching): `h' = h + W_d z`, `W_d = 0` at start, so fine-tuning starts
  exactly at the pre-trained model (`form: residual`);
* the paper-shaped ablation (`form: bottleneck`): the compressed code replaces h downstream,
  `h_bar = U_d z`, `h' = h_bar + W2_d relu(W1_d h_bar)` (G_hat = G_bar + f(G_bar)), `W2_d = 0`;
* training samples `z = mu + sigma * eps`; inference uses `z = mu`;
* loss: task BCEs + `beta * KL(q_d || p_d)` (closed form for diagonal Gaussians);
* schedule: compression (first `compression_fraction` of steps, `beta_compression`, decoder
  frozen) then matching (`beta_matching`, decoder trains).

All K domain kernels are stacked `[K, ...]`; each row activates its own domain's kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from iak_dist.config import at_least
from iak_dist.model.strategies.base import Adapter, DomainLinear, DomainRows, register


@dataclass
class IakConfig:
    """Information-aware adaptive kernel (see docs/iak.md)."""

    width: int = 8
    """Width k of the latent z."""
    beta_compression: float = 1.0
    """Weight of KL(q_d || p_d) during the compression phase."""
    beta_matching: float = 0.01
    """Weight of KL(q_d || p_d) during the matching phase."""
    compression_fraction: float = 0.3
    """Share of fine-tune steps spent in compression (encoder + prior train, decoder frozen)."""
    decoder_in_compression: bool = False
    """Let the decoder train during compression too (then compression = high-beta training of the
    whole kernel). With False, a zero-initialised residual decoder passes no task gradient to
    the encoder, so compression only fits the encoder to the prior."""
    form: Literal["residual", "bottleneck"] = "residual"
    """`residual`: h' = h + W_d z (starts exactly at the pre-trained model). `bottleneck`: the
    paper-shaped ablation h' = U_d z + W_d z, where the compressed code replaces h downstream."""
    insertion: Literal["output", "every_layer"] = "every_layer"
    """One kernel after every tower layer, or at the tower output only (measured on MovieLens-100K:
    every_layer +0.023 CTR-AUC over output, see docs/results.md)."""
    init_std: float = 0.01
    """Std of the Gaussian initialisation of encoder weights."""

    def problems(self) -> dict[str, str]:
        found = at_least(self, width=1, beta_compression=0.0, beta_matching=0.0, init_std=0.0)
        if not 0.0 <= self.compression_fraction <= 1.0:
            found["compression_fraction"] = f"must be within [0, 1], got {self.compression_fraction}"
        return found


def gaussian_kl(
    mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor, prior_logvar: torch.Tensor
) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) per row, summed over the last dim.

    Closed form for diagonal Gaussians:
    `0.5 * sum(prior_logvar - logvar + (e^logvar + (mu - prior_mu)^2) / e^prior_logvar - 1)`.
    """
    return 0.5 * (
        prior_logvar - logvar + (logvar.exp() + (mu - prior_mu) ** 2) / prior_logvar.exp() - 1.0
    ).sum(-1)


class GaussianKernel(nn.Module):
    """One insertion point's K stacked kernels: encoder, learned prior, decoder."""

    def __init__(self, num_domains: int, width: int, cfg: IakConfig) -> None:
        super().__init__()
        k = cfg.width
        self.form = cfg.form
        self.encoder = DomainLinear(num_domains, width, 2 * k, init_std=cfg.init_std)
        self.prior_mu = nn.Parameter(torch.zeros(num_domains, k))
        self.prior_logvar = nn.Parameter(torch.zeros(num_domains, k))
        if cfg.form == "residual":
            self.decoder = DomainLinear(num_domains, k, width, init_std=0.0)
        else:
            self.reconstruct = DomainLinear(num_domains, k, width, init_std=1.0 / math.sqrt(k))
            self.match_in = DomainLinear(num_domains, width, k, init_std=1.0 / math.sqrt(width))
            self.decoder = DomainLinear(num_domains, k, width, init_std=0.0)

    def forward(self, h: torch.Tensor, rows: DomainRows) -> tuple[torch.Tensor, torch.Tensor]:
        stats = self.encoder(h, rows)
        mu, logvar = stats.chunk(2, dim=-1)
        logvar = logvar.clamp(-8.0, 8.0)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        known = rows.known.squeeze(1).to(h.dtype)
        prior_mu, prior_logvar = (p.index_select(0, rows.index) for p in (self.prior_mu, self.prior_logvar))
        kl = gaussian_kl(mu, logvar, prior_mu, prior_logvar) * known
        if self.form == "residual":
            out = h + self.decoder(z, rows)
        else:
            h_bar = self.reconstruct(z, rows)
            adapted = h_bar + self.decoder(torch.relu(self.match_in(h_bar, rows)), rows)
            out = torch.where(known.bool().unsqueeze(1), adapted, h)
        return out, kl.sum() / known.sum().clamp(min=1.0)


@register
class IakAdapter(Adapter):
    name = "iak"
    config_class = IakConfig

    def __init__(self, num_domains: int, tower_widths: list[int], cfg: IakConfig) -> None:
        super().__init__(num_domains, tower_widths, cfg)
        layers = range(1, len(tower_widths)) if cfg.insertion == "every_layer" else [len(tower_widths) - 1]
        self.kernels = nn.ModuleDict({str(i - 1): GaussianKernel(num_domains, tower_widths[i], cfg) for i in layers})
        self.beta = cfg.beta_compression
        self.phase = "compression"
        self._phase_applied = False  # set_phase not yet run in this process (see on_step)

    def adapt_activation(self, layer, y, rows):
        kernel = self.kernels[str(layer)] if str(layer) in self.kernels else None
        if kernel is None:
            return y, y.new_zeros(())
        out, kl = kernel(y, rows)
        return out, self.beta * kl

    def set_phase(self, phase: str) -> None:
        """Compression: encoder + prior (+ reconstruction) train; matching: the decoder joins."""
        self.phase = phase
        self._phase_applied = True
        self.beta = self.cfg.beta_compression if phase == "compression" else self.cfg.beta_matching
        decoder_trains = phase == "matching" or self.cfg.decoder_in_compression
        for kernel in self.kernels.values():
            kernel.decoder.requires_grad_(decoder_trains)
            if hasattr(kernel, "match_in"):
                kernel.match_in.requires_grad_(decoder_trains)

    def on_step(self, step: int, total_steps: int) -> dict[str, float]:
        """The phase is a function of the step, so a resumed run derives it again from its first step.

        Trap: a run resumed in compression starts with `phase == "compression"` already, but nothing
        has frozen the decoder yet: the first call of a process must apply the phase, whatever it is.
        """
        phase = "compression" if step < self.cfg.compression_fraction * total_steps else "matching"
        if phase != self.phase or not self._phase_applied:
            self.set_phase(phase)
        return {"iak/beta": self.beta, "iak/matching": float(phase == "matching")}
