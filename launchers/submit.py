"""`iak-dist submit --address http://HOST:8265 CONFIG`: the pipeline as a Ray job on a cluster.

The project folder is shipped as the job's working dir (data, runs and the venv excluded); the
job runs `python -m iak_dist.cli pipeline run CONFIG --address auto` on the cluster, whose nodes
must have the pinned stack installed (start them from the project's venv). Paths in the config
(`run_dir`, `data.dir`) are made absolute here, so outputs land where the submitter sees them:
the cluster must share that file system (a single node, or NFS). Logs are streamed until the job
ends; the exit code is 0 only if it SUCCEEDED.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from iak_dist.config import PipelineConfig
from iak_dist.errors import UserError

EXCLUDES = [".venv", ".git", "runs", "results_runs", "data", "**/__pycache__", ".pytest_cache", ".ruff_cache"]


def submit(address: str, config: str, overrides: list[str], cfg: PipelineConfig, follow: bool = True) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    project = Path(__file__).resolve().parent.parent
    config_path = Path(config).resolve()
    try:
        relative_config = config_path.relative_to(project)
    except ValueError as exc:
        raise UserError(f"{config}: the config must lie inside the project folder {project} "
                        f"(it is shipped as the job's working dir)") from exc
    pinned = [f"run_dir={Path(cfg.run_dir).resolve()}", f"data.dir={Path(cfg.data.dir).resolve()}"]
    args = " ".join(f"--set '{o}'" for o in [*overrides, *pinned])
    entrypoint = f"python -m iak_dist.cli pipeline run {relative_config} --address auto {args}"
    if Path.home().joinpath(".ray", "auth_token").is_file() or "RAY_AUTH_TOKEN" in os.environ:
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray 2.60 heads require the token by default
    try:
        client = JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, RuntimeError from Ray's SDK
        raise UserError(f"--address {address}: no Ray job server answers there "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    job_id = client.submit_job(entrypoint=entrypoint,
                               runtime_env={"working_dir": str(project), "excludes": EXCLUDES,
                                            "env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}})
    print(f"[submit] job {job_id} on {address}: {entrypoint}", file=sys.stderr, flush=True)
    if not follow:
        return 0

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    print(f"[submit] job {job_id}: {status}", file=sys.stderr, flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1
