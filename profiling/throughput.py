"""`iak-dist profile CONFIG`: where a training step's time goes, next to plain baselines.

Measured in one run, on every rank (`--nproc N`: N ranks under torchrun), on the config's own data
and model; the loops compared take turns over the same batches (`steps.interleaved`):

- an iak-dist pre-train step, timed by part: data loading (Parquet row groups -> KeyedJaggedTensor,
  the loader timed alone: inside a step on several ranks its skew would land in the all-to-alls),
  input distribution, embedding lookup (TorchRec sharded tables, FBGEMM), dense forward, backward
  (fused sparse update included), dense optimizer; one checkpoint save, amortised over
  `distributed.checkpoint_every` steps; the pre-train loop as the phase runs it (input
  distribution overlapped with compute when `distributed.overlap_input_dist`);
- on more than one rank, the same step with the dense gradient all-reduce after backward instead of
  overlapped with it (`zero_optimization.overlap_comm: false`: how iak-dist ran before);
- a plain hand-written TorchRec DMP loop on the same model and batches (what our layers cost);
- plain PyTorch `nn.EmbeddingBag` tables + the same dense part under DDP (no TorchRec);
- an IAK fine-tune step against a full fine-tune step, both built as the fine-tune phase builds them;
- the data loader alone, against what training consumes;
- effective embedding-lookup bandwidth against a STREAM-like copy.

Rank 0 writes `RUN_DIR/profile/report.md`, `report.png` and `profile.json` (every rank's figures);
`--trace` adds a Chrome trace of a few steps. Absolute numbers move with the machine's load; the
ratios are the result.
"""

from __future__ import annotations

import json
import resource
import shutil
from pathlib import Path
from typing import Any

import torch

from iak_dist.config import PipelineConfig
from iak_dist.io import atomic_path, atomic_write_json, atomic_write_text
from iak_dist.runtime import say
from profiling import steps as timed

FINETUNE_STRATEGIES = ("full", "iak")
ROUNDS = 3
"""Passes over the profiled batches, the measured loops taking turns (see `steps.interleaved`)."""


