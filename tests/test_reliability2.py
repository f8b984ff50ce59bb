"""Reliability, round 2: production code misusing the batcher, one test per fault.

Restarts racing the last run's tasks, a second ``stop(timeout=...)``, ``stop()``
inside ``process_fn``, ``BaseException`` from user code, numbers that overflow,
``submit_batch`` all or nothing, stats read from other threads, and
``submit_threadsafe`` when the event loop goes away.  Unless marked
``real_clock``, each runs on the virtual clock, where a stranded future is a
``Deadlock`` rather than a hang.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import OnLoop, VirtualClockLoop
from tokenbatcher import BatchAbortedError, BatcherStoppedError, DynamicBatcher, TokenBatcher


async def echo(batch: list[Any]) -> list[Any]:
    return list(batch)


async def slow_echo(batch: list[Any]) -> list[Any]:
    await asyncio.sleep(1.0)
    return list(batch)


async def hang(batch: list[Any]) -> list[Any]:
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable")


def hangs_first_batch() -> Any:
    calls = 0

    async def fn(batch: list[Any]) -> list[Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.get_running_loop().create_future()
        return list(batch)

    return fn


def fails_next_take(batcher: DynamicBatcher[Any, Any]) -> None:
    """Make the batcher's next attempt to take a batch raise: an internal loop failure."""
    take = batcher._pending.take

    def broken() -> Any:
        batcher._pending.take = take  # type: ignore[method-assign]
        raise MemoryError("simulated bug")

    batcher._pending.take = broken  # type: ignore[method-assign]


# --------------------------------------------------------------------- 1. restarts


@pytest.mark.asyncio
@pytest.mark.parametrize("dispatch", ["window", "eager"])
async def test_start_right_after_a_cancelled_stop_runs_normally(dispatch: Any) -> None:
    batcher = DynamicBatcher(hangs_first_batch(), dispatch=dispatch, max_concurrent_batches=2)
    await batcher.start()
    stuck = await batcher.submit(0)
    stopper = asyncio.create_task(batcher.stop())
    await asyncio.sleep(1)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert isinstance(stuck.exception(), BatcherStoppedError)
    await batcher.start()  # at once: the last run's cancelled loops have not ended yet
    await asyncio.sleep(1)
    assert batcher.is_running
    assert await (await batcher.submit(1)) == 1
    await batcher.stop()
    assert batcher.stats.total_completed == 1


@pytest.mark.asyncio
async def test_start_right_after_an_internal_loop_failure_runs_normally() -> None:
    batcher = DynamicBatcher(echo, dispatch="eager", max_concurrent_batches=2)
    await batcher.start()
    fails_next_take(batcher)
    with pytest.raises(BatcherStoppedError, match="internal loop"):
        await (await batcher.submit(0))
    await batcher.start()  # the failed run's other slot is cancelled, and ends only now
    await asyncio.sleep(1)
    assert batcher.is_running
    assert await (await batcher.submit(1)) == 1
    await batcher.stop()


@pytest.mark.asyncio
async def test_the_last_run_leaves_no_task_behind_after_any_stop() -> None:
    batcher = DynamicBatcher(hangs_first_batch(), dispatch="eager", max_concurrent_batches=2)
    mine = asyncio.current_task()
    for stop in ("cancelled", "timeout", "graceful"):
        await batcher.start()
        futures = [await batcher.submit(i) for i in range(3)]
        if stop == "cancelled":
            stopper = asyncio.create_task(batcher.stop())
            await asyncio.sleep(1)
            stopper.cancel()
            await asyncio.gather(stopper, return_exceptions=True)
            await batcher.start()  # awaits what is left of the last run
            await batcher.stop()
        elif stop == "timeout":
            await batcher.stop(timeout=1)
        else:
            await batcher.stop()
        assert all(f.done() for f in futures)
        assert [t for t in asyncio.all_tasks() if t is not mine] == [], stop


