"""How a batch is formed: the records waiting for a batch, and how one is taken.

Every accepted record is a [Record][], the future its caller awaits.  Queued
records wait in dispatch order, ``(key, seq)`` where ``key = submit time +
priority * priority_aging_s``.  While every record has priority 0 that is a
deque.  From the first record that has another priority until the queue
empties, records wait in *lanes*: a deque per priority (records of one
priority arrive in dispatch order) and a small heap of the lanes' first
records, which picks the head.  Taking a record costs O(log P), P the number of
priorities queued, whatever the depth of the queue.

A batch is taken from the head:

* ``grouping="fifo"``: records in dispatch order while the next one fits.
* ``grouping="similar_cost"``: the head record, always, then records from the
  cost buckets nearest to its own, outward.  Buckets split costs on a log scale
  (``BUCKETS_PER_OCTAVE`` to each doubling: records in one bucket differ by
  at most ~2%), each bucket keeps its records in dispatch order (lanes of its
  own), and the head is the first of the buckets' first records (a heap of
  them).  A batch costs O(batch * log P + buckets) to form, whatever the
  depth of the queue.  Because every batch takes the head, a record with
  ``r`` live records ahead of it is dispatched within ``r + 1`` batches, as in
  FIFO (records that come ahead of it later, with a better priority, count in
  ``r``).

"Fits" is the hard budget: the batch's cost (``sum`` of costs, or ``padded``:
size times the largest cost) stays within ``budget`` and its size within
``max_size``; only a record that alone exceeds the budget is taken alone.  A
batch is handed over in dispatch order.

``full`` tells whether the queued records would fill a batch: whether they
could not all go as one batch.  With ``grouping="fifo"`` and no priorities, the
batch is the queue's prefix that ``push`` measures record by record; otherwise
``full`` is kept from the queue's size, total and largest cost.

A record whose future is cancelled or expires while queued is *forgotten* at
once: it stops counting in ``size`` (so it frees its place in the queue), and
its entry is skipped and discarded when it reaches the front of its lane.
When forgotten records outnumber the live ones, the structures are rebuilt
without them, so memory stays proportional to the live records.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterator
from operator import attrgetter
from typing import Any, Literal, TypeAlias

from ._types import ResultT

BUCKETS_PER_OCTAVE = 32
"""``grouping="similar_cost"``: cost buckets per doubling of cost (each ~2% wide)."""

_SLACK = 1024  # stale entries tolerated before a rebuild, on top of one per live record
_INSIDE = 256  # ``grouping="similar_cost"``: entries of a bucket looked at behind a record that did not fit
_TOPS_SLACK = 64  # superseded entries in ``Pending._tops`` tolerated, on top of one per bucket

_dispatch_order = attrgetter("key", "seq")
_submission_order = attrgetter("seq")  # the same while every record's key is its submit time


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


_Lane: TypeAlias = "deque[Record[Any]]"
_Front: TypeAlias = "tuple[float, int, deque[Record[Any]]]"
_Top: TypeAlias = "tuple[float, int, int]"

_NOTHING_REFUSED = -1
_BUDGET_MET = -2


class _Lanes:
    """Records in dispatch order: one FIFO lane per priority, and a heap of the lanes' fronts.

    A lane holds the records of one ``key - t`` offset (one priority), which
    arrive in dispatch order; a record that would not (it does not happen
    with records in submission order) opens a new lane, so every lane stays
    sorted.  ``fronts``
    holds one ``(key, seq, lane)`` entry per non-empty lane, never later than
    the lane's first live record: taking a record or forgetting one only makes
    an entry early, and ``head`` puts the entries right on its way to the first
    live record.
    """

    __slots__ = ("by_offset", "entries", "fronts", "listed")

    def __init__(self) -> None:
        self.by_offset: dict[float, _Lane] = {}
        """The lane that records with this ``key - t`` join."""
        self.fronts: list[_Front] = []
        self.entries = 0
        """Records held, stale ones included."""
        self.listed: _Top | None = None
        """A cost bucket's entry in ``Pending._tops``, never later than ``fronts[0]``."""

    def push(self, rec: Record[Any]) -> None:
        key = rec.key
        offset = key - rec.t
        lane = self.by_offset.get(offset)
        if lane is not None and lane:
            last = lane[-1]
            if last.key < key or (last.key == key and last.seq < rec.seq):
                lane.append(rec)  # the common case: the lane's entry in the heap stays as it is
                self.entries += 1
                return
            lane = None  # out of order: it opens a lane of its own
        if lane is None:
            if len(self.by_offset) > 2 * len(self.fronts) + 64:  # forget lanes that emptied
                self.by_offset = {off: ln for off, ln in self.by_offset.items() if ln}
            lane = self.by_offset[offset] = deque()
        heapq.heappush(self.fronts, (key, rec.seq, lane))  # a new lane, or an empty one again
        lane.append(rec)
        self.entries += 1

    def head(self) -> Record[Any] | None:
        """The first live record in dispatch order; ``fronts[0]`` is then its entry, exactly.

        Stale entries in front of it are discarded on the way.
        """
        fronts = self.fronts
        while fronts:
            _, seq, lane = fronts[0]
            while lane:
                rec = lane[0]
                if rec.queued:
                    if rec.seq == seq:
                        return rec
                    heapq.heapreplace(fronts, (rec.key, rec.seq, lane))
                    break
                lane.popleft()
                self.entries -= 1
            else:
                heapq.heappop(fronts)  # an empty lane leaves the heap (and stays in by_offset, empty)
        return None

    def pop_head(self) -> None:
        """Remove the record ``head`` just returned."""
        fronts = self.fronts
        lane = fronts[0][2]
        lane.popleft()
        self.entries -= 1
        if not lane:
            heapq.heappop(fronts)
        # else the entry is early now: ``head`` sets it right

    def __iter__(self) -> Iterator[Record[Any]]:
        """Every entry, stale ones included, lane by lane."""
        for _, _, lane in self.fronts:
            yield from lane

    def compact(self) -> None:
        """Drop every stale entry; every entry in ``fronts`` is then exact."""
        fronts: list[_Front] = []
        for _, _, lane in self.fronts:
            live = [rec for rec in lane if rec.queued]
            lane.clear()
            if live:
                lane.extend(live)
                fronts.append((live[0].key, live[0].seq, lane))
        heapq.heapify(fronts)
        self.fronts = fronts
        self.entries = sum(len(lane) for _, _, lane in fronts)
        self.by_offset = {offset: lane for offset, lane in self.by_offset.items() if lane}


