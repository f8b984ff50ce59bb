"""No future is ever lost or stranded: shutdown, faults, cancellation, bad input.

Each test injects one fault that a naive batcher (or flyte.extras 2.12) gets
wrong; the virtual clock turns any stranded future into a ``Deadlock``.
"""

from __future__ import annotations

import asyncio
import math
from fractions import Fraction
from typing import Any

import pytest

from conftest import run_virtual
from tokenbatcher import BatchAbortedError, BatcherStoppedError, DynamicBatcher, TokenBatcher


async def echo(batch: list[Any]) -> list[Any]:
    return list(batch)


def slow(seconds: float) -> Any:
    async def fn(batch: list[Any]) -> list[Any]:
        await asyncio.sleep(seconds)
        return list(batch)

    return fn


async def hang(batch: list[Any]) -> list[Any]:
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable")


# --------------------------------------------------------------------- shutdown


@pytest.mark.asyncio
async def test_stop_processes_everything_accepted_and_refuses_new_records_at_once() -> None:
    batcher = DynamicBatcher(slow(0.1), max_batch_size=4, max_queue_size=8)
    await batcher.start()
    accepted: list[asyncio.Future[Any]] = []
    refused: list[BaseException] = []

    async def producer(base: int) -> None:
        for i in range(100):
            try:
                accepted.append(await batcher.submit(base + i))
            except RuntimeError as exc:
                refused.append(exc)
                return

    producers = [asyncio.create_task(producer(1000 * p)) for p in range(5)]
    await asyncio.sleep(0.35)
    await batcher.stop()
    await asyncio.gather(*producers)
    assert all(f.done() for f in accepted)
    assert [f.result() for f in accepted] == [f.result() for f in accepted if not f.exception()]
    assert len(refused) == 5  # every producer, blocked on a full queue or not, was told
    assert all("not running" in str(exc) for exc in refused)
    stats = batcher.stats
    assert stats.total_completed == len(accepted) == stats.total_submitted
    assert stats.pending == 0


@pytest.mark.asyncio
async def test_submit_during_stop_raises_and_stop_still_drains() -> None:
    batcher = DynamicBatcher(slow(1.0))
    await batcher.start()
    future = await batcher.submit("in")
    stopping = asyncio.create_task(batcher.stop())
    await asyncio.sleep(0)
    assert batcher.is_running  # until stop() returns
    with pytest.raises(RuntimeError, match="not running"):
        await batcher.submit("late")
    with pytest.raises(RuntimeError, match="not running"):
        batcher.submit_nowait("late")
    await stopping
    assert future.result() == "in"
    assert not batcher.is_running


@pytest.mark.asyncio
async def test_stop_timeout_cancels_in_flight_work_and_fails_the_rest() -> None:
    batcher = DynamicBatcher(hang, max_batch_size=2, dispatch="eager")
    await batcher.start()
    futures = [await batcher.submit(i) for i in range(5)]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await batcher.stop(timeout=2.0)
    assert loop.time() - t0 == pytest.approx(2.0)
    for future in futures:
        with pytest.raises(BatcherStoppedError, match=r"stop\(timeout=2.0\) ran out of time"):
            future.result()
    assert batcher.stats.total_failed == 5
    assert batcher.stats.pending == 0


@pytest.mark.asyncio
async def test_cancelling_the_task_calling_stop_fails_everything_at_once() -> None:
    batcher = DynamicBatcher(hang)
    await batcher.start()
    futures = [await batcher.submit(i) for i in range(3)]
    stopper = asyncio.create_task(batcher.stop())
    await asyncio.sleep(1)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert all(isinstance(f.exception(), BatcherStoppedError) for f in futures)
    assert not batcher.is_running


@pytest.mark.asyncio
async def test_stop_twice_concurrently_and_again_is_harmless_and_restart_works() -> None:
    batcher = DynamicBatcher(slow(0.5))
    await batcher.stop()  # never started: a no-op
    await batcher.start()
    future = await batcher.submit(1)
    await asyncio.gather(batcher.stop(), batcher.stop())
    await batcher.stop()
    assert future.result() == 1
    await batcher.start()
    assert await (await batcher.submit(2)) == 2
    await batcher.stop()
    assert batcher.stats.total_completed == 2  # cumulative across restarts