# --------------------------------------------------------------------- 2. a second stop(timeout=...)


@pytest.mark.asyncio
async def test_a_second_stop_keeps_its_own_timeout() -> None:
    batcher = DynamicBatcher(hang)
    await batcher.start()
    future = await batcher.submit(1)
    first = asyncio.create_task(batcher.stop())  # would wait for the hung batch forever
    await asyncio.sleep(1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await batcher.stop(timeout=2.0)
    assert loop.time() - t0 == pytest.approx(2.0)
    with pytest.raises(BatcherStoppedError, match=r"stop\(timeout=2.0\) ran out"):
        future.result()
    await first  # the first stop returns too, the drain given up
    assert not batcher.is_running


@pytest.mark.asyncio
async def test_cancelling_a_second_stop_gives_up_the_drain() -> None:
    batcher = DynamicBatcher(hang)
    await batcher.start()
    future = await batcher.submit(1)
    first = asyncio.create_task(batcher.stop())
    await asyncio.sleep(1)
    second = asyncio.create_task(batcher.stop())
    await asyncio.sleep(1)
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    with pytest.raises(BatcherStoppedError, match="the task calling stop"):
        future.result()
    await first
    assert not batcher.is_running


# --------------------------------------------------------------------- 3. stop() inside process_fn


@pytest.mark.asyncio
@pytest.mark.parametrize("dispatch", ["window", "eager"])
async def test_stop_inside_process_fn_finishes_the_batch_and_drains_the_rest(dispatch: Any) -> None:
    returned: list[float] = []

    async def fn(batch: list[str]) -> list[str]:
        if batch == ["stop"]:
            await batcher.stop()  # returns at once: waiting would wait for this very call
            returned.append(loop.time())
            with pytest.raises(RuntimeError, match="stop\\(\\) has begun"):
                await batcher.submit("late")
        await asyncio.sleep(1)
        return batch

    loop = asyncio.get_running_loop()
    batcher = DynamicBatcher(fn, max_batch_size=1, dispatch=dispatch)
    await batcher.start()
    futures = [await batcher.submit(x) for x in ("a", "stop", "b", "c")]
    await asyncio.wait(futures)
    assert [f.result() for f in futures] == ["a", "stop", "b", "c"]
    assert returned == [pytest.approx(1.0)]  # stop() returned in the batch that called it
    await batcher.stop()  # from outside: waits for the rest of that stop, if any
    assert not batcher.is_running
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


@pytest.mark.asyncio
async def test_stop_with_a_timeout_inside_process_fn_still_bounds_the_drain() -> None:
    async def fn(batch: list[str]) -> list[str]:
        if batch == ["stop"]:
            await batcher.stop(timeout=5.0)
            return batch
        if batch == ["hang"]:
            await asyncio.get_running_loop().create_future()
        return batch

    batcher = DynamicBatcher(fn, max_batch_size=1, dispatch="eager")
    await batcher.start()
    futures = [await batcher.submit(x) for x in ("stop", "hang", "never")]
    loop = asyncio.get_running_loop()
    await asyncio.wait(futures)
    assert loop.time() == pytest.approx(5.0)
    assert futures[0].result() == "stop"
    for future in futures[1:]:
        with pytest.raises(BatcherStoppedError, match=r"stop\(timeout=5.0\) ran out"):
            future.result()
    await batcher.stop()
    assert not batcher.is_running


# --------------------------------------------------------------------- 4. BaseException from user code


class Custom(BaseException):
    pass


@pytest.mark.asyncio
@pytest.mark.parametrize("error", [asyncio.CancelledError(), GeneratorExit(), Custom("hook")])
async def test_an_on_batch_hook_raising_a_base_exception_is_logged_and_ignored(
    error: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    def hook(info: Any) -> None:
        raise error

    async with DynamicBatcher(echo, on_batch=hook) as batcher:
        assert await (await batcher.submit(1)) == 1
        await asyncio.sleep(1)
        assert batcher.is_running
        assert await (await batcher.submit(2)) == 2  # not "started on another event loop"
    assert "on_batch hook raised; ignored" in caplog.text


@pytest.mark.asyncio
@pytest.mark.parametrize("error", [asyncio.CancelledError(), GeneratorExit(), Custom("sync")])
async def test_a_sync_process_fn_raising_a_base_exception_fails_only_its_batch(error: BaseException) -> None:
    calls = 0

    def not_async(batch: list[int]) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise error
        return echo(batch)

    # OnLoop: called at once, on the loop's thread; in a real worker thread it is the same
    async with DynamicBatcher(not_async, executor=OnLoop()) as batcher:
        with pytest.raises(BatchAbortedError, match=f"process_fn raised {type(error).__name__}") as info:
            await (await batcher.submit(1))
        assert info.value.__cause__ is error
        assert batcher.is_running
        assert await (await batcher.submit(2)) == 2


def run_until_interrupted(main: Any) -> tuple[VirtualClockLoop, BaseException]:
    """Run ``main()`` on a fresh virtual loop until the interrupt it provokes propagates out of the loop."""
    loop = VirtualClockLoop()
    with pytest.raises((KeyboardInterrupt, SystemExit)) as info:
        loop.run_until_complete(main())
    return loop, info.value


def finish(loop: VirtualClockLoop, batcher: DynamicBatcher[Any, Any]) -> None:
    """Let the loop run what the interrupt left scheduled, then close it with no task left."""
    loop.run_until_complete(batcher.stop())
    leftovers = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if leftovers:
        loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
    loop.close()


# A plain process_fn runs in a worker thread, where KeyboardInterrupt and SystemExit are
# only its own failure (signals reach the main thread): test_calling.py covers that case.
@pytest.mark.parametrize("where", ["on_batch", "plain process_fn returning a coroutine", "async process_fn"])
@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_keyboard_interrupt_or_system_exit_in_user_code_stops_the_batcher(
    where: str, interrupt: type[BaseException]
) -> None:
    futures: list[asyncio.Future[Any]] = []

    def hook(info: Any) -> None:
        if where == "on_batch":
            raise interrupt()

    def process(batch: list[int]) -> Any:
        return work(batch)

    async def work(batch: list[int]) -> list[int]:
        if where != "on_batch" and batch == [1]:
            raise interrupt()
        await asyncio.sleep(1)
        return batch

    fn: Any = work if where == "async process_fn" else process
    # OnLoop: the plain function is called on the loop's thread; what it returns is awaited there
    executor = OnLoop() if fn is process else None
    batcher = DynamicBatcher(fn, on_batch=hook, max_batch_size=1, dispatch="eager", executor=executor)

    async def main() -> None:
        await batcher.start()
        futures.extend([await batcher.submit(i) for i in (1, 2, 3)])
        await asyncio.wait(futures)

    loop, raised = run_until_interrupted(main)
    assert isinstance(raised, interrupt)
    if where != "on_batch":  # asyncio raised it out of process_fn's own task; the batcher sees it next
        loop.run_until_complete(asyncio.wait(futures))
    assert not batcher.is_running
    for future in futures if where != "on_batch" else futures[1:]:  # on_batch: batch 1 had its result
        with pytest.raises(BatcherStoppedError, match=f"process_fn raised {interrupt.__name__}|on_batch raised"):
            future.result()
        assert isinstance(future.exception().__cause__, interrupt)  # type: ignore[union-attr]

    async def later() -> None:
        with pytest.raises(RuntimeError, match=f"not running .*raised {interrupt.__name__}"):
            await batcher.submit(9)

    loop.run_until_complete(later())
    finish(loop, batcher)


# --------------------------------------------------------------------- 5. numbers that overflow


async def assert_nothing_counted(batcher: DynamicBatcher[Any, Any]) -> None:
    stats = batcher.stats
    assert (stats.total_submitted, stats.pending, stats.queue_depth) == (0, 0, 0), stats
    repr(stats)
    repr(batcher)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"priority": 10**400}, r"priority must be <= 9223372036854775807, got an int of 1329 bits"),
        ({"priority": -(10**400)}, r"priority must be >= -9223372036854775808"),
        ({"priority": 2**63}, r"priority must be <= 9223372036854775807, got 9223372036854775808"),
        ({"timeout_s": 10**400}, r"timeout_s must be <= 1e9 seconds \(about 31 years\), got an int of 1329 bits"),
        ({"timeout_s": 1e10}, r"timeout_s must be <= 1e9 seconds"),
        ({"timeout_s": math.inf}, r"timeout_s must be <= 1e9 seconds"),
        ({"estimated_cost": 10**400}, r"estimated_cost must be <= 2\*\*63 - 1, got an int of 1329 bits"),
        ({"estimated_cost": 2**63}, r"estimated_cost must be <= 2\*\*63 - 1"),
        ({"estimated_cost": -(10**5000)}, r"estimated_cost must be a non-negative int, got an int of 16610 bits"),
    ],
)
async def test_out_of_range_numbers_are_refused_and_nothing_is_counted(kwargs: dict[str, Any], match: str) -> None:
    async with DynamicBatcher(echo) as batcher:
        with pytest.raises(ValueError, match=match):
            await batcher.submit("x", **kwargs)
        with pytest.raises(ValueError, match=match):
            batcher.submit_nowait("x", **kwargs)
        with pytest.raises(ValueError, match=match):
            await batcher.submit_batch(["x"], **{k: [v] if k == "estimated_cost" else v for k, v in kwargs.items()})
        await assert_nothing_counted(batcher)
        assert await (await batcher.submit("y", priority=2**63 - 1, timeout_s=1e9, estimated_cost=2**63 - 1)) == "y"


