"""The Ray-scheduled pipeline on an embedded local Ray: end to end, resume, worker crash, bad specs."""

import json
import os
import subprocess
import sys

import pytest
import yaml

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
    tmp = tmp_path_factory.mktemp("ray_e2e")
    config = write_config(tmp, synth_dir)
    result = run_cli(["pipeline", "run", str(config)])
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp, config, result


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
    assert len(list((run / "ray" / "pretrain").glob("checkpoint_*"))) == 1
    assert "over 2 rank(s)" in result.stderr  # pre-training ran on a 2-worker Ray Train group
    report = json.loads((run / "report.json").read_text())
    assert sorted(report["aggregate"]) == ["iak", "lora", "none"]
    bundle = json.loads((run / "export" / "bundle.json").read_text())
    assert bundle["strategies"] == ["none", "lora", "iak"] and bundle["domains"] == ["d0", "d1", "d2"]
    assert (run / "export" / "adapters" / "iak" / "adapter_model.safetensors").is_file()


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
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "run" / "seed0" / "backbone" / "model.safetensors"))
    want = load_file(str(reference / "run" / "seed0" / "backbone" / "model.safetensors"))
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


def test_driver_killed_mid_pipeline_resumes_without_redoing_finished_phases(synth_dir, tmp_path):
    import signal
    import time

    config = write_config(tmp_path, synth_dir, phases=PHASES[:3] + [
        {"name": "evaluate", "type": "evaluate", "after": ["finetune-iak"]}],
        finetune={"strategies": ["iak"], "optim": {"steps": 400, "batch_size": 128}})
    manifest_path = tmp_path / "run" / "manifest.json"
    driver = subprocess.Popen([sys.executable, "-m", "iak_dist.cli", "pipeline", "run", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            phases = json.loads(manifest_path.read_text())["phases"] if manifest_path.is_file() else {}
            if phases.get("finetune-iak", {}).get("state") == "running":
                break
            assert driver.poll() is None, "the pipeline ended before it could be killed"
            time.sleep(0.5)
        else:
            pytest.fail("fine-tuning never started")
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the embedded Ray it started
        driver.wait()
    finally:
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "stop", "--force"],
                       capture_output=True, timeout=120)
    killed = json.loads(manifest_path.read_text())["phases"]
    assert killed["pretrain"]["state"] == "done" and killed["finetune-iak"]["state"] == "running"

    again = run_cli(["pipeline", "run", str(config)])
    assert again.returncode == 0, again.stderr[-3000:]
    phases = json.loads(manifest_path.read_text())["phases"]
    assert phases["prepare"]["attempts"] == 1 and phases["pretrain"]["attempts"] == 1  # not redone
    assert phases["finetune-iak"]["attempts"] == 2 and all(p["state"] == "done" for p in phases.values())
    assert "phase pretrain: done in an earlier run, skipping" in again.stderr
