"""Timed training steps: ours by part, the plain baselines, fine-tune steps, checkpoints, bandwidth.

Each `*_stepper` builds its model through the same code the phases use (or, for baselines, the
plainest code a user would hand-write on the same model) and returns a `Stepper`: one training step,
timed by part. `interleaved` runs steppers in turns over the same batches and keeps medians.
`profiling/throughput.py` puts them side by side; `profiling/finetune_cost.py` and
`profiling/scaling.py` reuse them.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import median
from typing import Any

import torch

from iak_dist.config import DistributedConfig, PipelineConfig, ZeroConfig
from iak_dist.data.batch import Batch

WARMUP = 3
"""Steps run before timing starts (first-call allocations, lazy initialisation)."""

STEP_PARTS = ("data", "input distribution", "embedding lookup", "dense forward", "backward (+ fused sparse update)",
              "dense optimizer")
"""The parts an iak-dist pre-train step is timed by (checkpointing is timed on its own)."""


def clock(device: torch.device) -> float:
    """`time.perf_counter()` once the work queued on `device` is done.

    Trap: CUDA kernels run asynchronously; without the synchronize a timer measures the launches,
    and the queued work lands in whichever later part first waits for a result.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def stream_copy_gbps(megabytes: int = 512, repeats: int = 5) -> float:
    """STREAM-like copy: bytes read + written per second by a large tensor copy."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def loader_samples_per_s(reader, n_batches: int) -> float:
    """The Parquet loader alone: row groups -> KeyedJaggedTensor batches, nothing else."""
    start, rows = time.perf_counter(), 0
    for i, batch in enumerate(reader.epoch(0)):
        rows += len(batch)
        if i + 1 == n_batches:
            break
    return rows / (time.perf_counter() - start)


def lookup_bytes_per_step(batches: Sequence[Batch], dim: int) -> float:
    """Bytes the embedding lookup must read per step: every looked-up row, fp32."""
    return sum(float(b.sparse.values().numel()) for b in batches) / len(batches) * dim * 4


def clip_and_step(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, zero: ZeroConfig) -> None:
    """What a hand-written loop does to match our dense update: clip the global norm, step."""
    if zero.gradient_clipping > 0:
        torch.nn.utils.clip_grad_norm_(params, zero.gradient_clipping, foreach=True)
    opt.step()


def overlap_off(distributed: DistributedConfig) -> DistributedConfig:
    """`distributed` with the dense gradient all-reduce after backward instead of overlapped with it
    (DeepSpeed's `zero_optimization.overlap_comm: false`): how `DenseEngine` ran before, for a
    side-by-side "before"."""
    ds = copy.deepcopy(distributed.zero.deepspeed)
    ds.setdefault("zero_optimization", {})["overlap_comm"] = False
    return dataclasses.replace(distributed, zero=dataclasses.replace(distributed.zero, deepspeed=ds))


Stepper = Callable[[Batch], dict[str, float]]
"""Runs one training step on a batch and returns its timings in seconds, by part."""


def interleaved(steppers: dict[str, Stepper], batches: Sequence[Batch] | dict[str, Sequence[Batch]],
                rounds: int, turn: int | None = None) -> dict[str, dict[str, float]]:
    """Every stepper's per-part median over `rounds` passes of `batches` (shared, or one list per
    stepper), the steppers taking turns every `turn` batches (default: every pass), so that a shared
    machine's changing load hits them all alike (their ratios are what to read). Each stepper first
    runs `WARMUP` untimed steps."""
    mine = batches if isinstance(batches, dict) else dict.fromkeys(steppers, batches)
    for name, step in steppers.items():
        for batch in mine[name][:WARMUP]:
            step(batch)
    times: dict[str, dict[str, list[float]]] = {name: {} for name in steppers}
    longest = max(len(b) for b in mine.values())
    turn = turn or longest
    for _ in range(rounds):
        for start in range(0, longest, turn):
            for name, step in steppers.items():
                for batch in mine[name][start:start + turn]:
                    for part, seconds in step(batch).items():
                        times[name].setdefault(part, []).append(seconds)
    return {name: {part: median(t) for part, t in parts.items()} for name, parts in times.items()}


TURN = 10
"""Steps each loop runs before the next takes its turn in the side-by-side comparisons: the load of
a shared machine changes within a pass of 60 steps (2-rank ratios moved from 0.8x to 1.6x between
runs taking turns pass by pass)."""


def pretrain_stepper(sharded, dense, loader_batches=None) -> Stepper:
    """Our pre-train step, timed by part.

    The sharded embedding collection is driven through its own two halves, as TorchRec's train
    pipeline drives it: `input_dist` (the KeyedJaggedTensor all-to-all to the ranks owning each
    table) and `compute_and_output_dist` (FBGEMM lookup + pooled embeddings back). With
    `loader_batches`, `data` is the loader producing one more batch from Parquet in the same step.

    Trap (several ranks): a loader inside the timed step runs between collectives, and the time one
    rank's Parquet decoding takes longer than the other's lands in the next all-to-all as waiting.
    Side by side with loops fed pre-loaded batches, leave `loader_batches` out and time the loader
    alone (`loader_samples_per_s`).
    """
    from iak_dist.phases.step import task_loss

    backbone = sharded.ranker.backbone
    tables = backbone.embeddings
    parts = STEP_PARTS if loader_batches is not None else STEP_PARTS[1:]

    def step(batch: Batch) -> dict[str, float]:
        device = batch.dense.device  # on CUDA every part boundary synchronises (see `clock`)
        times = [clock(device)]
        if loader_batches is not None:
            next(loader_batches)
            times.append(clock(device))
        context = tables.create_context()
        dist_input = tables.input_dist(context, batch.sparse).wait().wait()
        times.append(clock(device))
        pooled = backbone.items_by_text(tables.compute_and_output_dist(context, dist_input).wait().to_dict())
        embedded = backbone.feature_vectors(pooled, batch.sequence_lengths)
        times.append(clock(device))
        out = backbone.dense_part(embedded, batch.dense)
        loss = task_loss(out, batch, None) + out.aux_loss  # pre-training's loss: the mean over rows
        times.append(clock(device))
        dense.backward(loss)
        times.append(clock(device))
        dense.step()
        if sharded.data_parallel_optimizer is not None:
            sharded.data_parallel_optimizer.step()
        times.append(clock(device))
        return dict(zip(parts, (b - a for a, b in itertools.pairwise(times)), strict=True))

    return step


def checkpoint_seconds(sharded, dense, ctx, root: Path, repeats: int = 3) -> float:
    """One CheckpointManager save (DCP shards + fused optimizer + DeepSpeed state), median of `repeats`."""
    from iak_dist.distributed.checkpoint import CheckpointManager

    manager = CheckpointManager(root, ctx, keep=1)
    times = []
    for step in range(1, repeats + 1):
        start = time.perf_counter()
        manager.save(step, sharded.model, dense, {"step": step},
                     data_parallel_optimizer=sharded.data_parallel_optimizer)
        times.append(time.perf_counter() - start)
    return median(times)


def plain_torchrec_model(cfg: PipelineConfig, schema, ctx, plan, ddp: bool = True):
    """The bare backbone as a hand-written TorchRec loop would shard it: DMP with our sharding plan
    (`plan`: ours, from `ShardedRanker.plan`), fused row-wise Adagrad in backward and, with `ddp` on
    several ranks, DDP around the dense part (its all-reduces overlapped with backward; on one rank there
    is nothing to reduce, and `DenseEngine` skips that reduce too). Returns the DMP model."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
    from torchrec.distributed.types import ShardingPlan
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from iak_dist.distributed.sharding import EBC_PATH
    from iak_dist.model.backbone import Backbone

    torch.manual_seed(0)
    backbone = Backbone(schema, cfg.model, device=torch.device("meta"))
    apply_optimizer_in_backward(RowWiseAdagrad, backbone.embeddings.parameters(), {"lr": cfg.pretrain.lr_sparse})
    # our plan is keyed by the Ranker's path to the tables, this model is the bare backbone
    same_plan = ShardingPlan({"embeddings": plan.plan[EBC_PATH]})
    # Trap: DMP's default DDP wrapper sets `static_graph=True`, and DDP finds no tensor in the backbone's
    # output (a `ModelOutput` dataclass is a leaf to its pytree flattening): static-graph DDP then never
    # all-reduces the dense gradients, and the ranks' dense weights drift apart silently (this loop ran
    # so, with no dense all-reduce at all, until 2026-12-03). Dynamic DDP reduces from its hooks every step.
    return DistributedModelParallel(backbone, device=ctx.device, plan=same_plan,
                                    init_data_parallel=ddp and ctx.world_size > 1,
                                    data_parallel_wrapper=DefaultDataParallelWrapper(static_graph=False))


