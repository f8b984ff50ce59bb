"""@batched: one batcher per event loop, per instance on methods, typed per record."""

from __future__ import annotations

import asyncio
import concurrent.futures
import doctest
import gc
import inspect
import logging
import threading
import weakref

import pytest

from tokenbatcher import Prompt, TokenBatcher, _decorator, _perloop, batched

pytestmark = pytest.mark.timeout(30)


@batched(max_batch_size=64, batch_timeout_s=0.5)
async def doubled(xs: list[int]) -> list[int]:
    """Double every number."""
    await asyncio.sleep(0.1)
    return [2 * x for x in xs]


async def _many(n: int) -> list[int]:
    return await asyncio.gather(*(doubled(i) for i in range(n)))


@pytest.mark.asyncio
async def test_concurrent_callers_share_batches_and_get_their_own_results() -> None:
    assert await _many(100) == [2 * i for i in range(100)]
    stats = doubled.batcher.stats
    assert stats.total_completed == 100
    assert stats.total_batches == 2  # 64 + 36: shared, within max_batch_size
    assert isinstance(doubled.batcher, TokenBatcher)


@pytest.mark.asyncio
async def test_each_test_loop_gets_a_fresh_batcher_of_the_same_function() -> None:
    # The test above ran the same module-level function on another loop.
    assert doubled.batcher.stats.total_submitted == 0
    assert not doubled.batcher.is_running  # created by looking, started by the first call
    assert await doubled(4) == 8
    assert doubled.batcher.is_running


def test_two_asyncio_runs_in_a_row_each_get_their_own_batcher(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    batchers: list[TokenBatcher[int, int]] = []
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def main() -> list[int]:
        results = await _many(10)
        batchers.append(doubled.batcher)
        loops.append(weakref.ref(asyncio.get_running_loop()))
        return results

    assert asyncio.run(main()) == [2 * i for i in range(10)]
    assert asyncio.run(main()) == [2 * i for i in range(10)]  # a batcher of the first loop would fail here
    first, second = batchers
    assert first is not second
    assert not first.is_running  # it ended with its loop
    assert first.stats.total_completed == second.stats.total_completed == 10
    del first, second
    batchers.clear()
    gc.collect()
    assert [ref() for ref in loops] == [None, None]  # nothing keeps a closed loop alive
    assert not list(doubled._loops._by_loop.items())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records  # no "Task was destroyed"


@pytest.mark.asyncio
async def test_aclose_drains_stops_and_the_next_call_starts_a_new_batcher() -> None:
    calls = [asyncio.ensure_future(doubled(i)) for i in range(3)]
    await asyncio.sleep(0)
    old = doubled.batcher
    await doubled.aclose()
    assert [c.result() for c in calls] == [0, 2, 4]  # accepted records were processed
    assert not old.is_running
    await doubled.aclose()  # twice is harmless
    assert await doubled(5) == 10
    assert doubled.batcher is not old
    assert doubled.batcher.stats.total_completed == 1
    await doubled.aclose()


def test_batcher_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="none is running in this thread"):
        doubled.batcher  # noqa: B018


class Scaler:
    def __init__(self, factor: int) -> None:
        self.factor = factor
        self.batches: list[list[int]] = []

    @batched(batch_timeout_s=0.5)
    async def scale(self, xs: list[int]) -> list[int]:
        self.batches.append(xs)
        return [self.factor * x for x in xs]


@pytest.mark.asyncio
async def test_on_a_method_each_instance_has_its_own_batcher() -> None:
    two, three = Scaler(2), Scaler(3)
    results = await asyncio.gather(*(s.scale(i) for i in range(4) for s in (two, three)))
    assert results == [f * i for i in range(4) for f in (2, 3)]
    assert two.batches == [[0, 1, 2, 3]]  # one batch each, never mixed
    assert three.batches == [[0, 1, 2, 3]]
    assert two.scale.batcher is two.scale.batcher
    assert two.scale.batcher is not three.scale.batcher
    assert two.scale.batcher.stats.total_completed == 4
    assert "Scaler" in repr(two.scale)
    assert isinstance(Scaler.scale, _decorator.BatchedFunction)  # on the class: the decorator's object
    await two.scale.aclose()
    assert not two.scale.batcher.is_running
    assert three.scale.batcher.is_running


