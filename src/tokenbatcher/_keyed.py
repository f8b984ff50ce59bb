"""Keyed batches: records with different keys never share a batch.

A record's key is the ``key=`` given to ``submit`` (or its siblings), else
``batch_key(record)``; records of one key form their batches exactly as an
unkeyed batcher's records do (budget, size, grouping, priorities).  A batcher
becomes keyed at its first keyed record (from the start, with ``batch_key``):
its queue becomes a [KeyedPending][], which presents the interface of
[Pending][tokenbatcher._pending.Pending] and is made of one ``Pending`` per
live key.  An unkeyed batcher never pays for any of this.

Which key goes next: the key whose head record comes first in dispatch order
(``(key, seq)`` of ``_pending.py``: the oldest, once priorities are counted).
Every batch takes the head of its key, so a key with a record waiting is
served within as many batches as there are keys whose heads are older: no key
starves, however busy the others are.

Cost: a record whose key has records queued costs what it costs in its own
``Pending``; one that becomes its key's head (the key's first, or one that
overtakes it by priority) also pushes an entry on a heap of heads, O(log K)
for K live keys.  Taking a batch is one heap step plus the key's own take.
Nothing scans the keys: an empty key's ``Pending`` is dropped at once.

A latency target (``_latency.py``) caps a take (``take(max_size=, budget=)``:
the chosen key's batch), sizes it from that key's records
(``in_order(next_only=True)``), and plans admission over every key, key by key
in the order of their heads (``in_order()``, O(K log K + queue)).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Iterator
from operator import attrgetter
from typing import Any

from ._pending import Limit, Pending, Record
from ._types import ResultT

_SPARE = 64  # empty queues kept for reuse, so a stream of one-record keys does not build one per record
_SLACK = 1024  # stale heap entries tolerated before a rebuild, on top of one per live key


class KeyedRecord(Record[ResultT]):
    """A [Record][tokenbatcher._pending.Record] with a key: the batches it may join."""

    __slots__ = ("group",)
    group: Hashable
    """The record's key (``group``: ``Record.key`` is its place in the dispatch order)."""


_KEYED_KINDS: dict[type[Record[Any]], type[Record[Any]]] = {Record: KeyedRecord}


def keyed_kind(kind: type[Record[Any]]) -> type[Record[Any]]:
    """``kind`` with a ``group`` slot: what a keyed batcher queues (``KeyedRecord`` for a ``Record``)."""
    found = _KEYED_KINDS.get(kind)
    if found is None:
        found = _KEYED_KINDS[kind] = type(f"Keyed{kind.__name__}", (kind,), {"__slots__": ("group",)})
    return found


def group_of(rec: Record[Any]) -> Hashable:
    """A record's key; None for a record queued before its batcher became keyed."""
    return getattr(rec, "group", None)


def check_key(source: str, key: object) -> None:
    """A key must be hashable: raise ``TypeError`` naming ``source`` if it is not."""
    try:
        hash(key)
    except TypeError:
        raise TypeError(f"{source} must be hashable, got {key!r} ({type(key).__name__})") from None