def _fill(
    lanes: _Lanes, batch: list[Record[Any]], n: int, total: int, largest: int, budget: int, max_size: int, padded: bool
) -> tuple[int, int, int, int]:
    """Move records from ``lanes`` to ``batch``, in dispatch order, while they fit.

    ``n``, ``total`` and ``largest`` describe ``batch`` (not empty).  Returns
    them updated, and why it stopped: the cost of the record that did not fit,
    ``_BUDGET_MET`` when the batch's cost reached the budget exactly, else
    ``_NOTHING_REFUSED`` (the lanes ran out, or ``batch`` reached ``max_size``).
    """
    fronts = lanes.fronts
    append = batch.append
    heapreplace = heapq.heapreplace
    taken = n
    stop = _NOTHING_REFUSED
    while n < max_size and fronts:
        if len(fronts) == 1:
            # One lane: a plain FIFO (its entry may stay early: no other lane to order).
            lane = fronts[0][2]
            while n < max_size:
                rec = lane[0]
                if rec.queued:
                    cost = rec.cost
                    if padded:
                        new_largest = cost if cost > largest else largest
                        counted = (n + 1) * new_largest
                    else:
                        new_largest = largest
                        counted = total + cost
                    if counted > budget:
                        stop = cost
                        break
                    rec.queued = False
                    append(rec)
                    n += 1
                    total += cost
                    largest = new_largest
                    if counted == budget:
                        stop = _BUDGET_MET
                else:
                    lanes.entries -= 1
                lane.popleft()
                if not lane:
                    heapq.heappop(fronts)
                    break
                if stop != _NOTHING_REFUSED:
                    break
            else:
                continue  # max_size: the outer loop ends
            break
        # Several lanes: the first live record is the front of the top lane,
        # unless that is stale or the top entry early (then ``head`` sets
        # them right).
        _, seq, lane = fronts[0]
        rec = lane[0]
        if not rec.queued or rec.seq is not seq:
            found = lanes.head()
            if found is None:
                break
            if len(fronts) == 1:
                continue  # the other lanes were stale: one left
            rec, lane = found, fronts[0][2]
        # The top lane gives records while they come before the other lanes'
        # first ones (their entries are never later than those); then its
        # entry is set right.
        other = fronts[1] if len(fronts) == 2 or fronts[1] < fronts[2] else fronts[2]
        other_key, other_seq = other[0], other[1]
        while True:
            cost = rec.cost
            if padded:
                new_largest = cost if cost > largest else largest
                counted = (n + 1) * new_largest
            else:
                new_largest = largest
                counted = total + cost
            if counted > budget:
                stop = cost
                break
            lane.popleft()
            rec.queued = False
            append(rec)
            n += 1
            total += cost
            largest = new_largest
            if counted == budget:
                stop = _BUDGET_MET
                break
            if n >= max_size or not lane:
                break
            rec = lane[0]
            key = rec.key
            if key > other_key or (key == other_key and rec.seq > other_seq) or not rec.queued:
                break
        if lane:
            rec = lane[0]
            heapreplace(fronts, (rec.key, rec.seq, lane))
        else:
            heapq.heappop(fronts)
        if stop != _NOTHING_REFUSED:
            break
    lanes.entries -= n - taken
    return n, total, largest, stop


