"""The throughput tuner, on simulated models fed by a saturated FIFO queue."""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenbatcher._durations import DurationModel
from tokenbatcher._tuner import Decision, ThroughputTuner

Curve = Callable[[int, int], float]
CEILING, MAX_SIZE = 32_000, 256


def u_shaped(n: int, c: int) -> float:
    """5 ms per call, and a per-token cost that grows with the batch: the cost per record is U-shaped."""
    return 0.005 + 1.5e-5 * c * math.sqrt(1 + c / 3000)


def shared(n: int, c: int) -> float:
    """The same model once another job shares its GPU: slower, with a much larger per-call cost."""
    return 0.04 + 2.5e-5 * c * math.sqrt(1 + c / 3000)


def flat(n: int, c: int) -> float:
    """Every token costs the same, whatever the batch."""
    return 2e-5 * c


def per_record(n: int, c: int) -> float:
    """A millisecond per record, whatever its cost."""
    return 0.001 * n


def instant(n: int, c: int) -> float:
    """A process_fn that returns at once, as on a virtual clock."""
    return 0.0


def chat_costs(rng: random.Random) -> int:
    return rng.randint(20, 200)


@dataclass
class SaturatedQueue:
    """An endless FIFO queue of records whose costs come from ``costs``, served by a simulated model.

    ``form`` takes batches from its head the way the batcher does under the sum
    budget: records in order while the batch fits (a record alone may exceed the
    budget), and says which limit closed it.
    """

    curve: Curve
    seed: int = 0
    noise: float = 0.05
    costs: Callable[[random.Random], int] = chat_costs
    rng: random.Random = field(init=False)
    queue: deque[int] = field(init=False, default_factory=lambda: deque[int]())

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def form(self, budget: int, max_size: int) -> tuple[int, int, str]:
        size = cost = 0
        while size < max_size:
            if not self.queue:
                self.queue.append(self.costs(self.rng))
            if size and cost + self.queue[0] > budget:
                return size, cost, "budget"
            size, cost = size + 1, cost + self.queue.popleft()
            if cost >= budget:
                return size, cost, "budget"
        return size, cost, "max_size"

    def run(self, budget: int, max_size: int) -> tuple[int, int, str, float]:
        size, cost, reason = self.form(budget, max_size)
        seconds = self.curve(size, cost) * math.exp(self.rng.gauss(0.0, self.noise))
        return size, cost, reason, seconds


@dataclass
class Step:
    decision: Decision
    size: int
    cost: int
    seconds: float


def tune(
    tuner: ThroughputTuner, model: DurationModel, queue: SaturatedQueue, batches: int, start: int = 0
) -> list[Step]:
    """Run ``batches`` batches the way the batcher will: decide, form, process, feed the model, then the tuner."""
    steps: list[Step] = []
    for i in range(start, start + batches):
        decision = tuner.decide()
        size, cost, reason, seconds = queue.run(decision.budget, decision.max_size)
        model.observe(size, cost, seconds, float(i))
        tuner.observe(decision, size=size, cost=cost, duration_s=seconds, now=float(i), reason=reason)
        steps.append(Step(decision, size, cost, seconds))
    return steps


@functools.cache
def fixed(curve: Curve, budget: int, max_size: int) -> float:
    """Records per second of a fixed budget, noise-free, over the same 10,000 records."""
    queue, records, seconds = SaturatedQueue(curve, seed=12345, noise=0.0), 0, 0.0
    while records < 10_000:
        size, _, _, took = queue.run(budget, min(max_size, 10_000 - records))
        records, seconds = records + size, seconds + took
    return records / seconds


@functools.cache
def best_fixed(curve: Curve) -> float:
    """The best fixed budget's records per second, over a sweep of four budgets per octave."""
    budgets = {max(1, round(CEILING / 2 ** (i / 4))) for i in range(4 * 15 + 1)}
    return max(fixed(curve, budget, MAX_SIZE) for budget in budgets)


def new_tuner(*, latency_target_s: float | None = None, dwell: int = 2) -> tuple[ThroughputTuner, DurationModel]:
    model = DurationModel()
    tuner = ThroughputTuner(
        model, target_batch_cost=CEILING, max_batch_size=MAX_SIZE, latency_target_s=latency_target_s, dwell=dwell
    )
    return tuner, model


