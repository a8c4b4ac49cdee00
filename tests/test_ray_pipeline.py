"""The Ray-scheduled pipeline on an embedded local Ray: end to end, resume, worker crash, bad specs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from ray_head import RayHead

from iak_dist.cli import main

PHASES = [
    {"name": "prepare", "type": "prepare"},
    {"name": "pretrain", "type": "pretrain", "after": ["prepare"], "workers": 2},
    {"name": "finetune-iak", "type": "finetune", "strategies": ["iak"], "after": ["pretrain"]},
    {"name": "finetune-baselines", "type": "finetune", "strategies": ["none", "lora"], "after": ["pretrain"]},
    {"name": "evaluate", "type": "evaluate", "after": ["finetune-iak", "finetune-baselines"]},
    {"name": "export", "type": "export", "after": ["evaluate"]},
]


def write_config(tmp_path, synth_dir, phases=PHASES, **extra):
    cfg = {
        "run_dir": str(tmp_path / "run"), "seeds": [0],
        "data": {"source": "parquet", "dir": str(synth_dir)},
        "model": {"embedding_dim": 8, "tower": [32, 16]},
        "pretrain": {"steps": 40, "batch_size": 128},
        "finetune": {"strategies": ["none", "lora", "iak"], "optim": {"steps": 10, "batch_size": 128}},
        "distributed": {"checkpoint_every": 10, "keep_checkpoints": 10},
        "orchestration": {"num_cpus": 2, "phases": phases},
        **extra,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(args, env=None, timeout=900):
    cmd = [sys.executable, "-m", "iak_dist.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synth_dir):
    """The whole pipeline on an embedded Ray, while another Ray runs on the machine and RAY_ADDRESS
    names it (a user's own cluster): the embedded Ray must be its own instance and leave the other be."""
    tmp = tmp_path_factory.mktemp("ray_e2e")
    config = write_config(tmp, synth_dir)
    with RayHead(num_cpus=1) as other:
        result = run_cli(["pipeline", "run", str(config)], env={"RAY_ADDRESS": other.address})
        assert result.returncode == 0, result.stderr[-4000:]
        assert other.alive()
    return tmp, config, result


def test_embedded_ray_is_its_own_instance_beside_another_ray(finished_run):
    _, _, result = finished_run
    for noise in ("Connecting to existing Ray cluster", "Found multiple active Ray instances", "Traceback",
                  "PlacementGroupCleaner", "PreemptionWatcher"):
        assert noise not in result.stderr, noise
    assert "its own instance" in result.stderr


def test_phases_run_as_ray_tasks_and_train_runs(finished_run):
    tmp, _, result = finished_run
    run = tmp / "run"
    manifest = json.loads((run / "manifest.json").read_text())["phases"]
    assert list(manifest) == [p["name"] for p in PHASES]
    assert all(p["state"] == "done" and p["attempts"] == 1 for p in manifest.values())
    assert manifest["pretrain"]["checkpoint"], "the pretrain phase reported its distributed checkpoint to Ray"
    # final metrics reported without a checkpoint are recorded (Ray's Result.metrics lacks them)
    assert set(manifest["pretrain"]["metrics"]) == {"pretrain/loss/seed0"}
    assert set(manifest["finetune-iak"]["metrics"]) == {"finetune/loss/iak/seed0"}
    assert sorted(manifest["evaluate"]["metrics"]) == ["eval/ctr_auc/iak", "eval/ctr_auc/lora", "eval/ctr_auc/none"]
    # Ray's copies of the 4 reported pre-training checkpoints are bounded
    assert len([p for p in (run / "ray" / "pretrain").glob("checkpoint_*") if p.is_dir()]) == 1
    assert "over 2 rank(s)" in result.stderr  # pre-training ran on a 2-worker Ray Train group
    report = json.loads((run / "report.json").read_text())
    assert sorted(report["aggregate"]) == ["iak", "lora", "none"]
    bundle = json.loads((run / "export" / "bundle.json").read_text())
    assert bundle["strategies"] == ["none", "lora", "iak"] and bundle["domains"] == ["d0", "d1", "d2"]
    assert (run / "export" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "export" / "manifest.json").read_text())["strategy"] == bundle["best_by_valid_ctr_auc"]


