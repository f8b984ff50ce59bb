"""Per-record overhead: records/s through a no-op ``process_fn``.

What is measured
----------------
``process_fn`` is ``async def f(batch): return batch``, so everything timed is
the batcher's own work: accepting a record, queueing it, forming batches,
calling ``process_fn``, routing each result to its future, and the producer
getting it back.

The harness (identical for every implementation)
------------------------------------------------
* ``N`` records (default 25,600 = 100 full batches) are split evenly over ``P`` producer
  coroutines (P = 1 and P = 16), started together with ``asyncio.gather``.
* Each producer submits its share one at a time, ``fut = await b.submit(i)``,
  keeping the futures, and then awaits every future in order.  This is the
  open shape: a producer never waits for a result before submitting its next
  record, so no batch waits for a timeout window to fill, and what is left is
  overhead.  (A closed loop -- submit, await the result, submit the next --
  would measure ``batch_timeout_s``, not overhead: with one producer every
  record would wait the full 50 ms window.)
* A second, informative shape, "task per record": ``N`` tasks started at once,
  each ``await (await b.submit(i))`` -- the shape of real use (many concurrent
  callers, each waiting for its own result).  Here every record also pays for
  a task and a suspend/resume, so the floor is higher and the batcher's share
  of the total smaller.  The goals are judged on the producer shape, where the
  batcher's own cost is most exposed.
* The clock (``time.perf_counter``) runs from the first submit until the last
  future has been awaited; ``start()``/``stop()`` and building the batcher are
  outside it.  ``gc.collect()`` runs just before.  Results are checked for
  correctness after the clock stops.
* ``N`` is a multiple of ``max_batch_size`` (256) so that, in the "window"
  modes, the last batch is full and no run ends by waiting out the 50 ms
  ``batch_timeout_s`` for a partial batch.
* Settings: the libraries' defaults on both sides (``max_queue_size=5000``,
  ``max_batch_size=256``, ``batch_timeout_s=0.05``, ``prefetch_batches=2``,
  ``target_batch_cost=32000``, ``default_cost=1``).  The default queue bound
  applies to both, so producers hit backpressure in both; ours differs only
  by ``dispatch``.
* The floor (:class:`tests.bench._impls.FloorBatcher`) runs under the same harness:
  one future per record created in ``submit``, resolved by a consumer that
  awaits ``process_fn`` on up to 256 records at a time, awaited by the
  producer; no bound, no costs, no stats, no error handling.
* Every (implementation, producers) pair runs ``repeats`` times in a fresh
  event loop; the rounds are interleaved (round 1 of every implementation,
  then round 2, ...) with a rotating order, so background load on a shared
  machine hits all of them alike.  The median is reported.  One untimed
  warm-up run per pair comes first.

Reported: µs/record and records/s (medians), ``flyte / ours`` speed-up (how
many times flyte's per-record time ours is), and ``ours / floor`` (how far
from the floor ours is; 1.0 is the floor itself).

Run alone: ``python -m tests.bench.overhead [--n 25600] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

from ._impls import LABELS, factories

PRODUCERS = (1, 16, 0)  # 0: one task per record


def shape_name(producers: int) -> str:
    if producers == 0:
        return "task per record"
    return f"{producers} producer{'s' if producers > 1 else ''}"


async def _one_run(make: Callable[[Any], Any], n: int, producers: int) -> tuple[float, int]:
    """Time one run; return (seconds, number of process_fn calls).

    ``producers == 0`` is the task-per-record shape: ``n`` tasks, each
    submitting one record and awaiting its result.
    """
    calls = 0

    async def noop(batch: list[Any]) -> list[Any]:
        nonlocal calls
        calls += 1
        return batch

    batcher = make(noop)
    await batcher.start()
    share = n // producers if producers else 1

    async def producer(first: int) -> list[Any]:
        submit = batcher.submit
        futures: list[Any] = []
        append = futures.append
        for i in range(first, first + share):
            append(await submit(i))
        for fut in futures:
            await fut
        return futures

    async def caller(i: int) -> Any:
        return await (await batcher.submit(i))

    gc.collect()
    t0 = time.perf_counter()
    done: list[Any]
    if producers:
        done = await asyncio.gather(*(producer(k * share) for k in range(producers)))
    else:
        done = await asyncio.gather(*(caller(i) for i in range(n)))
    elapsed = time.perf_counter() - t0
    await batcher.stop()
    if producers:
        ok = all(
            len(futures) == share and all(f.result() == k * share + j for j, f in enumerate(futures))
            for k, futures in enumerate(done)
        )
    else:
        ok = done == list(range(n))
    if not ok:
        raise AssertionError(f"wrong results from {make!r}")
    return elapsed, calls


def run(
    *, n: int = 25_600, repeats: int = 5, producers: tuple[int, ...] = PRODUCERS, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the overhead benchmark; return a JSON-able dict of results."""
    makers = factories(floor=True)
    names = list(makers)
    for p in producers:
        if p and n % p:
            raise ValueError(f"n={n} must be divisible by producers={p}")
    runs: dict[int, dict[str, list[tuple[float, int]]]] = {p: {name: [] for name in names} for p in producers}
    for p in producers:  # warm-up
        for name in names:
            asyncio.run(_one_run(makers[name], min(n, 256 * 16), p))
    for r in range(repeats):
        for p in producers:
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                runs[p][name].append(asyncio.run(_one_run(makers[name], n, p)))
        log(f"  overhead round {r + 1}/{repeats} done")
    results: dict[str, Any] = {"n": n, "repeats": repeats, "producers": {}}
    for p in producers:
        row: dict[str, Any] = {}
        for name in names:
            secs = [s for s, _ in runs[p][name]]
            med = statistics.median(secs)
            row[name] = {
                "label": LABELS[name],
                "us_per_record": med / n * 1e6,
                "records_per_s": n / med,
                "min_us": min(secs) / n * 1e6,
                "max_us": max(secs) / n * 1e6,
                "avg_batch": n / statistics.median(c for _, c in runs[p][name]),
            }
        for name in ("window", "eager"):
            if "flyte" in row:
                row[name]["speedup_vs_flyte"] = row["flyte"]["us_per_record"] / row[name]["us_per_record"]
            row[name]["vs_floor"] = row[name]["us_per_record"] / row["floor"]["us_per_record"]
        if "flyte" in row:
            row["flyte"]["vs_floor"] = row["flyte"]["us_per_record"] / row["floor"]["us_per_record"]
        results["producers"][shape_name(p)] = row
    return results


