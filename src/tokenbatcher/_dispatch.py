"""When a batch leaves the queue, and which processing slot runs it.

A dispatch strategy answers one question, over and over: the queue changed or
a slot became free -- what is taken now?  Each is a small class behind the
same interface (``Strategy``): ``loops()`` gives the coroutines a run needs,
``release()`` wakes whatever its loops wait on so they look at the state
again, ``abort()`` lets go of batches it holds (their futures are failed
by the lifecycle, which reaches them through ``_out``), and ``held()`` shows
them.  A new strategy is a new class here, not new branches in the engine.

With ``latency_target_s``, both consult the batcher's latency policy
(``_latency.py``) rather than being a third strategy: the target changes
*how much* a batch takes (``_take`` caps it) and *how long* a wait may last
(``hold`` closes a window, or eager's wait for ``min_batch_size``, early),
whatever the timing the user chose; a window's sealed batch is trimmed of
records its wait made late (``trim``) when its slot takes it.  A target is a
ceiling, never a wait: with one, a window also closes as soon as a slot is
free and no sealed batch waits for it (as eager would take at once).

* [Window][]: flyte's timing.  One aggregation loop fills a batch for up to
  ``batch_timeout_s`` after its first record (or until it is full) and seals
  it into a bounded prefetch queue of ``prefetch_batches``; processing slots
  take sealed batches from there.  With keys, a window also closes
  ``batch_timeout_s`` after its key's oldest record arrived: records that
  waited through other keys' windows do not wait a window of their own.
* [Eager][]: each processing slot forms its batch the moment it is free, from
  whatever is queued (waiting for ``min_batch_size`` records at most
  ``batch_timeout_s`` after the oldest arrived); while every slot is busy the
  queue keeps growing toward a full batch.

Owns: the loops' timing.  Must not touch: the queue's order (``_pending.py``)
or how a batch is run (``_processing.py``).
"""

# A strategy is the engine's friend: it reads the shared state of Core directly.
# pyright: reportPrivateUsage=false

from __future__ import annotations

import abc
import asyncio
import sys
from collections import deque
from collections.abc import Coroutine, Sequence
from typing import Any

from ._core import Batch, Core, wake_all
from ._lifecycle import RUNNING
from ._stats import DispatchReason


def turn(loop: asyncio.AbstractEventLoop) -> list[bool]:
    """A flag that becomes true (not empty) once the event loop has turned: a callback scheduled now ran.

    A slot watches it only when it expects more work right after the batch
    it hands over (a window slot: sealed batches wait; an eager slot: records
    wait, or were queued when its last batch ended); otherwise (``None``) it
    yields after the batch as it always did.
    """
    turned: list[bool] = []
    loop.call_soon(turned.append, True)
    return turned


class Strategy(abc.ABC):
    """The interface of a dispatch strategy (see the module docstring)."""

    def __init__(self, batcher: Core[Any, Any]) -> None:
        self._b = batcher

    @abc.abstractmethod
    def loops(self) -> list[Coroutine[Any, Any, None]]:
        """The coroutines one run of the batcher needs, fresh for each run."""

    @abc.abstractmethod
    def release(self) -> None:
        """Wake whatever the loops wait on (besides arrivals), so they look at the state again."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Let go of every batch held (their futures are failed through ``_out``)."""

    def held(self) -> Sequence[Batch]:
        """Batches taken from the queue and waiting for a slot, in the order they will start."""
        return ()


