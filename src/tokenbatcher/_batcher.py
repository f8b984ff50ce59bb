"""DynamicBatcher: the public face of a batcher, put together from its parts.

The class itself holds little: it validates its arguments into one
``Settings`` (``_settings.py``) and mixes in the parts, each a module of its
own (see ``_core.py`` for the map).  One record's path through them:

1. ``submit`` (``_intake.py``) prices and checks it, waits for room, and
   queues it as a ``Record``, the future its caller gets back;
2. the queue (``_pending.py``) keeps it in dispatch order (and in its cost
   bucket for ``grouping="similar_cost"``); its deadline, if any, waits in
   ``_deadlines.py``;
3. a dispatch strategy (``_dispatch.py``) decides when a batch is taken; the
   record leaves the queue inside a ``Batch`` registered in ``_out``;
4. a processing slot (``_processing.py``) calls ``process_fn`` with the batch
   and delivers the record's result to its future;
5. ``stop`` (``_lifecycle.py``) drains what is left, or fails it with
   ``BatcherStoppedError`` when it gives up.

A streamed record (``submit_stream``, ``_streaming.py``) takes the same path
as a ``Channel``; at step 4 each entry the batch yields for it goes to its
stream at once.

Settings are read back through properties and changed with ``configure``
(``_configure.py``).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Hashable

from ._calling import as_async, is_async_gen
from ._configure import Configuring
from ._deadlines import Deadlines
from ._handoff import Threadsafe
from ._intake import Intake
from ._lifecycle import Lifecycle
from ._processing import Processing
from ._settings import Settings
from ._stats import BatchInfo, BatchStats
from ._streaming import Streaming
from ._streams import StreamFn
from ._submit_batch import SubmitBatch
from ._types import BatchCost, CostEstimatorFn, Dispatch, Grouping, OnBatchError, ProcessFn, RecordT, ResultT, Tune


class DynamicBatcher(
    Threadsafe[RecordT, ResultT],
    SubmitBatch[RecordT, ResultT],
    Intake[RecordT, ResultT],
    Streaming[RecordT, ResultT],
    Processing[RecordT, ResultT],
    Lifecycle[RecordT, ResultT],
    Configuring[RecordT, ResultT],
):
    """Batches records from many concurrent producers into cost-budgeted calls.

    Each batch is handed to ``process_fn``; each record's future resolves to its
    own entry of the returned list.  A batch never holds more than
    ``max_batch_size`` records and its cost never exceeds ``target_batch_cost``,
    except a single record that alone costs more, which is processed alone.

    Args:
        process_fn: ``async def f(batch: list[RecordT]) -> list[ResultT]``,
            returning one result per record, in order; or a plain ``def``,
            which is called in a worker thread so it never blocks the event
            loop (see ``executor``); or an async generator function
            ([StreamFn][tokenbatcher.StreamFn]) yielding, per step, one entry
            per record, which makes a streaming batcher: records then come in
            by [submit_stream][tokenbatcher.DynamicBatcher.submit_stream] (and ``submit`` and its siblings raise
            ``TypeError``).
        cost_estimator: ``f(record) -> int``; see [submit][tokenbatcher.DynamicBatcher.submit] for how a
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
        latency_target_s: Seconds from submit to result that every accepted
            record should meet, or None.  A model of ``process_fn``'s duration,
            learned from the batches, then caps each batch at the largest one
            predicted to finish in time, closes waits early, fails a queued
            record its wait made late with ``TimeoutError``, and refuses a
            record predicted to miss its deadline (the target, or its
            ``timeout_s`` if shorter) at once with [OverloadedError][].  With
            either ``dispatch``; ``"eager"`` then takes at once whenever a slot
            is free.  See the "Latency targets" section of the tuning guide.
        on_batch: Called with a [BatchInfo][] after each batch; its
            exceptions are logged and otherwise ignored.
        batch_key: ``f(record) -> key`` (any hashable): records with
            different keys never share a batch (a model, an adapter, a
            tenant); ``submit(..., key=...)`` overrides it per record.  The
            key whose oldest record comes first goes next, so no key starves.
        on_batch_error: ``"fail"``: when ``process_fn`` raises, every record
            of the batch gets the exception.  ``"isolate"``: a batch of more
            than one record is split in halves and each half run again,
            recursively, so only a record that fails alone gets its exception
            and the others their results.  It re-runs records, so
            ``process_fn`` must be idempotent (and cannot stream).
        executor: Where a plain (non-async) ``process_fn`` runs: a
            ``concurrent.futures.Executor``, or None for the event loop's
            default executor (as ``asyncio.to_thread``).  An ``async def``
            (also behind ``functools.partial``, or an object with an async
            ``__call__``) is awaited on the loop and takes no executor.  A
            plain function runs in a copy of the ``contextvars`` context; if
            it returns an awaitable, that is awaited on the loop.  A thread
            cannot be stopped: a batch cancelled meanwhile fails at once, and
            what the function returns later is dropped.
        stream_buffer: A streaming batcher's bound on the entries one stream
            holds unread (>= 1): ``process_fn`` never waits for a reader,
            and a stream whose reader falls this far behind fails with
            [StreamOverflowError][tokenbatcher.StreamOverflowError].  Other batchers ignore it.
        tune: ``"off"`` (the default: the budget is fixed, as flyte's) or
            ``"throughput"``: ``target_batch_cost`` and ``max_batch_size``
            become ceilings, and the batcher learns from the batches it runs
            the limits (both scaled by one factor) that give the most records
            per second; with ``latency_target_s``, the most efficient whose
            batches still meet the target.  See ``tuned_*`` in [BatchStats][tokenbatcher.BatchStats].

    Settings are read back by properties of the same names, and changed
    while running by [configure][tokenbatcher.DynamicBatcher.configure].

    Raises:
        TypeError: ``process_fn`` is not callable, or a setting has the wrong type.
        ValueError: A setting is out of range, or ``executor`` was given with
            an async ``process_fn``.
    """

    def __init__(
        self,
        process_fn: ProcessFn[RecordT, ResultT] | Callable[[list[RecordT]], list[ResultT]] | StreamFn[RecordT, ResultT],
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
        latency_target_s: float | None = None,
        on_batch: Callable[[BatchInfo], object] | None = None,
        batch_key: Callable[[RecordT], Hashable] | None = None,
        on_batch_error: OnBatchError = "fail",
        executor: concurrent.futures.Executor | None = None,
        stream_buffer: int = 10_000,
        tune: Tune = "off",
    ) -> None:
        if not callable(process_fn):
            raise TypeError(f"process_fn must be callable (async or plain), got {process_fn!r}")
        settings = Settings(
            target_batch_cost=target_batch_cost,
            max_batch_size=max_batch_size,
            min_batch_size=min_batch_size,
            batch_timeout_s=batch_timeout_s,
            max_queue_size=max_queue_size,
            prefetch_batches=prefetch_batches,
            default_cost=default_cost,
            dispatch=dispatch,
            max_concurrent_batches=max_concurrent_batches,
            request_timeout_s=request_timeout_s,
            batch_cost=batch_cost,
            grouping=grouping,
            priority_aging_s=priority_aging_s,
            latency_target_s=latency_target_s,
            cost_estimator=cost_estimator,
            on_batch=on_batch,
            batch_key=batch_key,
            on_batch_error=on_batch_error,
            stream_buffer=stream_buffer,
            tune=tune,
            budget_name=self._budget_name(),
            default_name=self._default_name(),
            estimator_name=self._estimator_name,
        )
        self._streaming = is_async_gen(process_fn)
        self._init_core(settings, as_async(process_fn, executor))
        self._init_lifecycle()
        self._deadlines = Deadlines(self._expire)
        self._cancel_hook = self._cancelled  # every record's cancel hook: one bound method for all

    # Names used in error messages; TokenBatcher renames them.
    def _budget_name(self) -> str:
        return "target_batch_cost"

    def _default_name(self) -> str:
        return "default_cost"

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
        latency = self._latency
        return rec_stats.snapshot(
            resolved,
            submitted=self._seq,
            queue_depth=pending.size,
            peak_queue_depth=max(pending.peak, pending.size),
            in_flight=self._in_flight,
            durations=self._durations.fit if self._durations is not None else None,
            predicted_wait_s=latency.predicted_wait_s if latency is not None else 0.0,
            tuner=self._tuning.stats if self._tuning is not None else None,
        )

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self._state.value} queued={len(self._pending)} "
            f"in_flight={self._in_flight} batches={self._rec.batches}>"
        )
