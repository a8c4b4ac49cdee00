"""Batches read ahead in a background thread, so that producing the next batch overlaps the current step.

TorchRec's train pipeline overlaps the input of the steps that look tables up; a step from the prefix
cache has no lookups to pipeline, and its input (the domain streams' Arrow work and the gather of the
cached rows) was paid in line: 20-45 % of an IAK step (docs/performance.md). numpy and torch release
the GIL in that work, so a thread overlaps it with the step on a spare core. The batches and their
order are exactly those of the plain iterator: only when they are made changes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_END = object()


class Prefetched(Generic[T]):
    """Iterate `source` up to `depth` items ahead of the consumer, in a daemon thread.

    An exception raised by `source` is raised by `__next__` at the item where it happened. `close()` stops
    the thread (at most one more item is made); use it when the consumer stops early.
    """

    def __init__(self, source: Iterator[T], depth: int) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="iak-dist-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer, raised there)
            self._put(exc)
            return
        self._put(_END)

    def _put(self, item: object) -> bool:
        """Queue `item`, waiting for room; False once `close` was called."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetched[T]:
        return self

    def __next__(self) -> T:
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # every later call ends too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[return-value]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
