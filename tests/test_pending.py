"""The queue and how batches are taken from it, checked directly on ``Pending``.

``similar_cost`` is checked against a simple oracle kept here: sort the whole
queue by distance from the head record on a log scale and take greedily what
fits.  The queue's bucketed take must keep the head, the budget and the size
limit, and be as tight as the oracle within one bucket width.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenbatcher._buckets
from tokenbatcher._lanes import Lanes
from tokenbatcher._pending import BUCKETS_PER_OCTAVE, Pending, Record, batch_cost
from tokenbatcher._row import SHORT, Row

WIDTH = 1 / BUCKETS_PER_OCTAVE  # one bucket, in log2 units
SHORTS = st.sampled_from([0, 5, SHORT])
"""``similar_cost`` queues kept in ``Buckets`` from the start, moved there at 6 records, or in a ``Row``."""


def _hook(rec: Record[Any]) -> None:
    pass


def make_records(
    loop: asyncio.AbstractEventLoop, costs: list[int], priorities: list[int] | None = None
) -> list[Record[Any]]:
    records: list[Record[Any]] = []
    for seq, cost in enumerate(costs):
        rec: Record[Any] = Record(loop=loop)
        rec.item, rec.cost, rec.t, rec.seq, rec.hook, rec.waiting = seq, cost, float(seq), seq, _hook, True
        rec.key = rec.t + (priorities[seq] if priorities else 0) * 3.0
        records.append(rec)
    return records


def dist(cost: int, head: int) -> float:
    return abs(math.log2(cost + 1) - math.log2(head + 1))


def oracle(queue: list[Record[Any]], budget: int, max_size: int, padded: bool) -> list[Record[Any]]:
    """Head first, then the whole queue by distance from it, greedily while it fits."""
    head = min(queue)
    batch = [head]
    total = largest = head.cost
    rest = sorted((r for r in queue if r is not head), key=lambda r: (dist(r.cost, head.cost), r.key, r.seq))
    for rec in rest:
        if len(batch) >= max_size or batch_cost(len(batch), total, largest, padded) >= budget:
            break
        new_largest = max(largest, rec.cost)
        if batch_cost(len(batch) + 1, total + rec.cost, new_largest, padded) <= budget:
            batch.append(rec)
            total, largest = total + rec.cost, new_largest
    return batch


def check_tight(
    batch: list[Record[Any]],
    left: list[Record[Any]],
    expected: list[Record[Any]],
    head: Record[Any],
    budget: int,
    padded: bool,
) -> None:
    """The batch is as tight as the oracle's, within a bucket width.

    No record left behind that is nearer to the head than the batch's
    farthest record, by more than two bucket widths, would still have fitted
    the budget (in place of that farthest one, if the batch is at its size
    limit).  Where the budget does not bind, the batch's records are rank by
    rank as near as the oracle's, two bucket widths given.  (Where it binds,
    the oracle can differ more: taking 60 or 59 tokens from one bucket
    changes what fits after.)
    """
    size, total, largest = len(batch), sum(r.cost for r in batch), max(r.cost for r in batch)
    if batch_cost(size, total, largest, padded) >= budget:
        return  # complete: the oracle stops there too
    far = max(dist(r.cost, head.cost) for r in batch)
    for rec in left:
        if dist(rec.cost, head.cost) < far - 2 * WIDTH:
            counted = batch_cost(size + 1, total + rec.cost, max(largest, rec.cost), padded)
            assert counted > budget, f"cost {rec.cost} left behind, nearer than {far:.3f} and fitting"
    everything = batch + left
    if batch_cost(len(everything), sum(r.cost for r in everything), max(r.cost for r in everything), padded) <= budget:
        ours = sorted(dist(r.cost, head.cost) for r in batch)
        theirs = sorted(dist(r.cost, head.cost) for r in expected)
        assert len(ours) == len(theirs)
        for mine, best in zip(ours, theirs, strict=True):
            assert mine <= best + 2 * WIDTH, (ours, theirs)


COSTS = st.lists(st.integers(0, 5000) | st.integers(1, 64), min_size=1, max_size=300)


@settings(max_examples=300, deadline=None)
@given(
    costs=COSTS,
    budget=st.integers(1, 20_000),
    max_size=st.integers(1, 64),
    padded=st.booleans(),
    with_priorities=st.booleans(),
    seed=st.randoms(use_true_random=False),
    short=SHORTS,
)
def test_similar_take_keeps_head_budget_size_and_is_as_tight_as_the_oracle(
    costs: list[int], budget: int, max_size: int, padded: bool, with_priorities: bool, seed: Any, short: int
) -> None:
    loop = asyncio.new_event_loop()
    try:
        priorities = [seed.randint(-2, 2) for _ in costs] if with_priorities else None
        records = make_records(loop, costs, priorities)
        pending = Pending(budget=budget, max_size=max_size, padded=padded, similar=True, short=short)
        for rec in records:
            pending.push(rec)
        queue = list(records)
        while queue:
            expected = oracle(queue, budget, max_size, padded)
            batch, _ = pending.take()
            head = min(queue)
            assert head in batch, "the head record always goes"
            assert len(batch) <= max_size
            cost = batch_cost(len(batch), sum(r.cost for r in batch), max(r.cost for r in batch), padded)
            assert cost <= budget or len(batch) == 1, "hard budget"
            assert batch == sorted(batch), "a batch is handed over in dispatch order"
            taken = set(map(id, batch))
            queue = [r for r in queue if id(r) not in taken]
            check_tight(batch, queue, expected, head, budget, padded)
            assert pending.size == len(queue)
    finally:
        loop.close()


@pytest.mark.parametrize("similar", [False, True])
@pytest.mark.parametrize("priorities", [False, True])
def test_forgotten_records_free_their_place_at_once_and_stale_entries_are_bounded(
    similar: bool, priorities: bool
) -> None:
    loop = asyncio.new_event_loop()
    try:
        pending = Pending(budget=10**9, max_size=256, padded=False, similar=similar)
        levels = [i % 3 for i in range(20_000)] if priorities else None
        records = make_records(loop, [i % 700 for i in range(20_000)], levels)
        for rec in records:
            pending.push(rec)
        for rec in records[:19_990]:
            rec.cancel()
            pending.forget(rec)
        assert pending.size == 10
        # rebuilds ran: what is stored is proportional to the live records
        structures = 2 if similar else 1  # the dispatch order, and the cost buckets
        assert pending._entries() <= structures * (2 * 10 + 1024 + 1)
        batch, _ = pending.take()
        assert batch == sorted(records[19_990:])
        assert pending.size == 0
    finally:
        loop.close()


@pytest.mark.parametrize("similar", [False, True])
def test_records_taken_and_forgotten_in_any_mix_are_each_taken_once(similar: bool) -> None:
    loop = asyncio.new_event_loop()
    try:
        pending = Pending(budget=3000, max_size=16, padded=True, similar=similar)
        records = make_records(loop, [(i * 37) % 500 for i in range(5000)], [(i * 7) % 3 - 1 for i in range(5000)])
        seen: list[int] = []
        for i, rec in enumerate(records):
            pending.push(rec)
            if i % 3 == 0 and records[i // 2].queued:
                records[i // 2].cancel()
                pending.forget(records[i // 2])
            if i % 5 == 0:
                seen += [r.item for r in pending.take()[0]]
        while pending.size:
            seen += [r.item for r in pending.take()[0]]
        forgotten = {r.item for r in records if r.cancelled()}
        assert len(seen) == len(set(seen)), "no record is taken twice"
        assert not forgotten & set(seen), "no forgotten record is taken"
        assert set(seen) | forgotten == set(range(5000)), "every record is taken or forgotten"
    finally:
        loop.close()


def live_entries(pending: Pending) -> int:
    """Entries actually held (stale ones included), counted the slow way; checks the counters."""
    if pending._similar:
        structure = pending._buckets
        if isinstance(structure, Row):
            assert structure.lanes.entries == sum(1 for _ in structure.lanes)
            return structure.lanes.entries  # ``row`` holds the live records only (check_bucket_heads)
        held = 0
        for bucket in structure.by_index.values():
            assert bucket.entries == sum(len(lane) for _, _, lane in bucket.fronts)
            held += bucket.entries
        return held
    if pending._lanes is not None:
        assert pending._lanes.entries == sum(1 for _ in pending._lanes)
        return pending._lanes.entries
    return len(pending._fifo)


def fills_a_batch(queue: list[Record[Any]], budget: int, max_size: int, padded: bool) -> bool:
    """``Pending.full``: the queued records could not go as one batch (or would use all of it)."""
    if not queue:
        return False
    size, total, largest = len(queue), sum(r.cost for r in queue), max(r.cost for r in queue)
    return size >= max_size or batch_cost(size, total, largest, padded) >= budget


def fifo_oracle(queue: list[Record[Any]], budget: int, max_size: int, padded: bool) -> list[Record[Any]]:
    """grouping="fifo": the head, then records in dispatch order until the next does not fit."""
    ordered = sorted(queue)
    batch = ordered[:1]
    total = largest = ordered[0].cost
    for rec in ordered[1:]:
        if len(batch) >= max_size or batch_cost(len(batch), total, largest, padded) >= budget:
            break
        new_largest = max(largest, rec.cost)
        if batch_cost(len(batch) + 1, total + rec.cost, new_largest, padded) > budget:
            break
        batch.append(rec)
        total, largest = total + rec.cost, new_largest
    return batch


# One step on a queue: push a record (cost, priority, clock advance), forget a queued one, or take a batch.
STEPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("push"),
            st.integers(0, 400) | st.integers(0, 5000),
            st.integers(-3, 3),
            st.sampled_from([0.0, 0.0, 0.1, 1.0]),
        ),
        st.tuples(st.just("forget"), st.integers(0, 10**6), st.just(0), st.just(0.0)),
        st.tuples(st.just("take"), st.just(0), st.just(0), st.just(0.0)),
    ),
    max_size=400,
)


@settings(max_examples=300, deadline=None)
@given(
    steps=STEPS,
    budget=st.integers(1, 20_000),
    max_size=st.integers(1, 64),
    padded=st.booleans(),
    aging=st.sampled_from([0.0, 0.1, 0.3, 1.0, 3.0]),
    start=st.sampled_from([0.0, 0.001, 12_345.678]),
)
def test_fifo_batches_come_in_dispatch_order_with_priorities_and_forgets(
    steps: list[tuple[str, int, int, float]],
    budget: int,
    max_size: int,
    padded: bool,
    aging: float,
    start: float,
) -> None:
    """With grouping="fifo", each batch is the queue's longest fitting prefix in ``(key, seq)`` order.

    Records come as the batcher makes them (``key = t + priority * aging``, ``t``
    never going back), priorities switch the queue to lanes and back when it
    empties, and forgotten records never come out.  ``full`` tells whether the
    queue fills a batch, the counters of held entries are right, and what is
    held stays proportional to the live records.
    """
    loop = asyncio.new_event_loop()
    try:
        pending = Pending(budget=budget, max_size=max_size, padded=padded, similar=False)
        queue: list[Record[Any]] = []
        now, seq = start, 0
        forgot_since_take = False
        for op, value, priority, advance in steps:
            if op == "push":
                now += advance
                seq += 1
                rec: Record[Any] = Record(loop=loop)
                rec.item, rec.cost, rec.t, rec.seq, rec.hook, rec.waiting = seq, value, now, seq, _hook, True
                rec.key = now + priority * aging if priority else now
                pending.push(rec)
                queue.append(rec)
            elif op == "forget" and queue:
                rec = queue.pop(value % len(queue))
                rec.cancel()
                pending.forget(rec)
                assert not rec.queued
                forgot_since_take = True
            elif op == "take":
                expected = fifo_oracle(queue, budget, max_size, padded) if queue else []
                batch, limit = pending.take()
                assert batch == expected
                assert all(not r.queued for r in batch)
                taken = set(map(id, batch))
                queue = [r for r in queue if id(r) not in taken]
                if len(batch) >= max_size:
                    assert limit == "max_size"
                elif batch and len(queue) and limit is None:
                    pytest.fail("records were left although the batch was not full")
                forgot_since_take = False
            assert pending.size == len(queue)
            if not forgot_since_take:  # a forget may leave ``full`` stale until the next take
                assert pending.full == fills_a_batch(queue, budget, max_size, padded)
            assert live_entries(pending) <= 2 * len(queue) + 1024 + 1
        assert pending.oldest_time() == min(queue).t if queue else pending.size == 0
        everything = pending.clear()
        assert everything == sorted(queue)
        assert pending.size == 0
        assert not pending.full
    finally:
        loop.close()


def test_lanes_stay_sorted_when_records_of_one_priority_come_out_of_order() -> None:
    """A clock that goes back: a record that would break its lane's order opens a lane of its own."""
    loop = asyncio.new_event_loop()
    try:
        lanes = Lanes()
        times = [5.0, 4.0, 4.5, 1.0, 7.0, 7.0, 2.0, 6.0]
        records = make_records(loop, [1] * len(times), [1] * len(times))
        for rec, t in zip(records, times, strict=True):
            rec.t, rec.key = t, t + 3.0  # one priority: one offset
            rec.queued = True
            lanes.push(rec)
        assert len(lanes.fronts) > 1
        records[2].queued = False  # forgotten
        out: list[Record[Any]] = []
        while (rec := lanes.head()) is not None:
            lanes.pop_head()
            out.append(rec)
        assert out == sorted(r for r in records if r is not records[2])
        assert lanes.entries == 0
        assert not lanes.fronts
    finally:
        loop.close()


