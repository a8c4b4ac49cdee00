"""Evaluation and report never pass off a missing result as a number: a domain without fine-tune rows is
marked, metrics the schema cannot give (no user column, no conversion label) are `n/a` / null, and
report.json is strict JSON (no bare NaN). Two ranks evaluate to exactly the metrics of one, and the
bucketed metrics (`stream_metrics`) equal the in-memory ones. The constant predictor's LogLoss is the
labels' entropy, shown beside the backbone's; export and sweeps choose by the valid split, never the test.

Run as a script under torchrun, this file is the 2-rank worker of `test_two_ranks_give_exactly_the_metrics_of_one`.
"""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from iak_dist.data.schema import Schema
from iak_dist.phases.evaluate import evaluate, metrics_by_domain
from iak_dist.report import METRICS, write_report


def strict_loads(text: str):
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def table_row(markdown: str, metric: str, domain: str) -> dict[str, str]:
    """`domain`'s row in `metric`'s table, by column name (strategies, `rows`, and `constant` for LogLoss)."""
    section = markdown.split(f"## {metric}\n", 1)[1].split("\n## ", 1)[0]
    lines = section.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    row = next(line for line in lines if line.startswith(f"| {domain} |"))
    return dict(zip(header, (c.strip() for c in row.strip("|").split("|")), strict=True))


def table_cells(markdown: str, metric: str, domain: str) -> list[str]:
    """The strategy cells of `domain`'s row in `metric`'s table."""
    row = table_row(markdown, metric, domain)
    return [v for k, v in row.items() if k not in ("domain", "rows", "constant")]


@pytest.fixture()
def data_copy(tmp_path, synth_dir):
    out = tmp_path / "data"
    shutil.copytree(synth_dir, out)
    return out


def test_domain_without_finetune_rows_is_marked_and_scored_by_the_plain_backbone(
        data_copy, backbone_dir, small_cfg, ctx, tmp_path):
    from iak_dist.phases.finetune import finetune

    schema = Schema.load(data_copy / "schema.yaml")
    absent = schema.domains[-1]
    path = data_copy / "finetune.parquet"
    table = pq.read_table(path)
    pq.write_table(table.filter(pc.not_equal(table.column("domain"), absent)), path)
    adapter_dir = tmp_path / "adapter"
    finetune(data_copy, backbone_dir, "iak", small_cfg.finetune, 0, adapter_dir, ctx, show_progress=False)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["rows_per_domain"][-1] == 0

    tuned = evaluate(data_copy, backbone_dir, adapter_dir, ctx)
    plain = evaluate(data_copy, backbone_dir, None, ctx)
    assert tuned[absent]["finetuned"] is False and tuned[absent]["note"].startswith("no fine-tune rows: plain backbone")
    assert tuned[schema.domains[0]]["finetuned"] is True and tuned[schema.domains[0]]["finetune_rows"] > 0
    assert "finetuned" not in plain[absent]  # no adapter: nothing to mark
    # what the note says is what happened: the never-trained kernel leaves the backbone's scores
    assert tuned[absent]["ctr_auc"] == pytest.approx(plain[absent]["ctr_auc"], abs=1e-12)
    assert tuned[schema.domains[0]]["ctr_auc"] != plain[schema.domains[0]]["ctr_auc"]

    out = tmp_path / "report"
    agg = write_report({"none": {0: plain}, "iak": {0: tuned}}, {}, out, "t", schema.domains)
    assert agg["iak"][absent]["finetuned"] is False and "finetuned" not in agg["iak"][schema.domains[0]]
    md = (out / "report.md").read_text()
    for metric in METRICS:
        none_cell, iak_cell = table_cells(md, metric, absent)
        assert iak_cell.endswith("†") and not none_cell.endswith("†"), (metric, iak_cell)
        assert not table_cells(md, metric, schema.domains[0])[1].endswith("†")
    assert f"† not a fine-tuning result: `iak` on {absent}: no fine-tune rows: plain backbone" in md
    assert strict_loads((out / "report.json").read_text())["aggregate"]["iak"][absent]["finetuned"] is False


