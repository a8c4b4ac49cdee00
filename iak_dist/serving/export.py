"""Export: one serving bundle with the backbone and every domain kernel side by side.

`<run>/export/` holds the backbone of the first seed and, per strategy, its adapter (domain
kernels stacked `[K, ...]`: one graph scores every domain, each row activating its own domain's
kernel), with `bundle.json` naming the domains and the strategy measured best on the test split.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from iak_dist.config import PipelineConfig
from iak_dist.errors import UserError
from iak_dist.io import atomic_write_json


def export_run(cfg: PipelineConfig) -> Path:
    run_dir = Path(cfg.run_dir)
    seed = cfg.seeds[0]
    source = run_dir / f"seed{seed}"
    if not (source / "backbone" / "backbone.json").is_file():
        raise UserError(f"{source / 'backbone'}: nothing to export; run pre-training first")
    out = run_dir / "export"
    staging = run_dir / "export.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source / "backbone", staging / "backbone",
                    ignore=shutil.ignore_patterns("train_summary.json", "progress.json"))
    strategies = []
    for strategy in cfg.finetune.strategies:
        adapter = source / "adapters" / strategy
        if (adapter / "adapter_config.json").is_file():
            shutil.copytree(adapter, staging / "adapters" / strategy,
                            ignore=shutil.ignore_patterns("tb", "train_summary.json"))
            strategies.append(strategy)
    best = None
    report = run_dir / "report.json"
    if report.is_file():
        agg = json.loads(report.read_text())["aggregate"]
        best = max(agg, key=lambda s: agg[s]["overall"]["ctr_auc"]["mean"])
    domains = json.loads((source / "backbone" / "backbone.json").read_text())["schema"]["domains"]
    atomic_write_json(staging / "bundle.json", {"seed": seed, "domains": domains, "strategies": strategies,
                                                "best_by_test_ctr_auc": best})
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out