def plain_torchrec_stepper(cfg: PipelineConfig, schema, ctx, plan, ddp: bool = True,
                           our_update: bool = True) -> Stepper:
    """A hand-written TorchRec DMP loop on the same model and sharding plan (`plain_torchrec_model`):
    fused row-wise Adagrad in backward, torch AdamW, nothing else.

    Args:
        ddp: DDP around the dense part (all-reduces overlapped with backward); else one all-reduce of the
            dense gradients after backward, as DeepSpeed does at stage 0.
        our_update: fused AdamW and our clipping; else `torch.optim.AdamW`'s defaults, no clipping.
    """
    import torch.distributed as dist

    from iak_dist.phases.step import esmm_loss_per_row

    model = plain_torchrec_model(cfg, schema, ctx, plan, ddp)
    params = model.module.dense_parameters()
    fused = cfg.distributed.zero.fused_optimizer if our_update else False
    opt = torch.optim.AdamW(params, lr=cfg.pretrain.lr_dense, fused=fused or None)

    def update() -> None:
        if not ddp and ctx.world_size > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= ctx.world_size
            for p, g in zip(params, torch.split(flat, [p.numel() for p in params]), strict=True):
                p.grad.copy_(g.view_as(p))
        if our_update:
            clip_and_step(params, opt, cfg.distributed.zero)
        else:
            opt.step()

    return plain_stepper(lambda b: esmm_loss_per_row(model(b.sparse, b.dense), b).mean(), update, opt.zero_grad)


