"""configure(): validated like the constructor, all or nothing, applied from the next batch on.

Read-back of every setting is pinned in test_api.py; here, what a change does
to a running batcher: the queue keeps every record and re-measures it, a batch
already formed keeps its records, and a setting that shapes the loops
(``dispatch``, ``max_concurrent_batches``) waits for a restart.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import OnLoop, run_virtual
from test_api import SETTINGS  # every setting, pinned once with the public surface
from tokenbatcher import BatchInfo, DynamicBatcher, TokenBatcher


def snapshot(batcher: DynamicBatcher[Any, Any]) -> dict[str, Any]:
    return {name: getattr(batcher, name) for name in SETTINGS}


class Gated:
    """A process_fn that records each batch and waits for the test to open its gate."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, batch: list[Any]) -> list[Any]:
        self.batches.append(list(batch))
        self.entered.set()
        await self.gate.wait()
        return [("result", item) for item in batch]

    def hold(self) -> None:
        self.gate.clear()
        self.entered.clear()


def now() -> float:
    return asyncio.get_running_loop().time()


def test_configure_changes_what_the_properties_read() -> None:
    batcher = DynamicBatcher(lambda batch: batch)
    batcher.configure(max_batch_size=8, batch_timeout_s=1, grouping="similar_cost", request_timeout_s=None)
    assert (batcher.max_batch_size, batcher.batch_timeout_s, batcher.grouping) == (8, 1.0, "similar_cost")
    assert type(batcher.batch_timeout_s) is float
    batcher.configure()  # nothing to change: fine
    assert batcher.max_batch_size == 8


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"max_batch_size": 0}, ValueError, "max_batch_size must be >= 1, got 0"),
        ({"max_batch_size": 4, "min_batch_size": 5}, ValueError, "min_batch_size must be <= max_batch_size"),
        ({"target_batch_cost": 100, "batch_timeout_s": -1}, ValueError, "batch_timeout_s must be >= 0"),
        ({"dispatch": "greedy"}, ValueError, "dispatch must be one of 'window', 'eager'"),
        ({"on_batch_error": "retry"}, ValueError, "on_batch_error must be one of 'fail', 'isolate'"),
        ({"batch_key": "model"}, TypeError, "batch_key must be callable or None"),
        ({"max_queue_size": 2.5}, TypeError, "max_queue_size must be an int"),
        ({"max_batch_size": 4, "process_fn": print}, TypeError, "unknown setting"),
        ({"budget_name": "x"}, TypeError, "unknown setting"),
    ],
)
def test_a_bad_change_raises_and_changes_nothing(changes: dict[str, Any], error: type[Exception], match: str) -> None:
    batcher = DynamicBatcher(lambda batch: batch, max_batch_size=16, min_batch_size=2)
    before = snapshot(batcher)
    with pytest.raises(error, match=match):
        batcher.configure(**changes)
    assert snapshot(batcher) == before


def test_token_batcher_configure_takes_the_token_names_and_they_win() -> None:
    def tokens(record: Any) -> int:
        return 3

    batcher = TokenBatcher(lambda batch: batch, target_batch_tokens=100)
    batcher.configure(target_batch_tokens=500, target_batch_cost=7, default_token_estimate=9, token_estimator=tokens)
    assert (batcher.target_batch_tokens, batcher.target_batch_cost) == (500, 500)
    assert (batcher.default_token_estimate, batcher.default_cost) == (9, 9)
    assert batcher.token_estimator is tokens
    assert batcher.cost_estimator is tokens
    batcher.configure(target_batch_cost=600, token_estimator=None)
    assert batcher.target_batch_tokens == 600
    assert batcher.token_estimator is None
    # errors say the name the caller used
    with pytest.raises(ValueError, match="target_batch_tokens must be >= 1, got 0"):
        batcher.configure(target_batch_tokens=0)
    with pytest.raises(ValueError, match="target_batch_cost must be >= 1, got 0"):
        batcher.configure(target_batch_cost=0)
    with pytest.raises(ValueError, match="default_token_estimate must be >= 0"):
        batcher.configure(default_token_estimate=-1)
    with pytest.raises(TypeError, match="token_estimator must be callable"):
        batcher.configure(token_estimator=5)  # type: ignore[typeddict-item]
    assert batcher.target_batch_tokens == 600


