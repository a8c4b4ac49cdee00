"""A small end-to-end pipeline on synthetic data, through the CLI."""

import json
import math

import pyarrow.parquet as pq
import yaml

from iak_dist.cli import main
from iak_dist.data.source import split_location

STRATEGIES = ["none", "full", "head", "lora", "patch", "iak"]


def write_config(tmp_path, synth_dir):
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "seeds": [0, 1],
        "data": {"source": "parquet", "dir": str(synth_dir)},
        "model": {"embedding_dim": 8, "tower": [32, 16]},
        "pretrain": {"steps": 40, "batch_size": 256},
        "finetune": {"strategies": STRATEGIES, "optim": {"steps": 20, "batch_size": 256}},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pipeline_end_to_end_and_rerun_skips_finished_work(tmp_path, synth_dir, capsys):
    config = write_config(tmp_path, synth_dir)
    assert main(["pipeline", "run", "--no-ray", str(config)]) == 0
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    agg = report["aggregate"]
    assert sorted(agg) == sorted(STRATEGIES)
    for strategy in STRATEGIES:
        assert set(agg[strategy]) == {"overall", "d0", "d1", "d2"}
        for metric in ("ctr_auc", "ctcvr_auc", "gauc", "logloss"):
            value = agg[strategy]["overall"][metric]
            assert math.isfinite(value["mean"]) and value["n"] == 2
        assert 0.5 < agg[strategy]["overall"]["ctr_auc"]["mean"] < 1.0
    # seeds differ, so the pre-trained models differ
    per_seed = report["per_seed"]["none"]
    assert per_seed["0"]["overall"]["ctr_auc"] != per_seed["1"]["overall"]["ctr_auc"]
    assert report["costs"]["iak"]["trainable_params"] < report["costs"]["full"]["trainable_params"] / 10
    assert (run / "report.png").stat().st_size > 10_000
    assert "| overall |" in (run / "report.md").read_text()
    assert list((run / "seed0" / "backbone").glob("*")) and list((run / "seed0" / "tb" / "pretrain").glob("events*"))
    # the same driver as with Ray: resolved config, manifest with metrics, export
    assert (run / "config.yaml").is_file()
    manifest = json.loads((run / "manifest.json").read_text())["phases"]
    assert list(manifest) == ["prepare", "pretrain", "finetune", "evaluate", "export"]
    assert all(p["state"] == "done" and p["attempts"] == 1 for p in manifest.values())
    assert set(manifest["pretrain"]["metrics"]) == {"pretrain/loss/seed0", "pretrain/loss/seed1"}
    assert manifest["evaluate"]["metrics"]["eval/ctr_auc/iak"] == agg["iak"]["overall"]["ctr_auc"]["mean"]
    assert json.loads((run / "export" / "bundle.json").read_text())["strategies"] == STRATEGIES
    # the run ends with a serving artefact of the strategy best on valid, which `iak-dist score` accepts
    exported = json.loads((run / "export" / "manifest.json").read_text())
    assert exported["strategy"] == exported["bundle"]["best_by_valid_ctr_auc"] in STRATEGIES
    assert main(["score", str(run / "export"), split_location(synth_dir, "test"), "--out",
                 str(tmp_path / "scores.parquet")]) == 0
    assert pq.read_metadata(tmp_path / "scores.parquet").num_rows > 0
    adapter = run / "seed0" / "adapters" / "iak" / "adapter_model.safetensors"
    stamp = adapter.stat().st_mtime_ns
    capsys.readouterr()

    assert main(["pipeline", "run", "--no-ray", str(config)]) == 0
    err = capsys.readouterr().err
    assert err.count("done in an earlier run, skipping") == 5
    assert "fine-tuning every domain" not in err and "pre-training" not in err
    assert adapter.stat().st_mtime_ns == stamp

    # what the finished phases produced stays theirs: a key that decides it is refused, one that does not is not
    assert main(["pipeline", "run", "--no-ray", str(config), "--set", "finetune.iak.width=8"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {run}: its phases ran with another config (finetune.iak.width: 4 -> 8); use another run_dir "
        f"for the new settings, or move {run} aside to run them afresh")
    assert main(["pipeline", "run", "--no-ray", str(config), "--set", "finetune.prefix_cache=off"]) == 0
    assert capsys.readouterr().err.count("done in an earlier run, skipping") == 5
    recorded = yaml.safe_load((run / "config.yaml").read_text())  # a run from before `pretrain.calibrate` existed
    del recorded["pretrain"]["calibrate"]
    del recorded["generative"]  # and before the whole `generative` section did
    (run / "config.yaml").write_text(yaml.safe_dump(recorded))
    assert main(["pipeline", "run", "--no-ray", str(config)]) == 0  # it ran at the key's default: the same
    assert capsys.readouterr().err.count("done in an earlier run, skipping") == 5
    assert adapter.stat().st_mtime_ns == stamp

    # a finished run still says how fast and how well each phase went
    assert main(["pipeline", "status", str(run)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "pretrain seed 1: step 40/40 (100 %)" in rows["pretrain"] and "samples/s" in rows["pretrain"]
    assert f"pretrain/loss/seed0={manifest['pretrain']['metrics']['pretrain/loss/seed0']:.4f}" in rows["pretrain"]
    assert "finetune iak seed 1: step 20/20 (100 %)" in rows["finetune"]  # the last loop the phase ran
    assert "finetune" not in rows["pretrain"] and "samples/s" not in rows["evaluate"]  # each phase its own
    assert f"eval/ctr_auc/none={agg['none']['overall']['ctr_auc']['mean']:.4f}" in rows["evaluate"]
    assert "(+2 more in manifest.json)" in rows["evaluate"]  # 6 strategies, 4 shown


def test_sweep_tabulates_every_grid_point_and_reuses_backbones(tmp_path, synth_dir):
    config = write_config(tmp_path, synth_dir)
    assert main(["sweep", str(config), "--set", "seeds=[0]", "--strategies", "iak",
                 "--grid", "finetune.iak.beta_matching=0,0.1"]) == 0
    sweep = tmp_path / "run" / "sweep"
    table = (sweep / "sweep.md").read_text()
    assert "| beta_matching=0 | iak |" in table and "| beta_matching=0.1 | iak |" in table
    # the pre-trained model is every point's row to compare with, scored once (linked); one seed: no ± 0.0000
    assert "| beta_matching=0 | none |" in table and "| beta_matching=0.1 | none |" in table and "±" not in table
    none_eval = [sweep / point / "seed0" / "adapters" / "none" / "eval.json"
                 for point in ("beta_matching=0", "beta_matching=0.1")]
    assert none_eval[0].stat().st_ino == none_eval[1].stat().st_ino
    shard = "shards/rank-00000-of-00001.safetensors"
    shared = tmp_path / "run" / "seed0" / "backbone" / shard
    linked = sweep / "beta_matching=0" / "seed0" / "backbone" / shard
    assert linked.stat().st_ino == shared.stat().st_ino  # hard link: pre-trained once
    results = json.loads((sweep / "sweep.json").read_text())
    a, b = (results[p]["iak"]["overall"]["ctr_auc"]["mean"] for p in ("beta_matching=0", "beta_matching=0.1"))
    assert a != b