def test_schema_without_user_or_conversion_reports_n_a_and_strict_json(data_copy, backbone_dir, ctx, tmp_path):
    schema = Schema.load(data_copy / "schema.yaml")
    schema.user, schema.conversion = None, None
    schema.save(data_copy / "schema.yaml")
    path = data_copy / "test.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["label_conversion"]), path)  # the data has no such label

    metrics = evaluate(data_copy, backbone_dir, None, ctx)
    for domain in ("overall", *schema.domains):
        assert metrics[domain]["gauc"] is None and metrics[domain]["ctcvr_auc"] is None, domain
        assert 0.0 < metrics[domain]["ctr_auc"] < 1.0 and metrics[domain]["logloss"] > 0
    older = {d: {**m, "ctcvr_auc": float("nan"), "gauc": float("nan")} for d, m in metrics.items()}  # NaN era

    out = tmp_path / "report"
    write_report({"none": {0: metrics, 1: older}}, {}, out, "t", schema.domains)
    text = (out / "report.json").read_text()
    report = strict_loads(text)
    overall = report["aggregate"]["none"]["overall"]
    assert overall["gauc"] == {"mean": None, "std": None, "n": 0} and overall["ctcvr_auc"]["mean"] is None
    assert overall["ctr_auc"]["n"] == 2 and report["per_seed"]["none"]["1"]["overall"]["gauc"] is None
    md = (out / "report.md").read_text()
    assert "nan" not in md.lower()
    for domain in ("overall", *schema.domains):
        assert table_cells(md, "gauc", domain) == ["n/a"] and table_cells(md, "ctcvr_auc", domain) == ["n/a"]
        assert " ± " in table_cells(md, "ctr_auc", domain)[0]
    assert "n/a: not available: the schema names no user column" in md
    assert (out / "report.png").stat().st_size > 5000


def fake_results(seeds: int, strategies=("none", "full", "iak"), domains=("d0", "d1")) -> dict:
    """Evaluation metrics of `seeds` seeds: each strategy a bit better than the one before."""
    out = {}
    for i, s in enumerate(strategies):
        out[s] = {seed: {d: {"ctr_auc": 0.70 + 0.01 * i + 0.001 * seed, "ctcvr_auc": 0.65 + 0.01 * i,
                             "gauc": 0.6, "logloss": 0.5, "rows": 100} for d in (*domains, "overall")}
                  for seed in range(seeds)}
    return out


def test_one_seed_reports_scores_without_spread():
    from iak_dist.report import aggregate, markdown

    md = markdown(aggregate(fake_results(1), ["d0", "d1"]), {}, "t")
    assert "±" not in md and md.count("1 seed") == 1, md
    assert table_cells(md, "ctr_auc", "d0") == ["0.7000", "0.7100", "**0.7200**"]
    three = markdown(aggregate(fake_results(3), ["d0", "d1"]), {}, "t")
    assert "Mean ± std over 3 seeds" in three and table_cells(three, "ctr_auc", "d0")[0] == "0.7010 ± 0.0008"


@pytest.mark.parametrize("seeds", [1, 3])
def test_report_figure_legend_titles_and_error_bars(seeds):
    import matplotlib.pyplot as plt

    from iak_dist.report import aggregate, build_figure

    fig = build_figure(aggregate(fake_results(seeds), ["d0", "d1"]), "movielens `zip` **domains**")
    try:
        titles = [fig._suptitle.get_text()] + [ax.get_title() for ax in fig.axes]
        assert titles[0] == "movielens zip domains" and not any("`" in t for t in titles), titles
        assert all(ax.get_legend() is None for ax in fig.axes)  # one legend, outside the axes
        (legend,) = fig.legends
        # `none` is the baseline every bar is measured against: no bar, so no legend entry
        assert [t.get_text() for t in legend.get_texts()] == ["full", "iak"]
        fig.canvas.draw()
        box = legend.get_window_extent()
        assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)
        from matplotlib.container import BarContainer

        bars = [c for ax in fig.axes for c in ax.containers if isinstance(c, BarContainer)]
        assert len(bars) == 4  # 2 strategies x 2 metrics
        # one seed has no spread: no error bars (they drew flat caps)
        assert all((c.errorbar is None) == (seeds == 1) for c in bars)
        assert all(("1 seed" in t) == (seeds == 1) for t in titles[1:])
        # the baseline's own AUC is shown where its bar would be: under each domain
        mean_none = 0.70 + 0.001 * (seeds - 1) / 2
        assert fig.axes[0].get_xticklabels()[0].get_text() == f"d0\nnone {mean_none:.3f}"
    finally:
        plt.close(fig)


