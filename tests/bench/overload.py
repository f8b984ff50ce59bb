"""Overload: goodput under a latency target, open-loop Poisson arrivals, ours and the peers side by side.

The question (issue 13): a service states a latency target (60 ms); how many
records per second finish within it as the offered load goes from a quarter of
the model's capacity to four times it, and what happens to the rest?

The model
---------
A simulated GPU: one batch at a time, a batch of ``n`` records takes
``4 ms + 0.4 ms * n`` (``clean``).  Its capacity at the target is taken at
batch 64: a record that waits for one batch and then rides in the next spends
about 2 x 29.6 ms, just inside 60 ms, so ``64 / 29.6 ms`` = 2,162 records/s is
the most any scheduler can finish within target (a bigger batch is faster per
record but late).  The ``noisy`` variant multiplies every batch's duration by
a lognormal factor of mean 1 (sigma 0.25) and makes 1 batch in 100 five times
slower (a straggler).  The model is serial: a batch handed over while another
runs starts when that one ends.  It returns each record as its own result, so
a result delivered to the wrong record is caught.

The harness (identical for every system)
----------------------------------------
* Arrivals are a Poisson process at ``load x capacity`` records/s, drawn from
  a ``random.Random`` seeded per (seed, model, load): every system sees the
  same arrival times.  A driver starts one client task per arrival on time
  (open loop: arrivals never wait for results); the client submits, awaits
  the result, and records the latency from its arrival.
* ``--warmup`` seconds of arrivals at the same rate may come first: served
  like the rest, left out of every figure.  It matters for the systems that
  learn: BentoML fits its cost model in a training phase of ~11 batches and
  then refits at most once per 5 s, so a short point without warm-up measures
  it mostly on its training-phase fit (ours with ``latency_target_s`` learns
  too).  The default, 0, measures a cold start.
* Each point offers ``--duration`` seconds of arrivals, then gives the
  stragglers ``--drain`` seconds.  Whatever is still unfinished then is cut:
  the model turns instant, the clients are cancelled, the system is stopped.
  A cut record is at least ``drain`` late (> target), so goodput is exact; it
  enters the percentiles with its age at the cut as a lower bound (shown
  ``>=``).
* The driver holds only the unfinished clients: tens of thousands of
  finished tasks kept to the end made the garbage collector's pauses delay
  the arrivals (at 4x, an arrival lag p99 of 83 ms before this was fixed).
  The arrival lag (how late the driver started each client, p99) is
  reported per point.
* The simulated model waits out each batch's last ``SPIN_S`` (1.5 ms) by
  yielding to the loop rather than on a timer: asyncio's timers wake up to a
  millisecond late (``epoll`` rounds up), which would idle the model ~1 ms
  between batches, a cost of the harness rather than of the system.
* ``--clock virtual`` runs every point on a virtual clock (the test suite's,
  and the peers' ``time`` reads it): exact timing and no event-loop cost,
  for iterating on policy; the page's figures come from the real clock.
* Each record ends as exactly one of: served (on time or late), refused at
  submit, shed (accepted, then failed with a timeout or overload error),
  failed (any other error, or a wrong result: a bug) or cut.
* A fresh system and a fresh event loop per point; points run load by load,
  every system at one load before the next, so drifting machine load spreads
  over all of them.

Figures per system and load: **goodput** (records served within the target of
their arrival, per second of arrival window), p50 / p99 latency of the
accepted records (served or cut), the rejection rate (refused + shed over
arrivals), and how many were served late.

The systems: flyte's ``DynamicBatcher`` (defaults), ours ``window`` and
``eager`` (defaults), ours ``eager`` tuned by hand for the target, ours with
``latency_target_s`` (once ``DynamicBatcher`` accepts it), BentoML's
``CorkDispatcher`` and Ray's ``@serve.batch`` (see ``_peers_overload`` for how
each peer is driven and what exactly is measured).  A system whose package is
missing is skipped with a note.

Run from the repository root::

    python -m tests.bench.overload                  # ~4 s of arrivals per point
    python -m tests.bench.overload --quick          # smoke run
    python -m tests.bench.overload --json out.json --plot overload.png
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import gc
import inspect
import json
import math
import os
import platform
import random
import selectors
import sys
import time
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import tokenbatcher
from tokenbatcher import DynamicBatcher, QueueFullError

from ._peers_overload import Adapter, Opener, ProcessFn, Submit, probe

TARGET_S = 0.060
LOADS = (0.25, 0.5, 0.9, 1.2, 2.0, 4.0)
CAPACITY_BATCH = 64
STRAGGLER_SEEN = 3.0
"""A batch slower than this many times its noise-free duration is counted as a straggler (jitter alone: ~1e-5)."""
"""The batch size at which the model's throughput is its capacity at the target."""

