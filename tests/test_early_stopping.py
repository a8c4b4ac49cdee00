"""Validation passes and early stopping: the decision rule, the restored weights, 2 ranks agreeing."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from iak_dist.phases.validation import StoppingRecord

# a pass every 0.25 epoch (about 16 steps), patience 3, a learning rate that over-fits soon
VALIDATED = ["model.tower=[32, 16]", "model.embedding_dim=8", "pretrain.steps=160", "pretrain.batch_size=64",
             "pretrain.lr_dense=0.03", "pretrain.validate_every=0.25", "pretrain.patience=3"]


def test_patience_counts_passes_without_improvement():
    record = StoppingRecord(patience=2)
    decisions = [record.add(step, loss) for step, loss in [(10, 1.0), (20, 0.8), (30, 0.8), (40, 0.7), (50, 0.9)]]
    assert decisions == [True, True, False, True, False]  # equal is no improvement
    assert (record.best_step, record.best_value, record.stopped) == (40, 0.7, False)
    assert not record.add(60, math.nan)  # a NaN pass is never the best
    assert record.stopped and record.bad_passes == 2
    assert StoppingRecord(patience=0).add(1, 1.0) and not StoppingRecord(patience=0).stopped  # 0: never early


def test_early_stopping_restores_the_best_pass_bitwise(tmp_path, synth_dir, ctx, capsys):
    """The exported backbone of a run that stopped early is the backbone of a run of best_step steps;
    a re-run trains nothing and reports the same steps and loss."""
    from iak_dist.config import load_config
    from iak_dist.distributed.checkpoint import load_backbone_weights
    from iak_dist.phases.pretrain import pretrain

    cfg = load_config(None, VALIDATED)
    summary = pretrain(synth_dir, cfg.model, cfg.pretrain, cfg.distributed, 0, tmp_path / "validated", ctx,
                       show_progress=False)
    best, steps = int(summary["valid/best_step"]), int(summary["train/steps"])
    every = int(summary["valid/passes"][0][0])  # 0.25 epoch
    assert every > 1 and [s for s, _ in summary["valid/passes"]] == list(range(every, steps + 1, every))
    assert summary["valid/best"] == min(loss for _, loss in summary["valid/passes"])
    assert summary["train/stopped_early"] == 1.0 and steps == best + 3 * every < 160  # patience 3 passes
    on_disk = json.loads((tmp_path / "validated" / "backbone" / "train_summary.json").read_text())
    assert on_disk["valid/best_step"] == best
    capsys.readouterr()
    again = pretrain(synth_dir, cfg.model, cfg.pretrain, cfg.distributed, 0, tmp_path / "validated", ctx,
                     show_progress=False)
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("[pretrain]")] == [
        f"[pretrain] sharding plan over 1 rank(s): the same as before, in {tmp_path / 'sharding_plan.txt'}",
        f"[pretrain] stopped early at step {steps} (best {best}): nothing left to train"]
    assert again["train/steps"] == steps and again["train/loss_ema"] == summary["train/loss_ema"]
    assert again["valid/passes"] == summary["valid/passes"] and again["train/stopped_early"] == 1.0

    plain = load_config(None, [*VALIDATED[:-2], f"pretrain.steps={best}"])
    pretrain(synth_dir, plain.model, plain.pretrain, plain.distributed, 0, tmp_path / "plain", ctx, show_progress=False)
    restored = load_backbone_weights(tmp_path / "validated" / "backbone")
    reference = load_backbone_weights(tmp_path / "plain" / "backbone")
    assert restored.keys() == reference.keys()
    assert all(torch.equal(restored[k], reference[k]) for k in reference)


@pytest.fixture(scope="module")
def two_rank_validated(tmp_path_factory, synth_dir):
    from test_distributed import torchrun

    root = tmp_path_factory.mktemp("valid_two_ranks")
    by_loss = [*VALIDATED, "pretrain.steps=80", "pretrain.patience=0"]
    by_auc = [*by_loss, "pretrain.early_stopping_metric=ctr_auc", "pretrain.calibrate=true"]
    spec = {"scenarios": [{"kind": "pretrain", "data": str(synth_dir), "out": str(root / name), "overrides": overrides}
                          for name, overrides in (("run", by_loss), ("auc", by_auc))]}
    result = torchrun(spec, root)
    assert result.returncode == 0, result.stderr[-4000:]
    return {name: (json.loads((root / name / "backbone" / "train_summary.json").read_text()), root / name / "backbone")
            for name in ("run", "auc")}


def test_two_ranks_sum_the_loss_and_restore_the_best(two_rank_validated, tmp_path, synth_dir, ctx):
    """The 2-rank best loss is the 1-process validation loss of the backbone it exported (the restored
    best weights, every valid row counted once)."""
    from iak_dist.data.batch import arrow_to_batch
    from iak_dist.data.parquet import ParquetReader
    from iak_dist.data.schema import Schema
    from iak_dist.data.source import Split
    from iak_dist.phases.common import build_from_backbone
    from iak_dist.phases.validation import validation_loss

    summary, backbone = two_rank_validated["run"]
    losses = dict((int(s), loss) for s, loss in summary["valid/passes"])
    every = min(losses)
    assert sorted(losses) == [*range(every, 80, every), 80] and summary["train/stopped_early"] == 0.0
    assert losses[int(summary["valid/best_step"])] == summary["valid/best"] == min(losses.values())
    schema = Schema.load(synth_dir / "schema.yaml")
    split = Split.open(synth_dir, "valid", schema)
    sharded, _ = build_from_backbone(backbone, None, ctx, train_embeddings=False)
    loss = validation_loss(sharded.model, ParquetReader(split, schema, 4096), ctx,
                           lambda: arrow_to_batch(split.read(split.parts[0]).slice(0, 1), schema))
    assert loss == pytest.approx(summary["valid/best"], rel=1e-6)


def test_finetune_on_one_domain_reads_and_validates_only_it(tmp_path, synth_dir, backbone_dir, small_cfg, ctx):
    """`only_domain`: that domain's rows alone are trained on and validated; the best pass is what is saved."""
    from dataclasses import replace

    import numpy as np

    from iak_dist.data.batch import arrow_to_batch
    from iak_dist.data.parquet import ParquetReader
    from iak_dist.data.schema import Schema
    from iak_dist.data.source import Split
    from iak_dist.distributed.checkpoint import read_backbone_meta
    from iak_dist.errors import UserError
    from iak_dist.model.strategies.saving import load_adapter
    from iak_dist.phases.common import build_from_backbone
    from iak_dist.phases.finetune import finetune
    from iak_dist.phases.validation import validation_loss

    schema = Schema.load(synth_dir / "schema.yaml")
    name = schema.domains[1]
    optim = replace(small_cfg.finetune.optim, steps=12, validate_every=0.1, lr_dense=0.05)
    cfg = replace(small_cfg.finetune, optim=optim)
    unknown = rf"^finetune split at .*: domain 'nowhere' is not in the schema; known: {', '.join(schema.domains)}$"
    with pytest.raises(UserError, match=unknown):
        finetune(synth_dir, backbone_dir, "lora", cfg, 0, tmp_path / "bad", ctx, show_progress=False,
                 only_domain="nowhere")
    summary = finetune(synth_dir, backbone_dir, "lora", cfg, 0, tmp_path / "lora", ctx, show_progress=False,
                       only_domain=name)
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert np.flatnonzero(saved["rows_per_domain"]).tolist() == [1]
    assert summary["valid/passes"][-1][0] == 12 and len(summary["valid/passes"]) >= 3

    split = Split.open(synth_dir, "valid", schema)
    adapter, override, _ = load_adapter(tmp_path / "lora", read_backbone_meta(backbone_dir))
    sharded, _ = build_from_backbone(backbone_dir, adapter, ctx, train_embeddings=False, backbone_override=override)

    def loss(domain):
        return validation_loss(sharded.model, ParquetReader(split, schema, 4096), ctx,
                               lambda: arrow_to_batch(split.read(split.parts[0]).slice(0, 1), schema), domain)

    assert loss(1) == pytest.approx(summary["valid/best"], rel=1e-6)  # the saved adapter: the best pass's
    assert loss(None) != pytest.approx(loss(1), rel=1e-3)  # ... on domain 1's rows alone


