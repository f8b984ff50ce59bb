"""The state every part of a batcher shares, and the queue-side plumbing they all use.

[DynamicBatcher][tokenbatcher.DynamicBatcher] is put together from parts, each
in a module of its own, that share the state declared on [Core][]:

- ``_settings.py``: what the batcher is set to (one frozen ``Settings``);
- ``_intake.py``: ``submit`` and its siblings: validate, price, queue;
- ``_pending.py``: the queue, and which records make the next batch;
- ``_dispatch.py``: when a batch is taken and which slot runs it (window, eager);
- ``_latency.py``: with ``latency_target_s``, what the strategies consult:
  how large a batch may be, how long it may wait; ``_plan.py``: which
  records are let in;
- ``_processing.py``: a slot calls ``process_fn`` and resolves the futures;
- ``_lifecycle.py``: start, stop, restart and failure, as a state machine.

This module holds only the plumbing between the queue and the loops that
take from it: waiting for arrivals, waking producers that wait for room, and
taking a batch out of the queue into ``_out``, where every taken record stays
reachable until its future resolves.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import deque
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Generic

from ._deadlines import Deadlines
from ._durations import DurationModel
from ._pending import Pending, Record
from ._settings import Settings
from ._stats import DispatchReason, Recorder
from ._types import ProcessFn, RecordT, ResultT

if TYPE_CHECKING:
    from ._dispatch import Strategy
    from ._latency import LatencyTarget
    from ._lifecycle import State

logger = logging.getLogger("tokenbatcher")


def wake(fut: asyncio.Future[None]) -> None:
    """Resolve a waiter, unless it is done already."""
    if not fut.done():
        fut.set_result(None)


def wake_all(waiters: list[asyncio.Future[None]] | deque[asyncio.Future[None]]) -> None:
    """Resolve and forget every waiter."""
    while waiters:
        wake(waiters.pop())


class Batch:
    """Records taken from the queue together, and why the batch was closed."""

    __slots__ = ("reason", "records")
    records: list[Record[Any]]
    reason: DispatchReason

    def __init__(self, records: list[Record[Any]], reason: DispatchReason) -> None:
        self.records = records
        self.reason = reason


class Core(Generic[RecordT, ResultT]):
    """The shared state of a batcher's parts (see the module docstring); no public API."""

    _settings: Settings
    _process_fn: ProcessFn[RecordT, ResultT]
    _pending: Pending
    _deadlines: Deadlines
    _rec: Recorder
    _strategy: Strategy
    _durations: DurationModel | None
    """The model of ``process_fn``'s duration; fed after each successful batch when not None."""
    _latency: LatencyTarget | None
    """The latency-target policy, with ``latency_target_s``."""
    _state: State
    _loop: asyncio.AbstractEventLoop | None
    _tasks: list[asyncio.Task[None]]
    _stopped: asyncio.Future[None] | None
    """Resolved when the current run ends; it identifies the run."""
    _seq: int
    """Records accepted so far; also each record's tie-breaker in the queue."""
    _out: set[Batch]
    """Batches taken from the queue whose futures are not all resolved."""
    _in_flight: int
    _calls: set[asyncio.Future[Any]]
    """``process_fn`` calls running now."""
    _arrival_waiters: list[asyncio.Future[None]]
    _wake_need: int
    """Wake the arrival waiters once this many records are queued."""
    _room_waiters: deque[asyncio.Future[None]]
    # The settings the hot paths read, copied from ``_settings`` by ``_apply``.
    _max_queue_size: int
    _request_timeout_s: float | None
    _aging_s: float
    _default_cost: int
    _estimator: Any

    if TYPE_CHECKING:  # provided by the other parts

        def _fail(self, records: Sequence[Record[Any]], reason: str, cause: BaseException | None = None) -> None: ...

        def _stop_on(self, error: BaseException, where: str) -> None: ...

        def _refuse(self, *, stopping: bool = False) -> None: ...

        def _check_accepting(self, stopped: asyncio.Future[None] | None) -> None: ...

        def _run(self, batch: Batch) -> Coroutine[Any, Any, None]: ...

        def _miss(self, rec: Record[Any]) -> None: ...

    def _init_core(self, settings: Settings, process_fn: ProcessFn[RecordT, ResultT]) -> None:
        self._process_fn = process_fn
        self._rec = Recorder()
        self._loop = None
        self._tasks = []
        self._stopped = None
        self._seq = 0
        self._out = set()
        self._in_flight = 0
        self._calls = set()
        self._arrival_waiters = []
        self._wake_need = sys.maxsize
        self._room_waiters = deque()
        self._apply(settings)

    def _apply(self, settings: Settings) -> None:
        """Adopt ``settings``: the queue and the strategy are built from them."""
        from ._dispatch import Eager, Window  # the strategies refer back to Core
        from ._latency import LatencyTarget

        self._settings = settings
        self._max_queue_size = settings.max_queue_size
        self._request_timeout_s = settings.request_timeout_s
        self._aging_s = settings.priority_aging_s
        self._default_cost = settings.default_cost
        self._estimator = settings.cost_estimator
        self._pending = Pending(
            budget=settings.target_batch_cost,
            max_size=settings.max_batch_size,
            padded=settings.batch_cost == "padded",
            similar=settings.grouping == "similar_cost",
        )
        self._strategy = Eager(self) if settings.dispatch == "eager" else Window(self)
        self._durations = self._latency = None
        if settings.latency_target_s is not None:
            self._durations = DurationModel()
            self._latency = LatencyTarget(self, self._durations, self._miss)

    # ------------------------------------------------------------------ the queue and its waiters

    def _take(self, reason: DispatchReason) -> Batch | None:
        """Take the next batch out of the queue into ``_out`` (None if nothing is queued)."""
        latency = self._latency
        if latency is None:
            records, limit = self._pending.take()
        else:
            loop = self._loop
            assert loop is not None
            records, limit, bound = latency.take(loop.time())
            if bound:  # the target closed it, not the queue's own limits
                limit, reason = None, "target"
        if self._room_waiters:
            self._wake_room(len(records))
        if not records:
            return None
        batch = Batch(records, limit or reason)
        self._out.add(batch)
        return batch

    async def _wait_arrivals(self, need: int, deadline: float | None) -> None:
        """Wait until ``need`` records are queued, a full batch is, or ``deadline``."""
        loop = self._loop
        assert loop is not None
        waiter: asyncio.Future[None] = loop.create_future()
        self._arrival_waiters.append(waiter)
        self._wake_need = min(self._wake_need, need)
        timer = loop.call_at(deadline, wake, waiter) if deadline is not None else None
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if waiter in self._arrival_waiters:
                self._arrival_waiters.remove(waiter)

    def _wake_arrivals(self) -> None:
        """The queue grew enough: wake every loop waiting for arrivals."""
        self._wake_need = sys.maxsize
        wake_all(self._arrival_waiters)

    def _wake_room(self, n: int) -> None:
        """Room for ``n`` more records: wake that many producers, oldest first."""
        waiters = self._room_waiters
        while n > 0 and waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                n -= 1

    def _release_all_waiters(self) -> None:
        """Wake every waiter, so each loop and producer looks at the state again."""
        wake_all(self._arrival_waiters)
        wake_all(self._room_waiters)
        self._strategy.release()