# --------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelSpec:
    """A simulated model's latency curve: ``(base_s + per_record_s * n) * noise``."""

    name: str
    base_s: float = 0.004
    per_record_s: float = 0.0004
    jitter_sigma: float = 0.0
    """Sigma of the lognormal factor (of mean 1) on every batch; 0 for none."""
    straggler_p: float = 0.0
    """Probability that a batch is a straggler."""
    straggler_x: float = 5.0
    """How many times slower a straggler is."""

    def duration(self, n: int, rng: random.Random) -> float:
        """Seconds one batch of ``n`` records takes."""
        seconds = self.base_s + self.per_record_s * n
        if self.jitter_sigma:
            seconds *= rng.lognormvariate(-(self.jitter_sigma**2) / 2, self.jitter_sigma)
        if self.straggler_p and rng.random() < self.straggler_p:
            seconds *= self.straggler_x
        return seconds

    def capacity(self, batch: int = CAPACITY_BATCH) -> float:
        """Records per second at ``batch`` records per call (noise-free)."""
        return batch / (self.base_s + self.per_record_s * batch)

    def describe(self) -> str:
        text = f"{self.base_s * 1e3:g} ms + {self.per_record_s * 1e3:g} ms/record"
        if self.jitter_sigma:
            text += f", x lognormal(mean 1, sigma {self.jitter_sigma:g})"
        if self.straggler_p:
            text += f", {self.straggler_p:.0%} of batches {self.straggler_x:g}x slower"
        return text


MODELS = {
    "clean": ModelSpec("clean"),
    "noisy": ModelSpec("noisy", jitter_sigma=0.25, straggler_p=0.01),
}


SPIN_S = 0.0015
"""The simulated model's last stretch of each batch that it waits for by yielding, not by a timer."""


async def _until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    """Return at loop time ``when``, to within one pass of the event loop.

    ``asyncio.sleep`` wakes up to a millisecond late on the real clock (``epoll``
    rounds its timeout up to whole milliseconds): that would idle the simulated
    model ~1 ms between batches, a cost of the harness, not of the system under
    test (a model run in a thread wakes the loop at once).  So the last
    ``SPIN_S`` are waited by yielding to the loop, pass after pass.
    """
    if when - loop.time() > SPIN_S:
        await asyncio.sleep(when - loop.time() - SPIN_S)
    while loop.time() < when:  # noqa: ASYNC110 -- polling the clock is the point: no event fires at ``when``
        await asyncio.sleep(0)


class SimulatedModel:
    """One serial accelerator following a [ModelSpec][]; ``closed`` makes it instant."""

    def __init__(self, spec: ModelSpec, seed: int, records: int = 0) -> None:
        self.spec = spec
        self.rng = random.Random(seed)
        self.sizes: list[int] = []
        self.busy_until = -math.inf
        self.measure_from = self.measure_to = math.inf
        """Loop times between which batches are measured (the arrival window after the warm-up)."""
        self.busy_s = 0.0
        """Seconds of the batches that began between ``measure_from`` and ``measure_to``."""
        self.idle_s = 0.0
        """Seconds the model sat idle between two measured batches, and how many such gaps."""
        self.gaps = 0
        self.closed = False
        self.began = array("d", [math.inf]) * records
        """Per record (records are the ints ``0 .. records - 1``): when its batch began running."""
        self.nominal = array("d", [0.0]) * records
        """That batch's noise-free duration, and its duration."""
        self.took = array("d", [0.0]) * records

    async def __call__(self, batch: list[Any]) -> list[Any]:
        if not self.closed:
            self.sizes.append(len(batch))
            loop = asyncio.get_running_loop()
            now = loop.time()
            begin = max(now, self.busy_until)
            measured = self.measure_from <= begin < self.measure_to
            if measured and self.busy_until >= self.measure_from:
                self.idle_s += begin - self.busy_until
                self.gaps += 1
            seconds = self.spec.duration(len(batch), self.rng)
            end = begin + seconds
            nominal = self.spec.base_s + self.spec.per_record_s * len(batch)
            for record in batch:
                self.began[record], self.nominal[record], self.took[record] = begin, nominal, seconds
            self.busy_until = end
            if measured:
                self.busy_s += end - begin
            if type(loop).time is not asyncio.BaseEventLoop.time:  # a virtual clock: timers are exact
                await asyncio.sleep(end - now)
            else:
                await _until(loop, end)
        return list(batch)


