"""docs/examples/prometheus_exporter.py: the exported numbers are batcher.stats' numbers.

Skipped when the ``metrics`` extra (prometheus-client) is not installed.  The
load runs on the virtual clock; scrapes from other threads use the real one.
"""

from __future__ import annotations

import asyncio
import typing
import urllib.request
from typing import Any

import pytest

from conftest import load_example

prometheus_client = pytest.importorskip("prometheus_client")

from tokenbatcher import BatchStats, DispatchReason, Prompt, TokenBatcher  # noqa: E402

pytestmark = pytest.mark.timeout(60)


ex = load_example("prometheus_exporter.py")


def sample(registry: Any, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, {"batcher": "demo", **labels})
    assert value is not None, f"{name} {labels} is not exported"
    return float(value)


def assert_matches(registry: Any, stats: BatchStats, running: bool) -> None:
    """Every exported number equals its counterpart in ``stats``.

    ``stats`` counts a batch when it enters ``process_fn``, the ``on_batch``
    hook when it leaves: compare the hook's numbers when no batch is in flight.
    """
    assert stats.in_flight_batches == 0
    # from the on_batch hook
    assert sample(registry, "tokenbatcher_batch_size_count") == stats.total_batches
    assert sample(registry, "tokenbatcher_batch_size_sum") == stats.total_completed + stats.total_failed
    assert sample(registry, "tokenbatcher_batch_cost_count") == stats.total_batches
    assert sample(registry, "tokenbatcher_batch_cost_sum") == stats.total_batch_cost  # batch_cost="sum"
    assert sample(registry, "tokenbatcher_batch_process_seconds_count") == stats.total_batches
    assert sample(registry, "tokenbatcher_batch_process_seconds_sum") == pytest.approx(stats.busy_time_s)
    for reason in typing.get_args(DispatchReason):
        assert sample(registry, "tokenbatcher_batches_total", reason=reason) == stats.dispatch_reasons.get(reason, 0)
    assert_collected(registry, stats, running)


def assert_collected(registry: Any, stats: BatchStats, running: bool) -> None:
    """The numbers of the stats collector equal those of ``stats``."""
    assert sample(registry, "tokenbatcher_queue_depth") == stats.queue_depth
    assert sample(registry, "tokenbatcher_peak_queue_depth") == stats.peak_queue_depth
    assert sample(registry, "tokenbatcher_pending_records") == stats.pending
    assert sample(registry, "tokenbatcher_in_flight_batches") == stats.in_flight_batches
    assert sample(registry, "tokenbatcher_utilization_ratio") == pytest.approx(stats.utilization)
    assert sample(registry, "tokenbatcher_running") == (1.0 if running else 0.0)
    assert sample(registry, "tokenbatcher_records_submitted_total") == stats.total_submitted
    assert sample(registry, "tokenbatcher_records_completed_total") == stats.total_completed
    assert sample(registry, "tokenbatcher_records_failed_total") == stats.total_failed
    assert sample(registry, "tokenbatcher_records_cancelled_total") == stats.total_cancelled
    assert sample(registry, "tokenbatcher_busy_seconds_total") == pytest.approx(stats.busy_time_s)
    assert sample(registry, "tokenbatcher_idle_seconds_total") == pytest.approx(stats.idle_time_s)


@pytest.mark.asyncio
async def test_exported_numbers_match_stats_after_the_load() -> None:
    registry = prometheus_client.CollectorRegistry()
    batcher, _ = ex.build(registry)
    async with batcher:
        sent = await ex.run_load(batcher, producers=12, requests=10)
    stats = batcher.stats
    assert stats.total_completed == sent == 120
    assert stats.total_batches < sent  # the load did batch
    assert_matches(registry, stats, running=False)
    text = prometheus_client.generate_latest(registry).decode()
    assert 'tokenbatcher_records_completed_total{batcher="demo"} 120.0' in text


