"""One ``process_fn`` call: where it runs, and how its outcome reaches the futures.

On Python 3.11 and later the processing slot's own task awaits ``process_fn``
(``_call``): no task per batch, so a caller's result is one event-loop
iteration nearer, and a ``process_fn`` that returns without suspending costs
no iteration at all.  ``Task.cancelling()`` tells the two kinds of
``CancelledError`` apart: a cancel requested of the slot's task (``stop()``
giving up, the event loop shutting down) is the batcher's own, and the slot
ends; one that ``process_fn`` raises of itself is its failure, and the slot
serves on.  A ``process_fn`` that ignores the cancel, or swallows it and
returns, cannot hold up ``stop()``: when a run is aborted, the lifecycle
settles every batch still in a call (``Processing._settle``) and does not wait
for its task beyond the step that delivers the cancel (``Lifecycle._join``);
whatever that call does later touches nothing, as the slot ends the moment
``process_fn`` returns.

Python 3.10 has no ``cancelling()``: there each call runs in a task of its
own (``_call_in_task``), which delivers the results itself and wakes its slot
on the way out.

Owns: running one call and resolving its futures.  Must not touch: the queue,
or what a batch is counted as (``_processing.py``).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import Any

from ._core import Batch, Core, logger, wake
from ._errors import BatchAbortedError
from ._isolate import Raised
from ._pending import Record
from ._types import RecordT, ResultT

IN_SLOT = sys.version_info >= (3, 11)
"""``process_fn`` runs in its slot's task (needs ``Task.cancelling()``); else in a task per call."""