def run_profile(cfg: PipelineConfig, steps: int = 60, trace: bool = False) -> Path:
    import torch.distributed as dist

    from iak_dist.data.parquet import ParquetReader
    from iak_dist.data.schema import Schema
    from iak_dist.data.source import Split
    from iak_dist.distributed.checkpoint import export_backbone
    from iak_dist.distributed.context import init_distributed
    from iak_dist.orchestration.local import ensure_data
    from iak_dist.phases.loop import train_loop
    from iak_dist.phases.pretrain import batches_from, build_pretrain

    ctx = init_distributed()
    if ctx.is_main:
        ensure_data(cfg)
    ctx.barrier()
    data_dir, out_dir = Path(cfg.data.dir), Path(cfg.run_dir) / "profile"
    scratch = out_dir / "scratch"
    bs = cfg.pretrain.batch_size
    schema = Schema.load(data_dir / "schema.yaml")

    def reader() -> ParquetReader:
        return ParquetReader(Split.open(data_dir, "pretrain", schema), schema, bs, ctx.rank, ctx.world_size,
                             shuffle=True, drop_last=True, split_mode=cfg.distributed.data_split)

    batches = [b.to(ctx.device) for b, _ in zip(batches_from(reader(), 0), range(steps), strict=False)]
    mine: dict[str, Any] = {"rank": ctx.rank, "stream_copy_gbps": timed.stream_copy_gbps(),
                            "loader_samples_per_s": timed.loader_samples_per_s(reader(), steps)}
    torch.manual_seed(0)
    sharded, dense = build_pretrain(schema, cfg.model, cfg.pretrain, cfg.distributed, 0, ctx)
    # every loop is fed the same pre-loaded batches; the loader is timed alone (see `pretrain_stepper`)
    steppers = {"ours": timed.pretrain_stepper(sharded, dense)}
    if ctx.world_size > 1:  # the "before": one all-reduce after backward (on one rank there is none)
        torch.manual_seed(0)
        before = build_pretrain(schema, cfg.model, cfg.pretrain, timed.overlap_off(cfg.distributed), 0, ctx)
        steppers["ours_overlap_off"] = timed.pretrain_stepper(*before)
    steppers["plain_torchrec"] = timed.plain_torchrec_stepper(cfg, schema, ctx, sharded.plan)
    steppers["plain_pytorch_ddp"] = timed.plain_pytorch_stepper(cfg, schema, ctx)
    medians = timed.interleaved(steppers, batches, ROUNDS, turn=timed.TURN)
    parts = {"data": bs / mine["loader_samples_per_s"], **medians["ours"]}
    mine["step_parts_s"] = parts
    mine["train_step_s"] = sum(v for k, v in parts.items() if k != "data")
    if "ours_overlap_off" in medians:
        mine["overlap_off_step_s"] = sum(v for k, v in medians["ours_overlap_off"].items() if k != "data")
    mine["plain_torchrec_step_s"] = medians["plain_torchrec"]["step"]
    mine["plain_pytorch_ddp_step_s"] = medians["plain_pytorch_ddp"]["step"]
    lookup_bytes = timed.lookup_bytes_per_step(batches, cfg.model.embedding_dim)
    mine["lookup_gbps"] = lookup_bytes / parts["embedding lookup"] / 1e9
    mine["checkpoint_s"] = timed.checkpoint_seconds(sharded, dense, ctx, scratch / "checkpoints")
    if trace:  # before the phase loop below rewrites the model for its pipeline
        _chrome_trace(sharded, dense, batches[:8], out_dir / f"trace_rank{ctx.rank}.json")
    loop = train_loop(sharded.model, dense, batches_from(reader(), 0), 2 * len(batches), cfg.pretrain, desc="profile",
                      data_parallel_optimizer=sharded.data_parallel_optimizer, show_progress=False,
                      overlap_input_dist=cfg.distributed.overlap_input_dist, device=ctx.device)
    mine["phase_loop_samples_per_s"] = loop["train/samples_per_s"]
    with dense.gathered():
        export_backbone(sharded.model, schema, cfg.model, scratch / "backbone", ctx.rank)
    ctx.barrier()
    mine["finetune"] = timed.finetune_steps(data_dir, scratch / "backbone", FINETUNE_STRATEGIES, cfg, ctx,
                                            max(steps // 2, timed.WARMUP + 2), rounds=ROUNDS)
    mine["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if ctx.device.type == "cuda":
        mine["peak_cuda_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    ranks = [mine]
    if ctx.world_size > 1:
        ranks = [None] * ctx.world_size
        dist.all_gather_object(ranks, mine)
    if ctx.is_main:
        result = summarise(ranks, bs, steps, cfg)
        atomic_write_json(out_dir / "profile.json", result)
        atomic_write_text(out_dir / "report.md", markdown(result))
        plot(result, out_dir / "report.png")
        shutil.rmtree(scratch, ignore_errors=True)
        traces = ", trace_rank*.json (chrome://tracing)" if trace else ""
        say(f"[profile] wrote report.md, report.png, profile.json{traces} to {out_dir}", ctx.rank)
    ctx.barrier()
    return out_dir


def summarise(ranks: list[dict[str, Any]], batch_size: int, steps: int, cfg: PipelineConfig) -> dict[str, Any]:
    """Totals over ranks: training is synchronous, so the slowest rank sets every step's pace."""
    world = len(ranks)

    def total(key: str) -> float:
        return world * batch_size / max(r[key] for r in ranks)

    every = cfg.distributed.checkpoint_every
    ckpt = max(r["checkpoint_s"] for r in ranks)
    ft = {name: max(r["finetune"][name]["step_s"] for r in ranks) for name in FINETUNE_STRATEGIES}
    before = {"overlap_off_samples_per_s_total": total("overlap_off_step_s")} if world > 1 else {}
    return {**before,
        "batch_size_per_rank": batch_size, "steps": steps, "world_size": world, "ranks": ranks,
        "samples_per_s_total": total("train_step_s"),
        "plain_torchrec_samples_per_s_total": total("plain_torchrec_step_s"),
        "plain_pytorch_ddp_samples_per_s_total": total("plain_pytorch_ddp_step_s"),
        "phase_loop_samples_per_s_total": sum(r["phase_loop_samples_per_s"] for r in ranks),
        "loader_samples_per_s_total": sum(r["loader_samples_per_s"] for r in ranks),
        "checkpoint_s": ckpt, "checkpoint_every": every,
        "checkpoint_s_per_step": ckpt / every if every else 0.0,
        "finetune_step_s": ft, "iak_vs_full_step": ft["iak"] / ft["full"],
        "finetune_trainable_params": {n: ranks[0]["finetune"][n]["trainable_params"] for n in FINETUNE_STRATEGIES},
    }


def _chrome_trace(sharded, dense, batches, path: Path) -> None:
    step = timed.pretrain_stepper(sharded, dense)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for batch in batches:
            step(batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))


def markdown(r: dict[str, Any]) -> str:
    rank0 = r["ranks"][0]
    parts = rank0["step_parts_s"]
    step = sum(parts.values())
    ours = r["samples_per_s_total"]

    def ratios(samples_per_s: float) -> str:
        return (f"{samples_per_s / r['plain_torchrec_samples_per_s_total']:.2f}x / "
                f"{samples_per_s / r['plain_pytorch_ddp_samples_per_s_total']:.2f}x")

    lines = [
        "# Throughput profile", "",
        f"Batch {r['batch_size_per_rank']} per rank, {r['steps']} steps, {r['world_size']} rank(s).",
        "Ratios are what to read: absolute numbers move with the machine's load.", "",
        "## Per rank", "", "| rank | samples/s (training) | samples/s (phase loop) | peak RSS GiB |"
        + (" peak CUDA GiB |" if "peak_cuda_gib" in rank0 else ""),
        "|---:|---:|---:|---:|" + ("---:|" if "peak_cuda_gib" in rank0 else ""),
    ]
    for x in r["ranks"]:
        cuda = f" {x['peak_cuda_gib']:.2f} |" if "peak_cuda_gib" in x else ""
        lines.append(f"| {x['rank']} | {r['batch_size_per_rank'] / x['train_step_s']:,.0f} | "
                     f"{x['phase_loop_samples_per_s']:,.0f} | {x['peak_rss_gib']:.2f} |{cuda}")
    lines += ["", f"Total: {ours:,.0f} samples/s of training ({r['phase_loop_samples_per_s_total']:,.0f} through "
              "the pre-train phase's own loop, loading and pipelining included).", "",
              "## Where an iak-dist pre-train step goes (rank 0)", "", "| part | ms | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {1000 * v:.2f} | {100 * v / step:.0f} % |" for k, v in parts.items()]
    if r["checkpoint_every"]:
        lines.append(f"| checkpoint: one save {1000 * r['checkpoint_s']:.0f} ms, every {r['checkpoint_every']} "
                     f"steps | {1000 * r['checkpoint_s_per_step']:.2f} | amortised |")
    else:
        lines.append(f"| checkpoint: one save {1000 * r['checkpoint_s']:.0f} ms (only at the end: "
                     "checkpoint_every is 0) | - | - |")
    ft = r["finetune_step_s"]
    params = r["finetune_trainable_params"]
    lines += ["", "## Side by side (training only, data excluded)", "", "| loop | samples/s | vs iak-dist |",
              "|---|---:|---:|",
              f"| iak-dist (TorchRec DMP + DeepSpeed) | {ours:,.0f} | 1.00x |",
              *([f"| iak-dist, dense all-reduce after backward (overlap off: before) | "
                 f"{r['overlap_off_samples_per_s_total']:,.0f} | {r['overlap_off_samples_per_s_total'] / ours:.2f}x |"]
                if "overlap_off_samples_per_s_total" in r else []),
              "| plain TorchRec DMP loop, same model and dense update | "
              f"{r['plain_torchrec_samples_per_s_total']:,.0f} | "
              f"{r['plain_torchrec_samples_per_s_total'] / ours:.2f}x |",
              f"| plain nn.EmbeddingBag + DDP | {r['plain_pytorch_ddp_samples_per_s_total']:,.0f} | "
              f"{r['plain_pytorch_ddp_samples_per_s_total'] / ours:.2f}x |", "",
              f"iak-dist / plain TorchRec DMP loop / DDP: {ratios(ours)}"
              + (f" (before, overlap off: {ratios(r['overlap_off_samples_per_s_total'])})"
                 if "overlap_off_samples_per_s_total" in r else "") + ".", "",
              "## Fine-tune step: IAK against full fine-tuning", "",
              "| strategy | ms per step | trainable parameters | vs full |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {1000 * ft[n]:.2f} | {params[n]:,} | {ft[n] / ft['full']:.2f}x |" for n in FINETUNE_STRATEGIES]
    lines += ["", "## Data loader and memory bandwidth (rank 0)", "",
              f"- Loader alone: {rank0['loader_samples_per_s']:,.0f} samples/s, "
              f"{r['loader_samples_per_s_total'] / ours:.1f}x what training consumes.",
              f"- Embedding lookup reads {rank0['lookup_gbps']:.2f} GB/s; a STREAM-like copy moves "
              f"{rank0['stream_copy_gbps']:.1f} GB/s ({100 * rank0['lookup_gbps'] / rank0['stream_copy_gbps']:.1f} % "
              "of it)."]
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    parts = r["ranks"][0]["step_parts_s"]
    a.barh(list(parts), [1000 * v for v in parts.values()])
    a.set_xlabel("ms per step")
    a.set_title("iak-dist pre-train step (rank 0)")
    ours = r["samples_per_s_total"]
    names = ["iak-dist", "plain TorchRec", "EmbeddingBag+DDP"]
    ratios = [1.0, r["plain_torchrec_samples_per_s_total"] / ours, r["plain_pytorch_ddp_samples_per_s_total"] / ours]
    if "overlap_off_samples_per_s_total" in r:
        names.insert(1, "iak-dist, overlap off")
        ratios.insert(1, r["overlap_off_samples_per_s_total"] / ours)
    bars = b.bar(names, ratios, color=[f"C{i}" for i in range(len(names))])
    b.bar_label(bars, [f"{x:.2f}x" for x in ratios])
    b.axhline(1.0, color="grey", lw=0.8)
    b.set_ylim(0, 1.15 * max(ratios))
    b.set_ylabel("training samples/s vs iak-dist")
    b.set_title(f"side by side (loader alone: {r['loader_samples_per_s_total'] / ours:.1f}x training)")
    b.tick_params(axis="x", rotation=15)
    ft = r["finetune_step_s"]
    c.bar(list(ft), [1000 * v for v in ft.values()])
    c.set_ylabel("ms per fine-tune step")
    c.set_title("fine-tune step")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    import sys

    from iak_dist.config import load_config

    print(json.dumps(json.loads((run_profile(load_config(sys.argv[1])) / "profile.json").read_text()), indent=2))
