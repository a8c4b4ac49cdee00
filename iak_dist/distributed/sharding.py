"""Shards the embedding tables with TorchRec `DistributedModelParallel` (FBGEMM kernels).

Only the sparse side is distributed here; the dense modules stay plain (`init_data_parallel=False`)
so that the dense optimizer (or DeepSpeed) owns them.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from iak_dist.distributed.context import DistContext
from iak_dist.model.ranker import Ranker


def shard_ranker(ranker: Ranker, ctx: DistContext, lr_sparse: float | None) -> DistributedModelParallel:
    """Wrap `ranker` in DMP; with `lr_sparse`, the tables train with fused row-wise Adagrad.

    Tables are placed table-wise with the fused FBGEMM kernel. Trap avoided: a table the planner
    places data-parallel loses its in-backward optimizer and never trains.
    """
    ebc = ranker.backbone.embeddings
    if lr_sparse is not None:
        apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": lr_sparse})
    constraints = {
        cfg.name: ParameterConstraints(
            sharding_types=[ShardingType.TABLE_WISE.value],
            compute_kernels=[EmbeddingComputeKernel.FUSED.value],
        )
        for cfg in ebc.embedding_bag_configs()
    }
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=ctx.world_size, compute_device=ctx.device.type),
        constraints=constraints,
    )
    sharders = [EmbeddingBagCollectionSharder()]
    if ctx.world_size > 1:
        plan = planner.collective_plan(ranker, sharders, torch.distributed.GroupMember.WORLD)
    else:
        plan = planner.plan(ranker, sharders)
    return DistributedModelParallel(
        ranker,
        env=ShardingEnv.from_process_group(torch.distributed.GroupMember.WORLD),
        device=ctx.device,
        plan=plan,
        sharders=sharders,
        init_data_parallel=False,
    )


def plan_of(model: DistributedModelParallel) -> ShardingPlan:
    return model.plan


def local_module(model: nn.Module) -> Ranker:
    """The Ranker inside a DMP wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedModelParallel) else model
