"""TensorBoard event files (tensorboardX: no TensorFlow needed); only rank 0 writes."""

from __future__ import annotations

from pathlib import Path


def summary_writer(log_dir: str | Path, ctx):
    if not ctx.is_main:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(log_dir))
