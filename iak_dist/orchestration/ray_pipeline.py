"""The Ray executor: phases scheduled on an embedded local Ray (the default) or on a cluster.

Each training phase (pretrain, finetune, evaluate) is a Ray Train `TorchTrainer` whose workers
run `local.run_phase` on the process group Ray Train set up (gloo on CPU, NCCL on GPU); prepare
and export are plain Ray tasks. Workers report every distributed checkpoint with
`ray.train.report`; a crashed worker group is restarted by `FailureConfig` and resumes from the
last complete checkpoint. The driver (`driver.py`) decides what runs; phases whose dependencies
are done run concurrently when Ray has the resources.

Traps, measured on Ray 2.60:
- `ray.init()` without an address joins any Ray it finds (RAY_ADDRESS, /tmp/ray's last cluster),
  then refuses our `num_cpus`. The embedded Ray is started with `address="local"` in its own temp
  folder, and its processes get RAY_ADDRESS = its own GCS (on a port chosen here): Ray Train's
  placement-group cleaner resolves the State API from the environment and, with two Rays on the
  machine, failed with a traceback per phase.
- `Result.metrics` holds only metrics reported with a checkpoint; the worker function's return
  value (rank 0's) is `Result.return_value`: the phase's final metrics come back that way.
- A `UserError` raised in a worker would be retried `max_failures` times, each with a traceback:
  workers catch it (and storage faults), return it, and the driver fails the phase at once.
- Ray Train copies every reported checkpoint into `RUN_DIR/ray/`; `num_to_keep` bounds the copies
  (our own checkpoints, which phases resume from, live in the run directory).
- Each Train run's PreemptionWatcher actor logs an error-level C++ line (`... max_restarts > 0`);
  nothing on one machine can be preempted, so the embedded Ray runs without it.
- When the driver dies, Ray's agents and a training worker outlived it: see `watchdog.py`.
"""

from __future__ import annotations

import concurrent.futures as futures
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iak_dist.config import PhaseSpec, PipelineConfig, from_dict, to_dict
from iak_dist.errors import UserError
from iak_dist.orchestration.local import log, run_phase
from iak_dist.orchestration.outcome import Interrupted, guarded
from iak_dist.orchestration.watchdog import TAG_VARIABLE

if TYPE_CHECKING:
    from iak_dist.distributed.context import DistContext


