"""Learning-rate schedules: the closed form, and the rates the optimizers really use at each step."""

from __future__ import annotations

import math

import pytest

from iak_dist.config import OptimConfig
from iak_dist.phases.schedule import lr_factor


@pytest.mark.parametrize(("schedule", "expected"), [
    # total 10, warm-up 4: steps 0-3 at (s+1)/4, then from 1 at step 4 to 0.2 at the last step (9)
    ("constant", [0.25, 0.5, 0.75, 1, 1, 1, 1, 1, 1, 1]),
    ("linear", [0.25, 0.5, 0.75, 1, 1, 0.84, 0.68, 0.52, 0.36, 0.2]),
    ("cosine", [0.25, 0.5, 0.75, 1] + [0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(6)]),
])
def test_factor_is_the_closed_form(schedule, expected):
    cfg = OptimConfig(lr_schedule=schedule, warmup_steps=4, min_lr_ratio=0.2)
    assert [lr_factor(s, 10, cfg) for s in range(10)] == pytest.approx(expected)
    assert lr_factor(12, 10, cfg) == pytest.approx(expected[-1])  # past the end: the floor


def test_factor_edges():
    assert lr_factor(0, 1, OptimConfig(lr_schedule="cosine")) == 1.0  # one step: it still trains
    assert lr_factor(4, 5, OptimConfig(lr_schedule="linear", min_lr_ratio=0.5)) == 0.5
    assert lr_factor(2, 5, OptimConfig(lr_schedule="cosine")) == pytest.approx(0.5)


def kernel_lrs(optimizer) -> list[float]:
    """The rate each FBGEMM table kernel under TorchRec's fused `optimizer` holds (what its next
    in-backward update uses). The kernels sit outside the module tree: reached through the optimizers."""
    if hasattr(optimizer, "optimizers"):  # CombinedOptimizer
        return [lr for _, inner in optimizer.optimizers for lr in kernel_lrs(inner)]
    return [float(optimizer._emb_module.get_learning_rate())]


@pytest.mark.parametrize("stage", [0, 1])
def test_optimizers_use_the_scheduled_rates(stage, synth_dir, small_cfg, ctx):
    """Read back from every optimizer after each step: the dense AdamW (through DeepSpeed), the fused
    FBGEMM table kernels and the data-parallel table optimizer hold lr_factor x their base rate; and
    Adam's first update (|delta| = lr where the gradient dwarfs eps) proves the dense rate drives the step."""
    from dataclasses import replace

    from iak_dist.config import load_config
    from iak_dist.data.parquet import ParquetReader
    from iak_dist.data.schema import Schema
    from iak_dist.data.source import Split
    from iak_dist.phases.loop import train_loop
    from iak_dist.phases.pretrain import build_pretrain

    cfg = load_config(None, ["model.tower=[16]", "model.embedding_dim=8", f"distributed.zero.stage={stage}",
                             "distributed.zero.gradient_clipping=0", "distributed.sharding.plan={tags: "
                             "{sharding_type: data_parallel}}"])
    optim = replace(cfg.pretrain, lr_schedule="cosine", warmup_steps=3, min_lr_ratio=0.1, batch_size=64,
                    lr_dense=0.01, lr_sparse=0.2)
    total = 8
    schema = Schema.load(synth_dir / "schema.yaml")
    sharded, dense = build_pretrain(schema, cfg.model, optim, cfg.distributed, 0, ctx)
    assert sharded.data_parallel_optimizer is not None and kernel_lrs(sharded.model.fused_optimizer)
    tower = sharded.ranker.backbone.tower[0].weight
    before = tower.detach().clone()
    used = {}

    def read_back(done: int) -> None:
        dp = [g["lr"] for g in sharded.data_parallel_optimizer.optimizer.param_groups]
        used[done - 1] = (dense.lrs(), kernel_lrs(sharded.model.fused_optimizer), dp)
        if done == 1:
            moved = (tower.detach() - before).abs()
            # |delta| = lr * |g| / (|g| + eps): exactly lr where the gradient dwarfs eps, never more
            assert float(moved.max()) == pytest.approx(0.01 / 3, rel=1e-4)
            assert float(moved.median()) == pytest.approx(0.01 / 3, rel=1e-2)

    reader = ParquetReader(Split.open(synth_dir, "pretrain", schema), schema, 64, shuffle=True, drop_last=True)
    train_loop(sharded.model, dense, reader.batches(reader.resume_position(None, 0)), total, optim, "schedule",
               data_parallel_optimizer=sharded.data_parallel_optimizer, show_progress=False, on_step_end=read_back)
    for step in range(total):
        factor = lr_factor(step, total, optim)
        dense_lrs, kernels, dp = used[step]
        assert dense_lrs == pytest.approx([0.01 * factor] * len(dense_lrs))
        assert kernels == pytest.approx([0.2 * factor] * len(kernels))
        assert dp == pytest.approx([0.2 * factor])
