"""Export tokenbatcher metrics to Prometheus with ``prometheus_client``.

Two sources feed one private ``CollectorRegistry``:

* the ``on_batch`` hook, called once per finished batch with a ``BatchInfo``:
  histograms of batch size, batch cost (tokens), time in the model and the
  oldest record's queue wait, and a counter of batches by dispatch reason;
* ``batcher.stats``, read at scrape time by a custom collector: gauges (queue
  depth, pending records, batches in flight, utilization) and the batcher's
  own cumulative record counters.

Run it (from a clone of the repository, at its root)::

    python -m pip install '.[metrics]'
    python docs/examples/prometheus_exporter.py                           # short load, then the exposition text
    python docs/examples/prometheus_exporter.py --serve 9464 --linger 60  # also http://127.0.0.1:9464/metrics
"""

from __future__ import annotations

import argparse
import asyncio
import random
import typing
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tokenbatcher import BatchInfo, BatchStats, DispatchReason, Prompt, TokenBatcher

NAMESPACE = "tokenbatcher"
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
COST_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class BatcherMetrics:
    """Prometheus metrics of one batcher, registered in ``registry`` under the label ``batcher=name``.

    Pass :meth:`on_batch` as the batcher's ``on_batch`` hook, then call
    :meth:`watch` with the batcher to add the gauges read from its stats::

        metrics = BatcherMetrics(registry, name="llm")
        batcher = TokenBatcher(inference_fn=generate, on_batch=metrics.on_batch)
        metrics.watch(batcher)
    """

    def __init__(self, registry: CollectorRegistry, *, name: str = "default") -> None:
        self.registry = registry
        self.name = name

        def histogram(metric: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            family = Histogram(metric, doc, ["batcher"], namespace=NAMESPACE, registry=registry, buckets=buckets)
            return family.labels(name)

        def counter(metric: str, doc: str) -> Counter:
            return Counter(metric, doc, ["batcher"], namespace=NAMESPACE, registry=registry).labels(name)

        self.batch_size = histogram("batch_size", "Records per batch.", SIZE_BUCKETS)
        self.batch_cost = histogram(
            "batch_cost", "Cost (tokens) per batch, as counted against the budget.", COST_BUCKETS
        )
        self.process_seconds = histogram(
            "batch_process_seconds", "Seconds inside the inference function per batch.", SECONDS_BUCKETS
        )
        self.queue_wait_seconds = histogram(
            "batch_queue_wait_seconds", "Seconds the oldest record of a batch waited before dispatch.", SECONDS_BUCKETS
        )
        self.failed_batches = counter("failed_batches", "Batches whose inference function raised.")
        self.dropped_records = counter("dropped_records", "Records dropped from a batch: their callers had given up.")
        by_reason = Counter(
            "batches",
            "Batches handed to the inference function, by dispatch reason.",
            ["batcher", "reason"],
            namespace=NAMESPACE,
            registry=registry,
        )
        # one child per reason, so that every series exists (at 0) from the start
        self.batches = {reason: by_reason.labels(name, reason) for reason in typing.get_args(DispatchReason)}

    def on_batch(self, info: BatchInfo) -> None:
        """The batcher's ``on_batch`` hook: called on its event loop after each batch."""
        self.batch_size.observe(info.size)
        self.batch_cost.observe(info.cost)
        self.process_seconds.observe(info.process_time_s)
        self.queue_wait_seconds.observe(info.queue_wait_max_s)
        self.batches[info.reason].inc()
        if info.error is not None:
            self.failed_batches.inc()
        if info.dropped:
            self.dropped_records.inc(info.dropped)

    def watch(
        self, batcher: TokenBatcher[typing.Any, typing.Any], *, loop: asyncio.AbstractEventLoop | None = None
    ) -> StatsCollector:
        """Add gauges and counters read from ``batcher.stats`` at each scrape.

        ``loop`` is the event loop that runs the batcher, by default the running
        one: call this from the coroutine that starts the batcher.
        """
        collector = StatsCollector(batcher, self.name, loop)
        self.registry.register(collector)
        return collector


class StatsCollector:
    """A custom collector: one ``batcher.stats`` snapshot per scrape, exported as gauges and counters.

    ``batcher.stats`` reads the batcher's live queues, so it must run on the
    batcher's event loop.  A scrape from another thread (``start_http_server``)
    asks that loop for the snapshot; a scrape on the loop, or after the loop
    has ended, reads it directly.
    """

    def __init__(
        self, batcher: TokenBatcher[typing.Any, typing.Any], name: str, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self.batcher = batcher
        self.name = name
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None  # then scrape only from the batcher's own thread
        self.loop = loop

    def snapshot(self) -> BatchStats:
        loop = self.loop
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if loop is None or current is loop or not loop.is_running():
            return self.batcher.stats

        async def take() -> BatchStats:
            return self.batcher.stats

        return asyncio.run_coroutine_threadsafe(take(), loop).result(timeout=5)

    def collect(self) -> Iterator[Metric]:
        stats = self.snapshot()
        label = [self.name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, labels=["batcher"])
            family.add_metric(label, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(f"{NAMESPACE}_{name}", doc, labels=["batcher"])
            family.add_metric(label, value)
            return family

        yield gauge("queue_depth", "Records waiting in the queue, not yet in a batch.", stats.queue_depth)
        yield gauge("peak_queue_depth", "The largest queue depth seen.", stats.peak_queue_depth)
        yield gauge("pending_records", "Records accepted and not yet resolved.", stats.pending)
        yield gauge("in_flight_batches", "Batches inside the inference function now.", stats.in_flight_batches)
        yield gauge("utilization_ratio", "busy / (busy + idle) of the processing slots.", stats.utilization)
        yield gauge("running", "1 while the batcher accepts records.", 1.0 if self.batcher.is_running else 0.0)
        yield counter("records_submitted", "Records accepted by submit.", stats.total_submitted)
        yield counter("records_completed", "Records whose future got a result.", stats.total_completed)
        yield counter("records_failed", "Records whose future got an exception.", stats.total_failed)
        yield counter("records_cancelled", "Records cancelled by their callers.", stats.total_cancelled)
        yield counter("records_expired", "Records whose timeout_s passed in the queue.", stats.total_expired)
        yield counter("records_rejected", "Records refused by submit_nowait (queue full).", stats.total_rejected)
        yield counter("busy_seconds", "Seconds spent inside the inference function.", stats.busy_time_s)
        yield counter("idle_seconds", "Seconds the processing slots waited for a batch.", stats.idle_time_s)


# --------------------------------------------------------------------- a short simulated load

WORDS = "tokens flow through one shared model call per batch instead of one call each".split()


async def fake_llm(batch: list[Prompt]) -> list[str]:
    """A simulated model: a launch cost plus time proportional to the batch's tokens."""
    tokens = sum(p.estimate_tokens() for p in batch)
    await asyncio.sleep(0.002 + 10e-6 * tokens)
    return [f"{p.estimate_tokens()} tokens" for p in batch]


def build(registry: CollectorRegistry, *, name: str = "demo") -> tuple[TokenBatcher[Prompt, str], BatcherMetrics]:
    """A batcher wired to a fresh :class:`BatcherMetrics` in ``registry``."""
    metrics = BatcherMetrics(registry, name=name)
    batcher: TokenBatcher[Prompt, str] = TokenBatcher(
        inference_fn=fake_llm,
        target_batch_tokens=4_096,
        max_batch_size=64,
        dispatch="eager",
        max_concurrent_batches=2,
        on_batch=metrics.on_batch,
    )
    metrics.watch(batcher)
    return batcher, metrics


async def run_load(
    batcher: TokenBatcher[Prompt, str], *, producers: int = 20, requests: int = 25, seed: int = 7
) -> int:
    """``producers`` concurrent clients each send ``requests`` prompts one after another; return the count."""
    rng = random.Random(seed)

    async def producer() -> None:
        texts = [" ".join(rng.choices(WORDS, k=rng.randint(3, 300))) for _ in range(requests)]
        for text in texts:
            future = await batcher.submit(Prompt(text))
            await future
            await asyncio.sleep(rng.uniform(0, 0.004))  # think time between requests

    await asyncio.gather(*(producer() for _ in range(producers)))
    return producers * requests


async def demo(registry: CollectorRegistry, *, producers: int, requests: int, linger_s: float = 0.0) -> BatchStats:
    """Run the load through a watched batcher; keep it running ``linger_s`` more seconds; stop it."""
    batcher, _ = build(registry)
    async with batcher:
        await run_load(batcher, producers=producers, requests=requests)
        if linger_s:
            print(f"load done; serving live metrics for {linger_s:g} s more", flush=True)
            await asyncio.sleep(linger_s)
    return batcher.stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export tokenbatcher metrics to Prometheus.")
    parser.add_argument("--producers", type=int, default=20, help="concurrent clients (default 20)")
    parser.add_argument("--requests", type=int, default=25, help="requests per client (default 25)")
    parser.add_argument("--serve", type=int, metavar="PORT", help="also serve /metrics on 127.0.0.1:PORT")
    parser.add_argument("--linger", type=float, default=30.0, help="with --serve: seconds to serve after the load")
    args = parser.parse_args(argv)

    registry = CollectorRegistry()
    server = None
    if args.serve is not None:
        server, _ = start_http_server(args.serve, addr="127.0.0.1", registry=registry)
        print(f"serving http://127.0.0.1:{server.server_port}/metrics", flush=True)
    try:
        stats = asyncio.run(
            demo(registry, producers=args.producers, requests=args.requests, linger_s=args.linger if server else 0.0)
        )
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    print(generate_latest(registry).decode(), end="")
    print(f"# {stats!r}")


if __name__ == "__main__":
    main()