class KeyedPending:
    """The queue of a keyed batcher: one ``Pending`` per live key, taken from by their heads' order."""

    def __init__(self, *, budget: int, max_size: int, padded: bool, similar: bool) -> None:
        self._limits = (budget, max_size, padded, similar)
        self._groups: dict[Hashable, Pending] = {}
        # Each live key's head record, as (key, seq, record), plus stale entries skipped lazily:
        # a record that is no longer queued, or no longer its key's head.
        self._heads: list[tuple[float, int, Record[Any]]] = []
        self._spare: list[Pending] = []
        self.size = 0
        """How many live records are queued, over every key."""
        self.peak = 0
        """The largest ``size`` so far, as of the last removal."""

    @classmethod
    def adopt(cls, queue: Pending, *, budget: int, max_size: int, padded: bool, similar: bool) -> KeyedPending:
        """A keyed queue holding every record of ``queue`` (under the key None), which is emptied."""
        keyed = cls(budget=budget, max_size=max_size, padded=padded, similar=similar)
        keyed.peak = queue.peak
        records = queue.clear()
        records.sort(key=attrgetter("seq"))  # pushed again as they came
        for rec in records:
            keyed.push(rec)
        return keyed

    def __len__(self) -> int:
        return self.size

    @property
    def full(self) -> bool:
        """True when the next batch (the head key's) would be full (budget or size)."""
        top = self._top()
        return top is not None and self._groups[group_of(top)].full

    def keys(self) -> int:
        """How many keys have records queued."""
        return len(self._groups)

    # ------------------------------------------------------------------ adding and forgetting

    def push(self, rec: Record[Any]) -> None:
        """Queue a record in its key's queue (its ``key``, ``seq``, ``cost`` and key set)."""
        group = group_of(rec)
        queue = self._groups.get(group)
        if queue is None:
            queue = self._groups[group] = self._spare.pop() if self._spare else self._new_queue()
        queue.push(rec)
        self.size += 1
        if queue.size == 1 or queue.head() is rec:
            self._push_head(rec)

    def _new_queue(self) -> Pending:
        budget, max_size, padded, similar = self._limits
        return Pending(budget=budget, max_size=max_size, padded=padded, similar=similar)

    def forget(self, rec: Record[Any]) -> None:
        """Stop counting a queued record whose future is done (cancelled, expired)."""
        if not rec.queued:
            return
        group = group_of(rec)
        queue = self._groups[group]
        was_head = queue.head() is rec
        queue.forget(rec)
        self.size -= 1
        if not queue.size:
            self._drop(group, queue)
        elif was_head:
            self._push_head(queue.head())

    def _push_head(self, rec: Record[Any] | None) -> None:
        assert rec is not None
        heads = self._heads
        heapq.heappush(heads, (rec.key, rec.seq, rec))
        if len(heads) > 2 * len(self._groups) + _SLACK:
            self._heads = [(h.key, h.seq, h) for h in (q.head() for q in self._groups.values()) if h is not None]
            heapq.heapify(self._heads)

    def _drop(self, group: Hashable, queue: Pending) -> None:
        """Forget an emptied key; keep its queue for reuse."""
        del self._groups[group]
        if len(self._spare) < _SPARE:
            self._spare.append(queue)

    # ------------------------------------------------------------------ reading

    def _top(self) -> Record[Any] | None:
        """The head record of the key that goes next, after discarding stale entries."""
        heads = self._heads
        groups = self._groups
        while heads:
            rec = heads[0][2]
            if rec.queued and groups[group_of(rec)].head() is rec:
                return rec
            heapq.heappop(heads)
        return None

    def oldest_time(self) -> float:
        """Submit time of the record at the head of the next key (the queue must not be empty)."""
        top = self._top()
        assert top is not None
        return top.t

    # ------------------------------------------------------------------ taking

    def in_order(self, *, next_only: bool = False) -> Iterator[Record[Any]]:
        """The live queued records, key by key in the order of their heads, each key's in dispatch order.

        With ``next_only``, only the next key's: the records the next batch
        is taken from.  The queue must not change while the iterator is in use.
        """
        top = self._top()
        if top is None:
            return iter(())
        if next_only:
            return self._groups[group_of(top)].in_order()
        heads = [(head.key, head.seq, queue) for queue in self._groups.values() if (head := queue.head()) is not None]
        heads.sort(key=lambda entry: entry[:2])
        return itertools.chain.from_iterable(queue.in_order() for _, _, queue in heads)

    def take(self, max_size: int | None = None, budget: int | None = None) -> tuple[list[Record[Any]], Limit | None]:
        """Remove and return the next batch, all of one key, and what closed it (as ``Pending.take``).

        ``max_size`` and ``budget`` tighten the limits of this batch only, as in ``Pending.take``.
        """
        self.peak = max(self.peak, self.size)
        top = self._top()
        if top is None:
            return [], None
        group = group_of(top)
        queue = self._groups[group]
        batch, limit = queue.take(max_size, budget)
        self.size -= len(batch)
        if not queue.size:
            self._drop(group, queue)
        else:
            self._push_head(queue.head())
        return batch, limit

    def clear(self) -> list[Record[Any]]:
        """Remove and return every queued record."""
        self.peak = max(self.peak, self.size)
        everything = [rec for queue in self._groups.values() for rec in queue.clear()]
        self._groups.clear()
        self._heads.clear()
        self.size = 0
        return everything

    def reconfigure(self, *, budget: int, max_size: int, padded: bool, similar: bool) -> None:
        """Adopt new batch limits in place, in every key's queue (every record stays)."""
        self._limits = (budget, max_size, padded, similar)
        self._spare.clear()
        for queue in self._groups.values():
            queue.reconfigure(budget=budget, max_size=max_size, padded=padded, similar=similar)