def plain_pytorch_stepper(cfg: PipelineConfig, schema, ctx) -> Stepper:
    """No TorchRec: one `nn.EmbeddingBag` per table (sum pooling) + the same dense part, under DDP."""
    from torch.nn.parallel import DistributedDataParallel

    from iak_dist.model.backbone import Backbone
    from iak_dist.phases.step import esmm_loss_per_row

    torch.manual_seed(0)
    backbone = Backbone(schema, cfg.model)
    tables = torch.nn.ModuleDict({f.name: torch.nn.EmbeddingBag(f.table_size, cfg.model.embedding_dim, mode="sum",
                                                           include_last_offset=True)
                                  for f in schema.sparse})

    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tables, self.dense = tables, torch.nn.ModuleDict(backbone.dense_modules())

        def forward(self, sparse, dense):
            feats = sparse.to_dict()
            emb = torch.stack([self.tables[k](feats[k].values(), feats[k].offsets()) for k in schema.feature_names], 1)
            return backbone.dense_part(emb, dense)

    model = DistributedDataParallel(Plain().to(ctx.device))
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.pretrain.lr_dense, fused=cfg.distributed.zero.fused_optimizer or None)
    return plain_stepper(lambda b: esmm_loss_per_row(model(b.sparse, b.dense), b).mean(),
                         lambda: clip_and_step(params, opt, cfg.distributed.zero), opt.zero_grad)


def plain_stepper(loss_fn: Callable[[Batch], torch.Tensor], update: Callable[[], None],
                  zero_grad: Callable[..., None]) -> Stepper:
    """A plain loop's step (forward, backward, optimizer), timed whole."""
    def step(batch: Batch) -> dict[str, float]:
        start = clock(batch.dense.device)
        loss = loss_fn(batch)
        zero_grad(set_to_none=True)
        loss.backward()
        update()
        return {"step": clock(batch.dense.device) - start}

    return step


def finetune_stepper(run, dense, total_steps: int, losses: list[torch.Tensor] | None = None) -> Stepper:
    """One fine-tune step of a strategy (`FinetuneSetup` + its dense engine), its schedule included.

    The step is the fine-tune loop's own (`phases.step.train_step`: each domain's mean loss averaged,
    plus the adapter's auxiliary loss). With `losses`, each step's loss tensor is appended there
    (not read: that would add a host sync to the timed step).
    """
    from iak_dist.phases.step import train_step

    run.model.train()
    num_domains = len(run.schema.domains)
    done = 0

    def step(batch: Batch) -> dict[str, float]:
        nonlocal done
        start = clock(batch.dense.device)
        run.adapter.on_step(done % total_steps, total_steps)
        loss, _ = train_step(run.model, dense, batch, num_domains, run.sharded.data_parallel_optimizer)
        seconds = clock(batch.dense.device) - start
        if losses is not None:
            losses.append(loss.detach())
        done += 1
        return {"step": seconds}

    return step


def finetune_steps(data_dir: str | Path, backbone_dir: str | Path, strategies: Sequence[str], cfg: PipelineConfig,
                   ctx, steps: int, rounds: int) -> dict[str, dict[str, Any]]:
    """Fine-tune step of each strategy as the fine-tune phase builds it, on sampled fine-tune batches
    (the same batches for every strategy), interleaved. Returns {strategy: {"step_s", "trainable_params"}}.
    """
    from iak_dist.data.sampler import DomainBatchSampler
    from iak_dist.distributed.zero import DenseEngine
    from iak_dist.phases.finetune import build_finetune, count_trainable, sampled_batches

    ft = cfg.finetune
    runs, steppers, batches = {}, {}, []
    for name in strategies:
        torch.manual_seed(0)
        run = build_finetune(data_dir, backbone_dir, name, ft, ctx, cfg.distributed)
        dense = DenseEngine(run.trainable, ft.optim.lr_dense, ft.optim.weight_decay, cfg.distributed.zero,
                            ft.optim.batch_size, ctx.world_size)
        if not batches:
            sampler = DomainBatchSampler(run.domains, len(run.schema.domains), ft.optim.batch_size,
                                         ft.sampler_alpha, seed=ctx.rank)
            batches = [next(sampled_batches(run.table, run.schema, sampler)).to(ctx.device) for _ in range(steps)]
        runs[name], steppers[name] = run, finetune_stepper(run, dense, steps)
    times = interleaved(steppers, batches, rounds)
    return {name: {"step_s": times[name]["step"], "trainable_params": count_trainable(runs[name])}
            for name in strategies}
