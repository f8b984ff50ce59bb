"""How a batch is formed: the records waiting for a batch, and how one is taken.

Records wait in submission order (a deque) until one with a non-zero priority
arrives; from then until the queue empties they wait in a heap ordered by
``(key, seq)`` where ``key = submit time + priority * priority_aging_s``.  A
sorted deque is already a valid heap, so switching costs one list copy.

A batch is taken from the head:

* ``grouping="fifo"``: records in key order while the next one fits.
* ``grouping="similar_cost"``: the head record, always, then the queued records
  whose cost is closest to its cost (on a log scale) while they fit.  Because
  every batch takes the head, a record with ``r`` live records ahead of it is
  dispatched within ``r + 1`` batches -- the same bound as FIFO.

"Fits" is the hard budget: the batch's cost (``sum`` of costs, or ``padded``:
size times the largest cost) stays within ``budget`` and its size within
``max_size``; only a record that alone exceeds the budget is taken alone.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections import deque
from collections.abc import Iterator
from typing import Any, Generic, Literal, TypeAlias

from ._types import ResultT


class Record(Generic[ResultT]):
    """One accepted record and the future its result goes to."""

    __slots__ = ("cost", "future", "item", "key", "seq", "t", "timer")

    def __init__(self, item: Any, future: asyncio.Future[ResultT], cost: int, t: float, key: float, seq: int) -> None:
        self.item = item
        self.future = future
        self.cost = cost
        self.t = t
        """Loop time at submit."""
        self.key = key
        """Dispatch order: ``t`` plus the priority's aging offset."""
        self.seq = seq
        self.timer: asyncio.TimerHandle | None = None
        """The deadline's timer, while the record is queued with a deadline."""

    def __lt__(self, other: Record[Any]) -> bool:
        return self.key < other.key or (self.key == other.key and self.seq < other.seq)


Limit: TypeAlias = Literal["budget", "max_size"]
"""What closed a batch that is full."""


def batch_cost(size: int, total: int, largest: int, padded: bool) -> int:
    """The cost of a batch counted against the budget."""
    return size * largest if padded else total


