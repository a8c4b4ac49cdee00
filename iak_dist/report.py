"""The comparison report: strategies x domains, mean and std over seeds, as JSON, Markdown and PNG.

Every score in it is measured on the test split, which nothing else reads; the valid split's CTR-AUC
is shown beside it because it is what choices read (export's best strategy, sweeps). The constant
predictor's LogLoss (every row scored at the split's click rate) sits next to the models' LogLoss:
a model above it has learnt less than the base rate.

A metric that is not available (None in the evaluation's metrics: no conversion label, no user
column, rows of one class) stays None: `null` in report.json (strict JSON, no bare NaN), `n/a` in
report.md and on the plot. A domain some strategy never saw a fine-tune row of is marked with `†`
and a footnote: its score is not a fine-tuning result.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from iak_dist.io import atomic_path, atomic_write_text
from iak_dist.metrics import finite_or_none, format_metric, strict_json

METRICS = ("ctr_auc", "ctcvr_auc", "gauc", "logloss")
CONSTANT = ("constant_logloss", "constant_ctcvr_logloss")
"""The constant predictor's LogLoss per domain (`metrics.constant_predictor`): the same for every strategy."""
NOT_FINETUNED = "†"
COLD_ITEMS = "cold items"
"""The metrics entry of the test rows whose item pre-training never saw (`data.cold_items`), beside
"overall": every strategy scores them, none trained their item's ID row before fine-tuning."""
TUNED_DOMAINS = "fine-tuned domains"
"""The metrics entry of the rows of every domain but those held out of fine-tuning
(`finetune.hold_out_domains`), beside "overall" where some are: what choices read (a sweep's best point,
the export's best strategy), so a held-out domain's labels choose nothing."""
NA_REASONS = {
    "ctr_auc": "the rows hold one class only",
    "ctcvr_auc": "the schema has no conversion label (or the rows hold one class only)",
    "gauc": "the schema names no user column (or no user has both classes)",
    "logloss": "no rows",
}


def aggregate(results: dict[str, dict[int, dict[str, dict[str, Any]]]], domain_order: list[str]) -> dict[str, Any]:
    """`results[strategy][seed][domain][metric]` -> `{strategy: {domain: {metric: {mean, std, n}}}}`.

    Domains follow `domain_order` (the schema's), then "overall", then `TUNED_DOMAINS` and `COLD_ITEMS`
    where every evaluation holds them (an evaluation made before one existed has not: all or none).
    `n` counts the seeds the metric is available in; with none, mean and std are None. A domain that any
    seed's strategy did not fine-tune (`finetuned: false` in its metrics) carries `finetuned: false` and
    that seed's note.
    """
    out: dict[str, Any] = {}
    # an optional entry is kept where every evaluation holds it: strategies and seeds compare the same rows
    everywhere = set.intersection(*(set(e) for by_seed in results.values() for e in by_seed.values()))
    for strategy, by_seed in results.items():
        present = next(iter(by_seed.values())).keys()
        domains = [d for d in [*domain_order, "overall"] if d in present]
        domains += [d for d in (TUNED_DOMAINS, COLD_ITEMS) if d in everywhere]
        out[strategy] = {}
        for domain in domains:
            entries = [by_seed[s][domain] for s in by_seed if domain in by_seed[s]]
            out[strategy][domain] = {}
            for metric in (*METRICS, "rows", *CONSTANT):
                values = np.array([v for e in entries if (v := finite_or_none(e.get(metric))) is not None])
                out[strategy][domain][metric] = {
                    "mean": float(np.mean(values)) if len(values) else None,
                    "std": float(np.std(values)) if len(values) else None, "n": len(values)}
            untrained = [e for e in entries if e.get("finetuned") is False]
            if untrained:
                out[strategy][domain] |= {"finetuned": False, "note": untrained[0].get("note", "no fine-tune rows")}
    return out


def choice_key(*aggregates: dict[str, Any]) -> str:
    """The entry a choice between strategies or settings reads in `aggregates` (`aggregate`'s output, one or
    several to compare): `TUNED_DOMAINS` where every strategy of every one holds it (domains were held out
    of fine-tuning), else "overall": the choice compares the same rows."""
    holds = [TUNED_DOMAINS in by_domain for agg in aggregates for by_domain in agg.values()]
    return TUNED_DOMAINS if holds and all(holds) else "overall"


