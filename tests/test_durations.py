"""The duration model: recovery, robustness, adaptation, warm-up and degenerate data."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenbatcher._durations import SHIFT_RUN, DurationFit, DurationModel

Curve = Callable[[int, float], float]


def known(n: int, c: float) -> float:
    """The curve the model's form can express exactly: 4 ms + 0.1 ms/record + 20 us/token + curvature."""
    return 0.004 + 1e-4 * n + 2e-5 * c + 3e-9 * c * c


def batches(seed: int) -> Iterator[tuple[int, float]]:
    """Batches of 1..64 records whose mean cost varies on its own (so size and cost can be told apart)."""
    rng = random.Random(seed)
    while True:
        n = rng.randint(1, 64)
        yield n, n * rng.uniform(20, 400)


def feed(model: DurationModel, curve: Curve, count: int, *, seed: int = 0, noise: float = 0.05) -> None:
    rng = random.Random(seed + 1000)
    for i, (n, c) in zip(range(count), batches(seed), strict=False):
        model.observe(n, c, curve(n, c) * math.exp(rng.gauss(0.0, noise)), float(i))


def worst_error(fit: DurationFit, curve: Curve) -> float:
    """The largest relative prediction error at the corners and middle of the range the batches cover."""
    points = [(n, n * m) for n in (1, 4, 16, 64) for m in (20.0, 100.0, 400.0)]
    return max(abs(fit.predict(n, c) / curve(n, c) - 1) for n, c in points)


def typical_error(fit: DurationFit, curve: Curve) -> float:
    """The 90th percentile of the relative prediction error over batches like those seen."""
    errors = sorted(
        abs(fit.predict(n, c) / curve(n, c) - 1) for _, (n, c) in zip(range(200), batches(99), strict=False)
    )
    return errors[180]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_known_coefficients_from_noisy_batches(seed: int) -> None:
    model = DurationModel()
    feed(model, known, 400, seed=seed)
    fit = model.fit
    assert typical_error(fit, known) < 0.03
    assert worst_error(fit, known) < 0.06
    assert fit.intercept_s == pytest.approx(0.004, rel=0.25)
    assert fit.per_cost_s == pytest.approx(2e-5, rel=0.15)
    assert fit.per_cost_squared_s == pytest.approx(3e-9, rel=0.25)
    assert fit.per_record_s == pytest.approx(1e-4, abs=1e-4)
    assert 0.03 < fit.fit_error < 0.08  # the 5% noise, seen through 32 residuals
    assert fit.ready
    assert fit.shifts == 0
    assert 40 < fit.effective_samples < 1 / (1 - 0.5 ** (1 / 50))  # half-life 50: at most ~72.6 batches


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_outliers_barely_move_it(seed: int) -> None:
    rng = random.Random(seed)
    spiky = DurationModel()
    for i, (n, c) in zip(range(600), batches(seed), strict=False):
        duration = known(n, c) * math.exp(rng.gauss(0.0, 0.05))
        if rng.random() < 0.05:
            duration *= rng.choice([0.1, 10.0])  # a 10x stall or a 10x too fast batch
        spiky.observe(n, c, duration, float(i))
    assert spiky.fit.outliers >= 20
    assert spiky.fit.shifts <= 1  # a burst of same-side outliers may pass for one (it costs some evidence)
    assert typical_error(spiky.fit, known) < 0.03
    assert worst_error(spiky.fit, known) < 0.12


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_slow_first_batch_is_left_out_at_the_end_of_the_warm_up(seed: int) -> None:
    model = DurationModel()
    model.observe(30, 3000.0, 40 * known(30, 3000.0), 0.0)  # the first call compiles kernels
    feed(model, known, 6, noise=0.02, seed=seed)
    assert not model.fit.ready
    online = typical_error(model.fit, known)
    feed(model, known, 1, noise=0.02, seed=seed + 10)
    assert model.fit.ready
    assert model.fit.outliers >= 1
    assert typical_error(model.fit, known) < min(0.15, online)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_stall_right_after_the_warm_up_is_left_out(seed: int) -> None:
    model = DurationModel()
    feed(model, known, 8, noise=0.02, seed=seed)
    assert model.fit.ready
    before = typical_error(model.fit, known)
    model.observe(10, 2000.0, 20 * known(10, 2000.0), 8.0)  # a garbage collection, a kernel compiled late
    assert model.fit.outliers >= 1
    assert typical_error(model.fit, known) < before + 0.02


@pytest.mark.parametrize("seed", [0, 9])
@pytest.mark.parametrize("factor", [2.0, 1.25, 0.5])
def test_adapts_to_a_step_change_of_speed_within_the_documented_batches(factor: float, seed: int) -> None:
    model = DurationModel()
    feed(model, known, 200, seed=seed)
    assert model.fit.shifts == 0

    def changed(n: int, c: float) -> float:
        return factor * known(n, c)

    assert typical_error(model.fit, changed) > 0.15  # what a model that did not adapt would get wrong
    feed(model, changed, SHIFT_RUN + 2, seed=seed + 7)
    assert model.fit.shifts == 1
    assert typical_error(model.fit, changed) < 0.08
    feed(model, changed, 40, seed=seed + 8)
    assert typical_error(model.fit, changed) < 0.04
    assert worst_error(model.fit, changed) < 0.2


