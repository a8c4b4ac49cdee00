"""GPSD-style generative pre-training: the loss, the stage, the transfer (exact, frozen bit for bit), errors.

Also the worker of its 2-rank test: `torchrun --nproc_per_node=2 tests/test_generative.py SPEC.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest

from iak_dist.errors import UserError

LENGTH = 5
ITEMS = "embeddings.embedding_bags.t_item_id.weight"
USERS = "embeddings.embedding_bags.t_user_id.weight"
SMALL = ["model.embedding_dim=8", "model.tower=[32, 16]", "model.sequence_encoder=transformer",
         "pretrain.batch_size=256", "pretrain.steps=12", "pretrain.lr_schedule=linear", "pretrain.warmup_steps=3",
         "generative.optim.batch_size=256", "generative.optim.steps=60", "generative.optim.lr_dense=0.003",
         "generative.optim.lr_sparse=0.1"]


def config(*overrides: str):
    from iak_dist.config import load_config

    # history first: each --set is validated as it is applied, and generative needs it
    return load_config(None, [f"data.history_length={LENGTH}", "pretrain.objective=generative", *SMALL, *overrides])


@pytest.fixture(scope="module")
def history_data(tmp_path_factory):
    """MovieLens-100K with a history of `LENGTH` items per impression (prepared in ~7 s)."""
    from iak_dist.config import DataConfig
    from iak_dist.data.prepare import prepare

    return prepare(DataConfig(history_length=LENGTH, dir=str(tmp_path_factory.mktemp("ml") / "data")))


def test_the_sampled_softmax_is_its_closed_form_with_the_positives_duplicates_left_out():
    import torch

    from iak_dist.phases.pretrain_generative import sampled_softmax_loss

    states = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    targets = torch.tensor([[0.5, 0.0], [0.0, 1.0], [0.5, 0.0]])  # rows 0 and 2 hold the same item
    same = torch.tensor([[True, False, True], [False, True, False], [True, False, True]])
    expected = (-math.log(math.exp(0.5) / (math.exp(0.5) + 1.0))  # row 0: its duplicate (row 2) is no negative
                - math.log(math.exp(2.0) / (1.0 + math.exp(2.0) + 1.0))  # row 1: two negatives of logit 0
                - math.log(math.exp(0.5) / (math.exp(1.0) + math.exp(0.5)))) / 3  # row 2: row 0 left out
    assert sampled_softmax_loss(states, targets, same).item() == pytest.approx(expected, rel=1e-6)
    empty = torch.zeros(0, 2, requires_grad=True)
    loss = sampled_softmax_loss(empty, empty, torch.zeros(0, 0, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad


def test_the_stage_learns_is_reused_retrained_on_a_new_config_and_refuses_replaced_weights(history_data, ctx,
                                                                                           tmp_path):
    from iak_dist.phases.pretrain_generative import RECORD, pretrain_generative

    cfg = config()
    out = tmp_path / "generative"
    weights, summary = pretrain_generative(history_data, cfg.model, cfg.generative, cfg.distributed, 0, out, ctx,
                                           show_progress=False)
    losses = json.loads((out / RECORD).read_text())["losses"]
    assert len(losses) == 60 and sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.15
    assert summary["generative/steps"] == 60.0 and summary["generative/seconds"] > 0
    stamp = (weights / "backbone.json").stat().st_mtime_ns

    # the same stage settings (another transfer): reused as it is
    again, summary_again = pretrain_generative(history_data, cfg.model, dataclasses.replace(
        cfg.generative, transfer="items+encoder", freeze_transferred=False), cfg.distributed, 0, out, ctx, False)
    assert again == weights and summary_again == summary and (weights / "backbone.json").stat().st_mtime_ns == stamp

    # another loop: trained again
    fewer = dataclasses.replace(cfg.generative, optim=dataclasses.replace(cfg.generative.optim, steps=5))
    _, retrained = pretrain_generative(history_data, cfg.model, fewer, cfg.distributed, 0, out, ctx, False)
    assert retrained["generative/steps"] == 5.0

    # the same settings on other pre-train data (another fingerprint): trained again, not reused
    import shutil

    import pyarrow.parquet as pq

    other = tmp_path / "other"
    shutil.copytree(history_data, other)
    table = pq.read_table(other / "pretrain.parquet")
    pq.write_table(table.slice(0, table.num_rows - 1000), other / "pretrain.parquet")
    stamp = (weights / "backbone.json").stat().st_mtime_ns
    pretrain_generative(other, cfg.model, fewer, cfg.distributed, 0, out, ctx, False)
    assert (weights / "backbone.json").stat().st_mtime_ns != stamp

    # weights that are not the ones the record names: refused, not silently trained over
    record = json.loads((out / RECORD).read_text())
    (out / RECORD).write_text(json.dumps({**record, "weights": "0123456789abcdef"}))
    with pytest.raises(UserError, match=rf"^{weights}: weights \w+ are not the ones generative.json records "
                                        rf"\(0123456789abcdef\); move {out} aside to train the generative stage "
                                        rf"again$"):
        pretrain_generative(other, cfg.model, fewer, cfg.distributed, 0, out, ctx, False)


def test_a_pretrain_checkpoint_from_another_generative_stage_is_refused(history_data, ctx, tmp_path):
    """Its tables started from the old stage's items (frozen there): resumed onto a new stage, the exported
    item table would silently not be the new stage's."""
    from iak_dist.phases.pretrain import pretrain

    class Interrupted(Exception):
        pass

    def stop(step, path):
        raise Interrupted(step)

    cfg = config("distributed.checkpoint_every=4", "generative.optim.steps=5")
    with pytest.raises(Interrupted):
        pretrain(history_data, cfg.model, cfg.pretrain, cfg.distributed, 0, tmp_path, ctx, show_progress=False,
                 on_checkpoint=stop, generative=cfg.generative)
    for changed in (["generative.optim.steps=6"],  # another stage
                    ["generative.optim.steps=5", "generative.freeze_transferred=false"]):  # the same, not frozen
        other = config("distributed.checkpoint_every=4", *changed)
        with pytest.raises(UserError, match=rf"^{tmp_path}/checkpoints/pretrain/step_00000004: pre-training "
                                            rf"checkpoint started from generative weights \w+ \S+ frozen, this "
                                            rf"run's are \w+ \S+ (frozen|trained); move {tmp_path}/checkpoints/"
                                            rf"pretrain aside"):
            pretrain(history_data, other.model, other.pretrain, other.distributed, 0, tmp_path, ctx,
                     show_progress=False, generative=other.generative)


