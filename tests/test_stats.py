"""Stats snapshots, percentiles, and how they read in a notebook."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tokenbatcher import BatchStats, DynamicBatcher, Percentiles


def test_percentiles_nearest_rank() -> None:
    p = Percentiles.of(range(1, 101))
    assert (p.p50, p.p95, p.p99, p.max) == (50.0, 95.0, 99.0, 100.0)
    assert Percentiles.of([]) == Percentiles()
    assert Percentiles.of([7]).p99 == 7.0


@pytest.mark.asyncio
async def test_stats_is_a_snapshot_and_can_be_awaited() -> None:
    async def work(batch: list[Any]) -> list[Any]:
        await asyncio.sleep(0.5)
        return batch

    async with DynamicBatcher(work, max_batch_size=2, batch_timeout_s=0.1) as batcher:
        before = batcher.stats
        futures = [await batcher.submit(i, estimated_cost=i + 1) for i in range(5)]
        awaited = await batcher.stats
        assert isinstance(awaited, BatchStats)
        assert (awaited.total_submitted, awaited.pending, awaited.queue_depth) == (5, 5, 5)
        assert awaited.peak_queue_depth == 5
        await asyncio.gather(*futures)
    after = batcher.stats
    assert before.total_submitted == 0  # an old snapshot does not change
    assert after.total_completed == 5
    assert after.total_batches == 3
    assert after.total_batch_cost == 15
    assert after.avg_batch_size == pytest.approx(5 / 3)
    assert after.batch_size.max == 2.0
    assert after.process_time_s.p50 == pytest.approx(0.5)
    assert after.queue_wait_s.max == pytest.approx(1.0)  # record 4 waited for two batches
    assert after.busy_time_s == pytest.approx(1.5)


def test_repr_and_html_are_readable() -> None:
    stats = BatchStats(total_submitted=10, total_completed=9, total_batches=2, busy_time_s=3.0, idle_time_s=1.0)
    text = repr(stats)
    assert text.startswith("BatchStats(submitted=10, completed=9")
    assert "utilization=75.0%" in text
    html = stats._repr_html_()
    assert html.startswith("<table>")
    assert "<th style='text-align:left'>total_completed</th><td>9</td>" in html
    assert "75.0%" in html


@pytest.mark.asyncio
async def test_repr_of_the_batcher_shows_live_state() -> None:
    gate = asyncio.Event()

    async def gated(batch: list[int]) -> list[int]:
        await gate.wait()
        return batch

    batcher = DynamicBatcher(gated, max_batch_size=1, dispatch="eager")
    assert repr(batcher) == "<DynamicBatcher new queued=0 in_flight=0 batches=0>"
    async with batcher:
        futures = [await batcher.submit(i) for i in range(3)]
        await asyncio.sleep(0.01)
        assert repr(batcher) == "<DynamicBatcher running queued=2 in_flight=1 batches=1>"
        gate.set()
        await asyncio.gather(*futures)
    assert repr(batcher) == "<DynamicBatcher stopped queued=0 in_flight=0 batches=3>"
