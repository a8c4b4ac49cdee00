"""The README's "Using it" block is one story: its commands, run in order as written (on MovieLens-100K,
with few steps), each use what the one before wrote; the cluster lines do new work."""

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
SMALL = ["--set", "pretrain.steps=20", "--set", "finetune.optim.steps=10", "--set", "seeds=[0]",
         "--set", "finetune.strategies=[none, iak]"]
"""Appended to every command that takes a config: the same story, in seconds."""


def readme_commands() -> list[list[str]]:
    text = (PROJECT / "README.md").read_text()
    block = text.split("## Using it", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def test_the_block_is_the_story_we_test():
    verbs = [" ".join(c[:3]) for c in readme_commands() if c[0] == "iak-dist"]
    assert verbs[:7] == ["iak-dist data prepare", "iak-dist data validate",
                         "iak-dist pretrain configs/movielens_zip.yaml", "iak-dist finetune configs/movielens_zip.yaml",
                         "iak-dist evaluate configs/movielens_zip.yaml", "iak-dist pipeline run",
                         "iak-dist pipeline status"]
    # the cluster, SLURM and torchrun lines work in run folders of their own: they never find the
    # one-machine run's phases done and skip them
    elsewhere = [c for c in readme_commands() if "--address" in c or "slurm" in c or c[0] == "torchrun"]
    run_dirs = [w for c in elsewhere for w in c if w.startswith("run_dir=")]
    assert len(elsewhere) == len(run_dirs) == 4 and len(set(run_dirs)) == 4


@pytest.mark.timeout(900)
def test_the_one_machine_commands_chain(tmp_path):
    shutil.copytree(PROJECT / "configs", tmp_path / "configs")
    iak = str(Path(sys.executable).parent / "iak-dist")
    outputs = {}
    for words in readme_commands()[1:]:  # after `source .venv/bin/activate`
        if words[0] != "iak-dist" or words[1] not in ("data", "pretrain", "finetune", "evaluate", "pipeline"):
            continue  # cluster, SLURM, torchrun, plan, profile, scaling: their own tests
        if "--address" in words:
            continue
        cmd = [iak, *words[1:]]
        if words[1] == "pipeline" and words[2] == "run":
            cmd.append("--no-ray")  # the same driver as the embedded Ray (tests/test_ray_pipeline.py runs that)
        if words[1] not in ("data",) and words[2] != "status":
            cmd += SMALL
        result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{shlex.join(words)}:\n{result.stderr[-3000:]}"
        outputs[" ".join(words[1:3])] = result
        if words[1] == "finetune":
            iak_adapter = tmp_path / "runs/movielens-100k-zip/seed0/adapters/iak/adapter_model.safetensors"
            stamp = iak_adapter.stat().st_mtime_ns

    run = tmp_path / "runs" / "movielens-100k-zip"
    assert "wrote data/movielens-100k-zip" in outputs["data prepare"].stdout
    assert "0 problem(s)" in outputs["data validate"].stderr
    pretrain = outputs["pretrain configs/movielens_zip.yaml"].stderr
    assert "backbone written to runs/movielens-100k-zip/seed0/backbone" in pretrain
    # the pipeline used the prepared data, the backbone and the iak adapter, and added `none`
    pipeline = outputs["pipeline run"].stderr
    assert "data/movielens-100k-zip is prepared, reusing it" in pipeline
    assert "pre-trained backbone found, skipping pre-training" in pipeline
    assert "fine-tuning every domain with `none`" in pipeline and "with `iak`" not in pipeline
    assert iak_adapter.stat().st_mtime_ns == stamp
    assert sorted(json.loads((run / "report.json").read_text())["aggregate"]) == ["iak", "none"]
    assert "export" in outputs["pipeline status"].stdout and "done" in outputs["pipeline status"].stdout
