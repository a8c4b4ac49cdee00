"""The Parquet loader alone against what pre-training consumes, on one rank, from the same data (issue 9, 6c).

    .venv/bin/python -m profiling.loader DATA_DIR [CONFIG] [--set pretrain.batch_size=2048 ...]
                                         [--batches 200] [--steps 20] [--rounds 3]

DATA_DIR is a data folder (schema.yaml + splits), e.g. one written by `iak-dist data synth`.
Measured in one process, taking turns round by round so that the shared machine's load hits both alike:

- loader: `ParquetReader` over the pre-train split as pre-training opens it (shuffled, this rank's
  parts, values checked as they stream, `Batch`es with hashed IDs in a KeyedJaggedTensor), `--batches`
  batches of a fresh epoch per round -> samples/s;
- training: the pre-train step (tables sharded by TorchRec with the fused optimizer, dense part under
  DeepSpeed, built by `phases/pretrain.build_pretrain`, stepped by `phases/step.train_step`) on
  `--steps` batches of the same split, already in memory -> samples/s;
- the loader's parts, timed by hand over the same row groups, in seconds per million rows: Parquet
  decode, value checks, shuffle (take), Arrow -> Batch (ID hashing, KeyedJaggedTensor).

Prints the figures and the ratio loader / training (the loader must lead by >= 5x); the median of
`--rounds` is taken for each. The model and batch size come from CONFIG / `--set` (defaults: the
pipeline's).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from statistics import median
from typing import Any

PARTS = ("decode", "value checks", "shuffle", "to Batch")


def loader_parts(split, parts, seed: int = 0) -> dict[str, float]:
    """Seconds per million rows of each stage of the loader, over `parts` (one row group at a time)."""
    import numpy as np

    from iak_dist.data.batch import arrow_to_batch
    from iak_dist.data.validate import value_problems

    rng = np.random.default_rng(seed)
    seconds = dict.fromkeys(PARTS, 0.0)
    rows = 0
    for part in parts:
        t0 = time.perf_counter()
        table = split.read(part, check=False)
        t1 = time.perf_counter()
        value_problems(split.where(part.path), table, split.schema, part.first_row)
        t2 = time.perf_counter()
        table = table.take(rng.permutation(table.num_rows))
        t3 = time.perf_counter()
        arrow_to_batch(table, split.schema)
        t4 = time.perf_counter()
        for name, s in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            seconds[name] += s
        rows += table.num_rows
    return {name: s / rows * 1e6 for name, s in seconds.items()}


def measure(data_dir: Path, cfg, batches: int, steps: int, rounds: int) -> dict[str, Any]:
    import torch

    from iak_dist.data.parquet import ParquetReader
    from iak_dist.data.source import Split, assign
    from iak_dist.distributed.context import close_distributed, init_distributed
    from iak_dist.phases.pretrain import build_pretrain
    from profiling.scaling import stepper
    from profiling.steps import WARMUP, loader_samples_per_s

    ctx = init_distributed()
    try:
        bs = cfg.pretrain.batch_size
        t0 = time.perf_counter()
        split = Split.open(data_dir, "pretrain")
        open_s = time.perf_counter() - t0
        reader = ParquetReader(split, split.schema, bs, shuffle=True, seed=0, drop_last=True)
        train_batches = list(itertools.islice(reader.epoch(0), steps + WARMUP))
        torch.manual_seed(0)
        step = stepper(*build_pretrain(split.schema, cfg.model, cfg.pretrain, cfg.distributed, 0, ctx))
        for b in train_batches[:WARMUP]:
            step(b)
        loader, train = [], []
        for _ in range(rounds):  # taking turns: the machine's load drifts alike over both
            reader = ParquetReader(split, split.schema, bs, shuffle=True, seed=0, drop_last=True)
            loader.append(loader_samples_per_s(reader, batches))
            train.append(bs / median(step(b)["step"] for b in train_batches[WARMUP:]))
        mine = assign(split.parts, 0, 1, 0, 0, shuffle=True)
        n_parts = max(1, min(len(mine), batches * bs // max(1, mine[0].rows)))
        return {
            "data": str(data_dir), "rows": split.num_rows, "files": len(split.files), "parts": len(split.parts),
            "open_s": open_s, "batch_size": bs, "loader_samples_per_s": median(loader),
            "train_samples_per_s": median(train), "loader_rounds": loader, "train_rounds": train,
            "parts_s_per_million_rows": loader_parts(split, mine[:n_parts]),
            "torch_threads": torch.get_num_threads(),
        }
    finally:
        close_distributed(ctx)


def report(r: dict[str, Any]) -> str:
    ratio = r["loader_samples_per_s"] / r["train_samples_per_s"]
    parts = r["parts_s_per_million_rows"]
    total = sum(parts.values())
    lines = [
        f"data: {r['data']} (pretrain: {r['rows']:,} rows, {r['files']} files, {r['parts']} row groups; "
        f"footers read in {r['open_s']:.2f} s)",
        f"batch {r['batch_size']}, one rank, {r['torch_threads']} torch threads",
        "",
        "| what | samples/s (median) | rounds |",
        "|---|---:|---|",
        f"| loader alone (ParquetReader -> Batch) | {r['loader_samples_per_s']:,.0f} | "
        f"{', '.join(f'{x:,.0f}' for x in r['loader_rounds'])} |",
        f"| pre-train step (what training consumes) | {r['train_samples_per_s']:,.0f} | "
        f"{', '.join(f'{x:,.0f}' for x in r['train_rounds'])} |",
        "",
        f"loader / training: {ratio:.1f}x ({'meets' if ratio >= 5 else 'MISSES'} the 5x the issue asks for)",
        "",
        "| loader stage | s per million rows | share |",
        "|---|---:|---:|",
        *(f"| {name} | {s:.3f} | {s / total:.0%} |" for name, s in parts.items()),
        f"| all stages (by hand, one row group at a time) | {total:.3f} | {1e6 / total:,.0f} rows/s |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("config", nargs="?", help="pipeline config whose model / pretrain sections to use")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batches", type=int, default=200, help="loader batches per round")
    parser.add_argument("--steps", type=int, default=20, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from iak_dist.config import load_config
    from iak_dist.runtime import configure_environment

    configure_environment()
    cfg = load_config(args.config, args.set)
    print(report(measure(args.data_dir, cfg, args.batches, args.steps, args.rounds)), flush=True)


if __name__ == "__main__":
    main()
