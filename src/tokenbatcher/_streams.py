"""Streams: what a streaming ``process_fn`` is given and yields, and what a reader iterates.

A streaming batcher's ``process_fn`` is an async generator function
([StreamFn][tokenbatcher.StreamFn]).  It gets a [StreamBatch][tokenbatcher.StreamBatch]
(a list of the records, which also says which are still wanted) and yields,
per step, one entry per record; [END][tokenbatcher.END] as a record's entry
ends that record's stream.  Each accepted record is a [Channel][]: its place
in the queue (a ``Record``) and the buffer of entries its reader has not read
yet.  The reader holds a [Stream][tokenbatcher.Stream] of it.

A channel's future says how its stream ended, and the ``Stream`` reads it
once the buffer is empty: a result (``None``) when the stream ended
normally, an exception when it failed, cancelled when its reader left
(``aclose()``, a ``break``, a cancelled read).  Any of the three wakes a
waiting reader at once, and from then on the channel takes no more entries.

Owns: the reader's side and the public types.  The batcher's side (taking
steps from ``process_fn`` into channels) is in ``_streaming.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Final, Generic, TypeAlias, TypeVar

from ._pending import Record
from ._types import RecordT, ResultT

EntryT = TypeVar("EntryT")


class End(enum.Enum):
    """The type of [END][tokenbatcher.END], for annotations: ``AsyncIterator[list[str | End]]``."""

    END = "END"

    def __repr__(self) -> str:
        return "tokenbatcher.END"

    __str__ = __repr__


END: Final = End.END
"""An entry that ends its record's stream: yield it when that record's sequence is finished.

A streaming ``process_fn`` yields one entry per record at every step, also
for records whose streams have ended; entries for those are ignored.  Test
with ``entry is END``.
"""


class StreamBatch(list[RecordT]):
    """The batch a streaming ``process_fn`` gets: a list of its records, which knows which are still wanted.

    Annotate the batch as ``StreamBatch[R]`` to call [wanted][tokenbatcher.StreamBatch.wanted]
    (``list[R]`` works too, without it).  Keep the order of the records: the
    ``i``-th entry of every step belongs to the ``i``-th record.
    """

    __slots__ = ("_ends",)

    def __init__(self, records: Iterable[RecordT], ends: Sequence[asyncio.Future[Any]]) -> None:
        super().__init__(records)
        self._ends = ends

    def wanted(self, index: int) -> bool:
        """True while an entry for the record at ``index`` would still reach its reader.

        False once its stream has ended: by [END][tokenbatcher.END], by an
        error, or because its reader stopped reading (``aclose()``, a
        ``break``, a cancelled task, or a reader so far behind that its
        buffer overflowed).  A ``process_fn`` that sees it False can drop
        that sequence; it still yields an entry for it at each step (any
        value: it is ignored).  Once no record of the batch is wanted, the
        generator is closed at its next ``yield``.

        Raises:
            IndexError: ``index`` is out of range, as for the list.
        """
        return not self._ends[index].done()


StreamFn: TypeAlias = Callable[[StreamBatch[RecordT]], AsyncIterator[Sequence["ResultT | End"]]]
"""``async def f(batch: StreamBatch[RecordT]) -> AsyncIterator[list[ResultT | End]]``: one entry per record per step."""


class Channel(Record[None], Generic[EntryT]):
    """A streamed record: its place in the queue, and the entries its reader has not read yet.

    Its future is the stream's end (see the module docstring); setting it in
    any way wakes a reader waiting in ``Stream.__anext__``.
    """

    __slots__ = ("entries", "reader")
    entries: deque[EntryT]
    reader: asyncio.Future[None] | None
    """The reader's waiter, while it waits for an entry."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self.entries = deque()
        self.reader = None

    def put(self, entry: EntryT) -> None:
        """Buffer one entry for the reader (the stream is open)."""
        self.entries.append(entry)
        if self.reader is not None:
            self._wake()

    def _wake(self) -> None:
        reader = self.reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    def set_result(self, result: None) -> None:
        """End the stream normally: its reader reads what is buffered, then stops."""
        super().set_result(result)
        self._wake()

    def set_exception(self, exception: type | BaseException) -> None:
        """End the stream with an error: its reader reads what is buffered, then gets ``exception``."""
        super().set_exception(exception)
        super().exception()  # the reader raises it in its own time, or left: never "not retrieved"
        self._wake()

    def cancel(self, msg: Any = None) -> bool:
        """The reader left: drop the buffer and tell the batcher (``Record.cancel``)."""
        if not super().cancel(msg):
            return False
        self.entries.clear()
        self._wake()
        return True