class Invoking(Core[RecordT, ResultT]):
    """Calling ``process_fn`` on a batch (mixed into DynamicBatcher, under ``Processing``)."""

    async def _call(
        self,
        batch: Batch,
        live: list[Record[Any]],
        slot: asyncio.Task[None],
        keep: bool = False,
        defer: bool = False,
    ) -> BaseException | Raised | None:
        """Call ``process_fn`` on ``live`` (the records of ``batch`` it gets); return the batch's error.

        On Python 3.11+ in ``slot``, the slot's own task, which runs this
        (see the module docstring), else in a task of its own (``_call_in_task``).  With ``keep``, an
        ``Exception`` that ``process_fn`` raises leaves the futures
        unresolved and comes back as [Raised][tokenbatcher._isolate.Raised].  With ``defer``, results
        may be given one loop turn later (see ``_deliver_later``).
        """
        try:
            awaitable: Awaitable[Any]
            if self._streaming:  # an async generator: the call iterates it (_streaming.py)
                awaitable = self._stream_call(live)
            else:
                awaitable = self._process_fn([rec.item for rec in live] if len(live) > 1 else [live[0].item])
        except (KeyboardInterrupt, SystemExit) as exc:
            self._stop_on(exc, "process_fn")
            raise
        except BaseException as exc:  # process_fn raised before returning an awaitable: its own failure
            if keep and isinstance(exc, Exception):
                return Raised(exc)
            return self._fail_with(live, batch_error(exc, len(live)))
        if not IN_SLOT:  # pragma: no cover  (Python 3.10)
            return await self._call_in_task(batch, live, awaitable, keep)
        task = slot
        before = task.cancelling()  # type: ignore[attr-defined,unused-ignore]  # 3.11+
        calls = self._calls
        calls[task] = batch  # so that a stop() awaited inside process_fn knows where it is, and an abort finds it
        try:
            # typed Any: what process_fn really returns is checked by _deliver
            results: Any = await awaitable
        except (KeyboardInterrupt, SystemExit) as exc:
            self._stop_on(exc, "process_fn")
            raise
        except BaseException as exc:
            if task.cancelling() > before:  # type: ignore[attr-defined,unused-ignore]
                # the slot was cancelled (stop gave up, the loop shuts down): not process_fn's own failure
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise asyncio.CancelledError from exc
            if keep and isinstance(exc, Exception):
                return Raised(exc)
            if isinstance(exc, asyncio.CancelledError):  # worded as when the call had a task of its own
                error = BatchAbortedError(f"process_fn was cancelled (raised CancelledError) on a batch of {len(live)}")
                error.__cause__ = exc
                return self._fail_with(live, error)
            return self._fail_with(live, batch_error(exc, len(live)))
        finally:
            del calls[task]
        if task.cancelling() > before:  # type: ignore[attr-defined,unused-ignore]
            raise asyncio.CancelledError  # process_fn swallowed the slot's cancel: the slot ends all the same
        if defer and len(live) > 1 and self._pending.size:
            return self._deliver_later(batch, live, results)
        return self._deliver(batch, live, results)

    def _deliver_later(self, batch: Batch, live: list[Record[Any]], results: Any) -> BaseException | None:
        """``_deliver``, its futures resolved in the next loop turn: after the slot hands over its next batch.

        Records wait, so the slot takes the next batch the moment this call
        returns; resolving ~50 futures first (~0.1 ms, a set_result each)
        would be time the model sits idle between two batches.  Their callers
        resume one loop turn later than they otherwise would (the hand-over's
        ~0.2 ms, spent while the model works).  A result list of the wrong
        shape still fails the batch at once, and the results are copied
        (``process_fn`` may reuse its list in the next call).
        """
        error = _misfit(live, results)
        if error is not None:
            return self._fail_with(live, error)
        assert live is batch.records  # the whole batch's call, not a part being isolated
        loop = self._loop
        assert loop is not None
        self._undelivered[batch] = list(results)  # pyright: ignore[reportUnknownArgumentType]
        loop.call_soon(self._give_undelivered, batch)
        return None

    def _give_undelivered(self, batch: Batch) -> None:
        """Give the results ``_deliver_later`` kept for ``batch``, unless an abort already gave them."""
        results = self._undelivered.pop(batch, None)
        if results is not None:
            self._give(batch, batch.records, results)

    async def _call_in_task(
        self, batch: Batch, live: list[Record[Any]], awaitable: Awaitable[Any], keep: bool
    ) -> BaseException | Raised | None:  # pragma: no cover  (Python 3.10)
        """Await ``process_fn`` in a task of its own, so that a cancel of the slot is told from its own."""
        loop = self._loop
        assert loop is not None
        finished: asyncio.Future[None] = loop.create_future()
        task = loop.create_task(self._invoke(batch, live, awaitable, finished))
        self._calls[task] = None  # so that a stop() awaited inside process_fn knows where it is
        try:
            await finished  # set by the task itself as it ends: one hop less than a done-callback
        except asyncio.CancelledError:  # only ours (stop): nobody else sees ``finished``
            task.add_done_callback(consume)
            task.cancel()
            raise
        finally:
            del self._calls[task]
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
        self, batch: Batch, live: list[Record[Any]], awaitable: Awaitable[Any], finished: asyncio.Future[None]
    ) -> BaseException | None:  # pragma: no cover  (Python 3.10)
        """The task of ``_call_in_task``: await ``process_fn`` and deliver the results; set ``finished`` on the way out.

        The results are delivered here, inside the task, so a caller wakes as
        soon as ``process_fn`` returns, not one hop later when the slot does.
        """
        try:
            results: Any = await awaitable
        finally:
            wake(finished)
        return self._deliver(batch, live, results)

    def _deliver(self, batch: Batch, live: list[Record[Any]], results: Any) -> BaseException | None:
        """Give each record its own result; a result list of the wrong shape fails the batch (returned)."""
        error = _misfit(live, results)
        if error is not None:
            return self._fail_with(live, error)
        self._give(batch, live, results)
        return None

    def _give(self, batch: Batch, live: list[Record[Any]], results: list[Any] | tuple[Any, ...]) -> None:
        """Resolve each record still pending with its own result (``results``: as many as ``live``).

        With a latency target, a record whose deadline has passed gets ``TimeoutError`` instead, as its
        timer would have given it (``_overrun.py``).
        """
        if batch.overrun is not None:
            batch.overrun.fail_overdue()
        if len(live) == 1:  # one caller at a time
            rec = live[0]
            if not rec.done():
                rec.set_result(results[0])
                self._rec.completed += 1
            return
        completed = 0
        for rec, result in zip(live, results, strict=True):
            if not rec.done():  # else cancelled by its caller meanwhile (counted then)
                rec.set_result(result)
                completed += 1
        self._rec.completed += completed

    def _fail_with(self, live: list[Record[Any]], error: BaseException) -> BaseException:
        logger.error("%s: batch of %d records failed: %r", type(self).__name__, len(live), error)
        for rec in live:
            if not rec.done():
                rec.set_exception(error)
                self._rec.failed += 1
        return error


def _misfit(live: list[Record[Any]], results: Any) -> Exception | None:
    """Why ``results`` cannot be ``live``'s, one each (a non-list, or the wrong count); None if they can."""
    if not isinstance(results, (list, tuple)):
        return TypeError(f"process_fn must return a list of {len(live)} results, got {type(results).__name__}")
    if len(results) != len(live):  # pyright: ignore[reportUnknownArgumentType]
        return ValueError(f"process_fn returned {len(results)} results for batch of {len(live)} records")  # pyright: ignore[reportUnknownArgumentType]
    return None


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


def consume(task: asyncio.Future[Any]) -> None:  # pragma: no cover  (Python 3.10)
    """Mark a process_fn task's outcome as seen (it may end after an abort)."""
    if not task.cancelled():
        task.exception()