class PhaseBook:
    """Bookkeeping of one Ray-run phase beside the run: `RUN_DIR/.phases/NAME/`.

    `starts`: one line per worker-group start (rank 0 writes it), so the driver can count Ray Train
    restarts; `user_error.txt`: the one line of a worker's bad-input / storage failure.
    """

    def __init__(self, run_dir: Path, name: str) -> None:
        self.dir = run_dir / ".phases" / name

    def count_start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "starts", "a") as f:
            f.write(f"{os.getpid()}\n")

    def starts(self) -> int:
        path = self.dir / "starts"
        return len(path.read_text().splitlines()) if path.is_file() else 0

    def set_user_error(self, line: str) -> None:
        from iak_dist.io import atomic_write_text

        atomic_write_text(self.dir / "user_error.txt", line + "\n")

    def user_error(self) -> str | None:
        path = self.dir / "user_error.txt"
        return path.read_text().strip() if path.is_file() else None

    def clear_user_error(self) -> None:
        """Forget a previous run's failure (the driver, before each `fit`)."""
        (self.dir / "user_error.txt").unlink(missing_ok=True)
        for marker in self.dir.glob("returned-*"):
            marker.unlink(missing_ok=True)

    def mark_returned(self, rank: int) -> None:
        """Rank `rank` left the phase (done or failed): it waits in no collective any more."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"returned-{rank}").touch()

    def returned(self) -> int:
        return sum(1 for _ in self.dir.glob("returned-*"))


class EmbeddedRay:
    """A local Ray of our own: own temp folder, own GCS port, never another instance; ended with
    the driver by a watchdog process (see `watchdog.py`)."""

    def __init__(self, temp_dir: str, watchdog: subprocess.Popen, saved_env: dict[str, str | None]) -> None:
        self.temp_dir = temp_dir
        self.watchdog = watchdog
        self.saved_env = saved_env

    @staticmethod
    def start(num_cpus: int, lock_fd: int = -1) -> EmbeddedRay:
        import psutil
        import ray

        temp_dir = tempfile.mkdtemp(prefix="iak-dist-ray-")  # short: Ray's socket paths live under it
        tag = uuid.uuid4().hex
        port = _free_port()
        env = {TAG_VARIABLE: tag, "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_GCS_SERVER_PORT": str(port),
               "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
        watchdog = subprocess.Popen(
            [sys.executable, "-m", "iak_dist.orchestration.watchdog", tag, temp_dir, str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, pass_fds=(lock_fd,) if lock_fd >= 0 else (),
            env={k: v for k, v in os.environ.items() if k != TAG_VARIABLE})
        # inherited by every process of this Ray; in the driver until `stop` (then restored), so
        # that nothing here resolves another Ray either
        embedded = EmbeddedRay(temp_dir, watchdog, {k: os.environ.get(k) for k in env})
        before = {c.pid for c in psutil.Process().children()}
        handlers = _signal_handlers()  # ray.init installs a SIGTERM handler (sys.exit) over the driver's
        os.environ.update(env)
        try:
            ray.init(address="local", num_cpus=num_cpus or None, include_dashboard=False,
                     _node_ip_address="127.0.0.1", _temp_dir=temp_dir, log_to_driver=True, configure_logging=False,
                     runtime_env={"worker_process_setup_hook": "iak_dist.runtime.configure_environment"})
        except BaseException:
            embedded.stop()
            raise
        finally:
            _restore_signal_handlers(handlers)
            for child in psutil.Process().children():
                if child.pid not in before and child.pid != watchdog.pid:
                    embedded._watch(child.pid)
        log(f"embedded Ray at 127.0.0.1:{port} (temp {temp_dir}), its own instance")
        return embedded

    def _watch(self, pid: int) -> None:
        try:
            assert self.watchdog.stdin is not None
            self.watchdog.stdin.write(f"watch {pid}\n".encode())
            self.watchdog.stdin.flush()
        except (OSError, ValueError):  # the watchdog is gone, or its pipe closed by `stop`
            pass

    def stop(self) -> None:
        """Shut Ray down, then let the watchdog end whatever outlived that and wait for it."""
        import ray

        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            for key, value in self.saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            if self.watchdog.stdin is not None:
                self.watchdog.stdin.close()
            try:
                self.watchdog.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.watchdog.kill()


def _signal_handlers() -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}


def _restore_signal_handlers(handlers: dict) -> None:
    for s, handler in handlers.items():
        if handler is not None:
            signal.signal(s, handler)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_ray(address: str) -> None:
    """Join the Ray cluster at `address` (only an explicit address ever joins one)."""
    import ray

    _check_reachable(address)
    handlers = _signal_handlers()
    try:
        ray.init(address=address, log_to_driver=True)
    except Exception as exc:  # ConnectionError, TimeoutError, ValueError from Ray's client
        raise UserError(f"orchestration.address {address!r}: no Ray cluster answers there "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    finally:
        _restore_signal_handlers(handlers)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a dead address: Ray's own client retries for minutes before giving up."""
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


class RayExecutor:
    """Phases as Ray tasks / Ray Train runs, each waited for in a daemon thread of the driver
    (daemon: an interrupted driver must not wait for them at exit). Ray starts with the first phase."""

    name = "Ray"
    is_main = True

    def __init__(self, cfg: PipelineConfig, address: str | None = None) -> None:
        self.cfg = cfg
        self.address = cfg.orchestration.address if address is None else address
        self.embedded: EmbeddedRay | None = None
        self.connected = False
        self.lock_fd = -1

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def main_only(self, fn, share: bool = False):
        return fn()

    def start(self, lock: Any) -> None:
        self.lock_fd = lock.fd if lock is not None else -1

    def ready(self) -> None:
        """Start (or join) Ray if not yet done."""
        import ray

        if self.embedded is not None or self.connected or ray.is_initialized():
            return
        if self.address:
            connect_ray(self.address)
            self.connected = True
        else:
            self.embedded = EmbeddedRay.start(self.cfg.orchestration.num_cpus, self.lock_fd)

    def submit(self, phase: PhaseSpec) -> futures.Future:
        self.ready()
        fut: futures.Future = futures.Future()

        def body() -> None:
            try:
                fut.set_result(_run_phase(self.cfg, phase, Path(self.cfg.run_dir)))
            except BaseException as exc:  # noqa: BLE001  (handed to the driver)
                fut.set_exception(exc)

        threading.Thread(target=body, name=f"phase-{phase.name}", daemon=True).start()
        return fut

    def stop(self) -> None:
        """End the embedded Ray (its workers with it), or leave the cluster."""
        if self.embedded is not None:
            embedded, self.embedded = self.embedded, None
            embedded.stop()
        elif self.connected:
            import ray

            self.connected = False
            ray.shutdown()


class PhaseFailed(Exception):
    """A phase's own one-line failure (bad input or storage), with the worker-group restarts seen."""

    def __init__(self, line: str, restarts: int = 0) -> None:
        super().__init__(line)
        self.restarts = restarts