def test_a_gradual_drift_is_followed() -> None:
    model = DurationModel()
    rng = random.Random(3)
    for i, (n, c) in zip(range(600), batches(3), strict=False):
        speed = 1 + i / 300  # 3x slower at the end, smoothly

        def curve(n: int, c: float, speed: float = speed) -> float:
            return speed * known(n, c)

        model.observe(n, c, curve(n, c) * math.exp(rng.gauss(0.0, 0.05)), float(i))
    assert typical_error(model.fit, lambda n, c: 3.0 * known(n, c)) < 0.06


def test_warm_up_what_it_predicts_before_and_when_it_is_ready() -> None:
    model = DurationModel(warmup=8)
    assert model.fit == DurationFit()
    assert model.fit.predict(10, 1000) == 0.0  # nothing known
    assert not model.fit.ready
    assert model.fit.updated_at is None
    model.observe(10, 1000.0, 0.5, 3.0)
    assert model.fit.predict(10, 1000) == pytest.approx(0.5)
    assert model.fit.predict(20, 2000) == pytest.approx(1.0)  # proportional to cost until told otherwise
    assert model.fit.updated_at == 3.0
    feed(model, known, 6)
    assert not model.fit.ready
    feed(model, known, 1)
    assert model.fit.ready
    assert model.fit.samples == 8


def test_a_single_batch_shape_falls_back_to_proportional() -> None:
    model = DurationModel()
    for i in range(100):
        model.observe(10, 1000.0, 0.5 + 0.01 * (i % 3 - 1), float(i))
    fit = model.fit
    assert fit.predict(10, 1000) == pytest.approx(0.5, rel=0.02)
    assert fit.predict(20, 2000) == pytest.approx(1.0, rel=0.05)
    assert fit.predict(1, 100) == pytest.approx(0.05, rel=0.05)
    coefficients = (fit.intercept_s, fit.per_record_s, fit.per_cost_s, fit.per_cost_squared_s)
    assert all(math.isfinite(v) and v >= 0 for v in coefficients)


def test_zero_costs_fall_back_to_size_and_zero_durations_to_zero() -> None:
    by_size = DurationModel()
    for i in range(20):
        by_size.observe(5, 0.0, 0.25, float(i))
    assert by_size.fit.predict(10, 0.0) == pytest.approx(0.5)
    instant = DurationModel()  # a process_fn that returns at once, as on a virtual clock
    for i in range(20):
        instant.observe(1 + i % 7, float(i), 0.0, float(i))
    assert instant.fit.predict(100, 1e6) == 0.0


def test_the_snapshot_is_immutable_and_stays_as_it_was() -> None:
    model = DurationModel()
    feed(model, known, 10)
    before = model.fit
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.intercept_s = 1.0  # type: ignore[misc]
    feed(model, lambda n, c: 2 * known(n, c), 10)
    assert model.fit is not before
    assert before.samples == 10


def test_largest_batch_fits_the_time_and_one_more_would_not() -> None:
    model = DurationModel()
    feed(model, known, 100, noise=0.0)
    fit = model.fit
    n = fit.largest_batch(0.05, 100.0, limit=1000)
    assert fit.predict(n, 100.0 * n) <= 0.05 < fit.predict(n + 1, 100.0 * (n + 1))
    assert fit.largest_batch(0.05, 100.0, limit=3) == 3
    assert fit.largest_batch(0.001, 100.0, limit=1000) == 0  # even one record is too slow


def test_bad_input_is_refused_naming_the_parameter() -> None:
    model = DurationModel()
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        model.observe(0, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="cost must be a finite number >= 0"):
        model.observe(1, -1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="duration_s must be a finite number >= 0"):
        model.observe(1, 1.0, math.nan, 0.0)
    with pytest.raises(ValueError, match="duration_s"):
        model.observe(1, 1.0, math.inf, 0.0)
    with pytest.raises(ValueError, match="now must be finite"):
        model.observe(1, 1.0, 1.0, math.nan)
    with pytest.raises(ValueError, match="half_life must be a finite number > 0"):
        DurationModel(half_life=0)
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        DurationModel(warmup=0)
    with pytest.raises(ValueError, match="size must be a finite number >= 0"):
        model.fit.predict(-1, 0)
    with pytest.raises(ValueError, match="limit must be an int >= 0"):
        model.fit.largest_batch(1.0, 1.0, limit=-1)
    assert model.fit.samples == 0  # nothing refused was learnt


batch_strategy = st.tuples(
    st.integers(1, 10_000),
    st.one_of(st.just(0.0), st.floats(0.0, 1e7)),
    st.one_of(st.just(0.0), st.floats(1e-12, 1e3), st.floats(0.0, 1.0)),
)


@settings(max_examples=150, deadline=None)
@given(
    observed=st.lists(batch_strategy, max_size=40),
    query=st.tuples(st.integers(0, 100_000), st.floats(0.0, 1e8)),
)
def test_predictions_are_finite_non_negative_and_grow_with_the_batch(
    observed: list[tuple[int, float, float]], query: tuple[int, float]
) -> None:
    model = DurationModel()
    for i, (n, c, d) in enumerate(observed):
        model.observe(n, c, d, float(i))
    fit = model.fit
    n, c = query
    predicted = fit.predict(n, c)
    assert math.isfinite(predicted)
    assert predicted >= 0.0
    assert fit.predict(n + 1, c) >= predicted
    assert fit.predict(n, c * 2 + 1) >= predicted
    assert all(
        math.isfinite(v) and v >= 0
        for v in (fit.intercept_s, fit.per_record_s, fit.per_cost_s, fit.per_cost_squared_s, fit.fit_error)
    )
    assert 0 <= fit.largest_batch(max(predicted, 1e-6), 10.0, limit=500) <= 500