def seeds_per_strategy(agg: dict[str, Any]) -> dict[str, int]:
    """How many seeds each strategy's report holds (its overall row count is there once per seed)."""
    return {s: int(by_domain["overall"]["rows"]["n"]) if "overall" in by_domain else 0 for s, by_domain in agg.items()}


def _seeds_line(agg: dict[str, Any]) -> str:
    """The one line that says what a cell is: a mean ± std over seeds, or one seed's score."""
    counts = seeds_per_strategy(agg)
    if len(set(counts.values())) == 1:
        n = next(iter(counts.values()))
        what = "1 seed: each cell is that seed's score" if n == 1 else f"Mean ± std over {n} seeds"
    else:
        what = ("Mean ± std over each strategy's seeds (" + ", ".join(f"{s}: {n}" for s, n in counts.items())
                + "); a strategy with 1 seed shows that seed's score")
    return f"{what}. Higher is better for AUCs, lower for LogLoss."


def metric_cell(v: dict[str, Any]) -> str:
    # one seed has no spread: `± 0.0000` would read as a measured, perfectly stable score
    if v["n"] > 1:
        return f"{format_metric(v['mean'])} ± {format_metric(v['std'])}"
    return format_metric(v["mean"])


def constant_line(agg: dict[str, Any]) -> list[str]:
    """The constant predictor's overall LogLoss next to the pre-trained backbone's (`none`)."""
    first = next(iter(agg.values()))["overall"]
    constant, constant_ctcvr = (first[k]["mean"] if k in first else None for k in CONSTANT)
    if constant is None:
        return []
    line = (f"Constant predictor (every test row scored at the split's click rate): LogLoss "
            f"{format_metric(constant)} (CTCVR: {format_metric(constant_ctcvr)})")
    backbone = agg.get("none", {}).get("overall", {}).get("logloss", {}).get("mean")
    if backbone is not None:
        verdict = "at or below" if backbone <= constant else "above: worse than"
        line += f"; the pre-trained backbone (`none`): {format_metric(backbone)}, {verdict} the constant"
    return [line + ".", ""]


def overall_table(agg: dict[str, Any], costs: dict[str, dict[str, float]],
                   valid: dict[str, Any] | None) -> list[str]:
    """One row per strategy: the test metrics overall, the valid CTR-AUC, trainable parameters and
    fine-tune time, both against `full`'s."""
    full = costs.get("full", {})
    lines = ["| strategy | CTR-AUC | CTCVR-AUC | GAUC | LogLoss | valid CTR-AUC | trainable params "
             "| params vs `full` | fine-tune time vs `full` |", "|---|" + "---:|" * 8]
    for s, by_domain in agg.items():
        o = by_domain["overall"]
        v = valid.get(s, {}).get(choice_key(valid)) if valid else None
        c = costs.get(s, {})
        params, full_params = c.get("trainable_params"), full.get("trainable_params")
        share = f"{params / full_params:.1%}" if params is not None and full_params else "-"
        time_ratio = f"{c['seconds'] / full['seconds']:.2f}x" if full.get("seconds") and c.get("seconds") else "-"
        lines.append(f"| {s} | " + " | ".join(metric_cell(o[m]) for m in METRICS)
                     + f" | {metric_cell(v['ctr_auc']) if v else 'n/a'} | "
                     + ("-" if params is None else f"{int(params):,}") + f" | {share} | {time_ratio} |")
    return [*lines, ""]


