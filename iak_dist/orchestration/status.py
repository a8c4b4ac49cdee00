"""`iak-dist pipeline status RUN_DIR`: the manifest as a table, with each phase's progress and results.

A running phase shows its training loop's live progress; a finished one the last loop it ran
(step, samples/s, loss) and its final metrics, so a finished run still says how fast and how well.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

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
            detail = progress_line(run_dir, p, p["started"]) or "starting"
        else:
            parts = [p["error"] or ""]
            if p["started"]:
                parts.append(progress_line(run_dir, p, p["started"], p["finished"] or now))
            parts.append(metrics_text(p["metrics"] or {}))
            detail = "; ".join(part for part in parts if part)
        lines.append(f"{name:<22} {p['state']:<11} {p['attempts']:>8} {took:>8}  {detail}")
    return "\n".join(lines)


def metrics_text(metrics: dict) -> str:
    shown = [f"{k}={format_metric(v)}" for k, v in list(metrics.items())[:METRICS_SHOWN]
             if v is None or isinstance(v, int | float)]
    more = len(metrics) - METRICS_SHOWN
    return ", ".join(shown) + (f" (+{more} more in manifest.json)" if more > 0 else "")


def progress_files(run_dir: Path, entry: dict[str, Any]) -> list[Path]:
    """The progress.json files of the training loops a phase runs (from its manifest `spec`), so that
    phases running at the same time each show their own loop."""
    spec = entry.get("spec") or {}  # driver.phase_spec: type, seeds, strategies
    kind, seeds = spec.get("type"), spec.get("seeds", [])
    if kind == "pretrain":
        return [run_dir / f"seed{seed}" / "progress.json" for seed in seeds]
    if kind == "finetune":
        return [run_dir / f"seed{seed}" / "adapters" / s / "progress.json"
                for seed in seeds for s in spec.get("strategies", [])]
    return []


def progress_line(run_dir: Path, entry: dict[str, Any], since: float, until: float | None = None) -> str:
    """The phase's newest progress.json written within [since, until] (rank 0 of its loop writes it)."""
    stamped = [(f.stat().st_mtime, f) for f in progress_files(run_dir, entry) if f.is_file()]
    stamped = [(t, f) for t, f in stamped if since <= t and (until is None or t <= until)]
    if not stamped:
        return ""
    p = json.loads(max(stamped)[1].read_text())
    return (f"{p['desc']}: step {p['step']}/{p['total']} ({100 * p['step'] / p['total']:.0f} %), "
            f"{p['samples_per_s']:,.0f} samples/s, loss {p['loss']:.4f}")