@pytest.mark.asyncio
async def test_gauges_follow_the_live_queue() -> None:
    gate = asyncio.Event()

    async def gated(batch: list[Prompt]) -> list[int]:
        await gate.wait()
        return [p.estimate_tokens() for p in batch]

    registry = prometheus_client.CollectorRegistry()
    metrics = ex.BatcherMetrics(registry, name="demo")
    batcher: TokenBatcher[Prompt, int] = TokenBatcher(
        inference_fn=gated, max_batch_size=8, dispatch="eager", max_concurrent_batches=2, on_batch=metrics.on_batch
    )
    metrics.watch(batcher)
    async with batcher:
        futures = [await batcher.submit(Prompt("x" * 40)) for _ in range(30)]
        try:
            await asyncio.sleep(0.01)  # let both slots take a batch
            stats = batcher.stats
            assert (stats.queue_depth, stats.pending, stats.in_flight_batches) == (14, 30, 2)
            assert_collected(registry, stats, running=True)
            assert sample(registry, "tokenbatcher_batch_size_count") == 0  # none has finished yet
        finally:
            gate.set()  # else stop() would wait for the gated batches forever
        assert await asyncio.gather(*futures) == [11] * 30
    assert_matches(registry, batcher.stats, running=False)


@pytest.mark.asyncio
async def test_failed_batches_and_dropped_records_are_counted() -> None:
    async def picky(batch: list[Prompt]) -> list[str]:
        await asyncio.sleep(0.01)
        if any(p.text == "bad" for p in batch):
            raise ValueError("bad prompt")
        return [p.text for p in batch]

    registry = prometheus_client.CollectorRegistry()
    metrics = ex.BatcherMetrics(registry, name="demo")
    batcher: TokenBatcher[Prompt, str] = TokenBatcher(
        inference_fn=picky, max_batch_size=2, batch_timeout_s=0.001, on_batch=metrics.on_batch
    )
    metrics.watch(batcher)
    async with batcher:
        first = await batcher.submit(Prompt("ok"))
        await asyncio.sleep(0.002)  # ["ok"] is in process_fn
        bad = await batcher.submit(Prompt("bad"))
        gone = await batcher.submit(Prompt("cancelled by its caller"))
        await asyncio.sleep(0.002)  # ["bad", "cancelled ..."] is sealed, waiting in the prefetch queue
        gone.cancel()  # so it is dropped from that batch before process_fn sees it
        last = await batcher.submit(Prompt("fine"))
        assert await first == "ok"
        with pytest.raises(ValueError, match="bad prompt"):
            await bad
        assert await last == "fine"
    stats = batcher.stats
    assert (stats.total_completed, stats.total_failed, stats.total_cancelled) == (2, 1, 1)
    assert sample(registry, "tokenbatcher_failed_batches_total") == 1
    assert sample(registry, "tokenbatcher_dropped_records_total") == 1
    assert sample(registry, "tokenbatcher_records_cancelled_total") == 1
    assert_matches(registry, stats, running=False)


@pytest.mark.real_clock
@pytest.mark.asyncio
async def test_scrapes_from_other_threads_and_over_http() -> None:
    registry = prometheus_client.CollectorRegistry()
    batcher, _ = ex.build(registry)
    loop = asyncio.get_running_loop()
    server, thread = prometheus_client.start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        async with batcher:
            await ex.run_load(batcher, producers=4, requests=5)
            # the batcher is still running: a scrape from another thread asks its loop for the snapshot
            text = (await loop.run_in_executor(None, prometheus_client.generate_latest, registry)).decode()
            assert 'tokenbatcher_records_completed_total{batcher="demo"} 20.0' in text
            assert 'tokenbatcher_running{batcher="demo"} 1.0' in text
            url = f"http://127.0.0.1:{server.server_port}/metrics"

            def fetch() -> str:
                with urllib.request.urlopen(url, timeout=10) as response:
                    return str(response.read().decode())

            body = await loop.run_in_executor(None, fetch)
            assert 'tokenbatcher_records_submitted_total{batcher="demo"} 20.0' in body
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_script_prints_the_exposition_text(capsys: pytest.CaptureFixture[str]) -> None:
    ex.main(["--producers", "4", "--requests", "3"])
    out = capsys.readouterr().out
    assert "# TYPE tokenbatcher_batch_size histogram" in out
    assert 'tokenbatcher_records_completed_total{batcher="demo"} 12.0' in out
    assert "BatchStats(submitted=12, completed=12" in out