def rate(steps: list[Step]) -> float:
    return sum(s.size for s in steps) / sum(s.seconds for s in steps)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_finds_the_optimum_of_a_u_shaped_cost_within_50_batches(seed: int) -> None:
    tuner, model = new_tuner()
    queue = SaturatedQueue(u_shaped, seed=seed)
    assert fixed(u_shaped, CEILING, MAX_SIZE) < 0.5 * best_fixed(u_shaped)  # the ceilings are a bad choice here
    tune(tuner, model, queue, 50)
    chosen = tuner.snapshot()
    assert fixed(u_shaped, chosen.budget, chosen.max_size) >= 0.9 * best_fixed(u_shaped)
    later = tune(tuner, model, queue, 100, start=50)  # probes included
    assert rate(later) >= 0.9 * best_fixed(u_shaped)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_stays_at_the_ceilings_on_a_flat_cost(seed: int) -> None:
    tuner, model = new_tuner()
    queue = SaturatedQueue(flat, seed=seed)
    tune(tuner, model, queue, 20)
    at_ceiling = 0
    for i in range(20, 150):
        tune(tuner, model, queue, 1, start=i)
        at_ceiling += tuner.snapshot().budget == CEILING
    assert at_ceiling >= 0.7 * 130
    final = tuner.snapshot()
    assert (final.budget, final.max_size) == (CEILING, MAX_SIZE)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_after_the_model_slows_down_halfway(seed: int) -> None:
    tuner, model = new_tuner()
    queue = SaturatedQueue(u_shaped, seed=seed)
    tune(tuner, model, queue, 100)
    queue.curve = shared
    assert best_fixed(shared) < 0.6 * best_fixed(u_shaped)
    tune(tuner, model, queue, 50, start=100)
    chosen = tuner.snapshot()
    assert model.fit.shifts >= 1
    assert fixed(shared, chosen.budget, chosen.max_size) >= 0.9 * best_fixed(shared)
    assert rate(tune(tuner, model, queue, 100, start=150)) >= 0.9 * best_fixed(shared)


@pytest.mark.parametrize("target", [0.012, 0.03, 0.1])
def test_with_a_latency_target_no_decision_is_predicted_to_miss_it(target: float) -> None:
    tuner, model = new_tuner(latency_target_s=target)
    queue = SaturatedQueue(u_shaped)
    first = tuner.decide()
    assert (first.budget, first.max_size) == (1, 1)  # nothing known: one record
    for i in range(200):
        decision = tuner.decide()
        assert model.fit.predict(decision.max_size, decision.budget) <= target
        tune(tuner, model, queue, 1, start=i)
    stats = tuner.snapshot()
    assert stats.target_cap is not None
    assert stats.budget <= stats.target_cap[0]
    assert stats.max_size <= stats.target_cap[1]


