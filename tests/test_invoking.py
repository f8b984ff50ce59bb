"""Where a ``process_fn`` call runs (``_invoking.py``), and what that must not change.

On Python 3.11+ the slot's own task awaits ``process_fn``; on 3.10 each call
has a task of its own.  Every test here runs both ways (``where``): the 3.10
way is forced by ``IN_SLOT = False``.  What must hold either way: a
``process_fn`` that ignores, or swallows, the cancel of a stop that gave up
cannot hold up ``stop()`` or a restart, and leaves the counters right; a
``CancelledError`` it raises of itself fails only its batch; the asyncio
tools that cancel the current task (``asyncio.timeout``, ``TaskGroup``) work
inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import VirtualClockLoop
from tokenbatcher import BatchAbortedError, BatcherStoppedError, DynamicBatcher, _invoking

WAYS = ["in the slot", "a task per call"] if sys.version_info >= (3, 11) else ["a task per call"]


@pytest.fixture(params=WAYS)
def where(request: pytest.FixtureRequest) -> Iterator[str]:
    saved = _invoking.IN_SLOT
    _invoking.IN_SLOT = request.param == "in the slot"
    try:
        yield request.param
    finally:
        _invoking.IN_SLOT = saved


def stubborn(*, swallow: bool) -> Any:
    """A process_fn whose first call ignores cancellation (``swallow``: returns right after it)."""
    calls = 0
    release = asyncio.Event()

    async def fn(batch: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    if swallow:
                        return batch
                    await release.wait()  # ignores the cancel until the test lets it go
                    return batch
        return batch

    fn.release = release  # type: ignore[attr-defined]
    return fn


@pytest.mark.asyncio
@pytest.mark.parametrize("swallow", [False, True])
async def test_a_process_fn_ignoring_the_cancel_holds_up_neither_stop_nor_a_restart(where: str, swallow: bool) -> None:
    fn = stubborn(swallow=swallow)
    batcher = DynamicBatcher(fn, max_batch_size=1, dispatch="eager")
    await batcher.start()
    stuck = await batcher.submit(1)
    waiting = await batcher.submit(2)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await batcher.stop(timeout=2.0)
    assert loop.time() - t0 == pytest.approx(2.0)
    for future in (stuck, waiting):
        with pytest.raises(BatcherStoppedError, match=r"stop\(timeout=2.0\) ran out"):
            future.result()
    stats = batcher.stats
    assert stats.in_flight_batches == 0  # the abort settled the batch its call never gave back
    assert stats.total_batches == 1
    await batcher.start()  # at once, whatever the stuck call does
    assert await (await batcher.submit(3)) == 3
    fn.release.set()  # the stuck call returns now: it must touch nothing of the new run
    for _ in range(5):
        await asyncio.sleep(0)
    assert await (await batcher.submit(4)) == 4
    await batcher.stop()
    stats = batcher.stats
    assert (stats.total_completed, stats.total_failed, stats.in_flight_batches) == (2, 2, 0)
    with contextlib.suppress(asyncio.CancelledError):  # what is left of the stuck call, if anything
        await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not asyncio.current_task()))


@pytest.mark.asyncio
async def test_a_cancelled_error_raised_by_process_fn_itself_fails_its_batch_only(where: str) -> None:
    calls = 0

    async def fn(batch: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.5)
        if calls == 1:
            raise asyncio.CancelledError
        return batch

    async with DynamicBatcher(fn, max_batch_size=1, dispatch="eager") as batcher:
        first = await batcher.submit(1)
        with pytest.raises(BatchAbortedError, match="process_fn was cancelled") as info:
            await first
        if where == "in the slot":  # a cancelled task keeps no exception to be the cause
            assert isinstance(info.value.__cause__, asyncio.CancelledError)
        assert await (await batcher.submit(2)) == 2
        assert batcher.is_running


@pytest.mark.asyncio
@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout and TaskGroup are 3.11+")
async def test_asyncio_timeout_and_task_groups_inside_process_fn_cancel_only_their_own_work(where: str) -> None:
    async def fn(batch: list[float]) -> list[str]:
        async with asyncio.timeout(1.0):  # type: ignore[attr-defined,unused-ignore]
            async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined,unused-ignore]
                tasks = [group.create_task(asyncio.sleep(x, result=f"slept {x}")) for x in batch]
        return [t.result() for t in tasks]

    async with DynamicBatcher(fn, max_batch_size=1, dispatch="eager") as batcher:
        too_slow = await batcher.submit(5.0)
        with pytest.raises(TimeoutError):
            await too_slow
        assert await (await batcher.submit(0.5)) == "slept 0.5"
        assert batcher.is_running
    assert batcher.stats.total_completed == 1


@pytest.mark.asyncio
async def test_a_process_fn_that_never_suspends_resolves_its_caller_and_serves_on(where: str) -> None:
    async def at_once(batch: list[int]) -> list[int]:
        return [x + 1 for x in batch]

    async with DynamicBatcher(at_once, dispatch="eager") as batcher:
        for i in range(50):
            assert await (await batcher.submit(i)) == i + 1
    stats = batcher.stats
    assert (stats.total_completed, stats.in_flight_batches) == (50, 0)


@pytest.mark.asyncio
async def test_a_slot_whose_process_fn_never_suspends_lets_other_tasks_run_between_batches(where: str) -> None:
    ticks = 0
    seen: list[int] = []

    async def at_once(batch: list[int]) -> list[int]:
        seen.append(ticks)
        return batch

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async with DynamicBatcher(at_once, max_batch_size=10, dispatch="eager") as batcher:
        futures = [batcher.submit_nowait(i) for i in range(100)]  # queued in one step: ten batches' worth
        other = asyncio.create_task(ticker())
        await asyncio.wait(futures)
        other.cancel()
    assert len(seen) == 10
    assert all(b > a for a, b in itertools.pairwise(seen)), seen  # the other task ran between every two batches


@pytest.mark.parametrize("dispatch", ["eager", "window"])
@pytest.mark.asyncio
async def test_after_a_process_fn_that_suspended_the_next_batch_starts_before_the_callers_resume(
    where: str, dispatch: str
) -> None:
    log: list[str] = []

    async def model(batch: list[int]) -> list[int]:
        log.append(f"start {batch[0]}")
        await asyncio.sleep(0.01)
        return batch

    async def caller(future: asyncio.Future[int]) -> None:
        log.append(f"resumed {await future}")

    async with DynamicBatcher(model, max_batch_size=1, dispatch=dispatch, batch_timeout_s=0.001) as batcher:
        futures = [batcher.submit_nowait(i) for i in range(3)]
        await asyncio.gather(*(caller(f) for f in futures))
    if where == "in the slot":  # the model is not left idle while the batch before's callers run
        assert log == ["start 0", "start 1", "resumed 0", "start 2", "resumed 1", "resumed 2"]
    else:  # the call's own task resolves the futures before it wakes the slot
        assert log == ["start 0", "resumed 0", "start 1", "resumed 1", "start 2", "resumed 2"]


@pytest.mark.asyncio
async def test_records_arriving_while_batches_run_go_to_the_model_before_the_last_batch_s_callers_resume(
    where: str,
) -> None:
    # Each record arrives while the batch before it runs, so the queue is empty each time a batch is
    # handed over: from the second batch on, the slot knows records arrive while its batches run.
    log: list[str] = []
    started = [asyncio.Event() for _ in range(4)]

    async def model(batch: list[int]) -> list[int]:
        log.append(f"start {batch[0]}")
        started[batch[0]].set()
        await asyncio.sleep(0.01)
        return batch

    async def caller(future: asyncio.Future[int]) -> None:
        log.append(f"resumed {await future}")

    async with DynamicBatcher(model, dispatch="eager") as batcher:
        callers = []
        for i in range(4):
            callers.append(asyncio.ensure_future(caller(batcher.submit_nowait(i))))
            await started[i].wait()
        await asyncio.gather(*callers)
    if where == "in the slot":
        # The first batch's caller resumes before the next batch (nothing had arrived during a batch yet);
        # after that, the next batch goes first and the callers run while the model works.
        assert log == ["start 0", "resumed 0", "start 1", "start 2", "resumed 1", "start 3", "resumed 2", "resumed 3"]
    else:  # the call's own task resolves the futures before it wakes the slot
        assert log == ["start 0", "resumed 0", "start 1", "resumed 1", "start 2", "resumed 2", "start 3", "resumed 3"]


@pytest.mark.asyncio
async def test_with_records_waiting_the_next_batch_is_handed_over_before_the_last_one_s_futures_resolve(
    where: str,
) -> None:
    # Resolving a batch's futures (a set_result each) is time the model would sit idle: with records
    # waiting, the slot hands the next batch over first, and the futures resolve in the loop turn after.
    done_at_start: list[list[bool]] = []
    futures: list[asyncio.Future[int]] = []

    async def model(batch: list[int]) -> list[int]:
        done_at_start.append([futures[i].done() for i in range(batch[0])])
        await asyncio.sleep(0.01)
        return [x * 10 for x in batch]

    async with DynamicBatcher(model, max_batch_size=2, dispatch="eager") as batcher:
        futures += [batcher.submit_nowait(i) for i in range(6)]  # three batches' worth, queued at once
        assert await asyncio.gather(*futures) == [x * 10 for x in range(6)]
        assert batcher.stats.total_completed == 6
    if where == "in the slot":
        # Batch 2 starts before batch 1's futures are resolved; the last batch (nothing waits) is not deferred.
        assert done_at_start == [[], [False, False], [True, True, False, False]]
    else:  # the call's own task resolves its futures before it wakes the slot
        assert done_at_start == [[], [True, True], [True, True, True, True]]


@pytest.mark.asyncio
async def test_a_result_list_that_process_fn_reuses_still_reaches_the_right_callers(where: str) -> None:
    # The deferred delivery copies the list: a process_fn that refills one list each call cannot
    # overwrite the batch before's results.
    out: list[int] = []

    async def model(batch: list[int]) -> list[int]:
        out.clear()
        out.extend(x + 100 for x in batch)
        await asyncio.sleep(0.01)
        return out

    async with DynamicBatcher(model, max_batch_size=3, dispatch="eager") as batcher:
        futures = [batcher.submit_nowait(i) for i in range(9)]
        assert await asyncio.gather(*futures) == [x + 100 for x in range(9)]


@pytest.mark.asyncio
async def test_a_result_list_of_the_wrong_length_fails_its_batch_at_once_with_records_waiting(where: str) -> None:
    errors: list[BaseException | None] = []

    async def model(batch: list[int]) -> list[int]:
        await asyncio.sleep(0.01)
        return batch[:-1] if batch[0] == 0 else batch

    async with DynamicBatcher(
        model, max_batch_size=2, dispatch="eager", on_batch=lambda info: errors.append(info.error)
    ) as batcher:
        futures = [batcher.submit_nowait(i) for i in range(6)]
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert [type(o).__name__ for o in outcomes[:2]] == ["ValueError", "ValueError"]
    assert outcomes[2:] == [2, 3, 4, 5]
    assert isinstance(errors[0], ValueError)
    assert errors[1:] == [None, None]
    assert batcher.stats.total_failed == 2
    assert batcher.stats.total_completed == 4


@pytest.mark.asyncio
async def test_the_on_batch_hook_sees_its_batch_resolved_even_with_records_waiting(where: str) -> None:
    # The hook is documented to run after the batch's futures are resolved: no deferring then.
    futures: list[asyncio.Future[int]] = []
    seen: list[bool] = []

    async def model(batch: list[int]) -> list[int]:
        await asyncio.sleep(0.01)
        return batch

    def hook(info: Any) -> None:
        seen.append(all(f.done() for f in futures[: 2 * (len(seen) + 1)]))

    async with DynamicBatcher(model, max_batch_size=2, dispatch="eager", on_batch=hook) as batcher:
        futures += [batcher.submit_nowait(i) for i in range(6)]
        assert await asyncio.gather(*futures) == list(range(6))
    assert seen == [True, True, True]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="results are deferred only when process_fn runs in the slot")
def test_an_interrupt_in_the_next_call_still_leaves_the_batch_before_its_results() -> None:
    # Batch 1 returns with records waiting, so its results wait for the next loop turn; batch 2's call
    # raises KeyboardInterrupt in that same step.  The batcher stops, and batch 1 (processed) must get its
    # results at once, not a BatcherStoppedError, nor nothing if the loop never turns again.
    # (Only in the slot: a task per call delivers at once, and on CPython 3.11 a KeyboardInterrupt
    # leaving a task that way upsets the interpreter's AST recursion counter for the rest of the run.)
    futures: list[asyncio.Future[int]] = []

    async def model(batch: list[int]) -> list[int]:
        if batch[0] == 2:
            raise KeyboardInterrupt
        await asyncio.sleep(0.01)
        return batch

    batcher = DynamicBatcher(model, max_batch_size=2, dispatch="eager")

    async def main() -> None:
        await batcher.start()
        futures.extend(batcher.submit_nowait(i) for i in range(4))
        await asyncio.wait(futures)

    loop = VirtualClockLoop()
    with pytest.raises(KeyboardInterrupt):
        loop.run_until_complete(main())
    try:
        assert [f.result() for f in futures[:2]] == [0, 1]  # right after the interrupt: no loop turn since
        for future in futures[2:]:
            with pytest.raises(BatcherStoppedError, match="process_fn raised KeyboardInterrupt"):
                future.result()
    finally:
        loop.run_until_complete(batcher.stop())
        leftovers = [t for t in asyncio.all_tasks(loop) if not t.done()]
        if leftovers:
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        loop.close()