def check_bucket_heads(pending: Pending) -> None:
    """Every bucket that holds a live record is listed in ``tops`` no later than its first one;
    in a ``Row``, the row is every live record, sorted by (bucket, key, seq)."""
    structure = pending._buckets
    if isinstance(structure, Row):
        assert all(rec.queued for rec in structure.row)
        assert len(structure.row) == pending.size
        assert structure.row == sorted(structure.row, key=lambda r: (r.bucket, r.key, r.seq))
        assert structure.buckets == [rec.bucket for rec in structure.row]
        return
    tops = {id(entry) for entry in structure.tops}
    for index, bucket in structure.by_index.items():
        assert bucket.listed is None or id(bucket.listed) in tops
        live = [rec for rec in bucket if rec.queued]
        if live:
            assert index in structure.nonempty
            first = min(live)
            assert any(e[2] == index and (e[0], e[1]) <= (first.key, first.seq) for e in structure.tops)


# The random queues that the step-driven similar_cost tests run.
SIMILAR_QUEUES: dict[str, Any] = {
    "steps": STEPS,
    "budget": st.integers(1, 20_000),
    "max_size": st.integers(1, 64),
    "padded": st.booleans(),
    "aging": st.sampled_from([0.0, 0.1, 1.0, 3.0]),
}


