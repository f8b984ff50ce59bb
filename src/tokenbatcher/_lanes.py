"""Records in dispatch order: per-priority FIFO lanes, and how a batch is taken from them.

From the first record that has a priority other than 0 until the queue
empties, ``grouping="fifo"`` keeps its records in *lanes*: a deque per
priority (records of one priority arrive in dispatch order, ``(key, seq)``)
and a small heap of the lanes' first records, which picks the head.  Taking a
record costs O(log P), P the number of priorities queued, whatever the depth
of the queue.  ``grouping="similar_cost"`` keeps one ``Lanes`` per cost bucket
(``_buckets.py``).

``fill`` moves records from lanes into a batch in dispatch order while the
next one fits; ``take`` is a whole batch of ``grouping="fifo"`` with
priorities: the head, then what ``fill`` adds.  Where two lanes alternate
(aged records of one priority among fresh ones of the next, the usual case
under a steady flow), ``fill`` merges the two a comparison per record and
touches the heap only when a third lane's turn comes.

Owns: the lanes and walking them in dispatch order.  Must not touch: the
queue's counts (``size``, ``full``: ``_pending.py``) or the cost buckets.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterator
from operator import attrgetter
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from ._record import Limit, Record

dispatch_order = attrgetter("key", "seq")
submission_order = attrgetter("seq")  # the same while every record's key is its submit time
_key = attrgetter("key")


def sort_by_seq(batch: list[Record[Any]]) -> None:
    """Sort records in dispatch order, while every record's key is its submit time."""
    batch.sort(key=submission_order)


def sort_by_key(batch: list[Record[Any]]) -> None:
    """Sort records in dispatch order, ``(key, seq)``; by ``key`` alone when no two keys are equal.

    A float key sorts in a third of the time of a ``(key, seq)`` tuple, and
    checking that the keys differ costs less than the difference.
    """
    keys = list(map(_key, batch))
    batch.sort(key=_key if len(set(keys)) == len(keys) else dispatch_order)


Lane: TypeAlias = "deque[Record[Any]]"
Front: TypeAlias = "tuple[float, int, deque[Record[Any]]]"
Top: TypeAlias = "tuple[float, int, int]"
"""A cost bucket's entry in the heap of bucket heads: ``(key, seq, bucket index)``."""

NOTHING_REFUSED = -1
BUDGET_MET = -2


class Lanes:
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

    __slots__ = ("by_offset", "entries", "fronts", "listed", "top")

    def __init__(self) -> None:
        self.by_offset: dict[float, Lane] = {}
        """The lane that records with this ``key - t`` join."""
        self.fronts: list[Front] = []
        self.entries = 0
        """Records held, stale ones included."""
        self.listed: Top | None = None
        """A cost bucket's entry in ``Buckets.tops``, never later than ``fronts[0]``."""
        self.top = 0
        """A cost bucket's largest cost pushed (``Buckets.push`` keeps it): no live record costs more."""

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
        fronts: list[Front] = []
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