@pytest.mark.asyncio
async def test_an_estimator_returning_a_huge_cost_is_refused_and_stats_stay_readable() -> None:
    class Huge:
        def estimate_cost(self) -> int:
            return 10**400

    async with DynamicBatcher(echo, cost_estimator=lambda r: 10**400 if r == "huge" else 2**63 - 1) as batcher:
        with pytest.raises(ValueError, match=r"cost_estimator must be <= 2\*\*63 - 1"):
            await batcher.submit("huge")
        await assert_nothing_counted(batcher)
        futures = [await batcher.submit("max") for _ in range(3)]
        assert await asyncio.gather(*futures) == ["max"] * 3
        stats = batcher.stats
        assert stats.total_batch_cost == 3 * (2**63 - 1)
        assert math.isfinite(stats.avg_batch_cost)
        repr(stats)
        stats._repr_html_()
    async with DynamicBatcher(echo) as batcher:
        with pytest.raises(ValueError, match=r"Huge.estimate_cost\(\) must be <= 2\*\*63 - 1"):
            await batcher.submit(Huge())
        await assert_nothing_counted(batcher)
    async with TokenBatcher(echo) as tokens:
        with pytest.raises(ValueError, match=r"estimated_tokens must be <= 2\*\*63 - 1"):
            await tokens.submit("x", estimated_tokens=2**63)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"request_timeout_s": 10**400}, r"request_timeout_s must be <= 1e9 seconds"),
        ({"priority_aging_s": math.inf}, r"priority_aging_s must be <= 1e9 seconds"),
        ({"default_cost": 2**63}, r"default_cost must be <= 9223372036854775807"),
        ({"batch_timeout_s": -(10**400)}, r"batch_timeout_s must be >= 0, got an int of 1329 bits"),
        ({"max_batch_size": -(10**5000)}, r"max_batch_size must be >= 1, got an int of 16610 bits"),
    ],
)
def test_out_of_range_settings_are_refused_naming_the_limit(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DynamicBatcher(echo, **kwargs)


@pytest.mark.asyncio
async def test_huge_but_meaningful_durations_mean_forever() -> None:
    batcher = DynamicBatcher(echo, batch_timeout_s=10**400, max_batch_size=2)
    await batcher.start()
    future = await batcher.submit(1)
    await batcher.stop(timeout=10**400)  # flushes the batch without waiting out its window
    assert future.result() == 1


# --------------------------------------------------------------------- 6. submit_batch all or nothing


@pytest.mark.asyncio
async def test_submit_batch_queues_nothing_when_stop_begins_while_it_waits_for_room() -> None:
    seen: list[int] = []

    async def spy(batch: list[int]) -> list[int]:
        seen.extend(batch)
        await asyncio.sleep(1.0)
        return batch

    batcher = DynamicBatcher(spy, max_queue_size=3, max_batch_size=1, dispatch="eager")
    await batcher.start()
    first = [await batcher.submit(i) for i in range(3)]  # 0 in process_fn, 1 and 2 queued
    await asyncio.sleep(0.1)
    waiting = asyncio.create_task(batcher.submit_batch([10, 11]))
    await asyncio.sleep(0.1)
    await batcher.stop()
    with pytest.raises(RuntimeError, match="stop\\(\\) has begun"):
        await waiting
    assert [f.result() for f in first] == [0, 1, 2]
    assert seen == [0, 1, 2]
    assert batcher.stats.total_submitted == 3


@pytest.mark.asyncio
async def test_submit_batch_waits_for_room_for_all_then_queues_them_at_once() -> None:
    async with DynamicBatcher(slow_echo, max_queue_size=3, max_batch_size=1, dispatch="eager") as batcher:
        first = [await batcher.submit(i) for i in range(3)]  # 0 in process_fn until t=1, 1 until t=2; 2 queued
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        waiting = asyncio.create_task(batcher.submit_batch([10, 11, 12]))
        await asyncio.sleep(1.4)  # t=1.5: room for two, not three
        assert (batcher.stats.queue_depth, waiting.done()) == (1, False)  # none of them queued yet
        futures = await waiting
        assert loop.time() == pytest.approx(2.0)  # room for three once 2 was taken too
        assert batcher.stats.queue_depth == 3  # all three at once
        assert await asyncio.gather(*first, *futures) == [0, 1, 2, 10, 11, 12]


@pytest.mark.asyncio
async def test_submit_batch_larger_than_the_queue_is_refused_at_once() -> None:
    async with DynamicBatcher(echo, max_queue_size=2) as batcher:
        with pytest.raises(ValueError, match="submit_batch got 3 records, more than max_queue_size=2"):
            await batcher.submit_batch([1, 2, 3])
        await assert_nothing_counted(batcher)
        assert await asyncio.gather(*await batcher.submit_batch([1, 2])) == [1, 2]
        assert await batcher.submit_batch([]) == []


# --------------------------------------------------------------------- 7. stats from another thread


class RacingDeque(deque[Any]):
    """A deque that the 'event loop' changes while a reader copies it, once."""

    raced = False

    def __iter__(self) -> Iterator[Any]:
        for i, value in enumerate(super().__iter__()):
            if i == 1 and not self.raced:
                self.raced = True
                self.append(value)  # the loop's thread appends mid-copy
            yield value


@pytest.mark.asyncio
async def test_stats_survive_a_container_changing_while_they_copy_it() -> None:
    async with DynamicBatcher(echo, max_batch_size=1) as batcher:
        await asyncio.gather(*[await batcher.submit(i) for i in range(3)])
        batcher._rec.sizes = RacingDeque(batcher._rec.sizes, maxlen=1024)
        stats = batcher.stats  # the first copy fails with "deque mutated during iteration"; it tries again
        assert stats.batch_size.max == 1.0
        assert batcher._rec.sizes.raced


@pytest.mark.real_clock
@pytest.mark.timeout(60)
@pytest.mark.asyncio
@pytest.mark.parametrize(
    "settings",
    [
        {"dispatch": "eager", "max_concurrent_batches": 3},
        {"grouping": "similar_cost", "batch_cost": "padded", "dispatch": "eager"},
    ],
)
async def test_stats_read_from_threads_under_load_never_raise_and_add_up(settings: dict[str, Any]) -> None:
    async def work(batch: list[int]) -> list[int]:
        await asyncio.sleep(0)
        return batch

    batcher = DynamicBatcher(work, max_batch_size=7, batch_timeout_s=0.0005, max_queue_size=5_000, **settings)
    done = threading.Event()
    problems: list[str] = []
    reads = [0, 0]

    def reader(index: int) -> None:
        last = (0, 0, 0, 0)
        while not done.is_set():
            try:
                stats = batcher.stats
                repr(batcher)
            except Exception as exc:  # the bug this guards against: "deque mutated during iteration"
                problems.append(repr(exc))
                return
            # Counters only grow; no record is counted twice (pending >= 0).  A record the loop is
            # letting go of may be missed for a moment (then it is pending), so cancelled may dip.
            now = (stats.total_submitted, stats.total_completed, stats.total_expired, stats.total_batches)
            if stats.pending < 0 or any(a < b for a, b in zip(now, last, strict=True)):
                problems.append(f"pending {stats.pending}, counters {now} after {last}")
            last = now
            reads[index] += 1

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
    async with batcher:
        for thread in threads:
            thread.start()
        try:
            for round_ in range(12):
                futures = [
                    batcher.submit_nowait(i, priority=i % 3 - 1, estimated_cost=1 + i % 50, timeout_s=1.0)
                    for i in range(400)
                ]
                for future in futures[round_ % 7 :: 7]:
                    future.cancel()
                await asyncio.gather(*futures, return_exceptions=True)
        finally:
            done.set()
            for thread in threads:
                thread.join(timeout=10)
    assert not problems, problems[:3]
    assert min(reads) > 0


# --------------------------------------------------------------------- 8. submit_threadsafe when the loop goes away


def run_loop_in_thread() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    return loop, thread


@pytest.mark.real_clock
@pytest.mark.timeout(30)
def test_submit_threadsafe_on_a_loop_that_stopped_without_stop_fails_at_once() -> None:
    loop, thread = run_loop_in_thread()
    batcher = DynamicBatcher(echo)
    asyncio.run_coroutine_threadsafe(batcher.start(), loop).result(timeout=5)
    assert batcher.submit_threadsafe(1).result(timeout=5) == 1
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    with pytest.raises(BatcherStoppedError, match="not running"):
        batcher.submit_threadsafe(2).result(timeout=5)
    loop.close()
    with pytest.raises(BatcherStoppedError, match="not running"):
        batcher.submit_threadsafe(3).result(timeout=5)


@pytest.mark.real_clock
@pytest.mark.timeout(30)
def test_submit_threadsafe_handed_to_a_loop_that_drops_it_unrun_fails() -> None:
    loop = asyncio.new_event_loop()
    batcher = DynamicBatcher(echo)
    loop.run_until_complete(batcher.start())
    is_running = loop.is_running
    loop.is_running = lambda: True  # type: ignore[method-assign]  # as if it stopped right after this check
    try:
        outcome = batcher.submit_threadsafe(1)
    finally:
        loop.is_running = is_running  # type: ignore[method-assign]
    handoff = loop._ready.pop()  # type: ignore[attr-defined]  # what loop.close() does to every scheduled callback
    handoff.cancel()
    del handoff
    with pytest.raises(BatcherStoppedError, match="closed"):
        outcome.result(timeout=5)
    loop.run_until_complete(batcher.stop())
    loop.close()


@pytest.mark.real_clock
@pytest.mark.timeout(30)
def test_submit_threadsafe_futures_fail_when_asyncio_run_returns_without_stop() -> None:
    batcher = DynamicBatcher(hang, max_queue_size=1, max_batch_size=1, dispatch="eager")
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        entered = asyncio.Event()
        holder["go"] = go = asyncio.Event()
        holder["loop"] = asyncio.get_running_loop()

        waiting_for_room = asyncio.Event()
        wait_for_room = batcher._wait_for_room

        async def hang_and_say(batch: list[int]) -> list[int]:
            entered.set()
            return await hang(batch)

        async def say_and_wait_for_room(n: int = 1) -> None:
            waiting_for_room.set()
            await wait_for_room(n)

        batcher._process_fn = hang_and_say
        batcher._wait_for_room = say_and_wait_for_room  # type: ignore[method-assign]
        await batcher.start()
        ready.set()
        await go.wait()
        await entered.wait()
        await waiting_for_room.wait()
        # returns without stop(): asyncio.run cancels every task and closes the loop

    runner = threading.Thread(target=asyncio.run, args=(main(),))
    runner.start()
    assert ready.wait(timeout=10)
    outcomes = [batcher.submit_threadsafe(i) for i in range(3)]  # in process_fn, queued, waiting for room
    holder["loop"].call_soon_threadsafe(holder["go"].set)
    runner.join(timeout=10)
    for outcome in outcomes:
        error = outcome.exception(timeout=5)
        assert isinstance(error, BatcherStoppedError), repr(error)
        assert "cancelled its tasks" in str(error)


@pytest.mark.real_clock
@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_submit_threadsafe_checks_its_arguments_in_the_callers_thread() -> None:
    async with DynamicBatcher(echo) as batcher:
        loop = asyncio.get_running_loop()

        def call(**kwargs: Any) -> concurrent.futures.Future[Any]:
            return batcher.submit_threadsafe(1, **kwargs)

        with pytest.raises(ValueError, match="priority must be <="):
            await loop.run_in_executor(None, lambda: call(priority=2**63))
        with pytest.raises(ValueError, match="timeout_s must be > 0"):
            await loop.run_in_executor(None, lambda: call(timeout_s=0))
        assert batcher.stats.total_submitted == 0


# --------------------------------------------------------------------- 9. messages that name the failure


@pytest.mark.asyncio
async def test_a_failure_inside_a_batch_names_itself_on_that_batchs_futures(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="tokenbatcher")
    batcher = DynamicBatcher(hang, max_batch_size=1, dispatch="eager")
    await batcher.start()
    await batcher.submit(0)
    await batcher.stop(timeout=1.0)  # this run's futures say "stop(timeout=1.0) ran out"
    await batcher.start()

    def broken(*args: Any) -> None:
        raise MemoryError("simulated bug")

    batcher._rec.batch = broken  # type: ignore[method-assign]  # fails inside the slot, mid-batch
    futures = [await batcher.submit(i) for i in range(2)]
    await asyncio.wait(futures)
    for future in futures:
        error = future.exception()
        assert isinstance(error, BatcherStoppedError)
        assert "an internal loop failed (MemoryError('simulated bug'))" in str(error), str(error)
        assert isinstance(error.__cause__, MemoryError)
    with pytest.raises(RuntimeError, match="internal loop failed"):
        await batcher.submit(9)


@pytest.mark.asyncio
async def test_tasks_cancelled_from_outside_are_not_called_another_event_loop() -> None:
    batcher = DynamicBatcher(echo)
    await batcher.start()
    future = await batcher.submit(1)
    for task in batcher._tasks:
        task.cancel()  # someone cancels every task on the loop, without stop()
    with pytest.raises(BatcherStoppedError, match="cancelled its tasks"):
        await future
    with pytest.raises(RuntimeError, match=r"not running \(the event loop running the batcher cancelled its tasks"):
        await batcher.submit(2)
    await batcher.start()
    assert await (await batcher.submit(3)) == 3
    await batcher.stop()
