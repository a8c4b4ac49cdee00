"""Export: one serving bundle with the backbone and every domain kernel side by side.

`<run>/export/` holds the backbone of the first seed and, per strategy, its adapter (domain
kernels stacked `[K, ...]`: one graph scores every domain, each row activating its own domain's
kernel), with `bundle.json` naming the domains and the strategy measured best on the test split.
Every weights file (the backbone's shards, a `full` adapter's shards) is checked against its recorded
hash before anything is copied; the copies keep the per-rank layout (a server reads it by row chunks:
`ShardedWeights.row_chunks`).
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
    from iak_dist.distributed.checkpoint import verify_backbone
    from iak_dist.model.strategies.saving import verify_adapter

    meta = verify_backbone(source / "backbone")  # a copy must be what its files claim: checked first
    adapters = [s for s in cfg.finetune.strategies if (source / "adapters" / s / "adapter_config.json").is_file()]
    for strategy in adapters:
        verify_adapter(source / "adapters" / strategy, meta, every_file=True)
    out = run_dir / "export"
    staging = run_dir / "export.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source / "backbone", staging / "backbone",
                    ignore=shutil.ignore_patterns("train_summary.json", "progress.json"))
    for strategy in adapters:
        shutil.copytree(source / "adapters" / strategy, staging / "adapters" / strategy,
                        ignore=shutil.ignore_patterns("tb", "train_summary.json", "progress.json"))
    best = None
    report = run_dir / "report.json"
    if report.is_file():
        agg = json.loads(report.read_text())["aggregate"]
        scored = [s for s in agg if agg[s]["overall"]["ctr_auc"]["mean"] is not None]  # None: one-class test
        best = max(scored, key=lambda s: agg[s]["overall"]["ctr_auc"]["mean"]) if scored else None
    atomic_write_json(staging / "bundle.json", {"seed": seed, "domains": meta["schema"]["domains"],
                                                "strategies": adapters, "best_by_test_ctr_auc": best})
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out