@settings(max_examples=300, deadline=None)
@given(
    **SIMILAR_QUEUES,
    relist_often=st.booleans(),
    short=SHORTS,
)
def test_similar_take_with_pushes_forgets_and_priorities_between_batches(
    steps: list[tuple[str, int, int, float]],
    budget: int,
    max_size: int,
    padded: bool,
    aging: float,
    relist_often: bool,
    short: int,
) -> None:
    """grouping="similar_cost" while records come and go.

    The head (in ``(key, seq)`` order) always goes, budget and size hold, a
    batch is in dispatch order and as tight as the oracle's, forgotten records
    never come out, and a record goes within ``r + 1`` batches, ``r`` the live
    records ahead of it (those that come ahead later count too).  With
    ``relist_often``, the heap of bucket heads is rebuilt at each new entry.
    """
    loop = asyncio.new_event_loop()
    slack = -(10**9) if relist_often else tokenbatcher._buckets._TOPS_SLACK
    with mock.patch.object(tokenbatcher._buckets, "_TOPS_SLACK", slack):
        try:
            run_similar_steps(loop, steps, budget, max_size, padded, aging, short)
        finally:
            loop.close()


def run_similar_steps(
    loop: asyncio.AbstractEventLoop,
    steps: list[tuple[str, int, int, float]],
    budget: int,
    max_size: int,
    padded: bool,
    aging: float,
    short: int = SHORT,
) -> None:
    """The steps of the test above, on a fresh ``Pending``."""
    pending = Pending(budget=budget, max_size=max_size, padded=padded, similar=True, short=short)
    queue: list[Record[Any]] = []
    ahead: dict[int, int] = {}  # id(record) -> batches it may still wait
    now, seq = 0.0, 0
    forgot_since_take = False
    for op, value, priority, advance in steps:
        if op == "push":
            now += advance
            seq += 1
            rec: Record[Any] = Record(loop=loop)
            rec.item, rec.cost, rec.t, rec.seq, rec.hook, rec.waiting = seq, value, now, seq, _hook, True
            rec.key = now + priority * aging if priority else now
            pending.push(rec)
            for r in queue:  # a record with a better priority goes ahead of later ones
                if rec < r:
                    ahead[id(r)] += 1
            ahead[id(rec)] = sum(1 for r in queue if r < rec) + 1
            queue.append(rec)
        elif op == "forget" and queue:
            rec = queue.pop(value % len(queue))
            rec.cancel()
            pending.forget(rec)
            forgot_since_take = True
        elif op == "take":
            batch, _ = pending.take()
            if not queue:
                assert batch == []
                continue
            head = min(queue)
            expected = oracle(queue, budget, max_size, padded)
            assert head in batch, "the head record always goes"
            assert len(batch) <= max_size
            cost = batch_cost(len(batch), sum(r.cost for r in batch), max(r.cost for r in batch), padded)
            assert cost <= budget or len(batch) == 1, "hard budget"
            assert batch == sorted(batch), "a batch is handed over in dispatch order"
            assert all(r in queue for r in batch), "only queued records come out"
            taken = set(map(id, batch))
            queue = [r for r in queue if id(r) not in taken]
            check_tight(batch, queue, expected, head, budget, padded)
            for r in queue:
                ahead[id(r)] -= 1
                assert ahead[id(r)] >= 1, "r + 1 bound"
            forgot_since_take = False
        assert pending.size == len(queue)
        if not forgot_since_take:
            assert pending.full == fills_a_batch(queue, budget, max_size, padded)
        assert live_entries(pending) <= 2 * len(queue) + 1024 + 1
        check_bucket_heads(pending)
    assert pending.oldest_time() == min(queue).t if queue else pending.size == 0
    assert pending.clear() == sorted(queue)


