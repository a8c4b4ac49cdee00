"""Cost of one fine-tune step of each strategy, as a ratio to `full`, measured side by side; the
frozen-backbone strategies both through the embedding lookups and from the prefix cache.

    # MovieLens-100K (a run's backbone; its data folder from the config)
    OMP_NUM_THREADS=1 .venv/bin/python -m profiling.finetune_cost configs/movielens_age.yaml \
        --backbone runs/movielens-100k-age/seed0/backbone
    # synthetic production-shaped tables (written once into --synthetic, with a backbone pre-trained
    # for a few steps): three 1e7-row tables, two of them multi-hot (~20 and ~5 IDs a row)
    OMP_NUM_THREADS=1 .venv/bin/python -m profiling.finetune_cost --synthetic data/finetune-cost \
        --table-rows 10000000
    # either on 2 ranks: OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 -m profiling.finetune_cost ...

Each strategy is built as the fine-tune phase builds it (config's fine-tune and distributed
sections). The prefix cache is built (timed) under `--cache-dir` (default: a temporary folder). Every
step variant then takes its turn over the same rows, `--rounds` times (so load on a shared machine
hits all alike), and keeps its median step (`profiling/steps.interleaved`): through the lookups a
`Batch` of IDs, from the cache the `PrefixBatch` of the same rows (`DomainStreams` over the files and
over the cache draw the same rows). The input (one batch from the streams: Parquet rows to IDs, or
cached rows to a prefix batch) is timed apart, as a mean over the same number of batches (a median
would hide the buffer refills), and added for the per-sample cost.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

STRATEGIES = ["full", "iak", "lora"]
SYNTH_FEATURES = [  # (name, table rows as a fraction of --table-rows or a count, mean IDs per row)
    ("user_id", 1.0, 1), ("item_id", 1.0, 1), ("hist_items", 1.0, 20), ("tags", 100_000, 5), ("category", 10_000, 1),
]


def write_synthetic(out: Path, table_rows: int, rows: int, domains: int = 4) -> None:
    """A fine-tune split of `rows` impressions over production-shaped tables (Zipf IDs; multi-hot
    features of Poisson length), and a small pre-train split; kept if already there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from iak_dist.data.schema import Schema, SparseFeature

    if (out / "schema.yaml").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = {name: int(size * table_rows) if size <= 1.0 else int(size) for name, size, _ in SYNTH_FEATURES}

    def zipf(n: int, vocab: int) -> np.ndarray:
        return (rng.zipf(1.1, n) * 2_654_435_761) % (4 * vocab)  # spread over 4x the table: hashed in

    def table(n: int) -> pa.Table:
        cols: dict = {"label_click": (rng.random(n) < 0.2).astype(np.int8),
                      "domain": [f"d{d}" for d in rng.choice(domains, n, p=[0.4, 0.3, 0.2, 0.1][:domains])]}
        cols["label_conversion"] = (cols["label_click"] & (rng.random(n) < 0.3)).astype(np.int8)
        for name, _, mean in SYNTH_FEATURES:
            if mean == 1:
                cols[name] = zipf(n, sizes[name]).astype(np.int64)
            else:
                lengths = np.maximum(rng.poisson(mean, n), 1)
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
                cols[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(zipf(int(offsets[-1]),
                                                                                       sizes[name]).astype(np.int64)))
        cols["dense_0"], cols["dense_1"] = rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32)
        return pa.table(cols)

    for split, n in (("pretrain", 4096), ("finetune", rows)):
        pq.write_table(table(n), out / f"{split}.parquet", row_group_size=16_384)
    Schema(sparse=[SparseFeature(name, sizes[name], mean > 1) for name, _, mean in SYNTH_FEATURES],
           domains=[f"d{d}" for d in range(domains)], dense=["dense_0", "dense_1"]).save(out / "schema.yaml")


