"""on_batch_error="isolate": only the records a batch fails on get the exception.

The batch is re-run in halves (``_isolate.py``); these tests pin who gets
what, how many calls it costs, what is not isolated, the stats and the
``on_batch`` report, and what cancellation and ``stop`` do meanwhile.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_virtual
from tokenbatcher import BatchAbortedError, BatcherStoppedError, BatchInfo, DynamicBatcher


class Poisoned(Exception):
    """What process_fn raises on a batch holding a poisoned record."""


class Picky:
    """A process_fn that fails any batch holding a poisoned record, and counts its calls."""

    def __init__(self, poisoned: set[int], work_s: float = 0.0) -> None:
        self.poisoned = poisoned
        self.work_s = work_s
        self.calls: list[list[int]] = []

    async def __call__(self, batch: list[int]) -> list[int]:
        self.calls.append(list(batch))
        if self.work_s:
            await asyncio.sleep(self.work_s)
        bad = sorted(self.poisoned.intersection(batch))
        if bad:
            raise Poisoned(f"poisoned {bad}")
        return [10 * x for x in batch]


async def run_batch(fn: Any, n: int, **kwargs: Any) -> tuple[list[Any], DynamicBatcher[int, Any]]:
    """Submit ``n`` records as one batch; return each record's outcome."""
    async with DynamicBatcher(fn, max_batch_size=n, on_batch_error="isolate", **kwargs) as batcher:
        futures = await batcher.submit_batch(list(range(n)))
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
    return outcomes, batcher


@pytest.mark.asyncio
async def test_only_the_poisoned_records_fail_each_with_the_exception_it_raised_alone() -> None:
    fn = Picky({3, 11})
    infos: list[BatchInfo] = []
    outcomes, batcher = await run_batch(fn, 16, on_batch=infos.append)
    for i, outcome in enumerate(outcomes):
        if i in (3, 11):
            assert isinstance(outcome, Poisoned)
            assert str(outcome) == f"poisoned [{i}]"  # its own call's exception, not the batch's
        else:
            assert outcome == 10 * i
    retries = len(fn.calls) - 1
    stats = batcher.stats
    assert (stats.total_completed, stats.total_failed, stats.total_isolated_failures) == (14, 2, 2)
    assert stats.total_retries == retries
    assert stats.total_batches == 1  # the re-runs are parts of the one batch
    assert len(infos) == 1
    assert str(infos[0].error) == "poisoned [3, 11]"
    assert (infos[0].retries, infos[0].isolated_failures, infos[0].size) == (retries, 2, 16)
    assert retries <= 2 * 2 * (math.ceil(math.log2(16)) + 1)
    assert fn.calls[0] == list(range(16))
    assert [3] in fn.calls
    assert [11] in fn.calls


@pytest.mark.asyncio
async def test_one_bad_record_costs_about_log2_n_extra_calls() -> None:
    for n in (2, 8, 64, 256):
        for bad in (0, n // 3, n - 1):
            fn = Picky({bad})
            outcomes, _ = await run_batch(fn, n)
            assert [isinstance(o, Poisoned) for o in outcomes] == [i == bad for i in range(n)]
            depth = math.ceil(math.log2(n))
            assert len(fn.calls) - 1 <= 2 * depth, (n, bad, len(fn.calls))


@pytest.mark.asyncio
async def test_a_good_batch_and_a_batch_of_one_are_run_once() -> None:
    fn = Picky(set())
    outcomes, batcher = await run_batch(fn, 8)
    assert outcomes == [10 * i for i in range(8)]
    fn = Picky({0})
    outcomes, batcher = await run_batch(fn, 1)
    assert isinstance(outcomes[0], Poisoned)
    assert len(fn.calls) == 1
    assert (batcher.stats.total_retries, batcher.stats.total_isolated_failures) == (0, 0)


@pytest.mark.asyncio
async def test_a_failure_that_does_not_come_back_fails_nobody() -> None:
    calls: list[list[int]] = []

    async def flaky(batch: list[int]) -> list[int]:
        calls.append(list(batch))
        if len(calls) == 1:
            raise ConnectionError("blip")
        return batch

    outcomes, batcher = await run_batch(flaky, 6)
    assert outcomes == list(range(6))
    # the left half succeeded, so the right half is split at once; its records are run before any fails
    assert calls[1:] == [[0, 1, 2], [3], [4], [5]]
    assert (batcher.stats.total_retries, batcher.stats.total_failed) == (4, 0)


@pytest.mark.asyncio
async def test_the_default_fails_the_whole_batch() -> None:
    fn = Picky({2})
    async with DynamicBatcher(fn, max_batch_size=4) as batcher:
        assert batcher.on_batch_error == "fail"
        futures = await batcher.submit_batch([0, 1, 2, 3])
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(o, Poisoned) for o in outcomes)
    assert len(fn.calls) == 1


