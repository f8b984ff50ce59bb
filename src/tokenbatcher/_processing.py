"""How a batch is run: a processing slot calls ``process_fn`` and resolves the futures.

A slot hands the batch's live records to ``process_fn`` (records cancelled or
expired while the batch waited are dropped first), in a task of its own so a
``process_fn`` that ignores cancellation cannot hold up ``stop()``.  That task
delivers each result to its own record's future the moment ``process_fn``
returns.  Failures map to the futures as follows:

| ``process_fn`` ...                            | every future of the batch gets          |
|-----------------------------------------------|-----------------------------------------|
| raises an ``Exception``                       | that exception                          |
| raises another ``BaseException``              | ``BatchAbortedError``, with the cause   |
| (``CancelledError``, ``GeneratorExit``, ...)  |                                         |
| raises ``KeyboardInterrupt``/``SystemExit``   | ``BatcherStoppedError``: the batcher    |
| on the event loop                             | stops                                   |
| returns a non-list, or the wrong count        | ``TypeError`` / ``ValueError``          |

A streaming ``process_fn`` (an async generator function) is run the same
way; ``_streaming.py`` says how its steps reach the records' streams.

With ``on_batch_error="isolate"``, an ``Exception`` raised on a batch of more
than one record is not delivered at once: the batch is re-run in halves until
each failure is one record's own (``_isolate.py``).

A batch whose first call succeeded then teaches the duration model
(``_durations.py``, with ``latency_target_s`` or ``tune``) and the tuner
(``_tuning.py``), and the ``on_batch`` hook gets a [BatchInfo][tokenbatcher.BatchInfo];
what it raises is logged and ignored (but ``KeyboardInterrupt`` and
``SystemExit`` stop the batcher).

Owns: calling ``process_fn`` and resolving futures.  Must not touch: the queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from ._core import Batch, Core, logger, wake
from ._errors import BatchAbortedError
from ._isolate import Raised, isolate
from ._keyed import group_of
from ._lifecycle import explain
from ._pending import Record, batch_cost
from ._stats import BatchInfo
from ._types import RecordT, ResultT


class Processing(Core[RecordT, ResultT]):
    """Running batches (mixed into DynamicBatcher)."""

    async def _run(self, batch: Batch) -> None:
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
                if self._tuning is not None:
                    self._tuning.forget(batch)
                return
            settings = self._settings  # the batch keeps the settings it was handed over with
            rec_stats = self._rec
            started = loop.time()
            costs = [rec.cost for rec in live]
            total = sum(costs)
            padded = settings.batch_cost == "padded"
            counted = batch_cost(len(live), total, max(costs) if padded else 0, padded)
            rec_stats.batch(len(live), total, counted, batch.reason)
            rec_stats.waits.extend([started - rec.t for rec in live])
            isolating = settings.on_batch_error == "isolate" and len(live) > 1
            retries = (0, 0)
            latency = self._latency
            if latency is not None:
                latency.started(batch, len(live), total, counted, started)
            self._in_flight += 1
            ok = False
            try:
                outcome = await self._call(live, keep=isolating)
                if isinstance(outcome, Raised):
                    error: BaseException | None = outcome.error
                    retries = await self._isolate(live, outcome.error)
                else:
                    error = outcome
                    ok = error is None
            finally:
                self._in_flight -= 1
                ended = loop.time()
                elapsed = ended - started
                rec_stats.busy_s += elapsed
                rec_stats.process_times.append(elapsed)
                if ok and self._durations is not None:  # a successful batch teaches the duration model
                    self._durations.observe(len(live), counted, elapsed, ended)
                if latency is not None:
                    latency.finished(batch, learned=ok)
                if self._tuning is not None:
                    self._tuning.finished(self, batch, ok, counted, elapsed, total)
            self._out.discard(batch)  # every record is accounted for (or _abort failed them)
            if settings.on_batch is not None:
                oldest = min(rec.t for rec in live)
                info = BatchInfo(
                    started_at=started,
                    size=len(live),
                    cost=counted,
                    reason=batch.reason,
                    queue_wait_max_s=started - oldest,
                    process_time_s=elapsed,
                    error=error,
                    dropped=dropped,
                    key=group_of(live[0]),
                    retries=retries[0],
                    isolated_failures=retries[1],
                )
                self._report(settings.on_batch, info)
        except BaseException as exc:
            if batch in self._out and not loop.is_closed():  # left early, and not already failed by _abort
                self._out.discard(batch)
                cause = None if isinstance(exc, asyncio.CancelledError) else exc
                self._fail(batch.records, explain(cause), cause)
            raise

    async def _isolate(self, live: list[Record[Any]], error: Exception) -> tuple[int, int]:
        """``process_fn`` raised ``error`` on ``live``: re-run halves (``_isolate.py``); return (calls, isolated)."""
        logger.warning(
            "%s: batch of %d records failed (%r); re-running halves to isolate the records it failed on",
            type(self).__name__,
            len(live),
            error,
        )
        counts = [0, 0]
        rec_stats = self._rec

        async def attempt(part: list[Record[Any]]) -> BaseException | Raised | None:
            counts[0] += 1
            rec_stats.retries += 1
            return await self._call(part, keep=True)

        def alone(rec: Record[Any], exc: Exception) -> None:
            counts[1] += 1
            rec_stats.isolated += 1
            self._fail_with([rec], exc)

        await isolate(live, error, attempt, alone)
        return counts[0], counts[1]

    async def _call(self, live: list[Record[Any]], keep: bool = False) -> BaseException | Raised | None:
        """Run ``process_fn`` in a task of its own (see ``_invoke``); return the batch's error.

        With ``keep``, an ``Exception`` that ``process_fn`` raises leaves the
        futures unresolved and comes back as [Raised][tokenbatcher._isolate.Raised].
        """
        loop = self._loop
        assert loop is not None
        try:
            # a streaming process_fn is an async generator: the task iterates it (_streaming.py)
            awaitable = self._stream_call(live) if self._streaming else self._process_fn([rec.item for rec in live])
        except (KeyboardInterrupt, SystemExit) as exc:
            self._stop_on(exc, "process_fn")
            raise
        except BaseException as exc:  # process_fn raised before returning an awaitable: its own failure
            if keep and isinstance(exc, Exception):
                return Raised(exc)
            return self._fail_with(live, batch_error(exc, len(live)))
        # A task of its own, so that a process_fn that ignores cancellation cannot hold up stop().
        finished: asyncio.Future[None] = loop.create_future()
        task = loop.create_task(self._invoke(live, awaitable, finished))
        self._calls.add(task)  # so that a stop() awaited inside process_fn knows where it is
        try:
            await finished  # set by the task itself as it ends: one hop less than a done-callback
        except asyncio.CancelledError:  # only ours (stop): nobody else sees ``finished``
            task.add_done_callback(consume)
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
            if keep and isinstance(error, Exception):
                return Raised(error)
            return self._fail_with(live, batch_error(error, len(live)))
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
            wake(finished)
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

    def _report(self, on_batch: Callable[[BatchInfo], object], info: BatchInfo) -> None:
        try:
            on_batch(info)
        except (KeyboardInterrupt, SystemExit) as exc:
            self._stop_on(exc, "on_batch")
            raise
        except BaseException:  # any other is the hook's own failure; a sync hook never receives our CancelledError
            logger.exception("%s: on_batch hook raised; ignored", type(self).__name__)


def batch_error(error: BaseException, size: int) -> BaseException:
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


def consume(task: asyncio.Future[Any]) -> None:
    """Mark a process_fn task's outcome as seen (it may end after an abort)."""
    if not task.cancelled():
        task.exception()
