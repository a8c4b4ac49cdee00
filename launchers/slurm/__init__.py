"""SLURM launchers: sbatch scripts generated from a pipeline config, and their submission.

`iak-dist slurm CONFIG --out DIR` writes into DIR:

- `pipeline.yaml`: the resolved config (overrides applied, paths absolute);
- `ray_pipeline.sbatch`: starts a Ray head on the first allocated node and a Ray worker on every
  other one (each through `srun`, kept in the foreground with `--block` so SLURM tracks and cleans
  them up), waits for the cluster, runs the whole pipeline on it, and stops Ray;
- `torchrun_phase.sbatch`: one phase (`pretrain`, `finetune --strategy S`, or the pipeline
  without Ray) under `srun` + `torchrun`, one task per node, `--procs-per-node` ranks per node.

Resources and preemption: `--gres` (e.g. `gpu:4`), `--mem` (e.g. `64G`), `--account`, `--signal`
(e.g. `B:TERM@120`: SIGTERM to the batch shell 120 s before the time limit, which passes it on to the
pipeline so it can stop at a checkpoint) and `--requeue` (a preempted job goes back to the queue and
its re-run resumes from the run folder's checkpoints).

With `--submit` it also checks the partition, runs `sbatch`, waits for the job and returns its
final state (exit code 0 only for COMPLETED). Once SLURM forgets a finished job (`MinJobAge`),
`scontrol` no longer knows it: the state then comes from `sacct`, or the wait ends with UNKNOWN and
a line saying where its log is.
"""

from __future__ import annotations

import re
import shlex
import shutil
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
    """What the sbatch headers ask SLURM for (the `iak-dist slurm` flags of the same names)."""

    nodes: int = 1
    cpus_per_task: int = 2
    partition: str = ""
    time_limit: str = "01:00:00"
    ray_port: int = 6379
    procs_per_node: int = 1
    phase: str = "pretrain"
    strategy: str = "iak"
    gres: str = ""
    """Generic resources per node, e.g. `gpu:4` (empty: none asked for)."""
    mem: str = ""
    """Memory per node, e.g. `64G` (empty: the partition's default, often far less than a job needs)."""
    account: str = ""
    """Account to charge (empty: the user's default account)."""
    signal: str = ""
    """Warning signal before the time limit, SLURM's `[B:]SIG[@seconds]`, e.g. `B:TERM@120` (empty: none)."""
    requeue: bool = False
    """Put the job back in the queue when it is preempted or its node fails (it resumes from checkpoints)."""


MEMORY = re.compile(r"^\d+[KMGT]?$")
SIGNAL = re.compile(r"^(?:[BR]{1,2}:)?(?:SIG)?[A-Z0-9]+(?:@\d+)?$")


def check_options(opts: SlurmOptions) -> None:
    """Refuse what sbatch would refuse, in one line naming the flag, before anything is written."""
    if opts.phase not in ("pretrain", "finetune", "pipeline"):
        raise UserError(f"--phase {opts.phase}: expected pretrain, finetune or pipeline")
    if opts.mem and not MEMORY.match(opts.mem):
        raise UserError(f"--mem {opts.mem}: expected a size such as 4000M or 64G")
    if opts.signal and not SIGNAL.match(opts.signal):
        raise UserError(f"--signal {opts.signal}: expected SLURM's [B:]SIG[@seconds], e.g. B:TERM@120")
    for flag, value in (("--gres", opts.gres), ("--account", opts.account), ("--partition", opts.partition)):
        if any(c.isspace() for c in value):
            raise UserError(f"{flag} {value!r}: no spaces allowed")


