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

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenbatcher._pending import BUCKETS_PER_OCTAVE, Pending, Record, batch_cost

WIDTH = 1 / BUCKETS_PER_OCTAVE  # one bucket, in log2 units


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


COSTS = st.lists(st.integers(0, 5000) | st.integers(1, 64), min_size=1, max_size=300)


@settings(max_examples=300, deadline=None)
@given(
    costs=COSTS,
    budget=st.integers(1, 20_000),
    max_size=st.integers(1, 64),
    padded=st.booleans(),
    with_priorities=st.booleans(),
    seed=st.randoms(use_true_random=False),
)
def test_similar_take_keeps_head_budget_size_and_is_as_tight_as_the_oracle(
    costs: list[int], budget: int, max_size: int, padded: bool, with_priorities: bool, seed: Any
) -> None:
    loop = asyncio.new_event_loop()
    try:
        priorities = [seed.randint(-2, 2) for _ in costs] if with_priorities else None
        records = make_records(loop, costs, priorities)
        pending = Pending(budget=budget, max_size=max_size, padded=padded, similar=True)
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
            # Rank by rank, our batch's records are as near to the head as the
            # oracle's, give or take a bucket on either side; records beyond the
            # oracle's count are extra records that fitted.
            ours = sorted(dist(r.cost, head.cost) for r in batch)
            theirs = sorted(dist(r.cost, head.cost) for r in expected)
            for mine, best in zip(ours, theirs, strict=False):
                assert mine <= best + 2 * WIDTH, (ours, theirs)
            taken = set(map(id, batch))
            queue = [r for r in queue if id(r) not in taken]
            assert pending.size == len(queue)
    finally:
        loop.close()


def test_forgotten_records_free_their_place_at_once_and_stale_entries_are_bounded() -> None:
    loop = asyncio.new_event_loop()
    try:
        for similar in (False, True):
            pending = Pending(budget=10**9, max_size=256, padded=False, similar=similar)
            records = make_records(loop, [i % 700 for i in range(20_000)])
            for rec in records:
                pending.push(rec)
            for rec in records[:19_990]:
                rec.cancel()
                pending.forget(rec)
            assert pending.size == 10
            # a rebuild ran: what is stored is proportional to the live records
            assert len(pending._order) <= 4 * 10 + 1024 + 1
            batch, _ = pending.take()
            assert [r.item for r in batch] == list(range(19_990, 20_000))
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
