"""Deadlines at depth: one timer for the earliest, each record failed on time."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from tokenbatcher import DynamicBatcher, QueueFullError


@pytest.mark.asyncio
@pytest.mark.parametrize("dispatch", ["window", "eager"])
async def test_ten_thousand_random_deadlines_each_fail_on_time_and_the_rest_are_served(dispatch: Any) -> None:
    loop = asyncio.get_running_loop()
    rng = random.Random(7)
    dispatched_at: dict[int, float] = {}

    async def work(batch: list[int]) -> list[int]:
        now = loop.time()
        for item in batch:
            dispatched_at[item] = now
        await asyncio.sleep(0.001)
        return batch

    done_at: dict[int, float] = {}
    deadline: dict[int, float] = {}
    async with DynamicBatcher(
        work, max_batch_size=16, max_queue_size=20_000, dispatch=dispatch, batch_timeout_s=0.0
    ) as batcher:
        futures = []
        for i in range(10_000):
            timeout = rng.uniform(0.01, 1.0)
            deadline[i] = loop.time() + timeout
            future = batcher.submit_nowait(i, timeout_s=timeout)
            future.add_done_callback(lambda _, i=i: done_at.__setitem__(i, loop.time()))
            futures.append(future)
        results = await asyncio.gather(*futures, return_exceptions=True)
    expired = [i for i, r in enumerate(results) if isinstance(r, TimeoutError)]
    served = [i for i, r in enumerate(results) if r == i]
    assert len(expired) + len(served) == 10_000
    assert 1000 < len(expired) < 9000, "the test must exercise both outcomes"
    for i in expired:
        assert i not in dispatched_at, "an expired record never reaches process_fn"
        assert deadline[i] <= done_at[i] <= deadline[i] + 0.003
    for i in served:
        assert dispatched_at[i] <= deadline[i] + 1e-9, "a record is dispatched only before its deadline"
    assert batcher.stats.total_expired == len(expired)


@pytest.mark.asyncio
@pytest.mark.parametrize("grouping", ["fifo", "similar_cost"])
async def test_a_full_queue_of_cancelled_records_accepts_new_work_at_once(grouping: Any) -> None:
    gate = asyncio.Event()

    async def work(batch: list[int]) -> list[int]:
        await gate.wait()
        return batch

    async with DynamicBatcher(
        work, max_queue_size=100, max_batch_size=10, dispatch="eager", grouping=grouping
    ) as batcher:
        first = batcher.submit_nowait(-1)
        await asyncio.sleep(0)  # the slot takes it and blocks on the gate
        doomed = [batcher.submit_nowait(i) for i in range(100)]
        with pytest.raises(QueueFullError):
            batcher.submit_nowait(100)
        for future in doomed:
            future.cancel()
        assert batcher.stats.queue_depth == 0
        fresh = [batcher.submit_nowait(i, estimated_cost=i % 7) for i in range(100, 200)]
        blocked = asyncio.ensure_future(batcher.submit(200))  # full again: this one waits
        await asyncio.sleep(0)
        assert not blocked.done()
        fresh[0].cancel()  # one place frees: the waiting submit gets it at once
        await asyncio.sleep(0)
        assert blocked.done()
        gate.set()
        results = await asyncio.gather(first, *fresh[1:], await blocked)
    assert results == [-1, *range(101, 200), 200]
    stats = batcher.stats
    assert stats.total_cancelled == 101
    assert stats.total_completed == 101
    assert stats.total_submitted == stats.total_completed + stats.total_cancelled


@pytest.mark.asyncio
async def test_expired_records_free_their_place_for_a_waiting_submit() -> None:
    gate = asyncio.Event()

    async def work(batch: list[int]) -> list[int]:
        await gate.wait()
        return batch

    async with DynamicBatcher(work, max_queue_size=10, dispatch="eager") as batcher:
        first = batcher.submit_nowait(-1)
        await asyncio.sleep(0)
        doomed = [batcher.submit_nowait(i, timeout_s=1.0) for i in range(10)]
        loop = asyncio.get_running_loop()
        start = loop.time()
        late = await batcher.submit(10)  # waits for room: the deadlines make it
        assert loop.time() - start == pytest.approx(1.0)
        gate.set()
        assert await late == 10
        assert await first == -1
    for future in doomed:
        with pytest.raises(TimeoutError):
            future.result()
