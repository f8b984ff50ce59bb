"""How the batch function is called: awaited on the event loop, or run in a worker thread.

Decided once, when the batcher is built (``as_async``):

- An ``async def`` -- also behind ``functools.partial``, a bound method, or an
  object whose ``__call__`` is ``async def`` (and, on Python 3.12+, a function
  marked with ``inspect.markcoroutinefunction``) -- is called on the event
  loop and its coroutine awaited there, as always.
- An async generator function (an ``async def`` with a ``yield``, also
  behind ``functools.partial`` or as a class's ``__call__``) makes a
  streaming batcher: it is iterated on the event loop (``_streaming.py``).
- Any other callable is called in a worker thread: the loop's default executor
  (where ``asyncio.to_thread`` runs), or the ``executor`` given.  It is
  submitted the moment its batch is handed over, in a copy of the caller's
  ``contextvars`` context.  If what it returns there is awaitable (say
  ``lambda batch: model_async(batch)``), that is awaited back on the loop: a
  coroutine never runs in the thread.

A thread cannot be stopped.  When the batch is cancelled while the function
still runs (``stop(timeout=...)`` ran out, the loop shuts down), its futures
are failed at once and whatever the function later returns is dropped (a
coroutine it returns is closed, never run); the thread itself runs to its end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Generic, cast

from ._errors import BatchAbortedError
from ._streams import StreamFn
from ._types import ProcessFn, RecordT, ResultT


def is_async(fn: object) -> bool:
    """True if calling ``fn`` returns a coroutine by construction.

    That is an ``async def``, also behind ``functools.partial`` or a bound
    method, or an object whose class defines ``async def __call__``.  Anything
    else -- a plain function, a lambda, a class -- is plain, whatever it returns.
    """
    return _declared(fn, inspect.iscoroutinefunction)


def is_async_gen(fn: object) -> bool:
    """True if calling ``fn`` returns an async generator by construction (a streaming ``process_fn``).

    As [is_async][], for an ``async def`` with a ``yield`` in it: also behind
    ``functools.partial`` or a bound method, or as a class's ``__call__``.
    """
    return _declared(fn, inspect.isasyncgenfunction)


def _declared(fn: object, test: Callable[[object], bool]) -> bool:
    """Whether ``fn``, unwrapped from partials, or its class's ``__call__``, passes ``test``."""
    while isinstance(fn, functools.partial):
        fn = fn.func  # pyright: ignore[reportUnknownMemberType]
    if test(fn):
        return True
    if inspect.isroutine(fn) or isinstance(fn, type):
        return False
    return test(getattr(type(fn), "__call__", None))  # noqa: B004  (the class's, not callable())


def as_async(
    fn: ProcessFn[RecordT, ResultT] | Callable[[list[RecordT]], list[ResultT]] | StreamFn[RecordT, ResultT],
    executor: concurrent.futures.Executor | None,
) -> ProcessFn[RecordT, ResultT]:
    """Turn the user's batch function into one that returns an awaitable.

    Args:
        fn: The batch function, async or plain.
        executor: Where a plain ``fn`` runs; None for the event loop's
            default executor.

    Returns:
        ``fn`` itself if it is async (``is_async``) or an async generator
        function (``is_async_gen``: a streaming batcher iterates it); otherwise a callable that
        submits ``fn`` to a worker thread and returns an awaitable of its result.

    Raises:
        TypeError: ``executor`` is not a ``concurrent.futures.Executor``.
        ValueError: ``executor`` was given for an async ``fn``, which never uses it.
    """
    if executor is not None and not isinstance(executor, concurrent.futures.Executor):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise TypeError(
            f"executor must be a concurrent.futures.Executor or None, got {executor!r} ({type(executor).__name__})"
        )
    if is_async(fn) or is_async_gen(fn):  # an async generator (streaming) is iterated on the loop
        if executor is not None:
            raise ValueError(
                f"executor is only used by a plain (non-async) process_fn, and {fn!r} is async: "
                "it runs on the event loop; drop executor="
            )
        return cast("ProcessFn[RecordT, ResultT]", fn)  # it returns an awaitable
    return InWorker[RecordT, ResultT](cast("Callable[[list[RecordT]], object]", fn), executor)  # not a StreamFn


class InWorker(Generic[RecordT, ResultT]):
    """A plain batch function, called in a worker thread; awaitable on the loop."""

    __slots__ = ("_executor", "_fn", "_pass_context")

    def __init__(self, fn: Callable[[list[RecordT]], object], executor: concurrent.futures.Executor | None) -> None:
        self._fn = fn
        self._executor = executor
        # a process pool can pickle neither a context nor a lock: it gets the bare function
        self._pass_context = not isinstance(executor, concurrent.futures.ProcessPoolExecutor)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._fn!r}>"

    def __call__(self, batch: list[RecordT]) -> Awaitable[list[ResultT]]:
        """Submit ``fn(batch)`` now; return an awaitable of its result."""
        loop = asyncio.get_running_loop()
        if not self._pass_context:
            return _result(loop.run_in_executor(self._executor, self._fn, batch), None)
        job = _Job(self._fn, batch, contextvars.copy_context())
        return _result(loop.run_in_executor(self._executor, job), job)


class _Job:
    """One call in a worker thread, and what it returned until the loop takes it."""

    __slots__ = ("_abandoned", "_batch", "_context", "_fn", "_lock", "_returned")

    def __init__(self, fn: Callable[[list[Any]], object], batch: list[Any], context: contextvars.Context) -> None:
        self._fn = fn
        self._batch = batch
        self._context = context
        self._lock = threading.Lock()
        self._abandoned = False
        self._returned: object = None

    def __call__(self) -> object:
        """Run in the worker thread."""
        try:
            returned = self._context.run(self._fn, self._batch)
        except RuntimeError as exc:
            if "no running event loop" not in str(exc) and "no current event loop" not in str(exc):
                raise
            raise RuntimeError(
                f"process_fn {self._fn!r} is a plain (non-async) function, so the batcher calls it in a "
                "worker thread, where no event loop runs; but it needs one. Make it `async def` "
                "(and run a blocking model inside it with `await asyncio.to_thread(model, batch)`), "
                "or have it return an awaitable instead of using the loop itself."
            ) from exc
        except Exception:
            raise
        except BaseException as exc:
            # Signals reach the main thread, so this is no Ctrl-C; re-raised on the loop,
            # a KeyboardInterrupt or SystemExit would escape asyncio and end the program.
            raise BatchAbortedError(
                f"process_fn raised {exc!r} in its worker thread on a batch of {len(self._batch)}"
            ) from exc
        if inspect.iscoroutine(returned):
            with self._lock:
                if self._abandoned:
                    returned.close()
                    return None
                self._returned = returned
        return returned

    def abandon(self) -> None:
        """The loop no longer waits: close a coroutine the thread returned, or will."""
        with self._lock:
            self._abandoned = True
            returned, self._returned = self._returned, None
        if inspect.iscoroutine(returned):
            returned.close()


async def _result(future: asyncio.Future[Any], job: _Job | None) -> Any:
    try:
        returned = await future
    except asyncio.CancelledError:
        if job is not None:
            job.abandon()
        raise
    if inspect.isawaitable(returned):
        return await returned
    return returned
