"""`iak-dist pipeline status RUN_DIR`: the manifest as a table, with the running phase's progress."""

from __future__ import annotations

import json
import time
from pathlib import Path

from iak_dist.orchestration.manifest import Manifest


def format_status(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    phases = Manifest.read(run_dir)
    lines = [f"{'phase':<22} {'state':<11} {'attempts':>8} {'time':>8}  progress / result"]
    now = time.time()
    for name, p in phases.items():
        took = ""
        if p["started"]:
            took = f"{(p['finished'] or now) - p['started']:.0f} s"
        detail = p["error"] or ""
        if p["state"] == "running":
            detail = progress_line(run_dir, p["started"]) or "starting"
        elif p["state"] == "done" and p["metrics"]:
            detail = ", ".join(f"{k}={v:.4f}" for k, v in list(p["metrics"].items())[:3] if isinstance(v, float))
        lines.append(f"{name:<22} {p['state']:<11} {p['attempts']:>8} {took:>8}  {detail}")
    return "\n".join(lines)


def progress_line(run_dir: Path, since: float) -> str:
    """The most recent progress.json written since the phase started (rank 0 of the running loop)."""
    files = [f for f in run_dir.rglob("progress.json") if f.stat().st_mtime >= since]
    if not files:
        return ""
    p = json.loads(max(files, key=lambda f: f.stat().st_mtime).read_text())
    return (f"{p['desc']}: step {p['step']}/{p['total']} ({100 * p['step'] / p['total']:.0f} %), "
            f"{p['samples_per_s']:,.0f} samples/s, loss {p['loss']:.4f}")