@settings(max_examples=200, deadline=None)
@given(**SIMILAR_QUEUES)
def test_a_row_and_buckets_form_the_same_batches(
    steps: list[tuple[str, int, int, float]], budget: int, max_size: int, padded: bool, aging: float
) -> None:
    """The short queue's list (``Row``) is a faster layout of the same buckets, not another policy:
    fed the same records, forgets and takes, it hands over exactly the batches ``Buckets`` does."""
    loop = asyncio.new_event_loop()
    try:
        row = Pending(budget=budget, max_size=max_size, padded=padded, similar=True, short=SHORT)
        buckets = Pending(budget=budget, max_size=max_size, padded=padded, similar=True, short=0)
        queued: list[tuple[Record[Any], Record[Any]]] = []
        now = 0.0
        for seq, (op, value, priority, advance) in enumerate(steps):
            if op == "push":
                now += advance
                pair = []
                for pending in (row, buckets):
                    rec: Record[Any] = Record(loop=loop)
                    rec.item, rec.cost, rec.t, rec.seq, rec.hook, rec.waiting = seq, value, now, seq, _hook, True
                    rec.key = now + priority * aging if priority else now
                    pending.push(rec)
                    pair.append(rec)
                queued.append((pair[0], pair[1]))
            elif op == "forget" and queued:
                for rec, pending in zip(queued.pop(value % len(queued)), (row, buckets), strict=True):
                    rec.cancel()
                    pending.forget(rec)
            elif op == "take":
                (a, limit_a), (b, limit_b) = row.take(), buckets.take()
                assert [r.item for r in a] == [r.item for r in b]
                assert limit_a == limit_b
                taken = {r.item for r in a}
                queued = [pair for pair in queued if pair[0].item not in taken]
            assert isinstance(row._buckets, Row)
            assert row.size == buckets.size == len(queued)
            assert row.full == buckets.full
    finally:
        loop.close()


