"""Zero-shot items and domains (issue 14 item 5): the cold-item split (`data.cold_items`), the cold rows'
metrics in evaluation, the IDP-style ID matcher and domains held out of fine-tuning."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from text_files import fake_item_text

from iak_dist.config import DataConfig
from iak_dist.data.prepare import COLD_ITEMS_FILE, is_prepared
from iak_dist.data.schema import hash_ids
from iak_dist.errors import UserError


def test_cold_rows_leave_the_pretrain_split_only_and_the_other_splits_are_unchanged(small_cfg, tmp_path):
    """write_splits with cold rows: pre-train is the split of before minus exactly those rows (same order);
    fine-tune, valid, test, schema.yaml are byte for byte those of before."""
    from iak_dist.data.splits import choose_cold_items, write_splits
    from iak_dist.data.synth import build_synthetic

    table, schema = build_synthetic(small_cfg.data)
    items = table.column("item_id").to_numpy()
    size = next(f.table_size for f in schema.sparse if f.name == "item_id")
    cold = choose_cold_items(items, 0.3, seed=5, table_size=size)
    assert np.array_equal(cold, choose_cold_items(items, 0.3, seed=5, table_size=size))  # deterministic
    distinct = np.unique(items)
    assert len(cold) >= round(0.3 * len(distinct)) and set(cold) <= set(distinct)
    warm = np.setdiff1d(distinct, cold)
    assert not np.isin(hash_ids(warm, size), hash_ids(cold, size)).any()  # no warm item shares a cold slot
    (plain := tmp_path / "plain").mkdir()
    (with_cold := tmp_path / "cold").mkdir()
    write_splits(table, schema, small_cfg.data, plain, time_column=None)
    stats = write_splits(table, schema, small_cfg.data, with_cold, time_column=None,
                         not_in_pretrain=np.isin(items, cold))
    for name in ("finetune.parquet", "valid.parquet", "test.parquet", "schema.yaml"):
        assert (plain / name).read_bytes() == (with_cold / name).read_bytes(), name
    before = pq.read_table(plain / "pretrain.parquet")
    after = pq.read_table(with_cold / "pretrain.parquet")
    kept = ~np.isin(before.column("item_id").to_numpy(), cold)
    assert after.equals(before.filter(kept)) and stats["pretrain_rows_left_out"] == int((~kept).sum()) > 0
    assert np.isin(pq.read_table(with_cold / "test.parquet").column("item_id").to_numpy(), cold).any()


@pytest.fixture(scope="module")
def cold_movielens(tmp_path_factory):
    """MovieLens-100K prepared with a fifth of the items cold (~10 s)."""
    from iak_dist.data.prepare import prepare

    return prepare(DataConfig(source="movielens-100k", cold_items=0.2), tmp_path_factory.mktemp("ml-cold"))


def test_movielens_cold_items_are_unseen_in_pretraining_and_a_folder_keeps_its_fraction(cold_movielens, tmp_path):
    record = json.loads((cold_movielens / COLD_ITEMS_FILE).read_text())
    cold = np.array(record["item_ids"])
    assert record["fraction"] == 0.2 and record["table_size"] == 16384 and len(cold) >= 0.2 * 1682 * 0.9
    assert record["slots"] == sorted(set(hash_ids(cold, 16384).tolist()))
    split_items = {s: pq.read_table(cold_movielens / f"{s}.parquet", columns=["item_id"]).column(0).to_numpy()
                   for s in ("pretrain", "finetune", "valid", "test")}
    assert not np.isin(split_items["pretrain"], cold).any()
    assert all(np.isin(split_items[s], cold).any() for s in ("finetune", "valid", "test"))
    assert is_prepared(cold_movielens, DataConfig(source="movielens-100k", cold_items=0.2))
    with pytest.raises(UserError, match=rf"^{cold_movielens}: prepared with data.cold_items 0.2, the config asks 0; "):
        is_prepared(cold_movielens, DataConfig(source="movielens-100k"))
    plain = tmp_path / "plain"
    shutil.copytree(cold_movielens, plain)
    (plain / COLD_ITEMS_FILE).unlink()
    with pytest.raises(UserError, match=r"prepared with data.cold_items 0, the config asks 0.1; set data.dir"):
        is_prepared(plain, DataConfig(source="movielens-100k", cold_items=0.1))
    # another seed drew other cold items; an edited record is refused, not trusted
    with pytest.raises(UserError, match=rf"^{cold_movielens}: its cold items were drawn with data.seed 0, the config "
                                        rf"has 1; "):
        is_prepared(cold_movielens, DataConfig(source="movielens-100k", cold_items=0.2, seed=1))
    edited = tmp_path / "edited"
    shutil.copytree(cold_movielens, edited)
    (edited / COLD_ITEMS_FILE).write_text(json.dumps({**record, "slots": record["slots"][1:]}))
    with pytest.raises(UserError, match=rf"^{edited / COLD_ITEMS_FILE}: its slots are not those of its item IDs "
                                        rf"\(edited or damaged\); prepare the folder again$"):
        is_prepared(edited, DataConfig(source="movielens-100k", cold_items=0.2))
    (edited / COLD_ITEMS_FILE).write_text("{")
    with pytest.raises(UserError, match=r"cold_items.json: unreadable \(JSONDecodeError\); prepare the folder again$"):
        is_prepared(edited, DataConfig(source="movielens-100k", cold_items=0.2))


def test_cold_items_refuse_a_history_and_a_fraction_out_of_range():
    assert DataConfig(cold_items=0.1, history_length=5).problems()["cold_items"].startswith(
        "cannot be combined with data.history_length > 0: hist_items shares item_id's table")
    assert DataConfig(cold_items=1.0).problems() == {"cold_items": "a fraction of the items in [0, 1), got 1.0"}
    assert "cold_items" in DataConfig(source="synth", cold_items=0.1).problems()
    assert DataConfig().problems() == {}


def test_cold_item_metrics_equal_a_direct_computation(synth_dir, backbone_dir, ctx, tmp_path, monkeypatch):
    """The `cold items` entry equals metrics computed in memory on the scored rows whose raw item is cold
    (found from the test split's own item_id column, not from the slots the evaluation marks by)."""
    import iak_dist.phases.evaluate as ev
    from iak_dist.data.schema import Schema
    from iak_dist.data.splits import write_cold_items
    from iak_dist.report import COLD_ITEMS, aggregate, markdown

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    schema = Schema.load(data / "schema.yaml")
    size = next(f.table_size for f in schema.sparse if f.name == "item_id")
    test_items = pq.read_table(data / "test.parquet", columns=["item_id"]).column(0).to_numpy()
    pretrain_items = pq.read_table(data / "pretrain.parquet", columns=["item_id"]).column(0).to_numpy()
    cold = np.setdiff1d(np.unique(test_items), pretrain_items)[:40]  # items pre-training never saw ...
    cold = np.union1d(cold, np.unique(test_items)[::7])  # ... and some it did: the marking is what is tested
    cold = np.unique(np.r_[cold, test_items[np.isin(hash_ids(test_items, size), hash_ids(cold, size))]])
    write_cold_items(data, cold, 0.1, 0, size)
    scored: list[np.ndarray] = []
    append = ev.Spill.append
    monkeypatch.setattr(ev.Spill, "append", lambda self, rows: (scored.append(rows.copy())
                                                               if self.path.name == "scored.bin" else None,
                                                               append(self, rows))[1])
    metrics = ev.evaluate(data, backbone_dir, None, ctx, batch_size=500)
    rows = np.concatenate(scored)
    labels = pq.read_table(data / "test.parquet").column(schema.click).to_numpy()
    assert np.array_equal(rows["click"], labels)  # one rank: the spill is the split in file order
    is_cold = np.isin(test_items, cold)
    want = ev.metrics_by_domain({k: rows[k][is_cold] for k in rows.dtype.names}, schema.domains)["overall"]
    got = metrics[COLD_ITEMS]
    assert got["rows"] == is_cold.sum() > 0 and got["rows"] < metrics["overall"]["rows"]
    for name in ("ctr_auc", "ctcvr_auc", "rows", "constant_logloss"):
        assert got[name] == want[name], name
    for name in ("gauc", "logloss"):
        assert got[name] == pytest.approx(want[name], rel=1e-12), name
    agg = aggregate({"none": {0: metrics}}, schema.domains)
    assert list(agg["none"])[-2:] == ["overall", COLD_ITEMS]
    assert f"| {COLD_ITEMS} | {int(is_cold.sum()):,} |" in markdown(agg, {}, "t")


def test_ridge_fit_is_least_squares_in_closed_form():
    """`fit_ridge` against numpy.linalg.lstsq: ridge 0 is least squares with a bias column; ridge > 0 is
    least squares on the centred data stacked over sqrt(ridge) I (the bias is not penalised)."""
    from iak_dist.model.id_matcher import fit_ridge

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(60, 8)) + 0.5, rng.normal(size=(60, 3))
    weight, bias = fit_ridge(x, y, 0.0)
    solution = np.linalg.lstsq(np.c_[x, np.ones(60)], y, rcond=None)[0]
    np.testing.assert_allclose(weight, solution[:8], atol=1e-10)
    np.testing.assert_allclose(bias, solution[8], atol=1e-10)
    weight, bias = fit_ridge(x, y, 2.5)
    xc, yc = x - x.mean(0), y - y.mean(0)
    solution = np.linalg.lstsq(np.r_[xc, np.sqrt(2.5) * np.eye(8)], np.r_[yc, np.zeros((8, 3))], rcond=None)[0]
    np.testing.assert_allclose(weight, solution, atol=1e-10)
    np.testing.assert_allclose(bias, y.mean(0) - x.mean(0) @ solution, atol=1e-10)


