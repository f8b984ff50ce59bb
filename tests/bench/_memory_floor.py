"""The memory floor of the scaling benchmark: what visiting queued records costs in each mode's order.

A mode that dispatches records out of submission order (priorities, cost
buckets) reads them in an order that has nothing to do with where they sit in
memory.  At 10k records they fit in the CPU's caches; at 1M (a few hundred MB)
most reads miss, and the prefetcher, which serves a FIFO drain, cannot help.
That cost is not the batcher's algorithm: any code that touches the same
records in the same order pays it.

This pass measures it without a batcher.  It makes ``n`` futures of the
batcher's own record type with the workload's costs and priorities, in
submission order (so they lie in memory as a real fill leaves them), lists them
in a mode's order, and then does the least a drain must do per record: read its
``queued``, ``cost`` and ``key``, put it in a batch of 256, and per batch build
the list of items and set each future's result.  The figure is µs of CPU time
per record, on the same clock as the drains.

The orders:

* ``submission``: fifo, eager, padded, deadlines;
* ``priorities``: by ``(key, seq)``, ``key`` = submit time + priority x 1 s,
  the submit times spaced as a fill spaces them (``SUBMIT_GAP_S``);
* ``buckets``: similar_cost: bucket by bucket (the batcher's log-cost buckets),
  each in submission order;
* ``buckets+priorities``: all: bucket by bucket, each by ``(key, seq)``.
"""

from __future__ import annotations

import asyncio
import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from tokenbatcher._buckets import bucket_of
from tokenbatcher._record import Record

SUBMIT_GAP_S = 1.5e-6
"""Seconds between two submits in the scaling bench's fill (about its submit cost per record)."""
BATCH = 256

ORDER_OF_MODE = {
    "fifo": "submission",
    "eager": "submission",
    "padded": "submission",
    "deadlines": "submission",
    "priorities": "priorities",
    "similar_cost": "buckets",
    "all": "buckets+priorities",
}

_SORT_KEYS: dict[str, Callable[[Record[Any]], Any] | None] = {
    "submission": None,
    "priorities": lambda rec: (rec.key, rec.seq),
    "buckets": lambda rec: (rec.bucket, rec.seq),
    "buckets+priorities": lambda rec: (rec.bucket, rec.key, rec.seq),
}


def visit_us(order: str, costs: Sequence[int], priorities: Sequence[int], clock: Callable[[], float]) -> float:
    """µs per record to visit ``len(costs)`` fresh records in ``order``, as a drain must."""
    loop = asyncio.new_event_loop()
    try:
        gc.collect()
        gc.disable()
        records: list[Record[Any]] = []
        for i, (cost, priority) in enumerate(zip(costs, priorities, strict=True)):
            rec: Record[Any] = Record(loop=loop)
            rec.item = i
            rec.cost = cost
            rec.t = t = i * SUBMIT_GAP_S
            rec.key = t + priority if priority else t
            rec.seq = i
            rec.bucket = bucket_of(cost)
            rec.queued = True
            records.append(rec)
        sort_key = _SORT_KEYS[order]
        ordered = records if sort_key is None else sorted(records, key=sort_key)
        start = clock()
        for at in range(0, len(ordered), BATCH):
            batch = []
            for rec in ordered[at : at + BATCH]:
                if rec.queued and rec.cost >= 0 and rec.key >= 0:
                    rec.queued = False
                    batch.append(rec)
            items = [rec.item for rec in batch]
            for rec, item in zip(batch, items, strict=True):
                rec.set_result(item)
        return (clock() - start) / len(ordered) * 1e6
    finally:
        gc.enable()
        loop.close()


def measure(
    modes: Sequence[str],
    depths: Sequence[int],
    costs: Sequence[int],
    priorities: Sequence[int],
    clock: Callable[[], float],
    *,
    repeats: int = 3,
    point_s: float = 0.0,
    max_runs: int = 51,
) -> dict[str, dict[str, float]]:
    """``{order: {depth: µs per record}}`` for the orders ``modes`` use: the median of the runs.

    As the drains are run: at least ``repeats`` runs of each point, short ones
    again until their runs (making the records included) took ``point_s``
    seconds (at most ``max_runs``), in rounds across the orders of a depth.
    """
    orders = sorted({ORDER_OF_MODE[mode] for mode in modes})
    floors: dict[str, dict[str, float]] = {order: {} for order in orders}
    for n in depths:

        def once(order: str, n: int = n) -> float:
            prios = priorities[:n] if "priorities" in order else [0] * n
            return visit_us(order, costs[:n], prios, clock)

        runs: dict[str, list[float]] = {}
        wanted: dict[str, int] = {}
        for order in orders:
            started = time.perf_counter()
            runs[order] = [once(order)]
            took = time.perf_counter() - started  # making the records too
            wanted[order] = max(repeats, min(max_runs, math.ceil(point_s / max(took, 1e-6))))
        for _ in range(max(wanted.values(), default=0) - 1):
            for order in orders:
                if len(runs[order]) < wanted[order]:
                    runs[order].append(once(order))
        for order, got in runs.items():
            floors[order][str(n)] = statistics.median(got)
    return floors