@pytest.mark.parametrize("padded", [False, True])
def test_a_row_and_buckets_agree_on_large_buckets(padded: bool) -> None:
    """1,500 records in four large buckets, batches of up to 64: the row looks at a bounded
    window of a bucket, yet forms the batches ``Buckets`` forms, look-behind included."""
    loop = asyncio.new_event_loop()
    try:
        costs = [(100, 101, 102, 150, 151)[(i * 7) % 5] for i in range(1_500)]
        queues = [Pending(budget=6_500, max_size=64, padded=padded, similar=True, short=short) for short in (SHORT, 0)]
        for pending in queues:
            for rec in make_records(loop, costs, [(i * 3) % 4 - 1 for i in range(1_500)]):
                pending.push(rec)
        assert isinstance(queues[0]._buckets, Row)
        while queues[0].size:
            (a, _), (b, _) = (pending.take() for pending in queues)
            assert [r.item for r in a] == [r.item for r in b]
        assert queues[1].size == 0
    finally:
        loop.close()


@pytest.mark.parametrize("short", [0, SHORT])
def test_the_look_behind_reaches_past_max_size_records_of_a_bucket(short: int) -> None:
    """After 102 + 102 + 102, a fourth 102 would cross a budget of 406; 200 records on, a 100
    (the same ~2% bucket) still fits.  Looking behind reaches 2 * max_size + 256 records."""
    loop = asyncio.new_event_loop()
    try:
        pending = Pending(budget=406, max_size=64, padded=False, similar=True, short=short)
        for rec in make_records(loop, [102] * 200 + [100] + [102] * 50):
            pending.push(rec)
        batch, limit = pending.take()
        assert [rec.item for rec in batch] == [0, 1, 2, 200]
        assert limit == "budget"
    finally:
        loop.close()


