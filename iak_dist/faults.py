"""Fault injection for crash tests (never set in normal runs).

`IAK_DIST_FAULT=WHERE:STEP:RANK[:ONCE_FILE]` SIGKILLs rank RANK at fault point WHERE, step STEP:
- `save`: right after the rank wrote its shards of checkpoint STEP, before it is marked complete;
- `step`: right after training step STEP;
- `save_state`: as the rank writes its train state into checkpoint STEP.
With `IAK_DIST_FAULT_KIND=enospc` the rank raises "No space left on device" there instead (a
storage fault on one rank). With ONCE_FILE, the fault fires only if that file does not exist yet
(and creates it first), so a restarted worker group runs through.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path


def fault_point(where: str, step: int, rank: int) -> None:
    spec = os.environ.get("IAK_DIST_FAULT", "")
    if not spec:
        return
    parts = spec.split(":", 3)
    if parts[:3] != [where, str(step), str(rank)]:
        return
    if len(parts) == 4:
        once = Path(parts[3])
        if once.exists():
            return
        once.write_text(f"{where}:{step}:{rank}\n")
    if os.environ.get("IAK_DIST_FAULT_KIND") == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{where} of step {step} on rank {rank}")
    os.kill(os.getpid(), signal.SIGKILL)
