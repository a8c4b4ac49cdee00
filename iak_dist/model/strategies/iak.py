"""`iak`: the information-aware adaptive kernel, as a variational information bottleneck.

Our design (docs/iak.md), after Jiang et al., "Pre-train and Fine-tune: Recommenders as Large
Models" (WWW 2025 Companion): fine-tuning finds knowledge G' minimising
`-I(G'; T) + beta * I(G'; G)`. For domain d, at each insertion point's activation h (the tower input,
after every tower layer, or the tower output):

* encoder (knowledge compression): `q_d(z | h) = N(mu_d(h), diag(sigma_d(h)^2))`, z of width k,
  a linear map or a small MLP to `(mu, log sigma^2)`;
* adaptive prior: `p_d(z) = N(m_d, diag(s_d^2))`, learned per domain;
* decoder (knowledge matching): `h' = h + W_d z`, `W_d = 0` at start, so fine-tuning starts
  exactly at the pre-trained model (`form: residual`). At the tower input the change `W_d z`
  passes through the first tower layer (which the kernels after a layer never adapt);
* the paper-shaped ablation (`form: bottleneck`): the compressed code replaces h downstream,
  `h_bar = U_d z`, `h' = h_bar + W2_d relu(W1_d h_bar)` (G_hat = G_bar + f(G_bar)), `W2_d = 0`;
* training samples `z = mu + sigma * eps`; inference uses `z = mu`;
* loss: task BCEs + `beta_d * KL(q_d || p_d)` (closed form for diagonal Gaussians), with
  `beta_d = beta * (n_max / n_d)^gamma` per domain (gamma = 0: one beta);
* schedule: compression (first `compression_fraction` of steps, `beta_compression`, decoder
  frozen unless `decoder_in_compression`) then matching (`beta_matching`, decoder trains).

All K domain kernels are stacked `[K, ...]`; each row activates its own domain's kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from iak_dist.config import at_least
from iak_dist.model.strategies.base import Adapter, DomainLinear, DomainRows, register

INSERTIONS = {
    "output": (False, "output"),
    "every_layer": (False, "every_layer"),
    "input": (True, None),
    "input+output": (True, "output"),
    "input+every_layer": (True, "every_layer"),
}
"""`insertion` value -> (a kernel on the tower input, which tower layers get one after them)."""


@dataclass
class IakConfig:
    """Information-aware adaptive kernel (see docs/iak.md).

    The defaults are the best combination on MovieLens-100K's valid split (age domains, 3 seeds, on the
    AUC-stopped, calibrated backbones) within 10% of `full`'s trainable parameters (docs/iak.md,
    "Measured"): one kernel on the tower input with a small per-domain MLP encoder."""

    width: int = 4
    """Width k of the latent z."""
    beta_compression: float = 1.0
    """Weight of KL(q_d || p_d) during the compression phase."""
    beta_matching: float = 0.001
    """Weight of KL(q_d || p_d) during the matching phase."""
    beta_size_gamma: float = 0.5
    """Per-domain beta scaled by size: `beta_d = beta * (n_max / n_d)^gamma` over the fine-tune rows
    of each domain (small domains are held closer to their prior). 0: one beta for all domains.
    Measured: 0.5 lifts the smallest domains a little at the same overall AUC."""
    compression_fraction: float = 0.0
    """Share of fine-tune steps spent in compression (high beta); 0: no compression phase (measured
    best: every compression variant lost valid CTR-AUC)."""
    decoder_in_compression: bool = False
    """What compression trains. False: encoder + prior only; a zero-initialised residual decoder
    passes no task gradient to the encoder, so compression then only fits the encoder to the prior.
    True: the whole kernel trains under `beta_compression`, so the code keeps what predicts the
    labels at a high price per nat; matching then lowers beta."""
    form: Literal["residual", "bottleneck"] = "residual"
    """`residual`: h' = h + W_d z (starts exactly at the pre-trained model). `bottleneck`: the
    paper-shaped ablation h' = U_d z + W_d z, where the compressed code replaces h downstream."""
    insertion: Literal["output", "every_layer", "input", "input+output", "input+every_layer"] = "input"
    """Where kernels sit: `input` on the interaction output before the first tower layer (its change
    passes through that layer), `every_layer` after every tower layer's activation, `output` after
    the last one only; `input+...` combines the input kernel with the others."""
    encoder: Literal["linear", "mlp", "mlp_shared"] = "mlp"
    """`linear`: one map h -> (mu, log sigma^2); `mlp`: h -> ReLU(hidden) -> (mu, log sigma^2), every
    map per domain; `mlp_shared`: the hidden layer is shared by the K domains (its parameters are
    paid once, not K times), the output map is per domain."""
    encoder_hidden: int = 16
    """Hidden width of the `mlp` encoder."""
    init_std: float = 0.1
    """Std of the Gaussian initialisation of the encoder's output layer."""
    logvar_init: float = -3.0
    """Start of log sigma^2 (the bias of the encoder's log-variance output). 0: sigma = 1, so z is
    mostly noise at the start; -3: sigma ~ 0.22."""

    def problems(self) -> dict[str, str]:
        found = at_least(self, width=1, beta_compression=0.0, beta_matching=0.0, init_std=0.0,
                         beta_size_gamma=0.0, encoder_hidden=1)
        if not 0.0 <= self.compression_fraction <= 1.0:
            found["compression_fraction"] = f"must be within [0, 1], got {self.compression_fraction}"
        if not -8.0 <= self.logvar_init <= 8.0:
            found["logvar_init"] = f"must be within [-8, 8] (log sigma^2 is clamped there), got {self.logvar_init}"
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


