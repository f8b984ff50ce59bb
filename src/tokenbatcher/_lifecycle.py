"""The lifecycle of a batcher: start, stop, restart and failure, as a state machine.

A batcher moves between four states, and only through ``_move`` and this table:

| state      | event   | next       | when                                                    |
|------------|---------|------------|---------------------------------------------------------|
| ``new``      | start   | ``running``  | ``start()``                                             |
| ``stopped``  | start   | ``running``  | ``start()`` again: stats go on counting                 |
| ``running``  | stop    | ``stopping`` | ``stop()`` begins: submits are refused from here on     |
| ``stopping`` | end     | ``stopped``  | the drain is over (or ``stop``'s timeout gave up)       |
| ``running``  | end     | ``stopped``  | a loop failed, the event loop shut down, or user code   |
|            |         |            | raised ``KeyboardInterrupt``/``SystemExit``             |

``is_running`` is True in ``running`` and ``stopping``.

A *run* lasts from ``start`` until its stop or failure ends it, and is known
by its ``_stopped`` future: stopping, aborting and the loops' done-callbacks
act only on their own run, and ``start`` first waits for the last run's loops,
so nothing of one run touches the next.  Aborting (a stop that gives up, a
failure) fails every unresolved future at once with
[BatcherStoppedError][tokenbatcher.BatcherStoppedError] naming the reason.

Owns: the state, the run's tasks, stopping and failing.  Must not touch: how
records are queued (``_intake.py``) or batched (``_pending.py``, ``_dispatch.py``).
"""

from __future__ import annotations

import asyncio
import enum
import functools
from collections.abc import Coroutine, Sequence
from typing import Any

from typing_extensions import Self

from ._core import Core, logger, wake
from ._errors import BatcherStoppedError
from ._pending import Record
from ._settings import check_optional_seconds
from ._types import RecordT, ResultT


class State(enum.Enum):
    """Where a batcher is in its life (see the module docstring)."""

    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


NEW, RUNNING, STOPPING, STOPPED = State  # module constants: cheaper than State.X on the hot path

TRANSITIONS: dict[tuple[State, str], State] = {
    (NEW, "start"): RUNNING,
    (STOPPED, "start"): RUNNING,
    (RUNNING, "stop"): STOPPING,
    (STOPPING, "end"): STOPPED,
    (RUNNING, "end"): STOPPED,
}
"""The table of the module docstring: ``(state, event) -> next state``."""


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The running event loop, or None outside one."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def explain(error: BaseException | None) -> str:
    """Why a loop of the batcher ended other than by stop(), for the futures it leaves and later submits."""
    if error is None:
        return "the event loop running the batcher cancelled its tasks (did asyncio.run() return?)"
    return f"an internal loop failed ({error!r})"


