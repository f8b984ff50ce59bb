"""Exceptions the batcher raises or sets on futures."""

from __future__ import annotations


class QueueFullError(Exception):
    """The queue was full, so nothing was accepted.

    Raised by [DynamicBatcher.submit_nowait][tokenbatcher.DynamicBatcher.submit_nowait].
    """


class BatcherStoppedError(RuntimeError):
    """The batcher stopped before this record could be processed.

    Set on every future still unresolved when ``stop(timeout=...)`` runs out of
    time, when the task calling ``stop()`` is cancelled, when an internal loop
    of the batcher fails, when ``process_fn`` or the ``on_batch`` hook raises
    ``SystemExit`` or ``KeyboardInterrupt``, or when the event loop shuts down
    under a running batcher.  Its message says which, and ``__cause__`` holds
    the exception, if one ended the batcher.
    """


class BatchAbortedError(RuntimeError):
    """``process_fn`` ended with a ``BaseException`` that is not an ``Exception``.

    ``asyncio.CancelledError``, ``GeneratorExit`` and the like are never set
    on a caller's future as they are (that would look as if the caller had been
    cancelled); the batch's futures get this error instead, with the original
    as ``__cause__``.  ``SystemExit`` and ``KeyboardInterrupt`` are not the
    batch's failure: they stop the batcher (see [BatcherStoppedError][]).
    """


class StreamOverflowError(RuntimeError):
    """A stream's reader fell ``stream_buffer`` entries behind its batch, so the stream was ended.

    A streaming ``process_fn`` never waits for the readers of its streams: each
    stream buffers what its reader has not read yet, up to ``stream_buffer``
    entries (a setting of [DynamicBatcher][tokenbatcher.DynamicBatcher]).  The
    stream whose buffer is full when its next entry comes ends with this error
    (after the entries it buffered), and that record is no longer wanted; the
    rest of the batch goes on.
    """
