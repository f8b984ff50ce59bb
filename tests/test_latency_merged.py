"""latency_target_s with what main gained meanwhile: keyed batches, configure, streaming, the new queue.

The policy (``_latency.py``, ``_plan.py``) was built on the old ``Pending``;
these tests pin down its port: capped takes and ``in_order`` on the lane and
bucket queue and on ``KeyedPending``, keyed admission, the target as a
setting ``configure`` changes, and its refusal for a streaming ``process_fn``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_latency import TARGET, Model, overload, warm_up
from test_pending import make_records
from tokenbatcher import DynamicBatcher, StreamBatch
from tokenbatcher._keyed import KeyedPending, KeyedRecord, group_of
from tokenbatcher._pending import Pending, Record, batch_cost

# --------------------------------------------------------------------- the queues


@settings(max_examples=150, deadline=None)
@given(
    costs=st.lists(st.integers(0, 40), min_size=1, max_size=60),
    priorities=st.lists(st.integers(-2, 2), min_size=60, max_size=60),
    similar=st.booleans(),
    forget=st.sets(st.integers(0, 59), max_size=10),
)
def test_in_order_gives_the_live_records_in_dispatch_order(
    costs: list[int], priorities: list[int], similar: bool, forget: set[int]
) -> None:
    loop = asyncio.new_event_loop()
    try:
        records = make_records(loop, costs, priorities[: len(costs)])
        pending = Pending(budget=10**6, max_size=256, padded=False, similar=similar)
        for rec in records:
            pending.push(rec)
        for i in forget:
            if i < len(records):
                records[i].cancel()
                pending.forget(records[i])
        live = sorted(rec for rec in records if rec.queued)
        assert list(pending.in_order()) == live
        assert list(pending.in_order(next_only=True)) == live
    finally:
        loop.close()


def keyed(loop: asyncio.AbstractEventLoop, costs: list[int], keys: list[int]) -> list[Record[Any]]:
    """Records as ``make_records`` makes them, each with a batch key."""
    out: list[Record[Any]] = []
    for rec, key in zip(make_records(loop, costs), keys, strict=False):
        copy: KeyedRecord[Any] = KeyedRecord(loop=loop)
        copy.item, copy.cost, copy.t, copy.seq, copy.hook, copy.waiting = (
            rec.item,
            rec.cost,
            rec.t,
            rec.seq,
            rec.hook,
            True,
        )
        copy.key, copy.group = rec.key, key
        out.append(copy)
    return out


@settings(max_examples=150, deadline=None)
@given(
    costs=st.lists(st.integers(0, 40), min_size=1, max_size=60),
    keys=st.lists(st.integers(0, 3), min_size=60, max_size=60),
    cap_size=st.integers(1, 20),
    cap_cost=st.integers(0, 150),
    padded=st.booleans(),
    similar=st.booleans(),
)
def test_a_keyed_capped_take_is_the_next_keys_within_the_caps(
    costs: list[int], keys: list[int], cap_size: int, cap_cost: int, padded: bool, similar: bool
) -> None:
    loop = asyncio.new_event_loop()
    try:
        records = keyed(loop, costs, keys)
        pending = KeyedPending(budget=100, max_size=16, padded=padded, similar=similar)
        for rec in records:
            pending.push(rec)
        queue = list(records)
        while queue:
            order = list(pending.in_order())
            assert sorted(order) == sorted(queue), "every live record, once"
            groups = [group_of(rec) for rec in order]
            runs = [g for i, g in enumerate(groups) if i == 0 or groups[i - 1] != g]
            assert len(runs) == len(set(runs)), "key by key"
            heads = [min(r for r in queue if group_of(r) == g) for g in runs]
            assert heads == sorted(heads), "keys in the order of their heads"
            head = min(queue)
            assert list(pending.in_order(next_only=True)) == sorted(r for r in queue if group_of(r) == group_of(head))
            batch, _ = pending.take(max_size=cap_size, budget=cap_cost)
            assert head in batch, "the head record always goes"
            assert {group_of(rec) for rec in batch} == {group_of(head)}
            assert len(batch) <= min(cap_size, 16)
            cost = batch_cost(len(batch), sum(r.cost for r in batch), max(r.cost for r in batch), padded)
            assert cost <= min(cap_cost, 100) or len(batch) == 1
            taken = set(map(id, batch))
            queue = [r for r in queue if id(r) not in taken]
            assert pending.size == len(queue)
    finally:
        loop.close()


# --------------------------------------------------------------------- keyed batches


@pytest.mark.parametrize("dispatch", ["eager", "window"])
@pytest.mark.asyncio
async def test_under_overload_keyed_batches_keep_the_target_and_never_mix_keys(dispatch: str) -> None:
    model = Model()
    async with DynamicBatcher(model, dispatch=dispatch, batch_key=lambda x: x % 3, latency_target_s=TARGET) as batcher:
        await warm_up(batcher)
        out = await overload(batcher, rate=2_000, seconds=1.0)
        stats = batcher.stats
    for _, batch in model.batches:
        assert len({x % 3 for x in batch}) == 1
    served = out["served"]
    assert served
    assert max(served) <= TARGET
    assert out["refused"], "the keyed plan refuses what would be late"
    assert stats.total_rejected == len(out["refused"])
    assert stats.total_submitted == 36 + len(served) + out["timed_out"]  # 36 in the warm-up
    assert out["timed_out"] <= 0.05 * len(served)


# --------------------------------------------------------------------- configure


@pytest.mark.asyncio
async def test_configure_switches_the_target_on_changes_it_and_off_while_running() -> None:
    model = Model()
    async with DynamicBatcher(model, dispatch="eager", max_concurrent_batches=1) as batcher:
        assert batcher.latency_target_s is None
        model.slow = 20.0  # a batch of a few records takes about 0.2 s
        first = await batcher.submit(-1)
        await asyncio.sleep(0)  # the slot took it
        queued = [await batcher.submit(-1) for _ in range(3)]
        batcher.configure(latency_target_s=5.0)  # the queued records are due 5 s after their submit
        assert batcher.latency_target_s == 5.0
        assert batcher.stats.duration_samples == 0
        await asyncio.gather(first, *queued)
        model.slow = 1.0
        await warm_up(batcher)
        samples = batcher.stats.duration_samples
        batcher.configure(latency_target_s=TARGET)
        assert batcher.stats.duration_samples == samples, "the model is kept"
        out = await overload(batcher, rate=2_000, seconds=0.5)
        assert out["refused"]
        assert max(out["served"]) <= TARGET
        batcher.configure(latency_target_s=None)
        assert batcher.stats.duration_samples == 0
        results = await asyncio.gather(*await batcher.submit_batch(list(range(500))))
        assert len(results) == 500  # nothing refused without a target


# --------------------------------------------------------------------- streaming


def test_a_streaming_process_fn_refuses_a_target_in_the_constructor_and_configure() -> None:
    async def decode(batch: StreamBatch[str]) -> AsyncIterator[list[str]]:
        yield list(batch)

    with pytest.raises(ValueError, match="latency_target_s"):
        DynamicBatcher(decode, latency_target_s=1.0)
    batcher = DynamicBatcher(decode)
    with pytest.raises(ValueError, match="latency_target_s"):
        batcher.configure(latency_target_s=1.0)
    assert batcher.latency_target_s is None
