"""`iak-dist sweep`: run the pipeline over a grid of config overrides and tabulate the results.

Grid points that only change `finetune.*` keys reuse the base run's pre-trained backbones
(hard links), so a beta sweep costs fine-tuning only.

A sweep is for choosing, so its table (sweep.md) and sweep.json hold the valid split's metrics only
(each point's report.json `aggregate_valid`), with each strategy's best point by valid CTR-AUC; the
test split's scores stay in each point's report, for the final report alone.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from iak_dist.config import load_config
from iak_dist.distributed.context import close_distributed, init_distributed
from iak_dist.errors import UserError
from iak_dist.io import atomic_write_json, atomic_write_text
from iak_dist.metrics import format_metric
from iak_dist.orchestration.driver import run_pipeline
from iak_dist.orchestration.local import log
from iak_dist.report import choice_key, metric_cell


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    grid = []
    for item in items:
        if "=" not in item:
            raise UserError(f"--grid {item!r}: expected KEY=V1,V2,..., e.g. finetune.iak.beta_matching=0,0.01,0.1")
        key, values = item.split("=", 1)
        grid.append((key, values.split(",")))
    return grid


def _link_tree(src: Path, dst: Path) -> None:
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)


def run_sweep(config: str, overrides: list[str], grid_items: list[str], strategies: list[str] | None) -> Path:
    grid = parse_grid(grid_items)
    base = load_config(config, overrides)
    ctx = init_distributed()
    try:
        return _sweep(config, overrides, grid, strategies, base, ctx)
    finally:
        close_distributed(ctx)


def _sweep(config, overrides, grid, strategies, base, ctx) -> Path:
    sweep_dir = Path(base.run_dir) / "sweep"
    shares_backbone = all(key.startswith("finetune.") for key, _ in grid)
    rows = []
    for values in itertools.product(*[v for _, v in grid]):
        point = [f"{key}={value}" for (key, _), value in zip(grid, values, strict=True)]
        name = ",".join(f"{key.split('.')[-1]}={value}" for (key, _), value in zip(grid, values, strict=True))
        # every point has the pre-trained model (`none`) as the row to compare with
        chosen = ["none", *[s for s in strategies or base.finetune.strategies if s != "none"]]
        extra = [f"run_dir={sweep_dir / name}", f"finetune.strategies=[{','.join(chosen)}]"]
        cfg = load_config(config, overrides + point + extra)
        if shares_backbone:
            for seed in cfg.seeds:
                shared = Path(base.run_dir) / f"seed{seed}"
                if not (shared / "backbone" / "backbone.json").is_file():
                    run_pipeline(load_config(config, overrides + ["finetune.strategies=[none]"]), ctx=ctx)
                # the backbone, `none` (fine-tuned and scored) and the prefix cache (a function of the backbone
                # and the data, built by the first point) are the same at every point: linked, not redone
                for part in ("backbone", "adapters/none", "prefix_cache"):
                    if (shared / part).is_dir():
                        _link_tree(shared / part, Path(cfg.run_dir) / f"seed{seed}" / part)
        log(f"sweep point {name}")
        run_dir = run_pipeline(cfg, ctx=ctx)
        for seed in cfg.seeds if shares_backbone else []:  # the cache this point built serves the next ones
            built = Path(cfg.run_dir) / f"seed{seed}" / "prefix_cache"
            if built.is_dir():
                _link_tree(built, Path(base.run_dir) / f"seed{seed}" / "prefix_cache")
        agg = json.loads((run_dir / "report.json").read_text()).get("aggregate_valid")
        if not agg:
            raise UserError(f"{run_dir / 'report.json'}: no valid-split metrics (written before the valid split "
                            f"existed); delete {run_dir} and run the sweep again")
        rows.append((name, agg))
    lines = sweep_table(rows)
    atomic_write_text(sweep_dir / "sweep.md", "\n".join(lines) + "\n")
    atomic_write_json(sweep_dir / "sweep.json", {name: agg for name, agg in rows})
    log(f"sweep table (valid split): {sweep_dir / 'sweep.md'}")
    return sweep_dir


def best_points(rows: list[tuple[str, dict]]) -> dict[str, str]:
    """Each strategy's grid point of highest mean CTR-AUC (`choice_key`) in `rows` ((point, valid aggregate));
    not `none`, the same pre-trained model at every point."""
    best: dict[str, tuple[float, str]] = {}
    key = choice_key(*(agg for _, agg in rows))  # held-out domains' rows choose nothing
    for name, agg in rows:
        for s in (s for s in agg if s != "none"):
            value = agg[s][key]["ctr_auc"]["mean"]
            if value is not None and (s not in best or value > best[s][0]):
                best[s] = (value, name)
    return {s: name for s, (_, name) in best.items()}


def sweep_table(rows: list[tuple[str, dict]]) -> list[str]:
    """sweep.md's lines: every (point, strategy)'s valid metrics, overall and CTR-AUC per domain, then
    each strategy's best point by valid CTR-AUC."""
    strategies_seen = list(rows[0][1])
    domains = list(rows[0][1][strategies_seen[0]])
    lines = ["Valid split (what a choice reads; test scores are in each point's report).", "",
             "| point | strategy | CTR-AUC overall | CTCVR-AUC overall | "
             + " | ".join(f"CTR-AUC {d}" for d in domains if d != "overall") + " |",
             "|---|---|---:|---:|" + "---:|" * (len(domains) - 1)]
    for name, agg in rows:
        for s in agg:
            o = agg[s]["overall"]
            cells = [format_metric(agg[s][d]['ctr_auc']['mean']) for d in domains if d != "overall"]
            ctr, ctcvr = (metric_cell(o[m]) for m in ("ctr_auc", "ctcvr_auc"))  # one seed: no `± 0.0000`
            lines.append(f"| {name} | {s} | {ctr} | {ctcvr} | " + " | ".join(cells) + " |")
    best = best_points(rows)
    if best:
        lines += ["", "Best point by valid CTR-AUC: " + ", ".join(f"`{s}` {name}" for s, name in best.items()) + "."]
    return lines
