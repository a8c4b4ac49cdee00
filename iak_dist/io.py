"""Atomic, durable file output: every file we write appears complete or not at all.

Writers write to a temporary name in the same folder and `os.replace` it into place, so a crash or
a rejected input never leaves a half-written file that looks valid. The file is fsynced before the
rename and its folder after, so a power loss cannot make a renamed but empty file visible. Files
get the usual mode (0666 less the umask), as `open()` would give them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _new_temp(path: Path) -> tuple[Path, int]:
    """An empty file beside `path`, and the mode `open()` gives new files (0666 less the umask).

    Trap: `tempfile.mkstemp` creates files 0600 whatever the umask, and so does safetensors'
    `save_file`; the rename keeps that mode, and nobody else could read a report or a checkpoint.
    """
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp, stat.S_IMODE(tmp.stat().st_mode)
        except FileExistsError:
            continue


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make renames and new entries in folder `path` durable (no-op where the filesystem refuses)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under `root` (a checkpoint written by other libraries, before it is marked)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_file(os.path.join(folder, name))
        fsync_dir(folder)


@contextlib.contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on error delete it.

    `durable=False` skips the fsyncs, for files rewritten often whose loss does not matter (progress).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path, mode = _new_temp(path)
    try:
        yield tmp_path
        if stat.S_IMODE(tmp_path.stat().st_mode) != mode:  # the writer re-created it with its own mode
            tmp_path.chmod(mode)
        if durable:
            fsync_file(tmp_path)  # the data reaches the disk before the name does
        os.replace(tmp_path, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, durable: bool = True) -> None:
    with atomic_path(path, durable) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data: Any, durable: bool = True) -> None:
    """Keys keep their insertion order (domains stay in schema order)."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n", durable)