# --------------------------------------------------------------------- faults in process_fn


@pytest.mark.asyncio
async def test_cancelled_error_inside_process_fn_fails_the_batch_only() -> None:
    calls = 0

    async def cancels_once(batch: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncio.CancelledError
        return batch

    async with DynamicBatcher(cancels_once) as batcher:
        first = [await batcher.submit(i) for i in range(3)]
        for future in first:
            with pytest.raises(BatchAbortedError, match="cancelled"):
                await future
        assert await (await batcher.submit(9)) == 9


class Custom(BaseException):
    pass


@pytest.mark.asyncio
async def test_other_base_exceptions_are_wrapped_with_their_cause() -> None:
    async def raises(batch: list[int]) -> list[int]:
        raise Custom("deep")

    async with DynamicBatcher(raises) as batcher:
        future = await batcher.submit(1)
        with pytest.raises(BatchAbortedError) as info:
            await future
        assert isinstance(info.value.__cause__, Custom)
        assert batcher.is_running


@pytest.mark.asyncio
@pytest.mark.parametrize("result", [None, 3, "ab", {1: 2}, iter([1, 2])])
async def test_a_result_that_is_not_a_list_is_a_type_error(result: Any) -> None:
    async def wrong(batch: list[int]) -> Any:
        return result

    async with DynamicBatcher(wrong) as batcher:
        futures = [await batcher.submit(1), await batcher.submit(2)]
        for future in futures:
            with pytest.raises(TypeError, match="must return a list of 2 results"):
                await future


@pytest.mark.real_clock
@pytest.mark.asyncio
async def test_a_plain_process_fn_runs_off_the_event_loop() -> None:
    def plain(batch: list[int]) -> list[int]:
        with pytest.raises(RuntimeError, match="no running event loop"):
            asyncio.get_running_loop()  # a worker thread (tests/test_calling.py has the rest)
        return batch

    async with DynamicBatcher(plain) as batcher:
        assert await (await batcher.submit(1)) == 1


@pytest.mark.asyncio
async def test_an_internal_loop_failure_fails_every_future_at_once_and_later_submits() -> None:
    batcher = DynamicBatcher(slow(5.0), max_batch_size=1, dispatch="eager")
    await batcher.start()
    futures = [await batcher.submit(i) for i in range(4)]
    await asyncio.sleep(0.1)

    def broken_take() -> Any:
        raise MemoryError("simulated bug")

    batcher._pending.take = broken_take  # type: ignore[method-assign]
    await asyncio.sleep(5.0)  # the first batch ends; the loop then fails taking the next
    assert [f.done() for f in futures] == [True] * 4
    assert futures[0].result() == 0
    for future in futures[1:]:
        with pytest.raises(BatcherStoppedError, match="internal loop"):
            future.result()
    assert not batcher.is_running
    with pytest.raises(RuntimeError, match="internal loop failed"):
        await batcher.submit(9)
    await batcher.stop()


# --------------------------------------------------------------------- cancellation


@pytest.mark.asyncio
async def test_cancelled_records_are_never_sent_to_process_fn() -> None:
    seen: list[int] = []

    async def spy(batch: list[int]) -> list[int]:
        seen.extend(batch)
        await asyncio.sleep(1)
        return batch

    async with DynamicBatcher(spy, prefetch_batches=1, max_batch_size=3, batch_timeout_s=0.01) as batcher:
        futures = [await batcher.submit(i) for i in range(9)]
        await asyncio.sleep(0.1)  # [0,1,2] in flight, [3,4,5] sealed in prefetch, [6,7,8] queued
        for i in (3, 4, 5, 7):
            futures[i].cancel()
        await asyncio.gather(*futures, return_exceptions=True)
    assert seen == [0, 1, 2, 6, 8]
    stats = batcher.stats
    assert (stats.total_completed, stats.total_cancelled, stats.total_batches) == (5, 4, 2)


@pytest.mark.asyncio
async def test_a_record_cancelled_in_flight_is_counted_and_others_get_results() -> None:
    async with DynamicBatcher(slow(1.0)) as batcher:
        futures = [await batcher.submit(i) for i in range(3)]
        await asyncio.sleep(0.5)
        futures[1].cancel()
        assert (await futures[0], await futures[2]) == (0, 2)
    assert (batcher.stats.total_completed, batcher.stats.total_cancelled) == (2, 1)


@pytest.mark.asyncio
async def test_a_submitter_cancelled_on_a_full_queue_leaves_nothing_behind() -> None:
    async with DynamicBatcher(slow(1.0), max_queue_size=1, max_batch_size=1, dispatch="eager") as batcher:
        futures = [await batcher.submit(0)]
        await asyncio.sleep(0.1)
        futures.append(await batcher.submit(1))  # the queue is full now
        blocked = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0.1)
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
        futures.append(await batcher.submit(3))  # the wake-up was not lost
        assert await asyncio.gather(*futures) == [0, 1, 3]
    assert batcher.stats.total_submitted == 3