def synthetic_backbone(data: Path, cfg, ctx) -> Path:
    """A backbone of `data`'s tables, pre-trained for a few steps (the cost of a step does not depend
    on how well it is trained); kept if already there."""
    from iak_dist.phases.pretrain import pretrain

    out = data / "run"
    if not (out / "backbone" / "backbone.json").is_file():
        pretrain(data, cfg.model, replace(cfg.pretrain, steps=4, batch_size=1024), cfg.distributed, 0, out, ctx,
                 show_progress=False)
    return out / "backbone"


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """A run's backbone on its config's data, or the synthetic production-shaped data set (its own backbone)."""
    parser.add_argument("config", nargs="?", help="pipeline config (its data folder); none with --synthetic")
    parser.add_argument("--backbone", help="exported backbone (with a config)")
    parser.add_argument("--synthetic", type=Path, help="folder of the synthetic production-shaped data set")
    parser.add_argument("--table-rows", type=int, default=10_000_000, help="rows of the big synthetic tables")
    parser.add_argument("--rows", type=int, default=100_000, help="synthetic fine-tune rows")


def check_data_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.synthetic is None) == (args.config is None or args.backbone is None):
        parser.error("give CONFIG --backbone DIR, or --synthetic DIR")


def data_and_backbone(args: argparse.Namespace, cfg, ctx) -> tuple[Path, Path]:
    """(data folder, backbone) of `add_data_arguments`' arguments; the synthetic set is written (rank 0) and
    its backbone pre-trained the first time."""
    if args.synthetic is None:
        return Path(cfg.data.dir), Path(args.backbone)
    if ctx.is_main:
        write_synthetic(args.synthetic, args.table_rows, args.rows)
    ctx.barrier()
    return args.synthetic, synthetic_backbone(args.synthetic, cfg, ctx)


def cache_stepper(run, dense, total_steps: int):
    """One fine-tune step from the prefix cache: `PrefixRanker` on a `PrefixBatch`, the loop's arithmetic."""
    from iak_dist.model.ranker import PrefixRanker
    from iak_dist.phases.step import train_step
    from profiling.steps import clock

    model = PrefixRanker(run.sharded.ranker.backbone, run.adapter)
    model.train()
    num_domains, done = len(run.schema.domains), 0

    def step(batch) -> dict[str, float]:
        nonlocal done
        start = clock(batch.prefix.device)
        run.adapter.on_step(done % total_steps, total_steps)
        train_step(model, dense, batch, num_domains)
        done += 1
        return {"step": clock(batch.prefix.device) - start}

    return step


def mean_input_seconds(sources: dict[str, Callable[[], object]], batches: int, rounds: int) -> dict[str, float]:
    """Mean seconds to produce one batch from each source, the sources taking turns `rounds` times."""
    total = dict.fromkeys(sources, 0.0)
    for _ in range(rounds):
        for name, produce in sources.items():
            start = time.perf_counter()
            for _ in range(batches):
                produce()
            total[name] += time.perf_counter() - start
    return {name: seconds / (rounds * batches) for name, seconds in total.items()}


def same_rows(run, ft, ctx, cache_dir: Path, steps: int, rounds: int) -> tuple[dict, dict, dict]:
    """`steps` batches through the files (`Batch`) and the same rows through the cache (`PrefixBatch`),
    the mean input time of each, and facts about the cache (build seconds, bytes, rows)."""
    from iak_dist.data.batch import arrow_to_batch
    from iak_dist.data.domain_streams import DomainStreams, count_share
    from iak_dist.distributed.context import sum_over_ranks
    from iak_dist.phases.finetune import open_prefix_cache

    share = count_share(run.split, run.schema, ctx.rank, ctx.world_size, 0, all_reduce=sum_over_ranks)
    started = time.perf_counter()
    cached = open_prefix_cache(run, cache_dir, ctx)
    facts = {"build_s": time.perf_counter() - started, "rows": run.split.num_rows,
             "bytes": sum(p.stat().st_size for p in cached.folder.glob("*.rec"))}
    files_stream, cache_stream = (DomainStreams(source, run.schema, share, ft.optim.batch_size, ft.sampler_alpha, 0)
                                  for source in (run.split, cached))
    produce = {"files": lambda: arrow_to_batch(files_stream.next_batch(), run.schema),
               "cache": lambda: cached.to_batch(cache_stream.next_batch())}
    batches = {name: [make().to(ctx.device) for _ in range(steps)] for name, make in produce.items()}
    return batches, mean_input_seconds(produce, steps, rounds), facts


