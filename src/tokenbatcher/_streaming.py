"""Streaming batches: ``submit_stream``, and how a batch's steps reach its streams.

A batcher whose ``process_fn`` is an async generator function streams
(decided once, when it is built: ``_calling.is_async_gen``).  Its records
come in through ``submit_stream`` only, each as a ``Channel`` (``_streams.py``),
and wait in the queue, expire and leave it like any record.  A processing
slot runs the batch as always (``_processing.py``), in a task of its own,
but what it awaits is ``_pump``: it iterates the generator and hands each
step's entries to their channels at once, never waiting for a reader.

| the generator ...                          | the batch's streams                              |
|--------------------------------------------|--------------------------------------------------|
| yields a step                              | each open stream gets its entry, in order        |
| yields ``END`` as a record's entry         | that stream ends (counted completed)             |
| yields for a stream whose buffer is full   | that stream fails with ``StreamOverflowError``   |
| yields a step of the wrong length or type  | every open stream fails: ``ValueError`` /        |
|                                            | ``TypeError`` (the generator is closed)          |
| returns                                    | every open stream ends (counted completed)       |
| raises                                     | every open stream fails as a future would        |
|                                            | (see ``_processing.py``), after its entries      |

Once no stream of the batch is open (each ended, or its reader left), the
generator is closed at its next ``yield``, so a batch nobody reads stops
costing anything.  ``stop()`` drains a streaming batch like any other (the
generator runs to its end); when it gives up, open streams fail with
``BatcherStoppedError``.

Owns: the batcher's side of streams.  Must not touch: how batches are formed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Hashable
from typing import TYPE_CHECKING, Any, cast

from ._core import Core
from ._errors import StreamOverflowError
from ._lifecycle import RUNNING
from ._pending import Record
from ._streams import END, Channel, Stream, StreamBatch, StreamFn
from ._types import RecordT, ResultT


class Streaming(Core[RecordT, ResultT]):
    """Streaming records in and entries out (mixed into DynamicBatcher)."""

    if TYPE_CHECKING:  # provided by Intake

        def _cost(self, record: RecordT, explicit: object) -> int: ...

        def _check_request(self, timeout_s: float | None, priority: int) -> float | None: ...

        async def _wait_for_room(self, n: int = 1) -> None: ...

        def _enqueue(
            self,
            item: RecordT,
            cost: int,
            timeout_s: float | None,
            priority: int,
            kind: type[Record[Any]] = ...,
            group: Hashable = ...,
        ) -> Record[Any]: ...

    async def submit_stream(
        self,
        record: RecordT,
        *,
        estimated_cost: int | None = None,
        timeout_s: float | None = None,
        priority: int = 0,
        key: Hashable | None = None,
    ) -> Stream[ResultT]:
        """Queue one record of a streaming batcher; return the stream of its entries.

        For a batcher whose ``process_fn`` is an async generator function
        ([StreamFn][tokenbatcher.StreamFn]): ``async for entry in await
        batcher.submit_stream(record)``.  The record is priced, queued, timed
        out and refused exactly as by [submit][tokenbatcher.DynamicBatcher.submit];
        its stream then yields the record's entry of every step of its batch
        as soon as the step is produced, and ends at [END][tokenbatcher.END]
        or when ``process_fn`` returns (see [Stream][tokenbatcher.Stream] for
        errors and for leaving early).  A stream that ends normally counts as
        completed; one whose reader leaves first, as cancelled.

        Args:
            record: The record to process.
            estimated_cost: Its cost, as for ``submit``.
            timeout_s: A deadline while it is queued, as for ``submit``.
            priority: As for ``submit``.
            key: As for ``submit``: records with different keys never share a batch.

        Returns:
            The record's [Stream][tokenbatcher.Stream].

        Raises:
            TypeError: This batcher's ``process_fn`` is not an async generator
                function (use ``submit``); or a cost, ``timeout_s`` or
                ``priority`` of the wrong type.
            RuntimeError: The batcher is not running, as for ``submit``.
            ValueError: A negative cost or a non-positive ``timeout_s``.
        """
        if not self._streaming:
            raise TypeError(
                f"submit_stream() needs a process_fn that is an async generator function (yielding one entry per "
                f"record per step), but this {type(self).__name__}'s process_fn returns its results: use submit()"
            )
        if self._state is not RUNNING or asyncio.get_running_loop() is not self._loop:
            self._refuse()
        cost = self._cost(record, estimated_cost)
        deadline = self._check_request(timeout_s, priority)
        if key is not None or self._batch_key is not None:
            key = self._group(record, key)
        if self._pending.size >= self._max_queue_size:
            await self._wait_for_room()
        channel = self._enqueue(record, cost, deadline, priority, Channel, group=key)
        return Stream(cast("Channel[ResultT]", channel))

    def _stream_call(self, live: list[Record[Any]]) -> Coroutine[Any, Any, list[None]]:
        """Call the generator function on the batch; return what the slot awaits: ``_pump``.

        Raises:
            TypeError: ``process_fn`` returned something other than an async iterator.
        """
        channels = cast("list[Channel[Any]]", live)
        batch = StreamBatch([ch.item for ch in channels], channels)
        steps = cast("StreamFn[Any, Any]", self._process_fn)(batch)
        if not isinstance(steps, AsyncIterator):  # pyright: ignore[reportUnnecessaryIsInstance]  (checked at run time)
            raise TypeError(f"a streaming process_fn must return an async iterator, got {type(steps).__name__}")
        return self._pump(channels, steps)

    async def _pump(self, channels: list[Channel[Any]], steps: AsyncIterator[Any]) -> list[None]:
        """Hand each step's entries to their streams until the generator ends (see the module docstring).

        Returns one ``None`` per record, the shape the slot checks; every
        stream has ended by then, so the slot resolves nothing more.
        """
        n = len(channels)
        bound = self._settings.stream_buffer
        counts = self._rec
        try:
            async for step in steps:
                if not isinstance(step, (list, tuple)):
                    raise TypeError(
                        f"a streaming process_fn must yield a list of {n} entries per step (one per record), "
                        f"got {type(step).__name__}"
                    )
                if len(step) != n:  # pyright: ignore[reportUnknownArgumentType]
                    raise ValueError(
                        f"process_fn yielded a step of {len(step)} entries for a batch of {n} records"  # pyright: ignore[reportUnknownArgumentType]
                    )
                still_open = False
                for ch, entry in zip(channels, step, strict=True):  # pyright: ignore[reportUnknownVariableType,reportUnknownArgumentType]
                    if ch.done():  # ended, failed, or its reader left: the entry is dropped
                        continue
                    if entry is END:
                        ch.set_result(None)
                        counts.completed += 1
                    elif len(ch.entries) < bound:
                        ch.put(entry)
                        still_open = True
                    else:
                        ch.set_exception(overflow(bound))
                        counts.failed += 1
                if not still_open:
                    break  # nobody reads any more: stop spending on this batch
        finally:
            close = getattr(steps, "aclose", None)
            if close is not None:
                await close()
        for ch in channels:
            if not ch.done():
                ch.set_result(None)
                counts.completed += 1
        return [None] * n


def overflow(bound: int) -> StreamOverflowError:
    return StreamOverflowError(
        f"the reader of this stream fell {bound} entries behind its batch (stream_buffer={bound}), so the "
        "stream was ended rather than slow the batch down; read faster, or raise stream_buffer"
    )
