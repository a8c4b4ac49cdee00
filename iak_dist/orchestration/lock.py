"""One driver per run directory: `RUN_DIR/driver.lock`, holding the driver's host and PID.

The lock is an `flock` on that file, so it ends with the process that holds it, however that
process ends; a file left with a dead holder's name is a stale lock and is taken over (with a log
line). With Ray, the watchdog that ends the embedded Ray shares the lock and keeps it until that
Ray is gone, so a re-run never races the previous run's last workers. The file is emptied, not
deleted, on release: deleting a locked file lets two processes lock two different files.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from iak_dist.errors import UserError
from iak_dist.orchestration.outcome import os_error_line

LOCK_NAME = "driver.lock"


class RunLock:
    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @staticmethod
    def acquire(run_dir: str | Path, log=None) -> RunLock:
        """Lock `run_dir` (created if missing) or raise a one-line `UserError` naming the holder."""
        run_dir = Path(run_dir)
        path = run_dir / LOCK_NAME
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.filename is None:
                exc.filename = str(run_dir)
            raise UserError(os_error_line(exc, "cannot create the run directory's lock")) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UserError(os_error_line(exc, "cannot lock the run directory")) from exc
            raise UserError(f"{run_dir}: another pipeline driver is using this run directory "
                            f"({_describe(holder)}; lock {path}); wait for it to end or stop it, "
                            f"or choose another run_dir") from None
        stale = _read(fd)
        if stale.get("pid") and (stale.get("pid"), stale.get("host")) != (os.getpid(), socket.gethostname()):
            if log is not None:
                log(f"run directory lock: taking over the stale lock of {_describe(stale)} (no longer running)")
        lock = RunLock(path, fd)
        lock._write({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                     "command": " ".join(sys.argv)[:500]})
        return lock

    def _write(self, holder: dict) -> None:
        data = (json.dumps(holder) + "\n").encode() if holder else b""
        os.pwrite(self.fd, data, 0)  # then cut the rest: a reader never sees an empty holder in between
        os.ftruncate(self.fd, len(data))

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            self._write({})
        except OSError:
            pass  # a full disk cannot refuse truncation, but a vanished folder can: the flock still ends
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1


def _read(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "holder unknown"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    text = f"host {holder.get('host', '?')} pid {holder['pid']} since {since}"
    alive = holder.get("host") == socket.gethostname() and _alive(int(holder["pid"]))
    if holder.get("host") == socket.gethostname() and not alive:
        text += ", which has ended: its embedded Ray is still shutting down, try again in a few seconds"
    return text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
