"""One batcher per running event loop, for [batched][tokenbatcher.batched].

A batcher belongs to the event loop that started it, so a decorated function
keeps one per loop: created and started by the first call in that loop, and
forgotten when the loop shuts down the way ``asyncio.run``, ``asyncio.Runner``
and pytest-asyncio shut loops down (cancelling the tasks still running); a
small watcher task per loop notices that.  Only the public API of the batcher
(``start``, ``is_running``, ``stop``) is used here.

This module owns the loop-to-batcher registry and the batchers' start and
stop.  It knows nothing of calls (``_batched_function.py``) or instances
(``_perinstance.py``): it is handed a batch function and the settings.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic

from ._token import TokenBatcher
from ._types import RecordT, ResultT

if TYPE_CHECKING:
    from ._decorator import BatcherSettings


_started: set[_Entry] = set()
"""Every started batcher, held until its loop shuts down or it is closed.

An idle batcher's tasks wait on futures that only they refer to, and asyncio
holds tasks weakly: without this, a batcher whose function or instance was
dropped could be garbage collected with its tasks pending ("Task was destroyed
but it is pending!").
"""

_closing: set[asyncio.Task[None]] = set()
"""Tasks stopping the batchers of dropped functions and instances, held until they end."""


class _Entry:
    """One loop's batcher, and the task that notices the loop shutting down."""

    __slots__ = ("batcher", "watcher")

    def __init__(self, batcher: TokenBatcher[Any, Any]) -> None:
        self.batcher = batcher
        self.watcher: asyncio.Task[None] | None = None


class PerLoop(Generic[RecordT, ResultT]):
    """The batchers of one batch function, one per event loop."""

    __slots__ = ("_by_loop", "_fn", "_settings")

    def __init__(self, fn: Callable[[list[RecordT]], Any], settings: BatcherSettings) -> None:
        self._fn = fn
        self._settings = settings
        # Weak keys drop a loop's entry once the loop is gone; a started batcher refers to its
        # loop, so that entry is removed by its watcher when the loop shuts down.
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Entry] = weakref.WeakKeyDictionary()

    def current(self) -> TokenBatcher[RecordT, ResultT]:
        """The running loop's batcher; a new one, not yet started, if it has none."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "a batched function's batcher belongs to an event loop, and none is running in this thread"
            ) from None
        entry = self._by_loop.get(loop)
        if entry is None:
            entry = self._by_loop[loop] = _Entry(TokenBatcher(self._fn, **self._settings))
        return entry.batcher

    async def running(self) -> TokenBatcher[RecordT, ResultT]:
        """The running loop's batcher, started."""
        loop = asyncio.get_running_loop()
        entry = self._by_loop.get(loop)
        if entry is not None and entry.batcher.is_running:
            return entry.batcher
        batcher = self.current()
        entry = self._by_loop[loop]
        if not batcher.is_running:
            await batcher.start()  # "already running" cannot happen: start() does not yield before it runs
        if entry.watcher is None or entry.watcher.done():
            entry.watcher = loop.create_task(self._watch(loop, entry), name="tokenbatcher-batched-watch")
            _started.add(entry)
        return batcher

    async def _watch(self, loop: asyncio.AbstractEventLoop, entry: _Entry) -> None:
        """Wait for the loop's shutdown (which cancels every task); then forget its batcher."""
        try:
            await loop.create_future()  # nobody resolves it
        finally:
            self._forget(loop, entry)

    def _forget(self, loop: asyncio.AbstractEventLoop, entry: _Entry) -> None:
        _started.discard(entry)
        if self._by_loop.get(loop) is entry:
            del self._by_loop[loop]

    async def close(self) -> None:
        """Stop the running loop's batcher and forget it; the next call starts a new one."""
        loop = asyncio.get_running_loop()
        entry = self._by_loop.get(loop)
        if entry is not None:
            await self._close(loop, entry)

    async def _close(self, loop: asyncio.AbstractEventLoop, entry: _Entry) -> None:
        self._forget(loop, entry)  # calls from now on start a new batcher
        try:
            await entry.batcher.stop()
        finally:
            if entry.watcher is not None:
                entry.watcher.cancel()

    def close_soon(self) -> None:
        """From any thread: stop each started batcher on its own loop, without waiting."""
        while True:
            try:
                entries = list(self._by_loop.items())
                break
            except RuntimeError:  # another thread added a loop meanwhile
                continue
        for loop, entry in entries:
            if entry.watcher is None or entry.watcher.done():
                continue  # never started, or its loop already shut down
            try:
                loop.call_soon_threadsafe(self._close_in_task, loop, entry)
            except RuntimeError:  # the loop was closed meanwhile
                continue

    def _close_in_task(self, loop: asyncio.AbstractEventLoop, entry: _Entry) -> None:
        task = loop.create_task(self._close(loop, entry), name="tokenbatcher-batched-close")
        _closing.add(task)
        task.add_done_callback(_closing.discard)
