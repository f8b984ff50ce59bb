"""How a batch is run: a processing slot calls ``process_fn`` and resolves the futures.

A slot hands the batch's live records to ``process_fn`` (records cancelled or
expired while the batch waited are dropped first); ``_invoking.py`` says in
which task the call runs, and delivers each result to its own record's
future when ``process_fn`` returns (with records waiting and no ``on_batch``
hook, in the loop turn after the slot has handed the next batch over: the
model does not sit idle while ~50 futures are resolved).  Failures map to
the futures as follows:

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

With ``latency_target_s``, a record whose deadline comes while its batch
runs fails then with ``TimeoutError`` (``_overrun.py``); the others wait on.

Once the call is over (or an abort gave up on it), ``_settle`` counts the
batch's time and teaches the models, once per batch.  With records waiting
(and no tuner), the duration model learns one loop turn later, once the slot
has handed the next batch to ``process_fn``: its ~0.1 ms of arithmetic is
then not a gap in which the model sits idle (on the real-clock overload
bench, with the slot's hand-over in ``_dispatch.py``, the gap between two
batches fell from 0.4-0.6 ms to 0.2-0.3 ms).

Owns: a batch's run, from handing it over to its stats and hook.  Must not
touch: the queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ._core import Batch, logger
from ._invoking import Invoking
from ._isolate import Raised, isolate
from ._keyed import group_of
from ._lifecycle import explain
from ._overrun import Overrun
from ._pending import Record
from ._stats import BatchInfo
from ._types import RecordT, ResultT


class Processing(Invoking[RecordT, ResultT]):
    """Running batches (mixed into DynamicBatcher)."""

    async def _run(self, batch: Batch, now: float, slot: asyncio.Task[None]) -> None:
        """Hand a batch to ``process_fn`` at loop time ``now`` and deliver every result to its own future.

        ``slot`` is the task running this (the current task).
        """
        loop = self._loop
        assert loop is not None
        try:
            live = records = batch.records
            for rec in records:
                if rec.done():  # cancelled or expired while sealed: dropped
                    live = batch.records = [rec for rec in records if not rec.done()]
                    break
            n = len(live)
            dropped = len(records) - n
            if not n:
                self._out.discard(batch)
                if self._tuning is not None:
                    self._tuning.forget(batch)
                return
            settings = self._settings  # the batch keeps the settings it was handed over with
            rec_stats = self._rec
            batch.started = started = now
            if n == 1:  # one caller at a time: no lists to build
                (rec,) = live
                rec.waiting = False  # dispatched: its deadline no longer applies
                total = largest = rec.cost
                rec_stats.waits.append(started - rec.t)
            else:
                costs: list[int] = []
                for rec in live:
                    rec.waiting = False
                    costs.append(rec.cost)
                total, largest = sum(costs), max(costs)
                rec_stats.waits.extend([started - rec.t for rec in live])
            batch.counted = counted = n * largest if settings.batch_cost == "padded" else total
            batch.work = total
            rec_stats.batch(n, total, counted, batch.reason)
            isolating = n > 1 and settings.on_batch_error == "isolate"
            retries = (0, 0)
            if self._latency is not None:
                self._latency.started(batch, n, total, counted, started)
                batch.overrun = Overrun(loop, live, self._overran)
            self._in_flight += 1
            ok = False
            try:
                # Not deferred for the hook, which is promised a batch with its results, nor for a stream
                # (its call resolves its records itself).
                defer = settings.on_batch is None and not self._streaming
                outcome = await self._call(batch, live, slot, keep=isolating, defer=defer)
                if outcome is None:
                    error: BaseException | None = None
                    ok = True
                elif isinstance(outcome, Raised):
                    error = outcome.error
                    retries = await self._isolate(batch, live, slot, outcome.error)
                else:
                    error = outcome
            finally:
                if batch.overrun is not None:
                    batch.overrun.cancel()
                self._settle(batch, ok)
            self._out.discard(batch)  # each record resolved, or its result in _undelivered (or _abort failed it)
            if settings.on_batch is not None:
                oldest = min(rec.t for rec in live)
                info = BatchInfo(
                    started_at=started,
                    size=n,
                    cost=counted,
                    reason=batch.reason,
                    queue_wait_max_s=started - oldest,
                    process_time_s=batch.elapsed,
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

    def _observe(self, batch: Batch, ended: float, notify: bool = True) -> None:
        """Teach the duration model the run of ``batch``, which ended at ``ended``; ``notify``: tell the policy."""
        durations = self._durations
        if durations is not None:
            durations.observe(len(batch.records), batch.counted, batch.elapsed, ended)
            if notify and self._latency is not None:
                self._latency.learned()

    def _overran(self, rec: Record[Any]) -> None:
        """``rec``'s deadline came while its batch ran (``_overrun.py``): ``TimeoutError``, its result dropped."""
        rec.set_exception(
            TimeoutError(
                "record's batch was still running at its deadline (latency_target_s, or its timeout_s if "
                "shorter); its result will be dropped"
            )
        )
        self._rec.expired += 1
        self._rec.overrun += 1

    def _settle(self, batch: Batch, ok: bool) -> None:
        """``batch`` left ``process_fn`` (``ok``: its first call succeeded): count its time, teach the models.

        Once per batch: when its slot's call returns, or earlier, when an
        abort gives up on a call that may never return (``Lifecycle._abort``).
        """
        if batch.settled:
            return
        batch.settled = True
        self._in_flight -= 1
        loop = self._loop
        assert loop is not None
        ended = loop.time()
        batch.elapsed = elapsed = ended - batch.started
        rec_stats = self._rec
        rec_stats.busy_s += elapsed
        rec_stats.process_times.append(elapsed)
        learned = ok and self._durations is not None  # a successful batch teaches the duration model
        if learned and self._pending.size and self._tuning is None:
            # Records wait: the next batch goes to process_fn first, and the model learns right after
            # (a tenth of a millisecond that the model would otherwise sit idle for).
            loop.call_soon(self._observe, batch, ended)
            learned = False
        elif learned:
            self._observe(batch, ended, notify=False)
        if self._latency is not None:
            self._latency.finished(batch, learned=learned)
        if self._tuning is not None:
            self._tuning.finished(self, batch, ok, batch.counted, elapsed, batch.work)

    async def _isolate(
        self, batch: Batch, live: list[Record[Any]], slot: asyncio.Task[None], error: Exception
    ) -> tuple[int, int]:
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
            return await self._call(batch, part, slot, keep=True)

        def alone(rec: Record[Any], exc: Exception) -> None:
            counts[1] += 1
            rec_stats.isolated += 1
            self._fail_with([rec], exc)

        await isolate(live, error, attempt, alone)
        return counts[0], counts[1]

    def _report(self, on_batch: Callable[[BatchInfo], object], info: BatchInfo) -> None:
        try:
            on_batch(info)
        except (KeyboardInterrupt, SystemExit) as exc:
            self._stop_on(exc, "on_batch")
            raise
        except BaseException:  # any other is the hook's own failure; a sync hook never receives our CancelledError
            logger.exception("%s: on_batch hook raised; ignored", type(self).__name__)