def test_matched_backbone_replaces_exactly_the_unseen_items_rows_with_the_ridge_map(synth_dir, backbone_dir,
                                                                                    tmp_path):
    """match_items: the rows of the slots no pre-train row holds become text @ W + b (W, b fitted here again
    from the source's warm rows); every other tensor and row is unchanged; the new folder verifies, under
    a weights hash of its own that records its source."""
    import torch
    from text_files import slot_texts

    from iak_dist.distributed.checkpoint import load_backbone_weights, read_backbone_meta, verify_backbone
    from iak_dist.model.id_matcher import ITEM_TABLE, fit_ridge, match_items

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    seen = np.unique(np.concatenate([pq.read_table(data / f"{s}.parquet", columns=["item_id"]).column(0).to_numpy()
                                     for s in ("pretrain", "test")]))
    items = np.r_[seen[:300], np.arange(10**12, 10**12 + 20)]  # 20 items no split holds
    size = read_backbone_meta(backbone_dir)["layout"]["tensors"][ITEM_TABLE]["shape"][0]
    candidates = np.arange(10**13, 10**13 + 2_000_000)
    slots_of = hash_ids(candidates, size)
    # 10 warm and 10 cold slots that a second item shares (their text averaged), found by hashing
    items = np.r_[items, [candidates[np.flatnonzero(slots_of == s)[0]]
                          for s in hash_ids(np.r_[items[:10], items[300:310]], size)]]
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(items), 384)).astype(np.float32)
    fake_item_text(data, items, vectors, row_group_size=64)  # 6 row groups, streamed
    out = tmp_path / "matched"
    record = match_items(backbone_dir, data, out, ridge=0.5)

    before, after = load_backbone_weights(backbone_dir), load_backbone_weights(out)
    slots, texts = slot_texts(items, vectors, size)
    pretrain = np.unique(hash_ids(pq.read_table(data / "pretrain.parquet", columns=["item_id"]).column(0)
                                  .to_numpy(), size))
    warm = np.isin(slots, pretrain)
    assert record["matched_slots"] == slots[~warm].tolist() and record["warm_slots"] == warm.sum()
    assert len(record["matched_slots"]) >= 20 and len(items) - len(slots) >= 20  # shared slots
    weight, bias = fit_ridge(texts[warm], before[ITEM_TABLE][slots[warm]].double().numpy(), 0.5)
    want = before[ITEM_TABLE].clone()
    want[slots[~warm]] = torch_float(texts[~warm] @ weight + bias)
    untouched = np.setdiff1d(np.arange(size), slots[~warm])
    assert after[ITEM_TABLE][untouched].equal(before[ITEM_TABLE][untouched])
    torch.testing.assert_close(after[ITEM_TABLE], want, rtol=0, atol=1e-6)  # fitted from streamed sums
    residual = ((texts[warm] @ weight + bias - before[ITEM_TABLE][slots[warm]].double().numpy()) ** 2).sum()
    centred = before[ITEM_TABLE][slots[warm]].double().numpy()
    assert record["fit_r2"] == pytest.approx(1 - residual / ((centred - centred.mean(0)) ** 2).sum(), abs=1e-9)
    assert all(after[name].equal(before[name]) for name in before if name != ITEM_TABLE)
    meta = verify_backbone(out)
    assert meta["weights"] != read_backbone_meta(backbone_dir)["weights"]
    assert meta["id_matcher"]["source_weights"] == read_backbone_meta(backbone_dir)["weights"]
    with pytest.raises(UserError, match=rf"^{out}: not empty; give --out a new folder"):
        match_items(backbone_dir, data, out)

    # a backbone pre-trained on another pre-train split (e.g. without cold items): its warm items are not
    # this folder's; refused rather than overwriting trained rows
    import json

    other = tmp_path / "other_backbone"
    shutil.copytree(backbone_dir, other)
    recorded = json.loads((other / "backbone.json").read_text())
    (other / "backbone.json").write_text(json.dumps({**recorded, "pretrain_data": "0123456789abcdef"}))
    with pytest.raises(UserError, match=rf"^{other}: pre-trained on another pre-train split than {data}'s"):
        match_items(other, data, tmp_path / "refused")
    assert read_backbone_meta(backbone_dir)["pretrain_data"]  # recorded at export

    # items that each have a slot of their own: no shared slot to average (the same fit, less those slots)
    alone = np.flatnonzero(np.bincount(hash_ids(items, size), minlength=size)[hash_ids(items, size)] == 1)
    fake_item_text(data, items[alone], vectors[alone])
    single = match_items(backbone_dir, data, tmp_path / "single", ridge=0.5)
    slots1, texts1 = slot_texts(items[alone], vectors[alone], size)
    warm1 = np.isin(slots1, pretrain)
    assert single["matched_slots"] == slots1[~warm1].tolist() and single["warm_slots"] == warm1.sum()
    weight1, bias1 = fit_ridge(texts1[warm1], before[ITEM_TABLE][slots1[warm1]].double().numpy(), 0.5)
    torch.testing.assert_close(load_backbone_weights(tmp_path / "single")[ITEM_TABLE][slots1[~warm1]],
                               torch_float(texts1[~warm1] @ weight1 + bias1), rtol=0, atol=1e-6)
    fake_item_text(data, items, vectors, row_group_size=64)

    # the verb: the same folder again, and its one-line refusal (exit status 2)
    from iak_dist.cli import main

    assert main(["match-items", str(backbone_dir), "--data", str(data), "--out", str(tmp_path / "verb"),
                 "--ridge", "0.5"]) == 0
    assert load_backbone_weights(tmp_path / "verb")[ITEM_TABLE].equal(after[ITEM_TABLE])
    assert main(["match-items", str(backbone_dir), "--data", str(data), "--out", str(out)]) == 2


