"""``grouping="similar_cost"`` while the queue is short: one list sorted by cost bucket.

At a few records per cost bucket, buckets as objects of their own
(``_buckets.py``: a ``Lanes`` per bucket, a heap of their heads) cost more
than they save: making, walking and dropping them is most of a batch's cost.
Up to ``SHORT`` queued records, the queue keeps them instead in one list,
``row``, sorted by ``(bucket, key, seq)``: each bucket is a slice of it, in
dispatch order.  A batch is formed as ``Buckets.take`` forms it -- the head,
then the nearest buckets outward, a bucket whole when it fits (its costs
summed and maxed over the slice), else its records in dispatch order while
they fit and then ``fill_inside`` -- and the slice of the buckets it visited
is rebuilt without the records taken.  The head is found in ``lanes``, every
queued record in dispatch order (``_lanes.py``).

``row`` holds only queued records: a forgotten one is removed at once (O(n),
n <= ``SHORT``).  ``lanes`` keep taken and forgotten records as stale entries
until they reach a lane's front, and are rebuilt once stale entries outnumber
the live ones by ``_SLACK``.

Owns: the short queue's list and how a batch is taken from it.  ``Pending``
moves a queue that grows past ``SHORT`` records into ``Buckets``
(``to_buckets``), and starts a ``Row`` again when the queue empties.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from ._buckets import INSIDE, Buckets, bucket_of, fill_inside
from ._lanes import (
    BUDGET_MET,
    NOTHING_REFUSED,
    Lane,
    Lanes,
    dispatch_order,
    sort_by_key,
    sort_by_seq,
    submission_order,
)

if TYPE_CHECKING:
    from ._record import Limit, Record

SHORT = 2048
"""The most queued records a ``Row`` holds; ``Pending`` reads it when it is made."""

_SLACK = 1024  # stale entries in ``lanes`` tolerated, on top of one per queued record
_cost: Callable[[Record[Any]], int] = attrgetter("cost")
_bucket: Callable[[Record[Any]], int] = attrgetter("bucket")


class Row:
    """The records of a short ``grouping="similar_cost"`` queue, sorted by ``(bucket, key, seq)``."""

    __slots__ = ("behind", "buckets", "lanes", "order", "row")

    def __init__(self) -> None:
        self.row: list[Record[Any]] = []
        self.buckets: list[int] = []
        """``row[i].bucket``, to bisect."""
        self.lanes = Lanes()
        self.order = sort_by_seq
        """How a batch is sorted into dispatch order: by ``seq`` until a priority comes."""
        self.behind = 0
        """As ``Buckets.behind``; always 0 (``lanes`` are kept in bounds here)."""

    def push(self, rec: Record[Any], cost: int) -> None:
        index = rec.bucket = bucket_of(cost)
        buckets = self.buckets
        at = bisect.bisect_right(buckets, index)  # after its bucket: records come in submission order
        if rec.key != rec.t:
            self.order = sort_by_key
        if self.order is sort_by_key:  # a better priority may go ahead of records of its bucket
            start = bisect.bisect_left(buckets, index, 0, at)
            at = bisect.bisect_right(self.row, (rec.key, rec.seq), start, at, key=dispatch_order)
        self.row.insert(at, rec)
        buckets.insert(at, index)
        self.lanes.push(rec)

    def forget(self, rec: Record[Any]) -> None:
        """Remove a queued record whose future is done."""
        buckets = self.buckets
        start = bisect.bisect_left(buckets, rec.bucket)
        at = self.row.index(rec, start, bisect.bisect_right(buckets, rec.bucket, start))
        del self.row[at]
        del buckets[at]
        self._tidy()

    def _tidy(self) -> None:
        if self.lanes.entries > 2 * len(self.row) + _SLACK:
            self.lanes.compact()

    def compact(self) -> None:
        """Drop every stale entry."""
        self.lanes.compact()

    def entries(self) -> int:
        """Entries held, stale ones included."""
        return self.lanes.entries + len(self.row)

    def __iter__(self) -> Iterator[Record[Any]]:
        """Every queued record, bucket by bucket."""
        return iter(self.row)

    def lanes_in_order(self) -> list[Lane]:
        """Lanes of every entry, each in dispatch order (stale entries included)."""
        return [lane for _, _, lane in self.lanes.fronts]

    def largest(self) -> int:
        """The largest queued cost: in the last bucket of ``row``."""
        if not self.row:
            return 0
        return max(map(_cost, self.row[bisect.bisect_left(self.buckets, self.buckets[-1]) :]))

    def head(self) -> Record[Any] | None:
        return self.lanes.head()

    def to_buckets(self) -> Buckets:
        """The same records in ``Buckets``, pushed again in submission order."""
        buckets = Buckets()
        for rec in sorted(self.row, key=submission_order):
            buckets.push(rec, rec.cost)
        return buckets

    def take(
        self, budget: int, max_size: int, padded: bool, queued: int
    ) -> tuple[list[Record[Any]], Limit | None, int]:
        """As ``Buckets.take``: the head, then the nearest buckets outward, each in dispatch order.

        No step looks at more than ``2 * max_size + INSIDE`` records of the
        list, however many a bucket holds.
        """
        head = self.lanes.head()
        assert head is not None
        self.lanes.pop_head()
        head.queued = False
        batch = [head]
        n, total, largest = 1, head.cost, head.cost
        full = total >= budget  # batch_cost(1, ...): one record's cost, padded or not
        row, buckets = self.row, self.buckets
        where = head.bucket
        first = left = right = bisect.bisect_left(buckets, where)  # the head's bucket starts there, with the head
        assert row[first] is head  # the first of its bucket, as it is the first of the whole queue
        taken = [(first, first + 1)]  # slices of ``row`` the batch's records came from
        square = (head.cost + 1) ** 2  # ties between the two sides, as in Buckets.take
        runs = 0  # buckets that gave records
        # The buckets near the head's that fit whole, all of them, found by bisection: they are
        # the ones the walk below would take first, each whole.
        reach, start, end = _reach(row, buckets, head, budget, max_size, padded) if not full else (-1, 0, 0)
        if reach >= 0:
            part = row[start:first] + row[first + 1 : end]
            for rec in part:
                rec.queued = False
            batch += part
            n += len(part)
            total += sum(map(_cost, part))
            top = max(map(_cost, part), default=0)
            if top > largest:
                largest = top
            runs = 2 if reach else 1  # more than the head's bucket: sorted at the end
            left, right = start, end
            taken = [(start, end)]  # the head's among them
        while not full and n < max_size:
            if right < len(row):
                go_right = True
                if left > 0:
                    to_right = buckets[right] - where
                    to_left = where - buckets[left - 1]
                    go_right = to_right <= to_left
                    if to_right == to_left:
                        first_left = row[bisect.bisect_left(buckets, buckets[left - 1], 0, left)]
                        go_right = (row[right].cost + 1) * (first_left.cost + 1) <= square
            elif left > 0:
                go_right = False
            else:
                break
            if go_right:
                index = buckets[right]
                start, end = right, bisect.bisect_right(buckets, index, right)
                right = end
            else:
                index = buckets[left - 1]
                start, end = bisect.bisect_left(buckets, index, 0, left), left
                left = start
            if index == where:
                start += 1  # past the head
            most = n + end - start
            if most == n:
                continue
            before = n
            whole, new_largest = total, largest  # if the whole bucket went
            if most <= max_size:
                bucket = row[start:end]
                top = max(map(_cost, bucket))
                whole += sum(map(_cost, bucket))
                if top > new_largest:
                    new_largest = top
                fits = (most * new_largest if padded else whole) <= budget
            else:
                # Too many to fit whole: what ``fill`` and ``fill_inside`` may look at.
                bucket = row[start : min(end, start + 2 * max_size + INSIDE)]
                fits = False
            if fits:
                # The whole bucket fits: take it without weighing each record.
                for rec in bucket:
                    rec.queued = False
                batch += bucket
                n, total, largest = most, whole, new_largest
                stop = BUDGET_MET if (n * largest if padded else total) == budget else NOTHING_REFUSED
            else:
                n, total, largest, stop = _prefix(bucket, batch, n, total, largest, budget, max_size, padded)
            looked = n - before  # a prefix of ``bucket`` went, unless fill_inside looks further
            if stop >= 0 and n < max_size:
                # A record did not fit: later ones of its bucket may, a little smaller.
                n, total, largest, full = fill_inside(bucket, index, batch, n, total, largest, budget, max_size, padded)
                full = full or (padded and stop <= largest)
                looked = len(bucket)
            elif stop == BUDGET_MET:
                full = True
            if n > before:
                runs += 1
                taken.append((start, start + looked))
            if go_right and stop >= head.cost:
                right = len(row)  # costs only grow to the right: nothing more fits there
        # The records taken leave the list, slice by slice from the right (each slice is short).
        for start, end in sorted(taken, reverse=True):
            kept = [rec for rec in row[start:end] if rec.queued]
            if len(kept) < end - start:
                row[start:end] = kept
                buckets[start:end] = map(_bucket, kept)
        self._tidy()
        if runs > 1:
            self.order(batch)  # a merge of the runs, to hand the batch over in dispatch order
        if n >= max_size:
            return batch, "max_size", total
        return batch, "budget" if full or queued > n else None, total


def _prefix(
    bucket: list[Record[Any]],
    batch: list[Record[Any]],
    n: int,
    total: int,
    largest: int,
    budget: int,
    max_size: int,
    padded: bool,
) -> tuple[int, int, int, int]:
    """Move records of ``bucket`` (in dispatch order) to ``batch`` while they fit, as ``fill`` does with lanes.

    Returns ``n``, ``total`` and ``largest`` updated, and why it stopped: the
    cost of the record that did not fit, ``BUDGET_MET``, or ``NOTHING_REFUSED``.
    """
    for rec in bucket:
        if n >= max_size:
            break
        cost = rec.cost
        new_largest = cost if cost > largest else largest
        counted = (n + 1) * new_largest if padded else total + cost
        if counted > budget:
            return n, total, largest, cost
        rec.queued = False
        batch.append(rec)
        n, total, largest = n + 1, total + cost, new_largest
        if counted == budget:
            return n, total, largest, BUDGET_MET
    return n, total, largest, NOTHING_REFUSED


def _reach(
    row: list[Record[Any]], buckets: list[int], head: Record[Any], budget: int, max_size: int, padded: bool
) -> tuple[int, int, int]:
    """The largest ``reach`` such that every record of the buckets within ``reach`` of the head's fits
    with it, below the budget; and their slice of ``row`` (the head in it): ``(reach, start, end)``.

    ``(-1, 0, 0)`` when not even the head's bucket fits whole.  Fitting only
    shrinks as the reach grows, so it is found by bisection: O(log(buckets)) probes,
    each two bisects and a look at one bucket (padded) or a sum over the slice.
    """
    where, cost = head.bucket, head.cost
    low, high = -1, max(where - buckets[0], buckets[-1] - where) + 1  # fits at ``low``, not at ``high``
    found = (0, 0)
    while high - low > 1:
        reach = (low + high) // 2
        start = bisect.bisect_left(buckets, where - reach)
        end = bisect.bisect_right(buckets, where + reach, start)
        most = end - start  # the head among them
        if most > max_size:
            high = reach
            continue
        if padded:
            last = bisect.bisect_left(buckets, buckets[end - 1], start, end)
            top = max(map(_cost, row[last:end]))
            counted = most * (top if top > cost else cost)
        else:
            counted = sum(map(_cost, row[start:end]))
        if counted < budget:
            low, found = reach, (start, end)
        else:
            high = reach
    return low, found[0], found[1]
