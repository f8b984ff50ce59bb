"""Property tests: random workloads on a virtual clock, checked against the contract.

Every example builds a batcher with random settings, drives it with several
producers that submit records after random virtual-time gaps, and checks what
``process_fn`` was handed and what every future got:

* a batch never exceeds ``max_batch_size``, nor the cost budget unless it is a
  single record that alone costs more (SPEC part 3);
* ``grouping="fifo"`` without priorities keeps submission order;
* every future gets its own record's result, every record is processed once;
* the stats account for every record;
* ``grouping="similar_cost"`` keeps the starvation bound of ``_pending.py``;
* priorities age by ``priority_aging_s`` (the ``DynamicBatcher`` docstring);
* ``timeout_s``: a record is handed over before its deadline or expires at it.

``process_fn`` is a plain function that returns a coroutine: the batcher calls it
at the moment it hands the batch over, so the test sees exactly when that is.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import OnLoop, run_virtual
from tokenbatcher import DynamicBatcher

EPS = 1e-6
QUARTERS = st.integers(0, 8).map(lambda k: k * 0.25)  # dyadic: exact float arithmetic
COMBOS = list(itertools.product(("window", "eager"), ("sum", "padded"), ("fifo", "similar_cost"), (1, 2, 3)))
SETTINGS = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@dataclass(frozen=True)
class Item:
    rid: int
    cost: int
    gap: float  # virtual seconds the producer sleeps before submitting it
    priority: int = 0
    timeout_s: float | None = None


def counted_cost(batch: list[Item], batch_cost: str) -> int:
    if batch_cost == "padded":
        return len(batch) * max(it.cost for it in batch)
    return sum(it.cost for it in batch)


@st.composite
def workloads(
    draw: st.DrawFn, *, max_cost: int = 14, priorities: bool = False, timeouts: bool = False
) -> list[list[Item]]:
    """Up to 4 producers, each a list of records to submit in order."""
    producers: list[list[Item]] = []
    rid = 0
    for _ in range(draw(st.integers(1, 4))):
        items = []
        for _ in range(draw(st.integers(0, 10))):
            items.append(
                Item(
                    rid=rid,
                    cost=draw(st.integers(0, 3) | st.integers(0, max_cost)),  # mostly small, some over budget
                    gap=draw(st.just(0.0) | st.integers(0, 6).map(lambda k: k * 0.25)),  # bursts too
                    priority=draw(st.integers(-2, 2)) if priorities else 0,
                    timeout_s=draw(st.none() | st.integers(1, 16).map(lambda k: k * 0.25)) if timeouts else None,
                )
            )
            rid += 1
        producers.append(items)
    return producers


@st.composite
def limits(draw: st.DrawFn) -> dict[str, Any]:
    max_batch_size = draw(st.integers(1, 6))
    return {
        "target_batch_cost": draw(st.integers(1, 12)),
        "max_batch_size": max_batch_size,
        "min_batch_size": draw(st.integers(1, max_batch_size)),
        "batch_timeout_s": draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])),
        "max_queue_size": draw(st.sampled_from([1, 2, 3, 5, 8, 1000])),
        "prefetch_batches": draw(st.integers(1, 3)),
    }


PROC_TIMES = st.lists(QUARTERS, min_size=1, max_size=5)


class Run:
    """Drives one batcher with a workload and records what happened, and when."""

    def __init__(self, producers: list[list[Item]], proc_times: list[float], **config: Any) -> None:
        self.producers = producers
        self.items = {it.rid: it for p in producers for it in p}
        self.proc_times = proc_times
        self.config = config
        self.calls: list[tuple[float, list[Item]]] = []  # (loop time, batch), in call order
        self.submitted: list[int] = []  # record ids in the order the batcher accepted them
        self.t_submit: dict[int, float] = {}
        self.depth_ahead: dict[int, int] = {}  # records queued ahead of it when it was accepted
        self.calls_before: dict[int, int] = {}  # process_fn calls made before it was accepted
        self.futures: dict[int, asyncio.Future[Any]] = {}
        self.done_at: dict[int, float] = {}
        self.problems: list[str] = []
        self.batcher: DynamicBatcher[Item, Any] = DynamicBatcher(self.process_fn, executor=OnLoop(), **config)

    def process_fn(self, batch: list[Item]) -> Any:
        loop = asyncio.get_running_loop()
        index = len(self.calls)
        self.calls.append((loop.time(), list(batch)))
        for it in batch:
            fut = self.futures.get(it.rid)
            if fut is None or fut.done():
                self.problems.append(f"record {it.rid} handed to process_fn with future {fut!r}")
        self.check_pending()
        return self.work(index, batch)

    async def work(self, index: int, batch: list[Item]) -> list[Any]:
        await asyncio.sleep(self.proc_times[index % len(self.proc_times)])
        return [("result", it.rid, index) for it in batch]

    def check_pending(self) -> None:
        stats = self.batcher.stats
        unresolved = sum(1 for f in self.futures.values() if not f.done())
        if stats.pending != unresolved:
            self.problems.append(f"stats.pending={stats.pending} but {unresolved} futures are unresolved: {stats}")
        parts = stats.total_completed + stats.total_failed + stats.total_cancelled + stats.total_expired + stats.pending
        if stats.total_submitted != parts or stats.total_submitted != len(self.futures):
            self.problems.append(f"stats do not add up ({len(self.futures)} accepted): {stats}")

    async def produce(self, items: list[Item]) -> None:
        loop = asyncio.get_running_loop()
        b = self.batcher
        for it in items:
            await asyncio.sleep(it.gap)
            kwargs: dict[str, Any] = {"estimated_cost": it.cost}
            if it.priority:
                kwargs["priority"] = it.priority
            if it.timeout_s is not None:
                kwargs["timeout_s"] = it.timeout_s
            fut = await b.submit(it, **kwargs)
            # No suspension between the batcher accepting the record and this line.
            self.submitted.append(it.rid)
            self.t_submit[it.rid] = loop.time()
            self.futures[it.rid] = fut
            self.depth_ahead[it.rid] = b.stats.queue_depth - 1
            self.calls_before[it.rid] = len(self.calls)
            fut.add_done_callback(lambda _f, rid=it.rid: self.done_at.__setitem__(rid, loop.time()))
            self.check_pending()

    async def main(self) -> None:
        b = self.batcher
        await b.start()
        await asyncio.gather(*(self.produce(p) for p in self.producers))
        await b.stop()
        await asyncio.sleep(0)  # let the done callbacks run
        assert not b.is_running
        assert all(f.done() for f in self.futures.values()), "stop() returned with unresolved futures"

    def run(self) -> Run:
        run_virtual(self.main())
        assert not self.problems, self.problems[:5]
        assert sorted(self.submitted) == sorted(self.items), "a producer's submit was lost"
        return self

    @property
    def handed(self) -> dict[int, int]:
        """Record id -> index of the process_fn call it was handed to (at most once)."""
        where: dict[int, int] = {}
        for index, (_, batch) in enumerate(self.calls):
            for it in batch:
                assert it.rid not in where, f"record {it.rid} handed to process_fn twice"
                where[it.rid] = index
        return where

    def check_limits(self) -> None:
        budget = self.config["target_batch_cost"]
        mode = self.config.get("batch_cost", "sum")
        for _, batch in self.calls:
            assert 1 <= len(batch) <= self.config["max_batch_size"], [it.rid for it in batch]
            cost = counted_cost(batch, mode)
            assert len(batch) == 1 or cost <= budget, (
                f"batch of {len(batch)} costs {cost} ({mode}) > budget {budget}: {[it.cost for it in batch]}"
            )

    def check_all_completed(self) -> None:
        where = self.handed
        assert set(where) == set(self.items), "some records were never handed to process_fn"
        for rid, fut in self.futures.items():
            assert fut.result() == ("result", rid, where[rid])
        stats = self.batcher.stats
        n = len(self.items)
        assert stats.total_submitted == n
        assert stats.total_completed == n
        assert (stats.total_failed, stats.total_cancelled, stats.total_expired, stats.pending) == (0, 0, 0, 0)
        assert stats.queue_depth == 0
        assert stats.in_flight_batches == 0
        assert stats.total_batches == len(self.calls)
        assert stats.total_batch_cost == sum(it.cost for it in self.items.values())


@pytest.mark.parametrize(("dispatch", "batch_cost", "grouping", "slots"), COMBOS)
@SETTINGS
@given(producers=workloads(), config=limits(), proc_times=PROC_TIMES)
def test_batches_respect_limits_order_and_deliver_own_results(
    dispatch: str,
    batch_cost: str,
    grouping: str,
    slots: int,
    producers: list[list[Item]],
    config: dict[str, Any],
    proc_times: list[float],
) -> None:
    run = Run(
        producers,
        proc_times,
        dispatch=dispatch,
        batch_cost=batch_cost,
        grouping=grouping,
        max_concurrent_batches=slots,
        **config,
    ).run()
    run.check_limits()
    run.check_all_completed()
    position = {rid: i for i, rid in enumerate(run.submitted)}
    if grouping == "fifo":
        for _, batch in run.calls:
            order = [position[it.rid] for it in batch]
            assert order == sorted(order), f"batch out of submission order: {[it.rid for it in batch]}"
        if slots == 1:
            processed = [it.rid for _, batch in run.calls for it in batch]
            assert processed == run.submitted, "records not processed in submission order"


@pytest.mark.parametrize("dispatch", ["window", "eager"])
@pytest.mark.parametrize("batch_cost", ["sum", "padded"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(producers=workloads(), config=limits(), proc_times=PROC_TIMES, slots=st.integers(1, 3))
def test_similar_cost_dispatches_every_record_within_its_starvation_bound(
    dispatch: str,
    batch_cost: str,
    producers: list[list[Item]],
    config: dict[str, Any],
    proc_times: list[float],
    slots: int,
) -> None:
    """``_pending.py``: a record with ``r`` live records ahead of it is dispatched
    within ``r + 1`` batches (every batch takes the head of the queue).

    Batches are counted from the record's acceptance.  With ``"eager"`` a batch is
    handed to ``process_fn`` the moment it is taken, so the count is exact; with
    ``"window"`` up to ``prefetch_batches + 1`` batches may already be taken (sealed
    or waiting to be sealed) but not yet handed over when the record arrives.
    """
    run = Run(
        producers,
        proc_times,
        dispatch=dispatch,
        batch_cost=batch_cost,
        grouping="similar_cost",
        max_concurrent_batches=slots,
        **config,
    ).run()
    run.check_limits()
    run.check_all_completed()
    slack = 0 if dispatch == "eager" else config["prefetch_batches"] + 1
    for rid, index in run.handed.items():
        ahead = run.depth_ahead[rid]
        assert ahead >= 0
        batches_after = index - run.calls_before[rid] + 1  # the batch it went in is batch number ...
        assert batches_after <= ahead + 1 + slack, (
            f"record {rid} (cost {run.items[rid].cost}) had {ahead} records ahead of it "
            f"but went out in the {batches_after}th batch after it arrived"
        )


@pytest.mark.parametrize("dispatch", ["window", "eager"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    producers=workloads(priorities=True),
    config=limits(),
    proc_times=PROC_TIMES,
    aging=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]),
    batch_cost=st.sampled_from(["sum", "padded"]),
)
def test_priorities_age_and_keep_fifo_within_a_priority(
    dispatch: str,
    producers: list[list[Item]],
    config: dict[str, Any],
    proc_times: list[float],
    aging: float,
    batch_cost: str,
) -> None:
    """A record is never overtaken by one submitted more than
    ``(its priority - the other's) * priority_aging_s`` seconds after it, and
    records of equal priority keep submission order (one processing slot)."""
    run = Run(
        producers,
        proc_times,
        dispatch=dispatch,
        batch_cost=batch_cost,
        grouping="fifo",
        max_concurrent_batches=1,
        priority_aging_s=aging,
        **config,
    ).run()
    run.check_limits()
    run.check_all_completed()
    processed = [it.rid for _, batch in run.calls for it in batch]
    pos = {rid: i for i, rid in enumerate(processed)}
    for i, a in enumerate(run.submitted):
        for b in run.submitted[i + 1 :]:
            pa, pb = run.items[a].priority, run.items[b].priority
            late = run.t_submit[b] - run.t_submit[a]
            if pa == pb or late > (pa - pb) * aging:
                assert pos[a] < pos[b], (
                    f"record {a} (priority {pa}, t={run.t_submit[a]}) overtaken by {b} "
                    f"(priority {pb}, t={run.t_submit[b]}) with priority_aging_s={aging}"
                )


@pytest.mark.parametrize("dispatch", ["window", "eager"])
@pytest.mark.parametrize("grouping", ["fifo", "similar_cost"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    producers=workloads(timeouts=True),
    config=limits(),
    proc_times=PROC_TIMES,
    slots=st.integers(1, 3),
    request_timeout_s=st.none() | st.integers(1, 12).map(lambda k: k * 0.25),
)
def test_records_are_handed_over_before_their_deadline_or_expire_at_it(
    dispatch: str,
    grouping: str,
    producers: list[list[Item]],
    config: dict[str, Any],
    proc_times: list[float],
    slots: int,
    request_timeout_s: float | None,
) -> None:
    run = Run(
        producers,
        proc_times,
        dispatch=dispatch,
        grouping=grouping,
        max_concurrent_batches=slots,
        request_timeout_s=request_timeout_s,
        **config,
    ).run()
    run.check_limits()
    where = run.handed
    call_time = {it.rid: t for t, batch in run.calls for it in batch}
    expired = 0
    for rid, fut in run.futures.items():
        item = run.items[rid]
        timeout = item.timeout_s if item.timeout_s is not None else request_timeout_s
        deadline = None if timeout is None else run.t_submit[rid] + timeout
        if rid in where:
            assert fut.result() == ("result", rid, where[rid])
            if deadline is not None:
                assert call_time[rid] <= deadline + EPS, (
                    f"record {rid} handed to process_fn at {call_time[rid]}, after its deadline {deadline}"
                )
        else:
            assert deadline is not None, f"record {rid} without a deadline was never processed"
            exc = fut.exception()
            assert isinstance(exc, TimeoutError), f"record {rid} never processed, yet got {exc!r}"
            assert run.done_at[rid] == pytest.approx(deadline, abs=EPS), (
                f"record {rid} expired at {run.done_at[rid]}, its deadline was {deadline}"
            )
            expired += 1
    stats = run.batcher.stats
    assert stats.total_expired == expired
    assert stats.total_completed == len(where)
    assert stats.total_submitted == len(run.items)
    assert (stats.total_failed, stats.total_cancelled, stats.pending) == (0, 0, 0)
    assert stats.total_batches == len(run.calls)