class Stream(AsyncIterator[ResultT]):
    """One record's entries, in order, as the batch produces them: ``async for entry in stream``.

    Returned by [DynamicBatcher.submit_stream][tokenbatcher.DynamicBatcher.submit_stream].
    The iteration ends when the record's stream ends: at [END][tokenbatcher.END],
    or when ``process_fn`` returns.  If ``process_fn`` raises, or the
    record's deadline passes while it is queued, or the batcher stops
    without finishing it, the entries produced before come first, then the
    error (as for a future: ``TimeoutError``, [BatcherStoppedError][tokenbatcher.BatcherStoppedError],
    [StreamOverflowError][tokenbatcher.StreamOverflowError], ...).

    Stop reading early with [aclose][tokenbatcher.Stream.aclose] (or
    ``contextlib.aclosing``): the record is freed at once (it leaves the
    queue, or ``process_fn`` sees it unwanted) and counts as cancelled.  A
    cancelled read does the same; so does dropping the stream (a ``break``
    out of ``async for entry in await batcher.submit_stream(...)``), once it
    is garbage collected.
    One task reads a stream at a time.
    """

    __slots__ = ("__weakref__", "_channel", "_finished")

    def __init__(self, channel: Channel[ResultT]) -> None:
        self._channel = channel
        self._finished = False

    def __repr__(self) -> str:
        ch = self._channel
        if not ch.done():
            state = "open"
        elif ch.cancelled():
            state = "closed"
        else:
            state = "failed" if ch.exception() is not None else "ended"
        return f"<Stream {state} buffered={len(ch.entries)}>"

    async def __anext__(self) -> ResultT:
        """The next entry, as soon as it is produced.

        Raises:
            StopAsyncIteration: The stream ended, or was closed.
            RuntimeError: Another task is reading this stream now.
            Exception: What ended the stream, after its buffered entries (once).
        """
        ch = self._channel
        entries = ch.entries
        while not entries:
            if self._finished:
                raise StopAsyncIteration
            if ch.done():
                self._finished = True
                error = None if ch.cancelled() else ch.exception()
                if error is None:
                    raise StopAsyncIteration
                raise error
            if ch.reader is not None:
                raise RuntimeError("this Stream is already being read by another task; read a stream from one task")
            ch.reader = reader = ch.get_loop().create_future()
            try:
                await reader
            except asyncio.CancelledError:
                self._close()
                raise
            finally:
                ch.reader = None
        return entries.popleft()

    async def aclose(self) -> None:
        """Stop reading: the rest of the stream is dropped, and the record freed (see the class docstring).

        Safe to call twice, and after the stream ended.
        """
        self._close()

    def _close(self) -> None:
        self._finished = True
        ch = self._channel
        ch.cancel()  # a no-op if the stream has ended
        ch.entries.clear()

    def __del__(self) -> None:
        ch = self._channel
        if not ch.done():  # dropped unfinished (a break): free the record, on its loop, outside this collection
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing is left to free
                ch.get_loop().call_soon_threadsafe(ch.cancel)


def use_submit_stream(method: str, batcher: object) -> TypeError:
    """The error of ``submit`` and its siblings on a streaming batcher."""
    return TypeError(
        f"{method}() takes records whose process_fn returns one result each, but this {type(batcher).__name__}'s "
        "process_fn is an async generator function (it streams): use submit_stream()"
    )
