"""Bytes and seconds of one fine-tune checkpoint of a frozen-backbone strategy, side by side: without the
frozen tables (what the phase writes: the adapter, its optimizer and the backbone's weights hash) against
with them (what it wrote before: every table again, at each checkpoint and each best validation pass).

    # MovieLens-100K (a run's backbone; its data folder from the config)
    OMP_NUM_THREADS=1 .venv/bin/python -m profiling.checkpoint_cost configs/movielens_age.yaml \
        --backbone runs/movielens-100k-age/seed0/backbone
    # synthetic production-shaped tables (the data and backbone of profiling/finetune_cost.py)
    OMP_NUM_THREADS=1 .venv/bin/python -m profiling.checkpoint_cost --synthetic data/finetune-cost \
        --table-rows 10000000

The two kinds take turns `--rounds` times into a temporary folder beside the backbone (same disk);
each kind keeps its median.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    import numpy as np

    from iak_dist.config import load_config
    from iak_dist.distributed.checkpoint import CheckpointManager
    from iak_dist.distributed.context import close_distributed, init_distributed
    from iak_dist.distributed.zero import DenseEngine
    from iak_dist.phases.finetune import build_finetune
    from iak_dist.runtime import configure_environment
    from profiling.finetune_cost import add_data_arguments, check_data_arguments, data_and_backbone

    configure_environment()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--strategy", default="iak")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    check_data_arguments(parser, args)
    cfg = load_config(args.config)
    ctx = init_distributed()
    try:
        data_dir, backbone = data_and_backbone(args, cfg, ctx)
        ft = cfg.finetune
        run = build_finetune(data_dir, backbone, args.strategy, ft, ctx, cfg.distributed)
        dense = DenseEngine(run.trainable, ft.optim.lr_dense, ft.optim.weight_decay, cfg.distributed.zero,
                            ft.optim.batch_size, ctx.world_size)
        kinds = {"without the frozen tables (now)": run.meta["weights"], "with them (before)": None}
        seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
        sizes: dict[str, int] = {}
        scratch = Path(tempfile.mkdtemp(prefix="checkpoint-cost-", dir=backbone.parent))
        try:
            for round_ in range(args.rounds):
                for index, (kind, frozen) in enumerate(kinds.items()):
                    root = scratch / f"{index}-{round_}"
                    start = time.perf_counter()
                    path = CheckpointManager(root, ctx, keep=1, frozen_tables=frozen).save(
                        1, run.model, dense, {"step": 1}, data_parallel_optimizer=run.sharded.data_parallel_optimizer)
                    seconds[kind].append(time.perf_counter() - start)
                    sizes[kind] = folder_bytes(path)
                    shutil.rmtree(root)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        close_distributed(ctx)
    tables = sum(c.num_embeddings for c in run.sharded.ranker.backbone.table_configs)
    print(f"\n{data_dir}: `{args.strategy}` on a frozen backbone of {tables:,} table rows; one checkpoint, "
          f"median of {args.rounds} rounds taking turns")
    print("| checkpoint | MiB | seconds | vs with the tables |")
    print("|---|---:|---:|---:|")
    base = float(np.median(seconds["with them (before)"]))
    for kind in kinds:
        median = float(np.median(seconds[kind]))
        print(f"| {kind} | {sizes[kind] / 2**20:.2f} | {median:.3f} | {median / base:.2g}x time, "
              f"{sizes[kind] / sizes['with them (before)']:.2g}x bytes |")


if __name__ == "__main__":
    main()
