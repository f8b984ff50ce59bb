"""DynamicBatcher: the lifecycle, submission, and the loops that run batches.

Records go into ``Pending`` (``_pending.py``).  Batches are taken
from it either by an aggregation loop that seals them into a bounded prefetch
queue (``dispatch="window"``, flyte's timing) or by each processing slot the
moment it is free (``dispatch="eager"``).  ``max_concurrent_batches``
processing slots run ``process_fn``; ``_run`` is where results reach futures.

Every record that leaves the queue belongs to a ``_Batch`` registered in
``self._out`` until its futures are resolved, so stopping, aborting or a
failing loop can always reach every unresolved future.

A run lasts from ``start`` until its stop or failure ends it, and is known by
its ``_stopped`` future: stopping, aborting and the loops' done-callbacks act
only on their own run, and ``start`` first waits for the last run's loops, so
nothing of one run touches the next.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import functools
import logging
import math
import operator
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Generic, SupportsIndex

from typing_extensions import Self

from ._calling import as_async
from ._deadlines import Deadlines
from ._errors import BatchAbortedError, BatcherStoppedError, QueueFullError
from ._pending import Pending, Record, batch_cost
from ._stats import BatchInfo, BatchStats, DispatchReason, Recorder
from ._types import BatchCost, CostEstimatorFn, Dispatch, Grouping, ProcessFn, RecordT, ResultT

logger = logging.getLogger("tokenbatcher")


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


_NEW, _RUNNING, _STOPPING, _STOPPED = _State  # module constants: cheaper than _State.X on the hot path


class _Batch:
    """Records taken from the queue together, and why the batch was closed."""

    __slots__ = ("reason", "records")
    records: list[Record[Any]]
    reason: DispatchReason

    def __init__(self, records: list[Record[Any]], reason: DispatchReason) -> None:
        self.records = records
        self.reason = reason


class _Handoff(Generic[ResultT]):
    """One ``submit_threadsafe`` record, from its caller's thread to its result.

    ``outcome`` is the caller's ``concurrent.futures.Future``.  It settles
    exactly once: with the record's result or exception; cancelled, if its
    caller cancels it (which cancels the record); or with
    [BatcherStoppedError][] if the event loop shuts down first -- also when
    a closing loop drops this hand-off unrun, as then ``__del__`` settles it.
    """

    __slots__ = ("_loop", "_name", "_record", "_settled", "_submit", "_task", "outcome")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        submit: Callable[[], Coroutine[Any, Any, asyncio.Future[ResultT]]],
        name: str,
    ) -> None:
        self._loop = loop
        self._submit = submit
        self._name = name
        self._settled = False
        self._task: asyncio.Task[None] | None = None
        self._record: asyncio.Future[ResultT] | None = None
        self.outcome: concurrent.futures.Future[ResultT] = concurrent.futures.Future()

    def start(self) -> None:
        """On the loop: submit the record, unless its caller has cancelled already."""
        if self.outcome.cancelled():
            self._claim()
            return
        self._task = self._loop.create_task(self._run(), name=self._name)
        self.outcome.add_done_callback(self._caller_done)

    async def _run(self) -> None:
        try:
            record = await self._submit()
        except asyncio.CancelledError:  # by its caller, or by the event loop shutting down
            self.stopped("the event loop running the batcher cancelled its tasks (did asyncio.run() return?)")
            raise
        except BaseException as exc:  # refused, or a bad cost: the caller's to see
            if self._claim():
                self.outcome.set_exception(exc)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return
        self._record = record
        record.add_done_callback(self._deliver)
        if self.outcome.cancelled():
            record.cancel()

    def _deliver(self, record: asyncio.Future[ResultT]) -> None:
        if record.cancelled():  # only by its caller, through the outcome
            self.outcome.cancel()
            self._claim()
        elif record.exception() is not None:
            if self._claim():
                self.outcome.set_exception(record.exception())
        elif self._claim():
            self.outcome.set_result(record.result())

    def _caller_done(self, outcome: concurrent.futures.Future[ResultT]) -> None:
        """In any thread: if the caller cancelled, cancel the record (or its submission) on the loop."""
        if outcome.cancelled():
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing left to cancel
                self._loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        if self._record is not None:
            self._record.cancel()
        elif self._task is not None:
            self._task.cancel()

    def stopped(self, reason: str) -> None:
        """Fail with BatcherStoppedError: the loop went away before the record was processed."""
        if self._claim():
            self.outcome.set_exception(BatcherStoppedError(f"{reason} before this record was processed"))

    def _claim(self) -> bool:
        """True the first time, if the outcome is the batcher's to set (its caller has not cancelled it)."""
        if self._settled:
            return False
        self._settled = True
        return self.outcome.set_running_or_notify_cancel()

    def __del__(self) -> None:
        self.stopped("the event loop running the batcher closed")


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _wake_all(waiters: list[asyncio.Future[None]] | deque[asyncio.Future[None]]) -> None:
    while waiters:
        _wake(waiters.pop())


MAX_COST = 2**63 - 1
"""The largest cost of one record, so every sum and average in the stats stays a finite float."""

MIN_PRIORITY, MAX_PRIORITY = -(2**63), 2**63 - 1
"""A priority is a signed 64-bit int, so a record's dispatch key stays a finite float."""

MAX_SECONDS = 1e9
"""The longest ``timeout_s``, ``request_timeout_s`` and ``priority_aging_s`` (about 31 years)."""


