"""Scaling: the batcher's own cost per record against queue depth, in every mode.

Issue 10, items 5 and 6: every batching mode should cost the same per record
whether 1,000 or 1,000,000 records are queued, and the one-caller ``"eager"``
round trip should come within 2x of a plain asyncio future.

What is measured
----------------
For each mode and each depth ``N`` (default 1k, 10k, 100k, 1M):

* A fresh event loop and a fresh ``DynamicBatcher`` with ``max_queue_size=N``
  and otherwise the mode's settings (budget 32,000 and ``max_batch_size`` 256:
  the defaults).  ``process_fn`` is a no-op (it returns the batch), gated on an
  ``asyncio.Event``: it waits for the event if it is called before the queue
  is released.
* **Fill** (submit cost): ``N`` records are submitted one at a time,
  ``fut = await batcher.submit(i, estimated_cost=c, timeout_s=t, priority=p)``.
  ``submit`` does not suspend while the queue has room, so the batching loops
  do not run during the fill: the whole queue is pre-filled.
  ``submit µs/record`` = fill time / ``N``.
* **Drain** (batching overhead): the gate is opened and ``await
  batcher.stop()`` is called -- what a batch job's ``async with`` does when it
  has submitted its shard.  ``stop()`` returns once every accepted future is
  resolved, so the clock runs from releasing the queue to the last future
  resolved.  (Stopping also lets the last, partial batch go at once instead of
  waiting out ``batch_timeout_s``, which would add a constant 50 ms to the
  ``"window"`` modes.)  ``drain µs/record`` = drain time / ``N``.
* Afterwards, untimed: every future must hold its own record as its result
  (none failed, expired or was lost), else the run fails.
* Costs: token counts drawn from a log-normal distribution (median 64, sigma
  1.0, clamped to 1..4,096; mean about 105) with a fixed seed, the same records
  in every mode; depth ``N`` uses the first ``N`` of them.
* The clock: by default the process's CPU time (``time.process_time``), so
  that other processes on a shared machine do not inflate the figures; the
  harness never sleeps or waits on a timer, so on an idle machine CPU time and
  wall time agree.  ``--clock wall`` reports ``time.perf_counter`` instead;
  the JSON holds both.
* The garbage collector is off during the fill and the drain, as ``timeit``
  does, with ``gc.collect()`` between them: a full collection over millions of
  live objects, landing in one run and not another, would swamp the figure.
* Every point runs at least ``--repeats`` times (default 3), and a short one
  again until its runs took ``--point-s`` seconds (default 2; at most 51
  runs); the medians are reported.  Depths run in order, after one untimed
  warm-up run per mode; at each depth every mode runs once, then the further
  runs go in rounds, one run per mode each, so that a slow spell of a shared
  machine lands on every mode of the depth alike.  "x FIFO" is the median
  of the ratios of the runs made in the same round.
* Time cap (``--cap-s``, default 60 s of wall time per point): before each
  point the harness projects its fill + drain time from the mode's last two
  points (``t * (N'/N)^k``: ``t`` the last point's wall time, ``k`` the growth
  exponent of their CPU times, at least 1) and skips the point, and every deeper one, if the projection exceeds the cap:
  the table shows "skipped (projected > X s)".  A projection can fall short
  (a quadratic cost hides behind linear ones at small depths), so a drain that
  still runs when the point reaches the cap is cut short with ``stop(timeout=)``
  and shown as "stopped at cap (> X s)".
* Memory per queued record: a separate, untimed pass per mode at one depth
  (``--memory-depth``, default 100k or the deepest depth if smaller) under
  ``tracemalloc``: the bytes Python allocated during the fill, divided by the
  number of records.  That counts what queueing a record costs -- the future
  handed to the caller, the queue's own record, any deadline timer, slots in
  the queue's containers -- and not the records themselves or the harness's
  list of futures, both built before the measurement starts.

* The memory floor (``_memory_floor.py``; ``--no-floor`` skips it): the
  same records, made afresh in submission order, visited in the order each
  mode dispatches them with the least a drain must do per record, no batcher.
  Out of submission order a deep queue misses the CPU's caches whatever the
  algorithm; the goals are checked a second time on each figure minus its
  order's floor, which leaves the batcher's own work.

The modes
---------
=============  ===========================================================
fifo           the defaults (``dispatch="window"``, ``grouping="fifo"``)
eager          ``dispatch="eager"``
padded         ``batch_cost="padded"``
similar_cost   ``batch_cost="padded", grouping="similar_cost"`` (as the
               tuning guide recommends)
priorities     a random ``priority`` (0-9) per record
deadlines      ``timeout_s=3600`` per record: a deadline that never expires
all            all of the above together (``"eager"`` dispatch)
=============  ===========================================================

The round trip (issue 10, item 6)
---------------------------------
One caller, one request at a time: ``await (await batcher.submit(i))`` through
``DynamicBatcher(dispatch="eager")`` with a no-op ``process_fn``, against the
floor: a plain future put on an ``asyncio.Queue`` with the request and resolved
by a consumer task (``fut.set_result(item)``).  Rounds alternate between the
two; medians of µs per round trip.

Run from the repository root::

    python -m tests.bench.scaling [--quick] [--json FILE] [--plot FILE] [--cap-s 60]

The report (markdown) goes to stdout, progress to stderr.  ``--plot`` needs
matplotlib.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import tokenbatcher
from tokenbatcher import BatchCost, BatcherStoppedError, Dispatch, DynamicBatcher, Grouping

from . import _memory_floor

Clock: TypeAlias = Literal["cpu", "wall"]

CLOCK_UNITS = {"cpu": "µs of CPU time", "wall": "µs (wall clock)"}

DEPTHS = (1_000, 10_000, 100_000, 1_000_000)
QUICK_DEPTHS = (1_000, 10_000)
CAP_S = 60.0
REPEATS = 3
"""Runs of every point, at least (the median is reported)."""
POINT_S = 2.0
"""Short points are run again until their runs took this long (wall), ..."""
MAX_RUNS = 51
"""... up to this many runs."""
SEED = 20_260_410
DEADLINE_S = 3600.0
"""The deadline mode's ``timeout_s``: far longer than any run."""
PRIORITY_LEVELS = 10
ROUNDTRIPS = 10_000
ROUNDTRIP_ROUNDS = 5

