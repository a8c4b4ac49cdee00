"""A Ray head of a test's own: started here, stopped here by its PIDs.

Never `ray stop`: it stops every Ray on the machine (a user's cluster, a running `make run`).
The head runs as `ray start --head --block` in a new session with its own temp folder and ports;
stopping it terminates that process and then kills whatever it started that is still alive.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    def __init__(self, num_cpus: int = 2, dashboard: bool = False) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="iak-test-ray-")  # short: Ray's socket paths live under it
        self.port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.log = Path(self.temp_dir) / "head.log"
        self.env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                    f"--port={self.port}", f"--temp-dir={self.temp_dir}", f"--num-cpus={num_cpus}",
                    "--disable-usage-stats", f"--include-dashboard={'true' if dashboard else 'false'}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                    # a second head on the machine would otherwise find its agents' default ports taken
                    # (its job agent never comes up: "No available agent to submit job")
                    f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                    f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> RayHead:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 180) -> None:
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if "Ray runtime started" in self.log.read_text():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start failed:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ray start did not come up in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Terminate the head process, then kill every process it started that outlived it."""
        if self.process is None:
            return
        try:
            started = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            started = []
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        _, alive = psutil.wait_procs(started, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        self.process = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)