@pytest.mark.asyncio
async def test_what_is_not_an_exception_of_process_fn_is_not_isolated() -> None:
    async def cancels(batch: list[int]) -> list[int]:
        raise asyncio.CancelledError

    outcomes, batcher = await run_batch(cancels, 4)
    assert all(isinstance(o, BatchAbortedError) for o in outcomes)
    assert batcher.stats.total_retries == 0

    async def short(batch: list[int]) -> list[int]:
        return batch[:-1]

    outcomes, batcher = await run_batch(short, 4)
    assert all(isinstance(o, ValueError) and "returned 3 results for batch of 4" in str(o) for o in outcomes)
    assert batcher.stats.total_retries == 0


@pytest.mark.asyncio
async def test_a_raise_before_returning_an_awaitable_is_isolated_too() -> None:
    calls: list[list[int]] = []

    def eager_check(batch: list[int]) -> Any:  # plain, returns a coroutine: called on the loop via OnLoop
        calls.append(list(batch))
        if 1 in batch:
            raise KeyError("one")

        async def done() -> list[int]:
            return batch

        return done()

    from conftest import OnLoop

    outcomes, _ = await run_batch(eager_check, 4, executor=OnLoop())
    assert outcomes[0] == 0
    assert outcomes[2:] == [2, 3]
    assert isinstance(outcomes[1], KeyError)


@pytest.mark.asyncio
async def test_a_record_cancelled_during_the_re_runs_is_left_out() -> None:
    fn = Picky({5}, work_s=1.0)
    async with DynamicBatcher(fn, max_batch_size=8, on_batch_error="isolate") as batcher:
        futures = await batcher.submit_batch(list(range(8)))
        await asyncio.sleep(1.5)  # the first call failed; the halves are running
        futures[6].cancel()
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert isinstance(outcomes[5], Poisoned)
    assert isinstance(outcomes[6], asyncio.CancelledError)
    assert [o for i, o in enumerate(outcomes) if i not in (5, 6)] == [10 * i for i in (0, 1, 2, 3, 4, 7)]
    assert all(6 not in call for call in fn.calls[2:])
    assert batcher.stats.total_cancelled == 1


@pytest.mark.asyncio
async def test_stop_that_gives_up_during_the_re_runs_fails_what_is_left() -> None:
    fn = Picky({0}, work_s=1.0)
    batcher = DynamicBatcher(fn, max_batch_size=8, on_batch_error="isolate")
    await batcher.start()
    futures = await batcher.submit_batch(list(range(8)))
    await asyncio.sleep(1.5)
    await batcher.stop(timeout=1.0)
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert all(f.done() for f in futures)
    assert any(isinstance(o, BatcherStoppedError) for o in outcomes)
    assert batcher.stats.pending == 0


@pytest.mark.asyncio
async def test_isolation_with_several_slots_and_keys() -> None:
    fn = Picky({4, 13}, work_s=0.25)
    async with DynamicBatcher(
        fn,
        max_batch_size=4,
        max_concurrent_batches=3,
        dispatch="eager",
        on_batch_error="isolate",
        batch_key=lambda x: x % 2,
    ) as batcher:
        futures = [await batcher.submit(i) for i in range(20)]
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert [i for i, o in enumerate(outcomes) if isinstance(o, Poisoned)] == [4, 13]
    assert [o for i, o in enumerate(outcomes) if i not in (4, 13)] == [10 * i for i in range(20) if i not in (4, 13)]
    assert all(len({x % 2 for x in call}) == 1 for call in fn.calls)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(1, 48))
def test_exactly_the_poisoned_records_fail_whatever_their_positions(data: st.DataObject, n: int) -> None:
    poisoned = data.draw(st.sets(st.integers(0, n - 1), max_size=n))
    fn = Picky(poisoned)
    outcomes, batcher = run_virtual(run_batch(fn, n))
    assert {i for i, o in enumerate(outcomes) if isinstance(o, Poisoned)} == poisoned
    assert all(outcomes[i] == 10 * i for i in range(n) if i not in poisoned)
    for i in poisoned:
        assert str(outcomes[i]) == f"poisoned [{i}]"
    b = len(poisoned)
    retries = len(fn.calls) - 1
    assert retries == batcher.stats.total_retries
    if n > 1 and b:
        assert retries <= min(2 * n - 2, 2 * b * (math.ceil(math.log2(n)) + 1))
        assert batcher.stats.total_isolated_failures == b
    else:
        assert retries == 0