def test_resume_keeps_the_best_so_far(tmp_path, synth_dir, ctx):
    """A phase resumed from its checkpoint goes on with the passes and the best pass of the first run."""
    from iak_dist.config import load_config
    from iak_dist.phases.pretrain import pretrain

    def run(steps: int) -> dict:
        cfg = load_config(None, [*VALIDATED[:-1], f"pretrain.steps={steps}", "pretrain.patience=0"])
        return pretrain(synth_dir, cfg.model, cfg.pretrain, cfg.distributed, 0, tmp_path, ctx, show_progress=False)

    before, after = run(40), run(60)
    assert after["valid/passes"][:len(before["valid/passes"])] == before["valid/passes"]
    assert after["valid/passes"][-1][0] == 60 and len(after["valid/passes"]) > len(before["valid/passes"])
    assert after["valid/best"] == min(loss for _, loss in after["valid/passes"])


def test_a_domain_without_valid_rows_trains_to_the_end(tmp_path, synth_dir, backbone_dir, small_cfg, ctx, capsys):
    """`only_domain` with fine-tune rows but no valid rows: no pass counts (patience 1 would stop at the
    first one), every step is trained, one line says why; a NaN loss (diverged) still counts as bad."""
    from dataclasses import replace

    import pyarrow.parquet as pq

    from iak_dist.data.batch import domain_indices
    from iak_dist.data.schema import Schema
    from iak_dist.phases.finetune import finetune

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    schema = Schema.load(data / "schema.yaml")
    valid = pq.read_table(data / "valid.parquet")
    pq.write_table(valid.filter(domain_indices(valid.column(schema.domain), schema.domains) != 1),
                   data / "valid.parquet", row_group_size=1000)

    optim = replace(small_cfg.finetune.optim, steps=12, validate_every=0.1, patience=1)
    summary = finetune(data, backbone_dir, "lora", replace(small_cfg.finetune, optim=optim), 0, tmp_path / "lora",
                       ctx, show_progress=False, only_domain=schema.domains[1])
    assert summary["train/steps"] == 12 and summary["train/stopped_early"] == 0.0
    assert summary["valid/passes"] == [] and summary["valid/best_step"] == -1.0
    lines = [line for line in capsys.readouterr().err.splitlines() if "no valid rows" in line]
    assert lines == [f"[valid] domain {schema.domains[1]!r} has no valid rows: no validation passes, "
                     f"so no early stopping"]
    record = StoppingRecord(patience=1)
    assert record.add(10, 1.0) and not record.add(20, math.nan) and record.stopped