def test_frozen_transfer_keeps_the_items_and_the_transformer_bit_for_bit_while_the_rest_trains(history_data, ctx,
                                                                                               tmp_path):
    import torch

    from iak_dist.distributed.checkpoint import load_backbone_weights
    from iak_dist.phases.pretrain import pretrain

    # a validation pass: its best checkpoint is loaded back (the fused optimizer's state, frozen tables' included)
    cfg = config("generative.transfer=items+encoder", "generative.freeze_transferred=true",
                 "pretrain.validate_every=0.5")
    summary = pretrain(history_data, cfg.model, cfg.pretrain, cfg.distributed, 0, tmp_path, ctx, show_progress=False,
                       generative=cfg.generative)
    assert summary["generative/steps"] == 60.0
    source = load_backbone_weights(tmp_path / "generative" / "backbone")
    ranker = load_backbone_weights(tmp_path / "backbone")
    encoder = [k for k in source if k.startswith("sequence_encoders.hist_items.")]
    frozen = [ITEMS, *(k for k in encoder if ".query." not in k)]
    assert len(frozen) > 10
    for name in frozen:
        assert torch.equal(source[name], ranker[name]), name
    # the rest trained: another table, and the target attention's query (the stage's is its initial value)
    assert not torch.equal(source[USERS], ranker[USERS])
    assert not torch.equal(source["sequence_encoders.hist_items.query.weight"],
                           ranker["sequence_encoders.hist_items.query.weight"])


def test_a_pooled_ranker_takes_the_items_of_a_stage_that_ran_a_transformer(history_data, ctx, tmp_path):
    import torch

    from iak_dist.distributed.checkpoint import load_backbone_weights, read_backbone_meta
    from iak_dist.phases.pretrain import pretrain

    cfg = config("model.sequence_encoder=pool", "generative.optim.steps=5", "pretrain.steps=4")
    pretrain(history_data, cfg.model, cfg.pretrain, cfg.distributed, 0, tmp_path, ctx, show_progress=False,
             generative=cfg.generative)
    stage = tmp_path / "generative" / "backbone"
    assert read_backbone_meta(stage)["model"]["sequence_encoder"] == "transformer"
    assert read_backbone_meta(tmp_path / "backbone")["model"]["sequence_encoder"] == "pool"
    assert torch.equal(load_backbone_weights(stage)[ITEMS], load_backbone_weights(tmp_path / "backbone")[ITEMS])


def test_a_trainable_transfer_starts_from_the_stages_items_exactly_and_trains_them(history_data, ctx, tmp_path):
    import torch

    from iak_dist.data.schema import Schema
    from iak_dist.distributed.checkpoint import load_backbone_weights, plain_state_dict
    from iak_dist.phases.pretrain import build_pretrain, pretrain
    from iak_dist.phases.pretrain_generative import transfer_from

    cfg = config("generative.freeze_transferred=false", "generative.optim.steps=10")
    pretrain(history_data, cfg.model, cfg.pretrain, cfg.distributed, 0, tmp_path, ctx, show_progress=False,
             generative=cfg.generative)
    source = load_backbone_weights(tmp_path / "generative" / "backbone")
    assert not torch.equal(source[ITEMS], load_backbone_weights(tmp_path / "backbone")[ITEMS])  # trained on

    schema = Schema.load(history_data / "schema.yaml")
    transfer = transfer_from(tmp_path / "generative" / "backbone", schema, cfg.model, cfg.generative)
    assert transfer.tables == ["t_item_id"] and transfer.encoder == [] and transfer.frozen_tables == []
    sharded, _ = build_pretrain(schema, cfg.model, cfg.pretrain, cfg.distributed, 0, ctx, transfer)
    start = plain_state_dict(sharded.model, "backbone.")
    assert torch.equal(start[ITEMS], source[ITEMS])
    # the Transformer was not transferred: the ranker's own initial one (the stage trained its copy)
    positions = "sequence_encoders.hist_items.positions"
    assert not torch.equal(start[positions], source[positions])


