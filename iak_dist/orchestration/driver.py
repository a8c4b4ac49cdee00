"""The pipeline driver: one loop for every way of running, with two executors.

`run_pipeline` validates the phase graph (`spec.phases_of`) before anything is written, locks
the run directory (`lock.py`), writes the resolved `config.yaml`, opens `manifest.json`, then
runs the phases in topological order: each phase starts when its dependencies are done; a phase
done in an earlier run with the same spec is skipped; state, attempts, metrics and errors are
recorded. The executor runs the phases:

- in-process (`local.InProcessExecutor`): `--no-ray`, and every rank of a torchrun / srun launch
  (every rank runs this loop; only rank 0 writes files; phases are collective);
- Ray (`ray_pipeline.RayExecutor`): Ray Train runs and Ray tasks on an embedded Ray or a cluster.

SIGTERM / SIGINT stop the running phases (Ray: shutting Ray down ends its workers; in-process: an
exception at the next Python step of the phase), mark them `interrupted`, stop the embedded Ray
and raise `Interrupted`, which the CLI turns into one line and exit code 128 + signal.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from iak_dist.config import PhaseSpec, PipelineConfig, to_dict, with_absolute_paths
from iak_dist.data.prepare import is_prepared
from iak_dist.distributed.context import DistContext
from iak_dist.errors import UserError
from iak_dist.io import atomic_write_text
from iak_dist.orchestration.local import InProcessExecutor, log, seed_dir
from iak_dist.orchestration.lock import RunLock
from iak_dist.orchestration.manifest import Manifest
from iak_dist.orchestration.outcome import Interrupted, last_line, os_error_line, user_facing
from iak_dist.orchestration.spec import phases_of
from iak_dist.orchestration.status import progress_line
from iak_dist.runtime import interrupt_or_defer

PROGRESS_EVERY_S = 15.0
WHAT_SECTIONS = ("data", "model", "pretrain", "generative", "finetune")
"""The config sections that decide what a run's phases produce (the others say how: workers, retries,
sharding, evaluation batches). A run directory whose phases ran keeps them: a re-run that changes one
of their keys is refused, or the report would mix results of two configs under the new one's name."""
HOW_KEYS = ("finetune.strategies", "finetune.prefix_cache")
"""Keys of those sections that do not change a finished phase's results: strategies are each phase's
spec (new ones run, finished ones are kept); the prefix cache computes what the lookups do (bitwise in
the tests; at most in the last bits where a GEMM's rounding depends on its row count)."""


def run_pipeline(cfg: PipelineConfig, use_ray: bool = False, address: str | None = None,
                 show_progress: bool = True, ctx: DistContext | None = None) -> Path:
    """Run (or resume) the pipeline of `cfg`; returns the run directory.

    `use_ray`: phases on Ray (`address`, else `orchestration.address`, else an embedded Ray);
    otherwise in this process, on `ctx` if given (a sweep reuses one process group).
    """
    cfg = with_absolute_paths(cfg)  # Ray tasks and workers run in other folders; the manifest outlives cwd
    if use_ray:
        from iak_dist.orchestration.ray_pipeline import RayExecutor

        executor: Any = RayExecutor(cfg, address)
    else:
        executor = InProcessExecutor(cfg, show_progress, ctx)
    with executor:
        return Driver(cfg, executor).run()


def phase_spec(cfg: PipelineConfig, phase: PhaseSpec) -> dict[str, Any]:
    """What a phase produces: when it changes (another type, other seeds or strategies), a done
    phase runs again (and skips the seeds and strategies it finished before). Workers, GPUs and
    retries change how, not what: they do not count."""
    spec: dict[str, Any] = {"type": phase.type}
    if phase.type != "prepare":
        spec["seeds"] = list(cfg.seeds)
    if phase.type in ("finetune", "evaluate", "export"):
        spec["strategies"] = list(phase.strategies or cfg.finetune.strategies)
    return spec


