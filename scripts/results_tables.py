"""Prints the Markdown tables of docs/results.md from the runs of scripts/reproduce_results.sh.

    .venv/bin/python scripts/results_tables.py runs > /tmp/tables.md

Per domain split (age, zip, month): the constant predictor's LogLoss next to the pre-trained
backbone's, one row per strategy overall (test CTR-AUC / CTCVR-AUC / GAUC / LogLoss, valid CTR-AUC,
trainable parameters and fine-tune time, both against `full`'s), then each test metric per domain.
The tables are the report's own (`iak_dist.report`), so results.md and report.md cannot disagree.
Then each ablation sweep's table (valid split).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from iak_dist.report import METRICS, constant_line, domain_table, overall_table, seeds_per_strategy

RUNS = ("movielens-100k-age", "movielens-100k-zip", "movielens-100k-month")


def run_tables(run: Path) -> str:
    """The tables of one run, from its report.json."""
    report = json.loads((run / "report.json").read_text())
    agg, valid, costs = report["aggregate"], report.get("aggregate_valid"), report["costs"]
    seeds = sorted(set(seeds_per_strategy(agg).values()))
    lines = [f"### {run.name}", "", f"Seeds per strategy: {', '.join(map(str, seeds))}.", "",
             *constant_line(agg), *overall_table(agg, costs, valid)]
    for metric in METRICS:
        table, _ = domain_table(agg, metric, "constant_logloss" if metric == "logloss" else None)
        lines += [f"#### {run.name}: {metric} (test) per domain", "", *table, ""]
    return "\n".join(lines)


def main() -> None:
    runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs")
    missing = [name for name in RUNS if not (runs / name / "report.json").is_file()]
    if missing:
        sys.exit(f"error: {runs / missing[0] / 'report.json'}: no report; run scripts/reproduce_results.sh first")
    for name in RUNS:
        print(run_tables(runs / name))
    for sweep in sorted(runs.glob("ablation-*/sweep/sweep.md")):
        print(f"### {sweep.parent.parent.name} (valid split)\n\n{sweep.read_text()}")


if __name__ == "__main__":
    main()