def domain_table(agg: dict[str, Any], metric: str, constant: str | None = None) -> tuple[list[str], bool]:
    """`metric` per domain (rows) and strategy (columns), the best mean in bold; with `constant`, a
    column of the constant predictor's value. Returns the lines and whether a cell is n/a."""
    strategies = list(agg)
    domains = list(next(iter(agg.values())).keys())
    extra = " constant |" if constant else ""
    lines = [f"| domain | rows |{extra} " + " | ".join(strategies) + " |",
             "|---|---:|" + ("---:|" if constant else "") + "---:|" * len(strategies)]
    any_na = False
    for d in domains:
        means = [agg[s][d][metric]["mean"] for s in strategies]
        known = [m for m in means if m is not None]
        best = (min(known) if metric == "logloss" else max(known)) if known else None
        cells = []
        for s in strategies:
            v = agg[s][d][metric]
            mark = NOT_FINETUNED if agg[s][d].get("finetuned") is False else ""
            if v["mean"] is None:
                any_na = True
                cells.append(f"n/a{mark}")
                continue
            bold = "**" if v["mean"] == best else ""
            cells.append(f"{bold}{metric_cell(v)}{bold}{mark}")
        rows = int(agg[strategies[0]][d]["rows"]["mean"] or 0)
        constant_cell = f" {format_metric(agg[strategies[0]][d].get(constant, {}).get('mean'))} |" if constant else ""
        lines.append(f"| {d} | {rows:,} |{constant_cell} " + " | ".join(cells) + " |")
    return lines, any_na


def markdown(agg: dict[str, Any], costs: dict[str, dict[str, float]], title: str,
             valid: dict[str, Any] | None = None) -> str:
    """The report as Markdown: `agg` (test) overall and per domain, `valid` (the valid split's
    aggregate) for its CTR-AUC, `costs` for parameters and fine-tune time."""
    strategies = list(agg)
    domains = list(next(iter(agg.values())).keys())
    chosen_by = (f"the valid CTR-AUC of the {TUNED_DOMAINS} (the held-out domains' rows left out)"
                 if valid and choice_key(valid) == TUNED_DOMAINS else "the valid CTR-AUC")
    lines = [f"# {title}", "", _seeds_line(agg),
             f"Scores are on the test split, read for this report only; {chosen_by} is what choices "
             "read (export's best strategy, sweeps).", "", *constant_line(agg), "## Overall", "",
             *overall_table(agg, costs, valid)]
    untrained = [(s, d, agg[s][d]["note"]) for s in strategies for d in domains if agg[s][d].get("finetuned") is False]
    tables = [(metric, agg, metric, "constant_logloss" if metric == "logloss" else None) for metric in METRICS]
    if valid:
        tables.append(("valid ctr_auc", valid, "ctr_auc", None))
    for heading, source, metric, constant in tables:
        table, any_na = domain_table(source, metric, constant)
        lines += [f"## {heading}", "", *table, ""]
        if constant:
            lines += ["constant: the constant predictor's LogLoss (every row scored at the domain's click rate).", ""]
        if any_na:
            lines += [f"n/a: not available: {NA_REASONS[metric]}.", ""]
        if untrained:
            lines += [f"{NOT_FINETUNED} not a fine-tuning result: "
                      + "; ".join(f"`{s}` on {d}: {note}" for s, d, note in untrained) + ".", ""]
    return "\n".join(lines)


def plain_text(text: str) -> str:
    """`text` without Markdown's inline marks (code backticks, bold / italic stars): plot titles
    are drawn as is, so a backtick would show."""
    return re.sub(r"[`*]", "", text)


