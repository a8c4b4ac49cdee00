"""`iak-dist pipeline status RUN_DIR`: the manifest as a table, with each phase's progress and results.

A running phase shows its training loop's live progress; a finished one the last loop it ran
(step, samples/s, loss) and its final metrics, so a finished run still says how fast and how well.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from iak_dist.metrics import format_metric
from iak_dist.orchestration.manifest import Manifest

METRICS_SHOWN = 4
"""Metrics per phase in the table; the rest are counted (all of them are in manifest.json)."""


def format_status(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    phases = Manifest.read(run_dir)
    lines = [f"{'phase':<22} {'state':<11} {'attempts':>8} {'time':>8}  progress / result"]
    now = time.time()
    for name, p in phases.items():
        took = ""
        if p["started"]:
            took = f"{(p['finished'] or now) - p['started']:.0f} s"
        if p["state"] == "running":
            detail = progress_line(run_dir, p["started"]) or "starting"
        else:
            parts = [p["error"] or ""]
            if p["started"]:
                parts.append(progress_line(run_dir, p["started"], p["finished"] or now))
            parts.append(metrics_text(p["metrics"] or {}))
            detail = "; ".join(part for part in parts if part)
        lines.append(f"{name:<22} {p['state']:<11} {p['attempts']:>8} {took:>8}  {detail}")
    return "\n".join(lines)


def metrics_text(metrics: dict) -> str:
    shown = [f"{k}={format_metric(v)}" for k, v in list(metrics.items())[:METRICS_SHOWN]
             if v is None or isinstance(v, int | float)]
    more = len(metrics) - METRICS_SHOWN
    return ", ".join(shown) + (f" (+{more} more in manifest.json)" if more > 0 else "")


def progress_line(run_dir: Path, since: float, until: float | None = None) -> str:
    """The newest progress.json written within [since, until] (rank 0 of a training loop writes it)."""
    files = [f for f in run_dir.rglob("progress.json")
             if since <= f.stat().st_mtime and (until is None or f.stat().st_mtime <= until + 1.0)]
    if not files:
        return ""
    p = json.loads(max(files, key=lambda f: f.stat().st_mtime).read_text())
    return (f"{p['desc']}: step {p['step']}/{p['total']} ({100 * p['step'] / p['total']:.0f} %), "
            f"{p['samples_per_s']:,.0f} samples/s, loss {p['loss']:.4f}")