def test_with_a_latency_target_it_takes_the_most_efficient_budget_that_meets_it() -> None:
    target = 0.02  # below the unconstrained optimum's ~38 ms batches
    tuner, model = new_tuner(latency_target_s=target)
    queue = SaturatedQueue(u_shaped)
    tune(tuner, model, queue, 100)
    feasible = [
        fixed(u_shaped, budget, MAX_SIZE)
        for budget in range(100, 3000, 20)
        if u_shaped(budget // 20, budget) <= target  # its largest batch (20 is the cheapest record) is in time
    ]
    assert rate(tune(tuner, model, queue, 100, start=100)) >= 0.85 * max(feasible)


def light_load(tuner: ThroughputTuner, model: DurationModel, curve: Curve, rounds: int, offered: int) -> list[int]:
    """``offered`` records of cost 100 arrive per round and are served under the tuner's limits; the sizes."""
    sizes: list[int] = []
    for i in range(rounds):
        left = offered
        while left:
            decision = tuner.decide()
            size = max(1, min(left, decision.max_size, decision.budget // 100))
            left -= size
            seconds, reason = curve(size, 100 * size), "budget" if left else "free_slot"
            model.observe(size, 100 * size, seconds, float(i))
            tuner.observe(decision, size=size, cost=100 * size, duration_s=seconds, now=float(i), reason=reason)
            sizes.append(size)
    return sizes


def test_batches_as_large_as_the_queue_count_and_keep_the_ceiling_when_splitting_costs_more() -> None:
    tuner, model = new_tuner()
    sizes = light_load(tuner, model, u_shaped, 60, offered=3)  # a call costs 5 ms: splitting three records loses
    stats = tuner.snapshot()
    assert stats.batches == len(sizes)  # every batch is evidence, not only those its limits closed
    assert stats.budget >= 300  # its batches are the queue's, whole
    assert sizes[-40:].count(3) >= 30  # it tried splitting (a probe now and then), and came back


def test_batches_as_large_as_the_queue_lead_it_below_them_when_smaller_batches_are_faster() -> None:
    def quadratic(n: int, c: int) -> float:  # per record 1 ms + 0.5 ms per record in the batch: best alone
        return 0.001 * n + 0.0005 * n * n

    tuner, model = new_tuner()
    sizes = light_load(tuner, model, quadratic, 60, offered=24)
    # the climb skips the arms the 24 records never reach (32,000 down to 2,400 all form the same batch)
    assert tuner.snapshot().budget < 2_400
    assert sum(sizes[-40:]) / 40 <= 6


def test_batches_formed_under_an_earlier_decision_count_for_their_own_arm() -> None:
    tuner, model = new_tuner(dwell=1)
    queue = SaturatedQueue(u_shaped)
    first = tuner.decide()
    tune(tuner, model, queue, 1)
    assert tuner.decide().arm == first.arm + 1  # it moved on to try the next arm down
    size, cost, reason, seconds = queue.run(first.budget, first.max_size)  # a batch prefetched earlier
    model.observe(size, cost, seconds, 1.0)
    tuner.observe(first, size=size, cost=cost, duration_s=seconds, now=1.0, reason=reason)
    assert tuner.decide().arm == first.arm + 1
    assert [arm.batches for arm in tuner.snapshot().arms if arm.budget == first.budget] == [2]


def test_the_snapshot_is_immutable_and_lists_the_arms_largest_first() -> None:
    tuner, model = new_tuner()
    tune(tuner, model, SaturatedQueue(u_shaped), 60)
    stats = tuner.snapshot()
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.budget = 1  # type: ignore[misc]
    budgets = [arm.budget for arm in stats.arms]
    assert budgets == sorted(budgets, reverse=True)
    assert len(budgets) >= 3
    assert all(arm.records_per_s > 0 and arm.batches > 0 for arm in stats.arms)
    assert stats.batches == 60
    assert stats.switches >= 2
    assert stats.target_cap is None


def test_a_speed_change_drops_the_old_measurements() -> None:
    tuner, model = new_tuner()
    queue = SaturatedQueue(u_shaped)
    tune(tuner, model, queue, 60)
    queue.curve = lambda n, c: 3 * u_shaped(n, c)
    steps = 0
    while model.fit.shifts == 0:
        tune(tuner, model, queue, 1, start=60 + steps)
        steps += 1
        assert steps < 20
    assert sum(arm.batches for arm in tuner.snapshot().arms) <= 1


def test_bad_settings_are_refused_naming_the_parameter() -> None:
    model = DurationModel()
    with pytest.raises(ValueError, match="target_batch_cost must be an int >= 1"):
        ThroughputTuner(model, target_batch_cost=0, max_batch_size=8)
    with pytest.raises(ValueError, match="max_batch_size must be an int >= 1"):
        ThroughputTuner(model, target_batch_cost=8, max_batch_size=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="latency_target_s must be a number > 0"):
        ThroughputTuner(model, target_batch_cost=8, max_batch_size=8, latency_target_s=0.0)
    with pytest.raises(ValueError, match="step must be a number > 1"):
        ThroughputTuner(model, target_batch_cost=8, max_batch_size=8, step=1.0)
    with pytest.raises(ValueError, match="probe_every must be an int >= 1"):
        ThroughputTuner(model, target_batch_cost=8, max_batch_size=8, probe_every=0)


@settings(max_examples=40, deadline=None)
@given(
    ceiling=st.integers(1, 100_000),
    max_size=st.integers(1, 1024),
    target=st.one_of(st.none(), st.floats(1e-4, 1.0)),
    curve=st.sampled_from([u_shaped, shared, flat, per_record, instant]),
    record_cost=st.integers(0, 500),
    seed=st.integers(0, 2**16),
)
def test_never_exceeds_the_ceilings(
    ceiling: int, max_size: int, target: float | None, curve: Curve, record_cost: int, seed: int
) -> None:
    model = DurationModel()
    tuner = ThroughputTuner(model, target_batch_cost=ceiling, max_batch_size=max_size, latency_target_s=target)
    queue = SaturatedQueue(curve, seed=seed, costs=lambda rng: rng.randint(0, record_cost))
    for step in tune(tuner, model, queue, 60):
        assert 1 <= step.decision.budget <= ceiling
        assert 1 <= step.decision.max_size <= max_size
    stats = tuner.snapshot()
    assert 1 <= stats.budget <= ceiling
    assert 1 <= stats.max_size <= max_size
    assert all(math.isfinite(arm.estimate) and arm.estimate >= 0 for arm in stats.arms)
