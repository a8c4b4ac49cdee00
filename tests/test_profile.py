"""`iak-dist profile`: the report holds every comparison, with consistent numbers."""

import json

from iak_dist.cli import main


def test_profile_reports_breakdown_baselines_loader_and_bandwidth(synth_dir, tmp_path, capsys):
    code = main(["profile", "configs/movielens_age.yaml", "--steps", "12", "--set", f"run_dir={tmp_path}",
                 "--set", "data.source=parquet", "--set", f"data.dir={synth_dir}", "--set", "pretrain.batch_size=128",
                 "--set", "model.tower=[32, 16]"])
    assert code == 0
    result = json.loads((tmp_path / "profile" / "profile.json").read_text())
    parts = result["iak_dist_step_parts_s"]
    assert set(parts) == {"data", "embedding lookup", "dense forward", "backward (+ fused sparse update)",
                          "dense optimizer"}
    assert all(v > 0 for v in parts.values())
    train_s = sum(v for k, v in parts.items() if k != "data")
    assert abs(result["iak_dist_samples_per_s"] - 128 / train_s) < 1e-6 * result["iak_dist_samples_per_s"]
    for key in ("plain_torchrec_samples_per_s", "plain_pytorch_ddp_samples_per_s", "loader_samples_per_s",
                "stream_copy_gbps", "lookup_gbps"):
        assert result[key] > 0, key
    assert result["lookup_gbps"] < result["stream_copy_gbps"]
    report = (tmp_path / "profile" / "report.md").read_text()
    assert "plain TorchRec DMP loop" in report and "STREAM-like copy" in report
    assert (tmp_path / "profile" / "report.png").stat().st_size > 5000
