"""Peak RSS per rank and throughput of the whole pipeline against the number of rows (issue 9, 6a).

    .venv/bin/python -m profiling.scale [--rows 1e6,1e7,1e8] [--files 64] [--ranks 2]
                                        [--data-root data/scale] [--out runs/scale] [--set KEY=VALUE ...]

For each row count N, in one run:

1. data: `write_synthetic` writes N impressions as `--files` Parquet files in day partitions into
   `--data-root/synth-N` (a folder finished earlier with the same parameters is reused), in a process
   of its own: its peak RSS (exact, `wait4`) and rows/s;
2. pipeline: `iak-dist pipeline run` under torchrun on `--ranks` ranks (one torch thread each) on
   that folder: pre-train one epoch, fine-tune `iak` for a few steps, evaluate the whole test
   split, export. A small model (dim 8, tower [32, 16]) and large batches, so that the run is
   dominated by the data. Each rank's RSS is sampled every 0.2 s (psutil); the peak of every
   rank over the whole run, and per phase (phase times from the run's manifest.json); the exact
   peak over all ranks (torchrun's `wait4` rusage, which covers its reaped children) checks the
   sampling. Throughput: pre-train samples/s of the training loop (all ranks), and rows/s of each
   phase by its wall time.

Prints a Markdown table and the ratios of consecutive sizes (the issue asks for peak RSS per rank
at 100M within 1.2x of 10M), writes `--out/scale.json` and `--out/scale.png` (RSS and samples/s
against rows). After each size it prints the time the next sizes would take, scaled by rows.
A 100M-row run writes about 2 GiB of Parquet and pre-trains on 69M rows: run 1e6,1e7 first.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

PHASES = ("prepare", "pretrain", "finetune", "evaluate", "export")
SAMPLE_S = 0.2


def pipeline_config(data_dir: Path, run_dir: Path) -> dict[str, Any]:
    """A small model and large batches: the run is dominated by the data, not by the model."""
    return {
        "run_dir": str(run_dir), "seeds": [0],
        "data": {"source": "parquet", "dir": str(data_dir)},
        "model": {"embedding_dim": 8, "tower": [32, 16], "cross_layers": 1},
        "pretrain": {"epochs": 1, "batch_size": 8192, "log_every": 50},
        "finetune": {"strategies": ["iak"], "optim": {"steps": 30, "batch_size": 8192, "log_every": 10}},
        "evaluate": {"batch_size": 16384},
    }


def _wait_sampling(proc: subprocess.Popen, sample: Any = None) -> tuple[int, float, list]:
    """Wait for `proc`, calling `sample()` every SAMPLE_S; (exit code, exact peak RSS in GiB of it and
    its reaped children, the samples). `wait4` is used instead of `Popen.wait` for its rusage."""
    samples = []
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss / 2**20, samples
        if sample is not None:
            samples.append(sample())
        time.sleep(SAMPLE_S)


def write_data(rows: int, files: int, out: Path) -> dict[str, Any]:
    """Write (or reuse) the data set in a process of its own; its peak RSS and rows/s."""
    reused = (out / "stats.json").is_file()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "profiling.scale", "--synth-worker", str(out), str(rows),
                             str(files)])
    code, peak, _ = _wait_sampling(proc)
    if code:
        raise SystemExit(f"[scale] data synth of {rows:,} rows failed (exit {code})")
    seconds = time.perf_counter() - start
    stats = json.loads((out / "stats.json").read_text())
    return {"dir": str(out), "reused": reused, "writer_peak_rss_gib": None if reused else peak,
            "writer_rows_per_s": None if reused else rows / seconds,
            "bytes": sum(p.stat().st_size for p in out.rglob("*.parquet")),
            "split_rows": {s: v["rows"] for s, v in stats["splits"].items()}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_sampler(root_pid: int):
    """A function returning (time, {rank: RSS GiB}) of the torchrun workers under `root_pid`."""
    import psutil

    root = psutil.Process(root_pid)
    ranks: dict[int, psutil.Process] = {}

    def sample() -> tuple[float, dict[int, float]]:
        try:
            for child in root.children():
                if child.pid not in {p.pid for p in ranks.values()}:
                    rank = child.environ().get("RANK")
                    if rank is not None:
                        ranks[int(rank)] = child
        except psutil.Error:
            pass
        rss = {}
        for rank, p in ranks.items():
            try:  # a rank's own RSS plus any children it started (compile workers, DataLoader, ...)
                rss[rank] = (p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))) / 2**30
            except psutil.Error:
                continue
        return time.time(), rss

    return sample


def run_pipeline(data_dir: Path, out: Path, ranks: int, overrides: list[str]) -> dict[str, Any]:
    """The pipeline under torchrun; per-rank peak RSS (whole run and per phase) and throughput."""
    run_dir = out / "run"
    config = out / "pipeline.yaml"
    out.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(pipeline_config(data_dir, run_dir), sort_keys=False))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "iak_dist.cli", "pipeline", "run", str(config),
           *(a for o in overrides for a in ("--set", o))]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
    start = time.perf_counter()
    with open(out / "pipeline.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        code, exact_peak, samples = _wait_sampling(proc, rank_sampler(proc.pid))
    wall = time.perf_counter() - start
    if code:
        tail = (out / "pipeline.log").read_text().splitlines()[-15:]
        raise SystemExit(f"[scale] pipeline failed (exit {code}); {out / 'pipeline.log'} ends:\n" + "\n".join(tail))
    manifest = json.loads((run_dir / "manifest.json").read_text())["phases"]
    peak = {r: max(s[1].get(r, 0.0) for s in samples) for r in range(ranks)}
    phases = {}
    for name in PHASES:
        entry = manifest.get(name)
        if not entry or entry.get("started") is None:
            continue
        window = [s for s in samples if entry["started"] <= s[0] <= entry["finished"]]
        phases[name] = {"seconds": entry["finished"] - entry["started"],
                        "peak_rss_gib": {r: max((s[1].get(r, 0.0) for s in window), default=0.0)
                                         for r in range(ranks)}}
    summary = json.loads((run_dir / "seed0" / "backbone" / "train_summary.json").read_text())
    return {"wall_s": wall, "ranks": ranks, "peak_rss_gib": peak, "exact_peak_rss_gib": exact_peak,
            "phases": phases, "pretrain_loop_samples_per_s": ranks * summary["train/samples_per_s"],
            "pretrain_loop_s": summary["train/seconds"],
            "rss_timeline": [(round(t - samples[0][0], 2), rss) for t, rss in samples[::5]] if samples else []}


def measure(rows: int, args: argparse.Namespace) -> dict[str, Any]:
    from iak_dist.runtime import say

    data = write_data(rows, args.files, args.data_root / f"synth-{rows}")
    say(f"[scale] {rows:,} rows: data {'reused' if data['reused'] else 'written'} in {data['dir']} "
        f"({data['bytes'] / 2**30:.2f} GiB); running the pipeline on {args.ranks} rank(s)...")
    result = {"rows": rows, "data": data, **run_pipeline(Path(data["dir"]), args.out / f"rows-{rows}", args.ranks,
                                                          args.set)}
    split = data["split_rows"]
    for name, key in (("pretrain", "pretrain"), ("evaluate", "test")):
        if name in result["phases"]:
            result["phases"][name]["rows_per_s"] = split[key] / result["phases"][name]["seconds"]
    say(f"[scale]   {point_line(result)}")
    return result


def point_line(p: dict[str, Any]) -> str:
    return (f"{p['rows']:,} rows: peak RSS per rank {', '.join(f'{v:.2f}' for v in p['peak_rss_gib'].values())} GiB "
            f"(exact max {p['exact_peak_rss_gib']:.2f}); pre-train {p['pretrain_loop_samples_per_s']:,.0f} samples/s; "
            f"pipeline {p['wall_s'] / 60:.1f} min")


def markdown(points: list[dict[str, Any]]) -> str:
    def gib(x: float | None) -> str:
        return "reused" if x is None else f"{x:.2f}"

    lines = ["| rows | files | GiB on disk | writer peak RSS GiB | writer rows/s | peak RSS per rank GiB "
             "(pretrain / finetune / evaluate) | max over ranks, exact | pre-train samples/s (loop) "
             "| pre-train rows/s (phase) | evaluate rows/s | pipeline min |",
             "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for p in points:
        d, ph = p["data"], p["phases"]
        per_phase = " / ".join(f"{max(ph[n]['peak_rss_gib'].values()):.2f}" if n in ph else "-"
                               for n in ("pretrain", "finetune", "evaluate"))
        writer_rate = "reused" if d["writer_rows_per_s"] is None else f"{d['writer_rows_per_s']:,.0f}"
        lines.append(
            f"| {p['rows']:,} | {len(list(Path(d['dir']).rglob('*.parquet')))} | {d['bytes'] / 2**30:.2f} "
            f"| {gib(d['writer_peak_rss_gib'])} | {writer_rate} "
            f"| {', '.join(f'{v:.2f}' for v in p['peak_rss_gib'].values())} ({per_phase}) "
            f"| {p['exact_peak_rss_gib']:.2f} | {p['pretrain_loop_samples_per_s']:,.0f} "
            f"| {ph['pretrain']['rows_per_s']:,.0f} | {ph['evaluate']['rows_per_s']:,.0f} | {p['wall_s'] / 60:.1f} |")
    lines.append("")
    for a, b in zip(points, points[1:], strict=False):
        rss = max(b["peak_rss_gib"].values()) / max(a["peak_rss_gib"].values())
        writer = ("" if a["data"]["writer_peak_rss_gib"] is None or b["data"]["writer_peak_rss_gib"] is None else
                  f", writer peak RSS {b['data']['writer_peak_rss_gib'] / a['data']['writer_peak_rss_gib']:.2f}x")
        speed = b["pretrain_loop_samples_per_s"] / a["pretrain_loop_samples_per_s"]
        verdict = " (within 1.2x)" if rss <= 1.2 else " (MORE than 1.2x)"
        lines.append(f"- {b['rows']:,} vs {a['rows']:,} rows ({b['rows'] / a['rows']:.0f}x the data): "
                     f"peak RSS per rank {rss:.2f}x{verdict}{writer}; pre-train samples/s {speed:.2f}x")
    return "\n".join(lines)


def plot(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [p["rows"] for p in points]
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(11, 4))
    ranks = sorted(points[0]["peak_rss_gib"])
    for r in ranks:
        mem.plot(rows, [p["peak_rss_gib"][r] for p in points], "o-", label=f"rank {r}, whole pipeline")
    writer = [(p["rows"], p["data"]["writer_peak_rss_gib"]) for p in points if p["data"]["writer_peak_rss_gib"]]
    if writer:
        mem.plot(*zip(*writer, strict=True), "s--", label="data synth writer")
    mem.set(xscale="log", xlabel="impressions", ylabel="peak RSS (GiB)", title="Peak RSS vs rows", ylim=(0, None))
    mem.legend(loc="upper left")
    speed.plot(rows, [p["pretrain_loop_samples_per_s"] for p in points], "o-", label="pre-train loop (all ranks)")
    speed.plot(rows, [p["phases"]["evaluate"]["rows_per_s"] for p in points], "s-", label="evaluate (rows/s)")
    speed.set(xscale="log", xlabel="impressions", ylabel="samples/s", title="Throughput vs rows", ylim=(0, None))
    speed.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _rows(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x]


def main() -> None:
    if sys.argv[1:2] == ["--synth-worker"]:
        from iak_dist.config import DataConfig
        from iak_dist.data.synth import write_synthetic

        out, rows, files = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        write_synthetic(DataConfig(synth_rows=rows), out, files, show_progress=False)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=_rows, default=[1_000_000, 10_000_000, 100_000_000],
                        help="comma-separated row counts, e.g. 1e6,1e7")
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--data-root", type=Path, default=Path("data/scale"))
    parser.add_argument("--out", type=Path, default=Path("runs/scale"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="pipeline config override, e.g. --set pretrain.batch_size=4096")
    args = parser.parse_args()
    from iak_dist.runtime import say

    args.out.mkdir(parents=True, exist_ok=True)
    points: list[dict[str, Any]] = []
    for i, rows in enumerate(args.rows):
        points.append(measure(rows, args))
        for later in args.rows[i + 1:]:
            say(f"[scale]   estimate for {later:,} rows: {points[-1]['wall_s'] * later / rows / 60:.0f} min "
                f"of pipeline (scaled by rows from {rows:,})")
        (args.out / "scale.json").write_text(json.dumps(points, indent=2) + "\n")
    plot(points, args.out / "scale.png")
    print(markdown(points))
    say(f"[scale] wrote {args.out / 'scale.json'} and {args.out / 'scale.png'}")


if __name__ == "__main__":
    main()