class Driver:
    def __init__(self, cfg: PipelineConfig, executor: Any) -> None:
        self.cfg = cfg
        self.executor = executor
        self.run_dir = Path(cfg.run_dir)
        self.running: set[str] = set()

    def run(self) -> Path:
        cfg, ex = self.cfg, self.executor
        backbones = all((seed_dir(cfg, s) / "backbone" / "backbone.json").is_file() for s in cfg.seeds)
        phases = phases_of(cfg, backbones_exist=backbones, data_exists=is_prepared(cfg.data.dir, cfg.data))
        specs = {p.name: phase_spec(cfg, p) for p in phases}
        lock = ex.main_only(lambda: RunLock.acquire(self.run_dir, log))
        try:
            manifest = self._open(specs)
            with _signals_raise_interrupted():
                ex.start(lock)
                try:
                    self._schedule(phases, specs, manifest)
                except Interrupted as exc:
                    _close_progress_bars()
                    stopped = sorted(self.running)
                    for name in stopped:
                        with contextlib.suppress(UserError):  # a full disk must not hide the interruption
                            manifest.update(name, state="interrupted", finished=time.time(),
                                            error=f"interrupted by {exc}")
                    exc.message = (f"interrupted by {exc}: " + (f"phase {', '.join(stopped)} stopped and marked "
                                   f"interrupted" if stopped else "no phase was running")
                                   + f"; run the same command again to resume ({self.run_dir})")
                    raise
                finally:
                    ex.stop()
        finally:
            if lock is not None:
                lock.release()
        return self.run_dir

    def _open(self, specs: dict[str, Any]) -> Manifest:
        """Rank 0 writes config.yaml and the manifest; every rank gets the manifest's phases."""

        def write() -> dict:
            refuse_other_config(self.run_dir, self.cfg)
            try:
                atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
            except OSError as exc:
                raise UserError(os_error_line(exc, "cannot write the resolved config", resume=True)) from exc
            return Manifest.open(self.run_dir, specs).phases

        phases = self.executor.main_only(write, share=True)
        return Manifest(self.run_dir / "manifest.json", phases, writable=self.executor.is_main)

    def _schedule(self, phases: list[PhaseSpec], specs: dict[str, Any], manifest: Manifest) -> None:
        by_name = {p.name: p for p in phases}
        done = {p.name for p in phases if manifest.is_done(p.name, specs[p.name])}
        for p in phases:
            if p.name in done:
                log(f"phase {p.name}: done in an earlier run, skipping")
        running: dict[futures.Future, str] = {}
        failed: list[str] = []
        while True:
            for p in phases:
                if failed:
                    break
                if p.name in done or p.name in self.running or not all(d in done for d in p.after):
                    continue
                self.executor.ready()  # Ray starts with the first phase that runs (a bad address fails here)
                manifest.start(p.name, specs[p.name])
                log(f"phase {p.name} ({p.type}): started on {self.executor.name}, "
                    f"attempt {manifest.phases[p.name]['attempts']}")
                self.running.add(p.name)
                fut = self.executor.submit(p)  # in-process: runs now, returns a finished future
                running[fut] = p.name
                if fut.done():
                    self._finish(fut, running, manifest, done, failed)
            if not running:
                break
            finished, _ = futures.wait(running, timeout=PROGRESS_EVERY_S, return_when=futures.FIRST_COMPLETED)
            if not finished:  # progress of the running training loops, read from their progress.json
                for name in running.values():
                    line = progress_line(self.run_dir, manifest.phases[name], manifest.phases[name]["started"])
                    if line:
                        log(f"phase {name}: {line}")
            for fut in finished:
                self._finish(fut, running, manifest, done, failed)
        if failed:
            name = failed[0]
            raise UserError(f"phase {name} ({by_name[name].type}) failed: {manifest.phases[name]['error']}; "
                            f"fix it and run the same command again to resume (finished phases are kept)")
        log(f"pipeline done: {self.run_dir / 'report.md'}")

    def _finish(self, fut: futures.Future, running: dict, manifest: Manifest, done: set, failed: list) -> None:
        name = running.pop(fut)
        self.running.discard(name)
        entry = manifest.phases[name]
        exc = fut.exception()
        if exc is None:
            outcome = fut.result() or {}
            manifest.update(name, state="done", finished=time.time(), metrics=outcome.get("metrics", {}),
                            checkpoint=outcome.get("checkpoint"),
                            attempts=entry["attempts"] + int(outcome.get("restarts", 0)))
            done.add(name)
            restarts = f", {outcome['restarts']} worker-group restart(s)" if outcome.get("restarts") else ""
            log(f"phase {name}: done in {entry['finished'] - entry['started']:.0f} s{restarts}")
            return
        _close_progress_bars()
        line = user_facing(exc)
        message = line or last_line(exc)
        manifest.update(name, state="failed", finished=time.time(), error=message,
                        attempts=entry["attempts"] + int(getattr(exc, "restarts", 0) or 0))
        log(f"phase {name}: FAILED: {message}")
        if line is None and self.executor.name != "Ray":
            raise exc  # a bug in this process: its traceback is the report (Ray's arrive as text)
        failed.append(name)