class Pending:
    """The queue of records not yet in a batch."""

    def __init__(self, *, budget: int, max_size: int, padded: bool, similar: bool) -> None:
        self._budget = budget
        self._max_size = max_size
        self._padded = padded
        self._similar = similar
        # The dispatch order, with grouping="fifo": a deque while every
        # priority is 0, lanes once another priority came.
        self._fifo: deque[Record[Any]] = deque()
        self._lanes: _Lanes | None = None
        self._prefix = not similar  # batches are prefixes of ``_fifo``, measured as records come
        # With grouping="similar_cost": cost buckets, each in dispatch order,
        # and a heap of the buckets' first records for the head.
        self._buckets: dict[int, _Lanes] = {}
        self._nonempty: list[int] = []  # sorted indices of the buckets that may hold live records
        self._tops: list[_Top] = []  # ``(key, seq, index)``: ``listed`` entries of the buckets, and superseded ones
        self._order = _submission_order  # how a batch is sorted: by ``seq`` until a priority comes
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
            self._push_similar(rec, cost)
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
            if self._prefix:
                self._fill_phys += 1
                self._grow(cost)
            else:
                if cost > self._fill_max:
                    self._fill_max = cost
                counted = self.size * self._fill_max if self._padded else self._total
                self.full = counted >= self._budget or self.size >= self._max_size

    def _push_similar(self, rec: Record[Any], cost: int) -> None:
        if rec.key != rec.t:
            self._order = _dispatch_order
        index = rec.bucket = _bucket(cost)
        bucket = self._buckets.get(index)
        if bucket is None:
            bucket = self._buckets[index] = _Lanes()
        if not bucket.fronts:  # listed unless a look at its front found it empty
            nonempty = self._nonempty
            at = bisect.bisect_left(nonempty, index)
            if at == len(nonempty) or nonempty[at] != index:
                nonempty.insert(at, index)
        bucket.push(rec)
        if bucket.fronts[0][1] == rec.seq:
            # The record comes first in its bucket: the bucket's entry in
            # ``_tops`` must not be later than it.
            key, seq, listed = rec.key, rec.seq, bucket.listed
            if listed is None or listed[0] > key or (listed[0] == key and listed[1] > seq):
                bucket.listed = entry = (key, seq, index)
                heapq.heappush(self._tops, entry)
                if len(self._tops) > 2 * len(self._buckets) + _TOPS_SLACK:
                    self._relist()  # superseded entries that have not surfaced yet piled up

    def _relist(self) -> None:
        """Rebuild ``_tops`` with one entry per bucket."""
        tops: list[_Top] = []
        for index, bucket in self._buckets.items():
            if bucket.fronts:
                key, seq, _ = bucket.fronts[0]  # never later than the bucket's first live record
                bucket.listed = entry = (key, seq, index)
                tops.append(entry)
            else:
                bucket.listed = None
        heapq.heapify(tops)
        self._tops = tops

    def _to_lanes(self) -> _Lanes:
        """The first record with a priority came: the queue moves into lanes until it empties."""
        lanes = self._lanes = _Lanes()
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
        if self._similar:  # in the top bucket that still holds a live record
            for index in reversed(self._nonempty):
                costs = [rec.cost for rec in self._buckets[index] if rec.queued]
                if costs:
                    return max(costs)
            return 0
        return max((rec.cost for rec in self._records() if rec.queued), default=0)

    def _records(self) -> Iterator[Record[Any]]:
        """Every entry, stale ones included."""
        if self._similar:
            for index in self._nonempty:
                yield from self._buckets[index]
        elif self._lanes is None:
            yield from self._fifo
        else:
            yield from self._lanes

    def _reset(self) -> None:
        self._fifo = deque()
        self._lanes = None
        self._prefix = not self._similar
        self._buckets.clear()
        self._nonempty.clear()
        self._tops.clear()
        self._order = _submission_order
        self._stale = 0
        self._total = 0
        self._fill_max = 0
        self._refill()

    def _rebuild(self) -> None:
        """Drop every stale entry (amortized: it runs once per ``size`` forgotten records)."""
        self._stale = 0
        if self._similar:
            self._compact_buckets()
        elif self._lanes is None:
            self._fifo = deque([rec for rec in self._fifo if rec.queued])
        else:
            self._lanes.compact()
        self._refill()

    def _compact_buckets(self) -> None:
        buckets = self._buckets
        for index in self._nonempty:
            buckets[index].compact()
        self._nonempty = [index for index in self._nonempty if buckets[index].fronts]
        self._buckets = {index: buckets[index] for index in self._nonempty}
        self._relist()

    # ------------------------------------------------------------------ reading

    def _entries(self) -> int:
        """Entries held in every structure, stale ones included (what memory is proportional to)."""
        if self._similar:
            return sum(bucket.entries for bucket in self._buckets.values()) + len(self._tops)
        return len(self._fifo) if self._lanes is None else self._lanes.entries

    def _head(self) -> Record[Any] | None:
        """The live record at the head, after discarding stale entries in front of it."""
        if self._similar:
            return self._similar_head()
        if self._lanes is not None:
            return self._lanes.head()
        fifo = self._fifo
        while fifo:
            rec = fifo[0]
            if rec.queued:
                return rec
            fifo.popleft()
        return None

    def _similar_head(self) -> Record[Any] | None:
        """The head: the first of the buckets' first records (``_tops`` put right on the way)."""
        tops, buckets = self._tops, self._buckets
        while tops:
            entry = tops[0]
            bucket = buckets[entry[2]]
            if entry is not bucket.listed:
                heapq.heappop(tops)  # superseded by an earlier entry of the same bucket
                continue
            rec = bucket.head()
            if rec is None:
                heapq.heappop(tops)
                bucket.listed = None
            elif rec.seq == entry[1]:
                return rec
            else:
                bucket.listed = entry = (rec.key, rec.seq, entry[2])
                heapq.heapreplace(tops, entry)
        return None

    def in_order(self, *, next_only: bool = False) -> Iterator[Record[Any]]:
        """The live queued records in dispatch order, lazily (lanes and buckets are merged as it goes).

        ``next_only`` is for the interface of the keyed queue (every record
        here may join the next batch).  The queue must not change while the
        iterator is in use.
        """
        del next_only
        if self._similar:
            lanes = [lane for bucket in self._buckets.values() for _, _, lane in bucket.fronts]
        elif self._lanes is not None:
            lanes = [lane for _, _, lane in self._lanes.fronts]
        else:
            return (rec for rec in self._fifo if rec.queued)
        merged = lanes[0] if len(lanes) == 1 else heapq.merge(*lanes, key=_dispatch_order)
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
        self.peak = max(self.peak, self.size)
        if not self.size:
            return [], None
        size_cap, cost_cap = self._max_size, self._budget
        if max_size is not None or budget is not None:
            if max_size is not None:
                size_cap = max(1, min(max_size, size_cap))
            if budget is not None:
                cost_cap = max(0, min(budget, cost_cap))
        capped = size_cap != self._max_size or cost_cap != self._budget
        if self._prefix:
            if capped:
                batch, limit = self._take_prefix_capped(cost_cap, size_cap)
            else:
                if self._fill_stale:
                    self._refill()
                batch, limit = self._take_prefix()
            self.size -= len(batch)
            self._total -= sum(rec.cost for rec in batch)
        else:
            if self._similar:
                head = self._similar_head()
                assert head is not None
                self._buckets[head.bucket].pop_head()
                head.queued = False
                batch, limit, total = self._take_similar(head, cost_cap, size_cap)
                if self._stale > self.size - len(batch) + _SLACK:
                    self._stale = 0
                    self._compact_buckets()
            else:
                lanes = self._lanes
                assert lanes is not None
                head = lanes.head()
                assert head is not None
                lanes.pop_head()
                head.queued = False
                batch, limit, total = self._take_lanes(lanes, head, cost_cap, size_cap)
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

    def _take_lanes(
        self, lanes: _Lanes, head: Record[Any], budget: int, max_size: int
    ) -> tuple[list[Record[Any]], Limit | None, int]:
        """FIFO with priorities: the head, then records in dispatch order while the next fits."""
        batch = [head]
        cost = head.cost
        n, total, stop = 1, cost, _BUDGET_MET
        if cost < budget:  # batch_cost(1, ...): one record's cost, padded or not
            n, total, _, stop = _fill(lanes, batch, 1, cost, cost, budget, max_size, self._padded)
        if n >= max_size:
            return batch, "max_size", total
        return batch, None if stop == _NOTHING_REFUSED else "budget", total

    def _take_similar(
        self, head: Record[Any], budget: int, max_size: int
    ) -> tuple[list[Record[Any]], Limit | None, int]:
        """The head, then the nearest buckets outward, each in dispatch order."""
        padded = self._padded
        batch = [head]
        n, total, largest = 1, head.cost, head.cost
        full = total >= budget  # batch_cost(1, ...): one record's cost, padded or not
        nonempty, buckets = self._nonempty, self._buckets
        where = head.bucket
        if buckets[where].head() is None:  # the head was all its bucket held
            nonempty.pop(bisect.bisect_left(nonempty, where))
        anchor = math.log2(head.cost + 1)
        right = bisect.bisect_left(nonempty, where)  # the head's bucket, if it has more
        left = right - 1
        runs = 0  # buckets that gave records, each in dispatch order after the head
        while not full and n < max_size and (left >= 0 or right < len(nonempty)):
            # The side whose next bucket is nearer on the log scale goes first.
            if right >= len(nonempty):
                go_right = False
            elif left < 0:
                go_right = True
            else:
                go_right = nonempty[right] - where <= where - nonempty[left]
                if nonempty[right] - where == where - nonempty[left]:
                    r = buckets[nonempty[right]].head()
                    lf = buckets[nonempty[left]].head()
                    if r is not None and lf is not None:
                        go_right = abs(math.log2(r.cost + 1) - anchor) <= abs(anchor - math.log2(lf.cost + 1))
            index = nonempty[right] if go_right else nonempty[left]
            bucket = buckets[index]
            before = n
            n, total, largest, stop = _fill(bucket, batch, n, total, largest, budget, max_size, padded)
            if stop >= 0 and n < max_size:
                # A record did not fit: later ones of its bucket may, a little smaller.
                n, total, largest, full = self._fill_inside(index, batch, n, total, largest, budget, max_size)
                # Padded, a record no larger than the largest adds ``largest``:
                # if it does not fit, nothing does.
                full = full or (padded and stop <= largest)
            elif stop == _BUDGET_MET:
                full = True
            if n > before:
                runs += 1
            emptied = bucket.head() is None
            if emptied:
                nonempty.pop(right if go_right else left)
            if go_right:
                if stop >= head.cost:
                    right = len(nonempty)  # costs only grow to the right: nothing more fits there
                elif not emptied:
                    right += 1
            else:
                if emptied:
                    right -= 1
                left -= 1
        if runs > 1:
            batch.sort(key=self._order)  # a merge of the runs, to hand the batch over in dispatch order
        if n >= max_size:
            return batch, "max_size", total
        return batch, "budget" if full or self.size > n else None, total

    def _fill_inside(
        self, index: int, batch: list[Record[Any]], n: int, total: int, largest: int, budget: int, max_size: int
    ) -> tuple[int, int, int, bool]:
        """After a record of bucket ``index`` did not fit: add records behind it that do, in dispatch order.

        Costs in a bucket differ by up to ~2%, so a later record may fit where
        the first did not.  Looks at up to ``2 * max_size + _INSIDE`` entries
        of the bucket, while the room left reaches into the bucket.  The
        records taken stay in their lanes as stale entries.  Returns ``n``,
        ``total`` and ``largest`` updated, and whether the budget is met
        (``budget`` and ``max_size``: this batch's limits).
        """
        padded = self._padded
        room = budget // (n + 1) if padded else budget - total  # padded: for it and ``largest``
        if (padded and largest > room) or room < 0 or _bucket(room) < index:
            return n, total, largest, False  # every cost in the bucket is above the room left
        lanes = [lane for _, _, lane in self._buckets[index].fronts]
        behind = lanes[0] if len(lanes) == 1 else heapq.merge(*lanes, key=_dispatch_order)
        for rec in itertools.islice(behind, 2 * max_size + _INSIDE):
            cost = rec.cost
            if cost > room or not rec.queued:
                continue
            rec.queued = False
            batch.append(rec)
            self._stale += 1  # its entry stays behind
            n += 1
            total += cost
            if cost > largest:
                largest = cost
            if n >= max_size:
                break
            if padded:
                if n * largest == budget:
                    return n, total, largest, True
                room = budget // (n + 1)
                if largest > room:
                    break
            else:
                if total == budget:
                    return n, total, largest, True
                room = budget - total
            if _bucket(room) < index:
                break
        return n, total, largest, False

    def clear(self) -> list[Record[Any]]:
        """Remove and return every queued record."""
        self.peak = max(self.peak, self.size)
        if self._prefix:
            everything = [rec for rec in self._fifo if rec.queued]
        else:
            everything = sorted((rec for rec in self._records() if rec.queued), key=_dispatch_order)
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
        live.sort(key=_submission_order)  # pushed again as they came
        self._budget, self._max_size, self._padded, self._similar = budget, max_size, padded, similar
        self._reset()
        for rec in live:
            self.push(rec)