@pytest.mark.asyncio
@pytest.mark.parametrize("name", ["dispatch", "max_concurrent_batches"])
async def test_settings_that_shape_the_loops_change_only_while_not_running(name: str) -> None:
    fn = Gated()
    value: Any = "eager" if name == "dispatch" else 2
    batcher = DynamicBatcher(fn, max_batch_size=1, batch_timeout_s=0)
    async with batcher:
        with pytest.raises(RuntimeError, match=f"{name} cannot change while DynamicBatcher is running"):
            batcher.configure(max_batch_size=5, **{name: value})
        assert batcher.max_batch_size == 1  # all or nothing
        batcher.configure(**{name: getattr(batcher, name)})  # the same value is no change
    batcher.configure(**{name: value})
    assert getattr(batcher, name) == value
    fn.hold()
    async with batcher:  # the next run has them
        futures = [await batcher.submit(i) for i in range(3)]
        await fn.entered.wait()
        await asyncio.sleep(0.001)
        in_process = batcher.stats.in_flight_batches
        fn.gate.set()
        await asyncio.gather(*futures)
    assert in_process == (2 if name == "max_concurrent_batches" else 1)
    assert fn.batches == [[0], [1], [2]]


@pytest.mark.asyncio
async def test_batch_limits_reshape_the_queue_from_the_next_batch_and_the_batch_in_flight_keeps_its_records() -> None:
    fn = Gated()
    async with DynamicBatcher(fn, dispatch="eager", max_batch_size=4, target_batch_cost=100) as batcher:
        fn.hold()
        first = [await batcher.submit(i) for i in range(4)]
        await fn.entered.wait()  # batch [0..3] is inside process_fn
        queued = [await batcher.submit(i, estimated_cost=2) for i in range(4, 14)]
        assert batcher.stats.queue_depth == 10
        batcher.configure(max_batch_size=3, target_batch_cost=4)  # at most 2 records of cost 2
        assert batcher.stats.queue_depth == 10  # nothing lost
        batcher.configure(target_batch_cost=5, batch_cost="padded")  # 2 records: 2 * 2 <= 5
        fn.gate.set()
        results = await asyncio.gather(*first, *queued)
    assert results == [("result", i) for i in range(14)]
    assert fn.batches == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13]]


@pytest.mark.asyncio
async def test_a_sealed_batch_keeps_its_records_and_a_filling_window_closes_under_new_limits() -> None:
    fn = Gated()
    infos: list[BatchInfo] = []
    async with DynamicBatcher(fn, max_batch_size=4, batch_timeout_s=10.0, on_batch=infos.append) as batcher:
        fn.hold()
        first = [await batcher.submit(i) for i in range(4)]  # full: sealed at once, into process_fn
        await fn.entered.wait()
        sealed = [await batcher.submit(i) for i in range(4, 8)]  # full: sealed into the prefetch queue
        await asyncio.sleep(0)
        filling = [await batcher.submit(i) for i in range(8, 10)]  # the next window is open, 10 s to go
        await asyncio.sleep(1.0)
        t0 = now()
        batcher.configure(max_batch_size=2)  # the window's batch is full under the new limit
        fn.gate.set()
        await asyncio.gather(*first, *sealed, *filling)
    assert fn.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert infos[2].reason == "max_size"
    assert infos[2].started_at == pytest.approx(t0)  # not at the window's 10 s deadline


@pytest.mark.asyncio
async def test_a_longer_timeout_applies_to_the_next_window_and_min_batch_size_at_once() -> None:
    fn = Gated()
    async with DynamicBatcher(fn, dispatch="eager", min_batch_size=4, batch_timeout_s=5.0) as batcher:
        t0 = now()
        futures = [await batcher.submit(i) for i in range(2)]
        await asyncio.sleep(1.0)
        assert fn.batches == []  # waiting for 4 records, at most 5 s
        batcher.configure(min_batch_size=2)  # the free slot looks again: 2 records are enough
        await asyncio.gather(*futures)
        assert now() - t0 == pytest.approx(1.0)
        batcher.configure(min_batch_size=3, batch_timeout_s=0.5)
        t1 = now()
        late = await batcher.submit("late")
        await late
        assert now() - t1 == pytest.approx(0.5)
    assert fn.batches == [[0, 1], ["late"]]


