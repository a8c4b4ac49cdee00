"""Fine-tuning: every domain at once with one strategy, on the frozen (or not, for `full`) backbone.

Reads top to bottom: build (data, backbone + adapter, dense engine) -> restore -> loop -> save.
The fine-tune split is streamed: each rank reads its share, one stream per domain
(`data/domain_streams.py`), never the whole split. A strategy that freezes the backbone reads those
streams from the prefix cache (`data/prefix_cache.py`: the interaction output of every row and the
first tower layer's output on it, computed once) instead of the files, and trains from there
(`PrefixRanker`): no lookups in its steps.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from iak_dist.config import DistributedConfig, FinetuneConfig
from iak_dist.data.batch import Batch, arrow_to_batch, domain_indices
from iak_dist.data.domain_streams import DomainShare, DomainStreams, count_share, domain_index
from iak_dist.data.prefix_cache import (
    CachedSplit,
    PrefixBatch,
    build_prefix_cache,
    building_lock,
    cache_key,
    cache_problem,
    clear_folder,
)
from iak_dist.data.sampler import DomainBatchSampler
from iak_dist.data.schema import Schema
from iak_dist.data.source import Split
from iak_dist.distributed.checkpoint import CheckpointManager, read_backbone_meta
from iak_dist.distributed.context import DistContext, on_main, sum_over_ranks
from iak_dist.distributed.sharding import ShardedRanker
from iak_dist.distributed.zero import DenseEngine
from iak_dist.errors import UserError
from iak_dist.io import atomic_write_json
from iak_dist.model.backbone import tower_widths
from iak_dist.model.ranker import PrefixRanker
from iak_dist.model.strategies import build_adapter
from iak_dist.model.strategies.base import Adapter, adapter_class
from iak_dist.model.strategies.saving import save_adapter, save_backbone_state
from iak_dist.phases.common import build_from_backbone, check_schema_matches
from iak_dist.phases.evaluate import lockstep
from iak_dist.phases.loop import train_loop
from iak_dist.phases.pretrain import steps_for
from iak_dist.phases.validation import VALID_BATCH, EarlyStopping, ValidationInput
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

    def __init__(self, to_batch: Callable[[pa.Table], Batch | PrefixBatch], sampler: DomainStreams,
                 start: int) -> None:
        self.to_batch, self.sampler = to_batch, sampler
        self._next = start  # index (from the phase's step 0) of the next batch to draw
        self._before: dict[int, dict] = {}

    def __iter__(self) -> PositionedBatches:
        return self

    keep = 8  # states remembered: more than the pipeline's read-ahead (two batches)

    def __next__(self) -> Batch | PrefixBatch:
        self._before[self._next] = self.sampler.state_dict()
        self._before.pop(self._next - self.keep, None)
        self._next += 1
        return self.to_batch(self.sampler.next_batch())

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
    adapter = build_adapter(strategy, len(schema.domains), tower_widths(meta["schema_obj"], meta["model_obj"]), cfg,
                            meta["model_obj"].embedding_dim)
    adapter.check_schema(schema)
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


def say_thin_domains(share: DomainShare, schema: Schema, rank: int) -> None:
    """Says (rank 0) which domains have fewer rows than ranks: the ranks without any never pick them."""
    counts = share.global_rows_per_domain
    holders = sum(share.rows_of_rank(r) > 0 for r in range(share.world_size))
    short = [f"{schema.domains[d]} ({share.world_size - holders[d]} of {share.world_size})"
             for d in np.flatnonzero(counts > 0) if holders[d] < share.world_size]
    if short:
        say(f"[finetune] domains with fewer rows than ranks, not picked by the ranks without any: "
            f"{', '.join(short)}", rank)


def without_domains(share: DomainShare, schema: Schema, held_out: list[str]) -> DomainShare:
    """`share` with the rows of the `held_out` domains counted as none: the streams never read them, the
    adapter's `rows_per_domain` says 0 for them (zero-shot domains, `finetune.hold_out_domains`)."""
    if not held_out:
        return share
    counts = share.counts.copy()
    counts[:, [domain_index(schema, name, "finetune.hold_out_domains") for name in held_out]] = 0
    if not counts.sum():
        raise UserError(f"finetune.hold_out_domains: {held_out} holds out every domain with fine-tune rows")
    return DomainShare(share.parts, counts, share.rank, share.world_size)