# --------------------------------------------------------------------- our systems


@dataclass(frozen=True)
class System:
    """One system under test."""

    key: str
    label: str
    note: str
    open: Opener | None
    """``open(model, target_s)``: an async context manager yielding an [Adapter][]; None if unavailable."""
    missing: str | None = None


_SHED = (TimeoutError, asyncio.TimeoutError, QueueFullError)

TARGET: Any = object()
"""Placeholder in a system's settings for the run's latency target."""


def _ours(*, nowait: bool = False, **settings: Any) -> Opener:
    """Open our ``DynamicBatcher`` with ``settings``; ``nowait`` submits with ``submit_nowait``."""

    @asynccontextmanager
    async def open_ours(model: ProcessFn, target_s: float) -> AsyncIterator[Adapter]:
        resolved: dict[str, Any] = {k: (target_s if v is TARGET else v) for k, v in settings.items()}
        batcher: DynamicBatcher[Any, Any] = DynamicBatcher(model, **resolved)

        async def submit_nowait(record: Any) -> Awaitable[Any]:
            return batcher.submit_nowait(record)

        submit: Submit = submit_nowait if nowait else batcher.submit
        await batcher.start()
        try:
            yield Adapter(submit=submit, refused=(QueueFullError,), shed=_SHED)
        finally:
            await batcher.stop()

    return open_ours


TUNED = {"dispatch": "eager", "max_batch_size": 64, "request_timeout_s": 0.02, "max_queue_size": 64}
"""Ours "eager" tuned by hand for a 60 ms target on this model, submitting with ``submit_nowait``.

A batch of 64 takes 29.6 ms, so a record taken within ~30 ms of arriving still
makes 60 ms; the queue bound refuses what could not be taken in time, and the
deadline drops what waited too long anyway.  Picked from a grid on the virtual
clock (``max_batch_size`` 48 / 56 / 64 x ``request_timeout_s`` 20-35 ms x
``max_queue_size`` 64 / 128 / 192) as the best worst case over 1.2x-4x on both
models; the timeout is the grid's smallest because timer slack and a loaded
event loop eat into the slack on the real clock.
"""


def has_latency_target() -> bool:
    """Does this tokenbatcher's ``DynamicBatcher`` take ``latency_target_s``?"""
    return "latency_target_s" in inspect.signature(DynamicBatcher).parameters


def our_systems() -> list[System]:
    """Our variants, in report order (the latency-target ones marked missing until the feature lands)."""
    tuned = ", ".join(f"{k}={v}" for k, v in TUNED.items() if k != "dispatch")
    systems = [
        System("window", 'ours "window"', "DynamicBatcher defaults (dispatch='window')", _ours()),
        System("eager", 'ours "eager"', "DynamicBatcher(dispatch='eager'), other defaults", _ours(dispatch="eager")),
        System(
            "tuned",
            'ours "eager", tuned',
            f"dispatch='eager', {tuned}; submit_nowait (a full queue refuses)",
            _ours(nowait=True, **TUNED),
        ),
    ]
    target = has_latency_target()
    why = None if target else "not available yet: DynamicBatcher has no latency_target_s"
    for key, dispatch in (("target", "eager"), ("target-window", "window")):
        systems.append(
            System(
                key,
                f'ours "{dispatch}", latency_target_s',
                f"DynamicBatcher(dispatch='{dispatch}', latency_target_s=target), other defaults",
                _ours(dispatch=dispatch, latency_target_s=TARGET) if target else None,
                why,
            )
        )
    return systems