@pytest.mark.asyncio
async def test_an_expired_record_makes_room_for_a_blocked_submitter() -> None:
    batcher = DynamicBatcher(hang, max_queue_size=1, max_batch_size=1, dispatch="eager")
    await batcher.start()
    stuck = await batcher.submit(0)  # in process_fn forever
    await asyncio.sleep(0.1)
    doomed = await batcher.submit(1, timeout_s=1.0)  # the queue is full
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    blocked = asyncio.create_task(batcher.submit(2))
    await asyncio.wait([blocked])
    assert loop.time() - t0 == pytest.approx(1.0)  # admitted when 1 expired
    assert isinstance(doomed.exception(), TimeoutError)
    await batcher.stop(timeout=1.0)
    assert isinstance(stuck.exception(), BatcherStoppedError)
    assert isinstance(blocked.result().exception(), BatcherStoppedError)
    assert batcher.stats.pending == 0


# --------------------------------------------------------------------- bad input


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("cost", "error", "match"),
    [
        (2.5, TypeError, r"estimated_cost must be a non-negative int, got 2.5 \(float\)"),
        (True, TypeError, "got True"),
        ("3", TypeError, "got '3'"),
        (Fraction(1, 2), TypeError, "Fraction"),
        (-1, ValueError, "must be a non-negative int, got -1"),
        (math.nan, TypeError, "nan"),
    ],
)
async def test_a_bad_explicit_cost_fails_only_its_caller(cost: Any, error: type, match: str) -> None:
    async with DynamicBatcher(echo) as batcher:
        with pytest.raises(error, match=match):
            await batcher.submit("x", estimated_cost=cost)
        assert await (await batcher.submit("y", estimated_cost=2)) == "y"
    assert batcher.stats.total_submitted == 1


@pytest.mark.asyncio
async def test_token_batcher_names_the_token_parameters_in_errors() -> None:
    async with TokenBatcher(echo, token_estimator=lambda r: -4) as batcher:
        with pytest.raises(ValueError, match="estimated_tokens"):
            await batcher.submit("x", estimated_tokens=-1)
        with pytest.raises(ValueError, match="token_estimator"):
            await batcher.submit("x")


@pytest.mark.asyncio
async def test_integer_like_costs_are_accepted() -> None:
    class Index:
        def __index__(self) -> int:
            return 3

    async with DynamicBatcher(echo) as batcher:
        assert await (await batcher.submit("x", estimated_cost=Index())) == "x"  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_a_raising_or_lying_estimator_reaches_only_its_caller() -> None:
    def estimator(record: Any) -> Any:
        if record == "raise":
            raise LookupError("no tokenizer")
        return 1.5 if record == "float" else 1

    async with DynamicBatcher(echo, cost_estimator=estimator) as batcher:
        with pytest.raises(LookupError, match="no tokenizer"):
            await batcher.submit("raise")
        with pytest.raises(TypeError, match=r"cost_estimator must be a non-negative int, got 1\.5"):
            await batcher.submit("float")
        assert await (await batcher.submit("ok")) == "ok"


@pytest.mark.asyncio
async def test_a_records_own_estimate_method_is_validated_too() -> None:
    class Liar:
        def estimate_cost(self) -> Any:
            return None

    async with DynamicBatcher(echo) as batcher:
        with pytest.raises(TypeError, match=r"Liar.estimate_cost\(\) must be a non-negative int"):
            await batcher.submit(Liar())