# Issue 10, item 5's goals.
FLAT_RATIO = 1.5
FIFO_RATIO = 2.0
BYTES_LIMIT = 1024


@dataclass(frozen=True)
class Mode:
    """One batching configuration under test."""

    name: str
    description: str
    dispatch: Dispatch = "window"
    batch_cost: BatchCost = "sum"
    grouping: Grouping = "fifo"
    priorities: bool = False
    """Submit each record with a random priority."""
    deadlines: bool = False
    """Submit each record with ``timeout_s=DEADLINE_S``."""

    def build(self, process_fn: Callable[[list[int]], Any], max_queue_size: int) -> DynamicBatcher[int, int]:
        """A batcher with this mode's settings and the defaults otherwise."""
        return DynamicBatcher(
            process_fn,
            max_queue_size=max_queue_size,
            dispatch=self.dispatch,
            batch_cost=self.batch_cost,
            grouping=self.grouping,
        )


MODES = (
    Mode("fifo", 'defaults (dispatch="window")'),
    Mode("eager", 'dispatch="eager"', dispatch="eager"),
    Mode("padded", 'batch_cost="padded"', batch_cost="padded"),
    Mode("similar_cost", 'batch_cost="padded", grouping="similar_cost"', batch_cost="padded", grouping="similar_cost"),
    Mode("priorities", f"random priority 0-{PRIORITY_LEVELS - 1} per record", priorities=True),
    Mode("deadlines", f"timeout_s={DEADLINE_S:g} per record", deadlines=True),
    Mode(
        "all",
        "eager + padded + similar_cost + priorities + deadlines",
        dispatch="eager",
        batch_cost="padded",
        grouping="similar_cost",
        priorities=True,
        deadlines=True,
    ),
)
MODE_NAMES = tuple(mode.name for mode in MODES)


# --------------------------------------------------------------------- the workload


@dataclass(frozen=True)
class Workload:
    """The records' costs and priorities (record ``i`` is the int ``i``); depth ``n`` uses the first ``n``."""

    costs: list[int]
    priorities: list[int]

    @classmethod
    def draw(cls, n: int, seed: int) -> Workload:
        """Draw ``n`` skewed token counts and priorities from fixed seeds."""
        rng = random.Random(seed)
        mu = math.log(64)
        costs = [min(4096, max(1, round(rng.lognormvariate(mu, 1.0)))) for _ in range(n)]
        rng = random.Random(seed + 1)
        priorities = [rng.randrange(PRIORITY_LEVELS) for _ in range(n)]
        return cls(costs, priorities)


@dataclass
class Prepared:
    """What one run submits, built before anything is measured."""

    items: list[int]
    costs: list[int]
    priorities: list[int]
    timeout_s: float | None


def prepare(mode: Mode, work: Workload, n: int) -> Prepared:
    """Slice the workload for a mode at depth ``n``."""
    return Prepared(
        items=list(range(n)),
        costs=work.costs[:n],
        priorities=work.priorities[:n] if mode.priorities else [0] * n,
        timeout_s=DEADLINE_S if mode.deadlines else None,
    )


# --------------------------------------------------------------------- one point


@dataclass
class Run:
    """The figures of one fill and drain (seconds on both clocks)."""

    n: int
    fill_cpu: float
    fill_wall: float
    drain_cpu: float
    drain_wall: float
    queued_at_release: int
    batches: int
    avg_batch_size: float
    resolved: int
    """Futures resolved to their own record."""
    over_cap: bool = False
    """The drain was stopped at the time cap; ``resolved`` is then below ``n``."""


class _Watch:
    """Process CPU time and wall time since construction."""

    __slots__ = ("cpu", "wall")

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def elapsed(self) -> tuple[float, float]:
        """``(cpu_s, wall_s)`` since construction."""
        return time.process_time() - self.cpu, time.perf_counter() - self.wall


