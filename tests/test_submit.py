"""`iak-dist submit` against a real Ray head started here on 127.0.0.1."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray_head import RayHead


@pytest.fixture(scope="module")
def ray_head():
    """A head of this test's own (stopped by PID: `ray stop` would stop every Ray on the machine)."""
    with RayHead(num_cpus=2, dashboard=True) as head:
        yield head.dashboard_url
        assert head.alive(), "the head died during the test"


def test_submitted_pipeline_runs_to_completion_with_streamed_logs(ray_head, synth_dir, tmp_path):
    project = Path(__file__).resolve().parent.parent
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "seeds": [0], "data": {"source": "parquet", "dir": str(synth_dir)},
        "model": {"embedding_dim": 8, "tower": [32, 16]}, "pretrain": {"steps": 20, "batch_size": 128},
        "finetune": {"strategies": ["none", "iak"], "optim": {"steps": 10, "batch_size": 128}},
    }))
    result = subprocess.run([sys.executable, "-m", "iak_dist.cli", "submit", "--address", ray_head, str(config)],
                            capture_output=True, text=True, timeout=900, cwd=project)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert "SUCCEEDED" in result.stderr
    assert "phase pretrain" in result.stdout + result.stderr  # the job's own log lines were streamed
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert sorted(report["aggregate"]) == ["iak", "none"]


def test_submit_to_an_address_that_does_not_answer():
    result = subprocess.run([sys.executable, "-m", "iak_dist.cli", "submit", "--address", "http://127.0.0.1:1",
                             "configs/movielens_age.yaml"], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parent.parent)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1
    assert errors[0].startswith("error: --address http://127.0.0.1:1: no Ray job server answers there")


def test_a_head_whose_python_lacks_the_stack_is_named_before_anything_is_submitted(tmp_path):
    """A head started as `.venv/bin/ray start` without the venv on PATH runs jobs with another `python`."""
    import os

    from ray_head import VENV_BIN

    bare = RayHead(num_cpus=1, dashboard=True)
    bare.env["PATH"] = os.pathsep.join(p for p in bare.env["PATH"].split(os.pathsep) if Path(p) != VENV_BIN)
    with bare:
        result = subprocess.run([sys.executable, "-m", "iak_dist.cli", "submit", "--address", bare.dashboard_url,
                                 "configs/movielens_age.yaml", "--set", f"run_dir={tmp_path / 'run'}"],
                                capture_output=True, text=True, timeout=600,
                                cwd=Path(__file__).resolve().parent.parent)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"error: --address {bare.dashboard_url}: the cluster's python (")
    assert "cannot import the stack" in errors[0] and "start the Ray head from the project's venv" in errors[0]
    assert "[submit] job" not in result.stderr  # nothing was submitted