def _show(value: object) -> str:
    """A value for an error message; an int too long to print is described by its size."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an int of {value.bit_length()} bits"
    return repr(value)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _explain(error: BaseException | None) -> str:
    """Why a loop of the batcher ended other than by stop(), for the futures it leaves and later submits."""
    if error is None:
        return "the event loop running the batcher cancelled its tasks (did asyncio.run() return?)"
    return f"an internal loop failed ({error!r})"


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {_show(value)}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {_show(value)}")
    return value


def _check_seconds(name: str, value: object, *, allow_zero: bool, capped: bool = False) -> float:
    """Validate a number of seconds; ``capped`` ones must also be at most [MAX_SECONDS][] (else inf is allowed)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {value!r} ({type(value).__name__})")
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond any float
        seconds = math.inf if value > 0 else -math.inf
    if math.isnan(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {_show(value)}")
    if capped and seconds > MAX_SECONDS:
        raise ValueError(f"{name} must be <= 1e9 seconds (about 31 years), got {_show(value)}")
    return seconds


def _check_optional_seconds(name: str, value: object, *, allow_zero: bool, capped: bool = False) -> float | None:
    return None if value is None else _check_seconds(name, value, allow_zero=allow_zero, capped=capped)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def bad_cost(value: object, source: str) -> int:
    """The slow path of cost validation: convert an integer-like value or raise."""
    if not isinstance(value, bool) and isinstance(value, SupportsIndex):
        converted = operator.index(value)  # e.g. numpy.int64
        if converted < 0:
            raise ValueError(f"{source} must be a non-negative int, got {_show(converted)}")
        if converted > MAX_COST:
            raise ValueError(f"{source} must be <= 2**63 - 1, got {_show(converted)}")
        return converted
    raise TypeError(f"{source} must be a non-negative int, got {value!r} ({type(value).__name__})")


class DynamicBatcher(Generic[RecordT, ResultT]):
    """Batches records from many concurrent producers into cost-budgeted calls.

    Each batch is handed to ``process_fn``; each record's future resolves to its
    own entry of the returned list.  A batch never holds more than
    ``max_batch_size`` records and its cost never exceeds ``target_batch_cost``,
    except a single record that alone costs more, which is processed alone.

    Args:
        process_fn: ``async def f(batch: list[RecordT]) -> list[ResultT]``,
            returning one result per record, in order; or a plain ``def``,
            which is called in a worker thread so it never blocks the event
            loop (see ``executor``).
        cost_estimator: ``f(record) -> int``; see [submit][] for how a
            record's cost is found.
        target_batch_cost: The cost budget of one batch (>= 1).
        max_batch_size: The most records in one batch (>= 1).
        min_batch_size: With ``dispatch="eager"``, a free slot waits for this
            many records, but never longer than ``batch_timeout_s`` after the
            oldest queued record arrived.  (``"window"`` already waits for a
            full batch or the timeout, so it changes nothing there.)  Records
            are never re-queued or reordered.
        batch_timeout_s: ``"window"``: how long a batch may keep filling after
            its first record is picked up.  ``"eager"``: the longest a free
            slot waits for ``min_batch_size`` records.
        max_queue_size: The most records waiting for a batch; ``submit`` waits
            (backpressure) and ``submit_nowait`` raises when it is reached.
        prefetch_batches: ``"window"``: how many sealed batches may wait in
            front of the processing slots (>= 1).
        default_cost: The cost of a record no estimator prices (>= 0).
        dispatch: ``"window"`` (flyte's timing: fill for up to
            ``batch_timeout_s``, seal into the prefetch queue) or ``"eager"``
            (form a batch the moment a processing slot is free; while every slot
            is busy the queue keeps growing toward a full batch).
        max_concurrent_batches: How many batches may be inside ``process_fn``
            at once (>= 1).
        request_timeout_s: The default deadline of ``submit``'s ``timeout_s``.
        batch_cost: ``"sum"`` (the sum of the records' costs) or ``"padded"``
            (batch size times its largest record's cost, what a padded tensor
            costs); the budget bounds this.
        grouping: ``"fifo"``, or ``"similar_cost"`` to build each batch from the
            oldest record plus the queued records closest to it in cost.
        priority_aging_s: Seconds one priority step is worth: with
            ``grouping="fifo"``, a record is never overtaken by one submitted
            more than ``(its priority - the other's) * priority_aging_s``
            seconds after it.  (``"similar_cost"`` reorders by design; its own
            bound is that every batch takes the record at the head.)
        on_batch: Called with a [BatchInfo][] after each batch; its
            exceptions are logged and otherwise ignored.
        executor: Where a plain (non-async) ``process_fn`` runs: a
            ``concurrent.futures.Executor``, or None for the event loop's
            default executor (as ``asyncio.to_thread``).  An ``async def``
            (also behind ``functools.partial``, or an object with an async
            ``__call__``) is awaited on the loop and takes no executor.  A
            plain function runs in a copy of the ``contextvars`` context; if
            it returns an awaitable, that is awaited on the loop.  A thread
            cannot be stopped: a batch cancelled meanwhile fails at once, and
            what the function returns later is dropped.

    Raises:
        TypeError: ``process_fn`` is not callable, or a setting has the wrong type.
        ValueError: A setting is out of range, or ``executor`` was given with
            an async ``process_fn``.
    """

    _estimator_name = "cost_estimator"
    _cost_name = "estimated_cost"
    _probe_names: tuple[str, ...] = ("estimate_cost",)
    """The record methods that price a record, in order of precedence."""

    def __init__(
        self,
        process_fn: ProcessFn[RecordT, ResultT] | Callable[[list[RecordT]], list[ResultT]],
        *,
        cost_estimator: CostEstimatorFn[RecordT] | None = None,
        target_batch_cost: int = 32_000,
        max_batch_size: int = 256,
        min_batch_size: int = 1,
        batch_timeout_s: float = 0.05,
        max_queue_size: int = 5_000,
        prefetch_batches: int = 2,
        default_cost: int = 1,
        dispatch: Dispatch = "window",
        max_concurrent_batches: int = 1,
        request_timeout_s: float | None = None,
        batch_cost: BatchCost = "sum",
        grouping: Grouping = "fifo",
        priority_aging_s: float = 1.0,
        on_batch: Callable[[BatchInfo], object] | None = None,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        if not callable(process_fn):
            raise TypeError(f"process_fn must be callable (async or plain), got {process_fn!r}")
        if cost_estimator is not None and not callable(cost_estimator):
            raise TypeError(f"{self._estimator_name} must be callable or None, got {cost_estimator!r}")
        if on_batch is not None and not callable(on_batch):
            raise TypeError(f"on_batch must be callable or None, got {on_batch!r}")
        self._budget = _check_int(self._budget_name(), target_batch_cost, 1)
        self._max_batch_size = _check_int("max_batch_size", max_batch_size, 1)
        self._min_batch_size = _check_int("min_batch_size", min_batch_size, 1)
        if self._min_batch_size > self._max_batch_size:
            raise ValueError(f"min_batch_size must be <= max_batch_size, got {min_batch_size} > {max_batch_size}")
        self._timeout_s = _check_seconds("batch_timeout_s", batch_timeout_s, allow_zero=True)
        self._max_queue_size = _check_int("max_queue_size", max_queue_size, 1)
        self._prefetch = _check_int("prefetch_batches", prefetch_batches, 1)
        self._default_cost = _check_int(self._default_name(), default_cost, 0, MAX_COST)
        _check_choice("dispatch", dispatch, ("window", "eager"))
        self._slots = _check_int("max_concurrent_batches", max_concurrent_batches, 1)
        self._request_timeout_s = _check_optional_seconds(
            "request_timeout_s", request_timeout_s, allow_zero=False, capped=True
        )
        _check_choice("batch_cost", batch_cost, ("sum", "padded"))
        _check_choice("grouping", grouping, ("fifo", "similar_cost"))
        self._aging_s = _check_seconds("priority_aging_s", priority_aging_s, allow_zero=True, capped=True)
        self._process_fn = as_async(process_fn, executor)
        self._estimator = cost_estimator
        self._eager = dispatch == "eager"
        self._dispatch = dispatch
        self._padded = batch_cost == "padded"
        self._on_batch = on_batch
        self._pending = Pending(
            budget=self._budget,
            max_size=self._max_batch_size,
            padded=self._padded,
            similar=grouping == "similar_cost",
        )
        self._rec = Recorder()
        self._state: _State = _NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._seq = 0  # records accepted so far; also each record's tie-breaker in the queue
        self._out: set[_Batch] = set()  # batches taken from the queue, futures not all resolved
        self._sealed: deque[_Batch] = deque()  # "window": the prefetch queue
        self._sealing_done = False
        self._in_flight = 0
        self._arrival_waiters: list[asyncio.Future[None]] = []
        self._wake_need = sys.maxsize  # wake arrival waiters once this many records are queued
        self._sealed_waiters: list[asyncio.Future[None]] = []
        self._room_waiters: deque[asyncio.Future[None]] = deque()
        self._deadlines = Deadlines(self._expire)
        self._hook = self._cancelled  # every record's cancel hook: one bound method for all
        self._aborting = False
        self._ended: str | None = None  # why the last run ended other than by stop()
        self._failure: BaseException | None = None  # ... and the exception that ended it
        self._orphaned = False  # our loop cancelled our tasks without stop(): it shut down
        self._stopped: asyncio.Future[None] | None = None  # resolved when the run ends; identifies the run
        self._calls: set[asyncio.Future[Any]] = set()  # process_fn calls running now
        self._stoppers: set[asyncio.Task[None]] = set()  # stops begun inside process_fn, seen through

    # Names used in error messages; TokenBatcher renames them.
    def _budget_name(self) -> str:
        return "target_batch_cost"

    def _default_name(self) -> str:
        return "default_cost"

    # ------------------------------------------------------------------ lifecycle

    @property
    def is_running(self) -> bool:
        """True from a successful [start][] until [stop][] returns."""
        return self._state is _RUNNING or self._state is _STOPPING

    @property
    def stats(self) -> BatchStats:
        """A [BatchStats][] snapshot (``await batcher.stats`` works too).

        Counters move at dispatch: a batch counts in ``total_batches`` from the
        moment it enters ``process_fn``.  Safe to read from any thread (a
        metrics scraper): it never raises, and never counts a record twice;
        the numbers are then as of a moment, not atomic.
        """
        # The order matters for a reader on another thread: the resolved counters first,
        # the accepted count last, so no record is counted twice and pending is never negative.
        rec_stats = self._rec
        resolved = rec_stats.resolved()
        pending = self._pending
        return rec_stats.snapshot(
            resolved,
            submitted=self._seq,
            queue_depth=pending.size,
            peak_queue_depth=max(pending.peak, pending.size),
            in_flight=self._in_flight,
        )

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self._state.value} queued={len(self._pending)} "
            f"in_flight={self._in_flight} batches={self._rec.batches}>"
        )

    async def start(self) -> None:
        """Start the batching loops on the running event loop.

        Raises:
            RuntimeError: The batcher is already running (or still stopping).
        """
        if self._state is _RUNNING or self._state is _STOPPING:
            raise RuntimeError(f"{type(self).__name__} is already running")
        loop = asyncio.get_running_loop()
        leftovers = [task for task in self._tasks if not task.done()] if self._loop is loop else []
        if leftovers:
            # The last run's loops, cancelled by a stop() that gave up or by a failure, end within
            # a few iterations of the event loop; the new run must not start under them.
            await asyncio.wait(leftovers)
            if self._state is _RUNNING or self._state is _STOPPING:  # a concurrent start() came first
                raise RuntimeError(f"{type(self).__name__} is already running")
        self._loop = loop
        self._state = _RUNNING
        self._sealing_done = self._aborting = self._orphaned = False
        self._failure = self._ended = None
        self._stopped = stopped = loop.create_future()
        if self._eager:
            bodies = [self._eager_slot() for _ in range(self._slots)]
        else:
            bodies = [self._aggregate(), *(self._window_slot() for _ in range(self._slots))]
        name = type(self).__name__
        self._tasks = [loop.create_task(body, name=f"{name}-loop-{i}") for i, body in enumerate(bodies)]
        for task in self._tasks:
            task.add_done_callback(functools.partial(self._loop_ended, stopped))
        logger.info("%s started (dispatch=%r)", name, self._dispatch)

    async def stop(self, *, timeout: float | None = None) -> None:
        """Stop accepting records, process every accepted one, then stop.

        From the moment ``stop`` begins, ``submit`` raises ``RuntimeError`` and
        producers waiting for queue space are released with it.  Returns once
        every accepted future is resolved.  Safe to call twice (each call keeps
        its own ``timeout``) and when not running; [start][] may be called
        again afterwards.

        Awaited inside ``process_fn``, it cannot wait for the drain, which
        includes the very batch that calls it: it begins the stop and returns
        at once; that batch finishes when ``process_fn`` returns, then the rest
        is drained as above (with ``timeout``, if given).

        Args:
            timeout: Seconds to drain before giving up: then ``process_fn`` calls
                still running are cancelled and every unresolved future fails
                with [BatcherStoppedError][].  None waits for the drain.
                If the task calling ``stop`` is cancelled, the same happens at once.
        """
        seconds = _check_optional_seconds("timeout", timeout, allow_zero=True)
        if self._state is _NEW or self._state is _STOPPED:
            return
        self._check_loop()
        stopped = self._stopped
        assert stopped is not None
        if asyncio.current_task() in self._calls:
            self._stop_from_process_fn(stopped, seconds)
        elif self._state is _RUNNING:
            self._begin_stop()
            await self._drain(stopped, seconds)
        else:
            await self._join_stop(stopped, seconds)

    def _begin_stop(self) -> None:
        self._state = _STOPPING
        self._release_all_waiters()

    async def _drain(self, stopped: asyncio.Future[None], timeout: float | None) -> None:
        """The first stop() of a run: let the loops finish every accepted record, or give up."""
        tasks = self._tasks
        try:
            _, unfinished = await asyncio.wait(tasks, timeout=timeout)
            if unfinished:
                self._abort(stopped, f"stop(timeout={timeout}) ran out of time")
                await asyncio.wait(tasks)
        except asyncio.CancelledError:
            self._abort(stopped, "the task calling stop() was cancelled")
            raise
        finally:
            self._finish_stop(stopped)

    async def _join_stop(self, stopped: asyncio.Future[None], timeout: float | None) -> None:
        """A stop() while another drains: wait for it, with this call's own timeout and cancellation."""
        try:
            done, _ = await asyncio.wait((stopped,), timeout=timeout)
            if not done:
                self._abort(stopped, f"stop(timeout={timeout}) ran out of time")
                await asyncio.wait((stopped,))
        except asyncio.CancelledError:
            self._abort(stopped, "the task calling stop() was cancelled")
            raise

    def _stop_from_process_fn(self, stopped: asyncio.Future[None], timeout: float | None) -> None:
        """``await stop()`` inside ``process_fn``: begin the stop; a task of the batcher's own sees it through."""
        if self._state is _RUNNING:
            self._begin_stop()
            work = self._drain(stopped, timeout)
        elif timeout is not None:
            work = self._join_stop(stopped, timeout)
        else:
            return  # a stop is under way already
        loop = self._loop
        assert loop is not None
        task = loop.create_task(work, name=f"{type(self).__name__}-stop")
        self._stoppers.add(task)
        task.add_done_callback(self._stoppers.discard)

    def _finish_stop(self, stopped: asyncio.Future[None]) -> None:
        """End the run whose stop future is ``stopped`` (once; never a later run)."""
        if stopped is not self._stopped or stopped.done():
            return
        stats = self._rec
        logger.info(
            "%s stopped: %d records completed, %d failed, in %d batches",
            type(self).__name__,
            stats.completed,
            stats.failed,
            stats.batches,
        )
        self._state = _STOPPED
        self._release_all_waiters()
        _wake(stopped)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _abort(self, stopped: asyncio.Future[None], reason: str, cause: BaseException | None = None) -> None:
        """Cancel the run's loops and fail every unresolved future, all at once (once per run)."""
        if stopped is not self._stopped or stopped.done() or self._aborting:
            return
        self._aborting = True
        for task in self._tasks:
            task.cancel()
        self._deadlines.clear()
        self._fail(self._pending.clear(), reason, cause)
        batches = list(self._out)
        self._out.clear()
        for batch in batches:
            self._fail(batch.records, reason, cause)
        self._sealed.clear()
        self._release_all_waiters()

    def _end_run(self, stopped: asyncio.Future[None], reason: str, cause: BaseException | None) -> None:
        """The run ends other than by stop(): fail everything now, and say why to later submits."""
        if stopped is not self._stopped or stopped.done():
            return
        self._ended, self._failure = reason, cause
        self._abort(stopped, reason, cause)
        self._finish_stop(stopped)

    def _loop_ended(self, stopped: asyncio.Future[None], task: asyncio.Task[None]) -> None:
        """A loop task of the run ``stopped`` ended: unless by that run's own stop, fail everything now."""
        error = None if task.cancelled() else task.exception()  # retrieved, even when it is ours to ignore
        if stopped is not self._stopped or self._aborting or (error is None and not task.cancelled()):
            return
        if error is None:  # not by us: the event loop is shutting down under a running batcher
            self._orphaned = True
        else:
            logger.error("%s: an internal loop failed: %r", type(self).__name__, error)
        self._end_run(stopped, _explain(error), error)

    def _stop_on(self, error: BaseException, where: str) -> None:
        """``SystemExit`` or ``KeyboardInterrupt`` from user code: stop the batcher, failing every future."""
        stopped = self._stopped
        assert stopped is not None
        logger.error("%s: %s raised %r; the batcher stops", type(self).__name__, where, error)
        self._end_run(stopped, f"the batcher stopped because {where} raised {error!r}", error)

    def _fail(self, records: Sequence[Record[Any]], reason: str, cause: BaseException | None = None) -> None:
        """Fail every unresolved future among ``records`` with BatcherStoppedError saying ``reason``."""
        for rec in records:
            if not rec.done():
                error = BatcherStoppedError(f"{reason} before this record was processed")
                error.__cause__ = cause
                rec.set_exception(error)
                self._rec.failed += 1

    def _release_all_waiters(self) -> None:
        for waiters in (self._arrival_waiters, self._sealed_waiters, self._room_waiters):
            _wake_all(waiters)

    def _check_loop(self) -> None:
        if _running_loop() is not self._loop:
            self._wrong_loop()

    def _wrong_loop(self) -> None:
        old = self._loop
        state = "closed" if old is None or old.is_closed() else "still open, but not the one running now"
        raise RuntimeError(
            f"this {type(self).__name__} was started on another event loop, which is {state}. "
            "A batcher belongs to the loop that started it: after asyncio.run() returns, "
            "build and start a new one (with an alru_cache singleton, call cache_clear() "
            "or key the cache by event loop)."
        )

    def _refuse(self, *, stopping: bool = False) -> None:
        """Raise the right error for a submit while not accepting records (``stopping``: its run stopped)."""
        name = type(self).__name__
        if self._state is _RUNNING and not stopping:
            self._check_loop()
            return
        if self._state is _STOPPING or stopping:
            raise RuntimeError(f"{name} is not running: stop() has begun, so no new records are accepted.")
        if self._ended is not None:
            if self._orphaned and _running_loop() not in (None, self._loop):
                self._wrong_loop()
            raise RuntimeError(f"{name} is not running ({self._ended}). Call start() again.") from self._failure
        raise RuntimeError(f"{name} is not running. Call start() or use 'async with'.")

    def _check_accepting(self, stopped: asyncio.Future[None] | None) -> None:
        """After a wait inside a submit: raise if the run that the submit began in stopped accepting."""
        if self._stopped is not stopped or self._state is not _RUNNING:
            self._refuse(stopping=self._stopped is not stopped)  # else a new run began meanwhile

    # ------------------------------------------------------------------ submission

    def _cost(self, record: RecordT, explicit: object) -> int:
        if explicit is not None:
            cost, source = explicit, self._cost_name
        elif self._estimator is not None:
            cost, source = self._estimator(record), self._estimator_name
        else:
            for name in self._probe_names:
                method = getattr(record, name, None)
                if method is not None:
                    cost, source = method(), f"{type(record).__name__}.{name}()"
                    break
            else:
                return self._default_cost
        if type(cost) is int and 0 <= cost <= MAX_COST:
            return cost
        return bad_cost(cost, source)

    def _check_request(self, timeout_s: float | None, priority: int) -> float | None:
        """Validate ``priority`` and ``timeout_s``; return the record's deadline in seconds, or None."""
        if type(priority) is not int or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
            _check_int("priority", priority, MIN_PRIORITY, MAX_PRIORITY)
        if timeout_s is None:
            return self._request_timeout_s
        return _check_seconds("timeout_s", timeout_s, allow_zero=False, capped=True)

    def _enqueue(self, item: RecordT, cost: int, timeout_s: float | None, priority: int) -> asyncio.Future[ResultT]:
        loop = self._loop
        assert loop is not None
        rec: Record[ResultT] = Record(loop=loop)
        rec.item = item
        rec.cost = cost
        rec.t = now = loop.time()
        rec.key = now + priority * self._aging_s if priority else now
        self._seq += 1
        rec.seq = self._seq
        rec.hook = self._hook
        rec.waiting = True
        pending = self._pending
        pending.push(rec)
        if timeout_s is not None:
            self._deadlines.add(loop, rec, timeout_s, pending.size)
        if self._arrival_waiters and (pending.size >= self._wake_need or pending.full):
            self._wake_arrivals()
        return rec

    async def submit(
        self,
        record: RecordT,
        *,
        estimated_cost: int | None = None,
        timeout_s: float | None = None,
        priority: int = 0,
    ) -> asyncio.Future[ResultT]:
        """Queue one record; return the future of its result.

        Waits while the queue holds ``max_queue_size`` records (backpressure).
        The record's cost is, the first that applies: ``estimated_cost``;
        ``cost_estimator(record)``; ``record.estimate_cost()``; ``default_cost``.

        Args:
            record: The record to process.
            estimated_cost: Its cost, a non-negative ``int``.
            timeout_s: A deadline in seconds (default ``request_timeout_s``): if
                the record is still queued then, it is never processed and its
                future fails with ``TimeoutError``.
            priority: A lower value is dispatched first; with ``grouping="fifo"``,
                FIFO within a priority; aged by ``priority_aging_s`` so no
                record starves.

        Returns:
            A future resolving to this record's entry of ``process_fn``'s result.

        Raises:
            RuntimeError: The batcher is not running (or is stopping, or runs on
                another event loop).
            TypeError: A cost, ``timeout_s`` or ``priority`` of the wrong type.
            ValueError: A negative cost or a non-positive ``timeout_s``.
        """
        if self._state is not _RUNNING or asyncio.get_running_loop() is not self._loop:
            self._refuse()
        cost = self._cost(record, estimated_cost)
        if timeout_s is None and type(priority) is int and MIN_PRIORITY <= priority <= MAX_PRIORITY:
            deadline = self._request_timeout_s  # the common case, without a call
        else:
            deadline = self._check_request(timeout_s, priority)
        if self._pending.size >= self._max_queue_size:
            await self._wait_for_room()
        return self._enqueue(record, cost, deadline, priority)

    async def call(
        self,
        record: RecordT,
        *,
        estimated_cost: int | None = None,
        timeout_s: float | None = None,
        priority: int = 0,
    ) -> ResultT:
        """Submit one record and await its result: the one-await form of [submit][].

        ``await batcher.call(record)`` is ``await (await batcher.submit(record))``.
        Cancelling the call withdraws the record.  Takes the arguments of
        [submit][] and raises what it raises, and whatever the record's
        future fails with (``process_fn``'s exception, ``TimeoutError``, ...).

        Examples:
            >>> import asyncio
            >>> from tokenbatcher import DynamicBatcher
            >>> async def double(batch: list[int]) -> list[int]:
            ...     return [2 * x for x in batch]
            >>> async def main() -> list[int]:
            ...     async with DynamicBatcher(double) as batcher:
            ...         return await asyncio.gather(*(batcher.call(x) for x in range(3)))
            >>> asyncio.run(main())
            [0, 2, 4]
        """
        future = await self.submit(record, estimated_cost=estimated_cost, timeout_s=timeout_s, priority=priority)
        return await future

    def submit_nowait(
        self,
        record: RecordT,
        *,
        estimated_cost: int | None = None,
        timeout_s: float | None = None,
        priority: int = 0,
    ) -> asyncio.Future[ResultT]:
        """Like [submit][], but never waits: a full queue raises instead.

        Call it from the batcher's event loop (a plain, non-async method).

        Raises:
            QueueFullError: The queue holds ``max_queue_size`` records; the
                record was not accepted (and is counted in ``total_rejected``).
            RuntimeError: As [submit][].
        """
        if self._state is not _RUNNING or asyncio.get_running_loop() is not self._loop:
            self._refuse()
        cost = self._cost(record, estimated_cost)
        deadline = self._check_request(timeout_s, priority)
        if self._pending.size >= self._max_queue_size:
            self._rec.rejected += 1
            raise QueueFullError(
                f"{type(self).__name__} queue is full ({self._max_queue_size} records, max_queue_size); record rejected"
            )
        return self._enqueue(record, cost, deadline, priority)

    async def submit_batch(
        self,
        records: Sequence[RecordT],
        *,
        estimated_cost: Sequence[int] | None = None,
        timeout_s: float | None = None,
        priority: int = 0,
    ) -> list[asyncio.Future[ResultT]]:
        """Submit several records; return one future per record, in order.

        All or nothing: every record is checked (costs, ``timeout_s``,
        ``priority``) before any is queued, and the call waits until there is
        room for all of them, then queues them at once.  If it raises or is
        cancelled (``stop()`` began, say), no record was queued.

        Args:
            records: The records, at most ``max_queue_size`` of them.
            estimated_cost: Their costs, a sequence as long as ``records``.
            timeout_s: As [submit][], for every record.
            priority: As [submit][], for every record.

        Returns:
            One future per record, in the order of ``records``.

        Raises:
            ValueError: ``estimated_cost`` has another length than ``records``,
                or there are more records than ``max_queue_size`` (they could
                never be queued at once); nothing was queued.
            RuntimeError: As [submit][].
        """
        n = len(records)
        if estimated_cost is not None and len(estimated_cost) != n:
            raise ValueError(
                f"estimated_cost must have one entry per record: got {len(estimated_cost)} for {n} records"
            )
        if self._state is not _RUNNING or asyncio.get_running_loop() is not self._loop:
            self._refuse()
        if n > self._max_queue_size:
            raise ValueError(
                f"submit_batch got {n} records, more than max_queue_size={self._max_queue_size}: they could never "
                "be queued at once. Split the call, or raise max_queue_size."
            )
        explicit: Sequence[int | None] = estimated_cost if estimated_cost is not None else [None] * n
        costs = [self._cost(record, cost) for record, cost in zip(records, explicit, strict=True)]
        deadline = self._check_request(timeout_s, priority)
        if self._pending.size + n > self._max_queue_size:
            await self._wait_for_room(n)
        return [self._enqueue(record, cost, deadline, priority) for record, cost in zip(records, costs, strict=True)]

    def submit_threadsafe(
        self,
        record: RecordT,
        *,
        estimated_cost: int | None = None,
        timeout_s: float | None = None,
        priority: int = 0,
    ) -> concurrent.futures.Future[ResultT]:
        """Submit from another thread; return a ``concurrent.futures.Future``.

        For synchronous code (a worker thread, a sync web handler) next to the
        event loop that runs the batcher.  Backpressure applies inside the loop;
        the returned future resolves to the result (or exception), and
        cancelling it cancels the record.  If the event loop is not running,
        shuts down (``asyncio.run`` returns) before the record is processed, or
        closes before it took the record in, the future fails with
        [BatcherStoppedError][] rather than waiting forever.

        Raises:
            RuntimeError: The batcher is not running, or this is called from the
                batcher's own event-loop thread (use [submit][] there).
            TypeError: A ``timeout_s`` or ``priority`` of the wrong type.
            ValueError: A ``timeout_s`` or ``priority`` out of range.
        """
        loop = self._loop
        if self._state is not _RUNNING or loop is None:
            self._refuse()
        assert loop is not None
        if getattr(loop, "_thread_id", None) == threading.get_ident():
            raise RuntimeError("submit_threadsafe() was called on the batcher's own event loop; use submit()")
        self._check_request(timeout_s, priority)  # bad arguments raise here, in the caller's thread

        def submit() -> Coroutine[Any, Any, asyncio.Future[ResultT]]:
            return self.submit(record, estimated_cost=estimated_cost, timeout_s=timeout_s, priority=priority)

        handoff = _Handoff(loop, submit, f"{type(self).__name__}-submit_threadsafe")
        if loop.is_running():
            try:
                loop.call_soon_threadsafe(handoff.start)
                return handoff.outcome
            except RuntimeError:  # the loop closed just now
                pass
        handoff.stopped("the event loop running the batcher is not running (it stopped or closed without stop())")
        return handoff.outcome

    def _expire(self, rec: Record[Any], timeout_s: float) -> None:
        """A waiting record's deadline came: it fails with ``TimeoutError`` and frees its place."""
        rec.set_exception(TimeoutError(f"record waited {timeout_s}s in the queue (timeout_s) and was not processed"))
        self._rec.expired += 1
        if rec.queued:  # else it is in a sealed batch, which drops it at dispatch
            self._pending.forget(rec)
            if self._room_waiters:
                self._wake_room(1)

    def _cancelled(self, rec: Record[Any]) -> None:
        """A caller cancelled its record's future: count it; if still queued, free its place."""
        self._rec.cancelled += 1
        if rec.queued:
            self._pending.forget(rec)
            if self._room_waiters:
                self._wake_room(1)

    async def _wait_for_room(self, n: int = 1) -> None:
        """Wait until ``n`` more records fit in the queue; raise if this run stops accepting meanwhile."""
        loop = self._loop
        assert loop is not None
        stopped = self._stopped
        first = True
        while self._pending.size + n > self._max_queue_size:
            self._check_accepting(stopped)
            waiter = loop.create_future()
            if first:
                self._room_waiters.append(waiter)
            else:  # woken, but others took the room: keep this producer's place in line
                self._room_waiters.appendleft(waiter)
            first = False
            try:
                await waiter
            except BaseException:
                if waiter in self._room_waiters:
                    self._room_waiters.remove(waiter)
                elif self._pending.size < self._max_queue_size:
                    self._wake_room(1)  # we were woken but leave: pass the wake-up on
                raise
        self._check_accepting(stopped)

    def _wake_room(self, n: int) -> None:
        waiters = self._room_waiters
        while n > 0 and waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                n -= 1

    def _wake_arrivals(self) -> None:
        self._wake_need = sys.maxsize
        _wake_all(self._arrival_waiters)

    # ------------------------------------------------------------------ forming batches

    def _take(self, reason: DispatchReason) -> _Batch | None:
        records, limit = self._pending.take()
        if self._room_waiters:
            self._wake_room(len(records))
        if not records:
            return None
        batch = _Batch(records, limit or reason)
        self._out.add(batch)
        return batch

    async def _wait_arrivals(self, need: int, deadline: float | None) -> None:
        """Wait until ``need`` records are queued, a full batch is, or ``deadline``."""
        loop = self._loop
        assert loop is not None
        waiter: asyncio.Future[None] = loop.create_future()
        self._arrival_waiters.append(waiter)
        self._wake_need = min(self._wake_need, need)
        timer = loop.call_at(deadline, _wake, waiter) if deadline is not None else None
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if waiter in self._arrival_waiters:
                self._arrival_waiters.remove(waiter)

    async def _wait_sealed(self) -> None:
        loop = self._loop
        assert loop is not None
        waiter: asyncio.Future[None] = loop.create_future()
        self._sealed_waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._sealed_waiters:
                self._sealed_waiters.remove(waiter)

    def _sealed_changed(self) -> None:
        _wake_all(self._sealed_waiters)

    async def _aggregate(self) -> None:
        """``"window"``: seal batches into the prefetch queue, as flyte does."""
        loop = self._loop
        assert loop is not None
        pending = self._pending
        try:
            while True:
                while not len(pending):
                    if self._state is not _RUNNING:
                        return
                    await self._wait_arrivals(1, None)
                reason: DispatchReason = "timeout"
                deadline = loop.time() + self._timeout_s
                while not pending.full:
                    if self._state is not _RUNNING:
                        reason = "shutdown"
                        break
                    if loop.time() >= deadline:
                        break
                    await self._wait_arrivals(sys.maxsize, deadline)
                batch = self._take(reason)
                if batch is None:
                    continue
                while len(self._sealed) >= self._prefetch:
                    await self._wait_sealed()
                self._sealed.append(batch)
                self._sealed_changed()
        finally:
            self._sealing_done = True
            if not loop.is_closed():  # else a closed loop is destroying this task: nobody is left to wake
                self._sealed_changed()

    async def _window_slot(self) -> None:
        """``"window"``: one processing slot fed by the prefetch queue."""
        loop = self._loop
        assert loop is not None
        while True:
            waited_from = loop.time()
            while not self._sealed:
                if self._sealing_done:
                    self._rec.idle_s += loop.time() - waited_from
                    return
                await self._wait_sealed()
            batch = self._sealed.popleft()
            self._sealed_changed()
            self._rec.idle_s += loop.time() - waited_from
            await self._run(batch)

    async def _eager_slot(self) -> None:
        """``"eager"``: one processing slot that forms its batch when it is free."""
        loop = self._loop
        assert loop is not None
        pending = self._pending
        while True:
            waited_from = loop.time()
            batch: _Batch | None = None
            while batch is None:
                if not len(pending):
                    if self._state is not _RUNNING:
                        self._rec.idle_s += loop.time() - waited_from
                        return
                    await self._wait_arrivals(1, None)
                    continue
                reason: DispatchReason = "free_slot"
                if self._state is not _RUNNING:
                    reason = "shutdown"
                elif len(pending) < self._min_batch_size and not pending.full:
                    deadline = pending.oldest_time() + self._timeout_s
                    if loop.time() < deadline:
                        await self._wait_arrivals(self._min_batch_size, deadline)
                        continue
                    reason = "timeout"
                batch = self._take(reason)
            self._rec.idle_s += loop.time() - waited_from
            await self._run(batch)

    # ------------------------------------------------------------------ running batches

    async def _run(self, batch: _Batch) -> None:
        """Hand a batch to ``process_fn`` and deliver every result to its own future."""
        loop = self._loop
        assert loop is not None
        try:
            records = batch.records
            live = [rec for rec in records if not rec.done()]  # cancelled or expired while sealed
            dropped = len(records) - len(live)
            if dropped:
                batch.records = live
            for rec in live:
                rec.waiting = False  # dispatched: its deadline no longer applies
            if not live:
                self._out.discard(batch)
                return
            rec_stats = self._rec
            started = loop.time()
            costs = [rec.cost for rec in live]
            total = sum(costs)
            counted = batch_cost(len(live), total, max(costs) if self._padded else 0, self._padded)
            rec_stats.batch(len(live), total, counted, batch.reason)
            rec_stats.waits.extend([started - rec.t for rec in live])
            self._in_flight += 1
            try:
                error = await self._call(live)
            finally:
                self._in_flight -= 1
                elapsed = loop.time() - started
                rec_stats.busy_s += elapsed
                rec_stats.process_times.append(elapsed)
            self._out.discard(batch)  # every record is accounted for (or _abort failed them)
            if self._on_batch is not None:
                oldest = min(rec.t for rec in live)
                self._report(batch, counted, started, started - oldest, elapsed, error, dropped)
        except BaseException as exc:
            if batch in self._out and not loop.is_closed():  # left early, and not already failed by _abort
                self._out.discard(batch)
                cause = None if isinstance(exc, asyncio.CancelledError) else exc
                self._fail(batch.records, _explain(cause), cause)
            raise

    async def _call(self, live: list[Record[Any]]) -> BaseException | None:
        """Run ``process_fn`` in a task of its own (see ``_invoke``); return the batch's error."""
        loop = self._loop
        assert loop is not None
        try:
            awaitable = self._process_fn([rec.item for rec in live])
        except (KeyboardInterrupt, SystemExit) as exc:
            self._stop_on(exc, "process_fn")
            raise
        except BaseException as exc:  # process_fn raised before returning an awaitable: its own failure
            return self._fail_with(live, _batch_error(exc, len(live)))
        # A task of its own, so that a process_fn that ignores cancellation cannot hold up stop().
        finished: asyncio.Future[None] = loop.create_future()
        task = loop.create_task(self._invoke(live, awaitable, finished))
        self._calls.add(task)  # so that a stop() awaited inside process_fn knows where it is
        try:
            await finished  # set by the task itself as it ends: one hop less than a done-callback
        except asyncio.CancelledError:  # only ours (stop): nobody else sees ``finished``
            task.add_done_callback(_consume)
            task.cancel()
            raise
        finally:
            self._calls.discard(task)
        if not task.done():  # finished is set in the task's last step
            await asyncio.wait((task,))
        if task.cancelled():
            return self._fail_with(
                live, BatchAbortedError(f"process_fn was cancelled (raised CancelledError) on a batch of {len(live)}")
            )
        error = task.exception()
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            # asyncio has already raised it out of the event loop, from process_fn's task; here it stops the batcher
            self._stop_on(error, "process_fn")
            return error
        if error is not None:
            return self._fail_with(live, _batch_error(error, len(live)))
        return task.result()

    async def _invoke(
        self, live: list[Record[Any]], awaitable: Awaitable[Any], finished: asyncio.Future[None]
    ) -> BaseException | None:
        """Await what ``process_fn`` returned and deliver each result to its own record's future.

        The results are delivered here, inside the task, so a caller wakes as
        soon as ``process_fn`` returns, not one hop later when the slot does.
        What ``process_fn`` raises propagates to ``_call``; a result list of
        the wrong shape fails the batch here and is returned.  ``finished`` is
        set on the way out, whatever happens.
        """
        try:
            # typed Any: what process_fn really returns is checked below
            results: Any = await awaitable
        finally:
            _wake(finished)
        if not isinstance(results, (list, tuple)):
            return self._fail_with(
                live,
                TypeError(f"process_fn must return a list of {len(live)} results, got {type(results).__name__}"),
            )
        if len(results) != len(live):  # pyright: ignore[reportUnknownArgumentType]
            return self._fail_with(
                live,
                ValueError(f"process_fn returned {len(results)} results for batch of {len(live)} records"),  # pyright: ignore[reportUnknownArgumentType]
            )
        completed = 0
        for rec, result in zip(live, results, strict=True):  # pyright: ignore[reportUnknownVariableType,reportUnknownArgumentType]
            if not rec.done():  # else cancelled by its caller meanwhile (counted then)
                rec.set_result(result)
                completed += 1
        self._rec.completed += completed
        return None

    def _fail_with(self, live: list[Record[Any]], error: BaseException) -> BaseException:
        logger.error("%s: batch of %d records failed: %r", type(self).__name__, len(live), error)
        for rec in live:
            if not rec.done():
                rec.set_exception(error)
                self._rec.failed += 1
        return error

    def _report(
        self,
        batch: _Batch,
        counted: int,
        started: float,
        waited: float,
        elapsed: float,
        error: BaseException | None,
        dropped: int,
    ) -> None:
        assert self._on_batch is not None
        info = BatchInfo(
            started_at=started,
            size=len(batch.records),
            cost=counted,
            reason=batch.reason,
            queue_wait_max_s=waited,
            process_time_s=elapsed,
            error=error,
            dropped=dropped,
        )
        try:
            self._on_batch(info)
        except (KeyboardInterrupt, SystemExit) as exc:
            self._stop_on(exc, "on_batch")
            raise
        except BaseException:  # any other is the hook's own failure; a sync hook never receives our CancelledError
            logger.exception("%s: on_batch hook raised; ignored", type(self).__name__)


def _batch_error(error: BaseException, size: int) -> BaseException:
    """What a batch's futures get when ``process_fn`` raises ``error``.

    An ``Exception`` as it is; any other ``BaseException`` (``CancelledError``,
    ``GeneratorExit``, a custom one) wrapped in [BatchAbortedError][], as a
    caller's future must not look cancelled or interrupted itself.
    """
    if isinstance(error, Exception):
        return error
    wrapped = BatchAbortedError(f"process_fn raised {error!r} on a batch of {size}")
    wrapped.__cause__ = error
    return wrapped


def _consume(task: asyncio.Future[Any]) -> None:
    """Mark a process_fn task's outcome as seen (it may end after an abort)."""
    if not task.cancelled():
        task.exception()