def test_the_best_pass_is_restored_by_its_record_not_by_step_order(tmp_path, synth_dir, ctx):
    """After a resume that renumbered the steps, a best pass at a lower step than the recorded best is
    the one restored (steps order no folders); a missing best checkpoint is an error, not the final weights."""
    from iak_dist.config import load_config
    from iak_dist.data.schema import Schema
    from iak_dist.distributed.checkpoint import plain_state_dict
    from iak_dist.errors import UserError
    from iak_dist.phases.pretrain import build_pretrain, steps_for
    from iak_dist.phases.validation import EarlyStopping

    cfg = load_config(None, VALIDATED)
    schema = Schema.load(synth_dir / "schema.yaml")
    sharded, dense = build_pretrain(schema, cfg.model, cfg.pretrain, cfg.distributed, 0, ctx)

    def stopping() -> EarlyStopping:
        return EarlyStopping(synth_dir, schema, cfg.pretrain, 1000, ctx, tmp_path, sharded.model, dense,
                             sharded.data_parallel_optimizer, steps_for)

    def perturb() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for p in dense.container.parameters():
                p.add_(0.25)
        return {k: v.clone() for k, v in plain_state_dict(sharded.model, prefix="backbone.").items()}

    first = stopping()
    first.load_state_dict(None)
    perturb()
    assert not first.validate(50) and first.record.best_step == 50  # the first pass is the best so far
    state = first.state_dict() | {"best_value": 1e9}  # a record whose best pass (step 50) was poor
    rerun = stopping()  # e.g. at another world size: steps renumbered lower
    rerun.load_state_dict(state)
    at_30 = perturb()
    rerun.validate(30)
    assert rerun.record.best_step == 30
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["pass_0000", "pass_0001"]  # 0: the record's
    perturb()  # trained on
    rerun.restore_best(print)
    restored = plain_state_dict(sharded.model, prefix="backbone.")
    assert all(torch.equal(restored[k], at_30[k]) for k in at_30)

    rerun.state_dict()  # a regular checkpoint names pass 1: pass 0 goes at the next best
    rerun.record.best_value = 1e9
    rerun.validate(40)
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["pass_0001", "pass_0002"]
    shutil.rmtree(tmp_path / "best" / "pass_0002")
    with pytest.raises(UserError, match=rf"^{tmp_path / 'best' / 'pass_0002'}: the best validation pass \(step 40\) "
                                        rf"has no checkpoint there; move {tmp_path} aside to train this phase again$"):
        rerun.restore_best(print)

    # a record whose passes read other rows (before pre-training left the cold items' valid rows out)
    cold = EarlyStopping(synth_dir, schema, cfg.pretrain, 1000, ctx, tmp_path, sharded.model, dense,
                         sharded.data_parallel_optimizer, steps_for, skip_slots=torch.tensor([3, 5, 8]).numpy())
    with pytest.raises(UserError, match=rf"^{tmp_path}: the checkpoint's validation passes left out the valid rows "
                                        rf"of 0 item slots, this run's leave out 3 \(data.cold_items\); move "):
        cold.load_state_dict({k: v for k, v in state.items() if k != "skipped_items"})