@pytest.mark.parametrize("short", [0, SHORT])
def test_similar_take_breaks_a_tie_in_buckets_by_the_nearer_cost(short: int) -> None:
    """The buckets on either side of the head's are as far from it in buckets (317 and 319
    around 318): the one whose first cost is nearer on the log scale goes first."""
    loop = asyncio.new_event_loop()
    try:
        for costs, nearer in (([981, 1022, 979], 979), ([1001, 1002, 960], 1002)):
            pending = Pending(budget=10**6, max_size=2, padded=False, similar=True, short=short)
            for rec in make_records(loop, costs):
                pending.push(rec)
            assert [tokenbatcher._buckets.bucket_of(c) for c in costs] == [318, 319, 317]
            batch, _ = pending.take()
            assert [rec.cost for rec in batch] == [costs[0], nearer]
    finally:
        loop.close()


def test_similar_heap_of_bucket_heads_stays_small_when_better_priorities_keep_coming() -> None:
    """A record of a better priority that comes first in its bucket lists the bucket
    again in the heap of bucket heads; the entries it supersedes do not pile up,
    even while a record of a worse priority waits in that bucket all along."""
    loop = asyncio.new_event_loop()
    try:
        pending = Pending(budget=10**6, max_size=1, padded=False, similar=True, short=0)
        records = make_records(loop, [10] * 4000, [3, -3] * 2000)  # one cost bucket
        for rec in records:
            rec.t = rec.seq * 0.001
            rec.key = rec.t + (9.0 if rec.seq % 2 == 0 else -9.0)
        for low, high in zip(records[::2], records[1::2], strict=True):
            pending.push(low)
            pending.push(high)  # first in its bucket: listed anew
            assert pending.take()[0] == [high]
            assert pending.oldest_time() == records[0].t  # the oldest low-priority record is the head now
            assert len(pending._buckets.tops) <= 2 * len(pending._buckets.nonempty) + 64
        assert pending.size == 2000
    finally:
        loop.close()