PEER_KEYS = ("flyte", "bentoml", "ray")


def all_systems(*, peers: bool = True) -> list[System]:
    """Every system in report order; ``peers=False`` leaves the peers out without importing them."""
    ours = our_systems()
    if not peers:
        return ours
    found = {p.key: p for p in probe()}

    def peer(key: str) -> System:
        p = found[key]
        return System(p.key, p.label, p.note, p.open, f"package missing ({p.missing})" if p.open is None else None)

    return [peer("flyte"), *ours, peer("bentoml"), peer("ray")]


# --------------------------------------------------------------------- one point

_PENDING, _SERVED, _REFUSED, _SHED_, _FAILED, _CUT = range(6)


@dataclass
class Point:
    """The outcome of one system at one load (times in ms, rates in records/s)."""

    system: str
    model: str
    load: float
    offered_rps: float
    window_s: float
    arrivals: int
    """Measured arrivals: those after the warm-up."""
    warmup_arrivals: int = 0
    served: int = 0
    served_late: int = 0
    late_own_batch: int = 0
    """Served late, but would have been on time had its batch run at the model's noise-free speed."""
    late_straggler: int = 0
    """Of ``late_own_batch``: its batch was a straggler (ran over ``STRAGGLER_SEEN`` times its noise-free duration)."""
    refused: int = 0
    shed: int = 0
    failed: int = 0
    cut: int = 0
    goodput_rps: float = 0.0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    p50_lower_bound: bool = False
    """True when the p50 is a cut record's age: the true value is at least this."""
    p99_lower_bound: bool = False
    batches: int = 0
    mean_batch: float = 0.0
    utilization: float = 0.0
    idle_gap_ms: float = 0.0
    """Mean time the model sat idle from the end of one batch to the start of the next (measured window)."""
    cpu_share: float = 0.0
    """CPU seconds of the whole process (harness and system) per wall second of the point."""
    """Share of the measured window the model spent running batches that began in it."""
    driver_lag_p99_ms: float = 0.0
    """How late the arrival driver started its clients (a loaded machine shows here)."""
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    """The first few failures, warm-up included."""

    @property
    def rejected(self) -> int:
        return self.refused + self.shed

    @property
    def accounted(self) -> int:
        return self.served + self.refused + self.shed + self.failed + self.cut


def poisson_offsets(rate: float, duration: float, seed: int) -> array[float]:
    """Arrival times in [0, duration) of a Poisson process at ``rate`` per second (an array: see ``run_point``)."""
    rng = random.Random(seed)
    offsets = array("d")
    t = rng.expovariate(rate)
    while t < duration:
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def _nearest_rank(ordered: Sequence[tuple[float, bool]], q: float) -> tuple[float, bool]:
    if not ordered:
        return math.nan, False
    k = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[k]


