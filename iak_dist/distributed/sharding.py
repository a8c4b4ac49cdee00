"""Shards the embedding tables with TorchRec `DistributedModelParallel` (FBGEMM kernels).

Only the sparse side is distributed here. The dense modules stay plain (`init_data_parallel=False`)
so that DeepSpeed (`iak_dist.distributed.zero`) owns them, and nothing wraps them twice.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import data_type_to_dtype
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from iak_dist.config import ShardingConfig
from iak_dist.distributed.context import DistContext, collective_device, lockstep
from iak_dist.errors import UserError
from iak_dist.model.ranker import Ranker

CPU_SHARDING_TYPES = ["data_parallel", "table_wise", "column_wise", "table_column_wise"]
# row-wise families need reduce-scatter, which gloo lacks: TorchRec offers them on CUDA only.
CUDA_SHARDING_TYPES = [*CPU_SHARDING_TYPES, "row_wise", "table_row_wise", "grid_shard"]
COMPUTE_KERNELS = ["fused", "dense"]
EBC_PATH = "backbone.embeddings"

SPARSE_OPTIMIZERS = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}


def supported_sharding_types(device_type: str) -> list[str]:
    return CUDA_SHARDING_TYPES if device_type == "cuda" else CPU_SHARDING_TYPES


def plan_constraints(table_names: list[str], cfg: ShardingConfig, device_type: str,
                     world_size: int = 2, table_dtype: str = "fp32",
                     frozen: Collection[str] = ()) -> dict[str, ParameterConstraints]:
    """Planner constraints from the config; an unknown feature, type or kernel is a `UserError`.

    On one rank, unlisted tables default to table-wise: splitting a table into column shards there
    buys nothing and adds split / output-dist work on every step (measured: `iak-dist profile`).
    fp16 tables are never data-parallel: those are plain weights stepped by a torch optimizer whose
    state would be fp16 too (row-wise Adagrad's eps underflows: NaN within 10 steps, measured); the
    fused kernels keep fp32 optimizer state.
    `frozen` tables (they never train) are never data-parallel either: every rank would hold them whole
    and all-reduce their gradient every step, for nothing.
    """
    supported = supported_sharding_types(device_type)
    if table_dtype != "fp32":
        supported = [kind for kind in supported if kind != "data_parallel"]
    features = {t[len("t_"):]: t for t in table_names}
    for feature, table_plan in cfg.plan.items():
        if feature not in features:
            raise UserError(f"distributed.sharding.plan.{feature}: no such sparse feature; "
                            f"features: {', '.join(features)}")
        if table_plan.sharding_type == "data_parallel" and table_dtype != "fp32":
            raise UserError(f"distributed.sharding.plan.{feature}: data_parallel tables must be fp32 "
                            f"(model.table_dtype is {table_dtype}); pick another sharding type")
        if table_plan.sharding_type == "data_parallel" and features[feature] in frozen:
            raise UserError(f"distributed.sharding.plan.{feature}: {features[feature]} never trains; data_parallel "
                            f"would put it whole on every rank and all-reduce its gradient; pick another sharding "
                            f"type")
        _check_type(table_plan.sharding_type, supported, device_type, f"distributed.sharding.plan.{feature}")
        if table_plan.compute_kernel not in COMPUTE_KERNELS:
            raise UserError(f"distributed.sharding.plan.{feature}.compute_kernel: {table_plan.compute_kernel!r} "
                            f"is not one of {', '.join(COMPUTE_KERNELS)}")
    for kind in cfg.sharding_types:
        if kind == "data_parallel" and table_dtype != "fp32":
            raise UserError(f"distributed.sharding.sharding_types: data_parallel tables must be fp32 "
                            f"(model.table_dtype is {table_dtype}); leave it out")
        _check_type(kind, supported, device_type, "distributed.sharding.sharding_types")
    out = {}
    for feature, table in features.items():
        if feature in cfg.plan:
            p = cfg.plan[feature]
            # data-parallel tables are plain replicated weights: TorchRec runs them with the dense kernel only
            kernel = "dense" if p.sharding_type == "data_parallel" else p.compute_kernel
            out[table] = ParameterConstraints(sharding_types=[p.sharding_type], compute_kernels=[kernel])
        else:
            default = ["table_wise"] if world_size == 1 else supported
            kinds = [k for k in cfg.sharding_types or default if table not in frozen or k != "data_parallel"]
            if not kinds:
                raise UserError(f"distributed.sharding.sharding_types: {table} never trains and cannot be "
                                f"data_parallel (the only type listed); add another type, or set "
                                f"distributed.sharding.plan.{feature}")
            out[table] = ParameterConstraints(sharding_types=kinds)
    return out


def _check_type(kind: str, supported: list[str], device_type: str, key: str) -> None:
    if kind not in supported:
        raise UserError(f"{key}: sharding type {kind!r} is not supported on {device_type}; "
                        f"this device supports {', '.join(supported)}")


def make_planner(world_size: int, device_type: str, cfg: ShardingConfig, batch_size: int,
                 table_names: list[str], table_dtype: str = "fp32",
                 frozen: Collection[str] = ()) -> EmbeddingShardingPlanner:
    cap = int(cfg.memory_budget_gb * 1024**3) if cfg.memory_budget_gb > 0 else None
    # ranks per host: what the launcher says, else one host on CPU and 8-GPU hosts on CUDA
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or (min(8, world_size) if device_type == "cuda" else world_size)
    topology = Topology(
        world_size=world_size, compute_device=device_type, local_world_size=local,
        hbm_cap=cap if device_type == "cuda" else None, ddr_cap=cap if device_type != "cuda" else None,
    )
    constraints = plan_constraints(table_names, cfg, device_type, world_size, table_dtype, frozen)
    return EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=constraints)


@dataclass
class ShardedRanker:
    """The DMP-wrapped Ranker, its plan, and the optimizer of data-parallel tables (if any)."""

    model: DistributedModelParallel
    plan: ShardingPlan
    data_parallel_optimizer: DataParallelTableOptimizer | None

    @property
    def ranker(self) -> Ranker:
        return self.model.module


class DataParallelTableOptimizer:
    """Steps tables placed data-parallel, which lose TorchRec's in-backward optimizer (a trap).

    Gradient scale needs no care anywhere: the DDP that TorchRec wraps these tables in averages
    their gradients over ranks, and TorchRec divides the gradients of sharded tables by the world
    size in the backward all-to-all; both then match DeepSpeed's averaged dense gradients.
    """

    def __init__(self, params: list[nn.Parameter], optimizer: type, lr: float) -> None:
        self.params = params
        self.optimizer = optimizer(params, lr=lr)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


FROZEN_MARK = "iak_frozen_tables"
"""Attribute set on the fused optimizers (one per FBGEMM table batch) of frozen tables: `set_sparse_lr` skips them."""


def shard_ranker(ranker: Ranker, ctx: DistContext, cfg: ShardingConfig, lr_sparse: float | None,
                 batch_size: int = 512, frozen_tables: Collection[str] = ()) -> ShardedRanker:
    """Plan and shard the tables; with `lr_sparse`, they train with `cfg.sparse_optimizer`.

    `ranker`: any module whose `backbone` is a `Backbone` (the Ranker, or generative pre-training's model).
    `frozen_tables` (names `t_<feature>`), and the backbone's own `frozen_tables` (item text), never change
    while the others train: they get the same fused optimizer at learning rate 0. TorchRec groups tables
    into FBGEMM table batches by their fused optimizer settings, so these land in table batches of their
    own, whose rate no schedule touches (`set_sparse_lr`); w - 0 * u is w, bit for bit. (The same
    optimizer, not plain SGD: a fused optimizer with state for some tables and none for others does not
    load back from a checkpoint.) They are never placed data-parallel (`plan_constraints`).
    """
    ebc = ranker.backbone.embeddings
    table_names = [c.name for c in ranker.backbone.table_configs]
    frozen_tables = [*frozen_tables, *(t for t in ranker.backbone.frozen_tables if t not in frozen_tables)]
    unknown = sorted(set(frozen_tables) - set(table_names))
    assert not unknown, f"no such tables to freeze: {unknown}"
    optimizer_cls = SPARSE_OPTIMIZERS[cfg.sparse_optimizer]
    if lr_sparse is not None:
        weights = {name: ebc.embedding_bags[name].weight for name in table_names}
        apply_optimizer_in_backward(optimizer_cls, [w for n, w in weights.items() if n not in frozen_tables],
                                    {"lr": lr_sparse})
        if frozen_tables:
            apply_optimizer_in_backward(optimizer_cls, [weights[n] for n in frozen_tables], {"lr": 0.0})
    planner = make_planner(ctx.world_size, ctx.device.type, cfg, batch_size, table_names,
                           ranker.backbone.table_dtype, frozen_tables)
    sharders = [EmbeddingBagCollectionSharder()]
    try:
        if ctx.world_size > 1:
            plan = planner.collective_plan(ranker, sharders, torch.distributed.GroupMember.WORLD)
        else:
            plan = planner.plan(ranker, sharders)
    except (PlannerError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "No available sharding type" not in str(exc):
            raise
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"the embedding tables do not fit the sharding constraints / memory budget "
                        f"(distributed.sharding): {first}") from exc
    model = DistributedModelParallel(
        ranker, env=ShardingEnv.from_process_group(torch.distributed.GroupMember.WORLD), device=ctx.device,
        plan=plan, sharders=sharders, init_data_parallel=False,
    )
    if lr_sparse is not None and frozen_tables:
        frozen_weights = {f"embedding_bags.{name}.weight" for name in frozen_tables}
        for leaf in fused_optimizers(model.fused_optimizer):
            if set(leaf.params) <= frozen_weights:
                setattr(leaf, FROZEN_MARK, True)
    dp_optimizer = None
    dp_tables = [t for t, ps in plan.plan[EBC_PATH].items()
                 if ps.sharding_type == "data_parallel" and t not in frozen_tables]
    if dp_tables and lr_sparse is not None:
        params = dict(model.named_parameters())
        dp_params = [params[f"{EBC_PATH}.embedding_bags.{t}.weight"] for t in dp_tables]
        dp_optimizer = DataParallelTableOptimizer(dp_params, optimizer_cls, lr_sparse)
    return ShardedRanker(model, plan, dp_optimizer)


def set_sparse_lr(model: nn.Module, data_parallel_optimizer: DataParallelTableOptimizer | None, lr: float) -> None:
    """The learning rate of the tables' next updates (a schedule sets it every step).

    Trap: TorchRec's fused optimizer updates the tables inside backward, in FBGEMM's kernels, with
    the rate the kernel holds; its `param_groups[0]["lr"]` reaches the kernel only in the fused
    optimizer's `step()` / `zero_grad()` (`set_learning_rate`). `zero_grad()` is the one of the two
    that never updates anything (in-backward updates leave no gradient behind), so it applies the rate.
    """
    fused = getattr(model, "fused_optimizer", None)
    if fused is not None and fused.param_groups:
        for leaf in fused_optimizers(fused):
            if not getattr(leaf, FROZEN_MARK, False):  # frozen tables stay at rate 0 (`shard_ranker`)
                for group in leaf.param_groups:
                    group["lr"] = lr
        fused.zero_grad()
    if data_parallel_optimizer is not None:
        data_parallel_optimizer.set_lr(lr)


def fused_optimizers(optimizer: Any) -> list[Any]:
    """The keyed optimizers inside TorchRec's (nested) `CombinedOptimizer`: one per FBGEMM table batch."""
    from torchrec.optim.keyed import CombinedOptimizer

    if isinstance(optimizer, CombinedOptimizer):
        return [leaf for _, child in optimizer.optimizers for leaf in fused_optimizers(child)]
    return [optimizer]


def plan_rows(plan: ShardingPlan, ranker: Ranker, world_size: int) -> list[dict[str, Any]]:
    """One row per table: rows, dim, dtype, sharding, kernel, ranks and weight bytes held by each rank."""
    configs = {c.name: c for c in ranker.backbone.table_configs}
    rows = []
    for table, ps in plan.plan[EBC_PATH].items():
        cfg = configs[table]
        width = data_type_to_dtype(cfg.data_type).itemsize
        per_rank = [0] * world_size
        if ps.sharding_type == "data_parallel":
            for r in range(world_size):
                per_rank[r] = cfg.num_embeddings * cfg.embedding_dim * width
        else:
            for shard in ps.sharding_spec.shards:
                per_rank[shard.placement.rank()] += shard.shard_sizes[0] * shard.shard_sizes[1] * width
        rows.append({"table": table, "rows": cfg.num_embeddings, "dim": cfg.embedding_dim,
                     "dtype": ranker.backbone.table_dtype,
                     "sharding": ps.sharding_type, "kernel": ps.compute_kernel,
                     "ranks": sorted(set(ps.ranks or range(world_size))), "bytes_per_rank": per_rank})
    return rows


def format_plan(rows: list[dict[str, Any]]) -> str:
    """The plan as an aligned text table (printed at start, saved with checkpoints).

    Up to 8 ranks every rank's MiB is listed; beyond, the range over the ranks holding the table.
    """
    header = ["table", "rows", "dim", "dtype", "sharding", "kernel", "ranks", "MiB per rank"]

    def ranks(r):
        rs = r["ranks"]
        return ",".join(map(str, rs)) if len(rs) <= 8 else f"{rs[0]}-{rs[-1]} ({len(rs)})"

    def per_rank(r):
        held = [b for b in r["bytes_per_rank"] if b]
        if len(r["bytes_per_rank"]) <= 8:
            return " ".join(f"{b / 2**20:.1f}" for b in r["bytes_per_rank"])
        return f"{min(held) / 2**20:,.1f}..{max(held) / 2**20:,.1f}" if held else "0"

    body = [[r["table"], f"{r['rows']:,}", str(r["dim"]), r["dtype"], r["sharding"], r["kernel"], ranks(r), per_rank(r)]
            for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)


def local_module(model: nn.Module) -> Ranker:
    """The Ranker inside a DMP wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedModelParallel) else model


INIT_BLOCK_ROWS = 4096


@torch.no_grad()
def init_tables(model: nn.Module, ranker: Ranker, seed: int) -> None:
    """Initialise every table the same way whatever the plan and world size.

    Values are drawn block by block (`INIT_BLOCK_ROWS` rows of the full width), each block from a
    generator seeded by (seed, table, block); a rank draws only the blocks its shards overlap.
    So 1 rank and N ranks with any sharding start from identical tables (TorchRec's own init
    draws per shard, which depends on the plan). Distribution: U(-1/sqrt(rows), 1/sqrt(rows)).
    """
    configs = {f"{EBC_PATH}.embedding_bags.{c.name}.weight": (i, c)
               for i, c in enumerate(ranker.backbone.table_configs)}
    for key, value in model.state_dict().items():
        if key not in configs:
            continue
        index, cfg = configs[key]
        bound = 1.0 / cfg.num_embeddings**0.5
        for tensor, (r0, c0), (nr, nc) in local_pieces(value):
            for block in range(r0 // INIT_BLOCK_ROWS, (r0 + nr - 1) // INIT_BLOCK_ROWS + 1):
                start = block * INIT_BLOCK_ROWS
                rows = min(INIT_BLOCK_ROWS, cfg.num_embeddings - start)
                gen = torch.Generator().manual_seed(seed * 1_000_003 + index * 10_007 + block)
                values = torch.empty(rows, cfg.embedding_dim).uniform_(-bound, bound, generator=gen)
                lo, hi = max(start, r0), min(start + rows, r0 + nr)
                tensor[lo - r0:hi - r0].copy_(values[lo - start:hi - start, c0:c0 + nc])


def local_pieces(value: torch.Tensor) -> list[tuple[torch.Tensor, list[int], list[int]]]:
    """This rank's blocks of a table's state-dict value: (tensor, [row, col] offsets, [rows, cols]) per local
    shard of a sharded table; the whole tensor for a replicated (data-parallel) or unsharded one."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(value, ShardedTensor):
        return [(s.tensor, list(s.metadata.shard_offsets), list(s.metadata.shard_sizes)) for s in value.local_shards()]
    return [(value, [0, 0], list(value.shape))]


def _row_ranges_by_rank(value: torch.Tensor, world_size: int) -> list[list[tuple[int, int]]]:
    """For each rank, the row ranges [r0, r1) of the table it holds (any column block of them)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if not isinstance(value, ShardedTensor):  # replicated: every rank holds every row
        return [[(0, value.shape[0])] for _ in range(world_size)]
    ranges: list[list[tuple[int, int]]] = [[] for _ in range(world_size)]
    for shard in value.metadata().shards_metadata:
        r0, nr = shard.shard_offsets[0], shard.shard_sizes[0]
        ranges[shard.placement.rank()].append((r0, r0 + nr))
    return [sorted(set(r)) for r in ranges]  # a rank's column blocks of the same rows: sent once


@torch.no_grad()
def fill_rows_by_mean(model: nn.Module, table: str, batches: Iterator[tuple[np.ndarray, np.ndarray]],
                      ctx: DistContext) -> None:
    """Set every row of table `table` to the mean of the vectors given for it (zeros where none is).

    Collective. Each rank reads its own share of the source (`batches` of (rows int64 [n], vectors
    float32 [n, width]), e.g. its row groups of a file) and sends each vector to the ranks holding its row
    (one all-to-all per round, the ranks in `lockstep` until none has a batch left), so no rank reads
    another's share or holds more than its own shards (and an fp32 sum of them) and one batch: this is
    how a frozen table is filled from a file (item text). A batch that fails to read on one rank
    raises on every rank (no rank is left waiting in the exchange).
    """
    value = model.state_dict()[f"{EBC_PATH}.embedding_bags.{table}.weight"]
    pieces = local_pieces(value)
    sums = [torch.zeros(nr, nc) for _, _, (nr, nc) in pieces]
    counts = [torch.zeros(nr) for _, _, (nr, _) in pieces]
    owners = _row_ranges_by_rank(value, ctx.world_size)
    empty = (np.zeros(0, np.int64), np.zeros((0, value.shape[1]), np.float32))
    for batch, real in lockstep(batches, ctx, lambda: empty, what=f"filling {table}"):
        rows, vectors = batch if real else empty  # a rank out of batches sends nothing
        rows, vectors = torch.from_numpy(np.asarray(rows, np.int64)), torch.from_numpy(np.asarray(vectors, np.float32))
        if ctx.world_size > 1:
            rows, vectors = _send_to_owners(rows, vectors, owners)
        for (_, (r0, c0), (nr, nc)), total, seen in zip(pieces, sums, counts, strict=True):
            inside = (rows >= r0) & (rows < r0 + nr)
            total.index_add_(0, rows[inside] - r0, vectors[inside, c0:c0 + nc])
            seen.index_add_(0, rows[inside] - r0, torch.ones(int(inside.sum())))
    for (tensor, _, _), total, seen in zip(pieces, sums, counts, strict=True):
        tensor.copy_(total / seen.clamp(min=1).unsqueeze(1))


def _send_to_owners(rows: torch.Tensor, vectors: torch.Tensor,
                    owners: list[list[tuple[int, int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """All-to-all: each (row, vector) to every rank holding that row; returns what this rank received."""
    dist, device = torch.distributed, collective_device()
    order = [torch.cat([torch.nonzero((rows >= r0) & (rows < r1)).flatten() for r0, r1 in ranges])
             if ranges else torch.zeros(0, dtype=torch.int64) for ranges in owners]
    sizes = torch.tensor([len(o) for o in order], dtype=torch.int64)
    received = torch.empty_like(sizes)
    sizes, received = sizes.to(device), received.to(device)  # NCCL moves CUDA tensors only
    dist.all_to_all_single(received, sizes)
    send = torch.cat(order)
    splits_out, splits_in = received.tolist(), sizes.tolist()
    out_rows = torch.empty(sum(splits_out), dtype=torch.int64, device=device)
    out_vectors = torch.empty(sum(splits_out), vectors.shape[1], device=device)
    dist.all_to_all_single(out_rows, rows[send].to(device), output_split_sizes=splits_out,
                           input_split_sizes=splits_in)
    dist.all_to_all_single(out_vectors, vectors[send].to(device), output_split_sizes=splits_out,
                           input_split_sizes=splits_in)
    return out_rows.cpu(), out_vectors.cpu()


def dry_run_plan(ranker: Ranker, cfg: ShardingConfig, world_size: int, device_type: str,
                 batch_size: int, frozen_tables: Collection[str] = ()) -> tuple[list[dict[str, Any]], str]:
    """Plan `ranker` (tables on the meta device: nothing is allocated) for `world_size` ranks, with
    `frozen_tables` (generative pre-training's frozen transfer) planned as `shard_ranker` plans them.

    Returns the plan rows and a report: the plan table plus each rank's total table bytes.
    """
    table_names = [c.name for c in ranker.backbone.table_configs]
    planner = make_planner(world_size, device_type, cfg, batch_size, table_names, ranker.backbone.table_dtype,
                           {*frozen_tables, *ranker.backbone.frozen_tables})
    try:
        plan = planner.plan(ranker, [EmbeddingBagCollectionSharder()])
    except (PlannerError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"no plan fits {world_size} x {device_type} (distributed.sharding): {first}") from exc
    rows = plan_rows(plan, ranker, world_size)
    totals = [sum(r["bytes_per_rank"][k] for r in rows) for k in range(world_size)]
    total_rows = sum(r["rows"] for r in rows)
    lines = [format_plan(rows), "",
             f"{len(rows)} tables, {total_rows:,} rows, {sum(totals) / 2**30:,.1f} GiB of weights "
             f"over {world_size} x {device_type} (optimizer state and caches not included)",
             "GiB of table weights per rank:"]
    for start in range(0, world_size, 8):
        ranks = range(start, min(start + 8, world_size))
        lines.append("  " + "  ".join(f"r{k}: {totals[k] / 2**30:.2f}" for k in ranks))
    return rows, "\n".join(lines)