def test_bad_generative_configs_are_one_line_errors(history_data, tmp_path):
    from iak_dist.config import load_config
    from iak_dist.data.schema import Schema, SparseFeature
    from iak_dist.phases.pretrain_generative import sequence_feature

    with pytest.raises(UserError, match=r"^pretrain.objective: generative pre-training needs a behaviour sequence; "
                                        r"set data.history_length > 0 \(e.g. 20\)$"):
        load_config(None, ["pretrain.objective=generative"])
    with pytest.raises(UserError, match=r"^generative.transfer: items\+encoder needs model.sequence_encoder: "
                                        r"transformer \(got pool\); or transfer: items$"):
        load_config(None, ["data.history_length=5", "pretrain.objective=generative",
                           "generative.transfer=items+encoder"])
    with pytest.raises(UserError, match=r"^finetune.optim.objective: the objective applies to pre-training only"):
        load_config(None, ["finetune.optim.objective=generative"])
    with pytest.raises(UserError, match=r"key generative.optim.validate_every: the generative stage has no "
                                        r"validation pass; leave it at 0$"):
        load_config(None, ["generative.optim.validate_every=0.5"])
    with pytest.raises(UserError, match=r"key pretrain.objective: 'gen' is not one of 'discriminative', 'generative'"):
        load_config(None, ["pretrain.objective=gen"])
    plain = Schema(sparse=[SparseFeature("user_id", 32), SparseFeature("item_id", 64)], domains=["a"])
    with pytest.raises(UserError, match=r"^pretrain.objective: generative pre-training needs a sequence feature that "
                                        r"shares its item table \(schema in here has none\)"):
        sequence_feature(plain, Path("here"))



def test_stage_weights_of_another_model_are_refused_in_one_line(history_data, ctx, tmp_path):
    from iak_dist.data.schema import Schema
    from iak_dist.phases.pretrain_generative import pretrain_generative, transfer_from

    cfg = config("generative.optim.steps=2")
    weights, _ = pretrain_generative(history_data, cfg.model, cfg.generative, cfg.distributed, 0, tmp_path, ctx, False)
    schema = Schema.load(history_data / "schema.yaml")
    wider = dataclasses.replace(cfg.model, embedding_dim=16)
    with pytest.raises(UserError, match=rf"^{weights}: generative weights of another model or schema \(identity \w+, "
                                        rf"this config's \w+\); move {tmp_path} aside to train the generative "
                                        rf"stage again$"):
        transfer_from(weights, schema, wider, cfg.generative)


def test_two_ranks_on_gloo_train_the_stage_and_keep_a_column_sharded_frozen_table_bit_for_bit(history_data, tmp_path):
    """The stage and the frozen transfer under torchrun, the item table split by columns over the ranks."""
    import socket
    import subprocess

    import torch

    from iak_dist.distributed.checkpoint import load_backbone_weights
    from iak_dist.phases.pretrain_generative import RECORD

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = ["generative.transfer=items+encoder", "generative.optim.batch_size=128", "pretrain.batch_size=128",
                 "distributed.sharding.plan={item_id: {sharding_type: column_wise}}"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"data": str(history_data), "out": str(tmp_path / "run"), "overrides": overrides}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", __file__, str(spec)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    losses = json.loads((tmp_path / "run" / "generative" / RECORD).read_text())["losses"]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.15
    source = load_backbone_weights(tmp_path / "run" / "generative" / "backbone")
    ranker = load_backbone_weights(tmp_path / "run" / "backbone")
    assert torch.equal(source[ITEMS], ranker[ITEMS])
    positions = "sequence_encoders.hist_items.positions"
    assert torch.equal(source[positions], ranker[positions])
    assert not torch.equal(source[USERS], ranker[USERS])
    plan = (tmp_path / "run" / "backbone" / "plan.txt").read_text()
    assert any(line.startswith("t_item_id") and "column_wise" in line for line in plan.splitlines())


def _two_rank_worker(spec_path: str) -> None:
    """One rank of the 2-rank test: generative then discriminative pre-training, as the pipeline runs them."""
    import warnings

    warnings.filterwarnings("ignore")
    from iak_dist.distributed.context import close_distributed, init_distributed
    from iak_dist.phases.pretrain import pretrain

    spec = json.loads(Path(spec_path).read_text())
    cfg = config(*spec["overrides"])
    ctx = init_distributed()
    try:
        pretrain(spec["data"], cfg.model, cfg.pretrain, cfg.distributed, 0, spec["out"], ctx, show_progress=False,
                 generative=cfg.generative)
    finally:
        close_distributed(ctx)


if __name__ == "__main__":
    _two_rank_worker(sys.argv[1])
