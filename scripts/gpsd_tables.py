"""The tables of docs/results.md, "Generative pre-training", from its measurement runs (runs/gpsd-*).

usage: python3 scripts/gpsd_tables.py RUN_DIR [RUN_DIR ...]
"""
import json
import statistics
import sys
from pathlib import Path


def ms(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


for run in map(Path, sys.argv[1:]):
    seeds = sorted(run.glob("seed*"))
    print(f"\n### {run.name} ({len(seeds)} seed(s))\n")
    curves = {s.name: json.loads((s / "test_passes.json").read_text())
              for s in seeds if (s / "test_passes.json").is_file()}
    if curves:
        steps = sorted({p[0] for c in curves.values() for p in c})
        print("| pass (step) | epoch | valid CTR-AUC | test CTR-AUC | test LogLoss |")
        print("|---:|---:|---:|---:|---:|")
        for step in steps:
            rows = [dict(p[1]) for c in curves.values() for p in c if p[0] == step]
            print(f"| {step} | {step / 388.3:.1f} | {ms([r['valid_ctr_auc'] for r in rows])} | "
                  f"{ms([r['ctr_auc'] for r in rows])} | {ms([r['logloss'] for r in rows])} |")
    summaries = [json.loads((s / "backbone" / "train_summary.json").read_text()) for s in seeds
                 if (s / "backbone" / "train_summary.json").is_file()]
    if summaries:
        print(f"\npre-train: best pass step {[s.get('valid/best_step') for s in summaries]}, "
              f"stopped at {[s.get('train/steps') for s in summaries]}, seconds "
              f"{ms([s.get('train/seconds') for s in summaries])}; generative stage seconds "
              f"{ms([s.get('generative/seconds') for s in summaries])}, steps "
              f"{[s.get('generative/steps') for s in summaries]}, loss "
              f"{ms([s.get('generative/loss_first') for s in summaries])} -> "
              f"{ms([s.get('generative/loss_ema') for s in summaries])}")
    report = run / "report.json"
    if report.is_file():
        r = json.loads(report.read_text())
        print("\n| strategy | test CTR-AUC | test LogLoss | CTCVR-AUC | GAUC | valid CTR-AUC |")
        print("|---|---:|---:|---:|---:|---:|")
        for strategy, agg in r["aggregate"].items():
            o, v = agg["overall"], r["aggregate_valid"][strategy]["overall"]

            def f(entry):
                return f"{entry['mean']:.4f}" + (f" ± {entry['std']:.4f}" if entry["n"] > 1 else "")
            print(f"| {strategy} | {f(o['ctr_auc'])} | {f(o['logloss'])} | {f(o['ctcvr_auc'])} | {f(o['gauc'])} | "
                  f"{f(v['ctr_auc'])} |")