def _run_phase(cfg: PipelineConfig, phase: PhaseSpec, run_dir: Path) -> dict[str, Any]:
    import ray

    payload = {"config": to_dict(cfg), "phase": to_dict(phase)}
    if phase.type in ("prepare", "export"):
        task = ray.remote(num_cpus=1)(_task_phase)
        outcome = ray.get(task.remote(payload))
        if outcome.get("user_error"):
            raise PhaseFailed(outcome["user_error"])
        return outcome
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    book = PhaseBook(run_dir, phase.name)
    book.clear_user_error()
    before = book.starts()
    trainer = TorchTrainer(
        _train_worker, train_loop_config=payload,
        torch_config=TorchConfig(backend="nccl" if phase.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=phase.workers, use_gpu=phase.use_gpu,
                                     resources_per_worker={"GPU": 1} if phase.use_gpu else {"CPU": 1}),
        run_config=RunConfig(storage_path=str(run_dir / "ray"), name=phase.name,
                             failure_config=FailureConfig(max_failures=phase.max_failures),
                             checkpoint_config=CheckpointConfig(
                                 num_to_keep=cfg.orchestration.ray_checkpoints_to_keep)),
    )
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    except BaseException as exc:
        exc.restarts = max(0, book.starts() - before - 1)  # type: ignore[attr-defined]
        raise
    restarts = max(0, book.starts() - before - 1)
    outcome = dict(result.return_value or {})
    line = outcome.get("user_error") or book.user_error()
    if line:
        raise PhaseFailed(line, restarts)
    if result.checkpoint is not None:
        outcome["checkpoint"] = result.checkpoint.path
    outcome["restarts"] = restarts
    return outcome


def _configs(payload: dict[str, Any]) -> tuple[PipelineConfig, PhaseSpec]:
    from iak_dist.runtime import configure_environment

    configure_environment()
    return (from_dict(PipelineConfig, payload["config"], "pipeline config"),
            from_dict(PhaseSpec, payload["phase"], "phase"))


def _task_phase(payload: dict[str, Any]) -> dict[str, Any]:
    """prepare and export: a plain Ray task."""
    cfg, phase = _configs(payload)
    outcome, line = guarded(lambda: run_phase(cfg, phase, None))
    return {"user_error": line} if line is not None else outcome  # type: ignore[return-value]


def _train_worker(payload: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker: one phase on the process group Ray Train set up.

    Returns the phase's outcome (Ray hands rank 0's to the driver as `Result.return_value`). Bad
    input and storage faults are returned as `user_error`, not raised: raised, Ray Train would
    retry them `max_failures` times with a traceback each.
    """
    import ray.train

    cfg, phase = _configs(payload)
    book = PhaseBook(Path(cfg.run_dir), phase.name)
    earlier = book.user_error()
    if earlier is not None:  # a worker group restarted after a rank ended its process (release_peers)
        return {"user_error": earlier}
    if ray.train.get_context().get_world_rank() == 0:
        book.count_start()
    from iak_dist.distributed.context import init_distributed

    ctx = init_distributed()

    def report_checkpoint(step: int, path: Path) -> None:
        # every rank reports the same number of times; rank 0 hands Ray the (shared) folder
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if ctx.is_main else None
        ray.train.report({"step": step, "phase": phase.name}, checkpoint=checkpoint)

    try:
        outcome, line = guarded(lambda: run_phase(cfg, phase, ctx, False, report_checkpoint))
    except (KeyboardInterrupt, SystemExit, Interrupted):
        raise
    except BaseException:
        line = book.user_error()  # a peer failed alone and ended its process (release_peers)
        if line is None or ctx.world_size == 1:
            raise
        book.mark_returned(ctx.rank)
        return {"user_error": line}
    book.mark_returned(ctx.rank)
    if line is not None:
        book.set_user_error(line)  # any rank: rank 0's return value alone reaches the driver
        release_peers(ctx, book)
        return {"user_error": line}
    return outcome  # type: ignore[return-value]


PEER_WAIT_S = 10.0
"""How long a rank that failed waits for its peers to leave the phase before it ends its process."""


def release_peers(ctx: DistContext, book: PhaseBook) -> None:
    """After this rank's own failure, make sure no peer stays blocked in a collective waiting for it.

    Trap: a rank that fails alone (a file vanished from its share, its disk full) leaves the other
    ranks in the step's all-to-all; Ray Train waits for every worker, so the phase would hang for
    the process group's timeout (30 min). Neither `destroy_process_group` nor `abort` closes gloo's
    connections while TorchRec and DeepSpeed still hold the group: only the process's end does. So
    a rank whose peers have not all left the phase within `PEER_WAIT_S` ends its process; the
    peers then fail at once ("Connection closed by peer"), find the line in the phase book, and
    return it; Ray Train's restart of the group returns it too (see `_train_worker`). When every
    rank fails alike (bad data everywhere), they all leave and nothing is ended.
    """
    deadline = time.monotonic() + PEER_WAIT_S
    while book.returned() < ctx.world_size:
        if time.monotonic() > deadline:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        time.sleep(0.2)