def _gated_noop() -> tuple[asyncio.Event, Callable[[list[int]], Any]]:
    gate = asyncio.Event()

    async def process(batch: list[int]) -> list[int]:
        if not gate.is_set():
            await gate.wait()
        return batch

    return gate, process


async def _fill(batcher: DynamicBatcher[int, int], job: Prepared, futures: list[asyncio.Future[int]]) -> None:
    submit = batcher.submit
    items, costs, priorities, timeout_s = job.items, job.costs, job.priorities, job.timeout_s
    for i in range(len(items)):
        futures[i] = await submit(items[i], estimated_cost=costs[i], timeout_s=timeout_s, priority=priorities[i])


def _count_right(futures: list[asyncio.Future[int]], items: list[int]) -> tuple[int, str]:
    """How many futures hold their own record as result, and what the first other one holds."""
    good = 0
    first_bad = ""
    for item, fut in zip(items, futures, strict=True):
        if not fut.done() or fut.cancelled():
            state = "pending" if not fut.done() else "cancelled"
        elif fut.exception() is not None:
            state = repr(fut.exception())
        elif fut.result() != item:
            state = f"result {fut.result()!r}"
        else:
            good += 1
            continue
        first_bad = first_bad or f"record {item}: {state}"
    return good, first_bad


async def drain_once(mode: Mode, job: Prepared, cap_s: float | None = None) -> Run:
    """Fill a gated batcher with ``job``, release it, drain it; time both.

    With ``cap_s``, a drain still running when fill + drain reach ``cap_s``
    seconds (wall) is cut short by ``stop(timeout=...)``, which fails the
    records left; the run then comes back with ``over_cap`` set.

    Raises:
        AssertionError: A future did not resolve to its own record (and the
            drain was not cut short).
    """
    n = len(job.items)
    gate, process = _gated_noop()
    batcher = mode.build(process, max_queue_size=n)
    await batcher.start()
    placeholder: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    futures = [placeholder] * n
    gc.collect()
    gc.disable()  # as timeit does; collections run between the timed phases instead
    try:
        watch = _Watch()
        await _fill(batcher, job, futures)
        fill_cpu, fill_wall = watch.elapsed()
        queued = batcher.stats.queue_depth
        gc.collect()
        timeout = None if cap_s is None else max(0.0, cap_s - fill_wall)
        watch = _Watch()
        gate.set()
        await batcher.stop(timeout=timeout)
        drain_cpu, drain_wall = watch.elapsed()
    finally:
        gc.enable()
    resolved, first_bad = _count_right(futures, job.items)
    over_cap = timeout is not None and any(
        fut.done() and not fut.cancelled() and isinstance(fut.exception(), BatcherStoppedError) for fut in futures
    )
    if resolved != n and not over_cap:
        raise AssertionError(f"{mode.name}: {n - resolved} of {n} futures not resolved right ({first_bad})")
    stats = batcher.stats
    return Run(
        n,
        fill_cpu,
        fill_wall,
        drain_cpu,
        drain_wall,
        queued,
        stats.total_batches,
        stats.avg_batch_size,
        resolved,
        over_cap,
    )


async def memory_once(mode: Mode, job: Prepared) -> float:
    """Bytes allocated per record while filling a gated batcher (tracemalloc)."""
    n = len(job.items)
    _, process = _gated_noop()
    batcher = mode.build(process, max_queue_size=n)
    await batcher.start()
    placeholder: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    futures = [placeholder] * n
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await _fill(batcher, job, futures)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    for fut in futures:  # nothing needs processing: let stop() drop them all
        fut.cancel()
    await batcher.stop()
    return used / n


# --------------------------------------------------------------------- the round trip


async def _eager_roundtrips(k: int, timer: Callable[[], float]) -> float:
    async def noop(batch: list[int]) -> list[int]:
        return batch

    async with DynamicBatcher(noop, dispatch="eager") as batcher:
        submit = batcher.submit
        for i in range(100):  # warm-up
            await (await submit(i))
        t0 = timer()
        for i in range(k):
            if await (await submit(i)) != i:
                raise AssertionError(f"eager round trip {i}: wrong result")
        return timer() - t0


async def _floor_roundtrips(k: int, timer: Callable[[], float]) -> float:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, asyncio.Future[int]]] = asyncio.Queue()

    async def consumer() -> None:
        while True:
            item, fut = await queue.get()
            fut.set_result(item)

    task = loop.create_task(consumer())
    try:
        for i in range(100):  # warm-up
            fut = loop.create_future()
            queue.put_nowait((i, fut))
            await fut
        t0 = timer()
        for i in range(k):
            fut = loop.create_future()
            queue.put_nowait((i, fut))
            if await fut != i:
                raise AssertionError(f"floor round trip {i}: wrong result")
        return timer() - t0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def roundtrip(k: int = ROUNDTRIPS, rounds: int = ROUNDTRIP_ROUNDS, clock: Clock = "cpu") -> dict[str, Any]:
    """One caller, one request at a time: "eager" against a plain future (µs per round trip)."""
    timer = time.process_time if clock == "cpu" else time.perf_counter
    eager: list[float] = []
    floor: list[float] = []
    for r in range(rounds):
        pair = [(eager, _eager_roundtrips), (floor, _floor_roundtrips)]
        for out, fn in pair if r % 2 == 0 else pair[::-1]:
            gc.collect()
            out.append(asyncio.run(fn(k, timer)) / k * 1e6)
    eager_us, floor_us = statistics.median(eager), statistics.median(floor)
    return {
        "roundtrips": k,
        "rounds": rounds,
        "clock": clock,
        "eager_us": eager_us,
        "floor_us": floor_us,
        "ratio": eager_us / floor_us,
        "eager_all_us": eager,
        "floor_all_us": floor,
    }


