"""The pipeline driver without Ray (`--no-ray`): the phase graph, the run-directory lock, signals and
storage faults. The Ray executor shares this driver (tests/test_ray_pipeline.py covers its own part)."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from iak_dist.cli import main

PREPARE_ONLY = [{"name": "prepare", "type": "prepare"}]


def write_config(tmp_path, synth_dir, phases=None, name="pipeline.yaml", **extra):
    cfg = {
        "run_dir": str(tmp_path / "run"), "seeds": [0],
        "data": {"source": "parquet", "dir": str(synth_dir)},
        "model": {"embedding_dim": 8, "tower": [32, 16]},
        "pretrain": {"steps": 20, "batch_size": 128},
        "finetune": {"strategies": ["iak"], "optim": {"steps": 10, "batch_size": 128}},
        "distributed": {"checkpoint_every": 10},
        **extra,
    }
    if phases is not None:
        cfg["orchestration"] = {"phases": phases}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def error_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def manifest_of(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())["phases"]


@pytest.mark.parametrize("phases, message", [
    ([{"name": "a", "type": "prepare", "after": ["b"]}, {"name": "b", "type": "pretrain", "after": ["a"]}],
     "orchestration.phases: dependency cycle a -> b -> a"),
    ([{"name": "ft", "type": "finetune"}], "orchestration.phases.ft: a finetune phase needs a pretrain phase"),
    ([{"name": "a", "type": "prepare", "after": ["nope"]}], "orchestration.phases.a.after: no phase named 'nope'"),
])
def test_bad_phase_graph_is_refused_without_ray_too(phases, message, tmp_path, synth_dir, capsys):
    config = write_config(tmp_path, synth_dir, phases)
    assert main(["pipeline", "run", "--no-ray", str(config)]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_no_ray_runs_only_the_configured_phases_and_records_them(tmp_path, synth_dir, capsys):
    config = write_config(tmp_path, synth_dir, PREPARE_ONLY)
    assert main(["pipeline", "run", "--no-ray", str(config)]) == 0
    run = tmp_path / "run"
    assert list(manifest_of(run)) == ["prepare"] and manifest_of(run)["prepare"]["state"] == "done"
    assert not (run / "seed0").exists()  # the default pipeline did not run
    assert yaml.safe_load((run / "config.yaml").read_text())["orchestration"]["phases"][0]["name"] == "prepare"