def test_two_ranks_stop_on_the_auc_and_calibrate_the_export(two_rank_validated, synth_dir, ctx):
    """`early_stopping_metric: ctr_auc` on 2 ranks keeps the pass of the highest valid CTR-AUC, which is
    `evaluate`'s (1 process) valid CTR-AUC of the exported backbone; `calibrate` fitted the heads on every
    valid row once: the export's 1-process valid loss is the fit's, below the uncalibrated one."""
    from iak_dist.data.batch import arrow_to_batch
    from iak_dist.data.parquet import ParquetReader
    from iak_dist.data.schema import Schema
    from iak_dist.data.source import Split
    from iak_dist.phases.common import build_from_backbone
    from iak_dist.phases.evaluate import evaluate
    from iak_dist.phases.validation import validation_loss

    summary, backbone = two_rank_validated["auc"]
    aucs = dict((int(s), auc) for s, auc in summary["valid/passes"])
    assert summary["valid/metric"] == "ctr_auc" and summary["valid/best"] == max(aucs.values())
    assert aucs[int(summary["valid/best_step"])] == summary["valid/best"]
    valid_auc = evaluate(synth_dir, backbone, None, ctx, split="valid")["overall"]["ctr_auc"]
    assert valid_auc == pytest.approx(summary["valid/best"], abs=1e-4)  # a positive scale keeps the order

    schema = Schema.load(synth_dir / "schema.yaml")
    split = Split.open(synth_dir, "valid", schema)
    sharded, _ = build_from_backbone(backbone, None, ctx, train_embeddings=False)
    loss = validation_loss(sharded.model, ParquetReader(split, schema, 4096), ctx,
                           lambda: arrow_to_batch(split.read(split.parts[0]).slice(0, 1), schema))
    assert summary["calibration/ctr_scale"] > 0
    assert loss == pytest.approx(summary["calibration/valid_loss_after"], rel=1e-5)
    assert summary["calibration/valid_loss_after"] < summary["calibration/valid_loss_before"]


def test_held_out_domains_valid_rows_steer_no_pass(ctx):
    """`finetune.hold_out_domains`: their valid rows count in neither the loss nor the AUC of a pass."""
    import torch

    from iak_dist.data.prefix_cache import PrefixBatch
    from iak_dist.data.schema import Schema, SparseFeature
    from iak_dist.model.backbone import ModelOutput
    from iak_dist.phases.step import esmm_loss_per_row
    from iak_dist.phases.validation import ValidationInput, ctr_auc_over, loss_over

    class Logits(torch.nn.Module):
        def forward(self, batch):
            return ModelOutput(batch.prefix[:, 0], batch.prefix[:, 1], torch.zeros(()))

    gen = torch.Generator().manual_seed(0)
    batches = [PrefixBatch(torch.randn(64, 2, generator=gen), (torch.rand(64, generator=gen) < 0.4).float(),
                           torch.zeros(64), torch.randint(0, 3, (64,), generator=gen), torch.arange(64))
               for _ in range(3)]
    source = ValidationInput(lambda: ((b, True) for b in batches), Logits())
    kept = [(b, b.domain != 1) for b in batches]
    per_row = torch.cat([esmm_loss_per_row(Logits()(b), b)[mask] for b, mask in kept]).double()
    assert loss_over(source, ctx, held_out=[1]) == pytest.approx(float(per_row.mean()), rel=1e-12)
    assert loss_over(source, ctx) != pytest.approx(float(per_row.mean()), rel=1e-6)
    schema = Schema(sparse=[SparseFeature("user_id", 8)], domains=["d0", "d1", "d2"])
    scores = torch.cat([torch.sigmoid(b.prefix[mask, 0]) for b, mask in kept]).numpy()
    clicks = torch.cat([b.click[mask] for b, mask in kept]).numpy()
    pos, neg = scores[clicks == 1], scores[clicks == 0]
    by_hand = float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
                    / (len(pos) * len(neg)))
    assert ctr_auc_over(source, ctx, schema, held_out=[1]) == pytest.approx(by_hand, abs=1e-6)
    assert ctr_auc_over(source, ctx, schema) != pytest.approx(by_hand, abs=1e-6)  # the held-out rows move it
