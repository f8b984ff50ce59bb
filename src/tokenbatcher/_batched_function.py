"""What [batched][tokenbatcher.batched] returns: ``await f(record)``, one record to its result.

A call finds the running event loop's batcher (``_perloop.py``), started on
first use, and submits its record: ``submit`` for a plain batch function,
``submit_stream`` for a streaming one (the call then returns the record's
[Stream][tokenbatcher.Stream]).  ``f.batcher`` and ``await f.aclose()`` reach
that same batcher.

On a class, the object is a descriptor: ``instance.method`` is a bound copy
whose batchers are that instance's (``_perinstance.py`` keeps them).

This module owns the per-call path and the descriptor.  It does not keep
batchers itself (``_perloop.py`` and ``_perinstance.py`` do), check settings
or declare the typing of ``batched`` (``_decorator.py`` does), and it uses
only the public API of the batcher.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, Generic, cast, overload

from typing_extensions import Self

from ._calling import is_async_gen
from ._perinstance import PerInstance, hold_owner, qualname
from ._perloop import PerLoop
from ._streams import Stream
from ._token import TokenBatcher
from ._types import RecordT, ResultT

if TYPE_CHECKING:
    from ._decorator import BatcherSettings


class BatchedFunction(Generic[RecordT, ResultT]):
    """``await f(record)``: one record in, its own result out, batched with concurrent callers.

    Made by [batched][tokenbatcher.batched].  Each running event loop has its
    own batcher, created and started by the first call in that loop.  For a
    streaming batch function, the result is the record's [Stream][tokenbatcher.Stream].
    """

    def __init__(self, fn: Callable[..., Any], settings: BatcherSettings) -> None:
        self._fn = fn
        self._settings = settings
        self._streams = is_async_gen(fn)
        self._loops: PerLoop[RecordT, ResultT] = PerLoop(fn, settings)
        weakref.finalize(self, self._loops.close_soon)  # dropped (a cell run again): stop its batchers
        self._lock = threading.Lock()  # shared with the bound methods made from this one
        # A bound method's is made only if it is itself used as a descriptor (see __get__).
        self._instances: PerInstance[RecordT, ResultT] | None = PerInstance(fn, settings, self._lock)
        for name in ("__module__", "__name__", "__qualname__", "__doc__"):
            if hasattr(fn, name):
                setattr(self, name, getattr(fn, name))

    def __repr__(self) -> str:
        return f"<batched function {qualname(self._fn)}>"

    async def __call__(
        self,
        record: RecordT,
        *,
        estimated_tokens: int | None = None,
        estimated_cost: int | None = None,
        timeout_s: float | None = None,
        priority: int = 0,
        key: Hashable | None = None,
    ) -> ResultT:
        """Process one record in a batch; return its result.

        Args:
            record: The record.
            estimated_tokens: Its cost, as [TokenBatcher.submit][tokenbatcher.TokenBatcher.submit].
            estimated_cost: Its cost, when ``estimated_tokens`` is not given.
            timeout_s: As [DynamicBatcher.submit][tokenbatcher.DynamicBatcher.submit].
            priority: As [DynamicBatcher.submit][tokenbatcher.DynamicBatcher.submit].
            key: As [DynamicBatcher.submit][tokenbatcher.DynamicBatcher.submit]:
                records with different keys never share a batch.

        Returns:
            This record's entry of the batch function's result; for a
            streaming batch function, this record's [Stream][tokenbatcher.Stream]
            (as [submit_stream][tokenbatcher.DynamicBatcher.submit_stream]).

        Raises:
            Exception: Whatever the batch function raised on this record's batch,
                or what ``submit`` raises (a bad cost, say).
        """
        batcher = await self._loops.running()
        submit = batcher.submit_stream if self._streams else batcher.submit
        submitted = await submit(
            record,
            estimated_tokens=estimated_tokens,
            estimated_cost=estimated_cost,
            timeout_s=timeout_s,
            priority=priority,
            key=key,
        )
        if not self._streams:
            return await cast("asyncio.Future[ResultT]", submitted)
        owner = getattr(self, "__self__", None)
        if owner is not None:
            hold_owner(cast("Stream[Any]", submitted), owner)
        return cast("ResultT", submitted)  # the overloads of batched() made ResultT this Stream's type

    @property
    def batcher(self) -> TokenBatcher[RecordT, ResultT]:
        """The running event loop's batcher, for its ``stats``; created (not started) if there is none yet.

        Raises:
            RuntimeError: No event loop is running in this thread.
        """
        return self._loops.current()

    async def aclose(self) -> None:
        """Stop the running event loop's batcher (gracefully, as ``stop()``) and forget it.

        Records already accepted are processed first.  The next call in this
        loop starts a new batcher.  Batchers of other loops are left alone.
        """
        await self._loops.close()

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> Self: ...

    @overload
    def __get__(self, instance: object, owner: type[Any] | None = None) -> BatchedFunction[RecordT, ResultT]: ...

    def __get__(self, instance: object, owner: type[Any] | None = None) -> BatchedFunction[RecordT, ResultT]:
        """On an instance: the batched method of that instance, with its own batchers."""
        if instance is None:
            return self
        instances = self._instances
        if instances is None:
            instances = self._own_instances()
        return _BoundBatched(instances.loops(instance), instance, self)

    def _own_instances(self) -> PerInstance[RecordT, ResultT]:
        """A bound method, itself used as a descriptor: a registry of its own, not the method's."""
        with self._lock:
            if self._instances is None:
                self._instances = PerInstance(self._fn, self._settings, self._lock)
            return self._instances


class _BoundBatched(BatchedFunction[RecordT, ResultT]):
    """A batched method of one instance (what ``instance.method`` returns)."""

    def __init__(self, loops: PerLoop[RecordT, ResultT], instance: object, method: BatchedFunction[Any, Any]) -> None:
        # No super().__init__(): the loops belong to the instance and are shared by every access.
        self._fn = method._fn
        self._settings = method._settings
        self._streams = method._streams
        self._loops = loops
        self._lock = method._lock
        self._instances = None
        self.__self__ = instance  # held, as a bound method holds it, while a call waits
        self.__func__ = method

    def __repr__(self) -> str:
        return f"<batched method {qualname(self._fn)} of {self.__self__!r}>"