def resume_step(start: int, total_old: int, total_new: int) -> int:
    """The step to resume at when a run of `total_old` steps stopped at `start` and now has `total_new`
    (another world size): the same fraction done, `round(start / total_old * total_new)`."""
    if total_old == total_new or total_old <= 0:
        return start
    return min(total_new, round(start / total_old * total_new))


def restore_position(state: dict, sampler: DomainStreams, total: int, world_size: int,
                     note: Callable[[str], None]) -> int:
    """The step to resume at from checkpoint `state`; positions `sampler` there when its state fits.

    At another world size the fraction done carries over (`resume_step`; the checkpoint's `total`).
    When the world size, the split's data (fingerprint) or the batch size changed, the saved
    offsets mean nothing: `note` says so in one line and the streams start afresh.
    """
    saved_world, total_old = int(state["world_size"]), int(state.get("total", total))
    start = int(state["step"]) if saved_world == world_size else resume_step(int(state["step"]), total_old, total)
    why = sampler.mismatch({"world_size": saved_world, **state["sampler"]})
    if why is None:
        sampler.load_state_dict(state["sampler"])
    else:
        note(f"checkpoint at step {state['step']} of {total_old} on {saved_world} ranks, now step {start} of "
             f"{total} on {world_size}: the data streams start afresh ({why})")
    return start


def count_trainable(run: FinetuneSetup) -> int:
    """Parameters that fine-tuning updates (embedding rows included for `full`, the item text's excepted)."""
    n = sum(p.numel() for m in run.trainable.values() for p in m.parameters())
    if run.trains_backbone:
        backbone = run.sharded.ranker.backbone
        n += sum(c.num_embeddings * c.embedding_dim for c in backbone.table_configs
                 if c.name not in backbone.frozen_tables)
    return n


def uses_prefix_cache(strategy: str, setting: str) -> bool:
    """Whether `strategy` fine-tunes from the prefix cache under `finetune.prefix_cache: setting`: every
    strategy that freezes the backbone, unless `off`; `on` for one that trains it is a UserError."""
    cls = adapter_class(strategy)
    changes_prefix = cls.trains_backbone == "all" or cls.adapts_lookups
    if setting == "on" and changes_prefix:
        what = "trains the backbone" if cls.trains_backbone == "all" else "adapts the embeddings"
        raise UserError(f"finetune.prefix_cache: on, but strategy {strategy!r} {what} (its prefix "
                        f"changes every step); set it to auto (cache for the strategies that freeze it) or off")
    return setting != "off" and not changes_prefix


def open_prefix_cache(run: FinetuneSetup, root: Path, ctx: DistContext, split: Split | None = None) -> CachedSplit:
    """The prefix cache of `split` (default: `run`'s fine-tune split) and `run`'s backbone under
    `root/<split name>/<key>`: reused when complete, else (no cache, another key, an interrupted build, a
    truncated file) built by one pass over the split, each rank its row groups (collective: every rank
    calls it). Says which, in one line."""
    split = split or run.split
    if ctx.is_main:
        remove_old_layout(root)
    root = root / split.name
    with building_lock(root, holder=ctx.is_main):
        ctx.barrier()  # sync point: every rank decides once rank 0 holds the lock
        cached = _open_or_build(run, split, root, ctx)
        ctx.barrier()  # the cache is whole before another phase may look at it
    return cached


