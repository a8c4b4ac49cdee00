"""The comparison report: strategies x domains, mean and std over seeds, as JSON, Markdown and PNG."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from iak_dist.io import atomic_path, atomic_write_json, atomic_write_text

METRICS = ("ctr_auc", "ctcvr_auc", "gauc", "logloss")


def aggregate(results: dict[str, dict[int, dict[str, dict[str, float]]]], domain_order: list[str]) -> dict[str, Any]:
    """`results[strategy][seed][domain][metric]` -> `{strategy: {domain: {metric: {mean, std, n}}}}`.

    Domains follow `domain_order` (the schema's), then "overall".
    """
    out: dict[str, Any] = {}
    for strategy, by_seed in results.items():
        present = next(iter(by_seed.values())).keys()
        domains = [d for d in [*domain_order, "overall"] if d in present]
        out[strategy] = {}
        for domain in domains:
            out[strategy][domain] = {}
            for metric in (*METRICS, "rows"):
                values = np.array([by_seed[s][domain][metric] for s in by_seed if domain in by_seed[s]])
                out[strategy][domain][metric] = {
                    "mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}
    return out


def markdown(agg: dict[str, Any], costs: dict[str, dict[str, float]], title: str) -> str:
    strategies = list(agg)
    domains = list(next(iter(agg.values())).keys())
    lines = [f"# {title}", ""]
    n_seeds = next(iter(next(iter(agg.values())).values()))["ctr_auc"]["n"]
    lines.append(f"Mean ± std over {n_seeds} seed(s). Higher is better for AUCs, lower for LogLoss.")
    lines.append("")
    if costs:
        lines += ["## Cost of fine-tuning", "",
                  "| strategy | trainable params | fine-tune time vs `full` |", "|---|---:|---:|"]
        full_t = costs.get("full", {}).get("seconds")
        for s in strategies:
            c = costs.get(s, {})
            ratio = f"{c['seconds'] / full_t:.2f}x" if full_t and c.get("seconds") else "-"
            lines.append(f"| {s} | {int(c.get('trainable_params', 0)):,} | {ratio} |")
        lines.append("")
    for metric in METRICS:
        lines += [f"## {metric}", "", "| domain | rows | " + " | ".join(strategies) + " |",
                  "|---|---:|" + "---:|" * len(strategies)]
        for d in domains:
            vals = [agg[s][d][metric] for s in strategies]
            means = [v["mean"] for v in vals]
            finite = [m for m in means if not math.isnan(m)]
            best = (min(finite) if metric == "logloss" else max(finite)) if finite else None
            cells = [f"{'**' if v['mean'] == best else ''}{v['mean']:.4f} ± {v['std']:.4f}"
                     f"{'**' if v['mean'] == best else ''}" for v in vals]
            rows = int(agg[strategies[0]][d]["rows"]["mean"])
            lines.append(f"| {d} | {rows:,} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(agg: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(agg)
    domains = list(next(iter(agg.values())).keys())
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 1.3 * len(domains)), 8), sharex=True)
    x = np.arange(len(domains))
    width = 0.8 / len(strategies)
    for ax, metric in zip(axes, ("ctr_auc", "ctcvr_auc"), strict=True):
        base = np.array([agg["none"][d][metric]["mean"] for d in domains]) if "none" in agg else None
        for i, s in enumerate(strategies):
            mean = np.array([agg[s][d][metric]["mean"] for d in domains])
            std = np.array([agg[s][d][metric]["std"] for d in domains])
            shown = mean - base if base is not None else mean
            ax.bar(x + i * width - 0.4 + width / 2, shown, width, yerr=std, label=s, capsize=2)
        ax.set_xticks(x, domains, rotation=30, ha="right")
        ax.set_ylabel("AUC difference" if base is not None else "AUC")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(f"{metric} minus `none`" if base is not None else metric)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, ncol=3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(results, costs, out_dir: str | Path, title: str, domain_order: list[str]) -> dict[str, Any]:
    out_dir = Path(out_dir)
    agg = aggregate(results, domain_order)
    atomic_write_json(out_dir / "report.json", {"aggregate": agg, "costs": costs, "per_seed": results})
    atomic_write_text(out_dir / "report.md", markdown(agg, costs, title))
    plot(agg, out_dir / "report.png", title)
    return agg