def test_rerun_skips_finished_phases_and_status_shows_them(finished_run):
    tmp, config, _ = finished_run
    again = run_cli(["pipeline", "run", str(config)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("done in an earlier run, skipping") == len(PHASES)
    manifest = json.loads((tmp / "run" / "manifest.json").read_text())["phases"]
    assert all(p["attempts"] == 1 for p in manifest.values())
    status = run_cli(["pipeline", "status", str(tmp / "run")])
    assert status.returncode == 0
    lines = status.stdout.splitlines()
    assert lines[0].split()[:3] == ["phase", "state", "attempts"]
    assert any(line.startswith("finetune-iak") and " done " in line for line in lines)


def test_killed_worker_mid_pretraining_is_retried_and_ends_like_an_uninterrupted_run(finished_run, synth_dir,
                                                                                       tmp_path):
    reference, _, _ = finished_run
    config = write_config(tmp_path, synth_dir, phases=PHASES[:2])
    marker = tmp_path / "fault-fired"
    result = run_cli(["pipeline", "run", str(config)], env={"IAK_DIST_FAULT": f"step:25:1:{marker}"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert marker.is_file(), "the fault did not fire"
    ckpts = tmp_path / "run" / "seed0" / "checkpoints" / "pretrain"
    assert [p.name for p in sorted(ckpts.glob("step_*"))] == [f"step_{s:08d}" for s in (10, 20, 30, 40)]
    assert "resuming at step 20" in result.stderr
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())["phases"]
    assert manifest["pretrain"]["state"] == "done" and manifest["pretrain"]["attempts"] == 2  # the restart counts
    from iak_dist.distributed.checkpoint import load_backbone_weights

    got = load_backbone_weights(tmp_path / "run" / "seed0" / "backbone")
    want = load_backbone_weights(reference / "run" / "seed0" / "backbone")
    import torch

    for key in want:  # exact on CPU: the resumed run replays steps 21-40 from the step-20 checkpoint
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("phases, message", [
    ([{"name": "a", "type": "prepare", "after": ["b"]}, {"name": "b", "type": "pretrain", "after": ["a"]}],
     "orchestration.phases: dependency cycle a -> b -> a"),
    ([{"name": "a", "type": "train"}], "key orchestration.phases[0].type: 'train' is not one of"),
    ([{"name": "ft", "type": "finetune"}], "orchestration.phases.ft: a finetune phase needs a pretrain phase"),
    ([{"name": "a", "type": "prepare", "after": ["nope"]}], "orchestration.phases.a.after: no phase named 'nope'"),
])
def test_bad_pipeline_spec_is_one_line(phases, message, tmp_path, synth_dir, capsys):
    config = write_config(tmp_path, synth_dir, phases=phases)
    code = main(["pipeline", "run", str(config)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_cluster_address_that_does_not_answer(tmp_path, synth_dir):
    config = write_config(tmp_path, synth_dir)
    result = run_cli(["pipeline", "run", str(config), "--address", "127.0.0.1:1"], timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2
    assert len(errors) == 1 and "orchestration.address '127.0.0.1:1': no Ray cluster answers there" in errors[0]
    phases = json.loads((tmp_path / "run" / "manifest.json").read_text())["phases"]
    assert {p["state"] for p in phases.values()} == {"pending"}  # nothing marked running that never ran


def test_bad_data_in_a_ray_worker_fails_the_phase_at_once_in_one_line(tmp_path, synth_dir):
    """A UserError is not a fault: no retries, no worker tracebacks, the manifest says why."""
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    broken = data / "pretrain.parquet"
    pq.write_table(pq.read_table(broken).drop_columns(["item_id"]), broken)
    config = write_config(tmp_path, data, phases=[{"name": "pretrain", "type": "pretrain", "workers": 2,
                                                    "max_failures": 2}])
    result = run_cli(["pipeline", "run", str(config)])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and "column 'item_id' is missing" in errors[0] and str(broken) in errors[0], errors
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    phase = json.loads((tmp_path / "run" / "manifest.json").read_text())["phases"]["pretrain"]
    assert phase["state"] == "failed" and phase["attempts"] == 1 and "column 'item_id' is missing" in phase["error"]


def test_a_fault_on_one_ray_worker_fails_the_phase_at_once_not_at_the_group_timeout(tmp_path, synth_dir):
    """Rank 1 alone fails after step 5 (its disk full); rank 0 is then waiting for it in step 6's
    collectives. The failing rank closes its process group, so rank 0 fails at once and returns the
    same line: before, the phase hung for Ray Train's 30-minute process-group timeout."""
    config = write_config(tmp_path, synth_dir, phases=[{"name": "pretrain", "type": "pretrain", "workers": 2,
                                                         "max_failures": 2}])
    result = run_cli(["pipeline", "run", str(config)], timeout=400,
                     env={"IAK_DIST_FAULT": "step:5:1", "IAK_DIST_FAULT_KIND": "enospc"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "rank 1" in errors[0], errors
    phase = json.loads((tmp_path / "run" / "manifest.json").read_text())["phases"]["pretrain"]
    assert phase["state"] == "failed" and phase["attempts"] == 1, phase


def start_driver(config, stderr_path):
    with open(stderr_path, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "iak_dist.cli", "pipeline", "run", str(config)],
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def wait_until_training(driver, run_dir, phase, progress, min_step=0):
    """Until `phase` is running and its training loop has reported step `min_step` (its workers are up)."""
    deadline = time.time() + 600
    while time.time() < deadline:
        manifest = run_dir / "manifest.json"
        entry = json.loads(manifest.read_text())["phases"].get(phase, {}) if manifest.is_file() else {}
        if (entry.get("state") == "running" and progress.is_file()
                and progress.stat().st_mtime >= entry["started"]
                and json.loads(progress.read_text())["step"] >= min_step):
            return
        assert driver.poll() is None, "the pipeline ended before it could be stopped"
        time.sleep(0.5)
    pytest.fail(f"{phase} never trained")


def test_driver_stopped_or_killed_mid_phase_leaves_no_process_and_resumes(finished_run, synth_dir, tmp_path):
    """SIGTERM (SLURM's preemption signal): one line, exit 143, phase marked interrupted, Ray gone.
    SIGKILL of the driver alone: its embedded Ray and the training worker end with it. Then the
    same command resumes without redoing finished phases."""
    reference, _, _ = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(reference / "run" / "seed0" / "backbone", run_dir / "seed0" / "backbone")
    config = write_config(tmp_path, synth_dir, phases=[
        {"name": "prepare", "type": "prepare"},
        {"name": "finetune-iak", "type": "finetune", "strategies": ["iak"], "after": ["prepare"]},
        {"name": "evaluate", "type": "evaluate", "after": ["finetune-iak"]}],
        finetune={"strategies": ["iak"], "optim": {"steps": 150, "batch_size": 128}})
    progress = run_dir / "seed0" / "adapters" / "iak" / "progress.json"
    stderr_path = tmp_path / "driver.err"
    started: list[psutil.Process] = []
    try:
        driver = start_driver(config, stderr_path)
        wait_until_training(driver, run_dir, "finetune-iak", progress)
        started = psutil.Process(driver.pid).children(recursive=True)
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=120) == 128 + signal.SIGTERM
        err = stderr_path.read_text()
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "interrupted by SIGTERM: phase finetune-iak stopped" in errors[0], err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        entry = json.loads((run_dir / "manifest.json").read_text())["phases"]["finetune-iak"]
        assert entry["state"] == "interrupted" and entry["attempts"] == 1
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, f"outlived the stopped driver: {[p.name() for p in alive]}"

        driver = start_driver(config, stderr_path)
        wait_until_training(driver, run_dir, "finetune-iak", progress, min_step=12)  # past a checkpoint
        started = psutil.Process(driver.pid).children(recursive=True)
        assert any("RayTrainWorker" in p.name() for p in started), [p.name() for p in started]
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone, as the OOM killer would
        driver.wait()
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, f"outlived the killed driver: {[p.name() for p in alive]}"
    finally:
        for proc in started:  # only what this test started
            try:
                proc.kill()
            except psutil.Error:
                pass
    assert json.loads((run_dir / "manifest.json").read_text())["phases"]["finetune-iak"]["state"] == "running"

    again = run_cli(["pipeline", "run", str(config)])
    assert again.returncode == 0, again.stderr[-3000:]
    phases = json.loads((run_dir / "manifest.json").read_text())["phases"]
    assert phases["prepare"]["attempts"] == 1  # not redone
    assert phases["finetune-iak"]["attempts"] == 3 and all(p["state"] == "done" for p in phases.values())
    assert "phase prepare: done in an earlier run, skipping" in again.stderr
    assert "[finetune iak] resuming at step" in again.stderr
