"""``tune="throughput"`` on simulated models: tuned vs the best fixed budget vs the default.

The models
----------
``process_fn`` sleeps a known time for a batch of ``n`` records (every record
costs 1, so ``max_batch_size`` is the limit that binds):

* **U-shaped**: ``0.02 + 0.0001 * n**2`` seconds: a call costs 20 ms and a
  record more the larger its batch (a CPU whose caches overflow); the best
  batch is 14 records;
* **flat**: ``0.0001 * n``: the same per record at every size (batching
  neither helps nor hurts: the tuner must keep the ceiling);
* **drift**: U-shaped, and after half the records the quadratic term is four
  times larger (the GPU is now shared): the best batch falls to 7.

The harness
-----------
A saturated producer: every record is queued up front (``max_queue_size``
holds them all), and the batcher runs until the last result.  Records/s is
records over the run's loop time.  Each arm runs through the real batcher,
with default settings except the one named: ``default`` is
``max_batch_size=256`` (the library's default), ``fixed n`` is
``max_batch_size=n`` for ``n`` in a sweep (the best is shown), ``tuned`` is
``tune="throughput"`` under the default ceilings, with ``dispatch="window"``
(the default) and ``"eager"``.  "After 50" is records/s over the batches
from the 50th on (for drift: from the 50th after the change), against the best
fixed size's over the same span.

``--clock virtual`` (the default) runs on the test suite's virtual clock:
``asyncio.sleep`` costs no wall time, so the figures are exact and the same on
every machine.  ``--clock real`` runs on the real clock (timer slack and a
loaded machine then show).

Padded texts
------------
Then the case the tuner was built for: a ``TokenBatcher`` with
``batch_cost="padded"``, ``grouping="similar_cost"`` and ``dispatch="eager"``
embedding ``--texts`` texts of log-uniform lengths (3 to 256 tokens: most
short, a few long) on a simulated CPU encoder: 5 ms a call plus a padded
token at 7,000 tokens/s, each token dearer once a batch passes 4,096 padded
tokens (what ``tests/bench/model.py`` measures of all-MiniLM-L6-v2 here).
Fed two ways: ``service``, 32 clients each awaiting its text's result before
sending the next (at most 32 texts wait), and ``job``, every text queued at
once.  Against: the default budget (32,000), the best fixed budget of a sweep,
and the offline best (every length known in advance, sorted, cut into the
largest padded batches within a budget: the best budget of the sweep).

Run alone: ``python -m tests.bench.tuning [--records 6000] [--texts 2000] [--clock virtual]``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from tokenbatcher import DynamicBatcher

T = TypeVar("T")
SWEEP = (1, 2, 4, 7, 8, 11, 14, 16, 23, 32, 64, 128, 256)


class Shape:
    """A simulated ``process_fn``: seconds per batch of ``n``; ``drift`` from half the records on."""

    def __init__(
        self, name: str, base: float, quadratic: float, linear: float, drift: float = 1.0, scale: int = 1
    ) -> None:
        self.name, self.base, self.quadratic, self.linear, self.drift = name, base, quadratic, linear, drift
        self.scale = scale
        """Records per run, times ``--records`` (so that even full batches number more than 50)."""

    def seconds(self, n: int, drifted: bool) -> float:
        q = self.quadratic * (self.drift if drifted else 1.0)
        return self.base + self.linear * n + q * n * n


SHAPES = (
    Shape("U-shaped", 0.02, 0.0001, 0.0),
    Shape("flat", 0.0, 0.0, 0.0001, scale=5),
    Shape("drift", 0.02, 0.0001, 0.0, drift=4.0),
)


async def _run(shape: Shape, records: int, **settings: Any) -> tuple[float, float]:
    """(records/s over the run, records/s from the 50th batch on, after the drift if any)."""
    loop = asyncio.get_running_loop()
    done = [0]
    batches: list[tuple[float, int]] = []
    drift_at: list[int] = []

    async def process(batch: list[int]) -> list[int]:
        drifted = done[0] >= records // 2 and shape.drift != 1.0
        if drifted and not drift_at:
            drift_at.append(len(batches))
        batches.append((loop.time(), len(batch)))
        await asyncio.sleep(shape.seconds(len(batch), drifted))
        done[0] += len(batch)
        return batch

    async with DynamicBatcher(process, max_queue_size=records, **settings) as batcher:
        start = loop.time()
        futures = [await batcher.submit(i) for i in range(records)]
        await asyncio.gather(*futures)
        end = loop.time()
    first = (drift_at[0] if drift_at else 0) + 50
    tail = batches[first:]
    after = sum(n for _, n in tail) / (end - tail[0][0]) if tail else float("nan")
    return records / (end - start), after


TEXT_SWEEP = (128, 256, 512, 1024, 2048, 4096)


def text_lengths(count: int, seed: int = 0) -> list[int]:
    """``count`` log-uniform token counts between 3 and 256."""
    rng = random.Random(seed)
    return [min(256, max(3, round(math.exp(rng.uniform(math.log(3), math.log(256)))))) for _ in range(count)]


def encoder_seconds(batch: list[int]) -> float:
    """The simulated CPU encoder: a batch of these token counts, padded to the longest."""
    padded = len(batch) * max(batch)
    return 0.005 + padded / 7000 * (1 + max(0, padded - 4096) / 16384)


def offline(lengths: list[int], budget: int) -> float:
    """Texts/s of sorted padded batches within ``budget``, one after another."""
    seconds, batch = 0.0, list[int]()
    for n in sorted(lengths):
        if batch and (len(batch) + 1) * n > budget:
            seconds, batch = seconds + encoder_seconds(batch), []
        batch.append(n)
    return len(lengths) / (seconds + encoder_seconds(batch))


async def embed_texts(lengths: list[int], clients: int | None, **settings: Any) -> tuple[float, Any]:
    """Texts/s (and the final stats) through our TokenBatcher: ``clients`` awaiting, or every text at once.

    Padded, similar_cost, eager batches of ``encoder_seconds``; every result is checked.
    """
    from tokenbatcher import TokenBatcher

    async def encode(batch: list[int]) -> list[int]:
        await asyncio.sleep(encoder_seconds(batch))
        return batch

    loop = asyncio.get_running_loop()
    batcher = TokenBatcher(
        inference_fn=encode,
        token_estimator=int,
        batch_cost="padded",
        grouping="similar_cost",
        dispatch="eager",
        max_queue_size=len(lengths),
        **settings,
    )
    async with batcher:
        start = loop.time()
        if clients is None:
            if await asyncio.gather(*[await batcher.submit(n) for n in lengths]) != lengths:
                raise AssertionError("a text got another's result")
        else:
            texts = iter(lengths)

            async def client() -> None:
                for n in texts:  # shared: each text goes to one client
                    if await (await batcher.submit(n)) != n:
                        raise AssertionError("a text got another's result")

            await asyncio.gather(*(client() for _ in range(clients)))
        return len(lengths) / (loop.time() - start), batcher.stats


async def _texts(lengths: list[int], feed: str, **settings: Any) -> float:
    """Texts/s fed as ``feed`` says (see the module docstring)."""
    return (await embed_texts(lengths, 32 if feed == "service" else None, **settings))[0]


def texts_table(clock: str, count: int) -> list[str]:
    """The padded-texts table's rows."""
    lengths = text_lengths(count)
    best_offline = max(offline(lengths, b) for b in TEXT_SWEEP)
    rows = []
    for feed in ("service", "job"):
        default = _measure(clock, _texts(lengths, feed, target_batch_tokens=32_000))
        fixed = {b: _measure(clock, _texts(lengths, feed, target_batch_tokens=b)) for b in TEXT_SWEEP}
        best = max(fixed, key=fixed.__getitem__)
        tuned = _measure(clock, _texts(lengths, feed, target_batch_tokens=32_000, tune="throughput"))
        rows.append(
            f"| {feed} | {default:,.1f} | {fixed[best]:,.1f} ({best:,}) | {best_offline:,.1f} | "
            f"{tuned:,.1f} ({tuned / fixed[best]:.0%}, {tuned / best_offline:.0%}) | {tuned / default:.1f}x |"
        )
    return rows


