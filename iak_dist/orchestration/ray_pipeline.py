"""The pipeline as phases scheduled by Ray: an embedded local Ray by default, or a cluster.

Each training phase (pretrain, finetune, evaluate) is a Ray Train `TorchTrainer` whose workers
run the same phase functions as the in-process pipeline, on a process group Ray Train set up
(gloo on CPU, NCCL on GPU). Workers report every distributed checkpoint with `ray.train.report`;
a crashed worker group is restarted by `FailureConfig` and resumes from the last complete
checkpoint. The driver keeps `manifest.json` in the run directory: a re-run skips finished phases
and restarts unfinished ones, which resume from their own checkpoints. Phases whose dependencies
are done run concurrently when Ray has the resources.
"""

from __future__ import annotations

import concurrent.futures as futures
import time
from pathlib import Path
from typing import Any

from iak_dist.config import PhaseSpec, PipelineConfig, from_dict, to_dict, with_absolute_paths
from iak_dist.data.prepare import is_prepared
from iak_dist.errors import UserError
from iak_dist.orchestration.local import log, seed_dir
from iak_dist.orchestration.manifest import Manifest
from iak_dist.orchestration.spec import phases_of
from iak_dist.orchestration.status import progress_line


def start_ray(address: str, num_cpus: int) -> bool:
    """Connect to `address`, or start an embedded Ray bound to 127.0.0.1. Returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except Exception as exc:  # ConnectionError, TimeoutError, ValueError from Ray's client
            raise UserError(f"orchestration.address {address!r}: no Ray cluster answers there "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
        return False
    # every worker quiets the stack's import-time chatter (FBGEMM logs each library it loads) first
    ray.init(num_cpus=num_cpus or None, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=True, configure_logging=False,
             runtime_env={"worker_process_setup_hook": "iak_dist.runtime.configure_environment"})
    return True


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a dead address: Ray's own client retries for minutes before giving up."""
    import socket

    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"orchestration.address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(f"orchestration.address {address!r}: no Ray cluster answers there ({exc.strerror or exc}); "
                        f"start one with `ray start --head` or leave the address empty for an embedded Ray") from exc


