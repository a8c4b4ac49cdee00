"""Start-up check of the compute stack: which torch / FBGEMM build runs, and fail if its ops are missing."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import NoReturn

from iak_dist.errors import UserError


def say(message: str, rank: int | None = None) -> None:
    """A progress line on stderr, from rank 0 only (`rank` defaults to the launcher's RANK)."""
    if (int(os.environ.get("RANK", "0")) if rank is None else rank) == 0:
        print(message, file=sys.stderr, flush=True)


# (path fragment of the logging call, start of the message or "" for any, highest level dropped):
# third-party lines logged through the *root* logger on every successful run
_QUIET_ROOT_RECORDS = (
    # FBGEMM: "Successfully loaded: 'fbgemm_gpu_*.so'" per library at import, kernel arguments
    (f"fbgemm_gpu{os.sep}", "", logging.INFO),
    # TorchRec's plan validation, for every data-parallel table: such a table has no sharding spec
    # by design (it is replicated); a table really missing from the plan raises a PlannerError
    (os.path.join("torchrec", "distributed", "planner", "planners.py"), "Sharding spec not found for ",
     logging.WARNING),
)


def _quiet_root_record(record: logging.LogRecord) -> bool:
    """A root-logger filter: False drops the record (see `_QUIET_ROOT_RECORDS`)."""
    for path, start, level in _QUIET_ROOT_RECORDS:
        if record.levelno <= level and path in record.pathname and str(record.msg).startswith(start):
            return False
    return True


def quiet_root_logging() -> None:
    """Drop the third-party root-logger lines of `_QUIET_ROOT_RECORDS`; idempotent and cheap.

    Called when `iak_dist` is imported (its `__init__`), not only by `configure_environment`: a
    Ray worker on a cluster that was joined with `ray.init(address=...)` has no setup hook of
    ours, sets the root logger at INFO, and imports FBGEMM while it unpickles our phase function,
    before any of our code runs. A filter on the root logger survives Ray Train re-configuring
    it (`dictConfig` replaces handlers and the level, never filters).
    """
    root = logging.getLogger()
    if not any(f is _quiet_root_record for f in root.filters):
        root.addFilter(_quiet_root_record)


def nvidia_device_present() -> bool:
    """A cheap guess (no torch import, which takes seconds) at whether this process can see an NVIDIA GPU.

    Reads the device nodes the driver creates, honouring `CUDA_VISIBLE_DEVICES=""` / `-1` (GPUs hidden).
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


_critical_depth = 0
_deferred: list[Callable[[], None]] = []


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """A section a signal must not cut in half (a checkpoint being written): an interruption that
    arrives inside it (`interrupt_or_defer`) happens when the section ends, on the main thread.

    Trap: an exception raised by a signal handler inside DCP's writer tore a file mid-write and
    came out as a `CheckpointException` (a traceback, exit 1) instead of the interruption.
    """
    global _critical_depth
    _critical_depth += 1
    try:
        yield
    finally:
        _critical_depth -= 1
        if _critical_depth == 0 and _deferred:
            _deferred.pop()()


def interrupt_or_defer(interrupt: Callable[[], None]) -> None:
    """Run `interrupt` (which raises) now, or at the end of the `uninterrupted` section we are in."""
    if _critical_depth > 0:
        if not _deferred:
            _deferred.append(interrupt)
        return
    interrupt()


def configure_environment() -> None:
    """Process-wide settings that must precede heavy imports.

    Ray advertises the external interface unless told otherwise; we bind to localhost by default.
    TorchRec's planner logs advice meant for its own developers at WARNING on every sharding; we
    keep its errors only, so a user sees our progress, not its chatter.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not nvidia_device_present():
        # no GPU: say so, or DeepSpeed probes every accelerator it knows and warns on each start
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # else leave it unset: DeepSpeed detects CUDA through torch (and falls back to the CPU when this
    # torch has no CUDA); `DenseEngine` then checks that its accelerator is the model's device
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.path.isfile(os.path.expanduser("~/.ray/auth_token")) or "RAY_AUTH_TOKEN" in os.environ:
        # Ray 2.60 heads require this token once it exists; clients send it only in token mode
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    # TorchRec's train pipeline asks `is_fx_tracing`, which warns once per process about an API
    # change meant for torch.export users
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    # Ray Train's placement-group safety net asks the State API, which lives in the dashboard that
    # an embedded local Ray runs without; it would warn every few seconds of every training phase.
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    # FBGEMM logs every library it loads and every table-batched kernel's arguments through the root
    # logger at INFO, which Ray workers print; our own progress goes through print, Ray's through
    # its own loggers. Ray Train re-configures the root logger at INFO in its workers, so a filter
    # on the root logger (which re-configuring keeps) drops FBGEMM's INFO records there too.
    root = logging.getLogger()
    root.setLevel(max(root.level, logging.WARNING))
    quiet_root_logging()
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"torchrec\..*")
    warnings.filterwarnings("ignore", message=".*ShardedTensor.*")
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
    # DeepSpeed's ZeRO collectives call torch's old names (once per call site and rank: a dozen
    # lines under torchrun); the warning points into torch's c10d_logger, hence by message
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=rf"`torch\.distributed\.{name}` is deprecated",
                                category=FutureWarning)
    # data-parallel tables run FBGEMM's dense kernel, which builds its autograd graph inside its
    # CPU kernel rather than under the Autograd key: torch warns at backward, yet the gradients are
    # right (tests/test_distributed.py compares data-parallel training with one process)
    warnings.filterwarnings("ignore", message=r"fbgemm::dense_embedding_codegen_lookup_function: an autograd "
                            r"kernel was not registered", category=UserWarning)