def fill(
    lanes: Lanes, batch: list[Record[Any]], n: int, total: int, largest: int, budget: int, max_size: int, padded: bool
) -> tuple[int, int, int, int]:
    """Move records from ``lanes`` to ``batch``, in dispatch order, while they fit.

    ``n``, ``total`` and ``largest`` describe ``batch`` (not empty).  Returns
    them updated, and why it stopped: the cost of the record that did not fit,
    ``BUDGET_MET`` when the batch's cost reached the budget exactly, else
    ``NOTHING_REFUSED`` (the lanes ran out, or ``batch`` reached ``max_size``).
    """
    fronts = lanes.fronts
    append = batch.append
    heapreplace = heapq.heapreplace
    taken = n
    stop = NOTHING_REFUSED
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
                        stop = BUDGET_MET
                else:
                    lanes.entries -= 1
                lane.popleft()
                if not lane:
                    heapq.heappop(fronts)
                    break
                if stop != NOTHING_REFUSED:
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
        # Records come from the top lane and the lane of the next entry, ``b``,
        # merged, while they come before every other lane's entry (``bound``,
        # the third entry: the lanes' entries are never later than their
        # first records).  Interleaved priorities (aged records of one
        # priority alternating with fresh ones of the next) thus cost a
        # comparison per record, not a heap operation per run.
        top = lane
        if len(fronts) == 2:
            other = fronts[1]
            bound_key, bound_seq = math.inf, 0
        else:
            other, bound = (fronts[1], fronts[2]) if fronts[1] < fronts[2] else (fronts[2], fronts[1])
            j = 1 if other is fronts[1] else 2
            for k in (2 * j + 1, 2 * j + 2):  # the third entry: other's sibling or one of other's children
                if k < len(fronts) and fronts[k] < bound:
                    bound = fronts[k]
            bound_key, bound_seq = bound[0], bound[1]
        b = other[2]  # never emptied here, so that its entry in ``fronts`` stays valid
        rb = b[0]
        # ``lim``: what the top lane's records must come before (b's first
        # record, if that comes before ``bound``).
        b_next = rb.key < bound_key or (rb.key == bound_key and rb.seq < bound_seq)
        lim_key, lim_seq = (rb.key, rb.seq) if b_next else (bound_key, bound_seq)
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
                stop = BUDGET_MET
                break
            if n >= max_size:
                break
            if top:
                rec = top[0]
                key = rec.key
                if key < lim_key or (key == lim_key and rec.seq < lim_seq):
                    if not rec.queued:
                        break
                    lane = top
                    continue
            # b's first record comes next, if it comes before ``bound``.
            if not b_next or not rb.queued or len(b) == 1:
                break
            rec, lane = rb, b
            rb = b[1]
            if rb.key < bound_key or (rb.key == bound_key and rb.seq < bound_seq):
                lim_key, lim_seq = rb.key, rb.seq
            else:
                lim_key, lim_seq, b_next = bound_key, bound_seq, False
        # The top entry is set right; b's may be early now, which ``head`` mends.
        if top:
            rec = top[0]
            heapreplace(fronts, (rec.key, rec.seq, top))
        else:
            heapq.heappop(fronts)
        if stop != NOTHING_REFUSED:
            break
    lanes.entries -= n - taken
    return n, total, largest, stop


def take_all(lanes: Lanes, batch: list[Record[Any]]) -> tuple[int, int, int]:
    """Move every live record of ``lanes`` to ``batch``, lane by lane, and empty them.

    For a cost bucket that fits whole: no record is weighed against the
    budget, and no heap orders the lanes (the caller sorts the batch when
    there was more than one lane).  Returns how many records moved, their
    total cost and the largest.
    """
    append = batch.append
    n = total = largest = 0
    for _, _, lane in lanes.fronts:
        for rec in lane:
            if rec.queued:
                rec.queued = False
                append(rec)
                cost = rec.cost
                n += 1
                total += cost
                if cost > largest:
                    largest = cost
        lane.clear()
    lanes.fronts = []
    lanes.entries = 0
    return n, total, largest


def take(lanes: Lanes, budget: int, max_size: int, padded: bool) -> tuple[list[Record[Any]], Limit | None, int]:
    """FIFO with priorities: the head, then records in dispatch order while the next fits.

    Returns the batch (every record no longer queued), what closed it, and its total cost.
    """
    head = lanes.head()
    assert head is not None
    lanes.pop_head()
    head.queued = False
    batch = [head]
    cost = head.cost
    n, total, stop = 1, cost, BUDGET_MET
    if cost < budget:  # batch_cost(1, ...): one record's cost, padded or not
        n, total, _, stop = fill(lanes, batch, 1, cost, cost, budget, max_size, padded)
    if n >= max_size:
        return batch, "max_size", total
    return batch, None if stop == NOTHING_REFUSED else "budget", total
