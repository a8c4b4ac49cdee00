"""Runs distributed scenarios under torchrun for tests/test_distributed.py (one process per rank).

Usage: torchrun --nproc_per_node=2 tests/dist_worker.py SPEC.json
SPEC: {"scenarios": [{"kind": "pretrain" | "frozen_finetune", "out": DIR, "data": DIR,
                      "overrides": ["key=value", ...], ...}]}
Each scenario writes its results under its "out" folder; rank r writes result_rank{r}.json.
"""

import json
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def run_pretrain(spec, cfg, ctx):
    from iak_dist.phases.pretrain import pretrain

    summary = pretrain(spec["data"], cfg.model, cfg.pretrain, cfg.distributed, 0, spec["out"], ctx,
                       show_progress=False)
    return {"losses": summary["train/losses"]}


def run_frozen_finetune(spec, cfg, ctx):
    import numpy as np
    import torch
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from iak_dist.data.sampler import DomainBatchSampler
    from iak_dist.distributed.zero import DenseEngine
    from iak_dist.phases.finetune import build_finetune, sampled_batches
    from iak_dist.phases.loop import train_loop

    run = build_finetune(spec["data"], spec["backbone"], "iak", cfg.finetune, ctx, cfg.distributed)

    def shards():
        out = {}
        for key, value in run.model.state_dict().items():
            if key.startswith("backbone.embeddings."):
                if isinstance(value, ShardedTensor):  # a rank may hold no shard of a table
                    out[key] = [s.tensor.clone() for s in value.local_shards()]
                else:
                    out[key] = [value.clone()]
        return out

    before = shards()
    adapter_before = {k: v.clone() for k, v in run.adapter.state_dict().items()}
    dense = DenseEngine(run.trainable, 0.01, 0.0, cfg.distributed.zero, 64, ctx.world_size)
    sampler = DomainBatchSampler(run.domains, len(run.schema.domains), 64, 0.5, seed=ctx.rank)
    train_loop(run.model, dense, sampled_batches(run.table, run.schema, sampler), 20, cfg.finetune.optim,
               "frozen", adapter=run.adapter, num_domains=len(run.schema.domains), show_progress=False)
    after = shards()
    unchanged = all(torch.equal(a, b) for k in before for a, b in zip(before[k], after[k], strict=True))
    n_elements = int(sum(t.numel() for ts in before.values() for t in ts))
    with dense.gathered():
        moved = [k for k, v in run.adapter.state_dict().items() if not torch.equal(v, adapter_before[k])]
    fused_state = {k: v for k, v in run.model.fused_optimizer.state_dict()["state"].items() if v}
    return {"unchanged": unchanged, "local_elements": n_elements, "adapter_moved": len(moved),
            "fused_optimizer_state": {k: sorted(v) for k, v in fused_state.items()},
            "rows": int(np.sum(run.domains >= 0))}


def run_restore(spec, cfg, ctx):
    """Restore a checkpoint under this scenario's plan; compare with the weights exported at save."""
    import torch

    from iak_dist.data.schema import Schema
    from iak_dist.distributed.checkpoint import CheckpointManager, load_backbone_weights, plain_state_dict
    from iak_dist.distributed.sharding import shard_ranker
    from iak_dist.distributed.zero import DenseEngine
    from iak_dist.model.backbone import Backbone
    from iak_dist.model.ranker import Ranker

    backbone = Backbone(Schema.load(Path(spec["data"]) / "schema.yaml"), cfg.model, device=torch.device("meta"))
    sharded = shard_ranker(Ranker(backbone), ctx, cfg.distributed.sharding, cfg.pretrain.lr_sparse, 64)
    dense = DenseEngine(backbone.dense_modules(), 0.01, 0.0, cfg.distributed.zero, 64, ctx.world_size)
    state = CheckpointManager(spec["checkpoints"], ctx).restore_latest(sharded.model, dense)
    restored = plain_state_dict(sharded.model, prefix="backbone.")
    exported = load_backbone_weights(spec["backbone"])
    kinds = {ps.sharding_type for ps in sharded.plan.plan["backbone.embeddings"].values()}
    return {"step": state["step"], "equal": all(torch.equal(restored[k], exported[k]) for k in exported),
            "plan": ",".join(sorted(kinds))}


def run_fill_failure(spec, cfg, ctx):
    """Fill the item text table with rank 1's second batch failing to read: every rank must raise."""
    import numpy as np
    import torch

    from iak_dist.data.schema import Schema
    from iak_dist.distributed.sharding import fill_rows_by_mean, shard_ranker
    from iak_dist.model.backbone import Backbone
    from iak_dist.model.item_tower import TEXT_TABLE
    from iak_dist.model.ranker import Ranker

    backbone = Backbone(Schema.load(Path(spec["data"]) / "schema.yaml"), cfg.model, device=torch.device("meta"))
    sharded = shard_ranker(Ranker(backbone), ctx, cfg.distributed.sharding, cfg.pretrain.lr_sparse, 64)

    def batches():
        for i in range(3):
            if ctx.rank == 1 and i == 1:
                raise OSError("item_text.parquet: a damaged row group")
            yield np.arange(4) + 4 * i, np.ones((4, 384), np.float32)

    try:
        fill_rows_by_mean(sharded.model, TEXT_TABLE, batches(), ctx)
    except Exception as exc:  # noqa: BLE001  (what each rank raised is the result)
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None}


def main():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from iak_dist.config import load_config
    from iak_dist.distributed.context import close_distributed, init_distributed
    from iak_dist.runtime import configure_environment, exit_launched_rank

    configure_environment()
    spec_all = json.loads(Path(sys.argv[1]).read_text())
    ctx = init_distributed()
    try:
        for spec in spec_all["scenarios"]:
            cfg = load_config(None, spec.get("overrides", []))
            kinds = {"pretrain": run_pretrain, "frozen_finetune": run_frozen_finetune, "restore": run_restore,
                     "fill_failure": run_fill_failure}
            result = kinds[spec["kind"]](spec, cfg, ctx)
            out = Path(spec["out"])
            out.mkdir(parents=True, exist_ok=True)
            (out / f"result_rank{ctx.rank}.json").write_text(json.dumps(result))
            ctx.barrier()
    finally:
        close_distributed(ctx)
    exit_launched_rank(0)


if __name__ == "__main__":
    main()
