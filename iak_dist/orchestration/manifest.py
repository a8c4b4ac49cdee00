"""The run directory's manifest: the state of every phase, written atomically by the driver.

`manifest.json` maps phase name -> {state: pending | running | done | failed, attempts, started,
finished, checkpoint, metrics, error}. A re-run skips `done` phases; a phase found `running`
(its driver was killed) is started again and resumes from its own last checkpoint.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from iak_dist.io import atomic_write_json

STATES = ("pending", "running", "done", "failed")


class Manifest:
    def __init__(self, path: Path, phases: dict[str, dict[str, Any]]) -> None:
        self.path = path
        self.phases = phases
        self._lock = threading.Lock()

    @staticmethod
    def open(run_dir: str | Path, names: list[str]) -> Manifest:
        path = Path(run_dir) / "manifest.json"
        phases = json.loads(path.read_text())["phases"] if path.is_file() else {}
        for name in names:
            phases.setdefault(name, {"state": "pending", "attempts": 0, "started": None, "finished": None,
                                     "checkpoint": None, "metrics": {}, "error": None})
        manifest = Manifest(path, phases)
        manifest.save()
        return manifest

    @staticmethod
    def read(run_dir: str | Path) -> dict[str, dict[str, Any]]:
        path = Path(run_dir) / "manifest.json"
        if not path.is_file():
            from iak_dist.errors import UserError

            raise UserError(f"{run_dir}: no manifest.json; not a pipeline run directory (or not started yet)")
        return json.loads(path.read_text())["phases"]

    def state(self, name: str) -> str:
        return self.phases[name]["state"]

    def update(self, name: str, **fields: Any) -> None:
        with self._lock:
            self.phases[name].update(fields)
            self.save()

    def start(self, name: str) -> None:
        with self._lock:
            entry = self.phases[name]
            entry.update(state="running", started=time.time(), finished=None, error=None,
                         attempts=entry["attempts"] + 1)
            self.save()

    def save(self) -> None:
        atomic_write_json(self.path, {"phases": self.phases})
