"""Evaluation and report never pass off a missing result as a number: a domain without fine-tune rows is
marked, metrics the schema cannot give (no user column, no conversion label) are `n/a` / null, and
report.json is strict JSON (no bare NaN)."""

import json
import shutil

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from iak_dist.data.schema import Schema
from iak_dist.phases.evaluate import evaluate
from iak_dist.report import METRICS, write_report


def strict_loads(text: str):
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def table_cells(markdown: str, metric: str, domain: str) -> list[str]:
    """The strategy cells of `domain`'s row in `metric`'s table."""
    section = markdown.split(f"## {metric}\n", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith(f"| {domain} |"))
    return [c.strip() for c in row.strip("|").split("|")][2:]


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