@pytest.mark.asyncio
async def test_a_collected_instance_has_its_batchers_stopped() -> None:
    scaler = Scaler(2)
    assert await scaler.scale(1) == 2
    batcher = scaler.scale.batcher
    del scaler
    gc.collect()
    await asyncio.sleep(0)  # the stop was scheduled with call_soon_threadsafe: it starts now
    assert _perloop._closing
    await asyncio.wait(list(_perloop._closing))
    assert not batcher.is_running


@pytest.mark.asyncio
async def test_a_dropped_function_has_its_batcher_stopped() -> None:
    @batched
    async def local(xs: list[int]) -> list[int]:
        return xs

    assert await local(1) == 1
    batcher = local.batcher
    del local  # a notebook cell run again drops the old function
    gc.collect()
    await asyncio.sleep(0)
    await asyncio.wait(list(_perloop._closing))
    assert not batcher.is_running


def test_a_function_dropped_inside_asyncio_run_leaves_nothing_behind(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def main() -> None:
        @batched
        async def local(xs: list[int]) -> list[int]:
            return xs

        class Local:  # a class is in a reference cycle: it dies with its instances, in one collection
            @batched
            async def run(self, xs: list[int]) -> list[int]:
                return xs

        assert await local(1) == 1
        obj = Local()
        obj.me = obj  # type: ignore[attr-defined]  # and so is this instance
        assert await obj.run(2) == 2
        loops.append(weakref.ref(asyncio.get_running_loop()))
        del local, Local, obj
        gc.collect()  # the batchers' tasks are pending and referenced only by each other

    asyncio.run(main())
    gc.collect()
    assert loops[0]() is None
    assert not _perloop._started
    assert not _perloop._closing
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records


@pytest.mark.asyncio
async def test_a_temporary_instance_lives_while_its_call_waits() -> None:
    assert await Scaler(7).scale(6) == 42


@pytest.mark.asyncio
async def test_an_instance_without_weak_references_gets_a_clear_error() -> None:
    class Slotted:
        __slots__ = ()

        @batched
        async def run(self, xs: list[int]) -> list[int]:
            return xs

    with pytest.raises(TypeError, match="add '__weakref__' to the __slots__ of Slotted"):
        await Slotted().run(1)


@pytest.mark.asyncio
async def test_submit_arguments_reach_the_batcher_and_records_are_priced_by_tokens() -> None:
    costs: list[int] = []

    @batched(target_batch_tokens=10, batch_timeout_s=0.5, on_batch=lambda info: costs.append(info.cost))
    async def echo(prompts: list[Prompt]) -> list[str]:
        return [p.text for p in prompts]

    texts = ["x" * 15, "y" * 15, "z" * 15]  # 4 tokens each (Prompt.estimate_tokens): two fit in 10
    assert await asyncio.gather(*(echo(Prompt(t)) for t in texts)) == texts
    assert costs == [8, 4]
    assert await echo(Prompt("a"), estimated_tokens=7) == "a"
    assert await echo(Prompt("b"), estimated_cost=3, priority=-1) == "b"
    assert costs == [8, 4, 7, 3]
    with pytest.raises(ValueError, match="estimated_tokens must be a non-negative int"):
        await echo(Prompt("c"), estimated_tokens=-1)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        await echo(Prompt("c"), timeout_s=0)
    await echo.aclose()


@pytest.mark.asyncio
async def test_a_batch_error_reaches_every_caller_of_that_batch() -> None:
    @batched(batch_timeout_s=0.5)
    async def fragile(xs: list[int]) -> list[int]:
        if 13 in xs:
            raise ValueError("unlucky batch")
        return xs

    outcomes = await asyncio.gather(*(fragile(x) for x in (12, 13, 14)), return_exceptions=True)
    assert [type(o) for o in outcomes] == [ValueError] * 3
    assert await fragile(1) == 1  # the next batch is fine
    await fragile.aclose()


@pytest.mark.asyncio
async def test_a_cancelled_caller_s_record_is_not_processed() -> None:
    seen: list[int] = []

    @batched(batch_timeout_s=1.0)
    async def record(xs: list[int]) -> list[int]:
        seen.extend(xs)
        return xs

    keep = asyncio.ensure_future(record(1))
    drop = asyncio.ensure_future(record(2))
    await asyncio.sleep(0.5)
    drop.cancel()
    assert await keep == 1
    assert seen == [1]
    await record.aclose()


@pytest.mark.real_clock
@pytest.mark.asyncio
async def test_a_plain_function_and_a_flyte_style_lambda_work_too() -> None:
    loop_thread = threading.get_ident()
    threads: list[int] = []

    @batched(batch_timeout_s=0.01)
    def plain(xs: list[int]) -> list[int]:
        threads.append(threading.get_ident())
        return [x + 1 for x in xs]

    async def model_async(xs: list[int]) -> list[int]:
        return [x - 1 for x in xs]

    lambda_style = batched(lambda xs: model_async(xs))
    assert await asyncio.gather(*(plain(i) for i in range(5))) == [1, 2, 3, 4, 5]
    assert loop_thread not in threads
    assert await lambda_style(1) == 0
    await plain.aclose()
    await lambda_style.aclose()


@pytest.mark.real_clock
@pytest.mark.asyncio
async def test_a_plain_method_runs_in_the_executor_given() -> None:
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="scaler") as pool:

        class Plain:
            @batched(executor=pool)
            def name(self, xs: list[int]) -> list[str]:
                return [threading.current_thread().name for _ in xs]

        plain = Plain()
        assert (await plain.name(1)).startswith("scaler")
        await plain.name.aclose()


