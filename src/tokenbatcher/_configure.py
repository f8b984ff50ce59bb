"""Settings while running: a read-back property for each, and ``configure`` to change them.

``configure(**settings)`` builds a changed copy of the batcher's ``Settings``
with [Settings.replace][tokenbatcher._settings.Settings.replace], validated as
the constructor validates, so a bad value changes nothing.  It then refuses a
change of the settings that shape a run's loops (``RESTART_ONLY``:
``dispatch``, ``max_concurrent_batches``) while the batcher runs, adopts the
rest at once (``Core._apply``: the queue re-measures its records in place,
``Pending.reconfigure``), and wakes the loops and producers so they look at
the state again.  What applies when is in ``configure``'s docstring: in short,
from the next batch on; a batch already taken keeps its records.

Owns: the public view of the settings.  Must not touch: how the queue re-measures.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Hashable
from typing import Any

from typing_extensions import Unpack

from ._core import Core, wake_all
from ._lifecycle import RUNNING, STOPPING
from ._settings import RESTART_ONLY, SettingsChanges
from ._stats import BatchInfo
from ._types import BatchCost, Dispatch, Grouping, OnBatchError, RecordT, ResultT, Tune


class Configuring(Core[RecordT, ResultT]):
    """Read-back properties and ``configure`` (mixed into DynamicBatcher)."""

    def configure(self, **settings: Unpack[SettingsChanges]) -> None:
        """Change settings, also while running: all or nothing, from the next batch on.

        Takes the keyword arguments of the constructor (not ``process_fn`` or
        ``executor``), validated the same way.  What applies when:

        - the batch limits (``target_batch_cost``, ``max_batch_size``,
          ``batch_cost``, ``grouping``) shape every batch formed afterwards;
          the queued records are re-measured in place and keep their order.
          A batch already formed keeps its records: sealed in the prefetch
          queue (``"window"``) or inside ``process_fn``.  A ``"window"`` batch
          still filling keeps its window's deadline, and closes as soon as the
          new limits make it full;
        - costs, deadlines, priorities' aging and keys (``cost_estimator``,
          ``default_cost``, ``request_timeout_s``, ``priority_aging_s``,
          ``batch_key``) apply to records submitted afterwards;
        - ``on_batch``, ``on_batch_error`` and ``stream_buffer`` apply to
          batches handed to ``process_fn`` afterwards; the others at once;
        - ``latency_target_s``: a changed target applies to batches taken
          and records submitted afterwards (the duration model is kept);
          switched on, a fresh model starts its warm-up (while tuning, the
          tuner's model is shared instead), and records already
          queued are due the target after their submit; switched off, every
          record is let in and no batch is capped from then on;
        - ``tune``, or a changed ceiling or target while tuning: the tuner
          starts afresh from the ceilings (the duration model is kept);
        - ``dispatch`` and ``max_concurrent_batches`` only while not running
          (before [start][tokenbatcher.DynamicBatcher.start] or after
          [stop][tokenbatcher.DynamicBatcher.stop]).

        Args:
            **settings: New values, by the constructor's names.

        Raises:
            TypeError: An unknown setting, or a value of the wrong type.
            ValueError: A value out of range (or ``min_batch_size`` above
                ``max_batch_size`` once both are applied), or
                ``on_batch_error="isolate"`` or ``latency_target_s`` for a
                streaming ``process_fn``.
            RuntimeError: ``dispatch`` or ``max_concurrent_batches`` would
                change while the batcher is running; or its event loop is
                running in another thread.

        Examples:
            >>> import asyncio
            >>> from tokenbatcher import DynamicBatcher
            >>> async def double(batch: list[int]) -> list[int]:
            ...     return [2 * x for x in batch]
            >>> async def main() -> int:
            ...     async with DynamicBatcher(double, max_batch_size=8) as batcher:
            ...         batcher.configure(max_batch_size=32, batch_timeout_s=0.01)
            ...         return batcher.max_batch_size
            >>> asyncio.run(main())
            32
        """
        self._configure(dict(settings), {})

    def _configure(self, changes: dict[str, Any], names: dict[str, str]) -> None:
        """``configure`` with base names; ``names`` are the public names errors use for this call."""
        running = self._state is RUNNING or self._state is STOPPING
        loop = self._loop
        if running and loop is not None and loop.is_running() and not on_loop_thread(loop):
            raise RuntimeError(
                f"configure() of a running {type(self).__name__} must be called on its event loop; from another "
                "thread, use loop.call_soon_threadsafe(functools.partial(batcher.configure, ...))"
            )
        old = self._settings
        new = old.replace(names, **changes)  # validates everything first: nothing changes if it raises
        self._check_combination(new)
        if running:
            for name in RESTART_ONLY:
                if getattr(new, name) != getattr(old, name):
                    raise RuntimeError(
                        f"{name} cannot change while {type(self).__name__} is running (it is "
                        f"{getattr(old, name)!r}): stop() it, configure({name}=...), then start() it again"
                    )
        self._apply(new)
        if not running:
            return
        # The loops and producers look at the state again, under the new settings.
        if self._arrival_waiters:
            self._wake_arrivals()
        self._strategy.release()
        if new.max_queue_size > old.max_queue_size:
            self._wake_room(new.max_queue_size - self._pending.size)
        elif new.max_queue_size < old.max_queue_size:
            wake_all(self._room_waiters)  # each checks again; one that can never fit raises

    # ------------------------------------------------------------------ read-back

    @property
    def cost_estimator(self) -> Callable[[RecordT], int] | None:
        """``f(record) -> int`` pricing each record, or None."""
        return self._settings.cost_estimator

    @property
    def target_batch_cost(self) -> int:
        """The cost budget of one batch."""
        return self._settings.target_batch_cost

    @property
    def max_batch_size(self) -> int:
        """The most records in one batch."""
        return self._settings.max_batch_size

    @property
    def min_batch_size(self) -> int:
        """With ``dispatch="eager"``, how many records a free slot waits for."""
        return self._settings.min_batch_size

    @property
    def batch_timeout_s(self) -> float:
        """Seconds a batch may keep filling (``"window"``) or a slot may wait (``"eager"``)."""
        return self._settings.batch_timeout_s

    @property
    def max_queue_size(self) -> int:
        """The most records waiting for a batch."""
        return self._settings.max_queue_size

    @property
    def prefetch_batches(self) -> int:
        """``"window"``: how many sealed batches may wait in front of the processing slots."""
        return self._settings.prefetch_batches

    @property
    def default_cost(self) -> int:
        """The cost of a record no estimator prices."""
        return self._settings.default_cost

    @property
    def dispatch(self) -> Dispatch:
        """``"window"`` or ``"eager"``."""
        return self._settings.dispatch

    @property
    def max_concurrent_batches(self) -> int:
        """How many batches may be inside ``process_fn`` at once."""
        return self._settings.max_concurrent_batches

    @property
    def request_timeout_s(self) -> float | None:
        """The default ``timeout_s`` of a submitted record, in seconds, or None."""
        return self._settings.request_timeout_s

    @property
    def batch_cost(self) -> BatchCost:
        """``"sum"`` or ``"padded"``: how a batch's cost is counted against the budget."""
        return self._settings.batch_cost

    @property
    def grouping(self) -> Grouping:
        """``"fifo"`` or ``"similar_cost"``."""
        return self._settings.grouping

    @property
    def priority_aging_s(self) -> float:
        """Seconds one priority step is worth."""
        return self._settings.priority_aging_s

    @property
    def latency_target_s(self) -> float | None:
        """Seconds from submit to result every accepted record should meet, or None (no target)."""
        return self._settings.latency_target_s

    @property
    def on_batch(self) -> Callable[[BatchInfo], object] | None:
        """The hook called with a [BatchInfo][tokenbatcher.BatchInfo] after each batch, or None."""
        return self._settings.on_batch

    @property
    def batch_key(self) -> Callable[[RecordT], Hashable] | None:
        """``f(record) -> key``: records with different keys never share a batch; or None."""
        return self._settings.batch_key

    @property
    def on_batch_error(self) -> OnBatchError:
        """``"fail"`` or ``"isolate"``: what a batch's futures get when ``process_fn`` raises."""
        return self._settings.on_batch_error

    @property
    def stream_buffer(self) -> int:
        """A streaming batcher's bound on the entries one stream holds unread."""
        return self._settings.stream_buffer

    @property
    def tune(self) -> Tune:
        """``"off"`` (fixed limits) or ``"throughput"`` (the limits are learned, under the ceilings)."""
        return self._settings.tune


def on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    """True in the thread that runs ``loop`` (asyncio's own record of it)."""
    return getattr(loop, "_thread_id", None) == threading.get_ident()
