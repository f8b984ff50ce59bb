"""Deadlines: queued records that must leave the queue by a time, on one timer.

Records with a ``timeout_s`` wait in a heap ordered by deadline, and a single
``loop.call_at`` timer is armed for the earliest one.  When it fires, every
record whose deadline has come and that is still queued is handed to
``expire``; the timer is then armed for the next deadline.  A record that left
the queue (dispatched, cancelled) keeps its entry until the entry reaches the
top of the heap or the heap is rebuilt, which happens once stale entries
outnumber the queued records, so memory stays proportional to the queue.

Adding is O(log n); the timer is re-armed only when a new deadline is earlier
than the armed one.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable
from typing import Any

from ._pending import Record

_SLACK = 1024  # stale entries tolerated before a rebuild, on top of two per queued record


class Deadlines:
    """The deadlines of queued records, and the one timer that enforces them."""

    def __init__(self, expire: Callable[[Record[Any], float], object]) -> None:
        """``expire(record, timeout_s)`` is called for a waiting record whose deadline came."""
        self._expire = expire
        self._heap: list[tuple[float, int, Record[Any], float]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._armed = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, loop: asyncio.AbstractEventLoop, rec: Record[Any], timeout_s: float, queued: int) -> None:
        """Give queued ``rec`` a deadline ``timeout_s`` after its submit time; ``queued`` is the queue's size."""
        heap = self._heap
        when = rec.t + timeout_s
        heapq.heappush(heap, (when, rec.seq, rec, timeout_s))
        if len(heap) > 2 * queued + _SLACK:
            self._heap = heap = [entry for entry in heap if entry[2].waiting]
            heapq.heapify(heap)
        if when < self._armed:
            self._arm(loop, when)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._loop = loop
        self._armed = when
        self._timer = loop.call_at(when, self._fire)

    def _fire(self) -> None:
        loop = self._loop
        assert loop is not None
        # The loop may run a timer a clock tick early: what was armed for now is due.
        due = max(loop.time(), self._armed)
        self._timer, self._armed = None, math.inf
        heap = self._heap
        while heap and (heap[0][0] <= due or not heap[0][2].waiting):
            _, _, rec, timeout_s = heapq.heappop(heap)
            if rec.waiting and not rec.done():
                self._expire(rec, timeout_s)
        if heap:
            self._arm(loop, heap[0][0])

    def clear(self) -> None:
        """Forget every deadline and stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._armed = None, math.inf
        self._heap = []
