"""``grouping="similar_cost"``: records in log-cost buckets, and how a batch is taken from them.

Buckets split costs on a log scale (``BUCKETS_PER_OCTAVE`` to each doubling:
records in one bucket differ by at most ~2%).  Each bucket keeps its records
in dispatch order (``Lanes`` of its own), and the head of the queue is the
first of the buckets' first records: a heap of them, ``tops``, with one
current entry per bucket (``listed``) and superseded ones that are skipped
when they surface.

A batch is the head record, always, then records from the buckets nearest to
its own, outward.  It costs O(batch * log P + buckets) to form, whatever the
depth of the queue.  A bucket that fits whole (by its entry count and its
largest cost pushed) is moved in one pass, lane by lane, with no record
weighed against the budget; the batch is sorted at the end either way.

Because every batch takes the head, a record with ``r`` live records ahead of
it is dispatched within ``r + 1`` batches, as in FIFO (records that come
ahead of it later, with a better priority, count in ``r``).

Owns: the buckets, the heap of their heads, and the similar-cost take.  Must
not touch: the queue's counts (``size``, ``full``, stale entries: ``_pending.py``).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._lanes import (
    BUDGET_MET,
    NOTHING_REFUSED,
    Lane,
    Lanes,
    Top,
    dispatch_order,
    fill,
    sort_by_key,
    sort_by_seq,
    take_all,
)

if TYPE_CHECKING:
    from ._record import Limit, Record

BUCKETS_PER_OCTAVE = 32
"""``grouping="similar_cost"``: cost buckets per doubling of cost (each ~2% wide)."""

INSIDE = 256  # entries of a bucket looked at behind a record that did not fit
_TOPS_SLACK = 64  # superseded entries in ``Buckets.tops`` tolerated, on top of one per bucket


def bucket_of(cost: int) -> int:
    """The index of the bucket a record of this cost joins."""
    return int(math.log2(cost + 1) * BUCKETS_PER_OCTAVE)


class Buckets:
    """The records of a ``grouping="similar_cost"`` queue, by cost bucket."""

    __slots__ = ("behind", "by_index", "nonempty", "order", "tops")

    def __init__(self) -> None:
        self.by_index: dict[int, Lanes] = {}
        self.nonempty: list[int] = []
        """Sorted indices of the buckets that may hold live records."""
        self.tops: list[Top] = []
        """``(key, seq, index)``: ``listed`` entries of the buckets, and superseded ones."""
        self.order = sort_by_seq
        """How a batch is sorted into dispatch order: by ``seq`` until a priority comes."""
        self.behind = 0
        """Records the last ``take`` took from inside a bucket: their entries stay behind, stale."""

    def push(self, rec: Record[Any], cost: int) -> None:
        if rec.key != rec.t:
            self.order = sort_by_key
        index = rec.bucket = bucket_of(cost)
        bucket = self.by_index.get(index)
        if bucket is None:
            bucket = self.by_index[index] = Lanes()
        if cost > bucket.top:
            bucket.top = cost
        if not bucket.fronts:  # listed unless a look at its front found it empty
            nonempty = self.nonempty
            at = bisect.bisect_left(nonempty, index)
            if at == len(nonempty) or nonempty[at] != index:
                nonempty.insert(at, index)
        bucket.push(rec)
        if bucket.fronts[0][1] == rec.seq:
            # The record comes first in its bucket: the bucket's entry in
            # ``tops`` must not be later than it.
            key, seq, listed = rec.key, rec.seq, bucket.listed
            if listed is None or listed[0] > key or (listed[0] == key and listed[1] > seq):
                bucket.listed = entry = (key, seq, index)
                heapq.heappush(self.tops, entry)
                if len(self.tops) > 2 * len(self.by_index) + _TOPS_SLACK:
                    self.relist()  # superseded entries that have not surfaced yet piled up

    def relist(self) -> None:
        """Rebuild ``tops`` with one entry per bucket."""
        tops: list[Top] = []
        for index, bucket in self.by_index.items():
            if bucket.fronts:
                key, seq, _ = bucket.fronts[0]  # never later than the bucket's first live record
                bucket.listed = entry = (key, seq, index)
                tops.append(entry)
            else:
                bucket.listed = None
        heapq.heapify(tops)
        self.tops = tops

    def compact(self) -> None:
        """Drop every stale entry, and the buckets left empty."""
        by_index = self.by_index
        for index in self.nonempty:
            by_index[index].compact()
        self.nonempty = [index for index in self.nonempty if by_index[index].fronts]
        self.by_index = {index: by_index[index] for index in self.nonempty}
        self.relist()

    def entries(self) -> int:
        """Entries held, stale ones included."""
        return sum(bucket.entries for bucket in self.by_index.values()) + len(self.tops)

    def __iter__(self) -> Iterator[Record[Any]]:
        """Every entry, stale ones included, bucket by bucket."""
        for index in self.nonempty:
            yield from self.by_index[index]

    def lanes_in_order(self) -> list[Lane]:
        """Every lane of every bucket, each in dispatch order (stale entries included)."""
        return [lane for bucket in self.by_index.values() for _, _, lane in bucket.fronts]

    def forget(self, rec: Record[Any]) -> None:
        """A queued record's future is done: its entry stays, stale, until it surfaces or a ``compact``."""

    def largest(self) -> int:
        """The largest live cost: in the top bucket that still holds a live record."""
        for index in reversed(self.nonempty):
            costs = [rec.cost for rec in self.by_index[index] if rec.queued]
            if costs:
                return max(costs)
        return 0

    def head(self) -> Record[Any] | None:
        """The head: the first of the buckets' first records (``tops`` put right on the way)."""
        tops, by_index = self.tops, self.by_index
        while tops:
            entry = tops[0]
            bucket = by_index[entry[2]]
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

    def take(
        self, budget: int, max_size: int, padded: bool, queued: int
    ) -> tuple[list[Record[Any]], Limit | None, int]:
        """The head, then the nearest buckets outward, each in dispatch order.

        ``queued`` is how many live records the queue holds.  Returns the
        batch (every record no longer queued), what closed it, and its total
        cost; ``behind`` then counts the records taken from inside a bucket.
        """
        head = self.head()
        assert head is not None
        nonempty, by_index = self.nonempty, self.by_index
        by_index[head.bucket].pop_head()
        head.queued = False
        self.behind = 0
        batch = [head]
        n, total, largest = 1, head.cost, head.cost
        full = total >= budget  # batch_cost(1, ...): one record's cost, padded or not
        where = head.bucket
        if by_index[where].head() is None:  # the head was all its bucket held
            nonempty.pop(bisect.bisect_left(nonempty, where))
        square = (head.cost + 1) ** 2  # for ties between two sides (see below)
        right = bisect.bisect_left(nonempty, where)  # the head's bucket, if it has more
        left = right - 1
        runs = 0  # buckets that gave records, each in dispatch order after the head
        lanewise = False  # a whole bucket of several lanes went lane after lane
        while not full and n < max_size:
            # The side whose next bucket is nearer on the log scale goes first.
            if right < len(nonempty):
                if left < 0:
                    go_right = True
                else:
                    to_right = nonempty[right] - where
                    to_left = where - nonempty[left]
                    go_right = to_right <= to_left
                    if to_right == to_left:
                        # As far in buckets: the nearer first record goes first.  The right one costs
                        # more than the head and the left one less, so |log(r+1) - log(h+1)| <=
                        # |log(h+1) - log(l+1)| is (r+1)(l+1) <= (h+1)^2, exactly.
                        r = by_index[nonempty[right]].head()
                        lf = by_index[nonempty[left]].head()
                        if r is not None and lf is not None:
                            go_right = (r.cost + 1) * (lf.cost + 1) <= square
            elif left >= 0:
                go_right = False
            else:
                break
            index = nonempty[right] if go_right else nonempty[left]
            bucket = by_index[index]
            before = n
            most = n + bucket.entries  # the batch's size if every entry were live and went
            top = bucket.top if bucket.top > largest else largest
            if most <= max_size and (most * top if padded else total + bucket.entries * bucket.top) <= budget:
                # The whole bucket fits: take it without weighing each record.
                lanewise = lanewise or len(bucket.fronts) > 1
                added, cost, big = take_all(bucket, batch)
                n, total, largest = n + added, total + cost, big if big > largest else largest
                stop = BUDGET_MET if (n * largest if padded else total) == budget else NOTHING_REFUSED
                emptied = True
            else:
                n, total, largest, stop = fill(bucket, batch, n, total, largest, budget, max_size, padded)
                emptied = False
            if stop >= 0 and n < max_size:
                # A record did not fit: later ones of its bucket may, a little smaller.
                # (Their entries stay in the lanes, stale.)
                lanes = [lane for _, _, lane in bucket.fronts]
                behind = lanes[0] if len(lanes) == 1 else heapq.merge(*lanes, key=dispatch_order)
                before_inside = n
                n, total, largest, full = fill_inside(behind, index, batch, n, total, largest, budget, max_size, padded)
                self.behind += n - before_inside
                # Padded, a record no larger than the largest adds ``largest``:
                # if it does not fit, nothing does.
                full = full or (padded and stop <= largest)
            elif stop == BUDGET_MET:
                full = True
            if n > before:
                runs += 1
            emptied = emptied or bucket.head() is None
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
        if runs > 1 or lanewise:
            self.order(batch)  # a merge of the runs, to hand the batch over in dispatch order
        if n >= max_size:
            return batch, "max_size", total
        return batch, "budget" if full or queued > n else None, total


def fill_inside(
    behind: Iterable[Record[Any]],
    index: int,
    batch: list[Record[Any]],
    n: int,
    total: int,
    largest: int,
    budget: int,
    max_size: int,
    padded: bool,
) -> tuple[int, int, int, bool]:
    """After a record of bucket ``index`` did not fit: add records of the bucket that do, in dispatch order.

    Costs in a bucket differ by up to ~2%, so a later record may fit where
    the first did not.  ``behind`` is the bucket's entries in dispatch order
    (stale ones are skipped); looks at up to ``2 * max_size + INSIDE`` of
    them, while the room left reaches into the bucket.  Returns ``n``,
    ``total`` and ``largest`` updated, and whether the budget is met
    (``budget`` and ``max_size``: this batch's limits).
    """
    room = budget // (n + 1) if padded else budget - total  # padded: for it and ``largest``
    if (padded and largest > room) or room < 0 or bucket_of(room) < index:
        return n, total, largest, False  # every cost in the bucket is above the room left
    for rec in itertools.islice(behind, 2 * max_size + INSIDE):
        cost = rec.cost
        if cost > room or not rec.queued:
            continue
        rec.queued = False
        batch.append(rec)
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
        if bucket_of(room) < index:
            break
    return n, total, largest, False
