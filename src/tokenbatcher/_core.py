"""The state every part of a batcher shares, and the queue-side plumbing they all use.

[DynamicBatcher][tokenbatcher.DynamicBatcher] is put together from parts, each
in a module of its own, that share the state declared on [Core][]:

- ``_settings.py``: what the batcher is set to (one frozen ``Settings``);
- ``_intake.py``: one record in (``submit``, ``call``, ``submit_nowait``):
  validate, price, queue; ``_submit_batch.py``: several at once, all or none;
  ``_handoff.py``: ``submit_threadsafe``; ``_admission.py``: with
  ``latency_target_s``, which records are let in;
- ``_record.py``: one accepted record, its caller's future;
- ``_pending.py``: the queue, and which records make the next batch
  (``_lanes.py``: per-priority lanes; ``_buckets.py``: ``similar_cost``'s
  cost buckets, and ``_row.py`` the same in one list while the queue is
  short; ``_keyed.py``: one such queue per key, once a record has a key);
- ``_dispatch.py``: when a batch is taken and which slot runs it (window, eager);
- ``_latency.py``: with ``latency_target_s``, what the strategies consult:
  how large a batch may be, how long it may wait; ``_plan.py``: which
  records are let in; ``_predict.py``: how long a batch is planned to take;
  ``_overrun.py``: a record whose batch still runs at its deadline fails then;
- ``_tuning.py``: with ``tune``, the limits the next batch is formed with
  (``_tuner.py``: which limits, learned; ``_arms.py``: what it measured;
  ``_durations.py``: the duration model it shares with ``latency_target_s``);
- ``_processing.py``: a slot calls ``process_fn`` and resolves the futures
  (``_invoking.py``: the call itself, in the slot's task or one of its own);
- ``_streaming.py`` (and ``_streams.py``): ``submit_stream``, and a streaming
  ``process_fn``'s steps handed to the records' streams;
- ``_lifecycle.py``: start, stop, restart and failure, as a state machine;
- ``_configure.py``: read-back properties and ``configure`` while running.

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
from collections.abc import Callable, Coroutine, Hashable, Sequence
from typing import TYPE_CHECKING, Any, Generic

from ._deadlines import Deadlines
from ._durations import DurationModel
from ._keyed import KeyedPending, check_key
from ._pending import Pending, Record
from ._settings import Settings
from ._stats import DispatchReason, Recorder
from ._tuning import Tuning, apply_tune
from ._types import ProcessFn, RecordT, ResultT

if TYPE_CHECKING:
    from ._dispatch import Strategy
    from ._latency import LatencyTarget
    from ._lifecycle import State
    from ._overrun import Overrun

logger = logging.getLogger("tokenbatcher")


def wake(fut: asyncio.Future[None]) -> None:
    """Resolve a waiter, unless it is done already."""
    if not fut.done():
        fut.set_result(None)


def wake_all(waiters: list[asyncio.Future[None]] | deque[asyncio.Future[None]]) -> None:
    """Resolve and forget every waiter."""
    while waiters:
        wake(waiters.pop())


def queue_limits(settings: Settings) -> tuple[int, int, bool, bool]:
    """The settings the queue is built with: ``(budget, max_size, padded, similar)``."""
    return (
        settings.target_batch_cost,
        settings.max_batch_size,
        settings.batch_cost == "padded",
        settings.grouping == "similar_cost",
    )


class Batch:
    """Records taken from the queue together, and why the batch was closed."""

    __slots__ = ("counted", "elapsed", "overrun", "reason", "records", "settled", "started", "work")
    records: list[Record[Any]]
    reason: DispatchReason
    # Set by the slot that runs it (``_processing.py``):
    started: float
    """Loop time at which it was handed to ``process_fn``."""
    counted: int
    """Its cost, as counted against the budget."""
    work: int
    """Its records' own costs, summed (``counted`` unless padded)."""
    overrun: Overrun | None
    """Started under a latency target: the timer that fails its records at their deadlines."""
    elapsed: float
    """Seconds it spent in ``process_fn`` (once settled)."""
    settled: bool
    """Its time is counted and the models are taught (``Processing._settle``)."""

    def __init__(self, records: list[Record[Any]], reason: DispatchReason) -> None:
        self.records = records
        self.reason = reason
        self.settled = False
        self.overrun = None


