"""Where tokenbatcher's per-record time goes (a diagnostic, not part of the report).

Two views of the no-op overhead benchmark's hot path:

1. ``cProfile`` of the :mod:`tests.bench.overhead` harness (tottime per function,
   divided by the number of records).  The profiler inflates small functions,
   so read it for the ranking, not the absolute numbers.
2. Micro-timings without a profiler, each in a running event loop: the pieces
   of ``submit`` (``loop.create_future``, ``loop.time``, ``Record(...)``,
   ``Pending.push``, ``_cost``...), the whole ``submit_nowait`` / ``await
   submit``, and the consumer side (``Pending.take`` and resolving futures) per
   record, next to the floor's equivalents.

Run: ``python -m tests.bench.profile_overhead [--dispatch window] [--producers 1]``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import pstats
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import tokenbatcher
from tokenbatcher import _pending

from ._impls import factories
from .overhead import _one_run

N = 4_864  # 19 full batches, below max_queue_size: no backpressure, no partial batch


def _per_record(fn: Callable[[], Any], n: int, repeats: int = 15) -> float:
    """Best (lowest) µs per record of ``fn()``, which handles ``n`` records, as timeit does."""
    samples = []
    fn()  # warm-up
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return min(samples)


async def _micro(dispatch: Any) -> list[tuple[str, float]]:
    loop = asyncio.get_running_loop()
    rows: list[tuple[str, float]] = []

    async def noop(batch: list[Any]) -> list[Any]:
        return batch

    # -- asyncio primitives
    def create_futures() -> None:
        for _ in range(N):
            loop.create_future()

    rows.append(("loop.create_future()", _per_record(create_futures, N)))

    def loop_time() -> None:
        for _ in range(N):
            loop.time()

    rows.append(("loop.time()", _per_record(loop_time, N)))

    def get_loop() -> None:
        for _ in range(N):
            asyncio.get_running_loop()

    rows.append(("asyncio.get_running_loop()", _per_record(get_loop, N)))

    def set_results() -> None:
        futs = [loop.create_future() for _ in range(N)]
        for f in futs:
            if not f.done():
                f.set_result(1)

    rows.append(("create_future + done() + set_result", _per_record(set_results, N)))

    # -- floor submit
    items: deque[Any] = deque()

    def floor_submit() -> None:
        items.clear()
        for i in range(N):
            items.append((i, loop.create_future()))

    rows.append(("floor: create_future + deque.append", _per_record(floor_submit, N)))

    # -- our pieces
    rec_cls = _pending.Record
    fut = loop.create_future()

    def make_records() -> None:
        for i in range(N):
            rec_cls(i, fut, 1, 0.0, 0.0, i)

    rows.append(("Record(...) construction", _per_record(make_records, N)))

    b = tokenbatcher.DynamicBatcher(noop, dispatch=dispatch, max_queue_size=N + 1)
    await b.start()

    def cost() -> None:
        for i in range(N):
            b._cost(i, None)

    rows.append(("DynamicBatcher._cost(record, None)", _per_record(cost, N)))

    recs = [rec_cls(i, fut, 1, 0.0, 0.0, i) for i in range(N)]

    def push() -> None:
        p = _pending.Pending(budget=32_000, max_size=256, padded=False, similar=False)
        for r in recs:
            p.push(r)

    rows.append(("Pending.push (fresh queue)", _per_record(push, N)))

    def push_take() -> None:
        p = _pending.Pending(budget=32_000, max_size=256, padded=False, similar=False)
        for r in recs:
            p.push(r)
        while p.size:
            p.take()

    rows.append(("Pending.push + Pending.take (256/batch)", _per_record(push_take, N) - rows[-1][1]))
    rows[-1] = ("Pending.take, per record (256/batch)", rows[-1][1])

    def drain() -> None:
        # keep the loops from taking the records: measure submission alone
        b._pending.clear()

    def nowait() -> None:
        for i in range(N):
            b.submit_nowait(i)
        drain()

    # the aggregation/eager loop is not scheduled while this runs (no await)
    rows.append(("submit_nowait(record), whole", _per_record(nowait, N)))

    async def awaited() -> None:
        for i in range(N):
            await b.submit(i)
        drain()

    rows.append(("await submit(record), whole", await _per_record_async(awaited, N)))
    await b.stop()

    # -- consumer side: N records already queued -> every future resolved
    for name in ("floor", dispatch):
        make = factories(floor=True)[name]
        samples = []
        for _ in range(15):
            c = make(noop)
            if name != "floor":
                c = tokenbatcher.DynamicBatcher(noop, dispatch=dispatch, max_queue_size=N + 1)
            await c.start()
            await asyncio.sleep(0)
            futs = [await c.submit(i) for i in range(N)]  # no await suspends: nothing consumed yet
            gc.collect()
            t0 = time.perf_counter()
            await futs[-1]
            samples.append((time.perf_counter() - t0) / N * 1e6)
            await c.stop()
        rows.append((f"consumer side ({name}): queued -> all resolved", min(samples)))
    return rows


async def _per_record_async(fn: Callable[[], Any], n: int, repeats: int = 15) -> float:
    samples = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return min(samples)


def _profile(dispatch: str, producers: int, n: int) -> str:
    make = factories(floor=False)[dispatch]
    asyncio.run(_one_run(make, n, producers))  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    asyncio.run(_one_run(make, n, producers))
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).sort_stats("tottime")
    out.write(f"cProfile, {n} records, {producers} producer(s), dispatch={dispatch!r}; tottime µs/record:\n")
    for func, (_cc, nc, tt, ct, _callers) in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:18]:  # type: ignore[attr-defined]
        filename, line, name = func
        where = f"{filename.rsplit('/', 1)[-1]}:{line}({name})"
        out.write(f"  {tt / n * 1e6:7.3f} tottime {ct / n * 1e6:7.3f} cumtime {nc:8d} calls  {where}\n")
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dispatch", default="window", choices=("window", "eager"))
    parser.add_argument("--producers", type=int, default=1)
    parser.add_argument("--n", type=int, default=51_200)
    args = parser.parse_args(argv)
    print(_profile(args.dispatch, args.producers, args.n))
    print(f"micro-timings (best of 15, µs per record, {N} records, dispatch={args.dispatch!r}):")
    for label, us in asyncio.run(_micro(args.dispatch)):
        print(f"  {us:7.3f}  {label}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
