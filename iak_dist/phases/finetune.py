"""Fine-tuning: every domain at once with one strategy, on the frozen (or not, for `full`) backbone.

Reads top to bottom: build (data, backbone + adapter, dense engine) -> restore -> loop -> save.
The fine-tune split is streamed: each rank reads its share, one stream per domain
(`data/domain_streams.py`), never the whole split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from iak_dist.config import DistributedConfig, FinetuneConfig
from iak_dist.data.batch import Batch, arrow_to_batch, domain_indices
from iak_dist.data.domain_streams import DomainShare, DomainStreams, count_share
from iak_dist.data.sampler import DomainBatchSampler
from iak_dist.data.schema import Schema
from iak_dist.data.source import Split
from iak_dist.distributed.checkpoint import CheckpointManager, read_backbone_meta
from iak_dist.distributed.context import DistContext, collective_device
from iak_dist.distributed.sharding import ShardedRanker
from iak_dist.distributed.zero import DenseEngine
from iak_dist.io import atomic_write_json
from iak_dist.model.backbone import tower_widths
from iak_dist.model.strategies import build_adapter
from iak_dist.model.strategies.base import Adapter, adapter_class
from iak_dist.model.strategies.saving import save_adapter, save_backbone_state
from iak_dist.phases.common import build_from_backbone, check_schema_matches
from iak_dist.phases.loop import train_loop
from iak_dist.phases.pretrain import steps_for
from iak_dist.runtime import say
from iak_dist.tracking import summary_writer


def sampled_batches(table: pa.Table, schema: Schema, sampler: DomainBatchSampler) -> Iterator[Batch]:
    """Batches of an in-memory table (tests, profiling); the phase streams (`PositionedBatches`)."""
    while True:
        yield arrow_to_batch(table.take(sampler.next_batch()), schema)


class PositionedBatches:
    """Batches drawn by `sampler`, remembering the sampler state before each one.

    Trap: the overlapped input pipeline (TorchRec's TrainPipelineSparseDist) pulls batches ahead of
    the step it trains, so `sampler.state_dict()` at a step's end is already past untrained batches.
    A checkpoint must save `state_before(steps_done)`: the position of the next untrained batch.
    """

    def __init__(self, schema: Schema, sampler: DomainStreams, start: int) -> None:
        self.schema, self.sampler = schema, sampler
        self._next = start  # index (from the phase's step 0) of the next batch to draw
        self._before: dict[int, dict] = {}

    def __iter__(self) -> PositionedBatches:
        return self

    keep = 8  # states remembered: more than the pipeline's read-ahead (two batches)

    def __next__(self) -> Batch:
        self._before[self._next] = self.sampler.state_dict()
        self._before.pop(self._next - self.keep, None)
        self._next += 1
        return arrow_to_batch(self.sampler.next_batch(), self.schema)

    def state_before(self, index: int) -> dict:
        """The sampler state from which batch `index` is drawn (`index` at most `keep` batches back)."""
        return self.sampler.state_dict() if index == self._next else self._before[index]


@dataclass
class FinetuneSetup:
    """Everything a fine-tune run holds, built before its loop (tests reuse it)."""

    sharded: ShardedRanker
    adapter: Adapter
    meta: dict
    schema: Schema
    split: Split
    trainable: dict[str, torch.nn.Module]

    @cached_property
    def table(self) -> pa.Table:
        """The whole split in memory: for tests and profiling on small data (the phase streams it)."""
        return pa.concat_tables(self.split.read(p, columns=self.schema.columns()) for p in self.split.parts)

    @cached_property
    def domains(self) -> np.ndarray:
        """Domain index of every row of `table`."""
        return domain_indices(self.table.column(self.schema.domain), self.schema.domains)

    @property
    def model(self) -> torch.nn.Module:
        return self.sharded.model

    @property
    def trains_backbone(self) -> bool:
        return self.adapter.trains_backbone == "all"


def build_finetune(
    data_dir: str | Path, backbone_dir: str | Path, strategy: str, cfg: FinetuneConfig, ctx: DistContext,
    dist_cfg: DistributedConfig | None = None,
) -> FinetuneSetup:
    """Open the fine-tune split (metadata only) and the backbone, attach `strategy`'s adapter, freeze
    what must not train."""
    dist_cfg = dist_cfg or DistributedConfig()
    data_dir = Path(data_dir)
    schema = Schema.load(data_dir / "schema.yaml")
    split = Split.open(data_dir, "finetune", schema)
    train_all = adapter_class(strategy).trains_backbone == "all"
    meta = read_backbone_meta(backbone_dir)
    check_schema_matches(schema, meta, data_dir)
    adapter = build_adapter(strategy, len(schema.domains), tower_widths(meta["schema_obj"], meta["model_obj"]), cfg)
    sharded, meta = build_from_backbone(backbone_dir, adapter, ctx, train_embeddings=train_all,
                                        sharding=dist_cfg.sharding, lr_sparse=cfg.optim.lr_sparse,
                                        batch_size=cfg.optim.batch_size)
    backbone = sharded.ranker.backbone
    adapter.init_from_backbone(backbone)
    for p in backbone.dense_parameters():
        p.requires_grad_(train_all)
    trainable = dict(backbone.dense_modules()) if train_all else {}
    if any(True for _ in adapter.parameters()):
        trainable["adapter"] = adapter
    return FinetuneSetup(sharded, adapter, meta, schema, split, trainable)


def global_rows_per_domain(share: DomainShare, schema: Schema, rank: int) -> np.ndarray:
    """Rows of each domain over every rank's share (sync point: every rank calls it once).

    Says (rank 0) which domains some ranks hold no rows of: those ranks never pick them.
    """
    local = share.rows_per_domain
    both = torch.from_numpy(np.concatenate([local, local > 0]).astype(np.int64))
    if dist.is_initialized() and dist.get_world_size() > 1:
        both = both.to(collective_device())
        dist.all_reduce(both)
    both = both.cpu().numpy()
    counts, holders = both[:len(local)], both[len(local):]
    world = dist.get_world_size() if dist.is_initialized() else 1
    short = [f"{schema.domains[d]} ({world - holders[d]} of {world})" for d in np.flatnonzero(counts > 0)
             if holders[d] < world]
    if short:
        say(f"[finetune] domains without rows in some ranks' shares, trained by the other ranks: "
            f"{', '.join(short)}", rank)
    return counts


def count_trainable(run: FinetuneSetup) -> int:
    """Parameters that fine-tuning updates (embedding rows included for `full`)."""
    n = sum(p.numel() for m in run.trainable.values() for p in m.parameters())
    if run.trains_backbone:
        n += sum(c.num_embeddings * c.embedding_dim
                 for c in run.sharded.ranker.backbone.table_configs)
    return n


def finetune(
    data_dir: str | Path, backbone_dir: str | Path, strategy: str, cfg: FinetuneConfig, seed: int,
    out_dir: str | Path, ctx: DistContext, show_progress: bool = True, dist_cfg: DistributedConfig | None = None,
    on_checkpoint: Callable[[int, Path], None] | None = None,
) -> dict[str, float]:
    """Fine-tune `strategy` on the fine-tune split of `data_dir`; save the adapter to `out_dir`.

    `on_checkpoint(step, path)` runs on every rank after each checkpoint. `show_progress`: a progress
    bar, and a closing line saying where the adapter went (pipelines log their own lines instead).
    """
    dist_cfg = dist_cfg or DistributedConfig()
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    run = build_finetune(data_dir, backbone_dir, strategy, cfg, ctx, dist_cfg)
    num_domains = len(run.schema.domains)
    share = count_share(run.split, run.schema, ctx.rank, ctx.world_size, seed)
    rows_per_domain = global_rows_per_domain(share, run.schema, ctx.rank)
    summary: dict = {"finetune/trainable_params": float(count_trainable(run))}
    if run.trainable:
        dense = DenseEngine(run.trainable, cfg.optim.lr_dense, cfg.optim.weight_decay, dist_cfg.zero,
                            cfg.optim.batch_size, ctx.world_size)
        sampler = DomainStreams(run.split, run.schema, share, rows_per_domain, cfg.optim.batch_size,
                                cfg.sampler_alpha, seed, ctx.rank)
        total = steps_for(cfg.optim, int(share.rows_per_domain.sum()))
        checkpoints = CheckpointManager(out_dir.parent / ".checkpoints" / strategy, ctx, dist_cfg.keep_checkpoints)
        state = checkpoints.restore_latest(run.model, dense, warn=lambda m: say(m, ctx.rank),
                                           data_parallel_optimizer=run.sharded.data_parallel_optimizer)
        start = int(state["step"]) if state else 0
        if state:
            say(f"[finetune {strategy}] resuming at step {start} from {state['path']}", ctx.rank)
            if state["world_size"] == ctx.world_size:
                sampler.load_state_dict(state["sampler"])
            else:  # other shares: their positions do not carry over
                say(f"[finetune {strategy}] checkpoint from {state['world_size']} ranks, now {ctx.world_size}: "
                    f"the data streams start afresh on the new shares", ctx.rank)

        batches = PositionedBatches(run.schema, sampler, start)

        def on_step_end(step: int) -> None:
            if dist_cfg.checkpoint_every and step % dist_cfg.checkpoint_every == 0 and step < total:
                path = checkpoints.save(step, run.model, dense, {"step": step, "sampler": batches.state_before(step)},
                                        data_parallel_optimizer=run.sharded.data_parallel_optimizer)
                if on_checkpoint is not None:
                    on_checkpoint(step, path)

        writer = summary_writer(out_dir / "tb", ctx)
        try:
            summary |= train_loop(run.model, dense, batches, total,
                                  cfg.optim, desc=f"finetune {strategy} seed {seed}", start_step=start,
                                  data_parallel_optimizer=run.sharded.data_parallel_optimizer, writer=writer,
                                  adapter=run.adapter, num_domains=num_domains,
                                  show_progress=show_progress and ctx.is_main, on_step_end=on_step_end,
                                  progress_path=out_dir / "progress.json" if ctx.is_main else None,
                                  overlap_input_dist=dist_cfg.overlap_input_dist, device=ctx.device)
        finally:
            if writer is not None:
                writer.close()
        with dense.gathered():
            adapter_state = {k: v.detach().clone() for k, v in run.adapter.state_dict().items()}
            backbone_state = save_backbone_state(run.model, out_dir, ctx.rank) if run.trains_backbone else None
    else:
        adapter_state, backbone_state = run.adapter.state_dict(), None
    if ctx.is_main:
        save_adapter(out_dir, run.adapter, run.schema.domains, run.meta, backbone_state,
                     extra={"rows_per_domain": rows_per_domain.tolist()}, state=adapter_state)
        atomic_write_json(out_dir / "train_summary.json", summary)
    ctx.barrier()
    if show_progress:
        say(f"[finetune {strategy}] seed {seed}: adapter written to {out_dir}", ctx.rank)
    return summary
