"""submit_threadsafe: synchronous callers in real threads (real clock)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tokenbatcher import DynamicBatcher

pytestmark = [pytest.mark.real_clock, pytest.mark.timeout(30)]


async def double(batch: list[int]) -> list[int]:
    await asyncio.sleep(0.001)
    return [2 * x for x in batch]


@pytest.mark.asyncio
async def test_many_threads_get_their_own_results() -> None:
    async with DynamicBatcher(double, batch_timeout_s=0.005) as batcher:

        def worker(base: int) -> list[int]:
            futures = [batcher.submit_threadsafe(base + i) for i in range(50)]
            return [f.result(timeout=10) for f in futures]

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            results = await asyncio.gather(
                *(asyncio.get_running_loop().run_in_executor(pool, worker, 1000 * t) for t in range(8))
            )
    for t, got in enumerate(results):
        assert got == [2 * (1000 * t + i) for i in range(50)]
    assert batcher.stats.total_completed == 400
    assert batcher.stats.total_batches < 400  # records from different threads shared batches


@pytest.mark.asyncio
async def test_errors_and_cancellation_cross_the_thread_boundary() -> None:
    gate = asyncio.Event()

    async def gated(batch: list[Any]) -> list[Any]:
        await gate.wait()
        if "bad" in batch:
            raise ValueError("bad record")
        return batch

    loop = asyncio.get_running_loop()
    async with DynamicBatcher(gated, max_batch_size=1, dispatch="eager") as batcher:
        blocker = await batcher.submit("first")
        bad = await loop.run_in_executor(None, batcher.submit_threadsafe, "bad")
        cancelled = await loop.run_in_executor(None, batcher.submit_threadsafe, "cancel me")
        await asyncio.sleep(0.05)
        assert cancelled.cancel()
        gate.set()
        await blocker
        with pytest.raises(ValueError, match="bad record"):
            await asyncio.wrap_future(bad)
    assert batcher.stats.total_cancelled == 1
    assert batcher.stats.total_completed == 1


@pytest.mark.asyncio
async def test_submit_threadsafe_on_the_loop_thread_or_when_stopped_raises() -> None:
    batcher = DynamicBatcher(double)
    with pytest.raises(RuntimeError, match="not running"):
        batcher.submit_threadsafe(1)
    async with batcher:
        with pytest.raises(RuntimeError, match="use submit"):
            batcher.submit_threadsafe(1)


@pytest.fixture
def loop_in_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a background thread, as a sync program (or a web server) has it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


def test_a_sync_program_with_the_loop_in_a_background_thread(loop_in_thread: asyncio.AbstractEventLoop) -> None:
    batcher = DynamicBatcher(double)
    asyncio.run_coroutine_threadsafe(batcher.start(), loop_in_thread).result(timeout=5)
    assert [batcher.submit_threadsafe(i).result(timeout=5) for i in range(5)] == [0, 2, 4, 6, 8]
    asyncio.run_coroutine_threadsafe(batcher.stop(), loop_in_thread).result(timeout=5)


def test_asyncio_run_of_submit_from_another_thread_points_to_submit_threadsafe(
    loop_in_thread: asyncio.AbstractEventLoop,
) -> None:
    batcher = DynamicBatcher(double)
    asyncio.run_coroutine_threadsafe(batcher.start(), loop_in_thread).result(timeout=5)
    with pytest.raises(RuntimeError, match=r"another thread.*batcher\.submit_threadsafe\(record\)"):
        asyncio.run(batcher.submit(1))  # the classic mistake: a second loop in this thread
    assert batcher.submit_threadsafe(1).result(timeout=5) == 2
    asyncio.run_coroutine_threadsafe(batcher.stop(), loop_in_thread).result(timeout=5)


@pytest.mark.asyncio
async def test_token_batcher_submit_threadsafe_takes_estimated_tokens() -> None:
    from tokenbatcher import TokenBatcher

    costs: list[int] = []
    async with TokenBatcher(double, on_batch=lambda info: costs.append(info.cost)) as batcher:
        future = await asyncio.get_running_loop().run_in_executor(
            None, lambda: batcher.submit_threadsafe(21, estimated_tokens=9)
        )
        assert await asyncio.wrap_future(future) == 42
    assert costs == [9]
