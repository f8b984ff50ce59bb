"""Exceptions the batcher raises or sets on futures."""

from __future__ import annotations


class QueueFullError(Exception):
    """The queue was full, so nothing was accepted.

    Raised by [DynamicBatcher.submit_nowait][tokenbatcher.DynamicBatcher.submit_nowait].
    """


class BatcherStoppedError(RuntimeError):
    """The batcher stopped before this record could be processed.

    Set on every future still unresolved when ``stop(timeout=...)`` runs out of
    time, when the task calling ``stop()`` is cancelled, or when an internal loop
    of the batcher fails.
    """


class BatchAbortedError(RuntimeError):
    """``process_fn`` ended with a ``BaseException`` that is not an ``Exception``.

    ``asyncio.CancelledError``, ``KeyboardInterrupt`` and the like are never set
    on a caller's future as they are (that would look as if the caller had been
    cancelled); the batch's futures get this error instead, with the original
    as ``__cause__``.
    """