def run_ray_pipeline(cfg: PipelineConfig, address: str | None = None) -> Path:
    cfg = with_absolute_paths(cfg)  # Ray tasks and Train workers run in other folders
    run_dir = Path(cfg.run_dir)
    backbones = all((seed_dir(cfg, s) / "backbone" / "backbone.json").is_file() for s in cfg.seeds)
    phases = phases_of(cfg, backbones_exist=backbones, data_exists=is_prepared(cfg.data.dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.open(run_dir, [p.name for p in phases])
    address = cfg.orchestration.address if address is None else address
    started = start_ray(address, cfg.orchestration.num_cpus)
    try:
        _schedule(cfg, phases, manifest, run_dir)
    finally:
        if started:
            import ray

            ray.shutdown()
    return run_dir


def _schedule(cfg: PipelineConfig, phases: list[PhaseSpec], manifest: Manifest, run_dir: Path) -> None:
    by_name = {p.name: p for p in phases}
    for p in phases:
        if manifest.state(p.name) == "done":
            log(f"phase {p.name}: done in an earlier run, skipping")
    running: dict[futures.Future, str] = {}
    failed: list[str] = []
    with futures.ThreadPoolExecutor(max_workers=len(phases)) as pool:
        while True:
            if not failed:
                for p in phases:
                    active = set(running.values())
                    if (manifest.state(p.name) != "done" and p.name not in active
                            and all(manifest.state(d) == "done" for d in p.after)):
                        manifest.start(p.name)
                        log(f"phase {p.name} ({p.type}): started, attempt {manifest.phases[p.name]['attempts']}")
                        running[pool.submit(_run_phase, cfg, p, run_dir)] = p.name
            if not running:
                break
            done, _ = futures.wait(running, timeout=15, return_when=futures.FIRST_COMPLETED)
            if not done:  # progress of the running training loops, read from their progress.json
                for name in running.values():
                    line = progress_line(run_dir, manifest.phases[name]["started"])
                    if line:
                        log(f"phase {name}: {line}")
            for fut in done:
                name = running.pop(fut)
                try:
                    metrics = fut.result()
                except Exception as exc:  # noqa: BLE001  (a failed phase must not lose the others)
                    message = _explain(exc)
                    manifest.update(name, state="failed", finished=time.time(), error=message)
                    log(f"phase {name}: FAILED: {message}")
                    failed.append(name)
                    continue
                manifest.update(name, state="done", finished=time.time(), metrics=metrics.get("metrics", {}),
                                checkpoint=metrics.get("checkpoint"))
                entry = manifest.phases[name]
                log(f"phase {name}: done in {entry['finished'] - entry['started']:.0f} s")
    if failed:
        raise UserError(f"phase {failed[0]} ({by_name[failed[0]].type}) failed: "
                        f"{manifest.phases[failed[0]]['error']}; fix it and run the same command again to resume "
                        f"(finished phases are kept)")
    log(f"pipeline done: {run_dir / 'report.md'}")


def _explain(exc: BaseException) -> str:
    """One line for a failed phase: a worker's `UserError` message if there is one, else the first line."""
    text = str(exc)
    marker = "UserError: "
    found = [line.split(marker, 1)[1].strip() for line in text.splitlines() if marker in line]
    if found:
        return found[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _run_phase(cfg: PipelineConfig, phase: PhaseSpec, run_dir: Path) -> dict[str, Any]:
    import ray

    payload = {"config": to_dict(cfg), "phase": to_dict(phase)}
    if phase.type in ("prepare", "export"):
        task = ray.remote(num_cpus=1)(_driverless_phase)
        return ray.get(task.remote(payload))
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _train_worker, train_loop_config=payload,
        torch_config=TorchConfig(backend="nccl" if phase.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=phase.workers, use_gpu=phase.use_gpu,
                                     resources_per_worker={"GPU": 1} if phase.use_gpu else {"CPU": 1}),
        run_config=RunConfig(storage_path=str(run_dir / "ray"), name=phase.name,
                             failure_config=FailureConfig(max_failures=phase.max_failures)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return {"metrics": dict(result.metrics or {}),
            "checkpoint": result.checkpoint.path if result.checkpoint is not None else None}


def _configs(payload: dict[str, Any]) -> tuple[PipelineConfig, PhaseSpec]:
    from iak_dist.runtime import configure_environment

    configure_environment()
    return (from_dict(PipelineConfig, payload["config"], "pipeline config"),
            from_dict(PhaseSpec, payload["phase"], "phase"))


def _driverless_phase(payload: dict[str, Any]) -> dict[str, Any]:
    """prepare and export: a plain Ray task."""
    cfg, phase = _configs(payload)
    if phase.type == "prepare":
        from iak_dist.orchestration.local import ensure_data

        ensure_data(cfg)
        return {"metrics": {}}
    from iak_dist.serving.export import export_run

    return {"metrics": {}, "checkpoint": str(export_run(cfg))}


def _train_worker(payload: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: one phase on the process group Ray Train set up."""
    import ray.train

    cfg, phase = _configs(payload)
    from iak_dist.distributed.context import init_distributed

    ctx = init_distributed()

    def report_checkpoint(step: int, path: Path) -> None:
        # every rank reports the same number of times; rank 0 hands Ray the (shared) folder
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if ctx.is_main else None
        ray.train.report({"step": step, "phase": phase.name}, checkpoint=checkpoint)

    metrics: dict[str, Any] = {}
    if phase.type == "pretrain":
        from iak_dist.phases.pretrain import pretrain

        for seed in cfg.seeds:
            if (seed_dir(cfg, seed) / "backbone" / "backbone.json").is_file():
                continue
            summary = pretrain(cfg.data.dir, cfg.model, cfg.pretrain, cfg.distributed, seed, seed_dir(cfg, seed),
                               ctx, show_progress=False, on_checkpoint=report_checkpoint)
            metrics[f"pretrain/loss/seed{seed}"] = summary["train/loss_ema"]
    elif phase.type == "finetune":
        from iak_dist.phases.finetune import finetune

        for seed in cfg.seeds:
            for strategy in phase.strategies or cfg.finetune.strategies:
                adapter_dir = seed_dir(cfg, seed) / "adapters" / strategy
                if (adapter_dir / "adapter_config.json").is_file():
                    continue
                finetune(cfg.data.dir, seed_dir(cfg, seed) / "backbone", strategy, cfg.finetune, seed, adapter_dir,
                         ctx, show_progress=False, dist_cfg=cfg.distributed, on_checkpoint=report_checkpoint)
    elif phase.type == "evaluate":
        import json

        from iak_dist.orchestration.local import evaluate_and_report

        run_dir = evaluate_and_report(cfg, ctx)
        agg = json.loads((run_dir / "report.json").read_text())["aggregate"]
        metrics = {f"eval/ctr_auc/{s}": agg[s]["overall"]["ctr_auc"]["mean"] for s in agg}
    ray.train.report(metrics)