@pytest.mark.parametrize("similar", [False, True])
def test_equal_keys_go_in_submission_order_across_priorities(similar: bool) -> None:
    """A key shared by records of two priorities: the one accepted first goes first."""
    loop = asyncio.new_event_loop()
    try:
        pending = Pending(budget=10**6, max_size=256, padded=False, similar=similar)
        # (t, priority) with aging 1: keys 1, 0, 1, 2, 1 (seq 0..4)
        records = make_records(loop, [5] * 5)
        for rec, (t, priority) in zip(records, [(0.0, 1), (0.0, 0), (1.0, 0), (1.0, 1), (1.0, 0)], strict=True):
            rec.t, rec.key = t, t + priority
            pending.push(rec)
        batch, _ = pending.take()
        assert [r.item for r in batch] == [1, 0, 2, 4, 3]
    finally:
        loop.close()


@pytest.mark.parametrize("forgotten", [None, *range(8)])
@pytest.mark.parametrize("max_size", [2, 3, 8])
def test_interleaved_priorities_merge_in_dispatch_order_around_forgotten_records(
    forgotten: int | None, max_size: int
) -> None:
    """Two lanes whose records alternate in dispatch order (an aged priority 1 and a fresh
    priority 0), and a third lane after them: batches take them merged, skip a forgotten one
    wherever it sits, and take the last record of a lane too."""
    loop = asyncio.new_event_loop()
    try:
        pending = Pending(budget=10**6, max_size=max_size, padded=False, similar=False)
        # (t, priority) with aging 1, in submission order: keys 2.0, 1.1, 1.3, 1.5, 1.0, 1.2, 1.4, 1.6
        arrivals = [(0.0, 2), (0.1, 1), (0.3, 1), (0.5, 1), (1.0, 0), (1.2, 0), (1.4, 0), (1.6, 0)]
        records = make_records(loop, [5] * len(arrivals))
        for rec, (t, priority) in zip(records, arrivals, strict=True):
            rec.t, rec.key = t, t + priority
            pending.push(rec)
        if forgotten is not None:
            records[forgotten].cancel()
            pending.forget(records[forgotten])
        taken: list[int] = []
        while pending.size:
            batch, _ = pending.take()
            assert 1 <= len(batch) <= max_size
            taken += [rec.item for rec in batch]
        expected = [item for item in (4, 1, 5, 2, 6, 3, 7, 0) if item != forgotten]
        assert taken == expected
    finally:
        loop.close()


@pytest.mark.parametrize("padded", [False, True])
def test_similar_take_looks_behind_a_record_that_did_not_fit_in_its_bucket(padded: bool) -> None:
    """59 and 60 tokens share a bucket: when 60 does not fit, 59 behind it still goes,
    rather than a record from a bucket much farther away."""
    loop = asyncio.new_event_loop()
    try:
        head = 59 if padded else 29
        pending = Pending(budget=head + 59, max_size=2, padded=padded, similar=True)
        for rec in make_records(loop, [head, 60, 0, 59]):
            pending.push(rec)
        batch, _ = pending.take()
        assert [r.cost for r in batch] == [head, 59]
    finally:
        loop.close()