@contextlib.contextmanager
def _signals_raise_interrupted() -> Iterator[None]:
    """SIGTERM / SIGINT raise `Interrupted` in the main thread, once; repeats during the clean-up
    are ignored (SIGKILL still works, and the embedded Ray's watchdog then ends Ray)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if fired:
            return
        fired.append(signum)

        def interrupt() -> None:
            raise Interrupted(signum)

        interrupt_or_defer(interrupt)  # not in the middle of a checkpoint being written

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _close_progress_bars() -> None:
    """End a failed phase's progress bar now: left open, it ends its line after our error line."""
    import sys

    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


def refuse_other_config(run_dir: Path, cfg: PipelineConfig) -> None:
    """Raise UserError when `run_dir` holds phases that ran with another value of a key of `WHAT_SECTIONS`
    (its `config.yaml` against `cfg`); a directory where no phase started takes any config."""
    manifest, recorded = run_dir / "manifest.json", run_dir / "config.yaml"
    if not (manifest.is_file() and recorded.is_file()):
        return
    if all(entry.get("state") == "pending" for entry in Manifest.read(run_dir).values()):
        return
    try:
        old = yaml.safe_load(recorded.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{recorded}: unreadable ({type(exc).__name__}); the run's phases cannot be checked "
                        f"against this config: move {run_dir} aside to run afresh") from exc
    new, defaults = to_dict(cfg), to_dict(PipelineConfig())
    for section in WHAT_SECTIONS:
        # a section the recorded config lacks (written before it existed) ran at its defaults
        found = first_difference((old or {}).get(section, _ABSENT), new.get(section), section, defaults.get(section))
        if found is not None:
            raise UserError(f"{run_dir}: its phases ran with another config ({found}); use another run_dir for "
                            f"the new settings, or move {run_dir} aside to run them afresh")


_ABSENT = object()


def first_difference(old: Any, new: Any, key: str, default: Any = _ABSENT) -> str | None:
    """`key: old -> new` for the first (dotted, sorted) key whose value differs, None when none does.

    A key the old config lacks (written before the key existed) ran at what is now its `default`."""
    if key in HOW_KEYS:
        return None
    if old is _ABSENT:
        old = default
    if isinstance(old, dict) and isinstance(new, dict):
        below = default if isinstance(default, dict) else {}
        for name in sorted(set(old) | set(new)):
            found = first_difference(old.get(name, _ABSENT), new.get(name, _ABSENT), f"{key}.{name}",
                                     below.get(name, _ABSENT))
            if found is not None:
                return found
        return None
    if old == new:
        return None
    shown = ["(absent)" if v is _ABSENT else repr(v) for v in (old, new)]
    return f"{key}: {shown[0]} -> {shown[1]}"
