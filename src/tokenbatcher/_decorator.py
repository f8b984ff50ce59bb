"""``@batched``: a batch function becomes an awaitable call per record.

::

    @batched(target_batch_tokens=8_000, max_batch_size=64)
    async def embed(texts: list[str]) -> list[list[float]]: ...

    vector = await embed("one text")  # many concurrent callers, one batch

Behind the call is a [TokenBatcher][tokenbatcher.TokenBatcher], one per running
event loop, created and started by the first call in that loop.  A batcher
belongs to its loop, so one decorated function serves a notebook, each
``asyncio.run`` and each test, each with its own batcher: a batcher cached in
one loop is never reused from another.

When a loop shuts down the way ``asyncio.run``, ``asyncio.Runner`` and
pytest-asyncio shut loops down (cancelling the tasks still running), the
loop's batcher ends with it and is forgotten: a small watcher task per loop
notices the shutdown.  A loop closed without cancelling its tasks keeps its
batcher referenced until the interpreter exits.

An async generator function (a streaming ``process_fn``, see
[StreamFn][tokenbatcher.StreamFn]) becomes ``await f(record)`` returning the
record's [Stream][tokenbatcher.Stream], as ``submit_stream`` does::

    @batched(max_batch_size=32)
    async def generate(prompts: StreamBatch[str]) -> AsyncIterator[list[str | End]]: ...

    async for token in await generate("once upon a time"): ...

On a method, each instance gets its own batchers (one per instance and loop).
When an instance, or a decorated function, is garbage collected, its running
batchers are stopped on their loops.

Only the public API of the batcher (``start``, ``submit``, ``submit_stream``,
``stop``, ``stats``) is used here.
"""

from __future__ import annotations

import concurrent.futures
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, Protocol, TypeVar, cast, overload

from typing_extensions import Self, TypedDict, Unpack

from ._calling import is_async, is_async_gen
from ._perloop import PerLoop
from ._stats import BatchInfo
from ._streams import End, Stream, StreamBatch
from ._token import TokenBatcher
from ._types import BatchCost, Dispatch, Grouping, OnBatchError, RecordT, ResultT, Tune

OwnerT_contra = TypeVar("OwnerT_contra", contravariant=True)


class BatcherSettings(TypedDict, total=False):
    """The keyword arguments of [TokenBatcher][tokenbatcher.TokenBatcher], which [batched][tokenbatcher.batched] takes.

    Every setting of [DynamicBatcher][tokenbatcher.DynamicBatcher] and the
    token-named ones of ``TokenBatcher``, with the same meaning and defaults.
    """

    token_estimator: Callable[[Any], int] | None
    cost_estimator: Callable[[Any], int] | None
    target_batch_tokens: int | None
    target_batch_cost: int
    default_token_estimate: int | None
    default_cost: int
    max_batch_size: int
    min_batch_size: int
    batch_timeout_s: float
    max_queue_size: int
    prefetch_batches: int
    dispatch: Dispatch
    max_concurrent_batches: int
    request_timeout_s: float | None
    batch_cost: BatchCost
    grouping: Grouping
    priority_aging_s: float
    latency_target_s: float | None
    on_batch: Callable[[BatchInfo], object] | None
    batch_key: Callable[[Any], Hashable] | None
    on_batch_error: OnBatchError
    executor: concurrent.futures.Executor | None
    stream_buffer: int
    tune: Tune


_stream_owners: weakref.WeakKeyDictionary[Stream[Any], object] = weakref.WeakKeyDictionary()
"""The instance of a batched streaming method, held while its stream lives.

A plain call holds its bound method, and so the instance, until its result
comes; ``await m.stream(x)`` returns as soon as the record is queued, so the
stream holds the instance instead (``await Model().m(x)`` works).
"""


def _deref(ref: weakref.ref[Any]) -> Any:
    instance = ref()
    if instance is None:  # pragma: no cover  (a caller holds the instance while its record waits)
        raise ReferenceError("the instance of this batched method was garbage collected")
    return instance


