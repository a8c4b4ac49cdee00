"""What a behaviour sequence costs a pre-train step: no history vs a history pooled vs a history through
the Transformer encoder, measured side by side (the steppers take turns over their own batches).

    OMP_NUM_THREADS=1 .venv/bin/python -m profiling.sequence_cost configs/movielens_age.yaml \\
        configs/movielens_age_history.yaml

The first config is the baseline (no sequence feature); the second's data folder has one (prepared if
missing). Each variant is built as the pre-train phase builds it (`build_pretrain`: sharded tables,
DeepSpeed) and timed by part with `profiling.steps.pretrain_stepper`; prints ms per step, the ratio to
the baseline and the dense parameters the sequence encoder adds.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import replace
from pathlib import Path


def main() -> None:
    from iak_dist.config import load_config
    from iak_dist.data.parquet import ParquetReader
    from iak_dist.data.prepare import is_prepared, prepare
    from iak_dist.data.schema import Schema
    from iak_dist.data.source import Split
    from iak_dist.distributed.context import close_distributed, init_distributed
    from iak_dist.phases.pretrain import build_pretrain
    from iak_dist.runtime import configure_environment
    from profiling.steps import interleaved, pretrain_stepper

    configure_environment()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", help="pipeline config without a sequence feature")
    parser.add_argument("history", help="pipeline config whose data has a sequence feature")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    base, hist = load_config(args.baseline), load_config(args.history)
    variants = {"no history": base, "history, pool": replace(hist, model=replace(hist.model, sequence_encoder="pool")),
                "history, transformer": replace(hist, model=replace(hist.model, sequence_encoder="transformer"))}
    ctx = init_distributed()
    try:
        steppers, batches, params = {}, {}, {}
        for name, cfg in variants.items():
            if not is_prepared(cfg.data.dir, cfg.data):
                prepare(cfg.data)
            schema = Schema.load(Path(cfg.data.dir) / "schema.yaml")
            sharded, dense = build_pretrain(schema, cfg.model, cfg.pretrain, cfg.distributed, 0, ctx)
            reader = ParquetReader(Split.open(cfg.data.dir, "pretrain", schema), schema, cfg.pretrain.batch_size)
            batches[name] = [b.to(ctx.device) for b in itertools.islice(reader.epoch(0), args.steps)]
            steppers[name] = pretrain_stepper(sharded, dense)
            params[name] = sum(p.numel() for p in sharded.ranker.backbone.sequence_encoders.parameters())
        times = interleaved(steppers, batches, args.rounds, turn=10)
    finally:
        close_distributed(ctx)
    baseline = sum(times["no history"].values())
    print(f"\npre-train step, batch {base.pretrain.batch_size}, median of {args.rounds} rounds (ms)")
    print("| variant | ms per step | vs no history | embedding lookup (ms) | dense forward (ms) | backward (ms) "
          "| encoder params |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, parts in times.items():
        total = sum(parts.values())
        print(f"| {name} | {1000 * total:.2f} | {total / baseline:.2f}x | {1000 * parts['embedding lookup']:.2f} "
              f"| {1000 * parts['dense forward']:.2f} | {1000 * parts['backward (+ fused sparse update)']:.2f} "
              f"| {params[name]:,} |")


if __name__ == "__main__":
    main()
