"""``tune="throughput"``: the batcher learns the limits with the most records per second.

Every test runs on the virtual clock with a simulated ``process_fn`` whose
batch of ``n`` records takes a known number of seconds, through the real
batcher, fed by a saturated producer (every record queued up front): so the
throughput of any fixed batch size is known exactly, and the tuned one is
measured against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.tuning import embed_texts
from conftest import run_virtual
from tokenbatcher import DynamicBatcher, OverloadedError, TokenBatcher, batched

Curve = Callable[[int, int], float]
"""Seconds for a batch of ``n`` records of summed cost ``c``."""


def u_shaped(n: int, c: int) -> float:
    """Per record ``0.02 / n + 0.0001 * n``: best at ``n = 14``."""
    del c
    return 0.02 + 0.0001 * n * n


def flat(n: int, c: int) -> float:
    """The same time per record, however large the batch."""
    del c
    return 0.001 * n


class Sim:
    """``process_fn``: sleeps ``curve(n, cost)`` (virtual time); records every batch's (start, size, cost)."""

    def __init__(self, curve: Curve, *, fail: random.Random | None = None) -> None:
        self.curve = curve
        self.batches: list[tuple[float, int, int]] = []
        self.fail = fail

    async def __call__(self, batch: list[int]) -> list[int]:
        self.batches.append((asyncio.get_running_loop().time(), len(batch), sum(batch)))
        await asyncio.sleep(self.curve(len(batch), sum(batch)))
        if self.fail is not None and self.fail.random() < 0.1:
            raise RuntimeError("simulated failure")
        return [x * 2 for x in batch]


def best_fixed(curve: Curve, ceiling: int) -> float:
    """Records per second of the best fixed batch size up to ``ceiling`` (records of cost 1)."""
    return max(n / curve(n, n) for n in range(1, ceiling + 1))


def rate(sim: Sim, first: int, last: int) -> float:
    """Records per second over batches ``first`` to ``last`` (back to back: the queue is never empty)."""
    batches = sim.batches[first : last + 1]
    span = sim.batches[last + 1][0] - batches[0][0]
    return sum(size for _, size, _ in batches) / span


async def saturate(batcher: DynamicBatcher[int, int], records: int) -> list[asyncio.Future[int]]:
    return [await batcher.submit(1) for _ in range(records)]


# --------------------------------------------------------------------- the setting


def test_tune_is_off_by_default_validated_and_read_back() -> None:
    assert DynamicBatcher(Sim(flat)).tune == "off"
    assert TokenBatcher(Sim(flat), tune="throughput").tune == "throughput"
    with pytest.raises(ValueError, match="tune"):
        DynamicBatcher(Sim(flat), tune="fast")  # type: ignore[arg-type]
    batcher = DynamicBatcher(Sim(flat))
    assert batcher._durations is None
    assert batcher._tuning is None
    stats = batcher.stats
    assert (stats.tuned_budget, stats.tuned_max_size, dict(stats.tuned_records_per_s)) == (0, 0, {})


@pytest.mark.asyncio
async def test_the_decorator_takes_tune() -> None:
    @batched(tune="throughput", max_batch_size=8)
    async def double(batch: list[int]) -> list[int]:
        return [x * 2 for x in batch]

    assert await asyncio.gather(*(double(i) for i in range(40))) == [2 * i for i in range(40)]


def test_one_duration_model_serves_the_latency_target_and_the_tuner() -> None:
    batcher = DynamicBatcher(Sim(flat), tune="throughput", latency_target_s=1.0)
    core: Any = batcher
    assert core._tuning.model is core._durations is core._latency.model


# --------------------------------------------------------------------- what it learns


def test_it_finds_the_optimum_of_a_u_shaped_curve_within_50_batches() -> None:
    sim = Sim(u_shaped)

    async def main() -> None:
        async with DynamicBatcher(sim, tune="throughput", max_batch_size=256, max_queue_size=10_000) as batcher:
            futures = await saturate(batcher, 5_000)
            assert await asyncio.gather(*futures) == [2] * 5_000
            stats = batcher.stats
        assert rate(sim, 50, 89) >= 0.9 * best_fixed(u_shaped, 256)
        assert 8 <= stats.tuned_max_size <= 23  # the grid points around n = 14
        assert stats.tuned_records_per_s
        # the ceiling's throughput is far worse: it did learn something
        assert rate(sim, 50, 89) > 5 * 256 / u_shaped(256, 256)

    run_virtual(main())


def test_it_stays_at_the_ceiling_on_a_flat_curve() -> None:
    sim = Sim(flat)

    async def main() -> None:
        async with DynamicBatcher(sim, tune="throughput", max_batch_size=64, max_queue_size=10_000) as batcher:
            await asyncio.gather(*await saturate(batcher, 64 * 60))
            stats = batcher.stats
        assert (stats.tuned_budget, stats.tuned_max_size) == (32_000, 64)
        sizes = [size for _, size, _ in sim.batches]
        reached = sizes.index(64)  # it starts at one record, and climbs (larger batches two steps at a time)
        assert reached <= 80
        assert sizes[reached:].count(64) >= 0.7 * len(sizes[reached:])  # the rest: probes of the next arm

    run_virtual(main())


