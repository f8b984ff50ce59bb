"""The queue: the records waiting for a batch, and how the next batch is taken.

Every accepted record is a [Record][] (``_record.py``), the future its caller
awaits.  Queued records wait in dispatch order, ``(key, seq)`` where ``key = submit time +
priority * priority_aging_s``.  [Pending][] keeps them in one of three ways:

* ``grouping="fifo"`` while every record has priority 0: a deque, and a batch
  is the queue's prefix that ``push`` measures record by record (the hot path:
  nothing but the deque and a few counters per record);
* ``grouping="fifo"`` from the first record with another priority until the
  queue empties: per-priority lanes (``_lanes.py``);
* ``grouping="similar_cost"``: log-cost buckets: up to ``SHORT`` records in
  one list sorted by bucket (``_row.py``), beyond that a structure per bucket
  (``_buckets.py``).

A batch is taken from the head.  "Fits" is the hard budget: the batch's cost
(``sum`` of costs, or ``padded``: size times the largest cost) stays within
``budget`` and its size within ``max_size``; only a record that alone exceeds
the budget is taken alone.  A batch is handed over in dispatch order.

``full`` tells whether the queued records would fill a batch: whether they
could not all go as one batch.  On the prefix path it is measured as records
come; otherwise it is kept from the queue's size, total and largest cost.

A record whose future is cancelled or expires while queued is *forgotten* at
once: it stops counting in ``size`` (so it frees its place in the queue), and
its entry is skipped and discarded when it reaches the front of its lane.
When forgotten records outnumber the live ones, the structures are rebuilt
without them, so memory stays proportional to the live records.

Owns: the queue's counts and the FIFO prefix path.  Must not
touch: when a batch is taken (``_dispatch.py``) or what happens to it.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator
from typing import Any

from . import _row
from ._buckets import BUCKETS_PER_OCTAVE as BUCKETS_PER_OCTAVE
from ._buckets import Buckets
from ._lanes import Lanes, dispatch_order, submission_order
from ._lanes import take as take_lanes
from ._record import Limit as Limit
from ._record import Record as Record
from ._record import batch_cost as batch_cost
from ._row import Row

_SLACK = 1024  # stale entries tolerated before a rebuild, on top of one per live record


class Pending:
    """The queue of records not yet in a batch."""

    def __init__(self, *, budget: int, max_size: int, padded: bool, similar: bool, short: int | None = None) -> None:
        """``short``: with ``similar``, the most records kept in a ``Row`` (default ``_row.SHORT``)."""
        self._budget = budget
        self._max_size = max_size
        self._padded = padded
        self._similar = similar
        # The dispatch order, with grouping="fifo": a deque while every
        # priority is 0, lanes once another priority came.
        self._fifo: deque[Record[Any]] = deque()
        self._lanes: Lanes | None = None
        self._prefix = not similar  # batches are prefixes of ``_fifo``, measured as records come
        self._buckets: Row | Buckets = Row()  # with grouping="similar_cost"
        self._short = _row.SHORT if short is None else short
        self._stale = (
            0  # records that left out of order (forgotten, or taken from inside a bucket) since the last rebuild
        )
        # What the queued records would make as one batch.  With ``_prefix``,
        # measured in queue order: ``_take_prefix`` takes exactly that prefix.
        # Otherwise the whole queue counts: it fills a batch when it could not
        # go as one, which is the same test whatever the order.
        self._fill_n = 0  # live records in the measured prefix
        self._fill_phys = 0  # entries in the measured prefix, stale ones included
        self._fill_total = 0
        self._fill_max = 0  # the largest cost measured (without ``_prefix``: of the queue, or more)
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
        """Queue a record (its ``key``, ``seq`` and ``cost`` already set).

        Records come in submission order, as the batcher makes them: ``seq``
        grows and ``t`` never goes back.
        """
        rec.queued = True
        cost = rec.cost
        if self._similar:
            buckets = self._buckets
            buckets.push(rec, cost)
            if self.size >= self._short and isinstance(buckets, Row):
                self._buckets = buckets.to_buckets()  # the queue grew long: a structure per bucket from now on
        elif self._lanes is None and rec.key == rec.t:
            self._fifo.append(rec)
        else:
            lanes = self._lanes
            if lanes is None:
                lanes = self._to_lanes()
            lanes.push(rec)
        self.size += 1
        self._total += cost
        if not self.full:
            if self._prefix:  # _grow(cost), inline: once per record
                self._fill_phys += 1
                n = self._fill_n + 1
                largest = cost if cost > self._fill_max else self._fill_max
                total = self._fill_total + cost
                counted = n * largest if self._padded else total
                if counted > self._budget and n > 1:
                    self.full = True  # this record would cross the budget: the batch is full
                    self._fill_phys -= 1  # and is not part of it
                    return
                self._fill_n, self._fill_total, self._fill_max = n, total, largest
                if n >= self._max_size or counted >= self._budget:
                    self.full = True
            else:
                if cost > self._fill_max:
                    self._fill_max = cost
                counted = self.size * self._fill_max if self._padded else self._total
                self.full = counted >= self._budget or self.size >= self._max_size

    def _to_lanes(self) -> Lanes:
        """The first record with a priority came: the queue moves into lanes until it empties."""
        lanes = self._lanes = Lanes()
        for rec in self._fifo:
            if rec.queued:
                lanes.push(rec)
        self._fifo = deque()
        self._prefix = False
        self._measure()
        return lanes

    def forget(self, rec: Record[Any]) -> None:
        """Stop counting a queued record whose future is done (cancelled, expired)."""
        if not rec.queued:
            return
        rec.queued = False
        if self._similar:
            self._buckets.forget(rec)
        self.size -= 1
        self._total -= rec.cost
        self._fill_stale = True
        self._stale += 1
        if not self.size:
            self._reset()
        elif self._stale > self.size + _SLACK:
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
        if not self._prefix:
            self._measure()
            return
        self._fill_stale = False
        order = self._fifo
        if not self._padded and self.size < self._max_size and self._total < self._budget:
            # Sum budget, and everything queued fits: no need to look at each record.
            self._fill_n, self._fill_phys, self._fill_total, self._fill_max = self.size, len(order), self._total, 0
            self.full = False
            return
        self._fill_n = self._fill_phys = self._fill_total = self._fill_max = 0
        self.full = False
        for rec in order:
            self._fill_phys += 1
            if rec.queued:
                self._grow(rec.cost)
                if self.full:
                    break

    def _measure(self) -> None:
        """Without ``_prefix``: does the whole queue fill a batch?  O(1) unless it might fit in one."""
        size = self.size
        if size >= self._max_size or self._total >= self._budget:
            self.full = True  # padded or not, it could not go as one batch
        elif not self._padded:
            self.full = False
        else:
            self._fill_max = largest = self._largest()
            self.full = size * largest >= self._budget

    def _largest(self) -> int:
        """The largest queued cost (the queue is short: fewer than ``max_size`` records)."""
        if self._similar:
            return self._buckets.largest()
        return max((rec.cost for rec in self._records() if rec.queued), default=0)

    def _records(self) -> Iterator[Record[Any]]:
        """Every entry, stale ones included."""
        if self._similar:
            yield from self._buckets
        elif self._lanes is None:
            yield from self._fifo
        else:
            yield from self._lanes

    def _reset(self) -> None:
        """Nothing is queued: start afresh (the FIFO deque, without lanes unless ``similar``)."""
        if self._fifo:  # forgotten records' entries
            self._fifo.clear()
        self._lanes = None
        similar = self._similar
        self._prefix = not similar
        if similar:
            self._buckets = Row()
        self._stale = self._total = self._fill_max = 0
        self._refill()

    def _rebuild(self) -> None:
        """Drop every stale entry (amortized: it runs once per ``size`` forgotten records)."""
        self._stale = 0
        if self._similar:
            self._buckets.compact()
        elif self._lanes is None:
            self._fifo = deque([rec for rec in self._fifo if rec.queued])
        else:
            self._lanes.compact()
        self._refill()

    def _entries(self) -> int:
        """Entries held in every structure, stale ones included (what memory is proportional to)."""
        if self._similar:
            return self._buckets.entries()
        return len(self._fifo) if self._lanes is None else self._lanes.entries

    def _head(self) -> Record[Any] | None:
        """The live record at the head, after discarding stale entries in front of it."""
        if self._similar:
            return self._buckets.head()
        if self._lanes is not None:
            return self._lanes.head()
        fifo = self._fifo
        while fifo:
            rec = fifo[0]
            if rec.queued:
                return rec
            fifo.popleft()
            if self._fill_phys:  # the measured prefix starts at the front: it loses this entry too
                self._fill_phys -= 1
        return None

    def in_order(self, *, next_only: bool = False) -> Iterator[Record[Any]]:
        """The live queued records in dispatch order, lazily (lanes and buckets are merged as it goes).

        ``next_only`` is for the interface of the keyed queue (every record
        here may join the next batch).  The queue must not change while the
        iterator is in use.
        """
        del next_only
        if self._similar:
            lanes = self._buckets.lanes_in_order()
        elif self._lanes is not None:
            lanes = [lane for _, _, lane in self._lanes.fronts]
        else:
            return (rec for rec in self._fifo if rec.queued)
        merged = lanes[0] if len(lanes) == 1 else heapq.merge(*lanes, key=dispatch_order)
        return (rec for rec in merged if rec.queued)

    def oldest_time(self) -> float:
        """Submit time of the live record at the head (the queue must not be empty)."""
        head = self._head()
        assert head is not None
        return head.t

    # ------------------------------------------------------------------ taking

    def take(self, max_size: int | None = None, budget: int | None = None) -> tuple[list[Record[Any]], Limit | None]:
        """Remove and return ``(batch, limit)``: the next batch, and what closed it.

        ``max_size`` and ``budget``, when given, tighten the queue's own
        limits for this batch only (a latency target's cap); the head record
        goes whatever they are.  ``limit`` is ``"budget"`` or ``"max_size"``
        when that closed the batch, else None.  Every record of ``batch`` is
        live and no longer queued.
        """
        size = self.size
        if size > self.peak:
            self.peak = size
        if not size:
            return [], None
        size_cap, cost_cap = self._max_size, self._budget
        capped = False
        if max_size is not None or budget is not None:
            if max_size is not None:
                size_cap = max(1, min(max_size, size_cap))
            if budget is not None:
                cost_cap = max(0, min(budget, cost_cap))
            capped = size_cap != self._max_size or cost_cap != self._budget
        if self._prefix:
            fifo = self._fifo
            if not (capped or self.full or self._fill_stale) and self._fill_n == size == len(fifo):
                # All of it goes, and nothing was forgotten: a short queue, say one caller's record.
                batch = list(fifo)
                fifo.clear()
                for rec in batch:
                    rec.queued = False
                self.size = self._stale = self._total = 0
                self._fill_n = self._fill_phys = self._fill_total = self._fill_max = 0  # _reset(), in short
                return batch, None
            if capped:
                batch, limit = self._take_prefix_capped(cost_cap, size_cap)
            else:
                if self._fill_stale:
                    self._refill()
                batch, limit = self._take_prefix()
            self.size = size = size - len(batch)
            if not size:  # the common case of a short queue: nothing left to count
                self._reset()
                return batch, limit
            self._total -= sum([rec.cost for rec in batch])
        else:
            if self._similar:
                buckets = self._buckets
                batch, limit, total = buckets.take(cost_cap, size_cap, self._padded, self.size)
                self._stale += buckets.behind
                if self._stale > self.size - len(batch) + _SLACK:
                    self._stale = 0
                    buckets.compact()
            else:
                assert self._lanes is not None
                batch, limit, total = take_lanes(self._lanes, cost_cap, size_cap, self._padded)
            self.size -= len(batch)
            self._total -= total
        if not self.size:
            self._reset()
        else:
            self._refill()
        return batch, limit

    def _take_prefix(self) -> tuple[list[Record[Any]], Limit | None]:
        """FIFO without priorities: the batch is the prefix that ``push`` already measured."""
        fifo = self._fifo
        n = self._fill_phys
        if n >= len(fifo):
            batch = list(fifo)
            fifo.clear()
        else:
            batch = [fifo.popleft() for _ in range(n)]
        if self._fill_n != len(batch):  # forgotten records' entries among them
            batch = [rec for rec in batch if rec.queued]
        for rec in batch:
            rec.queued = False
        limit: Limit | None = None
        if self.full:
            limit = "max_size" if self._fill_n >= self._max_size else "budget"
        return batch, limit

    def _take_prefix_capped(self, budget: int, max_size: int) -> tuple[list[Record[Any]], Limit | None]:
        """FIFO without priorities, under tighter limits than the measured prefix: walk the front."""
        fifo, padded = self._fifo, self._padded
        batch: list[Record[Any]] = []
        n = total = largest = 0
        while fifo:
            rec = fifo[0]
            if not rec.queued:
                fifo.popleft()  # a forgotten record's entry
                continue
            if n >= max_size:
                return batch, "max_size"
            cost = rec.cost
            new_largest = cost if cost > largest else largest
            counted = (n + 1) * new_largest if padded else total + cost
            if n and counted > budget:
                return batch, "budget"
            fifo.popleft()
            rec.queued = False
            batch.append(rec)
            n, total, largest = n + 1, total + cost, new_largest
            if counted >= budget:
                return batch, "budget"
        return batch, "max_size" if n >= max_size else None

    def clear(self) -> list[Record[Any]]:
        """Remove and return every queued record."""
        self.peak = max(self.peak, self.size)
        if self._prefix:
            everything = [rec for rec in self._fifo if rec.queued]
        else:
            everything = sorted((rec for rec in self._records() if rec.queued), key=dispatch_order)
        for rec in everything:
            rec.queued = False
        self.size = 0
        self._reset()
        return everything

    # ------------------------------------------------------------------ used by configure() and the keyed queue

    def head(self) -> Record[Any] | None:
        """The live record at the head of the dispatch order, or None if nothing is queued."""
        return self._head() if self.size else None

    def reconfigure(self, *, budget: int, max_size: int, padded: bool, similar: bool) -> None:
        """Adopt new batch limits in place: every queued record stays, re-measured (O(n log n), once)."""
        live = self.clear()
        live.sort(key=submission_order)  # pushed again as they came
        self._budget, self._max_size, self._padded, self._similar = budget, max_size, padded, similar
        self._reset()
        for rec in live:
            self.push(rec)
