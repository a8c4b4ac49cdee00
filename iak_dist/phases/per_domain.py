"""Fine-tuning a strategy with one model per domain (`per_domain_models`: `full_per_domain`).

Each domain with fine-tune rows gets its own run of the member strategy (`full`) on its rows only
(`finetune(..., only_domain=...)`), saved under `out_dir/domains/<name>/`; then `out_dir`'s config
lists the members with their hashes (`saving.save_members`) and its summary sums their cost. A
member already saved (its config present and verified) is not trained again: an interrupted run
resumes at the first unfinished member, which resumes from its own checkpoints (removed once every
member is saved).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from iak_dist.config import DistributedConfig, FinetuneConfig
from iak_dist.data.domain_streams import count_share
from iak_dist.data.schema import Schema
from iak_dist.data.source import Split
from iak_dist.distributed.checkpoint import read_backbone_meta, read_json
from iak_dist.distributed.context import DistContext, on_main, sum_over_ranks
from iak_dist.errors import UserError
from iak_dist.io import atomic_write_json
from iak_dist.model.backbone import tower_widths
from iak_dist.model.strategies.base import adapter_class
from iak_dist.model.strategies.saving import CONFIG_FILE, MEMBERS_FOLDER, save_members, verify_adapter
from iak_dist.runtime import say

SUMMED = ("finetune/trainable_params", "train/seconds")
"""Members' summary keys whose sum is the per-domain strategy's (its cost is all K models')."""


def finetune_per_domain(
    data_dir: str | Path, backbone_dir: str | Path, strategy: str, cfg: FinetuneConfig, seed: int,
    out_dir: str | Path, ctx: DistContext, show_progress: bool = True, dist_cfg: DistributedConfig | None = None,
    on_checkpoint: Callable[[int, Path], None] | None = None,
) -> dict[str, float]:
    """Fine-tune one model per domain with fine-tune rows (`strategy`'s `member_strategy` on that domain's
    rows, same `seed`), into `out_dir/domains/<name>/`; write `out_dir`'s config and summary.

    Same arguments as `finetune`, which calls it for a `per_domain_models` strategy. Returns the summary:
    trainable parameters and seconds summed over the members.
    """
    from iak_dist.phases.finetune import finetune  # imports this module lazily: its dispatch comes here

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    schema = Schema.load(data_dir / "schema.yaml")
    share = count_share(Split.open(data_dir, "finetune", schema), schema, ctx.rank, ctx.world_size, seed,
                        all_reduce=sum_over_ranks)
    # a member trains on every rank, so each rank needs rows of its domain; thinner domains are scored by
    # the plain backbone, like domains without rows
    rows_of = dict(zip(schema.domains, share.global_rows_per_domain.tolist(), strict=True))
    members = [name for name, rows in rows_of.items() if rows >= ctx.world_size]
    thin = [name for name, rows in rows_of.items() if 0 < rows < ctx.world_size]
    if thin:
        say(f"[finetune {strategy}] no model of its own for {', '.join(thin)}: fewer fine-tune rows than ranks "
            f"(scored by the plain backbone)", ctx.rank)
    for name in members:
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise UserError(f"{data_dir / 'schema.yaml'}: domain {name!r} cannot name the folder of its own "
                            f"model ({out_dir / MEMBERS_FOLDER}/<domain>); rename the domain")
    meta = read_backbone_meta(backbone_dir)
    member_strategy = adapter_class(strategy).member_strategy
    summary: dict[str, float] = dict.fromkeys(SUMMED, 0.0)
    for name in members:
        member = out_dir / MEMBERS_FOLDER / name
        if on_main(ctx, lambda m=member: is_saved(m, meta), share=True):  # rank 0 decides: ranks never diverge
            say(f"[finetune {strategy}] seed {seed}: the model of {name} is saved, not trained again", ctx.rank)
        else:
            finetune(data_dir, backbone_dir, member_strategy, cfg, seed, member, ctx, show_progress=False,
                     dist_cfg=dist_cfg, on_checkpoint=on_checkpoint, only_domain=name)
        done = read_json(member / "train_summary.json", "fine-tune this strategy again")
        for key in SUMMED:
            summary[key] += float(done.get(key, 0.0))
    summary["finetune/members"] = float(len(members))
    if ctx.is_main:
        save_members(out_dir, strategy, schema.domains, tower_widths(meta["schema_obj"], meta["model_obj"]), meta,
                     members)
        atomic_write_json(out_dir / "train_summary.json", summary)
        # the members' checkpoints (finetune keeps them beside its out_dir, here inside this adapter
        # folder): K whole models no resume needs once every member is saved, nor an export should copy
        shutil.rmtree(out_dir / MEMBERS_FOLDER / ".checkpoints", ignore_errors=True)
    ctx.barrier()
    if show_progress:
        say(f"[finetune {strategy}] seed {seed}: {len(members)} models (one per domain) written to {out_dir}",
            ctx.rank)
    return summary


def is_saved(member: Path, backbone_meta: dict) -> bool:
    """Whether a member's run finished: its config is written (last) and verifies with this backbone."""
    if not (member / CONFIG_FILE).is_file() or not (member / "train_summary.json").is_file():
        return False
    try:
        verify_adapter(member, backbone_meta)
    except UserError:
        return False
    return True
