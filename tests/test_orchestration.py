"""The pipeline driver without Ray (`--no-ray`): the phase graph, the run-directory lock, signals and
storage faults. The Ray executor shares this driver (tests/test_ray_pipeline.py covers its own part)."""

import errno
import json
import os
import re
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


HOLD_LOCK = ("import sys, time\n"
             "from iak_dist.orchestration.lock import RunLock\n"
             "RunLock.acquire(sys.argv[1])\n"
             "print('locked', flush=True)\n"
             "time.sleep(600)\n")


def test_second_driver_on_a_run_dir_is_refused_and_a_dead_drivers_lock_is_taken_over(tmp_path, synth_dir, capsys):
    config = write_config(tmp_path, synth_dir, PREPARE_ONLY)
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["pipeline", "run", "--no-ray", str(config)]) == 2
        err = error_lines(capsys)
        assert len(err) == 1 and "another pipeline driver is using this run directory" in err[0], err
        assert f"pid {holder.pid}" in err[0] and str(run / "driver.lock") in err[0]
        assert sorted(p.name for p in run.iterdir()) == ["driver.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert main(["pipeline", "run", "--no-ray", str(config)]) == 0  # the holder died: its lock is stale
    err = capsys.readouterr().err
    assert f"taking over the stale lock of host {os.uname().nodename} pid {holder.pid}" in err
    assert manifest_of(run)["prepare"]["state"] == "done"
    assert (run / "driver.lock").read_text() == ""  # released


def test_run_dir_that_cannot_be_created_is_one_line(tmp_path, synth_dir, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the run directory's parent should be\n")
    config = write_config(tmp_path, synth_dir, PREPARE_ONLY, run_dir=str(blocker / "run"))
    assert main(["pipeline", "run", "--no-ray", str(config)]) == 2
    captured = capsys.readouterr().err
    err = [line for line in captured.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and str(blocker / "run") in err[0] and "Not a directory (ENOTDIR)" in err[0], err
    assert "Traceback" not in captured


def test_full_disk_while_saving_the_manifest_is_one_line_and_the_run_resumes(tmp_path, synth_dir, capsys,
                                                                              monkeypatch):
    import iak_dist.orchestration.manifest as manifest_module

    real_write = manifest_module.atomic_write_json

    def full_once_done(path, data):
        if data["phases"]["prepare"]["state"] == "done":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) + ".tmp")
        real_write(path, data)

    monkeypatch.setattr(manifest_module, "atomic_write_json", full_once_done)
    config = write_config(tmp_path, synth_dir, PREPARE_ONLY)
    assert main(["pipeline", "run", "--no-ray", str(config)]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "cannot write the run's manifest: No space left on device (ENOSPC)" in err[0], err
    run = tmp_path / "run"
    assert manifest_of(run)["prepare"]["state"] == "running"  # the last complete manifest: resumable
    monkeypatch.setattr(manifest_module, "atomic_write_json", real_write)  # the space came back
    assert main(["pipeline", "run", "--no-ray", str(config)]) == 0
    assert manifest_of(run)["prepare"]["state"] == "done" and manifest_of(run)["prepare"]["attempts"] == 2


def test_checkpoints_unwritable_mid_phase_is_one_line_and_the_run_resumes(tmp_path, synth_dir, capsys):
    phases = PREPARE_ONLY + [{"name": "pretrain", "type": "pretrain", "after": ["prepare"]}]
    config = write_config(tmp_path, synth_dir, phases)
    blocker = tmp_path / "run" / "seed0" / "checkpoints"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the checkpoint folder should be\n")
    assert main(["pipeline", "run", "--no-ray", str(config)]) == 2
    captured = capsys.readouterr().err
    err = [line for line in captured.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: phase pretrain (pretrain) failed: "), err
    assert str(blocker) in err[0] and "(ENOTDIR)" in err[0] and "Traceback" not in captured
    entry = manifest_of(tmp_path / "run")["pretrain"]
    assert entry["state"] == "failed" and str(blocker) in entry["error"]
    blocker.unlink()
    assert main(["pipeline", "run", "--no-ray", str(config)]) == 0
    assert manifest_of(tmp_path / "run")["pretrain"]["state"] == "done"


def test_worker_side_storage_faults_and_user_errors_come_back_as_one_line():
    """What a Ray Train worker returns instead of raising (raised, Ray would retry it)."""
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from iak_dist.errors import UserError
    from iak_dist.orchestration.outcome import guarded

    def full_disk_in_a_dcp_save():
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/step_00000010.partial/sparse/__0_0.distcp")
        except OSError as exc:
            raise CheckpointException("save failed", {1: _wrap_exception(exc)}) from None

    def bad_input():
        raise UserError("data/pretrain.parquet: column 'item_id' is missing")

    _, line = guarded(full_disk_in_a_dcp_save)
    assert line == "/runs/x/step_00000010.partial/sparse/__0_0.distcp: No space left on device (ENOSPC); free space"
    assert guarded(bad_input) == (None, "data/pretrain.parquet: column 'item_id' is missing")
    assert guarded(lambda: 3) == (3, None)
    with pytest.raises(ZeroDivisionError):  # a bug is not hidden: Ray Train retries it
        guarded(lambda: 1 / 0)


def test_sigterm_stops_an_in_process_run_marks_it_and_the_rerun_resumes(tmp_path, synth_dir):
    phases = PREPARE_ONLY + [{"name": "pretrain", "type": "pretrain", "after": ["prepare"]}]
    config = write_config(tmp_path, synth_dir, phases, pretrain={"steps": 120, "batch_size": 128})
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "iak_dist.cli", "pipeline", "run", "--no-ray", str(config)]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    progress = run / "seed0" / "progress.json"
    try:
        deadline = time.time() + 300
        while not (progress.is_file() and json.loads(progress.read_text())["step"] > 20):
            assert driver.poll() is None and time.time() < deadline, "pre-training never got past step 20"
            time.sleep(0.1)
        children = __import__("psutil").Process(driver.pid).children(recursive=True)
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 128 + signal.SIGTERM, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-2000:]
    assert "interrupted by SIGTERM: phase pretrain stopped and marked interrupted" in errors[0]
    assert "Traceback" not in err
    assert manifest_of(run)["pretrain"]["state"] == "interrupted"
    assert (run / "driver.lock").read_text() == ""
    assert not [c for c in children if c.is_running() and c.status() != "zombie"]

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    # from the newest checkpoint before the signal (sent past step 20; how far it got depends on the load)
    resumed = re.search(r"\[pretrain\] resuming at step (\d+)", again.stderr)
    assert resumed and int(resumed.group(1)) >= 20, again.stderr[-3000:]
    assert manifest_of(run)["pretrain"]["state"] == "done" and manifest_of(run)["pretrain"]["attempts"] == 2


def test_a_done_phase_runs_again_when_it_covers_other_seeds_or_strategies(tmp_path):
    """A sweep pre-trains its base run with strategies [none]; a later full run there must fine-tune the rest."""
    import dataclasses

    from iak_dist.config import PhaseSpec, load_config
    from iak_dist.orchestration.driver import phase_spec
    from iak_dist.orchestration.manifest import Manifest

    one = load_config(None, ["finetune.strategies=[none]"])
    phase = PhaseSpec("finetune", "finetune", after=["pretrain"])
    manifest = Manifest.open(tmp_path, {"finetune": phase_spec(one, phase)})
    manifest.start("finetune", phase_spec(one, phase))
    manifest.update("finetune", state="done")
    again = Manifest.open(tmp_path, {"finetune": phase_spec(one, phase)})
    assert again.is_done("finetune", phase_spec(one, phase))
    assert again.is_done("finetune", phase_spec(one, dataclasses.replace(phase, workers=2, max_failures=5)))
    assert not again.is_done("finetune", phase_spec(load_config(None, ["finetune.strategies=[none,iak]"]), phase))
    assert not again.is_done("finetune", phase_spec(load_config(None, ["finetune.strategies=[none]", "seeds=[0,1]"]),
                                                    phase))


def test_a_signal_during_a_checkpoint_save_interrupts_after_it(monkeypatch):
    """The interruption waits for the section a signal must not cut (a checkpoint being written): raised
    inside DCP's writer it tore a file and came out as a CheckpointException, exit 1, with a traceback."""
    from iak_dist.orchestration.driver import _signals_raise_interrupted
    from iak_dist.orchestration.outcome import Interrupted
    from iak_dist.runtime import uninterrupted

    done = []
    with pytest.raises(Interrupted), _signals_raise_interrupted():
        with uninterrupted():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler has run by now
            done.append("the save completed")
        done.append("not reached")
    assert done == ["the save completed"]
    with pytest.raises(Interrupted), _signals_raise_interrupted():  # outside a section: at once
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        done.append("not reached")
    assert done == ["the save completed"]
