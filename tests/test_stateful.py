"""A state machine that interleaves everything a batcher can meet, on a virtual clock.

Rules submit records (``submit``, ``submit_nowait``, ``submit_batch``, and
``submit_threadsafe`` from a real thread; with ``batch_key``, into up to three
keys), change settings with ``configure`` (and try to change the ones that
need a restart), cancel futures, let virtual time pass,
read stats from a real thread while the loop runs, make the next batches
misbehave (raise, raise before returning an awaitable, raise ``CancelledError``,
hang until released, hang for good, return too few results or a non-list), stop
(gracefully, with a timeout, racing a submit, or by cancelling the task that
calls ``stop``) and start again, also at once after a cancelled stop.

After every step the invariants check every future against what happened to
its record, and the stats against the futures:

* a future is cancelled only by the test, and a result is always its own record's;
* an exception matches what ``process_fn`` did to the record's batch, or is the
  ``TimeoutError`` of an expired record that never reached ``process_fn``, or the
  ``BatcherStoppedError`` of a stop that gave up (timeout, or cancelled ``stop``);
* a record reaches ``process_fn`` at most once, while its future is pending, and
  before its deadline; a batch holds records of one key, and obeys the limits
  in force when it was formed (with ``"window"``, those of any ``configure``
  since the run began: a sealed batch keeps the limits it was formed with);
* ``total_completed``/``failed``/``cancelled``/``expired``/``pending``/``rejected``
  equal the futures' states, and they add up to ``total_submitted``;
* the queue never holds more than ``max_queue_size`` records (after a lowering
  ``configure``, the records already queued stay until it drains below it);
* no internal loop of the batcher fails, and the event loop reports no stray exception;
* ``submit_batch`` is all or nothing: when it gives up waiting for room, none of
  its records reaches ``process_fn`` or the counters;
* stats read from another thread never raise, never show pending < 0, and their
  counters of submitted, completed and expired records and of batches never go back.

A ``submit_threadsafe`` future settles a little after the record's own future
(its result crosses over in a callback), so between steps the counters may run
ahead of what those futures show, by at most the number still unsettled.  After
each run (every ``stop``), the checks are exact: every future resolved, none of
the batcher's tasks left in ``asyncio.all_tasks()``, and the counters add up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import tokenbatcher._row
from conftest import OnLoop, VirtualClockLoop
from tokenbatcher import BatchAbortedError, BatcherStoppedError, DynamicBatcher, QueueFullError

EPS = 1e-6
QUARTERS = st.integers(0, 12).map(lambda k: k * 0.25)
TIMEOUTS = st.none() | st.integers(1, 12).map(lambda k: k * 0.25)
HANGS = ("hang", "hang_forever")
MODES = ("ok", "raise", "raise_sync", "cancel", "hang", "hang_forever", "wrong_len", "non_list")


@dataclass
class Rec:
    rid: int
    cost: int
    t_submit: float
    deadline: float | None
    future: asyncio.Future[Any] | concurrent.futures.Future[Any]
    cancelled_by_test: bool = False
    threaded: bool = False  # submitted with submit_threadsafe: future is its concurrent.futures.Future
    timeout: float | None = None  # the record's timeout_s, or the default (threaded: deadline unknown)
    batch: int | None = None  # index into machine.batches
    done_at: float | None = None
    done_in: str | None = None  # the rule during which the future became done


@dataclass
class Batch:
    rids: list[int]
    mode: str
    at: float
    error: BaseException | None = None  # what process_fn raised, for "raise" modes
    gate: asyncio.Future[None] | None = None  # "hang": released by the test
    released: bool = False
    alive: bool = True  # process_fn has not returned (or been cancelled) yet


@dataclass(frozen=True)
class Box:
    """A record as process_fn sees it."""

    rid: int
    key: int = 0


def key_of(box: Box) -> int:
    return box.key


LIMITS = ("target_batch_cost", "max_batch_size", "batch_cost")


def refused(future: asyncio.Future[Any] | concurrent.futures.Future[Any]) -> bool:
    """A submit_threadsafe future whose record the batcher never accepted (it was not running)."""
    if not future.done() or future.cancelled():
        return False
    return type(future.exception()) is RuntimeError  # not its subclasses BatcherStoppedError, BatchAbortedError


class _LoopFailures(logging.Handler):
    """Collects the batcher's "an internal loop failed" log records (failed batches are logged too)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "internal loop" in record.getMessage():
            self.records.append(record)


class BatcherMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = VirtualClockLoop()
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, context: self.loop_errors.append(context))
        self.errors = _LoopFailures()
        logging.getLogger("tokenbatcher").addHandler(self.errors)
        self.batcher: DynamicBatcher[Box, Any] | None = None
        self.short_before = tokenbatcher._row.SHORT
        self.config: dict[str, Any] = {}
        self.recs: dict[int, Rec] = {}
        self.batches: list[Batch] = []
        self.modes: deque[tuple[str, float]] = deque()
        self.proc_time = 0.0
        self.running = False
        self.rejected = 0
        self.step = "init"
        self.problems: list[str] = []
        self.next_id = 0
        self.thread = concurrent.futures.ThreadPoolExecutor(1)  # the real thread of the threaded rules
        self.keys = 0  # records get one of this many keys (0: the batcher is not keyed)
        self.limits: list[dict[str, Any]] = []  # batch limits a batch handed over now may have been formed under
        self.queue_bound = 0  # the queue's bound: max_queue_size, or more while a lowering configure drains

    # ------------------------------------------------------------------ helpers

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def now(self) -> float:
        return self.loop.time()

    def process_fn(self, items: list[Box]) -> Any:
        """Called by the batcher at the moment it hands a batch over."""
        mode, duration = self.modes.popleft() if self.modes else ("ok", self.proc_time)
        index = len(self.batches)
        batch = Batch([it.rid for it in items], mode, self.now())
        self.batches.append(batch)
        for it in items:
            rec = self.recs.get(it.rid)
            if rec is None:
                self.problems.append(f"process_fn got record {it.rid} that submit never returned")
                continue
            if rec.batch is not None:
                self.problems.append(f"record {it.rid} handed to process_fn twice (batches {rec.batch}, {index})")
            rec.batch = index
            if rec.future.done():  # (a threaded one settles after its record: a done one is done already)
                self.problems.append(f"record {it.rid} handed to process_fn with a done future {rec.future!r}")
            if rec.deadline is not None and self.now() > rec.deadline + EPS:
                self.problems.append(f"record {it.rid} handed over at {self.now()} after its deadline {rec.deadline}")
        costs = [self.recs[it.rid].cost for it in items if it.rid in self.recs]
        if not any(self.fits(len(items), costs, limits) for limits in self.limits):
            self.problems.append(f"batch {index} of {len(items)} records costing {costs} breaks {self.limits}")
        if self.keys and len({it.key for it in items}) > 1:
            self.problems.append(f"batch {index} mixes keys: {[it.key for it in items]}")
        if mode == "raise_sync":
            batch.error = ValueError(f"raise_sync on batch {index}")
            raise batch.error
        if mode == "raise":
            batch.error = ValueError(f"raise on batch {index}")
        if mode in HANGS:
            batch.gate = self.loop.create_future()
        return self.work(batch, items, duration)

    async def work(self, batch: Batch, items: list[Box], duration: float) -> Any:
        try:
            return await self.misbehave(batch, items, duration)
        finally:
            batch.alive = False

    async def misbehave(self, batch: Batch, items: list[Box], duration: float) -> Any:
        await asyncio.sleep(duration)
        results = [("result", it.rid) for it in items]
        if batch.mode == "raise":
            assert batch.error is not None
            raise batch.error
        if batch.mode == "cancel":
            raise asyncio.CancelledError
        if batch.mode == "wrong_len":
            return results[:-1]
        if batch.mode == "non_list":
            return {"results": results}
        if batch.mode in HANGS:
            assert batch.gate is not None
            await batch.gate  # "hang_forever": nobody resolves it
        return results

    def accept(
        self,
        item: Box,
        cost: int,
        timeout_s: float | None,
        future: asyncio.Future[Any] | concurrent.futures.Future[Any],
        threaded: bool = False,
    ) -> None:
        timeout = timeout_s if timeout_s is not None else self.config["request_timeout_s"]
        now = self.now()
        # A threaded record is queued a little later, maybe after waiting for room: its deadline is unknown.
        deadline = None if timeout is None or threaded else now + timeout
        self.recs[item.rid] = Rec(item.rid, cost, now, deadline, future, threaded=threaded, timeout=timeout)

        def done(_f: asyncio.Future[Any], rec: Rec = self.recs[item.rid]) -> None:
            if rec.done_at is not None:
                self.problems.append(f"record {rec.rid}'s future completed twice")
            rec.done_at = self.now()

        future.add_done_callback(done)

    async def submit_and_record(
        self, b: DynamicBatcher[Box, Any], item: Box, cost: int, timeout_s: float | None, priority: int
    ) -> None:
        future = await b.submit(item, estimated_cost=cost, timeout_s=timeout_s, priority=priority)
        self.accept(item, cost, timeout_s, future)  # no suspension since the batcher accepted it

    async def submit_batch_and_record(
        self, b: DynamicBatcher[Box, Any], items: list[Box], costs: list[int], timeout_s: float | None, priority: int
    ) -> None:
        futures = await b.submit_batch(items, estimated_cost=costs, timeout_s=timeout_s, priority=priority)
        for item, cost, future in zip(items, costs, futures, strict=True):
            self.accept(item, cost, timeout_s, future)  # no suspension since the batcher accepted them

    def fresh(self) -> Box:
        self.next_id += 1
        return Box(self.next_id, self.next_id % self.keys if self.keys else 0)

    @staticmethod
    def fits(size: int, costs: list[int], limits: dict[str, Any]) -> bool:
        counted = len(costs) * max(costs, default=0) if limits["batch_cost"] == "padded" else sum(costs)
        return 1 <= size <= limits["max_batch_size"] and (size == 1 or counted <= limits["target_batch_cost"])

    def limits_now(self) -> dict[str, Any]:
        return {name: self.config[name] for name in LIMITS}

    def in_thread(self, fn: Any) -> Any:
        """Run ``fn`` in a real thread while the event loop is blocked: no virtual time passes meanwhile."""
        return self.thread.submit(fn).result(timeout=30)

    def threads_in_flight(self) -> int:
        """How many submit_threadsafe records are on their way in: handed to the loop, not yet accepted."""
        assert self.batcher is not None
        settled = [rec for rec in self.recs.values() if not rec.threaded or rec.future.done()]
        known_accepted = sum(1 for rec in settled if not refused(rec.future))
        unsettled = len(self.recs) - len(settled)
        return unsettled - (self.batcher.stats.total_submitted - known_accepted)

    def settle_threaded(self) -> None:
        """Let the loop run until every threaded future has settled (they lag their records by a callback)."""
        for _ in range(10):
            if all(rec.future.done() for rec in self.recs.values() if rec.threaded):
                return
            self.run(asyncio.sleep(0))
        unsettled = [rec.rid for rec in self.recs.values() if rec.threaded and not rec.future.done()]
        raise AssertionError(f"submit_threadsafe futures unsettled after the run: {unsettled}")

    def no_tasks_left(self) -> None:
        """None of the batcher's tasks (nor any other) may outlive a run; cancelled ones get a few iterations."""
        for _ in range(10):
            left = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            if not left:
                return
            self.run(asyncio.sleep(0))
        raise AssertionError(f"tasks left after the run: {left}")

    def queue_full(self) -> bool:
        assert self.batcher is not None
        return self.batcher.stats.queue_depth >= self.config["max_queue_size"]

    # ------------------------------------------------------------------ setup

    @initialize(
        dispatch=st.sampled_from(["window", "eager"]),
        batch_cost=st.sampled_from(["sum", "padded"]),
        grouping=st.sampled_from(["fifo", "similar_cost"]),
        slots=st.integers(1, 3),
        budget=st.integers(1, 10),
        sizes=st.tuples(st.integers(1, 5), st.integers(1, 5)).map(sorted),
        batch_timeout_s=st.sampled_from([0.0, 0.25, 1.0]),
        max_queue_size=st.sampled_from([1, 2, 4, 8, 1000]),
        prefetch=st.integers(1, 3),
        request_timeout_s=TIMEOUTS,
        aging=st.sampled_from([0.0, 0.5, 1.0]),
        proc_time=QUARTERS,
        keys=st.sampled_from([0, 0, 1, 2, 3]),
        short=st.sampled_from([tokenbatcher._row.SHORT, 0, 3]),
    )
    def setup(
        self,
        dispatch: str,
        batch_cost: str,
        grouping: str,
        slots: int,
        budget: int,
        sizes: list[int],
        batch_timeout_s: float,
        max_queue_size: int,
        prefetch: int,
        request_timeout_s: float | None,
        aging: float,
        proc_time: float,
        keys: int,
        short: int,
    ) -> None:
        self.keys = keys
        # similar_cost queues longer than ``short`` move from one sorted list to a structure per bucket
        self.short_before, tokenbatcher._row.SHORT = tokenbatcher._row.SHORT, short
        self.config = {
            "dispatch": dispatch,
            "batch_cost": batch_cost,
            "grouping": grouping,
            "max_concurrent_batches": slots,
            "target_batch_cost": budget,
            "min_batch_size": sizes[0],
            "max_batch_size": sizes[1],
            "batch_timeout_s": batch_timeout_s,
            "max_queue_size": max_queue_size,
            "prefetch_batches": prefetch,
            "request_timeout_s": request_timeout_s,
            "priority_aging_s": aging,
        }
        self.proc_time = proc_time
        self.limits = [self.limits_now()]
        self.queue_bound = max_queue_size
        self.batcher = DynamicBatcher(
            self.process_fn, executor=OnLoop(), batch_key=key_of if keys else None, **self.config
        )
        self.run(self.batcher.start())
        self.running = True

    # ------------------------------------------------------------------ rules

    @rule(
        cost=st.integers(0, 12),
        timeout_s=TIMEOUTS,
        priority=st.integers(-2, 2),
        wait=st.sampled_from([0.0, 0.25, 1.0]),
    )
    def submit(self, cost: int, timeout_s: float | None, priority: int, wait: float) -> None:
        self.step = "submit"
        b = self.batcher
        assert b is not None
        item = self.fresh()
        if not self.running:
            with pytest.raises(RuntimeError, match="not running"):
                self.run(b.submit(item, estimated_cost=cost, timeout_s=timeout_s, priority=priority))
            return
        # A threaded submission still on its way in may take the room first.
        may_wait = self.queue_full() or self.threads_in_flight() > 0

        async def go() -> bool:
            try:
                await asyncio.wait_for(self.submit_and_record(b, item, cost, timeout_s, priority), wait or None)
            except asyncio.TimeoutError:  # asyncio.wait_for's; the builtin TimeoutError only from 3.11
                return False
            return True

        if wait == 0.0 and may_wait:
            return  # it could wait forever (a hung process_fn); submit_nowait covers this case
        if not self.run(go()):
            assert may_wait, "submit waited although the queue had room"
            assert item.rid not in self.recs, "submit timed out, yet the record was accepted"

    @rule(cost=st.integers(0, 12), timeout_s=TIMEOUTS, priority=st.integers(-2, 2))
    def submit_nowait(self, cost: int, timeout_s: float | None, priority: int) -> None:
        self.step = "submit_nowait"
        b = self.batcher
        assert b is not None
        item = self.fresh()

        async def go() -> None:
            if not self.running:
                with pytest.raises(RuntimeError, match="not running"):
                    b.submit_nowait(item, estimated_cost=cost, timeout_s=timeout_s, priority=priority)
                return
            full_before = self.queue_full()
            try:
                future = b.submit_nowait(item, estimated_cost=cost, timeout_s=timeout_s, priority=priority)
            except QueueFullError:
                assert full_before, "QueueFullError although the queue had room"
                self.rejected += 1
                return
            self.accept(item, cost, timeout_s, future)

        self.run(go())

    @rule(costs=st.lists(st.integers(0, 12), min_size=1, max_size=6), timeout_s=TIMEOUTS)
    def submit_several_nowait(self, costs: list[int], timeout_s: float | None) -> None:
        for cost in costs:
            self.submit_nowait(cost, timeout_s, 0)

    @rule(
        costs=st.lists(st.integers(0, 12), min_size=1, max_size=5),
        timeout_s=TIMEOUTS,
        priority=st.integers(-2, 2),
        wait=st.sampled_from([0.0, 0.25, 1.0]),
    )
    def submit_batch(self, costs: list[int], timeout_s: float | None, priority: int, wait: float) -> None:
        """All or nothing: it waits until every record fits, or queues none of them."""
        self.step = "submit_batch"
        b = self.batcher
        assert b is not None
        items = [self.fresh() for _ in costs]
        if not self.running or len(items) > self.config["max_queue_size"]:
            error, match = (RuntimeError, "not running") if not self.running else (ValueError, "max_queue_size")
            with pytest.raises(error, match=match):
                self.run(b.submit_batch(items, estimated_cost=costs, timeout_s=timeout_s, priority=priority))
            return
        fits = b.stats.queue_depth + len(items) <= self.config["max_queue_size"] and not self.threads_in_flight()

        async def go() -> bool:
            try:
                batch = self.submit_batch_and_record(b, items, costs, timeout_s, priority)
                await asyncio.wait_for(batch, wait or None)
            except asyncio.TimeoutError:  # asyncio.wait_for's; the builtin TimeoutError only from 3.11
                return False
            return True

        if wait == 0.0 and not fits:
            return  # it could wait forever (a hung process_fn)
        if not self.run(go()):
            assert not fits, "submit_batch waited although its records fitted"
            assert not any(item.rid in self.recs for item in items), "submit_batch gave up, yet queued records"
            event("submit_batch gave up waiting for room")

    @precondition(lambda self: self.running)
    @rule(
        costs=st.lists(st.integers(0, 12), min_size=1, max_size=4),
        timeout_s=TIMEOUTS,
        wait=st.sampled_from([0.0, 0.25, 1.0]),
    )
    def submit_from_a_thread(self, costs: list[int], timeout_s: float | None, wait: float) -> None:
        self.step = "thread_submit"
        b = self.batcher
        assert b is not None
        items = [self.fresh() for _ in costs]

        def submit_all() -> list[concurrent.futures.Future[Any]]:
            pairs = zip(items, costs, strict=True)
            return [b.submit_threadsafe(item, estimated_cost=cost, timeout_s=timeout_s) for item, cost in pairs]

        async def go() -> None:
            for item, cost, future in zip(items, costs, self.in_thread(submit_all), strict=True):
                self.accept(item, cost, timeout_s, future, threaded=True)
            await asyncio.sleep(wait)

        self.run(go())

    @rule(
        changes=st.fixed_dictionaries(
            {},
            optional={
                "target_batch_cost": st.integers(1, 10),
                "max_batch_size": st.integers(1, 5),
                "min_batch_size": st.integers(1, 5),
                "batch_cost": st.sampled_from(["sum", "padded"]),
                "grouping": st.sampled_from(["fifo", "similar_cost"]),
                "batch_timeout_s": st.sampled_from([0.0, 0.25, 1.0]),
                "max_queue_size": st.sampled_from([1, 2, 4, 8, 1000]),
                "prefetch_batches": st.integers(1, 3),
                "request_timeout_s": TIMEOUTS,
                "priority_aging_s": st.sampled_from([0.0, 0.5, 1.0]),
            },
        ),
        loops=st.none()
        | st.tuples(st.just("dispatch"), st.sampled_from(["window", "eager"]))
        | st.tuples(st.just("max_concurrent_batches"), st.integers(1, 3)),
    )
    def configure(self, changes: dict[str, Any], loops: tuple[str, Any] | None) -> None:
        """All or nothing; limits from the next batch on; the loops' shape only while stopped."""
        self.step = "configure"
        b = self.batcher
        assert b is not None
        if loops is not None:
            changes = {**changes, loops[0]: loops[1]}
        merged = {**self.config, **changes}
        before = {name: getattr(b, name) for name in self.config}
        assert before == self.config
        if merged["min_batch_size"] > merged["max_batch_size"]:
            with pytest.raises(ValueError, match="min_batch_size must be <= max_batch_size"):
                b.configure(**changes)
        elif self.running and loops is not None and loops[1] != self.config[loops[0]]:
            with pytest.raises(RuntimeError, match=f"{loops[0]} cannot change while DynamicBatcher is running"):
                b.configure(**changes)
        else:
            b.configure(**changes)
            self.config = merged
            event(f"configure {'while running' if self.running else 'while stopped'}")
            if self.config["dispatch"] == "eager":
                self.limits = [self.limits_now()]  # a batch is formed when it is handed over
            else:
                self.limits.append(self.limits_now())  # sealed batches keep theirs
            self.run(asyncio.sleep(0))  # the loops look again
            return
        assert {name: getattr(b, name) for name in self.config} == before, "a refused configure changed something"

    @rule(dt=QUARTERS)
    def read_stats_from_a_thread(self, dt: float) -> None:
        """Stats read from another thread while the loop runs never raise nor count a record twice."""
        self.step = "thread_stats"
        b = self.batcher
        assert b is not None
        finished = threading.Event()
        seen: list[str] = []

        def reader() -> None:
            last = (0, 0, 0, 0)
            while True:  # at least once, then until the loop has run
                try:
                    stats = b.stats
                    repr(b)
                except Exception as exc:
                    seen.append(f"stats from a thread raised {exc!r}")
                    return
                now = (stats.total_submitted, stats.total_completed, stats.total_expired, stats.total_batches)
                if stats.pending < 0 or any(x < y for x, y in zip(now, last, strict=True)):
                    seen.append(f"stats from a thread: pending {stats.pending}, counters {now} after {last}")
                last = now
                if finished.is_set():
                    return

        reading = self.thread.submit(reader)
        try:
            self.run(asyncio.sleep(dt))
        finally:
            finished.set()
            reading.result(timeout=30)
        self.problems.extend(seen)

    @rule(data=st.data())
    def cancel_a_future(self, data: st.DataObject) -> None:
        self.step = "cancel"
        # (a threaded future is not cancelled here: its record may complete before the cancel crosses over)
        undone = [rec for rec in self.recs.values() if not rec.future.done() and not rec.threaded]
        if not undone:
            return
        rec = data.draw(st.sampled_from(undone))
        assert rec.future.cancel()
        rec.cancelled_by_test = True
        if data.draw(st.booleans()):
            self.run(asyncio.sleep(0))

    @rule(dt=QUARTERS)
    def advance(self, dt: float) -> None:
        self.step = "advance"
        self.run(asyncio.sleep(dt))

    @rule()
    def advance_a_lot(self) -> None:
        self.step = "advance"
        self.run(asyncio.sleep(10.0))

    @rule(modes=st.lists(st.tuples(st.sampled_from(MODES), QUARTERS), min_size=1, max_size=3))
    def next_batches_misbehave(self, modes: list[tuple[str, float]]) -> None:
        self.step = "misbehave"
        self.modes.extend(modes)

    @rule()
    def release_hangs(self) -> None:
        self.step = "release"
        for batch in self.batches:
            if batch.mode == "hang" and batch.gate is not None and not batch.gate.done():
                batch.gate.set_result(None)
                batch.released = True
        self.run(asyncio.sleep(0))

    def can_drain(self) -> bool:
        """Whether a stop() without a timeout can finish (no process_fn hangs for good)."""
        hung = any(b.alive and b.mode in HANGS and not b.released for b in self.batches)
        return not hung and not any(mode in HANGS for mode, _ in self.modes)

    @precondition(lambda self: self.running and self.can_drain())
    @rule()
    def stop(self) -> None:
        self.step = "stop"
        assert self.batcher is not None
        self.run(self.batcher.stop())
        self.after_stop()

    @rule(timeout=st.sampled_from([0.0, 0.25, 1.0, 10.0]))
    def stop_with_timeout(self, timeout: float) -> None:
        self.step = "stop_timeout"
        assert self.batcher is not None
        self.run(self.batcher.stop(timeout=timeout))
        self.after_stop()

    @precondition(lambda self: self.running)
    @rule(timeout=QUARTERS)
    def stop_while_submitting(self, timeout: float) -> None:
        """From the moment stop() begins, submit and submit_nowait refuse, and a
        producer waiting for room in a full queue is released with RuntimeError."""
        self.step = "stop_timeout"
        b = self.batcher
        assert b is not None

        async def go() -> None:
            blocked = None
            if self.queue_full():
                blocked = asyncio.ensure_future(self.submit_and_record(b, self.fresh(), 1, None, 0))
                await asyncio.sleep(0)
            stopping = asyncio.ensure_future(b.stop(timeout=timeout))
            await asyncio.sleep(0)
            if not stopping.done():
                assert b.is_running
            with pytest.raises(RuntimeError, match="not running"):
                await b.submit(self.fresh())
            with pytest.raises(RuntimeError, match="not running"):
                b.submit_nowait(self.fresh())
            await stopping
            if blocked is not None:
                (outcome,) = await asyncio.gather(blocked, return_exceptions=True)
                if isinstance(outcome, BaseException):  # else it found room before stop() began
                    assert isinstance(outcome, RuntimeError), repr(outcome)
                    assert "not running" in str(outcome)
                    event("stop() released a producer waiting for room")

        self.run(go())
        self.after_stop()

    @precondition(lambda self: self.running)
    @rule(after=QUARTERS)
    def cancel_the_task_calling_stop(self, after: float) -> None:
        self.step = "stop_cancelled"
        b = self.batcher
        assert b is not None

        async def go() -> None:
            stopping = asyncio.ensure_future(b.stop())
            await asyncio.sleep(after)
            if not stopping.done():
                stopping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopping

        self.run(go())
        self.after_stop()

    @precondition(lambda self: self.running)
    @rule(after=QUARTERS)
    def restart_at_once_after_a_cancelled_stop(self, after: float) -> None:
        """start() right after a stop() whose caller was cancelled: the new run must not meet the old one."""
        self.step = "stop_cancelled"
        b = self.batcher
        assert b is not None

        async def go() -> None:
            stopping = asyncio.ensure_future(b.stop())
            await asyncio.sleep(after)
            if not stopping.done():
                stopping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopping
            last_run = list(b._tasks)
            await b.start()
            assert all(task.done() for task in last_run), "start() began a run under the last run's loops"

        self.run(go())
        self.after_stop(restarted=True)

    def after_stop(self, restarted: bool = False) -> None:
        """The end of a run: every future resolved, no task left, the counters add up exactly."""
        assert self.batcher is not None
        self.running = restarted
        assert self.batcher.is_running == restarted
        for batch in self.batches:  # drained, or their process_fn calls were cancelled
            batch.alive = False
        self.settle_threaded()
        undone = [rec.rid for rec in self.recs.values() if not rec.future.done()]
        assert not undone, f"stop() returned with unresolved futures: {undone}"
        if restarted:
            left = [t for t in asyncio.all_tasks(self.loop) if not t.done() and t not in self.batcher._tasks]
            assert not left, f"tasks of the last run left after a restart: {left}"
        else:
            self.no_tasks_left()
        stats = self.batcher.stats
        assert stats.pending == 0, stats
        assert stats.queue_depth == 0, stats
        self.stats_account_for_every_future()
        self.limits = [self.limits_now()]  # every batch of the last run is done

    @rule()
    def start(self) -> None:
        self.step = "start"
        assert self.batcher is not None
        if self.running:
            with pytest.raises(RuntimeError, match="already running"):
                self.run(self.batcher.start())
            return
        self.run(self.batcher.start())
        self.running = True
        assert self.batcher.is_running

    # ------------------------------------------------------------------ invariants

    @invariant()
    def no_problems(self) -> None:
        assert not self.problems, self.problems[:5]
        assert not self.errors.records, [r.getMessage() for r in self.errors.records[:3]]
        assert not self.loop_errors, self.loop_errors[:3]

    @invariant()
    def every_future_matches_what_happened_to_its_record(self) -> None:
        for rec in self.recs.values():
            fut = rec.future
            if not fut.done():
                continue
            if rec.done_in is None:
                rec.done_in = self.step
            batch = self.batches[rec.batch] if rec.batch is not None else None
            where = f"record {rec.rid} (batch {batch}, deadline {rec.deadline}, done in {rec.done_in})"
            if fut.cancelled():
                assert rec.cancelled_by_test, f"{where}: cancelled, but not by its caller"
                continue
            exc = fut.exception()
            if rec.threaded and refused(fut):
                assert batch is None, f"{where}: refused, yet handed to process_fn"
                assert "not running" in str(exc), f"{where}: {exc!r}"
                continue
            if exc is None:
                assert fut.result() == ("result", rec.rid), f"{where}: got {fut.result()!r}"
                assert batch is not None, f"{where}: got a result without reaching process_fn"
                assert batch.mode in ("ok", "hang"), f"{where}: got a result"
                assert batch.mode == "ok" or batch.released, f"{where}: a hung batch delivered"
            elif isinstance(exc, BatcherStoppedError):
                assert rec.done_in in ("stop_timeout", "stop_cancelled"), f"{where}: {exc!r}"
            elif isinstance(exc, TimeoutError):
                assert batch is None, f"{where}: handed to process_fn, yet expired"
                assert rec.timeout is not None, f"{where}: expired without a deadline"
                if not rec.threaded:  # (a threaded record's deadline counts from when it was queued)
                    assert rec.deadline is not None
                    assert rec.done_at == pytest.approx(rec.deadline, abs=EPS), f"{where}: expired at {rec.done_at}"
            else:
                assert batch is not None, f"{where}: never handed to process_fn, yet {exc!r}"
                if batch.mode in ("raise", "raise_sync"):
                    assert exc is batch.error, f"{where}: {exc!r}"
                elif batch.mode == "cancel":
                    assert isinstance(exc, BatchAbortedError), f"{where}: {exc!r}"
                elif batch.mode == "wrong_len":
                    n = len(batch.rids)
                    assert isinstance(exc, ValueError), f"{where}: {exc!r}"
                    assert f"process_fn returned {n - 1} results for batch of {n} records" in str(exc)
                elif batch.mode == "non_list":
                    assert isinstance(exc, TypeError), f"{where}: {exc!r}"
                else:
                    raise AssertionError(f"{where}: unexpected {exc!r}")

    @invariant()
    def stats_account_for_every_future(self) -> None:
        if self.batcher is None:
            return
        stats = self.batcher.stats
        unsettled = sum(1 for rec in self.recs.values() if rec.threaded and not rec.future.done())
        futures = [
            rec.future
            for rec in self.recs.values()
            if not (rec.threaded and (not rec.future.done() or refused(rec.future)))
        ]
        cancelled = sum(1 for f in futures if f.cancelled())
        done = [f for f in futures if f.done() and not f.cancelled()]
        completed = sum(1 for f in done if f.exception() is None)
        expired = sum(1 for f in done if isinstance(f.exception(), TimeoutError))
        failed = len(done) - completed - expired
        pending = sum(1 for f in futures if not f.done())
        got = (
            stats.total_submitted,
            stats.total_completed,
            stats.total_failed,
            stats.total_cancelled,
            stats.total_expired,
            stats.pending,
            stats.total_rejected,
        )
        want = (len(futures), completed, failed, cancelled, expired, pending, self.rejected)
        names = "(submitted, completed, failed, cancelled, expired, pending, rejected)"
        if unsettled:  # the counters may be ahead of the unsettled threaded futures, by at most their number
            ahead = [g - w for g, w in zip(got, want, strict=True)]
            assert min(ahead) >= 0, f"{names}: {got} vs {want}"
            assert ahead[0] <= unsettled, f"{names}: {got} vs {want}, {unsettled} unsettled"
            assert ahead[-1] == 0, f"{names}: {got} vs {want}"
        else:
            assert got == want, f"{names}: {got} != {want}"
        assert stats.total_submitted == (
            stats.total_completed + stats.total_failed + stats.total_cancelled + stats.total_expired + stats.pending
        )
        assert stats.total_batches == len(self.batches), stats
        assert stats.queue_depth <= max(self.queue_bound, self.config["max_queue_size"]), stats
        if stats.queue_depth <= self.config["max_queue_size"]:
            self.queue_bound = self.config["max_queue_size"]  # drained below a lowered bound: it holds from now

    def outcomes(self) -> set[str]:
        kinds = set()
        for rec in self.recs.values():
            mode = self.batches[rec.batch].mode if rec.batch is not None else "never handed over"
            if rec.future.cancelled():
                kinds.add(f"cancelled ({'in process_fn' if rec.batch is not None else 'queued'})")
            elif rec.future.exception() is None:
                kinds.add(f"result ({mode})")
            else:
                kinds.add(f"{type(rec.future.exception()).__name__} ({mode})")
        return kinds

    # ------------------------------------------------------------------ teardown

    def teardown(self) -> None:
        loop = self.loop
        try:
            if self.batcher is not None and not loop.is_closed():
                self.step = "stop_timeout"
                self.run(self.batcher.stop(timeout=5.0))
                self.settle_threaded()
                self.no_tasks_left()
                self.every_future_matches_what_happened_to_its_record()
                self.stats_account_for_every_future()
                assert all(rec.future.done() for rec in self.recs.values())
                for kind in sorted(self.outcomes()):
                    event(f"outcome: {kind}")  # shown by --hypothesis-show-statistics
                assert self.batcher.stats.pending == 0
                self.no_problems()
        finally:
            tokenbatcher._row.SHORT = self.short_before
            self.thread.shutdown()
            logging.getLogger("tokenbatcher").removeHandler(self.errors)
            leftovers = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in leftovers:
                task.cancel()
            if leftovers:
                loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


BatcherMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_batcher_state_machine = BatcherMachine.TestCase
# Passing takes ~20 s; a failure's shrinking can take minutes, and the 60 s default
# timeout would cut it off before Hypothesis prints the minimal failing sequence.
test_batcher_state_machine.pytestmark = [pytest.mark.timeout(400)]