def _bind(fn: Callable[..., Any], ref: weakref.ref[Any]) -> Callable[[list[Any]], Any]:
    """``fn`` with its first argument, held weakly, as async (or async generator) or plain as ``fn`` is."""
    if is_async_gen(fn):

        async def bound_stream(batch: list[Any]) -> Any:
            steps = fn(_deref(ref), batch)
            try:
                async for step in steps:
                    yield step
            finally:
                await steps.aclose()

        return bound_stream

    if is_async(fn):

        async def bound_async(batch: list[Any]) -> Any:
            return await fn(_deref(ref), batch)

        return bound_async

    def bound(batch: list[Any]) -> Any:
        return fn(_deref(ref), batch)

    return bound


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
        self._instances: dict[int, tuple[weakref.ref[Any], PerLoop[RecordT, ResultT]]] = {}
        self._lock = threading.Lock()
        for name in ("__module__", "__name__", "__qualname__", "__doc__"):
            if hasattr(fn, name):
                setattr(self, name, getattr(fn, name))

    def __repr__(self) -> str:
        return f"<batched function {self._name()}>"

    def _name(self) -> str:
        return str(getattr(self._fn, "__qualname__", self._fn))

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
        if self._streams:  # the overloads of batched() made ResultT this Stream's type
            stream = await batcher.submit_stream(
                record,
                estimated_tokens=estimated_tokens,
                estimated_cost=estimated_cost,
                timeout_s=timeout_s,
                priority=priority,
                key=key,
            )
            owner = getattr(self, "__self__", None)
            if owner is not None:
                _stream_owners[stream] = owner
            return cast("ResultT", stream)
        future = await batcher.submit(
            record,
            estimated_tokens=estimated_tokens,
            estimated_cost=estimated_cost,
            timeout_s=timeout_s,
            priority=priority,
            key=key,
        )
        return await future

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
        return _BoundBatched(self._for(instance), instance, self)

    def _for(self, instance: object) -> PerLoop[RecordT, ResultT]:
        key = id(instance)
        found = self._instances.get(key)
        if found is not None and found[0]() is instance:
            return found[1]
        with self._lock:  # two threads, each with its own loop, may meet an instance at once
            found = self._instances.get(key)
            if found is not None and found[0]() is instance:
                return found[1]
            return self._add(key, instance)

    def _add(self, key: int, instance: object) -> PerLoop[RecordT, ResultT]:
        try:
            ref = weakref.ref(instance, lambda ref: self._instance_gone(key, ref))
        except TypeError:
            raise TypeError(
                f"batched method {self._name()!r} keeps one batcher per instance, so it needs instances "
                f"that support weak references; add '__weakref__' to the __slots__ of {type(instance).__name__}"
            ) from None
        loops = PerLoop[RecordT, ResultT](_bind(self._fn, ref), self._settings)
        self._instances[key] = (ref, loops)
        return loops

    def _instance_gone(self, key: int, ref: weakref.ref[Any]) -> None:
        found = self._instances.get(key)
        if found is not None and found[0] is ref:
            del self._instances[key]
            found[1].close_soon()


class _BoundBatched(BatchedFunction[RecordT, ResultT]):
    """A batched method of one instance (what ``instance.method`` returns)."""

    def __init__(self, loops: PerLoop[RecordT, ResultT], instance: object, method: BatchedFunction[Any, Any]) -> None:
        # No super().__init__(): the loops belong to the instance and are shared by every access.
        self._fn = method._fn
        self._settings = method._settings
        self._streams = method._streams
        self._loops = loops
        self._instances = {}
        self._lock = method._lock
        self.__self__ = instance  # held, as a bound method holds it, while a call waits
        self.__func__ = method

    def __repr__(self) -> str:
        return f"<batched method {self._name()} of {self.__self__!r}>"


class BatchedMethod(Protocol[OwnerT_contra, RecordT, ResultT]):
    """What [batched][tokenbatcher.batched] makes of a method: on an instance, a ``BatchedFunction``."""

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> Self: ...

    @overload
    def __get__(self, instance: OwnerT_contra, owner: type[Any] | None = None) -> BatchedFunction[RecordT, ResultT]: ...


class _Decorator:
    """``batched(**settings)``: apply it to the batch function."""

    __slots__ = ("_settings",)

    def __init__(self, settings: BatcherSettings) -> None:
        self._settings = settings

    @overload
    def __call__(
        self, fn: Callable[[StreamBatch[RecordT]], AsyncIterator[Sequence[ResultT | End]]], /
    ) -> BatchedFunction[RecordT, Stream[ResultT]]: ...

    @overload
    def __call__(
        self, fn: Callable[[OwnerT_contra, StreamBatch[RecordT]], AsyncIterator[Sequence[ResultT | End]]], /
    ) -> BatchedMethod[OwnerT_contra, RecordT, Stream[ResultT]]: ...

    @overload
    def __call__(
        self, fn: Callable[[list[RecordT]], Awaitable[list[ResultT]]], /
    ) -> BatchedFunction[RecordT, ResultT]: ...

    @overload
    def __call__(self, fn: Callable[[list[RecordT]], list[ResultT]], /) -> BatchedFunction[RecordT, ResultT]: ...

    @overload
    def __call__(
        self, fn: Callable[[OwnerT_contra, list[RecordT]], Awaitable[list[ResultT]]], /
    ) -> BatchedMethod[OwnerT_contra, RecordT, ResultT]: ...

    @overload
    def __call__(
        self, fn: Callable[[OwnerT_contra, list[RecordT]], list[ResultT]], /
    ) -> BatchedMethod[OwnerT_contra, RecordT, ResultT]: ...

    def __call__(self, fn: Callable[..., Any], /) -> Any:
        return _make(fn, self._settings)


