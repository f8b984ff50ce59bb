"""Latency and batch fill against offered load (open loop, Poisson arrivals).

The model
---------
``process_fn`` simulates a GPU: ``await asyncio.sleep(base + per_record *
len(batch))`` (default 20 ms + 0.1 ms per record), so a big batch costs little
more than a small one and batching pays.  The light-load case uses a flat 2 ms.

The harness (identical for every implementation)
------------------------------------------------
* Arrivals are a Poisson process at the offered rate (records/s): exponential
  gaps drawn from ``random.Random(seed)`` with a seed fixed per rate, so every
  implementation sees exactly the same arrival schedule.
* A driver coroutine sleeps until each arrival time and starts one client task
  per record.  The client does ``t0 = loop.time(); fut = await b.submit(x);
  await fut`` and records ``loop.time() - t0``: submit -> result latency.
  The load is open: arrivals do not wait for earlier results.
* Each point offers ``duration`` seconds of arrivals (at least ``min_records``
  records), then waits for every client to finish.  Records that arrive in the
  first ``warmup`` seconds are left out of the percentiles.
* Batch fill: ``process_fn`` logs ``len(batch)`` on every call; the average
  batch is records / calls over the whole point.  CPU seconds of the process
  (``time.process_time``) per record are reported too.
* Settings: defaults for both libraries (``batch_timeout_s=0.05``,
  ``max_batch_size=256``, ...); ours "window" vs "eager" differ only by
  ``dispatch``.  A fresh batcher and a fresh event loop for every point.

asyncio's timers are served by the selector with ~1 ms granularity, so every
figure, the floor of ``asyncio.sleep`` included, carries up to ~1 ms of timer
slack; it is the same for all implementations.

Run alone: ``python -m tests.bench.latency [--duration 3] [--rates 10,100,1000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from ._impls import LABELS, factories

RATES = (10, 100, 300, 1000, 2000, 4000)
LIGHT_RATE = 20


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, int(q * len(ordered) + 0.999999) - 1))
    return ordered[k]


async def _one_point(
    make: Callable[[Any], Any],
    *,
    rate: float,
    duration: float,
    base_s: float,
    per_record_s: float,
    seed: int,
    warmup: float,
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    sizes: list[int] = []

    async def gpu(batch: list[Any]) -> list[Any]:
        sizes.append(len(batch))
        await asyncio.sleep(base_s + per_record_s * len(batch))
        return batch

    rng = random.Random(seed)
    offsets: list[float] = []
    t = rng.expovariate(rate)
    while t < duration:
        offsets.append(t)
        t += rng.expovariate(rate)

    batcher = make(gpu)
    await batcher.start()
    latencies: list[float | None] = [None] * len(offsets)
    errors: list[BaseException] = []

    async def client(i: int) -> None:
        t0 = loop.time()
        try:
            fut = await batcher.submit(i)
            result = await fut
        except Exception as exc:  # a broken batcher must show, not hang the suite
            errors.append(exc)
            return
        if result != i:
            errors.append(AssertionError(f"record {i} got {result!r}"))
        latencies[i] = loop.time() - t0

    tasks: list[asyncio.Task[None]] = []
    cpu0 = time.process_time()
    start = loop.time() + 0.005
    for i, offset in enumerate(offsets):
        delay = start + offset - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(client(i)))
    await asyncio.gather(*tasks)
    cpu = time.process_time() - cpu0
    await batcher.stop()
    if errors:
        raise RuntimeError(f"{len(errors)} records failed, first: {errors[0]!r}")
    kept = sorted(lat for lat, off in zip(latencies, offsets, strict=True) if off >= warmup and lat is not None)
    return {
        "rate": rate,
        "records": len(offsets),
        "measured": len(kept),
        "p50_ms": _percentile(kept, 0.50) * 1e3,
        "p90_ms": _percentile(kept, 0.90) * 1e3,
        "p99_ms": _percentile(kept, 0.99) * 1e3,
        "mean_ms": statistics.fmean(kept) * 1e3 if kept else float("nan"),
        "avg_batch": len(offsets) / len(sizes) if sizes else 0.0,
        "batches": len(sizes),
        "cpu_us_per_record": cpu / max(1, len(offsets)) * 1e6,
    }


def run(
    *,
    rates: tuple[float, ...] = RATES,
    duration: float = 3.0,
    min_records: int = 50,
    light_rate: float = LIGHT_RATE,
    light_duration: float = 5.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the load sweep and the light-load case; return a JSON-able dict."""
    makers = factories(floor=False)
    names = list(makers)
    sweep: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for k, rate in enumerate(rates):
        dur = max(duration, min_records / rate)
        order = names[k % len(names) :] + names[: k % len(names)]
        for name in order:
            point = asyncio.run(
                _one_point(
                    makers[name],
                    rate=rate,
                    duration=dur,
                    base_s=0.020,
                    per_record_s=0.0001,
                    seed=1000 + int(rate),
                    warmup=min(0.25, dur / 10),
                )
            )
            sweep[name].append(point)
            log(
                f"  {rate:>6g} rec/s {LABELS[name]:<14} p50 {point['p50_ms']:7.1f} ms  "
                f"p99 {point['p99_ms']:7.1f} ms  batch {point['avg_batch']:6.1f}"
            )
    light: dict[str, dict[str, float]] = {}
    for name in names:
        light[name] = asyncio.run(
            _one_point(
                makers[name],
                rate=light_rate,
                duration=light_duration,
                base_s=0.002,
                per_record_s=0.0,
                seed=7,
                warmup=0.0,
            )
        )
        log(f"  light load {LABELS[name]:<14} p50 {light[name]['p50_ms']:6.2f} ms")
    return {
        "model": {"base_ms": 20.0, "per_record_ms": 0.1},
        "duration_s": duration,
        "min_records": min_records,
        "rates": list(rates),
        "sweep": sweep,
        "light": {"rate": light_rate, "duration_s": light_duration, "work_ms": 2.0, "points": light},
        "labels": {name: LABELS[name] for name in names},
    }


def format_sweep(results: dict[str, Any]) -> str:
    names = list(results["sweep"])
    head = "| offered rec/s | " + " | ".join(
        f"{results['labels'][n]} p50 / p99 ms | {results['labels'][n]} avg batch" for n in names
    )
    lines = [head + " |", "|---:|" + "---:|---:|" * len(names)]
    for k, rate in enumerate(results["rates"]):
        cells = []
        for n in names:
            p = results["sweep"][n][k]
            cells.append(f"{p['p50_ms']:.1f} / {p['p99_ms']:.1f} | {p['avg_batch']:.1f}")
        lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_light(results: dict[str, Any]) -> str:
    lines = ["| implementation | p50 ms | p90 ms | p99 ms | avg batch | records |", "|---|---:|---:|---:|---:|---:|"]
    for n, p in results["light"]["points"].items():
        lines.append(
            f"| {results['labels'][n]} | {p['p50_ms']:.2f} | {p['p90_ms']:.2f} | {p['p99_ms']:.2f} "
            f"| {p['avg_batch']:.2f} | {p['measured']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of arrivals per point")
    parser.add_argument("--rates", default=",".join(map(str, RATES)), help="comma-separated records/s")
    args = parser.parse_args(argv)
    rates = tuple(float(r) for r in args.rates.split(","))
    results = run(rates=rates, duration=args.duration)
    print(format_sweep(results))
    print()
    print(format_light(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