def build_figure(agg: dict[str, Any], title: str):
    """The report's figure (a matplotlib `Figure`, not yet saved): per domain, each strategy's CTR-
    and CTCVR-AUC as its gain over `none` (the pre-trained backbone, whose own AUC is written under
    each domain's name: its gain would be 0 by definition, so it has no bar in those panels). Where
    the evaluations hold the constant predictor's LogLoss, a third panel shows every strategy's test
    LogLoss minus it (`none` included: a backbone above 0 knows less than the base rate). Error bars
    (± std over seeds) only where a mean has more than one seed behind it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_name = "none" if "none" in agg and len(agg) > 1 else None  # `none` alone: its absolute AUCs
    strategies = [s for s in agg if s != base_name]
    domains = list(next(iter(agg.values())).keys())
    counts = seeds_per_strategy(agg)
    low, high = min(counts.values()), max(counts.values())
    seeds_text = "1 seed" if high == 1 else f"mean ± std over {low if low == high else f'{low}-{high}'} seeds"
    # constrained layout makes room for the legend outside the axes (it covered the last bars)
    first = next(iter(agg.values()))
    constant = np.array([np.nan if (c := first[d].get("constant_logloss", {}).get("mean")) is None else c
                         for d in domains], dtype=float)
    with_constant = bool(np.isfinite(constant).any())
    panels = 3 if with_constant else 2
    fig, axes = plt.subplots(panels, 1, figsize=(max(8.0, 1.3 * len(domains)) + 1.5, 4 * panels),
                             layout="constrained")  # not sharex: each axes names its own `none` AUCs
    x = np.arange(len(domains))
    width = 0.8 / max(1, len(strategies))

    def values(s: str, metric: str, key: str) -> np.ndarray:  # None (not available) -> NaN: no bar
        return np.array([np.nan if (v := agg[s][d][metric][key]) is None else v for d in domains], dtype=float)

    def spread_of(s: str, metric: str) -> np.ndarray | None:
        n = values(s, metric, "n")
        if not (n > 1).any():
            return None  # one seed: no spread, and a zero-length bar would still draw its caps
        return np.where(n > 1, values(s, metric, "std"), np.nan)

    for ax, metric in zip(axes[:2], ("ctr_auc", "ctcvr_auc"), strict=True):
        base = values(base_name, metric, "mean") if base_name else None
        for i, s in enumerate(strategies):
            shown = values(s, metric, "mean") - base if base is not None else values(s, metric, "mean")
            at = x + i * width - 0.4 + width / 2
            ax.bar(at, shown, width, yerr=spread_of(s, metric), label=s, capsize=2,
                   color=f"C{list(agg).index(s)}")  # the colour it has in every report
            for xpos in at[np.isnan(shown)]:  # say so, where an empty slot would read as "no difference"
                ax.text(xpos, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
        if base is not None:
            labels = [f"{d}\n{base_name} {format_metric(b, '.3f')}" for d, b in zip(domains, base, strict=True)]
            ax.set_xticks(x, labels, fontsize=8)
            ax.set_ylabel("AUC gain over none")
            ax.set_title(f"{metric}: gain over none, the pre-trained backbone (its AUC under each domain); "
                         f"{seeds_text}", fontsize=10)
        else:
            ax.set_xticks(x, domains, rotation=30, ha="right")
            ax.set_ylabel("AUC")
            ax.set_title(f"{metric}, {seeds_text}", fontsize=10)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
    if with_constant:
        ax, every = axes[2], list(agg)
        for i, s in enumerate(every):
            at = x + i * 0.8 / len(every) - 0.4 + 0.4 / len(every)
            ax.bar(at, values(s, "logloss", "mean") - constant, 0.8 / len(every), yerr=spread_of(s, "logloss"),
                   label=s, capsize=2, color=f"C{i}")
        ax.set_xticks(x, [f"{d}\nconstant {format_metric(c, '.3f')}" for d, c in zip(domains, constant, strict=True)],
                      fontsize=8)
        ax.set_ylabel("LogLoss minus the constant's")
        ax.set_title("logloss minus the constant predictor's (every row at the domain's click rate; its LogLoss "
                     f"under each domain); below 0: better than the base rate; {seeds_text}", fontsize=10)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
    legend_from = axes[2] if with_constant else axes[0]  # the LogLoss panel has a bar for `none` too
    fig.legend(*legend_from.get_legend_handles_labels(), loc="outside right upper", fontsize=8, title="strategy")
    fig.suptitle(plain_text(title))
    return fig


def plot(agg: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig = build_figure(agg, title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(results, costs, out_dir: str | Path, title: str, domain_order: list[str],
                 valid_results: dict | None = None) -> dict[str, Any]:
    """report.json / .md / .png of the test split's `results[strategy][seed][domain][metric]`, with
    `valid_results` (same shape, the valid split) beside it: report.json's `aggregate_valid` is what
    choices read (`serving/export.py`, sweeps). Returns the test aggregate."""
    out_dir = Path(out_dir)
    agg = aggregate(strict_json(results), domain_order)
    valid = aggregate(strict_json(valid_results), domain_order) if valid_results else None
    # strict JSON: evaluations of older runs may hold NaN; allow_nan=False proves none is left
    payload = strict_json({"aggregate": agg, "aggregate_valid": valid, "costs": costs, "per_seed": results,
                           "per_seed_valid": valid_results})
    atomic_write_text(out_dir / "report.json", json.dumps(payload, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out_dir / "report.md", markdown(agg, costs, title, valid))
    plot(agg, out_dir / "report.png", title)
    return agg
