"""Export: one serving bundle with the backbone and every domain kernel side by side.

`<run>/export/` holds the backbone of the first seed and, per strategy, its adapter (domain
kernels stacked `[K, ...]`: one graph scores every domain, each row activating its own domain's
kernel), with `bundle.json` naming the domains and the strategy measured best on the valid split
(the test split is the report's alone: choosing by it would leak it into a decision).
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
    atomic_write_json(staging / "bundle.json", {"seed": seed, "domains": meta["schema"]["domains"],
                                                "strategies": adapters,
                                                "best_by_valid_ctr_auc": best_by_valid(run_dir / "report.json")})
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def best_by_valid(report: Path) -> str | None:
    """The strategy of highest mean overall CTR-AUC on the valid split in `report` (report.json), or
    None: no report yet, one written before the valid split (no `aggregate_valid`), or no strategy
    scored (a valid split of one class)."""
    if not report.is_file():
        return None
    valid = json.loads(report.read_text()).get("aggregate_valid")
    if not valid:
        return None
    scored = [s for s in valid if valid[s]["overall"]["ctr_auc"]["mean"] is not None]
    return max(scored, key=lambda s: valid[s]["overall"]["ctr_auc"]["mean"]) if scored else None
