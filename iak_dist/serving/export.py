"""The pipeline's export phase: the serving artefact of the strategy measured best on the valid split.

`<run>/export/` is the artefact `serving.artefact.export_artefact` writes (what `iak-dist score` and
`iak-dist serve` read) for the first seed and the strategy of highest mean overall CTR-AUC on the valid
split (the test split is the report's alone: choosing by it would leak it into a decision). Only
strategies one graph can serve compete (`full_per_domain`, one whole model per domain, does not). The
manifest's `bundle` (and `bundle.json`, as before the artefact) records what the choice was made from:
the fine-tuned strategies and the best one.
Every fine-tuned adapter (and the backbone) is checked against its recorded hashes before anything is
written, so a damaged one stops the export with nothing left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

from iak_dist.config import PipelineConfig
from iak_dist.errors import UserError
from iak_dist.report import choice_key


def export_run(cfg: PipelineConfig) -> Path:
    """Write `<run_dir>/export/`: the artefact of the best servable strategy of the first seed. Returns its path."""
    from iak_dist.distributed.checkpoint import verify_backbone
    from iak_dist.model.strategies.base import adapter_class
    from iak_dist.model.strategies.saving import verify_adapter
    from iak_dist.serving.artefact import export_artefact

    run_dir = Path(cfg.run_dir)
    seed = cfg.seeds[0]
    source = run_dir / f"seed{seed}"
    if not (source / "backbone" / "backbone.json").is_file():
        raise UserError(f"{source / 'backbone'}: nothing to export; run pre-training first")
    meta = verify_backbone(source / "backbone")
    adapters = [s for s in cfg.finetune.strategies if (source / "adapters" / s / "adapter_config.json").is_file()]
    for strategy in adapters:
        verify_adapter(source / "adapters" / strategy, meta, every_file=True)
    servable = [s for s in adapters if not adapter_class(s).per_domain_models]
    if not servable:
        raise UserError(f"{source / 'adapters'}: no fine-tuned strategy one graph can serve "
                        f"(found: {', '.join(adapters) or 'none'}); fine-tune one of them first")
    best = best_by_valid(run_dir / "report.json", servable)
    chosen = best or servable[0]
    bundle = {"seed": seed, "domains": meta["schema"]["domains"], "strategies": adapters,
              "best_by_valid_ctr_auc": best,
              "chosen_by": "valid ctr_auc" if best else "no valid metrics: the first fine-tuned strategy"}
    return export_artefact(run_dir, chosen, run_dir / "export", seed=seed, extra={"bundle": bundle},
                           json_files={"bundle.json": bundle})


def best_by_valid(report: Path, among: list[str] | None = None) -> str | None:
    """The strategy (of `among`, None: any) of highest mean CTR-AUC on the valid split in `report`
    (report.json: overall, or the fine-tuned domains' where some were held out, `choice_key`), or None:
    no report yet, one written before the valid split (no `aggregate_valid`), or no strategy scored (a
    valid split of one class)."""
    if not report.is_file():
        return None
    valid = json.loads(report.read_text()).get("aggregate_valid")
    if not valid:
        return None
    key = choice_key(valid)
    scored = [s for s in valid if valid[s][key]["ctr_auc"]["mean"] is not None and (among is None or s in among)]
    return max(scored, key=lambda s: valid[s][key]["ctr_auc"]["mean"]) if scored else None