@pytest.mark.asyncio
async def test_switching_grouping_and_budget_with_a_deep_queue_loses_nothing() -> None:
    fn = Gated()
    async with DynamicBatcher(fn, dispatch="eager", max_batch_size=8, target_batch_cost=40) as batcher:
        fn.hold()
        blocker = await batcher.submit("blocker")
        await fn.entered.wait()
        costs = [1, 9, 2, 8, 3, 7, 1, 9, 2, 8] * 3
        futures = [await batcher.submit(i, estimated_cost=c, priority=i % 3) for i, c in enumerate(costs)]
        cancelled = futures[5]
        cancelled.cancel()
        batcher.configure(grouping="similar_cost", target_batch_cost=12)
        batcher.configure(grouping="fifo", batch_cost="padded", max_batch_size=3)
        batcher.configure(grouping="similar_cost")
        assert batcher.stats.queue_depth == len(costs) - 1
        fn.gate.set()
        await blocker
        done = await asyncio.gather(*(f for f in futures if f is not cancelled))
    assert sorted(r[1] for r in done) == sorted(i for i in range(len(costs)) if i != 5)
    for batch in fn.batches[1:]:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(costs[i] for i in batch) <= 12
    assert batcher.stats.total_cancelled == 1


@pytest.mark.asyncio
async def test_raising_max_queue_size_lets_waiting_producers_in_and_lowering_it_keeps_the_queue() -> None:
    fn = Gated()
    async with DynamicBatcher(fn, dispatch="eager", max_queue_size=2) as batcher:
        fn.hold()
        blocker = await batcher.submit("blocker")
        await fn.entered.wait()
        queued = [await batcher.submit(i) for i in range(2)]
        waiting = [asyncio.ensure_future(batcher.submit(i)) for i in range(2, 5)]
        await asyncio.sleep(0.1)
        assert not any(w.done() for w in waiting)
        batcher.configure(max_queue_size=4)
        await asyncio.sleep(0)
        assert [w.done() for w in waiting] == [True, True, False]  # room for two, oldest first
        too_big = asyncio.ensure_future(batcher.submit_batch(["x", "y", "z"]))
        await asyncio.sleep(0.1)
        batcher.configure(max_queue_size=2)  # the queue holds 4: they stay
        assert batcher.stats.queue_depth == 4
        with pytest.raises(ValueError, match=r"more than max_queue_size=2 \(lowered by configure"):
            await too_big
        fn.gate.set()
        futures = [await w for w in waiting]
        results = await asyncio.gather(blocker, *queued, *futures)
    assert [r[1] for r in results] == ["blocker", 0, 1, 2, 3, 4]
    assert batcher.stats.peak_queue_depth == 4


@pytest.mark.asyncio
async def test_per_record_settings_apply_to_records_submitted_afterwards() -> None:
    fn = Gated()
    async with DynamicBatcher(fn, dispatch="eager", max_batch_size=1, request_timeout_s=10.0) as batcher:
        fn.hold()
        blocker = await batcher.submit("blocker")
        await fn.entered.wait()
        t0 = now()
        old = await batcher.submit("old")  # deadline t0 + 10
        batcher.configure(request_timeout_s=2.0, default_cost=7, priority_aging_s=100.0)
        new = await batcher.submit("new")  # deadline t0 + 2
        urgent = await batcher.submit("urgent", priority=-1, timeout_s=100)  # 100 s ahead: overtakes "old"
        with pytest.raises(TimeoutError):
            await new
        assert now() - t0 == pytest.approx(2.0)
        fn.gate.set()
        await asyncio.gather(blocker, old, urgent)
    assert fn.batches == [["blocker"], ["urgent"], ["old"]]


