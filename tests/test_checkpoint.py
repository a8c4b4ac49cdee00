"""Distributed checkpoints: crash during a save, exact resume, resharding, fallback, bad checkpoints."""

import json

import pytest
import torch
from test_distributed import plan_for, torchrun

from iak_dist.distributed.checkpoint import load_backbone_weights

CKPT = ["model.tower=[32, 16]", "model.embedding_dim=16", "pretrain.steps=40", "pretrain.batch_size=64",
        "pretrain.lr_dense=0.01", "pretrain.lr_sparse=0.1", "distributed.sharding.sparse_optimizer=adagrad",
        "distributed.checkpoint_every=10", "distributed.keep_checkpoints=5"]


def spec(synth_dir, out, extra=()):
    return {"scenarios": [{"kind": "pretrain", "data": str(synth_dir), "out": str(out),
                           "overrides": CKPT + plan_for("table_wise") + list(extra)}]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synth_dir):
    root = tmp_path_factory.mktemp("ckpt_ref")
    result = torchrun(spec(synth_dir, root / "run"), root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def losses(run_dir):
    return json.loads((run_dir / "result_rank0.json").read_text())["losses"]


def test_killed_rank_mid_save_keeps_previous_checkpoint_and_resume_is_exact(uninterrupted, synth_dir, tmp_path):
    run = tmp_path / "run"
    crashed = torchrun(spec(synth_dir, run), tmp_path, env={"IAK_DIST_FAULT": "save:20:1"}, name="crash")
    assert crashed.returncode != 0
    ckpts = run / "checkpoints" / "pretrain"
    assert (ckpts / "step_00000010" / "COMPLETE").is_file()
    assert (ckpts / "step_00000020.partial").is_dir() and not (ckpts / "step_00000020").exists()
    assert not (run / "backbone").exists()

    resumed = torchrun(spec(synth_dir, run), tmp_path, name="resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 10" in resumed.stderr
    assert losses(run) == losses(uninterrupted)[10:]  # exact on CPU
    a, b = load_backbone_weights(run / "backbone"), load_backbone_weights(uninterrupted / "backbone")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def build(cfg, schema, ctx):
    from iak_dist.distributed.sharding import shard_ranker
    from iak_dist.distributed.zero import DenseEngine
    from iak_dist.model.backbone import Backbone
    from iak_dist.model.ranker import Ranker

    backbone = Backbone(schema, cfg.model, device=torch.device("meta"))
    sharded = shard_ranker(Ranker(backbone), ctx, cfg.distributed.sharding, cfg.pretrain.lr_sparse, 64)
    dense = DenseEngine(backbone.dense_modules(), 0.01, 0.0, cfg.distributed.zero, 64, ctx.world_size)
    return sharded, dense


@pytest.mark.parametrize("kind", ["table_wise", "column_wise", "data_parallel"])
def test_two_rank_checkpoint_loads_on_one_rank_with_any_plan(kind, uninterrupted, synth_dir, ctx):
    from iak_dist.config import load_config
    from iak_dist.data.schema import Schema
    from iak_dist.distributed.checkpoint import CheckpointManager, plain_state_dict

    cfg = load_config(None, CKPT + plan_for(kind))
    sharded, dense = build(cfg, Schema.load(synth_dir / "schema.yaml"), ctx)
    state = CheckpointManager(uninterrupted / "checkpoints" / "pretrain", ctx).restore_latest(sharded.model, dense)
    assert state["step"] == 40 and state["world_size"] == 2
    restored = plain_state_dict(sharded.model, prefix="backbone.")
    exported = load_backbone_weights(uninterrupted / "backbone")
    for key in exported:
        assert torch.equal(restored[key], exported[key]), key
    if kind != "data_parallel":  # fused Adagrad state came along, resharded
        opt = sharded.model.fused_optimizer.state_dict()["state"]
        assert any(v for v in opt.values())


def test_truncated_newest_checkpoint_falls_back_to_the_one_before(uninterrupted, synth_dir, ctx, tmp_path):
    import shutil

    from iak_dist.config import load_config
    from iak_dist.data.schema import Schema
    from iak_dist.distributed.checkpoint import CheckpointManager

    root = tmp_path / "ckpts"
    shutil.copytree(uninterrupted / "checkpoints" / "pretrain", root)
    newest = sorted(root.glob("step_*"))[-1]
    for f in (newest / "sparse").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    warnings = []
    cfg = load_config(None, CKPT + plan_for("table_wise"))
    sharded, dense = build(cfg, Schema.load(synth_dir / "schema.yaml"), ctx)
    manager = CheckpointManager(root, ctx, keep=2)
    state = manager.restore_latest(sharded.model, dense, warn=warnings.append)
    assert state["step"] == 30
    assert newest.name in warnings[0] and "falling back" in warnings[0]
    # the bad one is moved aside, so saving on keeps the good one and never re-uses the corrupt step
    assert not newest.exists() and (root / f"{newest.name}.corrupt").is_dir()
    assert manager.complete()[-1].name == "step_00000030"
    manager.save(40, sharded.model, dense, {"step": 40})
    assert [p.name for p in manager.complete()] == ["step_00000030", "step_00000040"]
    warnings.clear()
    assert manager.restore_latest(sharded.model, dense, warn=warnings.append)["step"] == 40 and not warnings


def test_no_loadable_checkpoint_is_an_error_not_a_fresh_start(uninterrupted, synth_dir, ctx, tmp_path):
    import shutil

    from iak_dist.config import load_config
    from iak_dist.data.schema import Schema
    from iak_dist.distributed.checkpoint import CheckpointManager
    from iak_dist.errors import UserError

    root = tmp_path / "ckpts"
    shutil.copytree(uninterrupted / "checkpoints" / "pretrain", root)
    for f in root.glob("step_*/sparse/*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    sharded, dense = build(load_config(None, CKPT + plan_for("table_wise")), Schema.load(synth_dir / "schema.yaml"),
                           ctx)
    with pytest.raises(UserError, match=rf"^{root}: none of the 4 checkpoints here loads .*to start this phase") as e:
        CheckpointManager(root, ctx).restore_latest(sharded.model, dense, warn=lambda m: None)
    assert "\n" not in str(e.value)
    assert len(CheckpointManager(root, ctx).complete()) == 4  # nothing moved: the user decides


def test_checkpoint_of_another_model_config_names_the_tables(uninterrupted, synth_dir, ctx):
    from iak_dist.config import load_config
    from iak_dist.data.schema import Schema
    from iak_dist.distributed.checkpoint import CheckpointManager
    from iak_dist.errors import UserError

    cfg = load_config(None, CKPT + plan_for("table_wise") + ["model.embedding_dim=8"])
    sharded, dense = build(cfg, Schema.load(synth_dir / "schema.yaml"), ctx)
    with pytest.raises(UserError, match=r"different model config: tables embedding_bags.t_item_id.weight "
                                        r"\(checkpoint \[40000, 16\], model \[40000, 8\]\)"):
        CheckpointManager(uninterrupted / "checkpoints" / "pretrain", ctx).restore_latest(sharded.model, dense)


def test_zero_partitioned_state_refuses_another_world_size(tmp_path_factory, synth_dir, ctx):
    from iak_dist.config import load_config
    from iak_dist.data.schema import Schema
    from iak_dist.distributed.checkpoint import CheckpointManager
    from iak_dist.errors import UserError

    root = tmp_path_factory.mktemp("zero2")
    result = torchrun(spec(synth_dir, root / "run", ["distributed.zero.stage=2", "pretrain.steps=10"]), root)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = load_config(None, CKPT + plan_for("table_wise") + ["distributed.zero.stage=2"])
    sharded, dense = build(cfg, Schema.load(synth_dir / "schema.yaml"), ctx)
    with pytest.raises(UserError, match="ZeRO stage 2 state saved on 2 ranks cannot be resumed on 1"):
        CheckpointManager(root / "run" / "checkpoints" / "pretrain", ctx).restore_latest(sharded.model, dense)


def test_two_rank_checkpoint_loads_on_two_ranks_with_another_plan(uninterrupted, synth_dir, tmp_path):
    scenario = {"kind": "restore", "data": str(synth_dir), "out": str(tmp_path / "restore"),
                "checkpoints": str(uninterrupted / "checkpoints" / "pretrain"),
                "backbone": str(uninterrupted / "backbone"), "overrides": CKPT + plan_for("column_wise")}
    result = torchrun({"scenarios": [scenario]}, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        got = json.loads((tmp_path / "restore" / f"result_rank{rank}.json").read_text())
        assert got == {"step": 40, "equal": True, "plan": "column_wise"}


def test_tables_are_gathered_on_the_shards_device(backbone_dir, ctx, monkeypatch):
    """NCCL refuses CPU tensors: the all-reduce that assembles a table runs where its shards live."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from iak_dist.distributed import checkpoint
    from iak_dist.phases.common import build_from_backbone

    model = build_from_backbone(backbone_dir, None, ctx, train_embeddings=False)[0].model
    table = next(v for v in model.state_dict().values() if isinstance(v, ShardedTensor))
    assert checkpoint.collective_device(table) == table.local_shards()[0].tensor.device

    class NoShards:
        def local_shards(self):
            return []

    monkeypatch.setattr(checkpoint.dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(checkpoint.torch.cuda, "current_device", lambda: 0)
    assert checkpoint.collective_device(NoShards()) == torch.device("cuda", 0)
    # on a world of two, the all-reduce gets the tensor assembled on that device; the result is on the CPU
    reduced = []
    monkeypatch.setattr(checkpoint.dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(checkpoint.dist, "all_reduce", lambda t, *a, **k: reduced.append(t.device))
    state = checkpoint.plain_state_dict(model, prefix="backbone.")
    assert reduced and set(reduced) == {table.local_shards()[0].tensor.device}
    assert all(v.device.type == "cpu" for v in state.values())


def test_a_storage_fault_on_one_rank_is_raised_on_every_rank(synth_dir, tmp_path):
    """Rank 1 cannot write its part of checkpoint 20: rank 0 must not wait in the next collective for
    gloo's 30-minute timeout (under Ray Train nothing else would end it), it raises too."""
    run = tmp_path / "run"
    result = torchrun(spec(synth_dir, run), tmp_path, name="enospc",
                      env={"IAK_DIST_FAULT": "save_state:20:1", "IAK_DIST_FAULT_KIND": "enospc"})
    assert result.returncode != 0
    assert "another rank failed to write its part of the checkpoint" in result.stderr, result.stderr[-3000:]
    assert "No space left on device" in result.stderr
    ckpts = run / "checkpoints" / "pretrain"
    assert (ckpts / "step_00000010" / "COMPLETE").is_file() and not (ckpts / "step_00000020").exists()