def torch_float(values: np.ndarray):
    import torch

    return torch.from_numpy(values.astype(np.float32))


def test_held_out_domains_are_never_trained_on_and_reported_as_held_out(synth_dir, backbone_dir, small_cfg, ctx,
                                                                       tmp_path, monkeypatch):
    """`finetune.hold_out_domains`: no batch the fine-tune draws holds a row of the held-out domain, the
    adapter records 0 rows for it, and evaluation marks it held out (scored by untrained adapter weights)."""
    import dataclasses

    from iak_dist.data.domain_streams import DomainStreams
    from iak_dist.phases.evaluate import evaluate
    from iak_dist.phases.finetune import finetune

    drawn: list[np.ndarray] = []
    next_batch = DomainStreams.next_batch
    monkeypatch.setattr(DomainStreams, "next_batch",
                        lambda self: (t := next_batch(self), drawn.append(t.column("domain").to_numpy(False)))[0])
    cfg = dataclasses.replace(small_cfg.finetune, hold_out_domains=["d1"], prefix_cache="off")
    out = tmp_path / "lora"
    finetune(synth_dir, backbone_dir, "lora", cfg, 0, out, ctx, show_progress=False)
    domains = np.concatenate(drawn)
    assert len(drawn) >= cfg.optim.steps and set(domains.tolist()) == {"d0", "d2"}
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    finetune_rows = pq.read_table(synth_dir / "finetune.parquet", columns=["domain"]).column(0).to_numpy(False)
    assert adapter_cfg["rows_per_domain"] == [int((finetune_rows == d).sum()) if d != "d1" else 0
                                              for d in ("d0", "d1", "d2")]
    assert adapter_cfg["hold_out_domains"] == ["d1"]
    metrics = evaluate(synth_dir, backbone_dir, out, ctx, batch_size=500)
    assert metrics["d1"]["held_out"] is True and metrics["d1"]["finetuned"] is False
    assert metrics["d1"]["note"].startswith("held out of fine-tuning (finetune.hold_out_domains): plain backbone")
    assert "held_out" not in metrics["d0"] and metrics["d0"]["finetuned"] is True
    # "fine-tuned domains": the metrics of d0 and d2 together, as on a test split without d1's rows
    from iak_dist.report import TUNED_DOMAINS

    without = tmp_path / "without_d1"
    shutil.copytree(synth_dir, without)
    test = pq.read_table(synth_dir / "test.parquet")
    pq.write_table(test.filter(np.asarray(test.column("domain").to_numpy(False)) != "d1"), without / "test.parquet")
    want = evaluate(without, backbone_dir, out, ctx, batch_size=500)["overall"]
    got = metrics[TUNED_DOMAINS]
    assert got["rows"] == want["rows"] < metrics["overall"]["rows"] and got["ctr_auc"] == want["ctr_auc"]
    assert got["logloss"] == pytest.approx(want["logloss"], rel=1e-6)  # other batches: float32 noise
    # an adapter whose shared weights train does not score an untrained domain as the plain backbone
    from iak_dist.phases.evaluate import finetune_status

    assert finetune_status("moe_adaptor", 0)["note"] == ("no fine-tune rows: scored by the adapter's shared "
                                                         "weights, trained on the other domains")
    assert finetune_status("lora", 0)["note"] == "no fine-tune rows: plain backbone (its adapter weights never trained)"
    with pytest.raises(UserError, match=r"^finetune.hold_out_domains: domain 'x' is not in the schema; known: d0"):
        finetune(synth_dir, backbone_dir, "lora", dataclasses.replace(cfg, hold_out_domains=["x"]), 0,
                 tmp_path / "x", ctx, show_progress=False)