class Lifecycle(Core[RecordT, ResultT]):
    """Start, stop and failure of a batcher (mixed into DynamicBatcher)."""

    _aborting: bool
    _ended: str | None
    """Why the last run ended other than by stop()."""
    _failure: BaseException | None
    """... and the exception that ended it."""
    _orphaned: bool
    """Our event loop cancelled our tasks without stop(): it shut down."""
    _stoppers: set[asyncio.Task[None]]
    """Stops begun inside process_fn, seen through by tasks of their own."""

    def _init_lifecycle(self) -> None:
        self._state = NEW
        self._aborting = self._orphaned = False
        self._ended = self._failure = None
        self._stoppers = set()

    def _move(self, event: str) -> None:
        """Take the transition ``event`` from the current state (see ``TRANSITIONS``)."""
        self._state = TRANSITIONS[self._state, event]

    @property
    def is_running(self) -> bool:
        """True from a successful [start][] until [stop][] returns."""
        return self._state is RUNNING or self._state is STOPPING

    async def start(self) -> None:
        """Start the batching loops on the running event loop.

        Raises:
            RuntimeError: The batcher is already running (or still stopping).
        """
        if self._state is RUNNING or self._state is STOPPING:
            raise RuntimeError(f"{type(self).__name__} is already running")
        loop = asyncio.get_running_loop()
        leftovers = [task for task in self._tasks if not task.done()] if self._loop is loop else []
        if leftovers:
            # The last run's loops, cancelled by a stop() that gave up or by a failure, end within
            # a few iterations of the event loop; the new run must not start under them.
            await self._join(leftovers)
            if self._state is RUNNING or self._state is STOPPING:  # a concurrent start() came first
                raise RuntimeError(f"{type(self).__name__} is already running")
        self._loop = loop
        self._move("start")
        self._aborting = self._orphaned = False
        self._failure = self._ended = None
        self._stopped = stopped = loop.create_future()
        bodies = self._strategy.loops()
        name = type(self).__name__
        self._tasks = []
        for i, body in enumerate(bodies):
            task = loop.create_task(self._guard(body, stopped), name=f"{name}-loop-{i}")
            task.add_done_callback(functools.partial(self._loop_ended, stopped, body))
            self._tasks.append(task)
        logger.info("%s started (dispatch=%r)", name, self._settings.dispatch)

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
        seconds = check_optional_seconds("timeout", timeout, allow_zero=True)
        if self._state is NEW or self._state is STOPPED:
            return
        self._check_loop()
        stopped = self._stopped
        assert stopped is not None
        if asyncio.current_task() in self._calls:
            self._stop_from_process_fn(stopped, seconds)
        elif self._state is RUNNING:
            self._begin_stop()
            await self._drain(stopped, seconds)
        else:
            await self._join_stop(stopped, seconds)

    async def _join(self, tasks: Sequence[asyncio.Task[None]]) -> None:
        """Wait for a run's loops, cancelled, to end.

        A loop inside a ``process_fn`` call (``_invoking.py``) is waited for
        one step only: the one that delivers the cancel, in which a call that
        honours it ends.  One that ignores it must not hold up ``stop()`` or
        ``start()``; the abort has settled its batch, and it ends, touching
        nothing, whenever ``process_fn`` returns.
        """
        calls = self._calls
        rest = [task for task in tasks if not task.done() and task not in calls]
        if rest:
            await asyncio.wait(rest)
        inside = [task for task in tasks if not task.done() and task in calls]
        if inside:
            await asyncio.wait(inside, timeout=0)

    def _begin_stop(self) -> None:
        self._move("stop")
        self._release_all_waiters()

    async def _drain(self, stopped: asyncio.Future[None], timeout: float | None) -> None:
        """The first stop() of a run: let the loops finish every accepted record, or give up."""
        tasks = self._tasks
        try:
            _, unfinished = await asyncio.wait(tasks, timeout=timeout)
            if unfinished:
                self._abort(stopped, f"stop(timeout={timeout}) ran out of time")
                await self._join(tasks)
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
        if self._state is RUNNING:
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
        self._move("end")
        self._release_all_waiters()
        wake(stopped)

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
        for batch in list(self._calls.values()):  # calls that may never return: their time ends now
            if batch is not None:
                self._settle(batch, False)
        self._deadlines.clear()
        for batch in list(self._undelivered):  # processed: their results, not a failure
            self._give_undelivered(batch)
        self._fail(self._pending.clear(), reason, cause)
        batches = list(self._out)
        self._out.clear()
        for batch in batches:
            self._fail(batch.records, reason, cause)
        self._strategy.abort()
        self._release_all_waiters()

    def _end_run(self, stopped: asyncio.Future[None], reason: str, cause: BaseException | None) -> None:
        """The run ends other than by stop(): fail everything now, and say why to later submits."""
        if stopped is not self._stopped or stopped.done():
            return
        self._ended, self._failure = reason, cause
        self._abort(stopped, reason, cause)
        self._finish_stop(stopped)

    async def _guard(self, body: Coroutine[Any, Any, None], stopped: asyncio.Future[None]) -> None:
        """Run one loop of the run ``stopped``; if it fails, end the run at once.

        At once, in the step that failed, rather than in the task's
        done-callback an iteration later: no other slot serves a record
        meanwhile, as if nothing had happened.
        """
        try:
            await body
        except (asyncio.CancelledError, GeneratorExit):  # cancelled, or destroyed with a closed loop
            raise
        except BaseException as exc:
            self._loop_failed(stopped, exc)
            raise

    def _loop_ended(
        self, stopped: asyncio.Future[None], body: Coroutine[Any, Any, None], task: asyncio.Task[None]
    ) -> None:
        """A loop task of the run ``stopped`` ended: unless by that run's own stop, fail everything now."""
        body.close()  # a no-op, unless the task was cancelled before its first step, so ``_guard`` never ran it
        error = None if task.cancelled() else task.exception()  # retrieved, even when it is ours to ignore
        if error is not None or task.cancelled():
            self._loop_failed(stopped, error)

    def _loop_failed(self, stopped: asyncio.Future[None], error: BaseException | None) -> None:
        """A loop of the run ``stopped`` raised ``error``, or was cancelled (None), other than by that run's stop."""
        if stopped is not self._stopped or self._aborting:
            return
        if error is None:  # not by us: the event loop is shutting down under a running batcher
            self._orphaned = True
        else:
            logger.error("%s: an internal loop failed: %r", type(self).__name__, error)
        self._end_run(stopped, explain(error), error)

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

    def _check_loop(self) -> None:
        if running_loop() is not self._loop:
            self._wrong_loop()

    def _wrong_loop(self) -> None:
        old = self._loop
        name = type(self).__name__
        if old is not None and old.is_running() and self._state is RUNNING:
            # Its loop runs in another thread (a web server's, a notebook's): that is what submit_threadsafe is for.
            raise RuntimeError(
                f"this {name} runs on an event loop in another thread, and a coroutine such as submit() "
                "can only be awaited on that loop. From this thread, call "
                "batcher.submit_threadsafe(record), which returns a concurrent.futures.Future "
                "(.result() waits for the result); do not start a second event loop with asyncio.run()."
            )
        state = "closed" if old is None or old.is_closed() else "still open, but not the one running now"
        raise RuntimeError(
            f"this {name} was started on another event loop, which is {state}. "
            "A batcher belongs to the loop that started it: after asyncio.run() returns, "
            "build and start a new one (with an alru_cache singleton, call cache_clear() "
            "or key the cache by event loop)."
        )

    def _refuse(self, *, stopping: bool = False) -> None:
        """Raise the right error for a submit while not accepting records (``stopping``: its run stopped)."""
        name = type(self).__name__
        if self._state is RUNNING and not stopping:
            self._check_loop()
            return
        if self._state is STOPPING or stopping:
            raise RuntimeError(f"{name} is not running: stop() has begun, so no new records are accepted.")
        if self._ended is not None:
            if self._orphaned and running_loop() not in (None, self._loop):
                self._wrong_loop()
            raise RuntimeError(f"{name} is not running ({self._ended}). Call start() again.") from self._failure
        raise RuntimeError(f"{name} is not running. Call start() or use 'async with'.")

    def _check_accepting(self, stopped: asyncio.Future[None] | None) -> None:
        """After a wait inside a submit: raise if the run that the submit began in stopped accepting."""
        if self._stopped is not stopped or self._state is not RUNNING:
            self._refuse(stopping=self._stopped is not stopped)  # else a new run began meanwhile
