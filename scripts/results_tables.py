"""Prints the Markdown tables of docs/results.md from the runs of scripts/reproduce_results.sh.

    .venv/bin/python scripts/results_tables.py runs > /tmp/tables.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(cell: dict) -> str:
    return f"{cell['mean']:.4f} ± {cell['std']:.4f}"


def comparison(run: Path, metric: str) -> str:
    report = json.loads((run / "report.json").read_text())
    agg, costs = report["aggregate"], report["costs"]
    strategies = list(agg)
    domains = list(agg[strategies[0]])
    lines = ["| domain | test rows | " + " | ".join(strategies) + " |", "|---|---:|" + "---:|" * len(strategies)]
    for d in domains:
        means = {s: agg[s][d][metric]["mean"] for s in strategies}
        best = max(means.values()) if metric != "logloss" else min(means.values())
        cells = [f"**{fmt(agg[s][d][metric])}**" if means[s] == best else fmt(agg[s][d][metric]) for s in strategies]
        lines.append(f"| {d} | {int(agg[strategies[0]][d]['rows']['mean']):,} | " + " | ".join(cells) + " |")
    full = costs.get("full", {}).get("seconds") or 1.0
    lines += ["", "| | " + " | ".join(strategies) + " |", "|---|" + "---:|" * len(strategies),
              "| trainable parameters | "
              + " | ".join(f"{int(costs[s]['trainable_params']):,}" for s in strategies) + " |",
              "| fine-tune time vs `full` | " + " | ".join(
                  f"{costs[s]['seconds'] / full:.2f}x" if costs[s]["seconds"] else "-" for s in strategies) + " |"]
    return "\n".join(lines)


def main() -> None:
    runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs")
    for name in ("movielens-100k-age", "movielens-100k-zip"):
        for metric in ("ctr_auc", "ctcvr_auc", "gauc", "logloss"):
            print(f"### {name}: {metric}\n\n{comparison(runs / name, metric)}\n")
    for sweep in sorted(runs.glob("ablation-*/sweep/sweep.md")):
        print(f"### {sweep.parent.parent.name}\n\n{sweep.read_text()}")


if __name__ == "__main__":
    main()
