"""SLURM launchers: sbatch scripts generated from a pipeline config, and their submission.

`iak-dist slurm CONFIG --out DIR` writes into DIR:

- `pipeline.yaml`: the resolved config (overrides applied, paths absolute);
- `ray_pipeline.sbatch`: starts a Ray head on the first allocated node and a Ray worker on every
  other one (each through `srun`, kept in the foreground with `--block` so SLURM tracks and cleans
  them up), waits for the cluster, runs the whole pipeline on it, and stops Ray;
- `torchrun_phase.sbatch`: one phase (`pretrain`, `finetune --strategy S`, or the pipeline
  without Ray) under `srun` + `torchrun`, one task per node, `--procs-per-node` ranks per node.

With `--submit` it also checks the partition, runs `sbatch`, waits for the job and returns its
final state (exit code 0 only for COMPLETED).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from iak_dist.config import PipelineConfig
from iak_dist.errors import UserError
from iak_dist.io import atomic_write_text
from launchers.submit import resolved_config


@dataclass
class SlurmOptions:
    nodes: int = 1
    cpus_per_task: int = 2
    partition: str = ""
    time_limit: str = "01:00:00"
    ray_port: int = 6379
    procs_per_node: int = 1
    phase: str = "pretrain"
    strategy: str = "iak"


def _header(name: str, opts: SlurmOptions, out: Path) -> str:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --nodes={opts.nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --cpus-per-task={opts.cpus_per_task}",
             f"#SBATCH --time={opts.time_limit}", f"#SBATCH --output={out / (name + '-%j.log')}"]
    if opts.partition:
        lines.append(f"#SBATCH --partition={opts.partition}")
    return "\n".join(lines) + "\nset -euo pipefail\n"


def ray_pipeline_script(out: Path, opts: SlurmOptions) -> str:
    python = shlex.quote(sys.executable)
    ray = shlex.quote(str(Path(sys.executable).parent / "ray"))
    config = shlex.quote(str(out / "pipeline.yaml"))
    return _header("iak-dist-ray", opts, out) + f"""
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
[[ -f ~/.ray/auth_token || -n ${{RAY_AUTH_TOKEN:-}} ]] && export RAY_AUTH_MODE=token  # Ray 2.60 token auth
export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${{nodes[0]}}
if [[ ${{#nodes[@]}} -eq 1 ]]; then head_ip=127.0.0.1; else
  head_ip=$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{{print $1}}'); fi
address=$head_ip:{opts.ray_port}
echo "[slurm] Ray head on $head ($address), $((${{#nodes[@]}} - 1)) worker node(s)"
# --block keeps each Ray node a child of its srun step: SLURM tracks and cleans it up
srun --nodes=1 --ntasks=1 --overlap -w "$head" {ray} start --head --block --node-ip-address="$head_ip" \\
    --port={opts.ray_port} --num-cpus="$SLURM_CPUS_PER_TASK" --include-dashboard=false --disable-usage-stats &
for node in "${{nodes[@]:1}}"; do
  srun --nodes=1 --ntasks=1 --overlap -w "$node" {ray} start --block --address="$address" \\
      --num-cpus="$SLURM_CPUS_PER_TASK" --disable-usage-stats &
done
for _ in $(seq 120); do {ray} status --address="$address" >/dev/null 2>&1 && break; sleep 1; done
{ray} status --address="$address" >/dev/null
status=0
{python} -m iak_dist.cli pipeline run {config} --address "$address" || status=$?
{ray} stop --force >/dev/null 2>&1 || true
kill $(jobs -p) 2>/dev/null || true
wait || true
exit $status
"""


def torchrun_phase_script(out: Path, opts: SlurmOptions) -> str:
    python = shlex.quote(sys.executable)
    config = shlex.quote(str(out / "pipeline.yaml"))
    verb = {"pretrain": f"pretrain {config}", "finetune": f"finetune {config} --strategy {opts.strategy}",
            "pipeline": f"pipeline run --no-ray {config}"}[opts.phase]
    rendezvous = ("--standalone" if opts.nodes == 1 else
                  '--rdzv_backend=c10d --rdzv_endpoint="$head:29500" --rdzv_id="$SLURM_JOB_ID"')
    return _header(f"iak-dist-{opts.phase}", opts, out) + f"""
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun {python} -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc_per_node={opts.procs_per_node} \\
    {rendezvous} -m iak_dist.cli {verb}
"""


def write_scripts(cfg: PipelineConfig, out: str | Path, opts: SlurmOptions) -> dict[str, Path]:
    if opts.phase not in ("pretrain", "finetune", "pipeline"):
        raise UserError(f"--phase {opts.phase}: expected pretrain, finetune or pipeline")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "pipeline.yaml", yaml.safe_dump(resolved_config(cfg), sort_keys=False))
    paths = {"ray": out / "ray_pipeline.sbatch", "torchrun": out / "torchrun_phase.sbatch"}
    atomic_write_text(paths["ray"], ray_pipeline_script(out, opts))
    atomic_write_text(paths["torchrun"], torchrun_phase_script(out, opts))
    for p in paths.values():
        p.chmod(0o755)
    return paths


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError as exc:
        raise UserError(f"{cmd[0]}: not found; install SLURM's client tools (Debian: slurm-client)") from exc


def submit_and_wait(script: Path, partition: str, poll_s: float = 2.0) -> tuple[str, str]:
    """sbatch `script`, wait for the job to end; returns (job id, final state)."""
    if partition:
        known = _run(["sinfo", "-h", "-o", "%R"]).stdout.split()
        if partition not in known:
            raise UserError(f"--partition {partition}: no such SLURM partition; "
                            f"partitions: {', '.join(known) or 'none'}")
    submitted = _run(["sbatch", "--parsable", str(script)])
    if submitted.returncode != 0:
        raise UserError(f"sbatch {script}: {submitted.stderr.strip().splitlines()[-1]}")
    job = submitted.stdout.strip().split(";")[0]
    print(f"[slurm] submitted job {job}: {script}", file=sys.stderr, flush=True)
    state = "PENDING"
    while True:
        shown = _run(["scontrol", "show", "job", job]).stdout
        fields = dict(f.split("=", 1) for f in shown.split() if "=" in f)
        state = fields.get("JobState", state)
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"):
            return job, state
        time.sleep(poll_s)