def domain_beta_scale(rows_per_domain: np.ndarray, gamma: float) -> torch.Tensor:
    """`(n_max / n_d)^gamma` per domain; a domain without rows gets 1 (none of its rows train)."""
    n = torch.as_tensor(np.asarray(rows_per_domain, dtype=np.float64))
    scale = (n.max() / n.clamp(min=1.0)) ** gamma
    return torch.where(n > 0, scale, torch.ones_like(scale)).to(torch.get_default_dtype())


class GaussianKernel(nn.Module):
    """One insertion point's K stacked kernels: encoder (linear, or a hidden layer, per domain or
    shared, then linear), learned prior, decoder."""

    def __init__(self, num_domains: int, width: int, cfg: IakConfig, through_width: int | None = None) -> None:
        """`width`: of the activation h it adapts; `through_width`: the output width of the frozen layer it
        is applied through (the input kernel: the first tower layer's), None for none."""
        super().__init__()
        k = cfg.width
        self.form = cfg.form
        # He-initialised hidden layer: the code sees h's variation from step 0
        if cfg.encoder == "mlp":
            self.encoder_hidden = DomainLinear(num_domains, width, cfg.encoder_hidden, init_std=math.sqrt(2.0 / width))
        elif cfg.encoder == "mlp_shared":
            self.encoder_shared = nn.Linear(width, cfg.encoder_hidden)
            nn.init.normal_(self.encoder_shared.weight, std=math.sqrt(2.0 / width))
            nn.init.zeros_(self.encoder_shared.bias)
        self.encoder = DomainLinear(num_domains, width if cfg.encoder == "linear" else cfg.encoder_hidden, 2 * k,
                                    init_std=cfg.init_std)
        with torch.no_grad():
            self.encoder.bias[:, k:] = cfg.logvar_init
        self.prior_mu = nn.Parameter(torch.zeros(num_domains, k))
        self.prior_logvar = nn.Parameter(torch.zeros(num_domains, k))
        if cfg.form == "residual":
            self.decoder = DomainLinear(num_domains, k, width, init_std=0.0, through_width=through_width)
        else:
            self.reconstruct = DomainLinear(num_domains, k, width, init_std=1.0 / math.sqrt(k))
            self.match_in = DomainLinear(num_domains, width, k, init_std=1.0 / math.sqrt(width))
            self.decoder = DomainLinear(num_domains, k, width, init_std=0.0)

    def forward(self, h: torch.Tensor, rows: DomainRows,
                through: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h', per-row KL [B], 0 on rows of unknown domains).

        With `through = (A, b, A h + b)`, the frozen linear layer after h and its output on h: that
        layer's output on h' instead, without multiplying the batch by A again in the forward or the
        backward. The residual change `W_d z + c_d` passes through the layer as `z (W_d A^T) + c_d A^T`:
        the decoder is folded into A once per step ([K, k, out]: K * k * in * out multiply-adds), and the
        layer's output on h is a fixed function of the row (the prefix cache holds it).
        """
        if hasattr(self, "encoder_hidden"):
            code_in = torch.relu(self.encoder_hidden(h, rows))
        elif hasattr(self, "encoder_shared"):
            code_in = torch.relu(self.encoder_shared(h))
        else:
            code_in = h
        mu, logvar = self.encoder(code_in, rows).chunk(2, dim=-1)
        logvar = logvar.clamp(-8.0, 8.0)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        known = rows.known.squeeze(1).to(h.dtype)
        prior_mu, prior_logvar = (p.index_select(0, rows.index) for p in (self.prior_mu, self.prior_logvar))
        kl = gaussian_kl(mu, logvar, prior_mu, prior_logvar) * known
        if self.form == "residual":
            if through is None:
                return h + self.decoder(z, rows), kl
            weight, _, out = through
            return self.decoder(z, rows, residual=out, through=weight), kl  # the decoder folded into A
        h_bar = self.reconstruct(z, rows)
        adapted = h_bar + self.decoder(torch.relu(self.match_in(h_bar, rows)), rows)
        if through is None:
            return torch.where(known.bool().unsqueeze(1), adapted, h), kl
        weight, bias, out = through  # the compressed code replaces h: the layer sees it whole
        return torch.where(known.bool().unsqueeze(1), F.linear(adapted, weight, bias), out), kl


@register
class IakAdapter(Adapter):
    name = "iak"
    config_class = IakConfig
    grows_domains = True

    def __init__(self, num_domains: int, tower_widths: list[int], cfg: IakConfig) -> None:
        super().__init__(num_domains, tower_widths, cfg)
        at_input, after = INSERTIONS[cfg.insertion]
        last = len(tower_widths) - 1
        layers = {"every_layer": range(1, last + 1), "output": [last], None: []}[after]
        kernels = {str(i - 1): GaussianKernel(num_domains, tower_widths[i], cfg) for i in layers}
        if at_input:
            kernels["input"] = GaussianKernel(num_domains, tower_widths[0], cfg, through_width=tower_widths[1])
        self.kernels = nn.ModuleDict(kernels)
        # beta_d / beta; only fine-tuning's loss reads it, so it is not saved with the adapter
        self.register_buffer("beta_scale", torch.ones(num_domains), persistent=False)
        self.beta = cfg.beta_compression
        self.phase = "compression"
        self._phase_applied = False  # set_phase not yet run in this process (see on_step)
        self.trained_rows: np.ndarray | None = None  # rows of the domains a grown adapter was trained on

    def set_domain_sizes(self, rows_per_domain: np.ndarray) -> None:
        """beta_d = beta * (n_max / n_d)^gamma, from the fine-tune rows of each domain.

        A grown adapter counts its trained domains' rows too (this run reads only the new domains'), so a
        new domain gets the beta_d of fine-tuning every domain together."""
        counts = np.array(rows_per_domain, dtype=np.int64)
        if self.trained_rows is not None:
            counts[:len(self.trained_rows)] = self.trained_rows
        scale = domain_beta_scale(counts, self.cfg.beta_size_gamma)
        self.beta_scale.copy_(scale.to(self.beta_scale.device, self.beta_scale.dtype))

    def grow_domains(self, trained: dict[str, torch.Tensor], trained_domains: int,
                     trained_rows: np.ndarray | None = None) -> None:
        super().grow_domains(trained, trained_domains, trained_rows)
        self.trained_rows = None if trained_rows is None else np.asarray(trained_rows, dtype=np.int64)

    def _weighted_kl(self, kl: torch.Tensor, rows: DomainRows) -> torch.Tensor:
        """beta * the mean over the batch's known rows of beta_d / beta * KL."""
        weighted = (kl * self.beta_scale.index_select(0, rows.index).to(kl.dtype)).sum()
        return self.beta * weighted / rows.known.sum().clamp(min=1.0)

    def adapt_preactivation(self, layer, x, y, rows, linear):
        if layer != 0 or "input" not in self.kernels:
            return y, y.new_zeros(())
        out, kl = self.kernels["input"](x, rows, (linear.weight, linear.bias, y))
        return out, self._weighted_kl(kl, rows)

    def adapt_activation(self, layer, y, rows):
        key = str(layer)
        if key not in self.kernels:
            return y, y.new_zeros(())
        out, kl = self.kernels[key](y, rows)
        return out, self._weighted_kl(kl, rows)

    def set_phase(self, phase: str) -> None:
        """Compression: encoder + prior (+ decoder with `decoder_in_compression`); matching: all train."""
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
