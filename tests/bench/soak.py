"""Soak test: push many records through a faulty process_fn; count lost futures.

    python -m tests.bench.soak                    # 1,000,000 records (about a minute)
    python -m tests.bench.soak --records 50000    # a quick look

Producers submit with random costs, priorities and deadlines, cancel some of
their futures, and use ``submit_nowait`` now and then.  ``process_fn`` fails in
every way it can: it raises, raises ``CancelledError``, returns the wrong
number of results or a non-list, sleeps.  Halfway through, the batcher is
stopped (with a timeout) and started again while producers keep going.

At the end every future must be done: a future that is not is *lost*, and the
script exits 1.  It also checks that each result is its own record's and that
the stats add up.  It prints throughput and peak memory (max RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import resource
import sys
import time
from typing import Any

from tokenbatcher import DynamicBatcher, QueueFullError


def make_process_fn(rng: random.Random) -> Any:
    async def process(batch: list[int]) -> Any:
        roll = rng.random()
        if roll < 0.01:
            raise ValueError("injected failure")
        if roll < 0.015:
            raise asyncio.CancelledError
        if roll < 0.02:
            return [x * 2 for x in batch[:-1]]  # wrong length
        if roll < 0.025:
            return None  # not a list
        if roll < 0.05:
            await asyncio.sleep(rng.random() * 0.002)
        elif roll < 0.2:
            await asyncio.sleep(0)
        return [x * 2 for x in batch]

    return process


async def soak(records: int, producers: int, seed: int) -> int:
    rng = random.Random(seed)
    batcher = DynamicBatcher(
        make_process_fn(rng),
        target_batch_cost=2_000,
        max_batch_size=128,
        batch_timeout_s=0.001,
        max_queue_size=2_000,
        dispatch="eager",
        max_concurrent_batches=2,
    )
    futures: dict[int, asyncio.Future[int]] = {}
    cancelled_by_us = refused = 0
    per_producer = records // producers
    await batcher.start()

    async def produce(base: int) -> None:
        nonlocal cancelled_by_us, refused
        for i in range(per_producer):
            record = base + i
            kwargs: dict[str, Any] = {"estimated_cost": rng.randint(0, 60)}
            if rng.random() < 0.05:
                kwargs["priority"] = rng.randint(-2, 2)
            if rng.random() < 0.05:
                kwargs["timeout_s"] = rng.random() * 0.01
            try:
                if rng.random() < 0.05:
                    future = batcher.submit_nowait(record, **kwargs)
                else:
                    future = await batcher.submit(record, **kwargs)
            except (QueueFullError, RuntimeError):
                refused += 1  # queue full, or the batcher was stopping: not accepted
                await asyncio.sleep(0)
                continue
            futures[record] = future
            if len(futures) >= records // 2:
                halfway.set()
            if rng.random() < 0.02:
                future.cancel()
                cancelled_by_us += 1

    halfway = asyncio.Event()

    async def restart_halfway() -> None:
        await halfway.wait()
        await batcher.stop(timeout=0.5)
        await batcher.start()

    started = time.perf_counter()
    await asyncio.gather(*(produce(p * 10_000_000) for p in range(producers)), restart_halfway())
    await batcher.stop(timeout=5.0)
    elapsed = time.perf_counter() - started

    lost = [r for r, f in futures.items() if not f.done()]
    resolved = [(r, f) for r, f in futures.items() if f.done() and not f.cancelled() and not f.exception()]
    wrong = [r for r, f in resolved if f.result() != 2 * r]
    stats = batcher.stats
    outcomes = stats.total_completed + stats.total_failed + stats.total_cancelled + stats.total_expired
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"records offered      {per_producer * producers:,} ({refused:,} refused: queue full or stopping)")
    print(f"accepted             {stats.total_submitted:,}")
    print(f"  completed          {stats.total_completed:,}")
    print(f"  failed             {stats.total_failed:,}  (injected faults, restart)")
    print(f"  cancelled          {stats.total_cancelled:,}  (we cancelled {cancelled_by_us:,})")
    print(f"  expired            {stats.total_expired:,}")
    print(f"batches              {stats.total_batches:,}")
    print(f"throughput           {stats.total_submitted / elapsed:,.0f} records/s ({elapsed:.1f} s)")
    print(f"peak memory (RSS)    {peak_mb:,.0f} MiB")
    print(f"lost futures         {len(lost)}")
    print(f"wrong results        {len(wrong)}")
    ok = not lost and not wrong and outcomes == stats.total_submitted == len(futures) and stats.pending == 0
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--producers", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.getLogger("tokenbatcher").setLevel(logging.CRITICAL)  # injected failures would log each batch
    return asyncio.run(soak(args.records, args.producers, args.seed))


if __name__ == "__main__":
    sys.exit(main())
