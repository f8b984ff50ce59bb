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

The decorator is put together from four modules, outermost first:

- ``_decorator.py`` (this one): ``batched`` itself, its overloads and
  ``BatcherSettings``, the typing of what it returns; the settings are
  checked once, when decorating;
- ``_batched_function.py``: ``BatchedFunction``, one call to its record's
  result, and the descriptor that makes a bound method of it;
- ``_perinstance.py``: on a method, the batchers of each instance, held weakly;
- ``_perloop.py``: one batcher per running event loop.

This module does not handle calls or keep batchers; it only makes a
``BatchedFunction``.  Only the public API of the batcher (``start``,
``submit``, ``submit_stream``, ``stop``, ``stats``) is used by any of them.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from typing import Any, Protocol, TypeVar, overload

from typing_extensions import Self, TypedDict, Unpack

from ._batched_function import BatchedFunction as BatchedFunction
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
