"""One set of batchers per instance, for a [batched][tokenbatcher.batched] method.

A method decorated with ``@batched`` keeps, for each instance it is reached
through, the batch function bound to that instance and that binding's
``PerLoop`` (one batcher per event loop).  The instance is held weakly:
when it is garbage collected, its entry is dropped and its running batchers
are stopped on their loops.

This module owns that per-instance registry, the binding of the batch
function to a weakly held instance, and what keeps an instance alive while a
stream of one of its calls lives.  It does not make batchers or know about
event loops (``_perloop.py`` does), nor handle a call (``_batched_function.py``).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic

from ._calling import is_async, is_async_gen
from ._perloop import PerLoop
from ._streams import Stream
from ._types import RecordT, ResultT

if TYPE_CHECKING:
    from ._decorator import BatcherSettings


_stream_owners: weakref.WeakKeyDictionary[Stream[Any], object] = weakref.WeakKeyDictionary()
"""The instance of a batched streaming method, held while its stream lives.

A plain call holds its bound method, and so the instance, until its result
comes; ``await m.stream(x)`` returns as soon as the record is queued, so the
stream holds the instance instead (``await Model().m(x)`` works).
"""


def hold_owner(stream: Stream[Any], owner: object) -> None:
    """Keep ``owner``, the instance a streaming method was called on, alive while ``stream`` lives."""
    _stream_owners[stream] = owner


def qualname(fn: Callable[..., Any]) -> str:
    """How errors and reprs name the batch function ``fn``."""
    return str(getattr(fn, "__qualname__", fn))


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


class PerInstance(Generic[RecordT, ResultT]):
    """The batchers of one batched method, one ``PerLoop`` per instance.

    Args:
        fn: The method's function (its first argument is the instance).
        settings: What every batcher is built with.
        lock: Guards adding an instance; the method's, shared with its bound copies.
    """

    __slots__ = ("_by_id", "_fn", "_lock", "_settings")

    def __init__(self, fn: Callable[..., Any], settings: BatcherSettings, lock: threading.Lock) -> None:
        self._fn = fn
        self._settings = settings
        self._lock = lock
        self._by_id: dict[int, tuple[weakref.ref[Any], PerLoop[RecordT, ResultT]]] = {}

    def loops(self, instance: object) -> PerLoop[RecordT, ResultT]:
        """The batchers of ``instance``, made the first time it is met.

        Raises:
            TypeError: ``instance`` does not support weak references.
        """
        key = id(instance)
        found = self._by_id.get(key)
        if found is not None and found[0]() is instance:
            return found[1]
        with self._lock:  # two threads, each with its own loop, may meet an instance at once
            found = self._by_id.get(key)
            if found is not None and found[0]() is instance:
                return found[1]
            return self._add(key, instance)

    def _add(self, key: int, instance: object) -> PerLoop[RecordT, ResultT]:
        try:
            ref = weakref.ref(instance, lambda ref: self._instance_gone(key, ref))
        except TypeError:
            raise TypeError(
                f"batched method {qualname(self._fn)!r} keeps one batcher per instance, so it needs instances "
                f"that support weak references; add '__weakref__' to the __slots__ of {type(instance).__name__}"
            ) from None
        loops = PerLoop[RecordT, ResultT](_bind(self._fn, ref), self._settings)
        self._by_id[key] = (ref, loops)
        return loops

    def _instance_gone(self, key: int, ref: weakref.ref[Any]) -> None:
        found = self._by_id.get(key)
        if found is not None and found[0] is ref:
            del self._by_id[key]
            found[1].close_soon()