@pytest.mark.asyncio
async def test_bad_timeout_and_priority_are_rejected() -> None:
    async with DynamicBatcher(echo) as batcher:
        with pytest.raises(ValueError, match="timeout_s must be > 0, got 0"):
            await batcher.submit("x", timeout_s=0)
        with pytest.raises(TypeError, match="priority must be an int"):
            await batcher.submit("x", priority=0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"process_fn": "nope"}, TypeError, "process_fn must be callable"),
        ({"max_batch_size": 0}, ValueError, "max_batch_size must be >= 1, got 0"),
        ({"max_batch_size": 2.0}, TypeError, "max_batch_size must be an int"),
        ({"min_batch_size": 0}, ValueError, "min_batch_size must be >= 1, got 0"),
        ({"min_batch_size": 9, "max_batch_size": 8}, ValueError, "min_batch_size must be <= max_batch_size"),
        ({"batch_timeout_s": -0.1}, ValueError, "batch_timeout_s must be >= 0, got -0.1"),
        ({"batch_timeout_s": math.nan}, ValueError, "batch_timeout_s must be >= 0"),
        ({"target_batch_cost": 0}, ValueError, "target_batch_cost must be >= 1, got 0"),
        ({"max_queue_size": -5}, ValueError, "max_queue_size must be >= 1, got -5"),
        ({"prefetch_batches": 0}, ValueError, "prefetch_batches must be >= 1, got 0"),
        ({"default_cost": -1}, ValueError, "default_cost must be >= 0, got -1"),
        ({"dispatch": "greedy"}, ValueError, "dispatch must be one of 'window', 'eager', got 'greedy'"),
        ({"max_concurrent_batches": 0}, ValueError, "max_concurrent_batches must be >= 1"),
        ({"request_timeout_s": 0}, ValueError, "request_timeout_s must be > 0"),
        ({"batch_cost": "max"}, ValueError, "batch_cost must be one of"),
        ({"grouping": "lifo"}, ValueError, "grouping must be one of"),
        ({"cost_estimator": 3}, TypeError, "cost_estimator must be callable"),
        ({"on_batch": 3}, TypeError, "on_batch must be callable"),
    ],
)
def test_invalid_settings_are_rejected_naming_the_parameter(kwargs: dict[str, Any], error: type, match: str) -> None:
    kwargs = {"process_fn": echo, **kwargs}
    with pytest.raises(error, match=match):
        DynamicBatcher(**kwargs)


def test_token_batcher_validates_under_its_own_names() -> None:
    with pytest.raises(ValueError, match="target_batch_tokens must be >= 1, got 0"):
        TokenBatcher(echo, target_batch_tokens=0)
    with pytest.raises(ValueError, match="default_token_estimate must be >= 0, got -2"):
        TokenBatcher(echo, default_token_estimate=-2)


# --------------------------------------------------------------------- event-loop misuse


def test_a_batcher_used_from_a_second_event_loop_says_what_happened() -> None:
    batcher = DynamicBatcher(echo)

    async def first() -> None:
        await batcher.start()  # never stopped: the classic cached singleton

    async def second() -> None:
        with pytest.raises(RuntimeError, match=r"started on another event loop, which is closed.*cache_clear"):
            await batcher.submit(1)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(first())
    for task in asyncio.all_tasks(loop):
        task.cancel()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    run_virtual(second())


@pytest.mark.asyncio
async def test_submit_batch_is_all_or_nothing_when_cancelled_waiting_for_room() -> None:
    seen: list[int] = []

    async def spy(batch: list[int]) -> list[int]:
        seen.extend(batch)
        await asyncio.sleep(1.0)
        return batch

    async with DynamicBatcher(spy, max_queue_size=3, max_batch_size=1, dispatch="eager") as batcher:
        first = await batcher.submit(0)  # in process_fn until t=1
        await asyncio.sleep(0.1)
        second = await batcher.submit(1)  # queued: room for 2 more, not 3
        pending = asyncio.create_task(batcher.submit_batch([10, 11, 12]))
        await asyncio.sleep(0.1)  # waiting for room for all three
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert await asyncio.gather(first, second) == [0, 1]
    assert seen == [0, 1]  # none of 10, 11, 12 was ever queued
    assert (batcher.stats.total_submitted, batcher.stats.total_cancelled) == (2, 0)