async def run_point(
    system: System,
    spec: ModelSpec,
    *,
    load: float,
    duration: float,
    drain: float,
    warmup: float = 0.0,
    target_s: float = TARGET_S,
    seed: int = 1,
) -> Point:
    """Offer ``duration`` seconds of Poisson arrivals at ``load`` x capacity to one system.

    The arrivals of the first ``warmup`` seconds, at the same rate, are served
    like the others but left out of every figure.
    """
    assert system.open is not None, f"{system.key} is not available"
    loop = asyncio.get_running_loop()
    rate = load * spec.capacity()
    offsets = poisson_offsets(rate, warmup + duration, seed)
    n = len(offsets)
    first = bisect.bisect_left(offsets, warmup)  # the first measured arrival
    model = SimulatedModel(spec, seed + 1, n)
    # Per arrival, in arrays: the collector does not walk them (lists of 100k+ entries each made its
    # full collections, which stop the loop for every system, several times longer).
    outcome = array("b", [_PENDING]) * n
    latency = array("d", [math.nan]) * n
    arrived = array("d", [math.nan]) * n
    lags = array("d")
    errors: list[str] = []
    cut = False
    wall0, cpu0 = time.perf_counter(), time.process_time()

    async with system.open(model, target_s) as adapter:
        submit, refused, shed = adapter.submit, adapter.refused, adapter.shed

        def fail(i: int, what: str) -> None:
            outcome[i] = _FAILED
            if len(errors) < 5:
                errors.append(what)

        async def client(i: int) -> None:
            try:
                waiter = await submit(i)
            except refused:
                if not cut:
                    outcome[i] = _REFUSED
                return
            except Exception as exc:  # a broken system must show in the table, not hang the run
                if not cut:
                    fail(i, f"submit: {exc!r}")
                return
            try:
                result = await waiter
            except shed:
                if not cut:
                    outcome[i] = _SHED_
                return
            except Exception as exc:
                if not cut:
                    fail(i, repr(exc))
                return
            if cut:
                return
            if result != i:
                fail(i, f"record {i} got {result!r}")
                return
            outcome[i] = _SERVED
            latency[i] = loop.time() - arrived[i]

        # Only the unfinished clients are held: a finished one is garbage at once, so the collector
        # does not walk tens of thousands of dead tasks (its pauses would delay every system's arrivals).
        tasks: set[asyncio.Task[None]] = set()
        start = loop.time() + 0.005
        model.measure_from, model.measure_to = start + warmup, start + warmup + duration
        i = 0
        while i < n:
            now = loop.time()
            due = start + offsets[i]
            if due > now:
                await asyncio.sleep(due - now)
                continue
            while i < n and start + offsets[i] <= now:  # every arrival that is due, in order
                lags.append(now - (start + offsets[i]))
                arrived[i] = now
                task = loop.create_task(client(i))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
        if tasks:
            await asyncio.wait(set(tasks), timeout=max(0.0, start + warmup + duration + drain - loop.time()))
        cut = True
        now = loop.time()
        for j in range(n):
            if outcome[j] == _PENDING:
                outcome[j] = _CUT
                latency[j] = now - arrived[j]
        model.closed = True
        left = list(tasks)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)

    point = Point(
        system=system.key,
        model=spec.name,
        load=load,
        offered_rps=rate,
        window_s=duration,
        arrivals=n - first,
        warmup_arrivals=first,
        errors=errors,
        wall_s=time.perf_counter() - wall0,
    )
    accepted: list[tuple[float, bool]] = []
    on_time = 0
    for i in range(first, n):
        o, lat = outcome[i], latency[i]
        if o == _SERVED:
            point.served += 1
            accepted.append((lat, False))
            if lat <= target_s:
                on_time += 1
            else:
                point.served_late += 1
                begin, nominal, seconds = model.began[i], model.nominal[i], model.took[i]
                if begin - arrived[i] + nominal <= target_s:
                    point.late_own_batch += 1
                    if seconds > STRAGGLER_SEEN * nominal:
                        point.late_straggler += 1
        elif o == _REFUSED:
            point.refused += 1
        elif o == _SHED_:
            point.shed += 1
        elif o == _FAILED:
            point.failed += 1
        else:
            point.cut += 1
            accepted.append((lat, True))
    accepted.sort()
    point.goodput_rps = on_time / duration
    point.p50_ms, point.p50_lower_bound = _nearest_rank(accepted, 0.50)
    point.p99_ms, point.p99_lower_bound = _nearest_rank(accepted, 0.99)
    point.p50_ms *= 1e3
    point.p99_ms *= 1e3
    point.utilization = model.busy_s / duration
    point.idle_gap_ms = 1e3 * model.idle_s / model.gaps if model.gaps else 0.0
    point.cpu_share = (time.process_time() - cpu0) / point.wall_s
    point.batches = len(model.sizes)
    point.mean_batch = sum(model.sizes) / len(model.sizes) if model.sizes else 0.0
    lags = sorted(lags[first:])  # the measured arrivals'
    point.driver_lag_p99_ms = _nearest_rank([(x, False) for x in lags], 0.99)[0] * 1e3 if lags else 0.0
    return point


# --------------------------------------------------------------------- the sweep