def _header(name: str, opts: SlurmOptions, out: Path) -> str:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --nodes={opts.nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --cpus-per-task={opts.cpus_per_task}",
             f"#SBATCH --time={opts.time_limit}", f"#SBATCH --output={out / (name + '-%j.log')}"]
    for flag, value in (("partition", opts.partition), ("account", opts.account), ("gres", opts.gres),
                        ("mem", opts.mem), ("signal", opts.signal)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    if opts.requeue:
        lines.append("#SBATCH --requeue")
    return "\n".join(lines) + "\nset -euo pipefail\n" + FORWARD_SIGNALS


FORWARD_SIGNALS = """
# Run a command in the background and pass SIGTERM / SIGINT / SIGUSR1 on to it: bash runs no trap
# while a foreground child runs, so a signal for the batch shell (scancel, --signal=B:...) would
# otherwise never reach the pipeline, which stops at a checkpoint when it gets one.
forward_signals() {
  "$@" &
  local pid=$!
  trap 'echo "[slurm] signal received: SIGTERM to $1 (PID $pid)" >&2; kill -TERM "$pid" 2>/dev/null' TERM INT USR1
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done  # a trapped signal ends a wait early
  trap - TERM INT USR1
  wait "$pid"  # the command's exit status (bash keeps it once the child is reaped)
}
"""


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
forward_signals {python} -m iak_dist.cli pipeline run {config} --address "$address" || status=$?
# only this job's Ray nodes: `ray stop` would stop every Ray on the machine (another job's, a user's)
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
forward_signals srun {python} -m torch.distributed.run --nnodes="$SLURM_NNODES" \\
    --nproc_per_node={opts.procs_per_node} {rendezvous} -m iak_dist.cli {verb}
"""


def write_scripts(cfg: PipelineConfig, out: str | Path, opts: SlurmOptions) -> dict[str, Path]:
    check_options(opts)
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


ACTIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
                 "SIGNALING", "STAGE_OUT")
"""Job states after which the job still runs (again); any other state is final."""


def submit_and_wait(script: Path, partition: str, poll_s: float = 2.0, requeue: bool = False) -> tuple[str, str]:
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
    return job, wait_for_job(job, poll_s, requeue, log_hint=str(script.parent / f"*-{job}.log"))


def wait_for_job(job: str, poll_s: float = 2.0, requeue: bool = False, log_hint: str = "",
                 max_errors: int = 30) -> str:
    """Poll `scontrol` until job `job` ends; returns its final state.

    A requeued job (`requeue`) that was preempted is waited for again. When `scontrol` does not know
    the job (SLURM forgets finished jobs after `MinJobAge`; or the id is wrong) the state comes from
    `sacct`; without accounting the wait returns "UNKNOWN" at once with a line saying so (it used to
    poll forever). `scontrol` failing otherwise (slurmctld unreachable) is retried `max_errors` times.
    """
    state, errors = "PENDING", 0
    while True:
        shown = _run(["scontrol", "show", "job", job])
        if shown.returncode != 0:
            if "invalid job id" not in shown.stderr.lower():
                errors += 1
                if errors > max_errors:
                    raise UserError(f"scontrol show job {job}: {(shown.stderr.strip() or 'failed').splitlines()[-1]}"
                                    f" ({errors} times in a row); is slurmctld up?")
                time.sleep(poll_s)
                continue
            final = sacct_state(job)
            if final is not None:
                return final
            where = f"; its log: {log_hint}" if log_hint else ""
            print(f"[slurm] job {job}: scontrol no longer knows it and sacct has no record of it (accounting off?); "
                  f"last seen {state}, final state unknown{where}", file=sys.stderr, flush=True)
            return "UNKNOWN"
        errors = 0
        fields = dict(f.split("=", 1) for f in shown.stdout.split() if "=" in f)
        state = fields.get("JobState", state)
        if state not in ACTIVE_STATES and not (requeue and state == "PREEMPTED"):
            return state
        time.sleep(poll_s)


def sacct_state(job: str) -> str | None:
    """The job's state from SLURM's accounting, or None without accounting or a record."""
    if shutil.which("sacct") is None:
        return None
    try:
        found = subprocess.run(["sacct", "-j", job, "-X", "-n", "-P", "-o", "State"], capture_output=True,
                               text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    lines = [line.split()[0] for line in found.stdout.splitlines() if line.strip()]
    return lines[-1] if found.returncode == 0 and lines else None  # "CANCELLED by 0" -> CANCELLED