def measure(data_dir: Path, backbone: Path, cfg, ctx, strategies: list[str], steps: int, rounds: int,
            cache_dir: Path) -> tuple[list[tuple[str, float, float, int]], dict[str, float]]:
    """Rows (variant, step s, input s, trainable params) and facts about the cache (build s, bytes, rows)."""
    import torch

    from iak_dist.distributed.zero import DenseEngine
    from iak_dist.phases.finetune import build_finetune, count_trainable
    from profiling.steps import finetune_stepper, interleaved

    ft = cfg.finetune
    from iak_dist.phases.finetune import uses_prefix_cache

    frozen = [s for s in strategies if uses_prefix_cache(s, "auto")]  # those that train from the cache
    setups, steppers, batches, inputs, facts = {}, {}, {}, {}, {}
    for variant in [*strategies, *(f"{s} (cache)" for s in frozen)]:
        torch.manual_seed(0)
        run = build_finetune(data_dir, backbone, variant.split(" ")[0], ft, ctx, cfg.distributed)
        dense = DenseEngine(run.trainable, ft.optim.lr_dense, ft.optim.weight_decay, cfg.distributed.zero,
                            ft.optim.batch_size, ctx.world_size)
        if not batches:  # the same rows for every variant
            batches, inputs, facts = same_rows(run, ft, ctx, cache_dir, steps, rounds)
        setups[variant] = run
        steppers[variant] = (cache_stepper if variant.endswith("(cache)") else finetune_stepper)(run, dense, steps)
    source = {v: "cache" if v.endswith("(cache)") else "files" for v in steppers}
    times = interleaved(steppers, {v: batches[source[v]] for v in steppers}, rounds)
    rows = [(v, times[v]["step"], inputs[source[v]], count_trainable(setups[v])) for v in steppers]
    return rows, facts


def main() -> None:
    from iak_dist.config import load_config
    from iak_dist.distributed.context import close_distributed, init_distributed, on_main
    from iak_dist.runtime import configure_environment

    configure_environment()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cache-dir", type=Path, help="where the prefix cache goes (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args()
    check_data_arguments(parser, args)
    cfg = load_config(args.config, args.set)
    ctx = init_distributed()
    try:
        data_dir, backbone = data_and_backbone(args, cfg, ctx)
        # one folder for every rank (each writes its row groups of the cache there)
        tmp = None if args.cache_dir else on_main(ctx, lambda: tempfile.mkdtemp(prefix="prefix-cache-"), share=True)
        try:
            rows, facts = measure(data_dir, backbone, cfg, ctx, args.strategies.split(","), args.steps, args.rounds,
                                  args.cache_dir or Path(tmp))
        finally:
            ctx.barrier()
            if tmp is not None and ctx.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        close_distributed(ctx)
    if not ctx.is_main:
        return
    batch = cfg.finetune.optim.batch_size
    full_step, full_input = next((s, i) for v, s, i, _ in rows if v == "full")
    print(f"\n{data_dir}: {facts['rows']:,} fine-tune rows, {ctx.world_size} rank(s), batch {batch} per rank; "
          f"prefix cache built in {facts['build_s']:.1f} s ({facts['bytes'] / 2**20:.1f} MiB)")
    print(f"| variant | ms per step (median of {args.rounds} rounds) | ms input per batch (mean) "
          "| step vs `full` | step + input vs `full` | trainable params |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant, step, inp, params in rows:
        print(f"| {variant} | {1000 * step:.2f} | {1000 * inp:.2f} | {step / full_step:.2f}x "
              f"| {(step + inp) / (full_step + full_input):.2f}x | {params:,} |")


if __name__ == "__main__":
    main()
