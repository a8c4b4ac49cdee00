"""How a phase failed, as one line: a `UserError`'s message, a storage fault's path and cause, or
the last line of an unexpected error (Ray wraps a worker's error in pages of its own text).

Storage faults (a full disk, a read-only or vanished folder) are not bugs and retrying does not
fix them: they are reported like bad input, naming the path and the cause.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any, TypeVar

from iak_dist.errors import UserError

T = TypeVar("T")


class Interrupted(BaseException):
    """The driver got SIGTERM / SIGINT: the running phases stop and are marked `interrupted`.

    A BaseException, so that no `except Exception` in a phase swallows it."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.message = f"interrupted by {self}"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

# errno values that say "the storage refused", as opposed to a network peer going away
# (a missing file is left out: that is a bug or a race, which a retry may fix)
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED = {errno.EROFS, errno.EACCES, errno.EPERM}
STORAGE_ERRNOS = _FULL | _DENIED | {errno.ENOTDIR, errno.EISDIR, errno.EIO, errno.ENAMETOOLONG}


def os_error_line(exc: OSError, doing: str = "", resume: bool = False) -> str:
    """`PATH: [doing: ]cause (ENOSPC); what to do`, for a storage fault."""
    path = exc.filename if exc.filename is not None else "?"
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    what = f"{doing}: " if doing else ""
    fix = ("free space" if exc.errno in _FULL else "make it writable" if exc.errno in _DENIED
           else "fix the path")
    return f"{path}: {what}{exc.strerror or exc} ({name}); {fix}" + (
        ", then run the same command again to resume" if resume else "")


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and everything it wraps: causes, contexts, and the per-rank failures of a DCP save."""
    seen: set[int] = set()
    out: list[BaseException] = []
    stack: list[Any] = [exc]
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        stack += [e.__cause__, e.__context__]
        # torch.distributed.checkpoint's CheckpointException: {rank: (exception, stack summary)}
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            stack += [v[0] if isinstance(v, tuple) else v for v in failures.values()]
    return out


def user_facing(exc: BaseException) -> str | None:
    """The one line for `exc` if it is bad input or a storage fault (anywhere in its chain), else None."""
    causes = _causes(exc)
    for e in causes:
        if isinstance(e, UserError):
            return str(e)
    for e in causes:
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS and e.filename is not None:
            return os_error_line(e)
    return None


def guarded(fn: Callable[[], T]) -> tuple[T | None, str | None]:
    """Run `fn`; a user-facing failure comes back as its line instead of an exception.

    Other errors (bugs, a dead peer) propagate: Ray Train retries those. `CheckpointException`
    derives from BaseException, hence the wide catch; KeyboardInterrupt and SystemExit pass.
    """
    try:
        return fn(), None
    except (KeyboardInterrupt, SystemExit, Interrupted):
        raise
    except BaseException as exc:  # noqa: BLE001  (see above)
        line = user_facing(exc)
        if line is None:
            raise
        return None, line


def last_line(exc: BaseException) -> str:
    """One line for an unexpected error: a Ray worker failure's own last line, else the first line."""
    failures = getattr(exc, "worker_failures", None)  # Ray Train's WorkerGroupError: {rank: exception}
    if isinstance(failures, dict) and failures:
        rank, first = sorted(failures.items())[0]
        lines = [x.strip() for x in str(first).splitlines() if x.strip()]
        return f"worker {rank}: {lines[-1] if lines else type(first).__name__}"
    text = str(exc)
    marker = "UserError: "
    found = [line.split(marker, 1)[1].strip() for line in text.splitlines() if marker in line]
    if found:
        return found[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