def _loop(clock: str) -> asyncio.AbstractEventLoop:
    if clock == "virtual":
        from tests.conftest import VirtualClockLoop

        return VirtualClockLoop()
    return asyncio.new_event_loop()


def _measure(clock: str, coro: Coroutine[Any, Any, T]) -> T:
    loop = _loop(clock)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> None:
    """Print the markdown table (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=6000, help="records per run (default 6000)")
    parser.add_argument("--texts", type=int, default=2000, help="texts per padded run (default 2000; 0 skips)")
    parser.add_argument("--clock", choices=("virtual", "real"), default="virtual")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    print(f"records/s, {args.records} records per run (flat: 5x), saturated producer, {args.clock} clock\n")
    print("| model | default (256) | best fixed | tuned (window) | after 50 | tuned (eager) | after 50 |")
    print("|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        run: Callable[..., Coroutine[Any, Any, tuple[float, float]]] = _run
        records = args.records * shape.scale
        default = _measure(args.clock, run(shape, records))[0]
        fixed = {n: _measure(args.clock, run(shape, records, max_batch_size=n)) for n in SWEEP}
        best = max(fixed, key=lambda n: (round(fixed[n][0], 1), n))  # ties: the largest
        top, top_after = fixed[best][0], max(rates[1] for rates in fixed.values())
        window = _measure(args.clock, run(shape, records, tune="throughput"))
        eager = _measure(args.clock, run(shape, records, tune="throughput", dispatch="eager"))
        print(
            f"| {shape.name} | {default:,.0f} | {top:,.0f} (n={best}) | {window[0]:,.0f} ({window[0] / top:.0%}) | "
            f"{window[1]:,.0f} ({window[1] / top_after:.0%}) | {eager[0]:,.0f} ({eager[0] / top:.0%}) | "
            f"{eager[1]:,.0f} ({eager[1] / top_after:.0%}) |"
        )
    print(
        "\n(percentages: of the best fixed size's records/s over the same span of the run"
        " (whole run, or from the 50th batch on))"
    )
    if args.texts:
        print(f"\npadded texts/s, {args.texts} log-uniform texts, simulated CPU encoder, {args.clock} clock\n")
        print("| feed | default (32,000) | best fixed | offline best | tuned (of best fixed, offline) | vs default |")
        print("|---|---|---|---|---|---|")
        print("\n".join(texts_table(args.clock, args.texts)))
    print(f"\n(took {time.perf_counter() - began:.1f} s of wall time)")


if __name__ == "__main__":
    main()