def remove_old_layout(root: Path) -> None:
    """Remove caches of the layout before the valid split had one (`root/<key>/` instead of
    `root/<split>/<key>/`): never read again, and on production tables gigabytes each."""
    if root.is_dir():
        for old in root.iterdir():
            if old.is_dir() and len(old.name) == 16 and all(c in "0123456789abcdef" for c in old.name):
                shutil.rmtree(old, ignore_errors=True)


def _open_or_build(run: FinetuneSetup, split: Split, root: Path, ctx: DistContext) -> CachedSplit:
    width = run.sharded.ranker.backbone.prefix_width
    key = cache_key(run.meta, split, run.schema)
    folder = root / key
    problems = [cache_problem(folder, key, split)]
    if ctx.world_size > 1:  # every rank must take the same branch (the build is collective)
        everyone: list = [None] * ctx.world_size
        torch.distributed.all_gather_object(everyone, problems[0])  # sync point
        problems = everyone
    problem = next((p for p in problems if p is not None), None)
    if problem is None:
        say(f"[finetune] prefix cache: reused {folder}", ctx.rank)
        return CachedSplit(folder, split, run.schema)
    on_main(ctx, lambda: clear_folder(folder))
    backbone = run.sharded.ranker.backbone
    started = time.perf_counter()

    @torch.no_grad()
    def prefix_of(batch: Batch) -> torch.Tensor:
        return backbone.prefix(backbone.embed(batch.sparse, batch.sequence_lengths), batch.dense)

    was_training = run.model.training
    run.model.eval()
    try:
        build_prefix_cache(folder, key, split, run.schema, width, prefix_of, ctx.rank, ctx.world_size,
                           lambda batches, padding: lockstep(batches, ctx, padding), ctx.device)
    finally:
        run.model.train(was_training)
    ctx.barrier()  # rank 0's marker is written
    say(f"[finetune] prefix cache: built {folder} ({split.num_rows:,} rows x {width} floats, "
        f"{time.perf_counter() - started:.1f} s; {problem})", ctx.rank)
    return CachedSplit(folder, split, run.schema)


def cached_validation(run: FinetuneSetup, data_dir: str | Path, cache_root: Path, model: PrefixRanker,
                      ctx: DistContext) -> ValidationInput:
    """Validation passes from a prefix cache of the valid split (built once per backbone, like the
    fine-tune split's): a frozen backbone scores each valid row through the same prefix every pass,
    so a pass costs the adapter's forward alone, not the lookups (collective: every rank calls it)."""
    cached = open_prefix_cache(run, cache_root, ctx, Split.open(data_dir, "valid", run.schema))
    return ValidationInput(lambda: lockstep(cached.batches(ctx.rank, ctx.world_size, VALID_BATCH), ctx,
                                            cached.first_row), model)