def test_pretraining_choices_leave_the_cold_items_valid_rows_out(synth_dir, backbone_dir, ctx, tmp_path):
    """Pre-training's validation passes (loss and CTR-AUC) and head calibration skip the valid rows of cold
    items: each equals its value on a copy of the folder whose valid split has those rows removed."""
    import functools

    import pyarrow.compute as pc

    from iak_dist.data.parquet import ParquetReader
    from iak_dist.data.schema import Schema
    from iak_dist.data.source import Split
    from iak_dist.data.splits import read_cold_slots, write_cold_items
    from iak_dist.phases.calibration import calibrate_heads
    from iak_dist.phases.common import build_from_backbone
    from iak_dist.phases.evaluate import first_row
    from iak_dist.phases.validation import ctr_auc_over, lookup_input, loss_over

    data, without = tmp_path / "data", tmp_path / "without"
    shutil.copytree(synth_dir, data)
    schema = Schema.load(data / "schema.yaml")
    size = next(f.table_size for f in schema.sparse if f.name == "item_id")
    valid = pq.read_table(data / "valid.parquet")
    items = valid.column("item_id").to_numpy()
    write_cold_items(data, np.unique(items)[::5], 0.2, 0, size)
    slots = read_cold_slots(data, schema)
    shutil.copytree(synth_dir, without)
    cold = np.isin(hash_ids(items, size), slots)
    assert 0 < cold.sum() < len(items)
    pq.write_table(valid.filter(pc.invert(pa_array(cold))), without / "valid.parquet")
    model = build_from_backbone(backbone_dir, None, ctx, train_embeddings=False)[0].model

    def source(folder):
        split = Split.open(folder, "valid", schema)
        return lookup_input(ParquetReader(split, schema, 300, ctx.rank, ctx.world_size), ctx,
                            functools.partial(first_row, split, schema), model)

    assert loss_over(source(data), ctx, skip_slots=slots) == pytest.approx(loss_over(source(without), ctx), rel=1e-12)
    assert loss_over(source(data), ctx) != pytest.approx(loss_over(source(without), ctx), rel=1e-6)
    assert ctr_auc_over(source(data), ctx, schema, skip_slots=slots) == ctr_auc_over(source(without), ctx, schema)
    got = calibrate_heads(model, data, schema, ctx, skip_slots=slots).summary()
    want = calibrate_heads(model, without, schema, ctx).summary()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6), (k, got[k], want[k])  # an iterative fit


def pa_array(values: np.ndarray):
    import pyarrow as pa

    return pa.array(values)


def test_choices_read_the_fine_tuned_domains_where_some_were_held_out(tmp_path):
    """The export's best strategy and a sweep's best point read `TUNED_DOMAINS` where it is there: a held-out
    domain's valid labels choose nothing; without it, "overall" as before."""
    from iak_dist.orchestration.sweep import best_points
    from iak_dist.serving.export import best_by_valid

    def entry(value):
        return {"ctr_auc": {"mean": value, "std": 0.0, "n": 1}}

    held = {"lora": {"overall": entry(0.80), "fine-tuned domains": entry(0.70)},
            "iak": {"overall": entry(0.75), "fine-tuned domains": entry(0.72)}}
    plain = {"lora": {"overall": entry(0.80)}, "iak": {"overall": entry(0.75)}}
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"aggregate_valid": held}))
    assert best_by_valid(report) == "iak"
    report.write_text(json.dumps({"aggregate_valid": plain}))
    assert best_by_valid(report) == "lora"
    assert best_points([("a", held), ("b", {"lora": {"overall": entry(0.6), "fine-tuned domains": entry(0.71)},
                                            "iak": held["iak"]})]) == {"lora": "b", "iak": "a"}
