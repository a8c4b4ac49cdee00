"""`iak-dist export` then `iak-dist score`: a run's artefact scores a Parquet folder in batches, the
output is the predictor's scores with the input's key columns; bad input is refused in one line."""

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from iak_dist.cli import main


@pytest.fixture(scope="module")
def artefact(tmp_path_factory, backbone_dir, synth_dir, small_cfg, ctx):
    """`iak-dist export` of a run with seed 0's backbone and its `head` adapter."""
    from iak_dist.phases.finetune import finetune

    tmp = tmp_path_factory.mktemp("score_cli")
    shutil.copytree(backbone_dir, tmp / "run" / "seed0" / "backbone")
    finetune(synth_dir, tmp / "run" / "seed0" / "backbone", "head", small_cfg.finetune, 0,
             tmp / "run" / "seed0" / "adapters" / "head", ctx, show_progress=False)
    assert main(["export", str(tmp / "run"), "--strategy", "head", "--out", str(tmp / "artefact")]) == 0
    return tmp / "artefact"


def test_score_streams_a_folder_and_writes_keys_and_scores(artefact, synth_dir, tmp_path, capsys):
    from iak_dist.data.source import split_location
    from iak_dist.serving.predictor import Predictor

    data = split_location(synth_dir, "test")
    out = tmp_path / "scores.parquet"
    assert main(["score", str(artefact), data, "--out", str(out), "--batch-size", "100"]) == 0
    assert capsys.readouterr().out.strip().endswith("rows")
    written = pq.read_table(out)
    source = ds.dataset(data, format="parquet", partitioning="hive").to_table()
    assert written.column_names == ["user_id", "item_id", "domain", "p_ctr", "p_cvr", "p_ctcvr"]
    assert written.num_rows == source.num_rows
    for key in ("user_id", "item_id", "domain"):
        assert written.column(key).to_pylist() == source.column(key).to_pylist()
    predictor = Predictor.load(artefact)  # in the same batches: a GEMM's last bit depends on the batch's rows
    parts = [predictor.score(source.slice(lo, 100)) for lo in range(0, source.num_rows, 100)]
    expected = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    for key in ("p_ctr", "p_cvr", "p_ctcvr"):
        assert np.array_equal(written.column(key).to_numpy(), expected[key])
    assert (out.stat().st_mode & 0o777) == 0o644 and [p.name for p in tmp_path.iterdir()] == ["scores.parquet"]


def test_score_refuses_bad_input_in_one_line_and_writes_nothing(artefact, synth_dir, tmp_path, capsys):
    from iak_dist.data.source import split_location

    source = ds.dataset(split_location(synth_dir, "test"), format="parquet").to_table().slice(0, 50)
    no_item = tmp_path / "no_item.parquet"
    pq.write_table(source.drop_columns(["item_id"]), no_item)
    out = tmp_path / "scores.parquet"
    assert main(["score", str(artefact), str(no_item), "--out", str(out)]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"error: {no_item}: no column 'item_id' (a request needs ")
    assert main(["score", str(artefact), str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {tmp_path / 'nothing'}: no such file or folder"
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))

    unknown = tmp_path / "unknown.parquet"
    pq.write_table(source.set_column(source.column_names.index("domain"), "domain", pa.array(["new"] * 50)), unknown)
    assert main(["score", str(artefact), str(unknown), "--out", str(out)]) == 0
    assert ("[score] 50 row(s) of domains the artefact does not know (it knows d0, d1, d2): scored by the backbone "
            "alone") in capsys.readouterr().err
    assert pq.read_table(out).num_rows == 50
