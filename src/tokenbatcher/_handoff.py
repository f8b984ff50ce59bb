"""``submit_threadsafe``'s hand-off: one record from a caller's thread to its result.

The caller's thread gets a ``concurrent.futures.Future`` at once; the record
is submitted on the batcher's event loop, and its outcome is carried back.
Every way the event loop can go away before that (stopped, shut down, closed)
settles the caller's future with [BatcherStoppedError][tokenbatcher.BatcherStoppedError]
rather than leaving it waiting forever.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any, Generic

from ._errors import BatcherStoppedError
from ._types import ResultT


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