def test_it_recovers_after_a_drift() -> None:
    # "eager": each batch is formed as its slot frees, under the latest decision.  (A "window" seals up
    # to prefetch_batches ahead, so each move takes effect that many batches later, and recovers slower.)
    slow = 4.0
    state = {"slow": 1.0}

    def drifting(n: int, c: int) -> float:
        return 0.02 + 0.0001 * state["slow"] * n * n

    sim = Sim(drifting)

    async def main() -> None:
        async with DynamicBatcher(
            sim, tune="throughput", dispatch="eager", max_batch_size=256, max_queue_size=10_000
        ) as batcher:
            futures = await saturate(batcher, 4_000)
            for _ in range(10_000):
                if len(sim.batches) >= 80:
                    break
                await asyncio.sleep(0.01)
            state["slow"] = slow  # the GPU is shared from now on: the best batch is half as large
            drift = len(sim.batches)
            futures += await saturate(batcher, 3_000)
            await asyncio.gather(*futures)
        assert rate(sim, drift + 50, drift + 80) >= 0.9 * best_fixed(drifting, 256)

    run_virtual(main())


@pytest.mark.parametrize("clients", [32, None], ids=["32 clients", "every text at once"])
def test_padded_texts_of_mixed_lengths_find_a_small_budget_from_the_default_ceiling(clients: int | None) -> None:
    # On a CPU the padding of mixed lengths costs more than calls: the default budget (32,000) is the worst
    # choice, and with 32 clients only a few texts wait, so only a small budget groups them tightly.
    rng = random.Random(7)
    lengths = [round(3 * (256 / 3) ** rng.random()) for _ in range(1500)]

    def measure(**settings: Any) -> tuple[float, Any]:
        return run_virtual(embed_texts(lengths, clients, **settings))

    fixed = {budget: measure(target_batch_tokens=budget)[0] for budget in (128, 256, 512, 1024, 2048, 4096)}
    default, _ = measure(target_batch_tokens=32_000)
    tuned, stats = measure(target_batch_tokens=32_000, tune="throughput")
    assert max(fixed.values()) > 2.5 * default
    assert tuned >= 0.85 * max(fixed.values())
    assert stats.tuned_budget <= 4_096
    assert (stats.total_completed, stats.total_failed) == (len(lengths), 0)


def test_with_a_latency_target_it_keeps_to_batches_that_meet_it() -> None:
    # Without a target the best batch is 14 records (0.04 s); a 0.03 s target allows at most 10.
    target = 0.03
    sim = Sim(u_shaped)

    async def main() -> None:
        async with DynamicBatcher(
            sim, tune="throughput", latency_target_s=target, max_batch_size=256, max_queue_size=10_000
        ) as batcher:
            for _ in range(60):  # a burst, then wait for it: each waits for one batch at most
                futures: list[asyncio.Future[int]] = []
                for _ in range(30):
                    with contextlib.suppress(OverloadedError):
                        futures.append(await batcher.submit(1))
                await asyncio.gather(*futures, return_exceptions=True)
            stats = batcher.stats
        assert u_shaped(stats.tuned_max_size, 0) <= target
        assert all(u_shaped(size, 0) <= target for _, size, _ in sim.batches[10:])

    run_virtual(main())


# --------------------------------------------------------------------- the guarantees while it explores


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget=st.integers(1, 400),
    max_size=st.integers(1, 300),
    costs=st.lists(st.integers(1, 40), min_size=1, max_size=600),
    curvature=st.floats(0.0, 0.001),
)
def test_it_never_exceeds_the_ceilings(budget: int, max_size: int, costs: list[int], curvature: float) -> None:
    sim = Sim(lambda n, c: 0.01 + 0.0001 * c + curvature * c * c)
    costs = [min(cost, budget) for cost in costs]

    async def main() -> None:
        async with DynamicBatcher(
            sim,
            tune="throughput",
            target_batch_cost=budget,
            max_batch_size=max_size,
            cost_estimator=lambda x: x,
            max_queue_size=len(costs),
        ) as batcher:
            results = await asyncio.gather(*[await batcher.submit(cost) for cost in costs])
        assert results == [2 * cost for cost in costs]
        for _, size, cost in sim.batches:
            assert size <= max_size
            assert cost <= budget

    run_virtual(main())


def test_every_future_resolves_and_the_counters_add_up_while_it_explores() -> None:
    sim = Sim(u_shaped, fail=random.Random(7))

    async def main() -> None:
        async with DynamicBatcher(sim, tune="throughput", max_batch_size=128, max_queue_size=10_000) as batcher:
            futures = await saturate(batcher, 2_000)
            futures += [await batcher.submit(1, timeout_s=0.05) for _ in range(200)]
            for future in futures[100:2000:37]:
                future.cancel()
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
            stats = batcher.stats
        assert all(isinstance(o, (int, RuntimeError, TimeoutError, asyncio.CancelledError)) for o in outcomes)
        resolved = stats.total_completed + stats.total_failed + stats.total_cancelled + stats.total_expired
        assert resolved == stats.total_submitted == 2_200
        assert stats.pending == 0
        assert stats.total_failed > 0
        assert stats.total_cancelled > 0
        assert stats.tuned_records_per_s  # it kept learning from the batches that succeeded

    run_virtual(main())


def test_configure_switches_tuning_on_and_off_keeping_every_record() -> None:
    sim = Sim(u_shaped)

    async def main() -> None:
        async with DynamicBatcher(sim, max_batch_size=256, max_queue_size=10_000) as batcher:
            futures = await saturate(batcher, 600)
            batcher.configure(tune="throughput")
            futures += await saturate(batcher, 1_500)
            for _ in range(10_000):
                if len(sim.batches) >= 40:
                    break
                await asyncio.sleep(0.01)
            assert batcher.stats.tuned_max_size < 256
            batcher.configure(tune="off")
            futures += await saturate(batcher, 600)
            assert await asyncio.gather(*futures) == [2] * 2_700
            assert batcher.stats.tuned_max_size == 0
        assert sim.batches[-2][1] == 256  # the ceiling again

    run_virtual(main())