# --------------------------------------------------------------------- the sweep


def _median_run(runs: list[Run], clock: Clock) -> dict[str, Any]:
    n = runs[0].n

    def us(values: list[float]) -> float:
        return statistics.median(values) / n * 1e6

    figures = {
        "submit_cpu_us": us([r.fill_cpu for r in runs]),
        "drain_cpu_us": us([r.drain_cpu for r in runs]),
        "submit_wall_us": us([r.fill_wall for r in runs]),
        "drain_wall_us": us([r.drain_wall for r in runs]),
    }
    return {
        "skipped": False,
        "n": n,
        "runs": len(runs),
        "drain_runs_us": [getattr(r, f"drain_{clock}") / n * 1e6 for r in runs],
        "submit_us": figures[f"submit_{clock}_us"],
        "drain_us": figures[f"drain_{clock}_us"],
        **figures,
        "queued_at_release": runs[0].queued_at_release,
        "batches": runs[0].batches,
        "avg_batch_size": runs[0].avg_batch_size,
        "resolved": min(r.resolved for r in runs),
    }


def project(done: list[tuple[int, float, float]], n: int) -> float:
    """Projected wall seconds at depth ``n`` from the measured ``(depth, wall_s, cpu_s)`` points.

    The growth exponent ``k`` (at least 1) comes from the CPU times of the last
    two points, which load on a shared machine barely moves; the projection
    scales the last point's wall time by ``(n / its depth) ** k``.
    """
    n1, wall1, cpu1 = done[-1]
    k = 1.0
    if len(done) >= 2:
        n0, _, cpu0 = done[-2]
        if cpu0 > 0 and cpu1 > 0 and n1 > n0:
            k = max(1.0, math.log(cpu1 / cpu0) / math.log(n1 / n0))
    return wall1 * math.pow(n / n1, k)


