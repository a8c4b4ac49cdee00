"""Cost of one fine-tune step of every strategy, as a ratio to `full`, measured side by side.

    .venv/bin/python profiling/finetune_cost.py configs/movielens_age.yaml \
        --backbone runs/movielens-100k-age/seed0/backbone

Each strategy is built as the fine-tune phase builds it (config's fine-tune and distributed
sections), then the strategies take turns over the same `--steps` batches, `--rounds` times (so load
on a shared machine hits all alike), and each keeps its median step (`profiling/steps.finetune_steps`).
"""

from __future__ import annotations

import argparse

STRATEGIES = ["full", "head", "lora", "patch", "iak"]


def main() -> None:
    from iak_dist.config import load_config
    from iak_dist.distributed.context import init_distributed
    from iak_dist.runtime import configure_environment
    from profiling.steps import finetune_steps

    configure_environment()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cfg = load_config(args.config)
    ctx = init_distributed()
    cost = finetune_steps(cfg.data.dir, args.backbone, STRATEGIES, cfg, ctx, args.steps, args.rounds)
    full = cost["full"]["step_s"]
    print(f"| strategy | ms per step (median, {args.rounds} rounds, batch {cfg.finetune.optim.batch_size}) "
          "| trainable params | vs `full` |")
    print("|---|---:|---:|---:|")
    for name in STRATEGIES:
        step = cost[name]["step_s"]
        print(f"| {name} | {1000 * step:.2f} | {cost[name]['trainable_params']:,} | {step / full:.2f}x |")


if __name__ == "__main__":
    main()
