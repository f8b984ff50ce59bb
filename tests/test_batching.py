"""How batches are formed and timed: budget, size, window, eager, grouping,
priorities, deadlines, concurrency, admission.  All on the virtual clock."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tokenbatcher import BatchInfo, DynamicBatcher, QueueFullError, TokenBatcher


class Recorder:
    """A process_fn that remembers each batch, the time it started, and can be slow."""

    def __init__(self, work_s: float = 0.0, per_record_s: float = 0.0) -> None:
        self.batches: list[list[Any]] = []
        self.started: list[float] = []
        self.work_s = work_s
        self.per_record_s = per_record_s

    async def __call__(self, batch: list[Any]) -> list[Any]:
        self.batches.append(list(batch))
        self.started.append(asyncio.get_running_loop().time())
        if self.work_s or self.per_record_s:
            await asyncio.sleep(self.work_s + self.per_record_s * len(batch))
        return [("result", item) for item in batch]


def now() -> float:
    return asyncio.get_running_loop().time()


@pytest.mark.asyncio
async def test_hard_budget_the_crossing_record_waits_for_the_next_batch() -> None:
    fn = Recorder()
    async with DynamicBatcher(fn, target_batch_cost=10) as batcher:
        futures = [
            await batcher.submit(name, estimated_cost=cost)
            for name, cost in [("a", 4), ("b", 4), ("c", 4), ("d", 6), ("e", 25), ("f", 1)]
        ]
        await asyncio.gather(*futures)
    # flyte would put a+b+c (12) together; the budget is hard here.
    assert fn.batches == [["a", "b"], ["c", "d"], ["e"], ["f"]]


@pytest.mark.asyncio
async def test_max_batch_size_bounds_every_batch() -> None:
    fn = Recorder()
    async with DynamicBatcher(fn, max_batch_size=3) as batcher:
        futures = [await batcher.submit(i) for i in range(10)]
        assert await asyncio.gather(*futures) == [("result", i) for i in range(10)]
    assert fn.batches == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


@pytest.mark.asyncio
async def test_window_waits_batch_timeout_for_a_partial_batch() -> None:
    fn = Recorder()
    async with DynamicBatcher(fn, batch_timeout_s=0.05) as batcher:
        t0 = now()
        future = await batcher.submit("x")
        await asyncio.sleep(0.02)
        other = await batcher.submit("y")
        await asyncio.gather(future, other)
    assert fn.batches == [["x", "y"]]
    assert fn.started[0] - t0 == pytest.approx(0.05)


@pytest.mark.asyncio
async def test_window_seals_at_once_when_a_batch_is_full() -> None:
    fn = Recorder()
    async with DynamicBatcher(fn, target_batch_cost=3, batch_timeout_s=10.0) as batcher:
        t0 = now()
        futures = [await batcher.submit(i) for i in range(3)]
        await asyncio.gather(*futures)
    assert fn.started == [pytest.approx(t0)]


@pytest.mark.asyncio
async def test_window_keeps_flyte_timing_batches_seal_while_the_processor_is_busy() -> None:
    fn = Recorder(work_s=1.0)
    async with DynamicBatcher(fn, batch_timeout_s=0.05, prefetch_batches=1) as batcher:
        first = await batcher.submit(0)
        await asyncio.sleep(0.1)  # batch [0] is in process_fn until t=1.05
        rest = [await batcher.submit(i) for i in range(1, 4)]
        await asyncio.sleep(0.1)
        rest += [await batcher.submit(i) for i in range(4, 6)]
        await asyncio.gather(first, *rest)
    # [1, 2, 3] was sealed after 50 ms although the processor was busy.
    assert fn.batches == [[0], [1, 2, 3], [4, 5]]


@pytest.mark.asyncio
async def test_eager_dispatches_at_once_when_a_slot_is_free() -> None:
    fn = Recorder(work_s=0.002)
    async with DynamicBatcher(fn, dispatch="eager", batch_timeout_s=0.05) as batcher:
        t0 = now()
        future = await batcher.submit("x")
        await future
        assert now() - t0 == pytest.approx(0.002)
    assert fn.started == [pytest.approx(t0)]


@pytest.mark.asyncio
async def test_eager_grows_the_batch_while_every_slot_is_busy() -> None:
    fn = Recorder(work_s=1.0)
    async with DynamicBatcher(fn, dispatch="eager", batch_timeout_s=0.05) as batcher:
        futures = [await batcher.submit(0)]
        for i in range(1, 6):
            await asyncio.sleep(0.1)
            futures.append(await batcher.submit(i))
        await asyncio.gather(*futures)
    assert fn.batches == [[0], [1, 2, 3, 4, 5]]


@pytest.mark.asyncio
async def test_eager_min_batch_size_waits_at_most_batch_timeout_and_never_strands() -> None:
    fn = Recorder()
    async with DynamicBatcher(fn, dispatch="eager", min_batch_size=3, batch_timeout_s=0.5) as batcher:
        t0 = now()
        a = await batcher.submit("a")
        await asyncio.sleep(0.1)
        b = await batcher.submit("b")
        await asyncio.gather(a, b)  # only two will ever come
        assert fn.started == [pytest.approx(t0 + 0.5)]
        c = [await batcher.submit(x) for x in "cde"]
        await asyncio.gather(*c)
    assert fn.batches == [["a", "b"], ["c", "d", "e"]]
    assert fn.started[1] == pytest.approx(t0 + 0.5)  # three arrived: no wait at all


@pytest.mark.asyncio
async def test_max_concurrent_batches_runs_that_many_at_once() -> None:
    running = 0
    peak = 0
    release = asyncio.Event()

    async def slow(batch: list[int]) -> list[int]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        return batch

    async with DynamicBatcher(slow, max_batch_size=1, max_concurrent_batches=3, dispatch="eager") as batcher:
        futures = [await batcher.submit(i) for i in range(7)]
        await asyncio.sleep(1)
        assert batcher.stats.in_flight_batches == 3
        release.set()
        assert await asyncio.gather(*futures) == list(range(7))
    assert peak == 3
    stats = batcher.stats
    assert stats.total_batches == 7
    assert stats.busy_time_s == pytest.approx(3.0)  # three slots busy for the one second


@pytest.mark.asyncio
@pytest.mark.parametrize("dispatch", ["window", "eager"])
async def test_utilization_counts_busy_and_idle_seconds(dispatch: str) -> None:
    fn = Recorder(work_s=1.0)
    async with DynamicBatcher(fn, dispatch=dispatch, batch_timeout_s=0.0) as batcher:  # type: ignore[arg-type]
        await asyncio.sleep(1.0)
        await (await batcher.submit(1))
        await asyncio.sleep(2.0)
    stats = batcher.stats
    assert stats.busy_time_s == pytest.approx(1.0)
    assert stats.idle_time_s == pytest.approx(3.0)
    assert stats.utilization == pytest.approx(0.25)


@pytest.mark.asyncio
async def test_padded_budget_counts_size_times_largest() -> None:
    fn = Recorder()
    async with DynamicBatcher(fn, target_batch_cost=20, batch_cost="padded") as batcher:
        costs = {"a": 2, "b": 2, "c": 9, "d": 2, "e": 2}
        futures = [await batcher.submit(k, estimated_cost=v) for k, v in costs.items()]
        await asyncio.gather(*futures)
    # a,b,c would pad to 3 x 9 = 27 > 20
    assert fn.batches == [["a", "b"], ["c", "d"], ["e"]]


@pytest.mark.asyncio
async def test_similar_cost_grouping_keeps_the_oldest_and_packs_neighbours() -> None:
    fn = Recorder(work_s=1.0)
    async with DynamicBatcher(
        fn, dispatch="eager", target_batch_cost=40, batch_cost="padded", grouping="similar_cost"
    ) as batcher:
        blocker = await batcher.submit("blocker", estimated_cost=1)
        await asyncio.sleep(0.1)  # the slot is busy; the rest queue up
        costs = [("s1", 2), ("L1", 20), ("s2", 3), ("L2", 19), ("s3", 2), ("s4", 2)]
        futures = [await batcher.submit(k, estimated_cost=v) for k, v in costs]
        results = await asyncio.gather(blocker, *futures)
    assert results == [("result", k) for k in ["blocker"] + [k for k, _ in costs]]
    # FIFO would give [s1, L1] (2 x 20 = 40) and pad s1 to 20.
    assert fn.batches[1:] == [["s1", "s2", "s3", "s4"], ["L1", "L2"]]


@pytest.mark.asyncio
async def test_priorities_lower_first_fifo_within_a_priority() -> None:
    fn = Recorder(work_s=1.0)
    async with DynamicBatcher(fn, dispatch="eager", max_batch_size=1, priority_aging_s=100.0) as batcher:
        futures = [await batcher.submit("busy")]
        await asyncio.sleep(0.1)
        for name, priority in [("p2a", 2), ("p0a", 0), ("p1a", 1), ("p0b", 0), ("p2b", 2), ("n1", -1)]:
            futures.append(await batcher.submit(name, priority=priority))
        await asyncio.gather(*futures)
    assert [b[0] for b in fn.batches] == ["busy", "n1", "p0a", "p0b", "p1a", "p2a", "p2b"]


@pytest.mark.asyncio
async def test_priority_aging_bounds_how_long_a_record_is_passed_over() -> None:
    fn = Recorder(work_s=1.0)
    async with DynamicBatcher(fn, dispatch="eager", max_batch_size=1, priority_aging_s=0.5) as batcher:
        futures = [await batcher.submit("busy")]
        await asyncio.sleep(0.1)
        futures.append(await batcher.submit("low", priority=1))  # key = t + 0.5
        await asyncio.sleep(0.3)
        futures.append(await batcher.submit("early-high"))  # 0.3 s later: < 0.5, overtakes
        await asyncio.sleep(0.3)
        futures.append(await batcher.submit("late-high"))  # 0.6 s later: > 0.5, does not
        await asyncio.gather(*futures)
    assert [b[0] for b in fn.batches] == ["busy", "early-high", "low", "late-high"]


@pytest.mark.asyncio
async def test_deadline_expires_a_queued_record_which_is_never_processed() -> None:
    fn = Recorder(work_s=1.0)
    async with DynamicBatcher(fn, dispatch="eager", request_timeout_s=0.5) as batcher:
        busy = await batcher.submit("busy", timeout_s=10)
        await asyncio.sleep(0.1)
        t0 = now()
        doomed = await batcher.submit("doomed")  # default deadline 0.5 s
        kept = await batcher.submit("kept", timeout_s=5)
        with pytest.raises(TimeoutError):
            await doomed
        assert now() - t0 == pytest.approx(0.5)  # failed at its deadline, not at dispatch
        await asyncio.gather(busy, kept)
    assert fn.batches == [["busy"], ["kept"]]
    assert batcher.stats.total_expired == 1


@pytest.mark.asyncio
async def test_deadline_does_not_apply_once_the_record_is_in_process_fn() -> None:
    fn = Recorder(work_s=2.0)
    async with DynamicBatcher(fn, dispatch="eager") as batcher:
        future = await batcher.submit("x", timeout_s=0.5)
        assert await future == ("result", "x")


@pytest.mark.asyncio
async def test_expired_record_is_dropped_from_a_sealed_prefetch_batch() -> None:
    fn = Recorder(work_s=1.0)
    async with DynamicBatcher(fn, batch_timeout_s=0.01, prefetch_batches=1) as batcher:
        busy = await batcher.submit("busy")
        await asyncio.sleep(0.05)
        doomed = await batcher.submit("doomed", timeout_s=0.2)  # sealed at 0.06, dispatch at 1.01
        with pytest.raises(TimeoutError):
            await doomed
        await busy
    assert fn.batches == [["busy"]]


@pytest.mark.asyncio
async def test_submit_nowait_rejects_when_full_and_counts_it() -> None:
    release = asyncio.Event()

    async def gated(batch: list[int]) -> list[int]:
        await release.wait()
        return batch

    async with DynamicBatcher(gated, max_queue_size=2, max_batch_size=1, dispatch="eager") as batcher:
        first = batcher.submit_nowait(0)
        await asyncio.sleep(0.1)  # 0 is in process_fn; the queue is empty again
        queued = [batcher.submit_nowait(1), batcher.submit_nowait(2)]
        with pytest.raises(QueueFullError, match="max_queue_size"):
            batcher.submit_nowait(3)
        assert batcher.stats.total_rejected == 1
        release.set()
        assert await asyncio.gather(first, *queued) == [0, 1, 2]
    assert batcher.stats.total_submitted == 3


@pytest.mark.asyncio
async def test_submit_waits_for_room_backpressure() -> None:
    fn = Recorder(work_s=1.0)
    async with DynamicBatcher(fn, max_queue_size=2, max_batch_size=2, dispatch="eager") as batcher:
        futures = [await batcher.submit(0)]  # in process_fn from t=0 to t=1
        await asyncio.sleep(0.1)
        futures += [await batcher.submit(1), await batcher.submit(2)]  # queue full
        t0 = now()
        futures.append(await batcher.submit(3))  # waits until [1, 2] leave the queue at t=1
        assert now() - t0 == pytest.approx(0.9)
        await asyncio.gather(*futures)
    assert fn.batches == [[0], [1, 2], [3]]


@pytest.mark.asyncio
async def test_on_batch_reports_reason_size_cost_and_times() -> None:
    infos: list[BatchInfo] = []
    fn = Recorder(work_s=0.25)
    async with TokenBatcher(fn, target_batch_tokens=10, batch_timeout_s=0.1, on_batch=infos.append) as batcher:
        full = [await batcher.submit(i, estimated_tokens=5) for i in range(2)]
        await asyncio.gather(*full)
        partial = await batcher.submit("p", estimated_tokens=3)
        await partial
    assert [(i.size, i.cost, i.reason) for i in infos] == [(2, 10, "budget"), (1, 3, "timeout")]
    assert infos[0].process_time_s == pytest.approx(0.25)
    assert infos[1].queue_wait_max_s == pytest.approx(0.1)
    assert dict(batcher.stats.dispatch_reasons) == {"budget": 1, "timeout": 1}


@pytest.mark.asyncio
async def test_on_batch_errors_are_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    def broken(info: BatchInfo) -> None:
        raise RuntimeError("exporter down")

    async with DynamicBatcher(Recorder(), on_batch=broken) as batcher:
        assert await (await batcher.submit(1)) == ("result", 1)
        assert await (await batcher.submit(2)) == ("result", 2)
    assert "on_batch hook raised" in caplog.text