def batch_sentence(results: dict[str, Any]) -> str:
    """One sentence on the batch sizes when every run formed the same ones (then the table leaves them out)."""
    sizes = {round(r["avg_batch"]) for row in results["producers"].values() for r in row.values()}
    return f"Every implementation formed batches of {sizes.pop()} records. " if len(sizes) == 1 else ""


def format_table(results: dict[str, Any]) -> str:
    """The results as a markdown table, narrow enough for a docs page."""
    with_batch = not batch_sentence(results)
    head = "| harness | implementation | µs/record median (min-max) |"  # records/s is 10⁶ / µs/record
    rule = "|---|---|---:|"
    if with_batch:
        head, rule = head + " avg batch |", rule + "---:|"
    lines = [head + " speed-up vs flyte | x floor |", rule + "---:|---:|"]
    for p, row in results["producers"].items():
        for name, r in row.items():
            speed = f"{r['speedup_vs_flyte']:.1f}x" if "speedup_vs_flyte" in r else ("1.0x" if name == "flyte" else "")
            floor = f"{r['vs_floor']:.2f}" if "vs_floor" in r else ("1.00" if name == "floor" else "")
            batch = f" {r['avg_batch']:.0f} |" if with_batch else ""
            lines.append(
                f"| {p} | {r['label']} | {r['us_per_record']:.2f} ({r['min_us']:.2f}-{r['max_us']:.2f}) "
                f"|{batch} {speed} | {floor} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=25_600, help="records per run (a multiple of 256 and of 16)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(format_table(run(n=args.n, repeats=args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
