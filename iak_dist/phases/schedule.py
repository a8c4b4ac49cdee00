"""Learning-rate schedules: one closed-form factor per step, applied to the dense and the sparse optimizer.

The factor multiplies `lr_dense` and `lr_sparse` alike. It is a pure function of (step, total), so
a resumed phase trains at exactly the rates it would have without the interruption (nothing to
checkpoint).
"""

from __future__ import annotations

import math

from iak_dist.config import OptimConfig


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """The fraction of the base learning rate that step `step` (0-based) of `total` trains at.

    Warm-up: step s < W trains at (s + 1) / W. After it, `constant` stays at 1; `linear` and
    `cosine` decay from 1 (at step W) to `min_lr_ratio` (at the last step, `total - 1`).

    Example::

        cfg = OptimConfig(lr_schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
        lr_factor(0, 100, cfg)   # 0.1 (warm-up)
        lr_factor(99, 100, cfg)  # 0.1 (min_lr_ratio)
    """
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    span = total - 1 - warmup  # steps from the end of warm-up to the last step
    # a phase whose only step after warm-up is its last keeps the base rate (else it would not train)
    progress = min(1.0, (step - warmup) / span) if span > 0 else 0.0
    floor = cfg.min_lr_ratio
    if cfg.lr_schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
