"""With ``latency_target_s``: a record in a running batch is answered by its deadline, result or not.

A record's deadline is ``latency_target_s`` after its submit (or its own
``timeout_s``, if shorter).  While it waits in the queue, the batcher's
deadline timer (``_deadlines.py``) fails it then; once its batch is in
``process_fn``, [Overrun][] does: one timer per batch, armed for the earliest
deadline among its records, fails every record whose deadline has come with
``TimeoutError`` and re-arms for the next.  The batch runs on; its other
records get their results when it returns, and a failed record's result is
dropped (``_invoking.py`` delivers only to futures still pending).  So every
accepted caller waits at most its deadline: a service can answer at once
(HTTP 503) rather than late.

Most batches end before their first deadline: the timer is armed and
cancelled, and ``_fire`` never runs.  A loop that stalled (a long callback,
a garbage collection) may process a batch's return before the timer that
came due meanwhile; so results are delivered only after ``fail_overdue``
(``_invoking.py``), and a record's fate does not depend on which of the two
the loop runs first.

Owns: the timer of one running batch.  Must not touch: the batch's run, or
how a failure is counted (the ``fail`` callback).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from typing import Any

from ._pending import Record
from ._plan import GUARD


def deadline(rec: Record[Any]) -> float:
    """Loop time of ``rec``'s deadline: its planning due time (``rec.due``) without the guard."""
    return rec.t + (rec.due - rec.t) / (1.0 - GUARD)


class Overrun:
    """The timer of one batch in ``process_fn`` (see the module docstring).

    Args:
        loop: The batcher's event loop.
        records: The batch's records (not empty).
        fail: Fails one record whose deadline came (with ``TimeoutError``, and counts it).
    """

    __slots__ = ("_armed", "_fail", "_handle", "_loop", "_records")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, records: Sequence[Record[Any]], fail: Callable[[Record[Any]], None]
    ) -> None:
        self._loop, self._records, self._fail = loop, records, fail
        self._armed = min(deadline(rec) for rec in records)
        self._handle: asyncio.TimerHandle | None = loop.call_at(self._armed, self._fire)

    def _fire(self) -> None:
        now = max(self._loop.time(), self._armed)  # the loop may run a timer a clock tick early
        self._armed = later = self._fail_due(now)
        self._handle = self._loop.call_at(later, self._fire) if later < math.inf else None

    def fail_overdue(self) -> None:
        """The batch returned: fail its records whose deadline has passed, before the others get results."""
        now = self._loop.time()
        if now >= self._armed:  # else none is due: ``_armed`` is never later than the earliest deadline left
            self._fail_due(now)

    def _fail_due(self, now: float) -> float:
        """Fail each pending record whose deadline is ``now`` or earlier; the next deadline (inf if none)."""
        later = math.inf
        for rec in self._records:
            if not rec.done():
                when = deadline(rec)
                if when <= now:
                    self._fail(rec)
                else:
                    later = min(later, when)
        return later

    def cancel(self) -> None:
        """The batch left ``process_fn`` (or was given up on): no more timeouts."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