def describe_stack() -> str:
    """Import torch + fbgemm + torchrec, check the FBGEMM ops loaded, and return a one-line summary."""
    import torch

    try:
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
    except Exception as exc:  # an undefined symbol surfaces as OSError / ImportError
        raise UserError(
            f"fbgemm_gpu failed to load with torch {torch.__version__}: {exc}. "
            "Install the pinned stack with ./scripts/setup.sh (fbgemm-gpu-cpu 1.8.0 pairs with torch 2.13)."
        ) from exc
    if not hasattr(torch.ops.fbgemm, "asynchronous_complete_cumsum"):
        raise UserError(
            "torch.ops.fbgemm has no kernels registered: the FBGEMM library did not load. "
            "Reinstall with ./scripts/setup.sh."
        )
    import torchrec

    build = "cuda" if torch.cuda.is_available() else "cpu"
    fbgemm_dist = "fbgemm-gpu" if torch.version.cuda else "fbgemm-gpu-cpu"
    return (
        f"torch {torch.__version__} ({build}), {fbgemm_dist} {getattr(fbgemm_gpu, '__version__', '?')}, "
        f"torchrec {getattr(torchrec, '__version__', '?')}, fbgemm ops loaded"
    )


def is_launched_rank() -> bool:
    """This process is one rank started by torchrun or srun (not the single-process case)."""
    return "RANK" in os.environ or ("SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ)


def exit_launched_rank(code: int) -> NoReturn:
    """End a torchrun / srun rank once its work is done: flush, then leave without Python's teardown.

    Trap: gloo worker threads of process groups that DeepSpeed and TorchRec still reference outlive
    `destroy_process_group`. One may drop its last collective's tensors while the interpreter
    finalises; that needs the GIL, and the C++ runtime aborts ("terminate called without an active
    exception", exit -6) after all work succeeded, so the launcher reports a failed rank. Seen about
    once in 20 two-rank runs; gdb: ProcessGroupGloo::runLoop -> ~AsyncBarrierWork ->
    decref_pyobject -> take_gil during Py_FinalizeEx. Every file we write is closed by then.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    configure_environment()
    print(f"[iak-dist] {describe_stack()}")
