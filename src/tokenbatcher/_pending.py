"""How a batch is formed: the records waiting for a batch, and how one is taken.

Every accepted record is a [Record][], the future its caller awaits.  Queued
records wait in dispatch order, ``(key, seq)`` where ``key = submit time +
priority * priority_aging_s``: a deque while every record has priority 0, a
heap from the first record that has another priority until the queue empties.

A batch is taken from the head:

* ``grouping="fifo"``: records in dispatch order while the next one fits.
* ``grouping="similar_cost"``: the head record, always, then records from the
  cost buckets nearest to its own, outward.  Buckets split costs on a log scale
  (``BUCKETS_PER_OCTAVE`` to each doubling: records in one bucket differ by
  at most ~2%), and each bucket keeps its records
  in dispatch order, so a batch costs O(batch + buckets) to form, whatever the
  depth of the queue.  Because every batch takes the head, a record with ``r``
  live records ahead of it is dispatched within ``r + 1`` batches, as in FIFO.

"Fits" is the hard budget: the batch's cost (``sum`` of costs, or ``padded``:
size times the largest cost) stays within ``budget`` and its size within
``max_size``; only a record that alone exceeds the budget is taken alone.

A record whose future is cancelled or expires while queued is *forgotten* at
once: it stops counting in ``size`` (so it frees its place in the queue), and
its entry is skipped and discarded when it reaches the front of a structure.
When stale entries outnumber the live ones, the structures are rebuilt, so
memory stays proportional to the live records.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import math
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeAlias

from ._types import ResultT

BUCKETS_PER_OCTAVE = 32
"""``grouping="similar_cost"``: cost buckets per doubling of cost (each ~2% wide)."""

_SLACK = 1024  # stale entries tolerated before a rebuild, on top of one per live record


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


def _bucket(cost: int) -> int:
    return int(math.log2(cost + 1) * BUCKETS_PER_OCTAVE)


class _Lane:
    """Records in dispatch order, with lazy removal: a deque, or a heap once priorities appear."""

    __slots__ = ("heap", "items")

    def __init__(self, heap: bool) -> None:
        self.heap = heap
        self.items: deque[Record[Any]] | list[Record[Any]] = [] if heap else deque()

    def push(self, rec: Record[Any]) -> None:
        if self.heap:
            heapq.heappush(self.items, rec)  # type: ignore[arg-type]
        else:
            self.items.append(rec)

    def to_heap(self) -> None:
        self.items = list(self.items)  # sorted by (key, seq), hence a heap
        self.heap = True

    def front(self) -> Record[Any] | None:
        """The first live record, after discarding stale entries in front of it."""
        items = self.items
        while items:
            rec = items[0]
            if rec.queued:
                return rec
            self.pop()
        return None

    def pop(self) -> Record[Any]:
        items = self.items
        return heapq.heappop(items) if self.heap else items.popleft()  # type: ignore[union-attr,arg-type]

    def __len__(self) -> int:
        return len(self.items)


class Pending:
    """The queue of records not yet in a batch."""

    def __init__(self, *, budget: int, max_size: int, padded: bool, similar: bool) -> None:
        self._budget = budget
        self._max_size = max_size
        self._padded = padded
        self._similar = similar
        self._order = _Lane(heap=False)
        self._buckets: dict[int, _Lane] = {}
        self._nonempty: list[int] = []  # sorted indices of buckets that hold entries
        self._in_buckets = 0  # entries in all buckets, stale ones included
        # What the queued records would make as one batch, in queue order: lets
        # ``submit`` tell in O(1) whether a full batch is waiting.
        self._fill_n = 0  # live records in the measured prefix
        self._fill_phys = 0  # entries in the measured prefix, stale ones included
        self._fill_total = 0
        self._fill_max = 0
        self._fill_stale = False  # a record was forgotten since the prefix was measured
        self.full = False
        """True when the queued records would fill a batch (budget or size)."""
        self.size = 0
        """How many live records are queued (``len()`` without a call, for the hot path)."""
        self.peak = 0
        """The largest ``size`` so far, as of the last removal (the queue only shrinks there)."""
        self._total = 0  # the sum of the queued records' costs

    def __len__(self) -> int:
        return self.size

    # ------------------------------------------------------------------ adding and forgetting

    def push(self, rec: Record[Any]) -> None:
        """Queue a record (its ``key``, ``seq`` and ``cost`` already set)."""
        self.size += 1
        self._total += rec.cost
        rec.queued = True
        order = self._order
        if not order.heap and rec.key != rec.t:
            order.to_heap()
            for bucket in self._buckets.values():
                bucket.to_heap()
        order.push(rec)
        if self._similar:
            index = rec.bucket = _bucket(rec.cost)
            lane = self._buckets.get(index)
            if lane is None:
                lane = self._buckets[index] = _Lane(order.heap)
            if not len(lane):
                bisect.insort(self._nonempty, index)
            lane.push(rec)
            self._in_buckets += 1
        if not self.full:
            self._fill_phys += 1
            self._grow(rec.cost)

    def forget(self, rec: Record[Any]) -> None:
        """Stop counting a queued record whose future is done (cancelled, expired)."""
        if not rec.queued:
            return
        rec.queued = False
        self.size -= 1
        self._total -= rec.cost
        self._fill_stale = True
        if not self.size:
            self._reset()
        elif len(self._order) + self._in_buckets > 4 * self.size + _SLACK:
            self._rebuild()

    def _grow(self, cost: int) -> None:
        n = self._fill_n + 1
        largest = cost if cost > self._fill_max else self._fill_max
        total = self._fill_total + cost
        counted = n * largest if self._padded else total  # batch_cost(), inline: once per record
        if counted > self._budget and self._fill_n:
            self.full = True  # this record would cross the budget: the batch is full
            self._fill_phys -= 1  # and is not part of it
            return
        self._fill_n, self._fill_total, self._fill_max = n, total, largest
        if n >= self._max_size or counted >= self._budget:
            self.full = True

    def _refill(self) -> None:
        """Measure the next batch from scratch, after records were removed."""
        self._fill_stale = False
        order = self._order.items
        if not self._padded and self.size < self._max_size and self._total < self._budget:
            # Sum budget, and everything queued fits: no need to look at each record.
            self._fill_n, self._fill_phys, self._fill_total, self._fill_max = self.size, len(order), self._total, 0
            self.full = False
            return
        self._fill_n = self._fill_phys = self._fill_total = self._fill_max = 0
        self.full = False
        for rec in order:  # in a heap, array order: an estimate, and cheap
            self._fill_phys += 1
            if rec.queued:
                self._grow(rec.cost)
                if self.full:
                    break

    def _reset(self) -> None:
        self._order = _Lane(heap=False)
        self._buckets.clear()
        self._nonempty.clear()
        self._in_buckets = 0
        self._total = 0
        self._refill()

    def _rebuild(self) -> None:
        """Drop every stale entry (amortized: it runs once per ``size`` forgotten records)."""
        live = [rec for rec in self._order.items if rec.queued]
        live.sort()
        heap = self._order.heap
        self._order = _Lane(heap)
        self._order.items = live if heap else deque(live)
        self._buckets.clear()
        self._nonempty.clear()
        self._in_buckets = 0
        if self._similar:
            for rec in live:  # in dispatch order, so each bucket stays sorted
                lane = self._buckets.get(rec.bucket)
                if lane is None:
                    lane = self._buckets[rec.bucket] = _Lane(heap)
                    self._nonempty.append(rec.bucket)
                lane.items.append(rec)
            self._nonempty.sort()
            self._in_buckets = len(live)
        self._refill()

    # ------------------------------------------------------------------ reading

    def in_order(self) -> Iterator[Record[Any]]:
        """The live queued records in dispatch order (lazily; a heap is sorted first).

        The queue must not change while the iterator is in use.
        """
        items = self._order.items
        return (rec for rec in (sorted(items) if self._order.heap else items) if rec.queued)

    def oldest_time(self) -> float:
        """Submit time of the live record at the head (the queue must not be empty)."""
        head = self._order.front()
        assert head is not None
        return head.t

    # ------------------------------------------------------------------ taking

    def take(self, max_size: int | None = None, budget: int | None = None) -> tuple[list[Record[Any]], Limit | None]:
        """Remove and return ``(batch, limit)``: the next batch, and what closed it.

        ``max_size`` and ``budget``, when given, tighten the queue's own
        limits for this batch only (a latency target's cap).  ``limit`` is
        ``"budget"`` or ``"max_size"`` when that closed the batch, else None.
        Every record of ``batch`` is live and no longer queued.
        """
        self.peak = max(self.peak, self.size)
        if not self.size:
            return [], None
        size_cap = self._max_size if max_size is None else max(1, min(max_size, self._max_size))
        cost_cap = self._budget if budget is None else max(0, min(budget, self._budget))
        own = size_cap == self._max_size and cost_cap == self._budget
        if own and not self._order.heap and not self._similar:
            if self._fill_stale:
                self._refill()
            batch, limit = self._take_prefix()
        else:
            head = self._order.front()
            assert head is not None
            self._order.pop()
            if self._similar:
                self._pop_from_bucket(head)
                batch, limit = self._take_similar(head, cost_cap, size_cap)
            else:
                batch, limit = self._take_fifo(head, cost_cap, size_cap)
        self.size -= len(batch)
        self._total -= sum(rec.cost for rec in batch)
        if not self.size:
            self._reset()
        else:
            self._refill()
        return batch, limit

    def _take_prefix(self) -> tuple[list[Record[Any]], Limit | None]:
        """FIFO without priorities: the batch is the prefix that ``push`` already measured."""
        fifo: deque[Record[Any]] = self._order.items  # type: ignore[assignment]
        n = self._fill_phys
        if n >= len(fifo):
            prefix = list(fifo)
            fifo.clear()
        else:
            prefix = [fifo.popleft() for _ in range(n)]
        batch = [rec for rec in prefix if rec.queued]
        for rec in batch:
            rec.queued = False
        limit: Limit | None = None
        if self.full:
            limit = "max_size" if self._fill_n >= self._max_size else "budget"
        return batch, limit

    def _take_fifo(self, head: Record[Any], budget: int, max_size: int) -> tuple[list[Record[Any]], Limit | None]:
        padded = self._padded
        batch = [head]
        head.queued = False
        n, total, largest = 1, head.cost, head.cost
        if batch_cost(1, total, largest, padded) >= budget:
            return batch, "budget"
        order = self._order
        while n < max_size:
            rec = order.front()
            if rec is None:
                return batch, None
            cost = rec.cost
            new_largest = cost if cost > largest else largest
            counted = (n + 1) * new_largest if padded else total + cost
            if counted > budget:
                return batch, "budget"
            order.pop()
            rec.queued = False
            batch.append(rec)
            n, total, largest = n + 1, total + cost, new_largest
            if counted == budget:
                return batch, "budget"
        return batch, "max_size"

    def _pop_from_bucket(self, rec: Record[Any]) -> None:
        """Remove ``rec``, the first live record of its bucket, from that bucket."""
        rec.queued = False  # the bucket's front() now discards it with the stale entries before it
        self._settle(rec.bucket, self._buckets[rec.bucket])

    def _bucket_front(self, lane: _Lane) -> Record[Any] | None:
        before = len(lane)
        rec = lane.front()
        self._in_buckets -= before - len(lane)
        return rec

    def _settle(self, index: int, lane: _Lane) -> None:
        """Discard stale entries at the bucket's front; unlist the bucket once it is empty."""
        if self._bucket_front(lane) is None:
            self._nonempty.pop(bisect.bisect_left(self._nonempty, index))

    def _take_similar(self, head: Record[Any], budget: int, max_size: int) -> tuple[list[Record[Any]], Limit | None]:
        """The head, then the nearest buckets outward, each in dispatch order."""
        padded = self._padded
        head.queued = False
        batch = [head]
        n, total, largest = 1, head.cost, head.cost
        full = batch_cost(1, total, largest, padded) >= budget
        nonempty = self._nonempty
        anchor = math.log2(head.cost + 1)
        right = bisect.bisect_left(nonempty, head.bucket)  # the head's bucket, if it has more
        left = right - 1
        while not full and n < max_size and (left >= 0 or right < len(nonempty)):
            # The side whose next bucket is nearer on the log scale goes first.
            if right >= len(nonempty):
                go_right = False
            elif left < 0:
                go_right = True
            else:
                go_right = nonempty[right] - head.bucket <= head.bucket - nonempty[left]
                if nonempty[right] - head.bucket == head.bucket - nonempty[left]:
                    r = self._bucket_front(self._buckets[nonempty[right]])
                    lf = self._bucket_front(self._buckets[nonempty[left]])
                    if r is not None and lf is not None:
                        go_right = abs(math.log2(r.cost + 1) - anchor) <= abs(anchor - math.log2(lf.cost + 1))
            index = nonempty[right] if go_right else nonempty[left]
            lane = self._buckets[index]
            blocked = False
            cost = 0
            while n < max_size:
                rec = self._bucket_front(lane)
                if rec is None:
                    break
                cost = rec.cost
                new_largest = cost if cost > largest else largest
                counted = (n + 1) * new_largest if padded else total + cost
                if counted > budget:
                    blocked = True
                    # Padded, a record no larger than the largest adds ``largest``:
                    # if it does not fit, nothing does.
                    full = padded and cost <= largest
                    break
                lane.pop()
                self._in_buckets -= 1
                rec.queued = False
                batch.append(rec)
                n, total, largest = n + 1, total + cost, new_largest
                if counted == budget:
                    full = True
                    break
            before = len(nonempty)
            self._settle(index, lane)
            emptied = len(nonempty) < before
            if go_right:
                if blocked and cost >= head.cost:
                    right = len(nonempty)  # costs only grow to the right: nothing more fits there
                elif not emptied:
                    right += 1
            else:
                if emptied:
                    right -= 1
                left -= 1
        batch.sort()  # their entries in the dispatch order are now stale, and go lazily
        if n >= max_size:
            return batch, "max_size"
        return batch, "budget" if full or self.size > n else None

    def clear(self) -> list[Record[Any]]:
        """Remove and return every queued record."""
        self.peak = max(self.peak, self.size)
        everything = [rec for rec in self._order.items if rec.queued]
        for rec in everything:
            rec.queued = False
        self.size = 0
        self._reset()
        return everything