def run(
    *,
    depths: Sequence[int] = DEPTHS,
    modes: Sequence[str] = MODE_NAMES,
    cap_s: float = CAP_S,
    clock: Clock = "cpu",
    repeats: int = REPEATS,
    point_s: float = POINT_S,
    memory_depth: int | None = None,
    roundtrips: int = ROUNDTRIPS,
    seed: int = SEED,
    with_floor: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the whole benchmark; return a JSON-able dict of results.

    Args:
        depths: Queue depths, ascending.
        modes: Names from ``MODE_NAMES``.
        cap_s: Skip a point whose projected fill + drain time (wall) exceeds
            this; stop a drain that reaches it.
        clock: What the µs figures count: ``"cpu"`` (process CPU time) or ``"wall"``.
        repeats: Runs of every point, at least (median reported).
        point_s: Short points are run again until their runs took this long (wall), up to ``MAX_RUNS``.
        memory_depth: Depth of the memory pass (default: the deepest depth, at most 100k).
        roundtrips: Round trips per round of the one-caller test (0 skips it).
        seed: Seed of the workload.
        with_floor: Measure the memory floor of each mode's order (``_memory_floor``).
        log: Progress messages.
    """
    depths = sorted(depths)
    unknown = [m for m in modes if m not in MODE_NAMES]
    if unknown:
        raise ValueError(f"modes: unknown {unknown}; choose from {', '.join(MODE_NAMES)}")
    if clock not in ("cpu", "wall"):
        raise ValueError(f"clock must be 'cpu' or 'wall', got {clock!r}")
    if not depths or depths[0] < 1:
        raise ValueError(f"depths must be >= 1, got {depths}")
    if repeats < 1 or not point_s >= 0:
        raise ValueError(f"repeats must be >= 1 and point_s >= 0, got {repeats} and {point_s}")
    chosen = [mode for mode in MODES if mode.name in modes]
    if memory_depth is None:
        memory_depth = min(depths[-1], 100_000)
    work = Workload.draw(max(depths[-1], memory_depth), seed)
    started = time.perf_counter()

    for mode in chosen:  # warm-up, untimed
        asyncio.run(drain_once(mode, prepare(mode, work, min(depths[0], 1_000))))

    points: dict[str, dict[str, dict[str, Any]]] = {mode.name: {} for mode in chosen}
    measured: dict[str, list[tuple[int, float, float]]] = {mode.name: [] for mode in chosen}
    for n in depths:
        runs: dict[str, list[Run]] = {}  # the modes measured at this depth, and their runs so far
        for mode in chosen:
            done = measured[mode.name]
            if done:
                projected = project(done, n)
                if projected > cap_s:  # k >= 1: every deeper point is projected longer still
                    points[mode.name][str(n)] = {"skipped": True, "n": n, "projected_s": projected, "cap_s": cap_s}
                    log(f"  {mode.name:>13} {n:>9,}: skipped (projected {projected:,.0f} s > {cap_s:g} s)")
                    continue
            first = asyncio.run(drain_once(mode, prepare(mode, work, n), cap_s))
            wall = first.fill_wall + first.drain_wall
            done.append((n, wall, first.fill_cpu + first.drain_cpu))
            if first.over_cap:
                points[mode.name][str(n)] = {
                    "skipped": True,
                    "over_cap": True,
                    "n": n,
                    "elapsed_s": wall,
                    "cpu_s": first.fill_cpu + first.drain_cpu,
                    "resolved_before_stop": first.resolved,
                    "cap_s": cap_s,
                }
                log(
                    f"  {mode.name:>13} {n:>9,}: stopped at the cap ({wall:,.0f} s, {first.resolved:,} records "
                    f"resolved, {first.fill_cpu + first.drain_cpu:,.0f} s CPU)"
                )
                continue
            runs[mode.name] = [first]
            gc.collect()
        # More runs in rounds, one per mode each, so that a slow spell of a shared machine
        # lands on every mode of the depth alike: each point gets ``repeats`` runs and,
        # if they are short, as many as fill ``point_s`` seconds (at most MAX_RUNS).
        wanted = {
            name: max(repeats, min(MAX_RUNS, math.ceil(point_s / max(got[0].fill_wall + got[0].drain_wall, 1e-6))))
            for name, got in runs.items()
        }
        for mode in chosen:
            if mode.name not in runs:
                wanted[mode.name] = 0
        for _ in range(max(wanted.values(), default=0) - 1):
            for mode in chosen:
                got = runs.get(mode.name)
                if got is not None and len(got) < wanted[mode.name]:
                    got.append(asyncio.run(drain_once(mode, prepare(mode, work, n))))
                    if n >= 100_000:
                        gc.collect()
        for name, got in runs.items():
            point = points[name][str(n)] = _median_run(got, clock)
            log(
                f"  {name:>13} {n:>9,}: drain {point['drain_us']:8.2f} µs/record, "
                f"submit {point['submit_us']:6.2f} µs/record ({len(got)} run(s))"
            )
        gc.collect()

    memory: dict[str, float] = {}
    for mode in chosen:
        memory[mode.name] = asyncio.run(memory_once(mode, prepare(mode, work, memory_depth)))
        gc.collect()
        log(f"  {mode.name:>13} memory: {memory[mode.name]:.0f} bytes per queued record")

    floor: dict[str, dict[str, float]] | None = None
    if with_floor:
        timer = time.process_time if clock == "cpu" else time.perf_counter
        floor = _memory_floor.measure(
            [m.name for m in chosen], depths, work.costs, work.priorities, timer, repeats=repeats, point_s=point_s
        )
        for order, by_depth in floor.items():
            log(f"  floor {order:>18}: " + ", ".join(f"{_us(v)}" for v in by_depth.values()) + " µs/record")

    trip = None
    if roundtrips:
        trip = roundtrip(roundtrips, clock=clock)
        log(f"  round trip: eager {trip['eager_us']:.1f} µs, floor {trip['floor_us']:.1f} µs")

    results: dict[str, Any] = {
        "meta": machine_info(),
        "settings": {
            "depths": depths,
            "cap_s": cap_s,
            "clock": clock,
            "repeats": repeats,
            "point_s": point_s,
            "max_runs": MAX_RUNS,
            "memory_depth": memory_depth,
            "memory_method": "tracemalloc: bytes allocated during the fill / records",
            "seed": seed,
            "costs": "log-normal token counts, median 64, sigma 1.0, clamped to 1..4096",
            "target_batch_cost": 32_000,
            "max_batch_size": 256,
        },
        "modes": {
            mode.name: {
                "settings": mode.description,
                "points": points[mode.name],
                "bytes_per_record": memory[mode.name],
            }
            for mode in chosen
        },
        "floor": floor,
        "roundtrip": trip,
        "elapsed_s": time.perf_counter() - started,
    }
    results["goals"] = goals(results)
    return results


def machine_info() -> dict[str, str]:
    """Where and when the figures were taken."""
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpu_count": str(os.cpu_count()),
        "load_avg": load,
        "tokenbatcher": tokenbatcher.__version__,
        "argv": " ".join(["python -m tests.bench.scaling", *sys.argv[1:]]),
    }


# --------------------------------------------------------------------- the report


def depth_label(n: int) -> str:
    """``1000000 -> "1M"``, ``10000 -> "10k"``, ``200 -> "200"``."""
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def parse_depth(text: str) -> int:
    """``"1M" -> 1000000``, ``"10k" -> 10000``, ``"250" -> 250``."""
    text = text.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _flat_pair(depths: list[int]) -> tuple[int, int] | None:
    """The (deepest, reference) depths compared for flatness: 10k if measured, else the shallowest."""
    if len(depths) < 2:
        return None
    ref = 10_000 if 10_000 in depths and depths[-1] > 10_000 else depths[0]
    return depths[-1], ref


def _us(value: float) -> str:
    return f"{value:,.1f}" if value >= 100 else f"{value:.2f}"


def x_fifo(point: dict[str, Any], fifo: dict[str, Any]) -> float:
    """A mode's drain figure as a multiple of FIFO's at the same depth.

    The median of the ratios of runs made in the same round (the first run of
    each, then round by round), so that a slow spell of the machine, which
    slows both alike, cancels out; the ratio of the medians for results
    without the runs.
    """
    mine, theirs = point.get("drain_runs_us"), fifo.get("drain_runs_us")
    if mine and theirs:
        return statistics.median(
            [a / b for a, b in zip(mine, theirs, strict=False) if b > 0]
        )  # pairs up to the shorter
    return float(point["drain_us"] / fifo["drain_us"])


def goals(results: dict[str, Any]) -> dict[str, Any]:
    """Issue 10, item 5's three goals: a verdict and the failures for each."""
    depths: list[int] = results["settings"]["depths"]
    modes: dict[str, Any] = results["modes"]
    pair = _flat_pair(depths)
    flat: list[str] = []
    if pair is not None:
        deep, ref = pair
        for name, mode in modes.items():
            a, b = mode["points"][str(deep)], mode["points"][str(ref)]
            if a["skipped"] or b["skipped"]:
                flat.append(f"{name} ({depth_label(deep if a['skipped'] else ref)} not measured)")
            elif a["drain_us"] > FLAT_RATIO * b["drain_us"]:
                flat.append(f"{name} ({a['drain_us'] / b['drain_us']:.2f}x)")
    vs_fifo: list[str] = []
    if "fifo" in modes:
        fifo = modes["fifo"]["points"]
        for name, mode in modes.items():
            worst: list[str] = []
            for n in depths:
                p, f = mode["points"][str(n)], fifo[str(n)]
                if p["skipped"] or f["skipped"]:
                    worst.append(f"{depth_label(n)} not measured")
                elif x_fifo(p, f) > FIFO_RATIO:
                    worst.append(f"{depth_label(n)}: {x_fifo(p, f):.1f}x")
            if worst:
                vs_fifo.append(f"{name} ({', '.join(worst)})")
    heavy = [
        f"{name} ({mode['bytes_per_record']:,.0f} B)"
        for name, mode in modes.items()
        if mode["bytes_per_record"] > BYTES_LIMIT
    ]
    return {
        "net": _net_of_floor(results, pair),
        "flat": {"judged": pair is not None, "pair": pair, "failures": flat},
        "vs_fifo": {"judged": "fifo" in modes, "failures": vs_fifo},
        "memory": {"judged": True, "failures": heavy},
    }


def _net_of_floor(results: dict[str, Any], pair: tuple[int, int] | None) -> dict[str, Any] | None:
    """The flat and x-FIFO goals judged on each figure minus the memory floor of its mode's order."""
    floor: dict[str, dict[str, float]] | None = results.get("floor")
    modes: dict[str, Any] = results["modes"]
    if not floor:
        return None

    def net(name: str, n: int) -> float | None:
        point = modes[name]["points"][str(n)]
        if point["skipped"]:
            return None
        return point["drain_us"] - floor[_memory_floor.ORDER_OF_MODE[name]][str(n)]

    flat: list[str] = []
    vs_fifo: list[str] = []
    for name in modes:
        if pair is not None:
            deep, ref = net(name, pair[0]), net(name, pair[1])
            if deep is not None and ref is not None and deep > FLAT_RATIO * ref:
                flat.append(f"{name} ({deep / ref:.2f}x)")
        if "fifo" in modes:
            worst = []
            for n in results["settings"]["depths"]:
                mine, fifo = net(name, n), net("fifo", n)
                if mine is not None and fifo is not None and mine > FIFO_RATIO * fifo:
                    worst.append(f"{depth_label(n)}: {mine / fifo:.1f}x")
            if worst:
                vs_fifo.append(f"{name} ({', '.join(worst)})")
    return {"flat": flat, "vs_fifo": vs_fifo, "room": _room(results, floor)}


def _room(results: dict[str, Any], floor: dict[str, dict[str, float]]) -> list[str]:
    """Where a mode misses the raw x-FIFO goal: how much work of its own the goal leaves it.

    A mode's drain is at least the floor of its order, so the goal leaves it
    ``2 x FIFO - its floor`` of its own work; shown as a multiple of FIFO's own
    work at the same depth (FIFO's figure minus the floor of submission order).
    """
    modes: dict[str, Any] = results["modes"]
    if "fifo" not in modes:
        return []
    room: list[str] = []
    for name, mode in modes.items():
        cells = []
        for n in results["settings"]["depths"]:
            p, f = mode["points"][str(n)], modes["fifo"]["points"][str(n)]
            if p["skipped"] or f["skipped"] or x_fifo(p, f) <= FIFO_RATIO:
                continue
            left = FIFO_RATIO * f["drain_us"] - floor[_memory_floor.ORDER_OF_MODE[name]][str(n)]
            fifo_own = f["drain_us"] - floor["submission"][str(n)] if "submission" in floor else None
            if fifo_own is not None and fifo_own > 0:
                cells.append(f"{depth_label(n)}: {left / fifo_own:.1f}x FIFO's own")
        if cells:
            room.append(f"{name} ({', '.join(cells)})")
    return room


def format_report(results: dict[str, Any]) -> str:
    """The markdown report: the drain table, the goal check, the submit table, the round trip."""
    depths: list[int] = results["settings"]["depths"]
    modes: dict[str, Any] = results["modes"]
    cap = results["settings"]["cap_s"]
    pair = _flat_pair(depths)
    fifo = modes.get("fifo", {}).get("points")
    unit = CLOCK_UNITS[results["settings"]["clock"]]
    lines = [
        f"### Draining a pre-filled queue: batching overhead, {unit} per record (x FIFO at the same depth)",
        "",
        "| mode | settings | "
        + " | ".join(depth_label(n) for n in depths)
        + (f" | {depth_label(pair[0])} / {depth_label(pair[1])}" if pair else "")
        + " | bytes / queued record |",
        "|---|---|" + "---:|" * len(depths) + ("---:|" if pair else "") + "---:|",
    ]
    for name, mode in modes.items():
        cells: list[str] = []
        for n in depths:
            p = mode["points"][str(n)]
            if p["skipped"]:
                cells.append(
                    f"stopped at cap (> {cap:g} s)" if p.get("over_cap") else f"skipped (projected > {cap:g} s)"
                )
                continue
            cell = _us(p["drain_us"])
            if fifo is not None and not fifo[str(n)]["skipped"]:
                cell += f" ({x_fifo(p, fifo[str(n)]):.2f}x)"
            cells.append(cell)
        if pair:
            a, b = mode["points"][str(pair[0])], mode["points"][str(pair[1])]
            cells.append("n/a" if a["skipped"] or b["skipped"] else f"{a['drain_us'] / b['drain_us']:.2f}")
        cells.append(f"{mode['bytes_per_record']:,.0f}")
        lines.append(f"| {name} | {mode['settings']} | " + " | ".join(cells) + " |")

    g = goals(results)
    lines += ["", "Goal check (issue 10, item 5):", ""]
    if g["flat"]["judged"]:
        deep, ref = g["flat"]["pair"]
        what = f"its {depth_label(deep)} figure <= {FLAT_RATIO}x its {depth_label(ref)} figure"
        if (deep, ref) != (1_000_000, 10_000):
            what += " (the goal is stated for 1M against 10k; these depths are a stand-in)"
        lines.append(_verdict(f"Every mode flat, {what}", g["flat"]["failures"]))
    else:
        lines.append("- Every mode flat: not judged (one depth only).")
    if g["vs_fifo"]["judged"]:
        lines.append(_verdict(f"Every mode <= {FIFO_RATIO:g}x FIFO at every depth", g["vs_fifo"]["failures"]))
    else:
        lines.append("- Every mode <= 2x FIFO: not judged (fifo not run).")
    lines.append(_verdict(f"Every mode <= {BYTES_LIMIT:,} bytes per queued record", g["memory"]["failures"]))
    floor = results.get("floor")
    if floor:
        lines += [
            "",
            f"### The memory floor: {unit} per record to visit the same records in each mode's order",
            "",
            "No batcher: fresh records, made in submission order, read in the order a mode dispatches them "
            "(queued, cost, key), put in batches of 256, each future given its result "
            "(`tests/bench/_memory_floor.py`). "
            "Out of submission order, deep queues miss the CPU's caches whatever the algorithm.",
            "",
            "| order | modes | " + " | ".join(depth_label(n) for n in depths) + " |",
            "|---|---|" + "---:|" * len(depths),
        ]
        for order, by_depth in floor.items():
            users = ", ".join(m for m in modes if _memory_floor.ORDER_OF_MODE[m] == order)
            lines.append(f"| {order} | {users} | " + " | ".join(_us(by_depth[str(n)]) for n in depths) + " |")
        net = g["net"]
        lines += [
            "",
            "The goals again, on each drain figure minus the floor of its mode's order (the batcher's own "
            "work, without the cost of the order itself):",
            "",
            _verdict(f"Every mode flat, net of the floor ({FLAT_RATIO}x)", net["flat"]),
            _verdict(f"Every mode <= {FIFO_RATIO:g}x FIFO, both net of their floors", net["vs_fifo"]),
        ]
        if net.get("room"):
            lines += [
                "",
                f"Where a mode misses the raw <= {FIFO_RATIO:g}x FIFO goal, the work of its own that the goal "
                f"leaves it ({FIFO_RATIO:g}x FIFO's figure minus the floor of the mode's order), as a multiple of "
                "FIFO's own work at that depth: " + "; ".join(net["room"]) + ".",
            ]

    lines += [
        "",
        f"### Submitting into that queue: {unit} per record",
        "",
        "| mode | " + " | ".join(depth_label(n) for n in depths) + " | avg batch (deepest run) |",
        "|---|" + "---:|" * (len(depths) + 1),
    ]
    for name, mode in modes.items():
        cells = []
        deepest = None
        for n in depths:
            p = mode["points"][str(n)]
            cells.append("skipped" if p["skipped"] else _us(p["submit_us"]))
            if not p["skipped"]:
                deepest = p
        cells.append(f"{deepest['avg_batch_size']:.1f}" if deepest else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    trip = results.get("roundtrip")
    if trip:
        lines += [
            "",
            f"### One caller, one request at a time (issue 10, item 6): {unit} per round trip",
            "",
            '| DynamicBatcher(dispatch="eager") | plain future via a queue consumer (floor) | ratio |',
            "|---:|---:|---:|",
            f"| {trip['eager_us']:.1f} | {trip['floor_us']:.1f} | {trip['ratio']:.2f}x |",
            "",
            _verdict(
                "The eager round trip within 2x of the floor", [] if trip["ratio"] <= 2 else [f"{trip['ratio']:.2f}x"]
            ),
        ]
    meta = results["meta"]
    settings = results["settings"]
    lines += [
        "",
        f"Measured {meta['date']} on {meta['python']}, {meta['platform']}, {meta['cpu_count']} CPUs, "
        f"load average {meta['load_avg']}; tokenbatcher {meta['tokenbatcher']}; `{meta['argv']}`, "
        f"{results['elapsed_s']:.0f} s. Memory: {settings['memory_method']}, "
        f"at {depth_label(settings['memory_depth'])} records.",
    ]
    return "\n".join(lines)


def _verdict(goal: str, failures: list[str]) -> str:
    if not failures:
        return f"- {goal}: **met**."
    return f"- {goal}: **not met**: {'; '.join(failures)}."


def plot(results: dict[str, Any], path: str) -> None:
    """µs per record against depth (log-log), one line per mode."""
    # Typed Any: matplotlib is optional, and its stubs are not strict-clean.
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    ticker: Any = importlib.import_module("matplotlib.ticker")

    depths: list[int] = results["settings"]["depths"]
    fig, ax = plt.subplots(figsize=(8, 5))
    colors: dict[str, Any] = {}
    for name, mode in results["modes"].items():
        measured = [p for p in mode["points"].values() if not p["skipped"]]
        (line,) = ax.plot([p["n"] for p in measured], [p["drain_us"] for p in measured], marker="o", label=name)
        colors[name] = line.get_color()
        if name == "fifo" and measured:
            ax.plot(
                [p["n"] for p in measured],
                [FIFO_RATIO * p["drain_us"] for p in measured],
                linestyle="--",
                color="grey",
                label=f"goal: {FIFO_RATIO:g}x fifo",
            )
    for order, by_depth in (results.get("floor") or {}).items():
        first = next(name for name in results["modes"] if _memory_floor.ORDER_OF_MODE[name] == order)
        ax.plot(
            depths,
            [by_depth[str(n)] for n in depths],
            linestyle=":",
            color=colors[first],
            linewidth=1.2,
            label=f"floor: {order} order",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(depths, [depth_label(n) for n in depths])
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.set_xlabel("records queued when the queue is released")
    ax.set_ylabel(f"batching overhead, {CLOCK_UNITS[results['settings']['clock']]} per record")
    ax.set_title("Draining a pre-filled queue, no-op process_fn")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.bench.scaling``."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.scaling", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="depths 1k and 10k only, fewer round trips")
    parser.add_argument("--depths", help="comma-separated depths, e.g. 1k,10k,100k,1M (default)")
    parser.add_argument("--modes", help=f"comma-separated subset of {','.join(MODE_NAMES)}")
    parser.add_argument("--cap-s", type=float, default=CAP_S, help="skip points projected to take longer (s)")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="count process CPU time (default; robust to other processes' load) or wall time",
    )
    parser.add_argument("--repeats", type=int, default=REPEATS, help="runs of every point, at least (median)")
    parser.add_argument(
        "--point-s", type=float, default=POINT_S, help="run short points again until their runs took this long (s)"
    )
    parser.add_argument(
        "--memory-depth", type=parse_depth, help="depth of the tracemalloc pass (default min(deepest, 100k))"
    )
    parser.add_argument("--roundtrips", type=int, help=f"round trips per round (default {ROUNDTRIPS:,}; 0 skips)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--no-floor", action="store_true", help="skip the memory-floor pass")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", metavar="FILE", help="write a plot (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install matplotlib")
    depths = (
        [parse_depth(d) for d in args.depths.split(",")]
        if args.depths
        else list(QUICK_DEPTHS if args.quick else DEPTHS)
    )
    modes = args.modes.split(",") if args.modes else list(MODE_NAMES)
    roundtrips = args.roundtrips if args.roundtrips is not None else (2_000 if args.quick else ROUNDTRIPS)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        results = run(
            depths=depths,
            modes=modes,
            cap_s=args.cap_s,
            clock=args.clock,
            repeats=args.repeats,
            point_s=args.point_s,
            memory_depth=args.memory_depth,
            roundtrips=roundtrips,
            seed=args.seed,
            with_floor=not args.no_floor,
            log=log,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(format_report(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
