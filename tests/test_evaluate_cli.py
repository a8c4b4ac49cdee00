"""`iak-dist evaluate` one phase at a time: it scores what exists, lists what is missing, checks every
adapter before scoring any; `export` checks what it copies; a reused backbone must match the config."""

import json
import shutil

import pytest
import yaml

from iak_dist.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory, backbone_dir, synth_dir, small_cfg, ctx):
    """A run folder with seed 0's backbone and its `none` and `head` adapters (nothing else)."""
    from iak_dist.phases.finetune import finetune

    tmp = tmp_path_factory.mktemp("evaluate_cli")
    shutil.copytree(backbone_dir, tmp / "run" / "seed0" / "backbone")
    for strategy in ("none", "head"):
        finetune(synth_dir, tmp / "run" / "seed0" / "backbone", strategy, small_cfg.finetune, 0,
                 tmp / "run" / "seed0" / "adapters" / strategy, ctx, show_progress=False)
    config = tmp / "c.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp / "run"), "seeds": [0, 1], "data": {"source": "parquet", "dir": str(synth_dir)},
        "model": {"embedding_dim": 8, "tower": [32, 16]}, "finetune": {"strategies": ["none", "head", "iak"]},
    }))
    return tmp / "run", config


def evaluate(args, capsys):
    code = main(["evaluate", *args])
    return code, capsys.readouterr().err.splitlines()


def test_evaluate_scores_what_exists_and_lists_what_is_missing(run, capsys):
    run_dir, config = run
    code, err = evaluate([str(config)], capsys)
    assert code == 0, err
    assert ("[evaluate] not fine-tuned yet, left out of the report: `iak` seed 0, `none` seed 1, `head` seed 1, "
            "`iak` seed 1") in err
    assert f"[evaluate] report: {run_dir / 'report.md'} and {run_dir / 'report.png'}" in err
    assert not [line for line in err if line.startswith("[pipeline")]  # no pipeline runs here
    report = json.loads((run_dir / "report.json").read_text())
    assert list(report["aggregate"]) == ["none", "head"] and list(report["per_seed"]["head"]) == ["0"]

    code, err = evaluate([str(config), "--strategy", "head", "--seed", "0"], capsys)
    assert code == 0 and not [line for line in err if "not fine-tuned yet" in line]
    assert list(json.loads((run_dir / "report.json").read_text())["aggregate"]) == ["head"]


def test_evaluate_with_nothing_fine_tuned_names_the_first_missing(run, capsys):
    run_dir, config = run
    code, err = evaluate([str(config), "--strategy", "iak"], capsys)
    assert code == 2 and err[-1] == (f"error: {run_dir / 'seed0' / 'adapters' / 'iak'}: `iak` (seed 0) is not "
                                     "fine-tuned yet; run `iak-dist finetune CONFIG --strategy iak --seed 0` first")


def test_a_damaged_adapter_stops_evaluation_before_anything_is_scored(run, capsys, tmp_path):
    run_dir, config = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for eval_file in copy.rglob("eval.json"):
        eval_file.unlink()
    weights = copy / "seed0" / "adapters" / "head" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in a tensor: same size, same shapes
    weights.write_bytes(bytes(data))
    code, err = evaluate([str(config), "--set", f"run_dir={copy}", "--seed", "0"], capsys)
    assert code == 2 and err[-1].startswith("error: ") and "adapter_model.safetensors" in err[-1]
    assert not list(copy.rglob("eval.json"))  # `none` comes first: it was not scored either

    from iak_dist.config import load_config
    from iak_dist.errors import UserError
    from iak_dist.serving.export import export_run

    with pytest.raises(UserError, match="adapter_model.safetensors"):
        export_run(load_config(config, [f"run_dir={copy}"]))
    assert not (copy / "export").exists() and not (copy / "export.partial").exists()


def test_a_pipeline_reusing_a_backbone_of_another_model_is_refused(run, capsys, tmp_path):
    run_dir, config = run
    code = main(["pipeline", "run", str(config), "--no-ray", "--set", f"run_dir={run_dir}",
                 "--set", "model.cross_rank=4"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err[-1].startswith("error: ") and (
        f"model.cross_rank: the config says 4, the backbone in {run_dir / 'seed0' / 'backbone'} "
        "was pre-trained with 16") in err[-1]
    assert not (run_dir / "seed0" / "adapters" / "iak").exists()
