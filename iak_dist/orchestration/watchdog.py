"""Ends an embedded Ray together with the driver that started it, however the driver ends.

Measured on Ray 2.60: after a SIGKILL of the driver, the raylet and GCS die with it (Ray gives its
direct children a parent-death signal) but `ray::DashboardAgent` and `ray::RuntimeEnvAgent` live
on, and a Ray Train worker keeps training for seconds and can write another checkpoint. Those are
grandchildren of the driver, reparented to init once the raylet dies, so nothing ties them to it.

This watchdog is a small process in its own session (a `killpg` of the driver's group spares it).
The driver writes `watch PID` lines for the processes `ray.init` started; the watchdog records
their descendants every half second. When its stdin reaches EOF (the driver closed it, or died),
it SIGKILLs every recorded process still alive, and every process whose environment carries the
embedded Ray's tag (Ray workers inherit it; a worker started in the last half second is found
that way), then deletes the embedded Ray's temp folder. It shares the run directory's lock, so
the lock ends only when the Ray is gone.

Run as `python -m iak_dist.orchestration.watchdog TAG TEMP_DIR DRIVER_PID` (stdlib and psutil only).
"""

from __future__ import annotations

import os
import select
import shutil
import sys
import time

TAG_VARIABLE = "IAK_DIST_EMBEDDED_RAY"


def _tagged(tag: str, spare: set[int]) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter():
        if proc.pid in spare:
            continue
        try:
            if proc.environ().get(TAG_VARIABLE) == tag:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _kill(procs) -> int:
    import psutil

    killed = 0
    for proc in procs:
        try:
            if proc.is_running():  # also checks the PID was not reused (create time)
                proc.kill()
                killed += 1
        except psutil.Error:
            continue
    return killed


def main(tag: str, temp_dir: str, driver_pid: int) -> None:
    import psutil

    spare = {os.getpid(), driver_pid}  # the driver, when it closed the pipe itself, is still alive

    roots: list = []
    known: dict[int, psutil.Process] = {}

    def snapshot() -> None:
        for root in roots:
            try:
                for proc in [root, *root.children(recursive=True)]:
                    known.setdefault(proc.pid, proc)
            except psutil.Error:
                continue

    buffer = b""
    while True:
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], 0.5)
        if ready:
            chunk = os.read(sys.stdin.fileno(), 4096)
            if not chunk:
                break  # EOF: the driver closed the pipe or died
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                parts = line.decode().split()
                if len(parts) == 2 and parts[0] == "watch":
                    try:
                        roots.append(psutil.Process(int(parts[1])))
                    except (psutil.Error, ValueError):
                        pass
        snapshot()
    snapshot()
    # raylet and GCS first, so no new worker starts while the rest is killed
    _kill(roots)
    _kill(known.values())
    deadline, quiet = time.time() + 20, 0
    while time.time() < deadline and quiet < 2:
        quiet = quiet + 1 if _kill(_tagged(tag, spare)) == 0 else 0
        time.sleep(0.2)
    shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