def finetune(
    data_dir: str | Path, backbone_dir: str | Path, strategy: str, cfg: FinetuneConfig, seed: int,
    out_dir: str | Path, ctx: DistContext, show_progress: bool = True, dist_cfg: DistributedConfig | None = None,
    on_checkpoint: Callable[[int, Path], None] | None = None, only_domain: str | None = None,
    prepare_adapter: Callable[[Adapter], None] | None = None,
) -> dict[str, float]:
    """Fine-tune `strategy` on the fine-tune split of `data_dir`; save the adapter to `out_dir`.

    `on_checkpoint(step, path)` runs on every rank after each checkpoint. `show_progress`: a progress
    bar, and a closing line saying where the adapter went (pipelines log their own lines instead).
    With `only_domain`, only that domain's rows are read, trained on and validated (the adapter's
    `rows_per_domain` holds zeros for the others). With `cfg.optim.validate_every`, validation
    passes over the `valid` split pick the best weights, which are saved (`phases/validation.py`).
    `prepare_adapter(adapter)` runs on the built adapter before its optimizer is made: a caller that
    starts from trained weights loads them there and freezes what must not change.
    A strategy with `per_domain_models` is handed to `per_domain.finetune_per_domain` whole.
    A strategy that freezes the backbone trains from the prefix cache (`cfg.prefix_cache`, under
    `<backbone_dir>/../prefix_cache`, built by the first run that needs it): the same batches and the
    same arithmetic as through the lookups (tests/test_prefix_cache.py: bitwise), without them.
    """
    cached = uses_prefix_cache(strategy, cfg.prefix_cache)
    if cfg.hold_out_domains and adapter_class(strategy).per_domain_models:
        raise UserError(f"finetune.hold_out_domains: {strategy} trains a model per domain; a held-out domain is "
                        f"then simply not fine-tuned (leave it out of the data), hold domains out with another "
                        f"strategy")
    if adapter_class(strategy).per_domain_models:
        from iak_dist.phases.per_domain import finetune_per_domain  # imports this module: lazily

        return finetune_per_domain(data_dir, backbone_dir, strategy, cfg, seed, out_dir, ctx, show_progress,
                                   dist_cfg, on_checkpoint)
    dist_cfg = dist_cfg or DistributedConfig()
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    run = build_finetune(data_dir, backbone_dir, strategy, cfg, ctx, dist_cfg)
    if prepare_adapter is not None:
        prepare_adapter(run.adapter)
    num_domains = len(run.schema.domains)
    share = count_share(run.split, run.schema, ctx.rank, ctx.world_size, seed, all_reduce=sum_over_ranks,
                        only_domain=only_domain)
    share = without_domains(share, run.schema, cfg.hold_out_domains)
    say_thin_domains(share, run.schema, ctx.rank)
    rows_per_domain = share.global_rows_per_domain
    run.adapter.set_domain_sizes(rows_per_domain)
    summary: dict = {"finetune/trainable_params": float(count_trainable(run))}
    if run.trainable:
        dense = DenseEngine(run.trainable, cfg.optim.lr_dense, cfg.optim.weight_decay, dist_cfg.zero,
                            cfg.optim.batch_size, ctx.world_size)
        # the cache's `read` serves the same rows as the split's: the same streams, batches and positions
        cache_root = Path(backbone_dir).parent / "prefix_cache"
        source = open_prefix_cache(run, cache_root, ctx) if cached else run.split
        sampler = DomainStreams(source, run.schema, share, cfg.optim.batch_size, cfg.sampler_alpha, seed)
        total = steps_for(cfg.optim, int(share.rows_per_domain.sum()))
        # one folder per (strategy, domain): the members of a per-domain fine-tune share out_dir.parent; an
        # adapter grown from trained weights (`prepare_adapter`) one per output, since two grown by the same
        # domain with other settings may share a parent
        folder = strategy if only_domain is None else f"{strategy}.{only_domain}"
        if prepare_adapter is not None:
            folder = f"grown.{out_dir.name}"
        # a frozen backbone's tables stay out of the checkpoints: they are the backbone's, named by its hash
        frozen_tables = None if run.trains_backbone else run.meta["weights"]
        checkpoints = CheckpointManager(out_dir.parent / ".checkpoints" / folder, ctx, dist_cfg.keep_checkpoints,
                                        frozen_tables)
        state = checkpoints.restore_latest(run.model, dense, warn=lambda m: say(m, ctx.rank),
                                           data_parallel_optimizer=run.sharded.data_parallel_optimizer)
        # from the cache the steps start at the prefix: the same backbone and adapter modules, no tables
        model = PrefixRanker(run.sharded.ranker.backbone, run.adapter) if cached else run.model
        validation = None
        if cfg.optim.validate_every > 0:
            domain = None if only_domain is None else domain_index(run.schema, only_domain, "only_domain")
            valid_input = cached_validation(run, data_dir, cache_root, model, ctx) if cached else None
            validation = EarlyStopping(data_dir, run.schema, cfg.optim, int(share.rows_per_domain.sum()), ctx,
                                       checkpoints.root, run.model, dense, run.sharded.data_parallel_optimizer,
                                       steps_for, domain, source=valid_input, frozen_tables=frozen_tables,
                                       held_out=[domain_index(run.schema, d, "finetune.hold_out_domains")
                                                 for d in cfg.hold_out_domains])
            validation.load_state_dict(state.get("valid") if state else None)
        start = 0
        stopped_at = validation.stopped_at if validation is not None else None
        if stopped_at is not None:
            say(f"[finetune {strategy}] stopped early at step {stopped_at} (best {validation.record.best_step}): "
                f"nothing left to train", ctx.rank)
        elif state:
            if state.get("hold_out_domains", []) != list(cfg.hold_out_domains):  # it trained on other domains
                raise UserError(f"{state['path']}: checkpoint of a fine-tune holding out "
                                f"{state.get('hold_out_domains', [])}, the config holds out "
                                f"{list(cfg.hold_out_domains)}; move {checkpoints.root} aside to fine-tune again")
            start = restore_position(state, sampler, total, ctx.world_size,
                                     lambda line: say(f"[finetune {strategy}] {line}", ctx.rank))
            say(f"[finetune {strategy}] resuming at step {start} from {state['path']}", ctx.rank)

        batches = PositionedBatches(source.to_batch if cached else lambda t: arrow_to_batch(t, run.schema),
                                    sampler, start)

        def on_step_end(step: int) -> None:
            if dist_cfg.checkpoint_every and step % dist_cfg.checkpoint_every == 0 and step < total:
                train_state = {"step": step, "total": total, "sampler": batches.state_before(step),
                               "hold_out_domains": list(cfg.hold_out_domains)}
                if validation is not None:
                    train_state["valid"] = validation.state_dict()
                path = checkpoints.save(step, run.model, dense, train_state,
                                        data_parallel_optimizer=run.sharded.data_parallel_optimizer)
                if on_checkpoint is not None:
                    on_checkpoint(step, path)

        writer = summary_writer(out_dir / "tb", ctx)
        try:
            if stopped_at is not None:  # the loop would count from `start`, which is not where it stopped
                summary |= {"train/steps": float(stopped_at), "train/seconds": 0.0}
            else:
                summary |= train_loop(model, dense, batches, total,
                                      cfg.optim, desc=f"finetune {strategy} seed {seed}", start_step=start,
                                      data_parallel_optimizer=run.sharded.data_parallel_optimizer, writer=writer,
                                      adapter=run.adapter, num_domains=num_domains,
                                      show_progress=show_progress and ctx.is_main, on_step_end=on_step_end,
                                      progress_path=out_dir / "progress.json" if ctx.is_main else None,
                                      overlap_input_dist=dist_cfg.overlap_input_dist and not cached,
                                      device=ctx.device,
                                      validation=validation)
        finally:
            if writer is not None:
                writer.close()
        if validation is not None:
            validation.restore_best(lambda m: say(m, ctx.rank))
            summary |= validation.summary()
        with dense.gathered():
            adapter_state = {k: v.detach().clone() for k, v in run.adapter.state_dict().items()}
            backbone_state = save_backbone_state(run.model, out_dir, ctx.rank) if run.trains_backbone else None
    else:
        adapter_state, backbone_state = run.adapter.state_dict(), None
    if ctx.is_main:
        save_adapter(out_dir, run.adapter, run.schema.domains, run.meta, backbone_state,
                     extra={"rows_per_domain": rows_per_domain.tolist(),
                            **({"hold_out_domains": cfg.hold_out_domains} if cfg.hold_out_domains else {})},
                     state=adapter_state)
        atomic_write_json(out_dir / "train_summary.json", summary)
    ctx.barrier()
    if show_progress:
        say(f"[finetune {strategy}] seed {seed}: adapter written to {out_dir}", ctx.rank)
    return summary