def _make(fn: Callable[..., Any], settings: BatcherSettings) -> BatchedFunction[Any, Any]:
    if not callable(fn):
        raise TypeError(f"batched() decorates a batch function, got {fn!r}")
    TokenBatcher(fn, **settings)  # every setting checked now, not at the first call
    return BatchedFunction[Any, Any](fn, settings)


@overload
def batched(
    fn: Callable[[StreamBatch[RecordT]], AsyncIterator[Sequence[ResultT | End]]], /
) -> BatchedFunction[RecordT, Stream[ResultT]]: ...


@overload
def batched(
    fn: Callable[[OwnerT_contra, StreamBatch[RecordT]], AsyncIterator[Sequence[ResultT | End]]], /
) -> BatchedMethod[OwnerT_contra, RecordT, Stream[ResultT]]: ...


@overload
def batched(fn: Callable[[list[RecordT]], Awaitable[list[ResultT]]], /) -> BatchedFunction[RecordT, ResultT]: ...


@overload
def batched(fn: Callable[[list[RecordT]], list[ResultT]], /) -> BatchedFunction[RecordT, ResultT]: ...


@overload
def batched(
    fn: Callable[[OwnerT_contra, list[RecordT]], Awaitable[list[ResultT]]], /
) -> BatchedMethod[OwnerT_contra, RecordT, ResultT]: ...


@overload
def batched(
    fn: Callable[[OwnerT_contra, list[RecordT]], list[ResultT]], /
) -> BatchedMethod[OwnerT_contra, RecordT, ResultT]: ...


@overload
def batched(**settings: Unpack[BatcherSettings]) -> _Decorator: ...


def batched(fn: Callable[..., Any] | None = None, /, **settings: Unpack[BatcherSettings]) -> Any:
    """Turn a batch function into an awaitable call per record, batched behind the scenes.

    ``async def f(records: list[R]) -> list[T]`` (or a plain ``def``, which
    runs in a worker thread) becomes ``await f(record) -> T``.  Records from
    concurrent callers are batched by a [TokenBatcher][tokenbatcher.TokenBatcher]
    built with ``settings``; there is one per running event loop, created and
    started by the first call in that loop.  ``f.batcher`` is the running
    loop's batcher (for its ``stats``); ``await f.aclose()`` stops it.

    An async generator function ([StreamFn][tokenbatcher.StreamFn]) streams:
    ``await f(record)`` returns the record's [Stream][tokenbatcher.Stream]
    (``async for entry in await f(record)``).

    On a method (``async def m(self, records)``), each instance gets its own
    batchers.  Use ``@batched`` bare for the default settings.

    Args:
        fn: The batch function, when used bare as ``@batched``.
        **settings: Any keyword argument of [TokenBatcher][tokenbatcher.TokenBatcher]:
            every setting of [DynamicBatcher][tokenbatcher.DynamicBatcher]
            and the token-named ones (``target_batch_tokens``,
            ``token_estimator``, ``default_token_estimate``).

    Returns:
        The batched function (``await f(record)``, ``f.batcher``,
        ``await f.aclose()``), or a decorator that makes one.

    Raises:
        TypeError: An unknown setting, or one of the wrong type.
        ValueError: A setting out of range (checked when decorating).

    Examples:
        >>> import asyncio
        >>> from tokenbatcher import batched
        >>> @batched(max_batch_size=8)
        ... async def lengths(texts: list[str]) -> list[int]:
        ...     return [len(t) for t in texts]
        >>> async def main() -> list[int]:
        ...     results = await asyncio.gather(*(lengths(t) for t in ["a", "bb", "ccc"]))
        ...     print(lengths.batcher.stats.total_batches, "batch")
        ...     return results
        >>> asyncio.run(main())
        1 batch
        [1, 2, 3]
    """
    return _Decorator(settings) if fn is None else _make(fn, settings)
