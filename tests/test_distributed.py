"""Two real ranks on gloo (torchrun) against a single-process reference."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

WORKER = Path(__file__).parent / "dist_worker.py"
# SGD on the tables: its update is linear in the gradient, so 1 and 2 ranks agree to float noise.
# (Adagrad divides by the accumulated gradient and amplifies that noise on rare rows to ~1e-3; row-wise
# Adagrad keeps one accumulator per row *per column shard*, which differs from whole tables by design.)
COMMON = [
    "model.tower=[32, 16]", "model.embedding_dim=16", "pretrain.steps=25", "pretrain.lr_dense=0.01",
    "pretrain.lr_sparse=1.0", "distributed.data_split=batch_slices", "distributed.sharding.sparse_optimizer=sgd",
]
SHARDING_TYPES = ["data_parallel", "table_wise", "column_wise", "table_column_wise"]
ZERO_STAGES = [1, 2, 3]
# Float summation order differs between 1 and 2 ranks; Adam and Adagrad divide by the gradient's
# magnitude, which amplifies that noise for parameters (rare rows, biases) with near-zero gradients.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def plan_for(kind):
    return [f"distributed.sharding.plan={{user_id: {{sharding_type: {kind}}}, item_id: {{sharding_type: {kind}}}, "
            f"tags: {{sharding_type: {kind}}}}}"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(spec, tmp_path, env=None, name="spec", nproc=2):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(WORKER), str(path)]
    import os

    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})


TEXT_OVERRIDES = COMMON + [
    "data.source=parquet", "model.item_tower=text",
    "distributed.sharding.plan={item_text: {sharding_type: column_wise}, item_id: {sharding_type: table_wise}}"]
"""The item text as a column-wise sharded table: each rank holds some columns of every row."""


@pytest.fixture(scope="module")
def text_synth_dir(tmp_path_factory, synth_dir):
    """The synthetic folder with item_text.parquet: random vectors for its items in row groups of 50, and
    the vectors, keyed by item ID, for the test to compare the text table with."""
    import shutil

    import numpy as np
    from text_files import fake_item_text

    out = tmp_path_factory.mktemp("synth_text") / "data"
    shutil.copytree(synth_dir, out)
    items = np.unique(np.concatenate([pq.read_table(path, columns=["item_id"]).column(0).to_numpy()
                                      for path in sorted(out.glob("*.parquet"))]))
    vectors = np.random.default_rng(3).normal(size=(len(items), 384)).astype(np.float32)
    fake_item_text(out, items, vectors, row_group_size=50)
    return out, items, vectors


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, synth_dir, backbone_dir, text_synth_dir):
    """One torchrun launch running every 2-rank scenario (start-up is the expensive part)."""
    root = tmp_path_factory.mktemp("two_ranks")
    scenarios = []
    for kind in SHARDING_TYPES:
        scenarios.append({"kind": "pretrain", "name": f"{kind}-zero0", "data": str(synth_dir),
                          "out": str(root / f"{kind}-zero0"),
                          "overrides": COMMON + ["pretrain.batch_size=64"] + plan_for(kind)})
    for stage in ZERO_STAGES:
        scenarios.append({"kind": "pretrain", "name": f"table_wise-zero{stage}", "data": str(synth_dir),
                          "out": str(root / f"table_wise-zero{stage}"),
                          "overrides": COMMON + ["pretrain.batch_size=64", f"distributed.zero.stage={stage}"]
                          + plan_for("table_wise")})
    for kind in ("table_wise", "column_wise"):
        scenarios.append({"kind": "frozen_finetune", "data": str(synth_dir), "backbone": str(backbone_dir),
                          "out": str(root / f"frozen-{kind}"), "overrides": plan_for(kind)})
    scenarios.append({"kind": "pretrain", "name": "item-text", "data": str(text_synth_dir[0]),
                      "out": str(root / "item-text"), "overrides": TEXT_OVERRIDES + ["pretrain.batch_size=64"]})
    scenarios.append({"kind": "fill_failure", "data": str(synth_dir), "out": str(root / "fill-failure"),
                      "overrides": TEXT_OVERRIDES})
    result = torchrun({"scenarios": scenarios}, root)
    assert result.returncode == 0, result.stderr[-4000:]
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synth_dir, ctx):
    """The same training in this single process with the 2-rank global batch (2 x 64), per sharding type."""
    from iak_dist.config import load_config
    from iak_dist.phases.pretrain import pretrain

    runs = {}

    def run(kind):
        if kind not in runs:
            out = tmp_path_factory.mktemp(f"one_rank_{kind}")
            cfg = load_config(None, COMMON + ["pretrain.batch_size=128"] + plan_for(kind))
            pretrain(synth_dir, cfg.model, cfg.pretrain, cfg.distributed, 0, out, ctx, show_progress=False)
            runs[kind] = out
        return runs[kind]

    return run


def assert_same_backbone(a_dir, b_dir):
    from iak_dist.distributed.checkpoint import load_backbone_weights

    a, b = load_backbone_weights(a_dir), load_backbone_weights(b_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **TOLERANCE, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("name", [f"{k}-zero0" for k in SHARDING_TYPES] + [f"table_wise-zero{s}" for s in ZERO_STAGES])
def test_two_ranks_train_like_one(name, two_rank_runs, reference, synth_dir, ctx):
    from iak_dist.phases.evaluate import evaluate

    ref_dir = reference(name.rsplit("-", 1)[0])
    assert_same_backbone(two_rank_runs / name / "backbone", ref_dir / "backbone")
    got = evaluate(synth_dir, two_rank_runs / name / "backbone", None, ctx)["overall"]
    want = evaluate(synth_dir, ref_dir / "backbone", None, ctx)["overall"]
    for metric in ("ctr_auc", "ctcvr_auc", "logloss"):
        assert got[metric] == pytest.approx(want[metric], abs=1e-4), metric
    plan = (two_rank_runs / name / "backbone" / "plan.txt").read_text()
    assert name.rsplit("-", 1)[0] in plan


@pytest.mark.parametrize("kind", ["table_wise", "column_wise"])
def test_frozen_tables_are_bitwise_unchanged_on_every_rank(kind, two_rank_runs):
    for rank in range(2):
        result = json.loads((two_rank_runs / f"frozen-{kind}" / f"result_rank{rank}.json").read_text())
        assert result["unchanged"], f"rank {rank} changed a frozen table shard"
        assert result["adapter_moved"] > 0
        assert result["fused_optimizer_state"] == {}, "frozen tables must hold no sparse optimizer state"
    sizes = [json.loads((two_rank_runs / f"frozen-{kind}" / f"result_rank{r}.json").read_text())["local_elements"]
             for r in range(2)]
    assert all(s > 0 for s in sizes)


def test_item_text_fills_and_keeps_its_sharded_table_on_two_ranks_as_on_one(two_rank_runs, text_synth_dir, ctx,
                                                                            tmp_path):
    """model.item_tower=text on 2 ranks, the text table split by columns: each rank reads its row groups of
    item_text.parquet and sends each vector to the ranks holding its slot; after training, the table holds
    each slot's mean text (it never trains) and the backbone is the one a single process trains."""
    import numpy as np
    from text_files import slot_texts

    from iak_dist.config import load_config
    from iak_dist.distributed.checkpoint import backbone_weights
    from iak_dist.phases.pretrain import pretrain

    data, items, vectors = text_synth_dir
    assert pq.ParquetFile(data / "item_text.parquet").num_row_groups > 2
    got = two_rank_runs / "item-text" / "backbone"
    plan = (got / "plan.txt").read_text()
    assert "t_item_text" in plan and "column_wise" in plan
    table = backbone_weights(got).full("embeddings.embedding_bags.t_item_text.weight")
    slots, texts = slot_texts(items, vectors, table.shape[0])
    np.testing.assert_allclose(table[slots].numpy(), texts, rtol=1e-5, atol=1e-6)
    assert table.abs().sum(1).count_nonzero() == len(slots)  # zeros where no item is
    cfg = load_config(None, TEXT_OVERRIDES + ["pretrain.batch_size=128"])
    pretrain(data, cfg.model, cfg.pretrain, cfg.distributed, 0, tmp_path, ctx, show_progress=False)
    assert_same_backbone(got, tmp_path / "backbone")


