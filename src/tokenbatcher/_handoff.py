"""``submit_threadsafe``: one record from a caller's thread to its result.

``Threadsafe.submit_threadsafe`` checks what it can in the caller's thread,
then hands the record over (``Handoff``): the caller's thread gets a ``concurrent.futures.Future`` at once; the record
is submitted on the batcher's event loop, and its outcome is carried back.
Every way the event loop can go away before that (stopped, shut down, closed)
settles the caller's future with [BatcherStoppedError][tokenbatcher.BatcherStoppedError]
rather than leaving it waiting forever.

Owns: crossing from a caller's thread to the batcher's loop and back.  Must
not touch: how the record is priced, checked or queued (``submit`` does that,
on the loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic

from ._errors import BatcherStoppedError
from ._intake import Intake
from ._keyed import check_key
from ._lifecycle import RUNNING
from ._streams import use_submit_stream
from ._types import RecordT, ResultT


class Handoff(Generic[ResultT]):
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


class Threadsafe(Intake[RecordT, ResultT]):
    """Submitting from another thread (mixed into DynamicBatcher)."""

    def submit_threadsafe(
        self,
        record: RecordT,
        *,
        estimated_cost: int | None = None,
        timeout_s: float | None = None,
        priority: int = 0,
        key: Hashable | None = None,
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
                batcher's own event-loop thread (use [submit][tokenbatcher.DynamicBatcher.submit] there).
            TypeError: A ``timeout_s`` or ``priority`` of the wrong type, or a
                ``key`` that is not hashable.
            ValueError: A ``timeout_s`` or ``priority`` out of range.
        """
        if self._streaming:
            raise use_submit_stream("submit_threadsafe", self)
        loop = self._loop
        if self._state is not RUNNING or loop is None:
            self._refuse()
        assert loop is not None
        if getattr(loop, "_thread_id", None) == threading.get_ident():
            raise RuntimeError("submit_threadsafe() was called on the batcher's own event loop; use submit()")
        self._check_request(timeout_s, priority)  # bad arguments raise here, in the caller's thread
        check_key("key", key)

        def submit() -> Coroutine[Any, Any, asyncio.Future[ResultT]]:
            return self.submit(record, estimated_cost=estimated_cost, timeout_s=timeout_s, priority=priority, key=key)

        handoff = Handoff(loop, submit, f"{type(self).__name__}-submit_threadsafe")
        if loop.is_running():
            with contextlib.suppress(RuntimeError):  # the loop closed just now: fall through
                loop.call_soon_threadsafe(handoff.start)
                return handoff.outcome
        handoff.stopped("the event loop running the batcher is not running (it stopped or closed without stop())")
        return handoff.outcome