class Core(Generic[RecordT, ResultT]):
    """The shared state of a batcher's parts (see the module docstring); no public API."""

    _settings: Settings
    _process_fn: ProcessFn[RecordT, ResultT]
    _streaming: bool
    """``process_fn`` is an async generator function: records come in by ``submit_stream`` only."""
    _pending: Pending | KeyedPending
    _keyed: bool
    """True once the queue is a ``KeyedPending`` (from the first keyed record on)."""
    _deadlines: Deadlines
    _rec: Recorder
    _strategy: Strategy
    _durations: DurationModel | None
    """The model of ``process_fn``'s duration; fed after each successful batch when not None."""
    _latency: LatencyTarget | None
    """The latency-target policy, with ``latency_target_s``."""
    _tuning: Tuning | None
    """The throughput tuner, with ``tune="throughput"``."""
    _state: State
    _loop: asyncio.AbstractEventLoop | None
    _tasks: list[asyncio.Task[None]]
    _stopped: asyncio.Future[None] | None
    """Resolved when the current run ends; it identifies the run."""
    _seq: int
    """Records accepted so far; also each record's tie-breaker in the queue."""
    _out: set[Batch]
    """Batches taken from the queue whose futures are not all resolved."""
    _undelivered: dict[Batch, list[Any]]
    """Batches whose results wait for the next loop turn (``_invoking.py``), one result per record."""
    _in_flight: int
    _calls: dict[asyncio.Future[Any], Batch | None]
    """``process_fn`` calls running now: the task running each, and its batch if that is its slot's task."""
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
    _batch_key: Callable[[Any], Hashable] | None

    if TYPE_CHECKING:  # provided by the other parts

        def _fail(self, records: Sequence[Record[Any]], reason: str, cause: BaseException | None = None) -> None: ...

        def _stop_on(self, error: BaseException, where: str) -> None: ...

        def _refuse(self, *, stopping: bool = False) -> None: ...

        def _check_accepting(self, stopped: asyncio.Future[None] | None) -> None: ...

        def _run(self, batch: Batch, now: float, slot: asyncio.Task[None]) -> Coroutine[Any, Any, None]: ...

        def _stream_call(self, live: list[Record[Any]]) -> Coroutine[Any, Any, list[None]]: ...

        def _miss(self, rec: Record[Any]) -> None: ...

        def _overran(self, rec: Record[Any]) -> None: ...

        def _settle(self, batch: Batch, ok: bool) -> None: ...

        def _give_undelivered(self, batch: Batch) -> None: ...

    def _init_core(self, settings: Settings, process_fn: ProcessFn[RecordT, ResultT]) -> None:
        self._check_combination(settings)
        self._process_fn = process_fn
        self._rec = Recorder()
        self._loop = None
        self._tasks = []
        self._stopped = None
        self._seq = 0
        self._out = set()
        self._undelivered = {}
        self._in_flight = 0
        self._calls = {}
        self._arrival_waiters = []
        self._wake_need = sys.maxsize
        self._room_waiters = deque()
        self._keyed = False
        self._durations = self._latency = self._tuning = None
        budget, max_size, padded, similar = queue_limits(settings)
        self._pending = Pending(budget=budget, max_size=max_size, padded=padded, similar=similar)
        self._settings = settings
        self._strategy = self._new_strategy()
        self._apply(settings)

    def _check_combination(self, settings: Settings) -> None:
        """Refuse settings that contradict the batch function (set ``_streaming`` first)."""
        if self._streaming and settings.on_batch_error == "isolate":
            raise ValueError(
                "on_batch_error='isolate' re-runs the records of a failed batch, which a streaming process_fn "
                "cannot do (their entries have gone out to their streams): use on_batch_error='fail'"
            )
        if self._streaming and settings.latency_target_s is not None:
            raise ValueError(
                "latency_target_s is not supported with a streaming process_fn (a stream's entries come over "
                "its whole run, so there is no one result to be due): leave latency_target_s=None"
            )

    def _new_strategy(self) -> Strategy:
        from ._dispatch import Eager, Window  # the strategies refer back to Core

        return Eager(self) if self._settings.dispatch == "eager" else Window(self)

    def _apply(self, settings: Settings) -> None:
        """Adopt ``settings``; the queue is changed in place, so no queued record is lost.

        The strategy is rebuilt only when ``dispatch`` changed, which
        ``configure`` allows only while not running.
        """
        old, self._settings = self._settings, settings
        self._max_queue_size = settings.max_queue_size
        self._request_timeout_s = settings.request_timeout_s
        self._aging_s = settings.priority_aging_s
        self._default_cost = settings.default_cost
        self._estimator = settings.cost_estimator
        self._batch_key = settings.batch_key
        limits = queue_limits(settings)
        if limits != queue_limits(old):
            budget, max_size, padded, similar = limits
            self._pending.reconfigure(budget=budget, max_size=max_size, padded=padded, similar=similar)
        if settings.batch_key is not None and not self._keyed:
            self._become_keyed()
        if settings.dispatch != old.dispatch:
            self._strategy = self._new_strategy()
        self._apply_target(settings)
        apply_tune(self, settings)

    def _apply_target(self, settings: Settings) -> None:
        """Adopt ``latency_target_s`` and the limits its policy reads.

        Switched on, it starts a fresh duration model (warm-up again; with
        ``tune``, it shares the tuner's), and the records already waiting
        are due the target after their submit; a changed target or limit
        applies to batches taken, and records submitted, afterwards (the
        model is kept).
        """
        from ._latency import LatencyTarget  # it reads Core's state

        if settings.latency_target_s is None:
            self._latency = None
            if settings.tune == "off":
                self._durations = None
        elif self._latency is not None:
            self._latency.reconfigure(settings)
        else:
            if self._durations is None:  # else the tuner's: one model for both
                self._durations = DurationModel()
            latency = self._latency = LatencyTarget(self, self._durations, self._miss)
            span = latency.span(None)
            waiting = [rec for batch in self._strategy.held() for rec in batch.records]
            for rec in (*self._pending.in_order(), *waiting):
                rec.due = rec.t + span

    def _group(self, record: Any, key: Hashable | None) -> Hashable:
        """A record's key: ``key`` if given, else ``batch_key(record)``; the queue becomes keyed."""
        if key is None and self._batch_key is not None:
            key = self._batch_key(record)
            check_key("batch_key(record)", key)
        else:
            check_key("key", key)
        if not self._keyed:
            self._become_keyed()
        return key

    def _become_keyed(self) -> None:
        """From now on, records are queued by key; those already queued keep their place, under the key None."""
        queue = self._pending
        assert isinstance(queue, Pending)
        budget, max_size, padded, similar = queue_limits(self._settings)
        self._pending = KeyedPending.adopt(queue, budget=budget, max_size=max_size, padded=padded, similar=similar)
        self._keyed = True
        if self._tuning is not None:
            self._tuning.applied = None
            self._tuning.sync(self)
        if self._arrival_waiters:
            self._wake_arrivals()  # the loops look at the new queue

    # ------------------------------------------------------------------ the queue and its waiters

    def _take(self, reason: DispatchReason) -> Batch | None:
        """Take the next batch out of the queue into ``_out`` (None if nothing is queued)."""
        latency, tuning = self._latency, self._tuning
        if tuning is not None:
            tuning.sync(self)
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
        if tuning is not None:
            tuning.taken(batch)
        return batch

    async def _wait_arrivals(self, need: int, deadline: float | None) -> None:
        """Wait until ``need`` records are queued, a full batch is, or ``deadline``."""
        loop = self._loop
        assert loop is not None
        waiter: asyncio.Future[None] = loop.create_future()
        self._arrival_waiters.append(waiter)
        if need < self._wake_need:
            self._wake_need = need
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
        waiters = self._arrival_waiters
        while waiters:  # wake_all, inline: once per batch's worth of arrivals
            waiter = waiters.pop()
            if not waiter.done():
                waiter.set_result(None)

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