def test_a_read_failure_while_filling_a_table_raises_on_every_rank(two_rank_runs):
    """Rank 1's item text fails to read mid-way: rank 1 raises its own error, rank 0 a one-line error naming
    it, and neither waits in the exchange (the torchrun launch ended)."""
    got = [json.loads((two_rank_runs / "fill-failure" / f"result_rank{r}.json").read_text()) for r in range(2)]
    assert got[1] == {"raised": "OSError", "message": "item_text.parquet: a damaged row group"}
    assert got[0]["raised"] == "UserError" and "filling t_item_text: rank 1" in got[0]["message"], got[0]
    assert "a damaged row group" in got[0]["message"]


def test_whole_pipeline_under_torchrun_on_two_ranks(tmp_path, synth_dir):
    import os

    import yaml

    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "data": {"source": "parquet", "dir": str(synth_dir)},
        "model": {"embedding_dim": 8, "tower": [32, 16]}, "pretrain": {"steps": 20, "batch_size": 128},
        "finetune": {"strategies": ["none", "lora", "iak"], "optim": {"steps": 10, "batch_size": 128}},
    }))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "iak_dist.cli", "pipeline", "run", str(config)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 0, errors or result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert sorted(report["aggregate"]) == ["iak", "lora", "none"]
    assert "over 2 rank(s)" in result.stderr
    assert result.stderr.count("seed 0: pre-training on all domains pooled") == 1  # rank 0 logs alone
    rows = pq.read_metadata(synth_dir / "test.parquet").num_rows
    assert all(report["aggregate"][s]["overall"]["rows"]["mean"] == rows for s in ("none", "lora", "iak"))


def test_step_count_reduction_uses_the_process_groups_device(monkeypatch):
    """NCCL rejects CPU tensors: the min-steps all-reduce puts its tensor on the backend's device."""
    import iak_dist.phases.pretrain as pretrain_module
    from iak_dist.config import OptimConfig

    dist = pretrain_module.dist
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert pretrain_module.collective_device() == torch.device("cuda", 1)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    assert pretrain_module.collective_device() == torch.device("cpu")

    seen = []

    class Reduced(Exception):
        pass

    def all_reduce(tensor, op=None):
        seen.append(tensor.device)
        raise Reduced  # a meta tensor has no value to read back

    monkeypatch.setattr(pretrain_module, "collective_device", lambda: torch.device("meta"))
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with pytest.raises(Reduced):
        pretrain_module.steps_for(OptimConfig(steps=7), 100)
    assert seen == [torch.device("meta")]