class Pending:
    """The queue of records not yet in a batch."""

    def __init__(self, *, budget: int, max_size: int, padded: bool, similar: bool) -> None:
        self._budget = budget
        self._max_size = max_size
        self._padded = padded
        self._similar = similar
        self._fifo: deque[Record[Any]] = deque()
        self._heap: list[Record[Any]] | None = None
        # What the queued records would make as one batch, in queue order: lets
        # ``submit`` tell in O(1) whether a full batch is waiting.
        self._fill_n = 0
        self._fill_total = 0
        self._fill_max = 0
        self.full = False
        """True when the queued records would fill a batch (budget or size)."""
        self.size = 0
        """How many records are queued (``len()`` without a call, for the hot path)."""
        self.peak = 0
        """The largest ``size`` so far, as of the last removal (the queue only shrinks there)."""
        self._total = 0  # the sum of the queued records' costs

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Record[Any]]:
        return iter(self._fifo if self._heap is None else self._heap)

    def oldest_time(self) -> float:
        """Submit time of the record at the head (the queue must not be empty)."""
        return self._fifo[0].t if self._heap is None else self._heap[0].t

    def push(self, rec: Record[Any]) -> None:
        """Queue a record (its ``key`` and ``seq`` already set)."""
        self.size += 1
        self._total += rec.cost
        if self._heap is not None:
            heapq.heappush(self._heap, rec)
        elif rec.key == rec.t:
            self._fifo.append(rec)
        else:
            self._heap = list(self._fifo)  # sorted by (key, seq), hence a heap
            self._fifo.clear()
            heapq.heappush(self._heap, rec)
        if not self.full:
            self._grow(rec.cost)

    def _grow(self, cost: int) -> None:
        n = self._fill_n + 1
        largest = cost if cost > self._fill_max else self._fill_max
        total = self._fill_total + cost
        counted = n * largest if self._padded else total  # batch_cost(), inline: once per record
        if counted > self._budget and self._fill_n:
            self.full = True  # this record would cross the budget: the batch is full
            return
        self._fill_n, self._fill_total, self._fill_max = n, total, largest
        if n >= self._max_size or counted >= self._budget:
            self.full = True

    def _refill(self) -> None:
        """Measure the next batch from scratch, after records were removed."""
        self.size = len(self._fifo) if self._heap is None else len(self._heap)
        if not self._padded and self.size < self._max_size and self._total < self._budget:
            # Sum budget, and everything queued fits: no need to look at each record.
            self._fill_n, self._fill_total, self._fill_max = self.size, self._total, 0
            self.full = False
            return
        self._fill_n = self._fill_total = self._fill_max = 0
        self.full = False
        for rec in self:
            self._grow(rec.cost)
            if self.full:
                break

    def take(self) -> tuple[list[Record[Any]], Limit | None, list[Record[Any]]]:
        """Remove and return ``(batch, limit, dropped)``.

        ``limit`` is ``"budget"`` or ``"max_size"`` when that closed the batch,
        else None.  ``dropped`` are records met on the way whose futures were
        already done (cancelled by the caller, or expired); they are removed
        and not part of the batch.
        """
        self.peak = max(self.peak, self.size)
        if self._heap is None and not self._similar:
            return self._take_prefix()
        dropped: list[Record[Any]] = []
        head = self._pop_live(dropped)
        if head is None:
            self._total = 0
            self._refill()
            return [], None, dropped
        if self._similar:
            batch, limit = self._take_similar(head, dropped)
        else:
            batch, limit = self._take_fifo(head, dropped)
        if self._heap is not None and not self._heap:
            self._heap = None
        self._total -= sum(rec.cost for rec in batch) + sum(rec.cost for rec in dropped)
        self._refill()
        return batch, limit, dropped

    def _take_prefix(self) -> tuple[list[Record[Any]], Limit | None, list[Record[Any]]]:
        """FIFO without priorities: the batch is the prefix that ``push`` already measured.

        Records whose futures are done are left in the batch, for the batcher
        to drop before dispatch: that keeps this O(batch) with no per-record test.
        """
        fifo, n = self._fifo, self._fill_n
        if n >= len(fifo):
            batch = list(fifo)
            fifo.clear()
        else:
            batch = [fifo.popleft() for _ in range(n)]
        self._total -= self._fill_total  # the prefix's cost, measured as it grew
        limit: Limit | None = None
        if self.full:
            limit = "max_size" if n >= self._max_size else "budget"
        self._refill()
        return batch, limit, []

    def _pop_live(self, dropped: list[Record[Any]]) -> Record[Any] | None:
        while self._fifo if self._heap is None else self._heap:
            rec = self._fifo.popleft() if self._heap is None else heapq.heappop(self._heap)
            if not rec.future.done():
                return rec
            dropped.append(rec)
        return None

    def _take_fifo(self, head: Record[Any], dropped: list[Record[Any]]) -> tuple[list[Record[Any]], Limit | None]:
        budget, max_size, padded = self._budget, self._max_size, self._padded
        batch = [head]
        n, total, largest = 1, head.cost, head.cost
        if batch_cost(1, total, largest, padded) >= budget:
            return batch, "budget"
        fifo, heap = self._fifo, self._heap
        while n < max_size:
            if heap is None:
                if not fifo:
                    return batch, None
                rec = fifo[0]
            else:
                if not heap:
                    return batch, None
                rec = heap[0]
            if rec.future.done():
                dropped.append(fifo.popleft() if heap is None else heapq.heappop(heap))
                continue
            cost = rec.cost
            new_largest = cost if cost > largest else largest
            counted = (n + 1) * new_largest if padded else total + cost
            if counted > budget:
                return batch, "budget"
            batch.append(fifo.popleft() if heap is None else heapq.heappop(heap))
            n, total, largest = n + 1, total + cost, new_largest
            if counted == budget:
                return batch, "budget"
        return batch, "max_size"

    def _take_similar(self, head: Record[Any], dropped: list[Record[Any]]) -> tuple[list[Record[Any]], Limit | None]:
        budget, max_size, padded = self._budget, self._max_size, self._padded
        rest = list(self)  # in heap mode not sorted; batch and queue are re-sorted below
        anchor = math.log1p(head.cost)
        closest_first = sorted(rest, key=lambda rec: (abs(math.log1p(rec.cost) - anchor), rec.key, rec.seq))
        batch = [head]
        total = largest = head.cost
        full = batch_cost(1, total, largest, padded) >= budget
        for rec in closest_first:
            if full or len(batch) >= max_size:
                break
            if rec.future.done():
                continue
            new_largest = max(rec.cost, largest)
            counted = batch_cost(len(batch) + 1, total + rec.cost, new_largest, padded)
            if counted <= budget:  # else a record further on may still fit
                batch.append(rec)
                total, largest = total + rec.cost, new_largest
                full = counted == budget
        taken = {id(rec) for rec in batch}
        keep = [rec for rec in rest if id(rec) not in taken and not rec.future.done()]
        dropped.extend(rec for rec in rest if id(rec) not in taken and rec.future.done())
        keep.sort()
        if self._heap is None:
            self._fifo = deque(keep)
        else:
            self._heap = keep  # sorted, hence a heap
        batch.sort()
        if len(batch) >= max_size:
            return batch, "max_size"
        return batch, "budget" if full or keep else None

    def compact(self) -> list[Record[Any]]:
        """Remove and return every record whose future is already done."""
        self.peak = max(self.peak, self.size)
        done = [rec for rec in self if rec.future.done()]
        if done:
            live = [rec for rec in self if not rec.future.done()]
            if self._heap is None:
                self._fifo = deque(live)
            else:
                heapq.heapify(live)
                self._heap = live or None
            self._total = sum(rec.cost for rec in live)
            self._refill()
        return done

    def clear(self) -> list[Record[Any]]:
        """Remove and return every record."""
        self.peak = max(self.peak, self.size)
        everything = list(self)
        self._fifo = deque()
        self._heap = None
        self._total = 0
        self._refill()
        return everything
