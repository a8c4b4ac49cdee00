"""SLURM launchers end to end on a real single-node SLURM (Debian's slurmctld + slurmd on 127.0.0.1)."""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

LOCAL_CLUSTER = Path(__file__).resolve().parent.parent / "launchers" / "slurm" / "local_cluster.sh"
needs_slurm = pytest.mark.skipif(shutil.which("slurmctld") is None or os.geteuid() != 0,
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


@needs_slurm
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


@needs_slurm
def test_torchrun_launcher_runs_two_ranks(slurm, synth_dir, tmp_path):
    result = launch(tmp_path, synth_dir, "--submit", "torchrun", "--phase", "pipeline", "--procs-per-node", "2")
    logs = "".join(p.read_text() for p in (tmp_path / "job").glob("*.log"))
    assert result.returncode == 0, result.stderr[-2000:] + logs[-3000:]
    assert "sharding plan over 2 rank(s)" in logs
    assert (tmp_path / "run" / "report.json").is_file()


@needs_slurm
def test_unknown_partition_is_a_one_line_error(slurm, synth_dir, tmp_path):
    result = launch(tmp_path, synth_dir, "--partition", "gpu", "--submit", "ray")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2
    assert errors == ["error: --partition gpu: no such SLURM partition; partitions: debug"]


@needs_slurm
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
    assert (run_dir / "seed0" / "backbone" / "shards" / "rank-00001-of-00002.safetensors").is_file()


PREEMPTIBLE = dict(gres="gpu:2", mem="64G", account="proj-a", signal="B:TERM@120", requeue=True)


def write(tmp_path, **options):
    from iak_dist.config import load_config
    from launchers.slurm import SlurmOptions, write_scripts

    return write_scripts(load_config(None, [f"run_dir={tmp_path / 'run'}"]), tmp_path / "job", SlurmOptions(**options))


def texts(paths):
    return {kind: path.read_text() for kind, path in paths.items()}


def test_headers_ask_for_resources_and_preemption_handling(tmp_path):
    for text in texts(write(tmp_path, **PREEMPTIBLE)).values():
        header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
        for line in ("--gres=gpu:2", "--mem=64G", "--account=proj-a", "--signal=B:TERM@120", "--requeue"):
            assert f"#SBATCH {line}" in header, line
    ray_script = texts(write(tmp_path))["ray"]
    # the job ends only its own Ray nodes (its srun steps): `ray stop` stops every Ray on the machine
    commands = [line for line in ray_script.splitlines() if not line.lstrip().startswith("#")]
    assert not [c for c in commands if "ray" in c and " stop" in c]
    assert "kill $(jobs -p) 2>/dev/null || true" in commands
    for text in texts(write(tmp_path)).values():  # nothing asked for: SLURM's defaults
        header = "\n".join(line for line in text.splitlines() if line.startswith("#SBATCH"))
        assert not any(f in header for f in ("--gres", "--mem", "--account", "--signal", "--requeue"))


def test_the_cli_flags_reach_the_headers(tmp_path, capsys):
    from iak_dist.cli import main

    out = tmp_path / "job"
    assert main(["slurm", "configs/movielens_age.yaml", "--out", str(out), "--gres", "gpu:2", "--mem", "64G",
                 "--account", "proj-a", "--signal", "B:TERM@120", "--requeue"]) == 0
    for text in texts({p.name: p for p in out.glob("*.sbatch")}).values():
        for line in ("--gres=gpu:2", "--mem=64G", "--account=proj-a", "--signal=B:TERM@120", "--requeue"):
            assert f"#SBATCH {line}\n" in text, line
    assert len(list(out.glob("*.sbatch"))) == 2


@pytest.mark.parametrize("option, message", [
    ({"mem": "lots"}, "--mem lots: expected a size such as 4000M or 64G"),
    ({"signal": "TERM in 2 min"}, "--signal TERM in 2 min: expected SLURM's [B:]SIG[@seconds]"),
    ({"account": "a b"}, "--account 'a b': no spaces allowed"),
])
def test_bad_options_are_one_line_errors_before_anything_is_written(tmp_path, option, message):
    from iak_dist.errors import UserError

    with pytest.raises(UserError, match=re.escape(message)):
        write(tmp_path, **option)
    assert not (tmp_path / "job").exists()


def test_the_batch_shell_passes_sigterm_on_to_the_pipeline(tmp_path):
    """SLURM signals the batch shell (scancel, `--signal=B:TERM@...` before the time limit); bash runs no trap
    while a foreground child runs, so the pipeline must run under the scripts' `forward_signals`."""
    import signal
    import time

    from launchers.slurm import FORWARD_SIGNALS

    scripts = texts(write(tmp_path, **PREEMPTIBLE))
    assert all(FORWARD_SIGNALS in text for text in scripts.values())
    assert "forward_signals srun " in scripts["torchrun"] and "forward_signals " in scripts["ray"]
    ready, got = tmp_path / "ready", tmp_path / "got"
    child = (f"import signal, sys, time\n"
             f"signal.signal(signal.SIGTERM, lambda *a: (open({str(got)!r}, 'w').write('TERM'), sys.exit(7)))\n"
             f"open({str(ready)!r}, 'w').close()\ntime.sleep(60)\n")
    script = tmp_path / "job.sh"
    script.write_text(f"set -euo pipefail\n{FORWARD_SIGNALS}forward_signals {sys.executable} -c {shlex.quote(child)}\n")
    proc = subprocess.Popen(["bash", str(script)], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            if ready.exists():
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 7  # the pipeline's own exit status comes back
    finally:
        proc.kill()
    assert got.read_text() == "TERM" and "signal received" in proc.stderr.read()


def test_waiting_for_a_job_scontrol_forgot_ends_at_once(monkeypatch, capsys):
    """Without accounting, a job SLURM no longer knows ends the wait with UNKNOWN and a line saying so."""
    import launchers.slurm as slurm_module

    calls = []

    def run(cmd):
        calls.append(cmd[0])
        return subprocess.CompletedProcess(cmd, 1, "", "slurm_load_jobs error: Invalid job id specified\n")

    monkeypatch.setattr(slurm_module, "_run", run)
    monkeypatch.setattr(slurm_module.shutil, "which", lambda name: None)  # no sacct
    assert slurm_module.wait_for_job("4242", poll_s=30, log_hint="/x/iak-dist-ray-4242.log") == "UNKNOWN"
    assert calls == ["scontrol"]
    err = capsys.readouterr().err
    assert "job 4242: scontrol no longer knows it and sacct has no record of it" in err and "4242.log" in err

    monkeypatch.setattr(slurm_module, "sacct_state", lambda job: "COMPLETED")
    assert slurm_module.wait_for_job("4242", poll_s=30) == "COMPLETED"


def test_an_unreachable_controller_is_retried_then_a_one_line_error(monkeypatch):
    import launchers.slurm as slurm_module
    from iak_dist.errors import UserError

    monkeypatch.setattr(slurm_module, "_run", lambda cmd: subprocess.CompletedProcess(
        cmd, 1, "", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n"))
    with pytest.raises(UserError, match=r"scontrol show job 7: .*Unable to contact slurm controller.* is slurmctld up"):
        slurm_module.wait_for_job("7", poll_s=0.01, max_errors=3)


@needs_slurm
def test_real_slurm_accepts_the_headers_and_a_forgotten_job_ends_the_wait(slurm, tmp_path, capsys):
    import time

    from launchers.slurm import wait_for_job

    for path in write(tmp_path, mem="500M", signal="B:TERM@60", requeue=True).values():
        checked = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stderr
    start = time.monotonic()
    assert wait_for_job("987654", poll_s=0.2) == "UNKNOWN"
    assert time.monotonic() - start < 30
    assert "job 987654: scontrol no longer knows it" in capsys.readouterr().err