@settings(max_examples=200, deadline=None)
@given(
    costs=st.lists(st.integers(0, 40), min_size=1, max_size=80),
    budget=st.integers(1, 200),
    max_size=st.integers(1, 32),
    cap_size=st.integers(1, 40),
    cap_cost=st.integers(0, 250),
    padded=st.booleans(),
    similar=st.booleans(),
    with_priorities=st.booleans(),
    seed=st.randoms(use_true_random=False),
)
def test_a_capped_take_keeps_the_tighter_limits_and_the_head(
    costs: list[int],
    budget: int,
    max_size: int,
    cap_size: int,
    cap_cost: int,
    padded: bool,
    similar: bool,
    with_priorities: bool,
    seed: Any,
) -> None:
    # A latency target tightens the limits of one take (``take(max_size=, budget=)``).
    loop = asyncio.new_event_loop()
    try:
        priorities = [seed.randint(-2, 2) for _ in costs] if with_priorities else None
        records = make_records(loop, costs, priorities)
        pending = Pending(budget=budget, max_size=max_size, padded=padded, similar=similar)
        for rec in records:
            pending.push(rec)
        queue = list(records)
        size_cap, cost_cap = min(cap_size, max_size), min(cap_cost, budget)
        while queue:
            batch, _ = pending.take(max_size=cap_size, budget=cap_cost)
            assert min(queue) in batch, "the head record always goes"
            assert len(batch) <= size_cap
            cost = batch_cost(len(batch), sum(r.cost for r in batch), max(r.cost for r in batch), padded)
            assert cost <= cost_cap or len(batch) == 1
            if not similar:  # FIFO: a prefix of the dispatch order
                assert batch == sorted(queue)[: len(batch)]
            taken = set(map(id, batch))
            queue = [r for r in queue if id(r) not in taken]
            assert pending.size == len(queue)
        assert pending.take() == ([], None)
    finally:
        loop.close()


def test_head_discarding_stale_entries_keeps_the_measured_prefix_in_step() -> None:
    """Regression: ``head()`` (a keyed batcher asks it for every key) popped a forgotten record
    from the front without shrinking the measured prefix, so the next FIFO batch took one record
    too many (found by the stateful test: a batch of 2 with ``max_batch_size=1``)."""
    loop = asyncio.new_event_loop()
    try:
        pending = Pending(budget=1, max_size=1, padded=False, similar=False)
        records = make_records(loop, [0, 0, 0, 0])
        for rec in records:
            pending.push(rec)
        records[1].cancel()
        pending.forget(records[1])
        assert [r.item for r in pending.take()[0]] == [0]
        assert pending.head() is records[2]  # discards the forgotten record in front of it
        assert [r.item for r in pending.take()[0]] == [2]
        assert [r.item for r in pending.take()[0]] == [3]
    finally:
        loop.close()


@settings(max_examples=100, deadline=None)
@given(
    first=st.lists(st.tuples(st.integers(1, 3000), st.integers(0, 3), st.booleans()), min_size=1, max_size=120),
    second=st.lists(st.tuples(st.integers(1, 3000), st.integers(0, 3)), min_size=1, max_size=120),
    padded=st.booleans(),
)
def test_similar_queue_emptied_and_filled_again_batches_as_a_fresh_one(
    first: list[tuple[int, int, bool]], second: list[tuple[int, int]], padded: bool
) -> None:
    """The buckets an emptied queue keeps for reuse carry nothing over: the records that come
    next make the batches a fresh queue makes of them (the first fill's records, some forgotten
    to leave stale entries behind, have other costs and priorities)."""
    loop = asyncio.new_event_loop()
    try:
        budget, max_size = 4000, 16
        reused = Pending(budget=budget, max_size=max_size, padded=padded, similar=True)
        records = make_records(loop, [cost for cost, _, _ in first], [priority for _, priority, _ in first])
        for rec in records:
            reused.push(rec)
        for rec, (_, _, forget) in zip(records, first, strict=True):
            if forget and reused.size > 1:
                rec.cancel()
                reused.forget(rec)
        while reused.size:
            reused.take()
        assert reused.take() == ([], None)

        def drain(pending: Pending) -> list[list[int]]:
            again = make_records(loop, [cost for cost, _ in second], [priority for _, priority in second])
            for rec in again:
                rec.seq += len(first)  # seq keeps growing in the reused queue, as in a batcher
                pending.push(rec)
            batches: list[list[int]] = []
            while pending.size:
                batches.append([rec.item for rec in pending.take()[0]])
            return batches

        fresh = Pending(budget=budget, max_size=max_size, padded=padded, similar=True)
        assert drain(reused) == drain(fresh)
    finally:
        loop.close()
