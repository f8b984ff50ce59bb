"""A queued record: the future its caller awaits, and what the queue knows of it.

One object per accepted record (``Record``), made by ``_intake.py`` and
queued by ``_pending.py``; also what a batch is counted as (``batch_cost``)
and what closed one (``Limit``).

Owns: the record's fields and its cancel hook.  Must not touch: where it is
queued.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Literal, TypeAlias

from ._types import ResultT


class Record(asyncio.Future[ResultT]):
    """One accepted record: the future of its result, and what the queue needs to know.

    A subclass of ``asyncio.Future`` rather than a pair of objects: one
    allocation per record, and a cancel by the caller reaches the batcher at
    once (see ``cancel``) without a done-callback on every future.
    """

    __slots__ = ("bucket", "cost", "due", "hook", "item", "key", "queued", "seq", "t", "waiting")
    item: Any
    cost: int
    t: float
    """Loop time at submit."""
    key: float
    """Dispatch order: ``t`` plus the priority's aging offset."""
    seq: int
    """Tie-breaker: records accepted before this one."""
    queued: bool
    """True while the record waits in the queue (not in a batch, not forgotten)."""
    waiting: bool
    """True from submit until the record's batch is handed to ``process_fn``: its deadline applies."""
    due: float
    """With ``latency_target_s``: loop time by which its result is due (unset otherwise)."""
    bucket: int
    hook: Callable[[Record[Any]], object]
    """Called once when the caller cancels this future."""

    def cancel(self, msg: Any = None) -> bool:
        """Cancel the future, as ``asyncio.Future.cancel``, and tell the batcher."""
        if not super().cancel(msg):
            return False
        self.hook(self)
        return True

    def __lt__(self, other: Record[Any]) -> bool:
        return self.key < other.key or (self.key == other.key and self.seq < other.seq)


Limit: TypeAlias = Literal["budget", "max_size"]
"""What closed a batch that is full."""


def batch_cost(size: int, total: int, largest: int, padded: bool) -> int:
    """The cost of a batch counted against the budget."""
    return size * largest if padded else total
