"""A plain (non-async) process_fn runs in a worker thread; an async one on the loop.

Worker threads need real time, so every async test here runs on the real clock.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import multiprocessing
import threading
from collections.abc import Coroutine
from typing import Any

import pytest

from tokenbatcher import BatchAbortedError, BatcherStoppedError, DynamicBatcher, TokenBatcher
from tokenbatcher._calling import _Job, as_async, is_async

pytestmark = [pytest.mark.real_clock, pytest.mark.timeout(30)]

WAIT_S = 10.0  # a bound on every wait for a thread, never reached when the code is right


async def echo(batch: list[Any]) -> list[Any]:
    return list(batch)


class AsyncCall:
    async def __call__(self, batch: list[Any]) -> list[Any]:
        return list(batch)

    async def method(self, batch: list[Any]) -> list[Any]:
        return list(batch)


class SyncCall:
    def __call__(self, batch: list[Any]) -> list[Any]:
        return list(batch)


def plain(batch: list[Any]) -> list[Any]:
    return list(batch)


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (echo, True),
        (functools.partial(echo), True),
        (functools.partial(functools.partial(AsyncCall())), True),
        (AsyncCall(), True),
        (AsyncCall().method, True),
        (plain, False),
        (lambda batch: echo(batch), False),  # returns a coroutine, but only a call can tell
        (SyncCall(), False),
        (functools.partial(plain), False),
        (list, False),  # a class
        (len, False),  # a builtin
    ],
    ids=lambda v: getattr(v, "__name__", type(v).__name__) if not isinstance(v, bool) else str(v),
)
def test_is_async_tells_async_callables_by_construction(fn: Any, expected: bool) -> None:
    assert is_async(fn) is expected


def test_an_async_process_fn_is_kept_as_it_is() -> None:
    assert as_async(echo, None) is echo
    fn = functools.partial(echo)
    assert as_async(fn, None) is fn


def test_executor_is_checked_at_construction() -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with pytest.raises(ValueError, match="executor is only used by a plain"):
            DynamicBatcher(echo, executor=pool)
        with pytest.raises(ValueError, match="executor is only used by a plain"):
            TokenBatcher(inference_fn=functools.partial(AsyncCall()), executor=pool)
    with pytest.raises(TypeError, match=r"executor must be a concurrent\.futures\.Executor or None, got 4"):
        DynamicBatcher(plain, executor=4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="process_fn must be callable"):
        DynamicBatcher("not a function")  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_a_plain_process_fn_runs_in_the_loops_default_executor() -> None:
    loop = asyncio.get_running_loop()
    seen: list[tuple[int, str]] = []

    def work(batch: list[int]) -> list[int]:
        seen.append((threading.get_ident(), threading.current_thread().name))
        return [2 * x for x in batch]

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loop-default") as pool:
        loop.set_default_executor(pool)
        async with DynamicBatcher(work, batch_timeout_s=0.01) as batcher:
            futures = [await batcher.submit(i) for i in range(10)]
            assert await asyncio.gather(*futures) == [2 * i for i in range(10)]
    assert seen
    for ident, name in seen:
        assert ident != threading.get_ident()
        assert name.startswith("loop-default")


@pytest.mark.asyncio
async def test_executor_is_used_and_token_batcher_forwards_it() -> None:
    names: list[str] = []

    def work(batch: list[str]) -> list[int]:
        names.append(threading.current_thread().name)
        return [len(s) for s in batch]

    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="mine") as pool:
        async with TokenBatcher(work, executor=pool) as batcher:
            assert await (await batcher.submit("four")) == 4
        async with DynamicBatcher(work, executor=pool) as other:
            assert await (await other.submit("three")) == 5
    assert len(names) == 2
    assert all(name.startswith("mine") for name in names)


@pytest.mark.asyncio
async def test_a_blocked_plain_function_never_blocks_the_loop() -> None:
    started = threading.Event()
    release = threading.Event()

    def blocking(batch: list[int]) -> list[int]:
        started.set()
        assert release.wait(WAIT_S), "the test never released the worker"
        return batch

    async with DynamicBatcher(blocking, dispatch="eager") as batcher:
        future = await batcher.submit(1)
        try:
            assert await asyncio.to_thread(started.wait, WAIT_S)
            # The function is blocked in its thread; the loop still runs everything else.
            ticks = 0
            for _ in range(100):
                await asyncio.sleep(0)
                ticks += 1
            other = await batcher.submit(2)  # and accepts records meanwhile
            assert ticks == 100
            assert not future.done()
            assert batcher.stats.in_flight_batches == 1
        finally:
            release.set()
        assert await future == 1
        assert await other == 2


@pytest.mark.asyncio
async def test_an_awaitable_returned_by_the_thread_is_awaited_on_the_loop() -> None:
    loop_thread = threading.get_ident()
    where: dict[str, int] = {}

    async def model_async(batch: list[int]) -> list[int]:
        where["coroutine"] = threading.get_ident()
        await asyncio.sleep(0)  # it really runs as a coroutine on the running loop
        return [x + 1 for x in batch]

    def flyte_style(batch: list[int]) -> Coroutine[Any, Any, list[int]]:
        where["call"] = threading.get_ident()
        return model_async(batch)

    async with DynamicBatcher(flyte_style) as batcher:
        assert await (await batcher.submit(41)) == 42
    async with DynamicBatcher(lambda batch: model_async(batch)) as batcher:
        assert await (await batcher.submit(1)) == 2
    assert where["call"] != loop_thread
    assert where["coroutine"] == loop_thread


@pytest.mark.asyncio
async def test_an_exception_fails_its_batch_and_the_batcher_keeps_serving() -> None:
    def picky(batch: list[int]) -> list[int]:
        if 13 in batch:
            raise ValueError(f"unlucky batch {batch}")
        return batch

    async with DynamicBatcher(picky, batch_timeout_s=0.05) as batcher:
        bad = await batcher.submit_batch([12, 13, 14])
        for future in bad:
            with pytest.raises(ValueError, match=r"unlucky batch \[12, 13, 14\]"):
                await future
        assert await (await batcher.submit(15)) == 15
    stats = batcher.stats
    assert (stats.total_failed, stats.total_completed) == (3, 1)


@pytest.mark.asyncio
async def test_a_plain_function_that_needs_the_event_loop_is_told_to_be_async() -> None:
    def needs_loop(batch: list[int]) -> list[int]:
        asyncio.get_running_loop()  # there is none in a worker thread
        return batch

    async with DynamicBatcher(needs_loop) as batcher:
        with pytest.raises(RuntimeError, match=r"plain \(non-async\) function.*worker thread.*Make it `async def`"):
            await batcher.call(1)


@pytest.mark.asyncio
@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit, asyncio.CancelledError])
async def test_a_base_exception_in_the_thread_fails_its_batch_not_the_loop(error: type[BaseException]) -> None:
    def fatal(batch: list[int]) -> list[int]:
        if 0 in batch:
            raise error
        return batch

    async with DynamicBatcher(fatal, max_batch_size=1) as batcher:
        future = await batcher.submit(0)
        with pytest.raises(
            BatchAbortedError, match=rf"process_fn raised {error.__name__}\(\) in its worker thread"
        ) as info:
            await future
        assert isinstance(info.value.__cause__, error)
        assert await (await batcher.submit(1)) == 1  # still running


tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="none")


@pytest.mark.asyncio
async def test_the_thread_runs_in_a_copy_of_the_context() -> None:
    seen: list[str] = []

    def work(batch: list[int]) -> list[int]:
        seen.append(tenant.get())
        tenant.set("changed in the thread")
        return batch

    token = tenant.set("acme")
    try:
        async with DynamicBatcher(work, max_batch_size=1) as batcher:
            assert await (await batcher.submit(1)) == 1
            assert await (await batcher.submit(2)) == 2
            assert tenant.get() == "acme"
    finally:
        tenant.reset(token)
    assert seen == ["acme", "acme"]  # each call gets a fresh copy: the change did not stick


@pytest.mark.asyncio
async def test_stop_timeout_fails_the_batch_while_the_thread_runs_on_and_its_coroutine_is_closed() -> None:
    started = threading.Event()
    release = threading.Event()
    returned: list[Coroutine[Any, Any, list[int]]] = []

    def slow(batch: list[int]) -> Coroutine[Any, Any, list[int]]:
        started.set()
        assert release.wait(WAIT_S)
        returned.append(echo(batch))
        return returned[-1]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        batcher = DynamicBatcher(slow, executor=pool, dispatch="eager")
        await batcher.start()
        future = await batcher.submit(1)
        try:
            assert await asyncio.to_thread(started.wait, WAIT_S)
            await batcher.stop(timeout=0)  # returns although the thread cannot be stopped
            with pytest.raises(BatcherStoppedError, match="ran out of time"):
                await future
        finally:
            release.set()
        await asyncio.to_thread(pool.shutdown, wait=True)  # the thread returned its coroutine
    assert len(returned) == 1
    assert inspect.getcoroutinestate(returned[0]) == inspect.CORO_CLOSED  # closed, never run


def test_a_coroutine_returned_after_the_loop_gave_up_is_closed_whichever_comes_first() -> None:
    ctx = contextvars.copy_context()
    job = _Job(lambda batch: echo(batch), [1], ctx)
    coroutine = job()  # the thread returns first; the loop then gives up
    assert inspect.getcoroutinestate(coroutine) == inspect.CORO_CREATED  # type: ignore[arg-type]
    job.abandon()
    assert inspect.getcoroutinestate(coroutine) == inspect.CORO_CLOSED  # type: ignore[arg-type]

    job = _Job(lambda batch: echo(batch), [1], ctx)
    job.abandon()  # the loop gives up first
    made: list[Any] = []
    job._fn = lambda batch: made.append(echo(batch)) or made[-1]
    assert job() is None
    assert inspect.getcoroutinestate(made[0]) == inspect.CORO_CLOSED


@pytest.mark.asyncio
async def test_a_process_pool_gets_the_bare_function() -> None:
    context = multiprocessing.get_context("spawn")  # no fork of a threaded process
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        async with DynamicBatcher(list, executor=pool) as batcher:  # list(batch) is an echo that pickles
            futures = await batcher.submit_batch(["a", "b"])
            assert await asyncio.gather(*futures) == ["a", "b"]
