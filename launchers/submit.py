"""`iak-dist submit --address http://HOST:8265 CONFIG`: the pipeline as a Ray job on a cluster.

The job's working dir holds only the resolved config (every override applied, `run_dir` and
`data.dir` made absolute); the `iak_dist` package travels as a runtime-env module. The job runs
`python -m iak_dist.cli pipeline run pipeline.yaml --address auto` on the cluster, whose nodes must
have the pinned stack installed (start them from the project's venv). Outputs land at the absolute
paths, so the cluster must share that file system with the submitter (one node, or NFS). Logs are
streamed until the job ends; the exit code is 0 only if it SUCCEEDED.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import yaml

import iak_dist
from iak_dist.config import PipelineConfig, to_dict, with_absolute_paths
from iak_dist.errors import UserError


def resolved_config(cfg: PipelineConfig) -> dict:
    """The config as data, overrides applied and paths absolute (what a job on another host reads)."""
    return to_dict(with_absolute_paths(cfg))


def submit(address: str, cfg: PipelineConfig, follow: bool = True) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, RuntimeError from Ray's SDK
        raise UserError(f"--address {address}: no Ray job server answers there "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    staging = Path(tempfile.mkdtemp(prefix="iak-dist-job-"))
    (staging / "pipeline.yaml").write_text(yaml.safe_dump(resolved_config(cfg), sort_keys=False))
    entrypoint = "python -m iak_dist.cli pipeline run pipeline.yaml --address auto"
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={
        "working_dir": str(staging), "py_modules": [str(Path(iak_dist.__file__).parent)],
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
