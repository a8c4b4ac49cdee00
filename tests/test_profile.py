"""`iak-dist profile`: the report holds every comparison, with consistent numbers."""

import json

from iak_dist.cli import main
from profiling.steps import STEP_PARTS


def test_profile_reports_breakdown_baselines_finetune_loader_and_bandwidth(synth_dir, tmp_path, capsys):
    code = main(["profile", "configs/movielens_age.yaml", "--steps", "12", "--set", f"run_dir={tmp_path}",
                 "--set", "data.source=parquet", "--set", f"data.dir={synth_dir}", "--set", "pretrain.batch_size=128",
                 "--set", "finetune.optim.batch_size=128", "--set", "model.tower=[32, 16]",
                 "--set", "distributed.checkpoint_every=50", "--trace"])
    assert code == 0
    # it says where its files went (the report itself goes to stdout)
    assert f"[profile] wrote report.md, report.png, profile.json, trace_rank*.json (chrome://tracing) to " \
        f"{tmp_path / 'profile'}\n" in capsys.readouterr().err
    result = json.loads((tmp_path / "profile" / "profile.json").read_text())
    assert result["world_size"] == 1 and len(result["ranks"]) == 1
    rank0 = result["ranks"][0]
    parts = rank0["step_parts_s"]
    assert tuple(parts) == STEP_PARTS
    assert all(v > 0 for v in parts.values())
    train_s = sum(v for k, v in parts.items() if k != "data")
    assert abs(rank0["train_step_s"] - train_s) < 1e-12
    assert abs(result["samples_per_s_total"] - 128 / train_s) < 1e-6 * result["samples_per_s_total"]
    assert abs(result["checkpoint_s_per_step"] - result["checkpoint_s"] / 50) < 1e-12
    ft = result["finetune_step_s"]
    assert ft["full"] > 0 and ft["iak"] > 0 and abs(result["iak_vs_full_step"] - ft["iak"] / ft["full"]) < 1e-9
    assert 0 < result["finetune_trainable_params"]["iak"] < result["finetune_trainable_params"]["full"]
    for key in ("plain_torchrec_samples_per_s_total", "plain_pytorch_ddp_samples_per_s_total",
                "loader_samples_per_s_total", "phase_loop_samples_per_s_total"):
        assert result[key] > 0, key
    assert 0 < rank0["lookup_gbps"] < rank0["stream_copy_gbps"]
    assert rank0["peak_rss_gib"] > 0.1
    report = (tmp_path / "profile" / "report.md").read_text()
    for text in ("plain TorchRec DMP loop", "STREAM-like copy", "input distribution", "checkpoint: one save",
                 "IAK against full"):
        assert text in report, text
    assert (tmp_path / "profile" / "report.png").stat().st_size > 5000
    assert not (tmp_path / "profile" / "scratch").exists()
    trace = json.loads((tmp_path / "profile" / "trace_rank0.json").read_text())
    assert any("embedding" in e.get("name", "") for e in trace["traceEvents"])  # the lookup shows up


def test_dense_update_benchmark_compares_every_update_on_two_ranks(synth_dir, tmp_path):
    """profiling/dense_update.py through torchrun: every update runs on the same batches and is reported."""
    import subprocess
    import sys
    from pathlib import Path

    config = tmp_path / "cfg.yaml"
    config.write_text(f"data: {{source: parquet, dir: {synth_dir}}}\nmodel: {{tower: [32, 16]}}\n"
                      "pretrain: {batch_size: 128}\n")
    proc = subprocess.run([sys.executable, "-m", "profiling.dense_update", str(config), "--steps", "6", "--rounds", "1",
                           "--nproc", "2"], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "ms" not in line]
    from profiling.dense_update import KINDS

    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == list(KINDS)
    assert rows[0].endswith("| 1.00x |")


def test_profiled_finetune_step_is_the_fine_tune_loops_step(synth_dir, backbone_dir, small_cfg, ctx):
    """The profiler times the step that trains: same batch and weights give the loop's loss exactly
    (each domain's mean loss averaged + the adapter's auxiliary loss, not a plain mean over rows)."""
    import torch

    from iak_dist.data.sampler import DomainBatchSampler
    from iak_dist.distributed.zero import DenseEngine
    from iak_dist.phases.finetune import build_finetune, sampled_batches
    from iak_dist.phases.loop import train_loop
    from profiling.steps import finetune_stepper

    ft = small_cfg.finetune

    def setup():
        torch.manual_seed(0)  # same adapter init and same IAK samples in both runs
        run = build_finetune(synth_dir, backbone_dir, "iak", ft, ctx, small_cfg.distributed)
        return run, DenseEngine(run.trainable, ft.optim.lr_dense, ft.optim.weight_decay, small_cfg.distributed.zero,
                                ft.optim.batch_size, ctx.world_size)

    run, dense = setup()
    num_domains = len(run.schema.domains)
    sampler = DomainBatchSampler(run.domains, num_domains, ft.optim.batch_size, 0.0, seed=0)
    batch = next(sampled_batches(run.table, run.schema, sampler))
    assert len(set(torch.bincount(batch.domain).tolist())) > 1  # unequal domains: the two means differ
    losses: list = []
    finetune_stepper(run, dense, 1, losses)(batch)
    run, dense = setup()
    loop = train_loop(run.model, dense, [batch], 1, ft.optim, desc="t", adapter=run.adapter, num_domains=num_domains,
                      data_parallel_optimizer=run.sharded.data_parallel_optimizer, show_progress=False)
    assert float(losses[0]) == loop["train/losses"][0]
