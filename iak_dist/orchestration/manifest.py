"""The run directory's manifest: the state of every phase, written atomically by the driver.

`manifest.json` maps phase name -> {state: pending | running | done | failed | interrupted,
attempts, started, finished, checkpoint, metrics, error, spec}. A re-run skips `done` phases whose
`spec` (the phase, the seeds and strategies it covers) is unchanged; a phase found `running` (its
driver was killed), `interrupted` or `failed` is started again and resumes from its own last
checkpoint. `attempts` counts every start: driver runs and Ray Train worker-group restarts.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from iak_dist.errors import UserError
from iak_dist.io import atomic_write_json
from iak_dist.orchestration.outcome import os_error_line

STATES = ("pending", "running", "done", "failed", "interrupted")


def _entry() -> dict[str, Any]:
    return {"state": "pending", "attempts": 0, "started": None, "finished": None, "checkpoint": None,
            "metrics": {}, "error": None, "spec": None}


class Manifest:
    """The phases' states. Only the driver's rank 0 writes (`writable`); other ranks keep a copy."""

    def __init__(self, path: Path, phases: dict[str, dict[str, Any]], writable: bool = True) -> None:
        self.path = path
        self.phases = phases
        self.writable = writable
        self._lock = threading.Lock()

    @staticmethod
    def open(run_dir: str | Path, specs: dict[str, Any]) -> Manifest:
        """Load (or start) the manifest of `run_dir` with an entry per phase name in `specs`."""
        path = Path(run_dir) / "manifest.json"
        phases = _load(path) if path.is_file() else {}
        for name in specs:
            for key, value in _entry().items():
                phases.setdefault(name, {}).setdefault(key, value)
        manifest = Manifest(path, phases)
        manifest.save()
        return manifest

    @staticmethod
    def read(run_dir: str | Path) -> dict[str, dict[str, Any]]:
        path = Path(run_dir) / "manifest.json"
        if not path.is_file():
            raise UserError(f"{run_dir}: no manifest.json; not a pipeline run directory (or not started yet)")
        return _load(path)

    def state(self, name: str) -> str:
        return self.phases[name]["state"]

    def is_done(self, name: str, spec: Any) -> bool:
        """Done with the same spec (an entry from before specs were recorded counts as the same)."""
        entry = self.phases[name]
        return entry["state"] == "done" and entry.get("spec") in (None, spec)

    def update(self, name: str, **fields: Any) -> None:
        with self._lock:
            self.phases[name].update(fields)
            self.save()

    def start(self, name: str, spec: Any) -> None:
        with self._lock:
            entry = self.phases[name]
            entry.update(state="running", started=time.time(), finished=None, error=None,
                         attempts=entry["attempts"] + 1, spec=spec)
            self.save()

    def save(self) -> None:
        """Write the manifest; a storage fault is a one-line `UserError` (the run stays resumable:
        the file on disk is the previous complete version)."""
        if not self.writable:
            return
        try:
            atomic_write_json(self.path, {"phases": self.phases})
        except OSError as exc:
            if exc.filename is None:
                exc.filename = str(self.path)
            raise UserError(os_error_line(exc, "cannot write the run's manifest", resume=True)) from exc


def _load(path: Path) -> dict[str, dict[str, Any]]:
    try:
        return json.loads(path.read_text())["phases"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a readable manifest ({type(exc).__name__}); "
                        f"move it away to start the run's bookkeeping afresh") from exc
