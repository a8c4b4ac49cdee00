"""`profiling/scaling.py`: every curve runs through the real code (ranks through torchrun) and reports
consistent figures; speed itself is never asserted."""

import json
import subprocess
import sys
from pathlib import Path


def test_every_curve_runs_and_reports(tmp_path):
    out = tmp_path / "scaling"
    proc = subprocess.run([sys.executable, "-m", "profiling.scaling", "--max-rows", "100000", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "scaling.json").read_text())
    assert [p["batch"] for p in result["batch"]] == [256, 512, 1024, 2048, 4096]
    assert [p["rows"] for p in result["tables"]] == [100_000]
    assert [p["domains"] for p in result["domains"]] == [2, 8, 32, 128, 512]
    assert [p["ranks"] for p in result["ranks"]] == [1, 2]
    two = result["ranks"][1]
    assert len(two["per_rank_samples_per_s"]) == 2
    # synchronous training: the total is paced by the slowest rank
    assert abs(two["total_samples_per_s"] - 2 * min(two["per_rank_samples_per_s"])) < 1e-6 * two["total_samples_per_s"]
    for curve in result.values():
        if isinstance(curve, list):
            for point in curve:
                assert all(v > 0 for k, v in point.items() if k != "per_rank_samples_per_s"), point
    assert "| IAK domains K |" in proc.stdout and "| ranks |" in proc.stdout
    assert (out / "scaling.png").stat().st_size > 5000
    # stderr is progress only (no third-party warnings): what each curve measures, then its points as
    # they come (the ranks' points before the next curve starts), then where the results went
    lines = proc.stderr.splitlines()
    assert all(line.startswith("[scaling] ") for line in lines), proc.stderr[-3000:]
    starts = [i for i, line in enumerate(lines) if not line.startswith("[scaling]   ")]
    heads = [lines[i] for i in starts]
    assert [h.split(":")[0] for h in heads[:-1]] == [f"[scaling] {c}" for c in ("ranks", "batch", "domains", "tables")]
    assert heads[-1] == f"[scaling] wrote {out / 'scaling.json'} and {out / 'scaling.png'}"
    assert [b - a - 1 for a, b in zip(starts, starts[1:], strict=False)] == [2, 5, 5, 1]  # points per curve
    assert lines[1].startswith("[scaling]   1 rank(s): ") and lines[starts[1] + 1].startswith("[scaling]   batch 256: ")