@pytest.fixture(scope="module")
def three_group_data(tmp_path_factory, synth_dir):
    """The synthetic data with a test split of 2001 rows (pre-train rows) in 3 row groups (700 + 700 + 601)."""
    out = tmp_path_factory.mktemp("three_groups")
    shutil.copytree(synth_dir, out, dirs_exist_ok=True)
    table = pq.read_table(out / "pretrain.parquet").slice(0, 2001)
    pq.write_table(table, out / "test.parquet", row_group_size=700)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_give_exactly_the_metrics_of_one(three_group_data, backbone_dir, ctx, tmp_path, monkeypatch):
    """Rank 0 reads rows [0, 1000) (10 batches of 100), rank 1 rows [1000, 2001) (11): rank 0 runs one
    padding forward, whose output is dropped; the metrics come in buckets of 64 rows. Batches
    start at the same rows as on one rank (1000 is a multiple of 100), so every score is the same and
    the metrics must be equal to the last bit, on both ranks."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"data": str(three_group_data), "backbone": str(backbone_dir), "out": str(tmp_path)}))
    for rank in range(2):
        (tmp_path / f"spill{rank}").mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", __file__, str(spec)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    import iak_dist.phases.evaluate as ev

    monkeypatch.setattr(ev, "BUCKET_ROWS", 64)  # as on the 2 ranks: sums run bucket by bucket
    want = evaluate(three_group_data, backbone_dir, None, ctx, batch_size=100)
    assert want["overall"]["rows"] == 2001 and isinstance(want["overall"]["gauc"], float)
    assert ranks[0]["metrics"] == ranks[1]["metrics"] == json.loads(json.dumps(want))
    assert ranks[0]["forwards"] == [True] * 10 + [False] and ranks[1]["forwards"] == [True] * 11
    # a read error on one rank is raised on both, in its own words (not a hang in the all-to-all)
    assert ranks[0]["failure"] == ranks[1]["failure"] == "x.parquet row 7: label 2.0 is not 0 or 1"
    # the bucketed metrics on 2 ranks, on 1 rank and in memory (AUCs exactly; sums to rounding)
    rows = synthetic_records()
    domains = ["a", "b", "c", "d"]
    one_rank = stream_in_folder(rows, domains, ctx, tmp_path / "one")
    assert ranks[0]["streamed"] == json.loads(json.dumps(one_rank)) and ranks[1]["streamed"] is None
    assert 0 < ranks[0]["largest_gather"] <= 64 and ranks[1]["largest_gather"] == 0  # heavy users: by score range
    want = metrics_by_domain({k: rows[k] for k in rows.dtype.names}, domains)
    assert list(one_rank) == ["overall", "a", "b", "c"] and one_rank["c"]["ctr_auc"] is None  # d has no rows
    for domain, metrics in want.items():
        for name in ("ctr_auc", "ctcvr_auc", "rows", "constant_logloss", "constant_ctcvr_logloss"):
            assert one_rank[domain][name] == metrics[name], (domain, name)
        for name in ("gauc", "logloss"):
            expected = None if metrics[name] is None else pytest.approx(metrics[name], rel=1e-12, abs=0)
            assert one_rank[domain][name] == expected, (domain, name)
    # a failure on one rank mid-way is raised on both (not a hang in the next gather)
    assert ranks[0]["stream_failure"] == ranks[1]["stream_failure"] == "scored.bin: bucket file vanished"
    assert [list((tmp_path / f"spill{r}").iterdir()) for r in range(2)] == [[], []]  # spill folders removed


HEAVY_USERS = (7, 7 + pow(0x9E3779B97F4A7C15, -1, 1 << 64) - (1 << 64))
"""Two users of one 32-bit hash code (`user_codes`): one GAUC bucket that refinement cannot cut."""


def synthetic_records(n: int = 3000):
    """Scored records with many ties (500 rows of one score: a bucket of its own), a domain of one
    class (c), a domain without rows (d), user ids far apart, and two heavy users of one hash code
    (500 and 300 rows, 12x a bucket of 64 together: tied and spread scores, both classes, 3 domains)."""
    from iak_dist.phases.evaluate import row_dtype, user_codes

    rng = np.random.default_rng(0)
    rows = np.zeros(n, row_dtype(4))
    rows["domain"] = rng.integers(0, 3, n)
    rows["user"] = rng.integers(0, 300, n) * 10**9
    rows["user"][:200] = HEAVY_USERS[0]
    rows["user"][2400:] = np.array(HEAVY_USERS)[np.arange(600) % 2]
    assert len(set(user_codes(np.array(HEAVY_USERS)).tolist())) == 1
    rows["click"] = (rng.random(n) < 0.3) | (rows["domain"] == 2)
    rows["conversion"] = rows["click"] & (rng.random(n) < 0.3)
    rows["p_ctr"] = np.round(rng.random(n), 2)
    rows["p_ctr"][:500] = 0.5
    rows["p_ctcvr"] = np.round(rng.random(n), 3)
    return rows


def stream_in_folder(rows, domains, ctx, root: Path, bucket_rows: int = 64):
    """`stream_metrics` of `rows` spilled in two appends, in a spill folder under `root`."""
    from iak_dist.phases.evaluate import Spill, spill_folder, stream_metrics

    root.mkdir(exist_ok=True)
    with spill_folder(root) as folder:
        spill = Spill(folder / "scored.bin", rows.dtype)
        spill.append(rows[:len(rows) // 3])
        spill.append(rows[len(rows) // 3:])
        return stream_metrics(spill, domains, ctx, folder, bucket_rows=bucket_rows)


def largest_gathers(monkeypatch) -> list[int]:
    """Rows (records) of each `gather_to_main` result rank 0 receives, recorded as they come."""
    import iak_dist.phases.evaluate as ev

    sizes: list[int] = []
    gather = ev.gather_to_main

    def recorded(records, ctx):
        got = gather(records, ctx)
        if got is not None:
            sizes.append(len(got))
        return got

    monkeypatch.setattr(ev, "gather_to_main", recorded)
    return sizes


def test_heavy_users_bucket_is_never_gathered_whole(ctx, tmp_path, monkeypatch):
    """Two users of one hash code hold 800 of 3000 rows, a bucket holds 64: rank 0 never receives more
    than 64 records at once, and the metrics equal the in-memory ones (AUCs exactly, GAUC to rounding)."""
    sizes = largest_gathers(monkeypatch)
    rows = synthetic_records()
    domains = ["a", "b", "c", "d"]
    got = stream_in_folder(rows, domains, ctx, tmp_path / "one")
    assert 0 < max(sizes) <= 64
    want = metrics_by_domain({k: rows[k] for k in rows.dtype.names}, domains)
    for domain, metrics in want.items():
        for name in ("ctr_auc", "ctcvr_auc", "rows", "constant_logloss", "constant_ctcvr_logloss"):
            assert got[domain][name] == metrics[name], (domain, name)
        for name in ("gauc", "logloss"):
            expected = None if metrics[name] is None else pytest.approx(metrics[name], rel=1e-12, abs=0)
            assert got[domain][name] == expected, (domain, name)
    # the heavy users alone: each GAUC is a mean of two user AUCs (equal to the bit), summed in another order
    heavy = rows[np.isin(rows["user"], HEAVY_USERS)]
    sizes.clear()
    alone = stream_in_folder(heavy, domains, ctx, tmp_path / "heavy")
    assert 0 < max(sizes) <= 64
    for domain, metrics in metrics_by_domain({k: heavy[k] for k in heavy.dtype.names}, domains).items():
        expected = None if metrics["gauc"] is None else pytest.approx(metrics["gauc"], rel=1e-15, abs=0)
        assert alone[domain]["gauc"] == expected, domain
    assert alone["a"]["gauc"] is not None and alone["c"]["gauc"] is None  # c: clicks only


def test_spill_folder_is_removed_after_an_error(three_group_data, backbone_dir, ctx, tmp_path, monkeypatch):
    import iak_dist.phases.evaluate as ev

    def broken(*args, **kwargs):
        raise RuntimeError("metrics broke")

    monkeypatch.setattr(ev, "stream_metrics", broken)
    with pytest.raises(RuntimeError, match="metrics broke"):
        ev.evaluate(three_group_data, backbone_dir, None, ctx, batch_size=500, spill_root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def label_entropy(rate: float) -> float:
    return -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))


def test_constant_predictor_logloss_is_the_label_entropy_and_the_report_sets_it_beside_the_backbone(tmp_path):
    from iak_dist.metrics import logloss

    # domain a: 1 click in 4, no conversion; domain b: 2 clicks in 3, 1 conversion
    click = np.array([1, 0, 0, 0, 1, 1, 0])
    scores = {"click": click, "conversion": np.array([0, 0, 0, 0, 1, 0, 0]), "domain": np.array([0] * 4 + [1] * 3),
              "user": np.arange(7), "p_ctr": np.full(7, 0.5, np.float32), "p_ctcvr": np.full(7, 0.1, np.float32)}
    metrics = metrics_by_domain(scores, ["a", "b"])
    assert metrics["a"]["constant_logloss"] == pytest.approx(label_entropy(1 / 4), rel=1e-15)
    assert metrics["b"]["constant_logloss"] == pytest.approx(label_entropy(2 / 3), rel=1e-15)
    assert metrics["overall"]["constant_logloss"] == pytest.approx(label_entropy(3 / 7), rel=1e-15)
    assert metrics["a"]["constant_ctcvr_logloss"] == 0.0  # one class: the constant 0 is exact
    assert metrics["b"]["constant_ctcvr_logloss"] == pytest.approx(label_entropy(1 / 3), rel=1e-15)
    # the closed form is the LogLoss of scoring every row at the split's click rate
    assert metrics["overall"]["constant_logloss"] == pytest.approx(logloss(click, np.full(7, 3 / 7)), rel=1e-12)
    assert metrics_by_domain(scores, ["a", "b"], has_conversion=False)["b"]["constant_ctcvr_logloss"] is None

    out = tmp_path / "report"
    agg = write_report({"none": {0: metrics}}, {}, out, "t", ["a", "b"])  # p_ctr 0.5: LogLoss ln 2, above
    assert agg["none"]["overall"]["constant_logloss"]["mean"] == metrics["overall"]["constant_logloss"]
    md = (out / "report.md").read_text()
    assert (f"Constant predictor (every test row scored at the split's click rate): LogLoss "
            f"{label_entropy(3 / 7):.4f} (CTCVR: {label_entropy(1 / 7):.4f}); the pre-trained backbone (`none`): "
            f"{math.log(2):.4f}, above: worse than the constant.") in md
    assert table_row(md, "logloss", "a")["constant"] == f"{label_entropy(1 / 4):.4f}"
    assert table_row(md, "logloss", "b")["none"] == f"**{math.log(2):.4f}**"

    import matplotlib.pyplot as plt

    from iak_dist.report import build_figure

    fig = build_figure(agg, "t")  # a third panel: LogLoss minus the constant's, `none` included
    try:
        heights = [bar.get_height() for bar in fig.axes[2].patches]
        want = [metrics[d]["logloss"] - metrics[d]["constant_logloss"] for d in ("a", "b", "overall")]
        assert len(fig.axes) == 3 and heights == pytest.approx(want, rel=1e-6)
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["none"]
    finally:
        plt.close(fig)


def test_export_and_sweeps_choose_by_the_valid_split_not_the_test_split(tmp_path, synth_dir, backbone_dir,
                                                                       small_cfg, ctx):
    """The valid split is the test split with every click flipped: each strategy's valid CTR-AUC is
    1 - its test CTR-AUC, so the best on valid is the worst on test, and that is what export names."""
    from iak_dist.config import load_config
    from iak_dist.orchestration.local import evaluate_and_report
    from iak_dist.orchestration.sweep import sweep_table
    from iak_dist.phases.finetune import finetune
    from iak_dist.serving.export import export_run

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    test = pq.read_table(data / "test.parquet")
    column = test.schema.get_field_index("label_click")
    flipped = pc.subtract(pa.scalar(1, test.column(column).type), test.column(column))
    pq.write_table(test.set_column(column, "label_click", flipped), data / "valid.parquet")
    run = tmp_path / "run"
    shutil.copytree(backbone_dir, run / "seed0" / "backbone")
    for strategy in ("none", "head"):
        finetune(data, run / "seed0" / "backbone", strategy, small_cfg.finetune, 0,
                 run / "seed0" / "adapters" / strategy, ctx, show_progress=False)
    cfg = load_config(None, [f"run_dir={run}", "seeds=[0]", "data.source=parquet", f"data.dir={data}",
                             "model.embedding_dim=8", "model.tower=[32, 16]", "finetune.strategies=[none, head]"])
    lines: list[str] = []
    evaluate_and_report(cfg, ctx, say_line=lines.append)
    assert [line.split(": CTR-AUC")[0] for line in lines[:4]] == [
        "seed 0: `none` valid split (chooses)", "seed 0: `none` test split (report only)",
        "seed 0: `head` valid split (chooses)", "seed 0: `head` test split (report only)"]
    report = json.loads((run / "report.json").read_text())
    test_auc = {s: report["aggregate"][s]["overall"]["ctr_auc"]["mean"] for s in ("none", "head")}
    valid_auc = {s: report["aggregate_valid"][s]["overall"]["ctr_auc"]["mean"] for s in ("none", "head")}
    for s in test_auc:
        assert valid_auc[s] == pytest.approx(1 - test_auc[s], abs=1e-12)
        assert json.loads((run / "seed0" / "adapters" / s / "eval_valid.json").read_text())["overall"]["ctr_auc"] \
            == valid_auc[s]
    best_on_valid = max(valid_auc, key=valid_auc.get)
    assert best_on_valid != max(test_auc, key=test_auc.get)
    bundle = json.loads((export_run(cfg) / "bundle.json").read_text())
    assert bundle["best_by_valid_ctr_auc"] == best_on_valid and "best_by_test_ctr_auc" not in bundle
    # the report shows the valid CTR-AUC beside the test scores, each under its split's name
    md = (run / "report.md").read_text()
    def cells(auc: dict[str, float]) -> list[str]:  # the best in bold
        return [f"**{auc[s]:.4f}**" if auc[s] == max(auc.values()) else f"{auc[s]:.4f}" for s in ("none", "head")]

    assert table_cells(md, "valid ctr_auc", "overall") == cells(valid_auc)
    assert table_cells(md, "ctr_auc", "overall") == cells(test_auc)
    # a sweep names each strategy's best point by the valid aggregate it is given
    points = [("p=1", report["aggregate_valid"]),
              ("p=2", {s: {d: {**m, "ctr_auc": {**m["ctr_auc"], "mean": m["ctr_auc"]["mean"] + 0.01 * (s == "head")}}
                           for d, m in by_domain.items()} for s, by_domain in report["aggregate_valid"].items()})]
    assert sweep_table(points)[-1] == "Best point by valid CTR-AUC: `head` p=2."


def two_rank_worker(spec_path: str) -> None:
    """One rank of `test_two_ranks_give_exactly_the_metrics_of_one` (started by torchrun)."""
    import iak_dist.phases.evaluate as ev
    from iak_dist.distributed.context import close_distributed, init_distributed
    from iak_dist.errors import UserError
    from iak_dist.runtime import configure_environment, exit_launched_rank

    configure_environment()
    spec = json.loads(Path(spec_path).read_text())
    ctx = init_distributed()
    out: dict = {}
    ev.BUCKET_ROWS = 64
    lockstep = ev.lockstep
    forwards: list[bool] = []

    def counted(batches, ctx, padding):
        for batch, real in lockstep(batches, ctx, padding):
            forwards.append(real)
            yield batch, real

    ev.lockstep = counted
    spill_root = Path(spec["out"]) / f"spill{ctx.rank}"
    out["metrics"] = ev.evaluate(spec["data"], spec["backbone"], None, ctx, batch_size=100, spill_root=spill_root)
    out["forwards"] = forwards

    def failing():
        yield "first"
        if ctx.rank == 1:
            raise UserError("x.parquet row 7: label 2.0 is not 0 or 1")
        yield "second"

    try:
        list(lockstep(failing(), ctx, lambda: "padding"))
        out["failure"] = None
    except UserError as exc:
        out["failure"] = str(exc)

    rows = synthetic_records()  # rank 0 spills rows [0, 700), rank 1 the rest
    mine = rows[:700] if ctx.rank == 0 else rows[700:]
    gather, sizes = ev.gather_to_main, []

    def recorded(records, ctx):
        got = gather(records, ctx)
        sizes.append(0 if got is None else len(got))
        return got

    ev.gather_to_main = recorded
    out["streamed"] = stream_in_folder(mine, ["a", "b", "c", "d"], ctx, spill_root)
    ev.gather_to_main = gather
    out["largest_gather"] = max(sizes)

    def vanished(*args):
        raise UserError("scored.bin: bucket file vanished")

    counted_keys = ev.counted_keys
    if ctx.rank == 1:
        ev.counted_keys = vanished
    try:
        stream_in_folder(mine, ["a", "b", "c", "d"], ctx, spill_root)
        out["stream_failure"] = None
    except UserError as exc:
        out["stream_failure"] = str(exc)
    ev.counted_keys = counted_keys
    (Path(spec["out"]) / f"rank{ctx.rank}.json").write_text(json.dumps(out))
    ctx.barrier()
    close_distributed(ctx)
    exit_launched_rank(0)


if __name__ == "__main__":
    two_rank_worker(sys.argv[1])