def test_settings_are_checked_when_decorating() -> None:
    async def fn(xs: list[int]) -> list[int]:
        return xs

    with pytest.raises(ValueError, match="max_batch_size must be >= 1, got 0"):
        batched(max_batch_size=0)(fn)
    with pytest.raises(ValueError, match="target_batch_tokens must be >= 1, got 0"):
        batched(target_batch_tokens=0)(fn)
    with pytest.raises(TypeError, match="max_batch_sise"):
        batched(max_batch_sise=8)(fn)  # type: ignore[call-overload]
    with concurrent.futures.ThreadPoolExecutor(1) as pool, pytest.raises(ValueError, match="executor is only used"):
        batched(executor=pool)(fn)
    with pytest.raises(TypeError, match="decorates a batch function"):
        batched()(42)  # type: ignore[call-overload]


def test_settings_are_every_keyword_of_token_batcher() -> None:
    keywords = [
        p.name for p in inspect.signature(TokenBatcher.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY
    ]
    assert set(_decorator.BatcherSettings.__annotations__) == set(keywords) - {"process_fn"}


def test_the_decorated_function_keeps_its_name_and_doc() -> None:
    assert doubled.__name__ == "doubled"
    assert doubled.__qualname__ == "doubled"
    assert doubled.__doc__ == "Double every number."
    assert doubled.__module__ == __name__
    assert repr(doubled) == "<batched function doubled>"


def test_docstring_examples_run() -> None:
    result = doctest.testmod(_decorator, raise_on_error=False, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


def test_records_are_batched_across_callers_in_plain_asyncio_run() -> None:
    seen: list[int] = []

    @batched(max_batch_size=8, batch_timeout_s=0.05)
    async def sizes(xs: list[int]) -> list[int]:
        seen.append(len(xs))
        return xs

    async def main() -> None:
        assert await asyncio.gather(*(sizes(i) for i in range(20))) == list(range(20))

    asyncio.run(main())
    assert seen == [8, 8, 4]


def test_inspect_sees_an_async_callable() -> None:
    # So frameworks that branch on iscoroutinefunction(f.__call__) await it.
    assert inspect.iscoroutinefunction(type(doubled).__call__)