class Window(Strategy):
    """``dispatch="window"``: fill for up to ``batch_timeout_s``, seal into the prefetch queue."""

    def __init__(self, batcher: Core[Any, Any]) -> None:
        super().__init__(batcher)
        self._sealed: deque[Batch] = deque()  # the prefetch queue
        self._sealing_done = False
        self._sealed_waiters: list[asyncio.Future[None]] = []
        self._idle_slots = 0  # slots waiting for a sealed batch

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        self._sealing_done = False
        slots = self._b._settings.max_concurrent_batches
        return [self._aggregate(), *(self._window_slot() for _ in range(slots))]

    def release(self) -> None:
        wake_all(self._sealed_waiters)

    def abort(self) -> None:
        self._sealed.clear()

    def held(self) -> Sequence[Batch]:
        return self._sealed

    async def _wait_sealed(self) -> None:
        loop = self._b._loop
        assert loop is not None
        waiter: asyncio.Future[None] = loop.create_future()
        self._sealed_waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._sealed_waiters:
                self._sealed_waiters.remove(waiter)

    def _sealed_changed(self) -> None:
        wake_all(self._sealed_waiters)

    async def _aggregate(self) -> None:
        """Seal batches into the prefetch queue, as flyte does."""
        b = self._b
        loop = b._loop
        assert loop is not None
        try:
            while True:
                # b._pending is read afresh each time: it becomes a keyed queue at the first keyed record.
                while not len(b._pending):
                    if b._state is not RUNNING:
                        return
                    await b._wait_arrivals(1, None)
                reason: DispatchReason = "timeout"
                window_end = loop.time() + b._settings.batch_timeout_s
                if b._keyed:  # a key's records may have waited through other keys' windows: not again
                    window_end = min(window_end, b._pending.oldest_time() + b._settings.batch_timeout_s)
                while not b._pending.full:
                    if b._state is not RUNNING:
                        reason = "shutdown"
                        break
                    need, deadline = sys.maxsize, window_end
                    if b._latency is not None:
                        if self._idle_slots and not self._sealed:
                            reason = "free_slot"  # a target is a ceiling: a free slot does not wait
                            break
                        need, deadline = b._latency.hold(loop.time(), need, deadline)
                    if loop.time() >= deadline:
                        break
                    await b._wait_arrivals(need, deadline)
                batch = b._take(reason)
                if batch is None:
                    continue
                while len(self._sealed) >= b._settings.prefetch_batches:
                    await self._wait_sealed()
                self._sealed.append(batch)
                self._sealed_changed()
        finally:
            self._sealing_done = True
            if not loop.is_closed():  # else a closed loop is destroying this task: nobody is left to wake
                self._sealed_changed()

    async def _window_slot(self) -> None:
        """One processing slot fed by the prefetch queue."""
        b = self._b
        loop = b._loop
        assert loop is not None
        me = asyncio.current_task()
        assert me is not None
        while True:
            waited_from = loop.time()
            while not self._sealed:
                if self._sealing_done:
                    b._rec.idle_s += loop.time() - waited_from
                    return
                self._idle_slots += 1
                if b._latency is not None:
                    b._wake_arrivals()  # the aggregator closes its window for a free slot
                try:
                    await self._wait_sealed()
                finally:
                    self._idle_slots -= 1
            batch = self._sealed.popleft()
            self._sealed_changed()
            now = loop.time()
            if b._latency is not None:
                b._latency.trim(batch.records, now)
            b._rec.idle_s += now - waited_from
            turned = turn(loop) if self._sealed else None  # as Eager's slot does
            await b._run(batch, now, me)
            if self._sealed and not turned:
                await asyncio.sleep(0)


class Eager(Strategy):
    """``dispatch="eager"``: a slot forms its batch the moment it is free."""

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        return [self._eager_slot() for _ in range(self._b._settings.max_concurrent_batches)]

    def release(self) -> None:
        pass  # its slots wait only for arrivals, which the batcher wakes itself

    def abort(self) -> None:
        pass  # it holds no batch: a slot's batch is in _out from the moment it is taken

    async def _eager_slot(self) -> None:
        """One processing slot that forms its batch when it is free."""
        b = self._b
        loop = b._loop
        assert loop is not None
        me = asyncio.current_task()
        assert me is not None
        rec_stats = b._rec
        arrived = False  # records were queued when the last batch ended
        while True:
            waited_from = loop.time()
            batch: Batch | None = None
            while batch is None:
                pending = b._pending  # afresh: it becomes a keyed queue at the first keyed record
                queued = pending.size
                if not queued:
                    if b._state is not RUNNING:
                        rec_stats.idle_s += loop.time() - waited_from
                        return
                    # b._wait_arrivals(1, None), inline: a waiter woken is popped from the list by the
                    # waker, and one left by a cancel is skipped by it (it is done)
                    waiter = loop.create_future()
                    b._arrival_waiters.append(waiter)
                    b._wake_need = 1
                    await waiter
                    continue
                reason: DispatchReason = "free_slot"
                if b._state is not RUNNING:
                    reason = "shutdown"
                elif queued < b._settings.min_batch_size and not pending.full:
                    need, deadline = b._settings.min_batch_size, pending.oldest_time() + b._settings.batch_timeout_s
                    if b._latency is not None:
                        need, deadline = b._latency.hold(loop.time(), need, deadline)
                    if loop.time() < deadline and pending.size < need:
                        await b._wait_arrivals(need, deadline)
                        continue
                    reason = "timeout"
                batch = b._take(reason)
            now = loop.time()
            rec_stats.idle_s += now - waited_from
            # Watched only while records wait, or arrived during the last batch: a lone caller's round
            # trip does not pay for the callback.
            turned = turn(loop) if b._pending.size or arrived else None
            await b._run(batch, now, me)
            arrived = b._pending.size > 0
            if arrived and not turned:
                # More is queued.  A process_fn that returned without suspending kept the loop all
                # along (it runs in this task, _invoking.py): let the tasks that the batch woke run
                # before the next batch, as they would have while process_fn awaited something.
                # One that suspended let the loop turn: the next batch goes at once, and the tasks
                # this one woke run while it is in process_fn (not in the gap between the two).
                await asyncio.sleep(0)
