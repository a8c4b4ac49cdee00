"""SLURM launchers end to end on a real single-node SLURM (Debian's slurmctld + slurmd on 127.0.0.1)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

LOCAL_CLUSTER = Path(__file__).resolve().parent.parent / "launchers" / "slurm" / "local_cluster.sh"
pytestmark = pytest.mark.skipif(shutil.which("slurmctld") is None or os.geteuid() != 0,
                                reason="needs Debian's slurm-wlm and munge, run as root "
                                       "(scripts/setup_test_services.sh installs them)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    base = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_CTLD_PORT": str(free_port()), "SLURM_LOCAL_SLURMD_PORT": str(free_port())}
    started = subprocess.run([str(LOCAL_CLUSTER), "start", str(base)], capture_output=True, text=True, env=env,
                             timeout=120)
    assert started.returncode == 0, started.stderr
    os.environ["SLURM_CONF"] = str(base / "etc" / "slurm.conf")
    yield base
    subprocess.run([str(LOCAL_CLUSTER), "stop", str(base)], capture_output=True, env=env, timeout=120)
    os.environ.pop("SLURM_CONF", None)


def launch(tmp_path, synth_dir, *extra):
    cmd = [sys.executable, "-m", "iak_dist.cli", "slurm", "configs/movielens_age.yaml", "--out", str(tmp_path / "job"),
           "--set", f"run_dir={tmp_path / 'run'}", "--set", "data.source=parquet", "--set", f"data.dir={synth_dir}",
           "--set", "seeds=[0]", "--set", "pretrain.steps=20", "--set", "finetune.optim.steps=10",
           "--set", "finetune.strategies=[none, iak]", "--set", "model.tower=[32, 16]", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          cwd=Path(__file__).resolve().parent.parent)


def test_ray_launcher_runs_the_pipeline_to_completion(slurm, synth_dir, tmp_path):
    result = launch(tmp_path, synth_dir, "--partition", "debug", "--submit", "ray")
    logs = "".join(p.read_text() for p in (tmp_path / "job").glob("*.log"))
    assert result.returncode == 0, result.stderr[-2000:] + logs[-3000:]
    assert "COMPLETED" in result.stderr and "Ray head on" in logs
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())["phases"]
    assert all(p["state"] == "done" for p in manifest.values())
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert sorted(report["aggregate"]) == ["iak", "none"]
    assert (tmp_path / "run" / "export" / "bundle.json").is_file()


def test_torchrun_launcher_runs_two_ranks(slurm, synth_dir, tmp_path):
    result = launch(tmp_path, synth_dir, "--submit", "torchrun", "--phase", "pipeline", "--procs-per-node", "2")
    logs = "".join(p.read_text() for p in (tmp_path / "job").glob("*.log"))
    assert result.returncode == 0, result.stderr[-2000:] + logs[-3000:]
    assert "sharding plan over 2 rank(s)" in logs
    assert (tmp_path / "run" / "report.json").is_file()


def test_unknown_partition_is_a_one_line_error(slurm, synth_dir, tmp_path):
    result = launch(tmp_path, synth_dir, "--partition", "gpu", "--submit", "ray")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2
    assert errors == ["error: --partition gpu: no such SLURM partition; partitions: debug"]


def test_srun_tasks_form_the_process_group_from_slurm_variables(slurm, synth_dir, tmp_path):
    """No torchrun: `srun -n 2` starts both ranks; they join through SLURM_PROCID / SLURM_NTASKS."""
    script = tmp_path / "srun_pretrain.sbatch"
    run_dir = tmp_path / "run"
    script.write_text(f"""#!/bin/bash
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --output={tmp_path / 'srun-%j.log'}
export MASTER_ADDR=127.0.0.1 MASTER_PORT={free_port()}
srun {sys.executable} -m iak_dist.cli pretrain configs/movielens_age.yaml --set run_dir={run_dir} \\
  --set data.source=parquet --set data.dir={synth_dir} --set pretrain.steps=10 --set "model.tower=[32, 16]"
""")
    submitted = subprocess.run(["sbatch", "--parsable", "--wait", str(script)], capture_output=True, text=True,
                               timeout=600, cwd=Path(__file__).resolve().parent.parent)
    log = "".join(p.read_text() for p in tmp_path.glob("srun-*.log"))
    assert submitted.returncode == 0, submitted.stderr + log[-3000:]
    assert "sharding plan over 2 rank(s)" in log
    assert (run_dir / "seed0" / "backbone" / "model.safetensors").is_file()
