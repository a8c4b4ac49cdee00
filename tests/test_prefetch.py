"""Batches made ahead in a thread: the same items in the same order, failures where they happened."""

import threading
import time

import pytest

from iak_dist.data.prefetch import Prefetched


def test_the_items_and_their_order_are_the_plain_iterators():
    assert list(Prefetched(iter(range(100)), 3)) == list(range(100))
    ended = Prefetched(iter([]), 1)
    assert list(ended) == [] and list(ended) == []  # stays ended


def test_a_failure_is_raised_at_the_item_where_it_happened():
    def source():
        yield 1
        yield 2
        raise OSError("disk gone")

    it = Prefetched(source(), 2)
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(OSError, match="^disk gone$"):
        next(it)


def test_it_reads_ahead_at_most_depth_items_and_close_stops_the_thread():
    made = []

    def source():
        for i in range(1000):
            made.append(i)
            yield i

    it = Prefetched(source(), 2)
    assert next(it) == 0
    time.sleep(0.3)
    assert len(made) <= 4  # the consumed one, two queued, one waiting for room
    it.close()
    assert not any(t.name == "iak-dist-prefetch" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(ValueError, match="depth must be >= 1, got 0"):
        Prefetched(iter([]), 0)