@pytest.mark.asyncio
async def test_on_batch_and_on_batch_error_apply_to_batches_handed_over_afterwards() -> None:
    seen: list[str] = []
    calls: list[list[int]] = []
    gate, entered = asyncio.Event(), asyncio.Event()

    async def picky(batch: list[int]) -> list[int]:
        calls.append(list(batch))
        entered.set()
        await gate.wait()
        if 3 in batch:
            raise ValueError("three")
        return batch

    async with DynamicBatcher(picky, dispatch="eager", on_batch=lambda i: seen.append("old")) as batcher:
        in_flight = [await batcher.submit(i) for i in range(4)]
        await entered.wait()
        assert calls == [[0, 1, 2, 3]]
        batcher.configure(on_batch_error="isolate", on_batch=lambda i: seen.append("new"))
        gate.set()
        outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
        assert all(isinstance(o, ValueError) for o in outcomes)  # that batch keeps "fail"
        later = [await batcher.submit(i) for i in range(4)]
        outcomes = await asyncio.gather(*later, return_exceptions=True)
    assert outcomes[:3] == [0, 1, 2]
    assert isinstance(outcomes[3], ValueError)
    assert seen == ["old", "new"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("submit"), st.lists(st.integers(0, 6), min_size=1, max_size=6)),
            st.tuples(st.just("wait"), st.sampled_from([0.0, 0.25, 1.0])),
            st.tuples(
                st.just("configure"),
                st.fixed_dictionaries(
                    {},
                    optional={
                        "target_batch_cost": st.integers(0, 12),  # 0 is refused
                        "max_batch_size": st.integers(0, 5),
                        "min_batch_size": st.integers(1, 5),
                        "batch_cost": st.sampled_from(["sum", "padded", "max"]),
                        "grouping": st.sampled_from(["fifo", "similar_cost"]),
                        "max_queue_size": st.integers(1, 6),
                        "batch_timeout_s": st.sampled_from([0.0, 0.5, -1.0]),
                    },
                ),
            ),
        ),
        max_size=25,
    ),
    proc_time=st.sampled_from([0.0, 0.25, 0.5]),
)
def test_configure_is_all_or_nothing_and_every_batch_obeys_the_limits_of_its_moment(
    steps: list[tuple[str, Any]], proc_time: float
) -> None:
    """Eager, one slot: a batch is taken the moment it is handed to process_fn,
    so it must obey the limits in force at that moment, whatever changed before."""
    handed: list[tuple[list[tuple[int, int]], dict[str, Any]]] = []
    batcher: DynamicBatcher[tuple[int, int], Any]

    def process_fn(batch: list[tuple[int, int]]) -> Any:
        handed.append((list(batch), snapshot(batcher)))

        async def work() -> list[Any]:
            await asyncio.sleep(proc_time)
            return [rid for rid, _ in batch]

        return work()

    batcher = DynamicBatcher(process_fn, executor=OnLoop(), dispatch="eager", max_batch_size=3, max_queue_size=6)

    async def main() -> None:
        futures: list[asyncio.Future[Any]] = []
        rid = 0
        async with batcher:
            for kind, arg in steps:
                if kind == "submit":
                    for cost in arg:
                        futures.append(await batcher.submit((rid, cost), estimated_cost=cost))
                        rid += 1
                elif kind == "wait":
                    await asyncio.sleep(arg)
                else:
                    before = snapshot(batcher)
                    try:
                        batcher.configure(**arg)
                    except (TypeError, ValueError):
                        assert snapshot(batcher) == before
                    else:
                        assert snapshot(batcher) == {**before, **arg}
        assert [f.result() for f in futures] == list(range(rid))

    run_virtual(main())
    served = [rid for batch, _ in handed for rid, _ in batch]
    assert sorted(served) == list(range(len(served)))  # every record once
    if all(limits["grouping"] == "fifo" for _, limits in handed):
        assert served == sorted(served)
    for batch, limits in handed:
        costs = [cost for _, cost in batch]
        assert len(batch) <= limits["max_batch_size"]
        counted = len(costs) * max(costs) if limits["batch_cost"] == "padded" else sum(costs)
        assert len(batch) == 1 or counted <= limits["target_batch_cost"], (batch, limits)


@pytest.mark.real_clock
@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_a_running_batcher_is_configured_on_its_own_loop_only() -> None:
    loop = asyncio.get_running_loop()
    async with DynamicBatcher(Gated(), max_batch_size=4) as batcher:
        with pytest.raises(RuntimeError, match="must be called on its event loop"):
            await loop.run_in_executor(None, lambda: batcher.configure(max_batch_size=8))
        assert batcher.max_batch_size == 4
        done = loop.create_future()
        loop.call_soon_threadsafe(lambda: (batcher.configure(max_batch_size=8), done.set_result(None)))
        await done
        assert batcher.max_batch_size == 8
    await loop.run_in_executor(None, lambda: batcher.configure(max_batch_size=16))  # stopped: from anywhere
    assert batcher.max_batch_size == 16
