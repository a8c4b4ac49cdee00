"""Bad input: a one-line error naming file / column / row (or key), exit code 2, nothing half-written."""

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from iak_dist.cli import main
from iak_dist.data.schema import Schema
from iak_dist.data.source import validate


@pytest.fixture()
def bad_dir(tmp_path, synth_dir):
    """A copy of the small synthetic data folder, ready to be broken."""
    out = tmp_path / "data"
    shutil.copytree(synth_dir, out)
    return out


def rewrite(path, fn):
    table = pq.read_table(path)
    pq.write_table(fn(table), path)


def replace_column(table, name, array):
    return table.set_column(table.schema.get_field_index(name), name, array)


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


CASES = {
    "missing column": (
        lambda t: t.drop_columns(["item_id"]),
        "column 'item_id' is missing (named in the schema)",
    ),
    "wrong type": (
        lambda t: replace_column(t, "user_id", pa.array([str(v) for v in t.column("user_id").to_pylist()])),
        "column 'user_id' has type string; single-hot IDs must be int64",
    ),
    "NaN label": (
        lambda t: replace_column(t, "label_click", pa.array([0.0, 1.0, float("nan")] + [0.0] * (t.num_rows - 3))),
        "column 'label_click' row 2: label is NaN (1 NaN labels)",
    ),
    "float label not 0/1": (
        lambda t: replace_column(t, "label_conversion",
                                 pa.array([0.0] * 4 + [0.5] + [1.0] * (t.num_rows - 5), pa.float32())),
        "column 'label_conversion' row 4: label 0.5 is not 0 or 1",
    ),
    "string label": (
        lambda t: replace_column(t, "label_click", pa.array(["1"] * t.num_rows)),
        "column 'label_click' has type string; labels must be int (0/1), bool or float (0.0/1.0)",
    ),
    "non-0/1 label": (
        lambda t: replace_column(t, "label_click", pa.array([0, 0, 2] + [1] * (t.num_rows - 3), pa.int8())),
        "column 'label_click' row 2: label 2 is not 0 or 1",
    ),
    "empty file": (
        lambda t: t.slice(0, 0),
        "the file has no rows",
    ),
    "ID list with a null": (
        lambda t: replace_column(t, "tags", pa.array([[1, 2], [3], [4, None]] + [[5]] * (t.num_rows - 3),
                                                     pa.list_(pa.int64()))),
        "column 'tags' row 2: the ID list holds a null",
    ),
    "null ID list": (
        lambda t: replace_column(t, "tags", pa.array([[1]] + [None] + [[5]] * (t.num_rows - 2),
                                                     pa.list_(pa.int64()))),
        "column 'tags' row 1: null value",
    ),
    "unknown domain": (
        lambda t: replace_column(t, "domain", pa.array(["d0", "zz"] + ["d1"] * (t.num_rows - 2))),
        "column 'domain' row 1: unknown domain 'zz'",
    ),
    "NaN dense value": (
        lambda t: replace_column(t, "dense_0", pa.array([0.0, 1.0, 2.0, float("nan")] + [0.0] * (t.num_rows - 4),
                                                        pa.float32())),
        "column 'dense_0' row 3: value nan is not finite",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_parquet_is_reported_in_one_line_and_nothing_is_written(case, bad_dir, tmp_path, capsys):
    breaker, message = CASES[case]
    path = bad_dir / "pretrain.parquet"
    rewrite(path, breaker)
    _, problems = validate(path, Schema.load(bad_dir / "schema.yaml"))
    assert any(message in p and str(path) in p for p in problems), problems

    code, err = run_cli(["data", "validate", str(path)], capsys)
    assert code == 1
    run_dir = tmp_path / "run"
    code, err = run_cli(["pretrain", "configs/movielens_age.yaml", "--set", f"data.dir={bad_dir}",
                         "--set", f"run_dir={run_dir}", "--set", "data.source=parquet"], capsys)
    error_lines = [line for line in err if line.startswith("error:")]
    assert code == 2
    assert len(error_lines) == 1 and message in error_lines[0] and str(path) in error_lines[0]
    assert not (run_dir / "seed0" / "backbone").exists()


def test_float_labels_holding_only_0_and_1_are_accepted_and_read_as_the_int_labels(bad_dir):
    """A label column written as double 0.0 / 1.0 (pandas' default after a merge) is valid data."""
    import pyarrow.compute as pc

    from iak_dist.data.batch import arrow_to_batch
    from iak_dist.data.parquet import read_table

    path = bad_dir / "pretrain.parquet"
    schema = Schema.load(bad_dir / "schema.yaml")
    want = arrow_to_batch(read_table(path, schema), schema)
    rewrite(path, lambda t: replace_column(t, "label_click", pc.cast(t.column("label_click"), pa.float64())))
    assert pq.read_schema(path).field("label_click").type == pa.float64()
    assert validate(path, schema)[1] == []
    got = arrow_to_batch(read_table(path, schema), schema)
    assert got.click.sum() > 0 and bool((got.click == want.click).all())


def test_unknown_domain_at_evaluation_names_the_domain(bad_dir, backbone_dir, small_cfg, ctx, tmp_path):
    from iak_dist.errors import UserError
    from iak_dist.phases.evaluate import evaluate
    from iak_dist.phases.finetune import finetune

    adapter_dir = tmp_path / "adapter"
    finetune(bad_dir, backbone_dir, "iak", small_cfg.finetune, 0, adapter_dir, ctx, show_progress=False)
    schema = Schema.load(bad_dir / "schema.yaml")
    schema.domains.append("d_new")
    schema.save(bad_dir / "schema.yaml")
    with pytest.raises(UserError, match="domain 'd_new' was not fine-tuned by the adapter"):
        evaluate(bad_dir, backbone_dir, adapter_dir, ctx)


@pytest.mark.parametrize("override, message", [
    ("finetune.iak.widht=4", "--set finetune.iak.widht=4: unknown key finetune.iak.widht (did you mean width?); "
                             "valid keys here: width,"),
    ("finetune.iak.width=four", "--set finetune.iak.width=four: key finetune.iak.width: expected an integer"),
    ("model.interaction=attention", "key model.interaction: 'attention' is not one of 'dcn', 'dot'"),
    ("pretrain.lr_dense=[1]", "key pretrain.lr_dense: expected a number, got [1]"),
    ("finetune.strategies=[iak, prefix]", "finetune.strategies: unknown strategy 'prefix'"),
])
def test_bad_config_key_is_named(override, message, capsys, tmp_path):
    code, err = run_cli(["pipeline", "run", "configs/movielens_age.yaml", "--set", override,
                         "--set", f"run_dir={tmp_path / 'run'}"], capsys)
    assert code == 2
    assert err == [f"error: {err[0][len('error: '):]}"] and message in err[0]
    assert not (tmp_path / "run").exists()


def test_bad_key_in_a_config_file_names_file_and_key(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("pretrain:\n  epochs: 2\n  batchsize: 64\n")
    code, err = run_cli(["pretrain", str(cfg)], capsys)
    assert code == 2
    assert err[-1].startswith(f"error: {cfg}: key pretrain.batchsize: unknown key")


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    from iak_dist.io import atomic_path

    target = tmp_path / "out.parquet"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