@dataclass
class Settings:
    """What one run measures."""

    duration: float = 4.0
    drain: float = 2.0
    warmup: float = 0.0
    loads: tuple[float, ...] = LOADS
    models: tuple[str, ...] = ("clean", "noisy")
    target_s: float = TARGET_S
    seed: int = 1
    clock: str = "real"
    """``"real"``, or ``"virtual"``: the test suite's virtual clock (exact timing, no event-loop cost)."""


PEER_CLOCK_MODULES = ("bentoml._internal.marshal.dispatcher", "ray.serve.batching", "flyte.extras._dynamic_batcher")
"""The peers' modules that read wall-clock time; on the virtual clock they read the loop's instead."""


class _LoopTime:
    """Stands in for the ``time`` module in a peer's module: its clocks read the running loop's time."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def time() -> float:
        return asyncio.get_event_loop().time()

    monotonic = perf_counter = time


class _JumpingSelector(selectors.DefaultSelector):
    """Never sleeps: when nothing is ready it moves the loop's clock to the next timer."""

    def __init__(self, loop: _VirtualLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(0)
        if not events and timeout:
            self._loop.now += timeout
        return events


class _VirtualLoop(asyncio.SelectorEventLoop):
    """The virtual clock of ``tests/conftest.py`` (without pytest, which the peers' environment lacks)."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(selector=_JumpingSelector(self))

    def time(self) -> float:
        return self.now


def _run_on(clock: str, coro: Any) -> Point:
    """Run one point on a fresh event loop: the real one, or the virtual clock with the peers' clocks on it."""
    if clock == "real":
        return asyncio.run(coro)
    patched = [sys.modules[name] for name in PEER_CLOCK_MODULES if name in sys.modules]
    saved = [module.time for module in patched]
    loop = _VirtualLoop()
    try:
        for module in patched:
            module.time = _LoopTime()
        return loop.run_until_complete(coro)
    finally:
        for module, original in zip(patched, saved, strict=True):
            module.time = original
        loop.close()


def run(
    settings: Settings,
    systems: Sequence[System],
    *,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> list[Point]:
    """Every available system at every model and load, each point on a fresh event loop."""
    points: list[Point] = []
    live = [s for s in systems if s.open is not None]
    for m, name in enumerate(settings.models):
        spec = MODELS[name]
        for k, load in enumerate(settings.loads):
            for system in live:
                gc.collect()
                point = _run_on(
                    settings.clock,
                    run_point(
                        system,
                        spec,
                        load=load,
                        duration=settings.duration,
                        drain=settings.drain,
                        warmup=settings.warmup,
                        target_s=settings.target_s,
                        seed=settings.seed * 1_000 + m * 100 + k,
                    ),
                )
                points.append(point)
                log(
                    f"  {name} {load:>4g}x {system.label:<34} goodput {point.goodput_rps:7,.0f}/s  "
                    f"p99 {_ms(point.p99_ms, point.p99_lower_bound):>8}  "
                    f"rejected {_pct(point.rejected, point.arrivals):>6}  late {point.served_late:>5,} "
                    f"({point.late_own_batch:,} own, {point.late_straggler:,} stragglers)  "
                    f"cut {point.cut:>6,}  busy {point.utilization:4.0%}  batch {point.mean_batch:5.1f}  "
                    f"gap {point.idle_gap_ms:4.2f} ms  cpu {point.cpu_share:4.0%}  "
                    f"lag {point.driver_lag_p99_ms:5.1f} ms  ({point.wall_s:.1f} s)"
                )
    return points


# --------------------------------------------------------------------- reports


def _ms(value: float, lower: bool) -> str:
    if math.isnan(value):
        return "-"
    text = f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    return f">={text}" if lower else text


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def format_tables(points: Sequence[Point], systems: Sequence[System], settings: Settings) -> str:
    """Markdown: per model, a goodput grid (loads x systems), then every figure per load and system."""
    labels = {s.key: s.label for s in systems}
    order = [s.key for s in systems if s.open is not None]
    out: list[str] = []
    for name in settings.models:
        spec = MODELS[name]
        capacity = spec.capacity()
        mine = [p for p in points if p.model == name]
        if not mine:
            continue
        by = {(p.load, p.system): p for p in mine}
        out.append(
            f"### {name} model: {spec.describe()}; capacity {capacity:,.0f} records/s at batch {CAPACITY_BATCH}, "
            f"target {settings.target_s * 1e3:g} ms"
        )
        out.append("")
        out.append("Goodput, records/s finished within the target:")
        out.append("")
        out.append("| load | offered/s | " + " | ".join(labels[k] for k in order) + " |")
        out.append("|---:|---:|" + "---:|" * len(order))
        for load in settings.loads:
            cells = [f"{by[load, k].goodput_rps:,.0f}" if (load, k) in by else "-" for k in order]
            out.append(f"| {load:g}x | {load * capacity:,.0f} | " + " | ".join(cells) + " |")
        out.append("")
        out.append(
            "| load | system | goodput/s | % of capacity | p50 ms | p99 ms | rejected | refused | shed "
            "| served late (own batch slow; of which stragglers) | cut | avg batch | model busy | idle gap ms "
            "| failed | driver lag p99 ms |"
        )
        out.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for load in settings.loads:
            for k in order:
                p = by.get((load, k))
                if p is None:
                    continue
                out.append(
                    f"| {load:g}x | {labels[k]} | {p.goodput_rps:,.0f} | {100 * p.goodput_rps / capacity:.0f}% "
                    f"| {_ms(p.p50_ms, p.p50_lower_bound)} | {_ms(p.p99_ms, p.p99_lower_bound)} "
                    f"| {_pct(p.rejected, p.arrivals)} | {p.refused:,} | {p.shed:,} "
                    f"| {p.served_late:,} ({p.late_own_batch:,}; {p.late_straggler:,}) | {p.cut:,} "
                    f"| {p.mean_batch:.1f} | {p.utilization:.0%} | {p.idle_gap_ms:.2f} | {p.failed:,} "
                    f"| {p.driver_lag_p99_ms:.1f} |"
                )
        out.append("")
    notes = [f"- {s.label}: {s.note}" for s in systems if s.open is not None]
    skipped = [f"- {s.label}: skipped, {s.missing}" for s in systems if s.open is None]
    out.append("Systems:")
    out.append("")
    out.extend(notes + skipped)
    out.append("")
    out.append(
        f"{settings.duration:g} s of arrivals per point after {settings.warmup:g} s of warm-up, "
        f"{settings.drain:g} s of drain. "
        "`>=`: the percentile fell on a record cut unfinished at the end of the drain (its age then). "
        "Driver lag: how late the arrival driver started its clients, p99; more than a few ms means the "
        "event loop was saturated (by the system under test, or by other load on the machine) and the "
        "arrivals of that point came in bursts. Served late, own batch slow: the record would have made the "
        "target had its batch run at the model's noise-free speed (the rest started too late); stragglers: "
        f"of those, the ones whose batch ran over {STRAGGLER_SEEN:g}x that speed. Model busy: the share of "
        "the window the model ran batches; idle gap: its mean idle time between two batches."
        + (" Run on the virtual clock: exact timing, no event-loop cost." if settings.clock == "virtual" else "")
    )
    failed = [p for p in points if p.errors or p.accounted != p.arrivals]
    for p in failed:
        out.append(f"- **{labels[p.system]} at {p.load:g}x ({p.model})**: {p.failed} failed; first errors: {p.errors}")
    return "\n".join(out)


def _version_of(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_avg": load,
        "tokenbatcher": tokenbatcher.__version__,
        "tokenbatcher_path": os.path.dirname(tokenbatcher.__file__),
        "flyte": _version_of("flyte"),
        "bentoml": _version_of("bentoml"),
        "ray": _version_of("ray"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def to_json(points: Sequence[Point], systems: Sequence[System], settings: Settings) -> dict[str, Any]:
    return {
        "settings": asdict(settings),
        "models": {
            name: {**asdict(MODELS[name]), "capacity_rps": MODELS[name].capacity(), "capacity_batch": CAPACITY_BATCH}
            for name in settings.models
        },
        "machine": machine_info(),
        "systems": [
            {"key": s.key, "label": s.label, "note": s.note, "available": s.open is not None, "missing": s.missing}
            for s in systems
        ],
        "points": [{**asdict(p), "rejected": p.rejected} for p in points],
    }


def plot(points: Sequence[Point], systems: Sequence[System], settings: Settings, path: str) -> None:
    """Goodput against load, one line per system, one panel per model; dashed line at capacity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in settings.models if any(p.model == m for p in points)]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5.2), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        capacity = MODELS[name].capacity()
        for s in systems:
            mine = sorted((p for p in points if p.model == name and p.system == s.key), key=lambda p: p.load)
            if mine:
                ax.plot([p.load for p in mine], [p.goodput_rps for p in mine], marker="o", label=s.label)
        ax.axhline(capacity, linestyle="--", color="black", linewidth=1, label=f"capacity {capacity:,.0f}/s")
        loads = sorted(settings.loads)
        ax.plot(loads, [x * capacity for x in loads], linestyle=":", color="grey", linewidth=1, label="offered")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(loads)
        ax.set_xticklabels([f"{x:g}x" for x in loads])
        ax.set_ylim(0, capacity * 1.25)
        ax.set_xlabel("offered load (x capacity)")
        ax.set_ylabel(f"goodput (records/s within {settings.target_s * 1e3:g} ms)")
        ax.set_title(f"{name} model\n{MODELS[name].describe()}", fontsize=9)
        ax.grid(True, alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------- command line


def _floats(text: str) -> tuple[float, ...]:
    values = tuple(float(x) for x in text.split(",") if x.strip())
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers separated by commas, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.overload", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 s of arrivals and 1 s of drain per point")
    parser.add_argument("--duration", type=float, help="seconds of arrivals per point (default 4)")
    parser.add_argument(
        "--drain", type=float, help="seconds a point waits for late records after its arrivals (default 2)"
    )
    parser.add_argument(
        "--warmup", type=float, default=0.0, help="seconds of arrivals before each point's window, not measured"
    )
    parser.add_argument("--loads", type=_floats, default=LOADS, help="multiples of capacity, comma-separated")
    parser.add_argument("--models", default="clean,noisy", help="comma-separated: clean, noisy")
    parser.add_argument("--systems", help="comma-separated keys (default: every available one)")
    parser.add_argument("--target-ms", type=float, default=TARGET_S * 1e3, help="latency target (default 60)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--clock",
        choices=("real", "virtual"),
        default="real",
        help="virtual: the test suite's virtual clock, exact timing for iterating on policy (not for the page)",
    )
    parser.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    parser.add_argument("--plot", metavar="FILE", help="write goodput vs load as a PNG (needs matplotlib)")
    args = parser.parse_args(argv)

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    for m in models:
        if m not in MODELS:
            parser.error(f"--models: unknown model {m!r}; choose from {', '.join(MODELS)}")
    duration = args.duration if args.duration is not None else (1.0 if args.quick else 4.0)
    drain = args.drain if args.drain is not None else (1.0 if args.quick else 2.0)
    target_s = args.target_ms / 1e3
    if duration <= 0:
        parser.error(f"--duration must be > 0, got {duration}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if drain <= target_s:
        parser.error(f"--drain must be longer than the target ({target_s:g} s), got {drain}")
    settings = Settings(
        duration=duration,
        drain=drain,
        warmup=args.warmup,
        loads=args.loads,
        models=models,
        target_s=target_s,
        seed=args.seed,
        clock=args.clock,
    )

    wanted = [k.strip() for k in (args.systems or "").split(",") if k.strip()]
    systems = all_systems(peers=not wanted or any(k in PEER_KEYS for k in wanted))
    if wanted:
        known = {s.key: s for s in systems}
        unknown = [k for k in wanted if k not in known]
        if unknown:
            parser.error(f"--systems: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
        systems = [known[k] for k in wanted]
    for s in systems:
        if s.open is None:
            print(f"{s.label}: {s.missing}; skipped", file=sys.stderr)
    if not any(s.open is not None for s in systems):
        parser.error("no system to run")

    points = run(settings, systems)
    print(format_tables(points, systems, settings))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(to_json(points, systems, settings), f, indent=1)
    if args.plot:
        plot(points, systems, settings, args.plot)
    return 1 if any(p.errors or p.accounted != p.arrivals for p in points) else 0


if __name__ == "__main__":
    raise SystemExit(main())
