"""`iak-dist submit --address http://HOST:8265 CONFIG`: the pipeline as a Ray job on a cluster.

The job's working dir holds only the resolved config (every override applied, `run_dir` and
`data.dir` made absolute); the `iak_dist` package travels as a runtime-env module. The job runs
`python -m iak_dist.cli pipeline run pipeline.yaml --address auto` on the cluster, whose nodes must
have the pinned stack installed (start them from the project's venv). A short probe job checks that
first: a head started without the venv's `python` on its PATH would otherwise fail only after the
upload, with a `ModuleNotFoundError` in the job's log. Outputs land at the absolute
paths, so the cluster must share that file system with the submitter (one node, or NFS). Logs are
streamed until the job ends; the exit code is 0 only if it SUCCEEDED.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import yaml

import iak_dist
from iak_dist.config import PipelineConfig, to_dict, with_absolute_paths
from iak_dist.errors import UserError


def resolved_config(cfg: PipelineConfig) -> dict:
    """The config as data, overrides applied and paths absolute (what a job on another host reads)."""
    return to_dict(with_absolute_paths(cfg))


STACK = ("torch", "fbgemm_gpu", "torchrec", "deepspeed", "pyarrow", "iak_dist")
PROBE = ("python -c \"import sys; print(sys.executable); import importlib; "
         f"[importlib.import_module(m) for m in {list(STACK)!r}]\"")


def submit_job(client, wait_s: float = 300.0, **job) -> str:
    """`client.submit_job(**job)`, waiting while a head that just started has no job agent up yet
    (its job server answers "No available agent to submit job" for seconds, minutes on a busy machine)."""
    deadline, said = time.monotonic() + wait_s, False
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise UserError(f"the cluster's job agent did not come up in {wait_s:.0f} s; check the head's "
                                "dashboard_agent.log (in its session folder, logs/)") from exc
            if not said:
                print("[submit] waiting for the cluster's job agent (a head that just started has none yet)",
                      file=sys.stderr, flush=True)
                said = True
            time.sleep(2.0)


def check_cluster_python(client, address: str, modules: list[str], timeout_s: float = 300.0) -> None:
    """Run a probe job importing the stack with the cluster's `python`; one line if it cannot."""
    from ray.job_submission import JobStatus

    job_id = submit_job(client, entrypoint=PROBE, runtime_env={"py_modules": modules})
    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                            JobStatus.STOPPED):
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            raise UserError(f"--address {address}: a probe job did not finish in {timeout_s:.0f} s "
                            f"(is the cluster out of CPUs?); nothing was submitted")
        time.sleep(0.5)
    if status != JobStatus.SUCCEEDED:
        lines = [line.strip() for line in client.get_job_logs(job_id).splitlines() if line.strip()]
        python = lines[0] if lines and lines[0].startswith("/") else "`python` on its PATH"
        raise UserError(f"--address {address}: the cluster's python ({python}) cannot import the stack "
                        f"({lines[-1] if lines else status}); start the Ray head from the project's venv "
                        f"(`source .venv/bin/activate && ray start --head`); nothing was submitted")


def submit(address: str, cfg: PipelineConfig, follow: bool = True) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, RuntimeError from Ray's SDK
        raise UserError(f"--address {address}: no Ray job server answers there "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    modules = [str(Path(iak_dist.__file__).parent)]
    check_cluster_python(client, address, modules)
    staging = Path(tempfile.mkdtemp(prefix="iak-dist-job-"))
    (staging / "pipeline.yaml").write_text(yaml.safe_dump(resolved_config(cfg), sort_keys=False))
    entrypoint = "python -m iak_dist.cli pipeline run pipeline.yaml --address auto"
    job_id = submit_job(client, entrypoint=entrypoint, runtime_env={
        "working_dir": str(staging), "py_modules": modules,
        "env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    })
    print(f"[submit] job {job_id} on {address}: {entrypoint} (run_dir {cfg.run_dir})", file=sys.stderr, flush=True)
    if not follow:
        return 0

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    print(f"[submit] job {job_id}: {status}", file=sys.stderr, flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1
