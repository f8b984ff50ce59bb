"""How long ``process_fn`` takes for a batch: an online, robust, forgetting fit.

``duration = b + a_n * n + a_c * c + q * c**2`` for ``n`` records of counted
cost ``c`` (padded or sum): per-call, per-record and per-token cost, and a
curvature ``q`` for models whose per-token cost grows with the batch (a CPU
whose caches overflow); with ``b, q > 0`` the cost per record is U-shaped in
the batch size.  Coefficients stay ``>= 0``: predictions never go negative and
never fall as a batch grows.  Least squares on relative errors, forgetting
half the evidence every ``half_life`` batches (batches: an idle hour says
nothing about speed).  Outliers -- residuals, studentized by the fit's own
uncertainty there, beyond ``HUBER_K`` robust error scales -- are down-weighted,
beyond ``REJECT_K`` ignored.  A change of speed (a GPU now shared) trips a
CUSUM: the old evidence is rescaled to the recent batches' speed and kept at
``SHIFT_KEEP``.  At 5% noise a step of 20% or more is detected within
``SHIFT_RUN`` = 6 batches and predictions are back within 8% by the 8th;
smaller steps and gradual drift take longer, or are followed by forgetting.
When the data cannot tell terms apart (one batch size, costs proportional to
sizes), a small ridge falls back to ``duration proportional to cost``.

Warm-up: before any batch, ``predict`` gives 0.0 (unknown: callers keep their
ceilings), then the proportional model through the first batch.  At ``warmup``
batches (8) they are refitted together, leaving out up to a quarter as outliers
(a first call that compiles kernels), and the fit is ``ready``; each kept
batch's error under the fit of the others seeds the error scale, so outliers
and changes of speed are judged from the first batch after it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from ._numbers import check_int, check_number, gauss, median, ridge_nonnegative

HUBER_K = 3.0  # residuals beyond this many error scales are down-weighted...
REJECT_K = 6.0  # ...and beyond this many, ignored (the shift detector still sees them)
MIN_ERROR_SCALE = 0.02  # floor of the relative error scale: noise-free data must not make jitter an outlier
RESIDUALS = 32  # recent residuals behind the error scale and `fit_error`
CUSUM_SLACK, CUSUM_CLIP, CUSUM_ALARM = 0.5, 2.0, 8.0  # in error scales; clipping keeps outliers from adding up
SHIFT_RUN = 6  # recent batches taken as the new speed after a shift (CUSUM_ALARM / (CUSUM_CLIP - CUSUM_SLACK))
SHIFT_KEEP = 0.25  # share of the old evidence kept, rescaled to the new speed, after a shift
RATIOS = 128  # recent batches behind `ratio_quantile`

_Batch = tuple[tuple[float, ...], float]  # features (1, n, c, c**2) and duration


def _reference(seconds: float) -> float:
    """A duration relative errors are taken against: kept where its inverse square is a normal float."""
    return min(max(seconds, 1e-9), 1e100)


def _guess(fit: DurationFit, z: tuple[float, ...]) -> float:
    return _reference(fit.predict(z[1], z[2]))


@dataclass(frozen=True, slots=True)
class DurationFit:
    """An immutable snapshot of the duration model: coefficients, evidence, and how well it fits."""

    intercept_s: float = 0.0
    """Seconds per call, whatever the batch (``b``)."""
    per_record_s: float = 0.0
    """Seconds per record (``a_n``)."""
    per_cost_s: float = 0.0
    """Seconds per unit of counted cost, e.g. per token (``a_c``)."""
    per_cost_squared_s: float = 0.0
    """Seconds per squared unit of counted cost (``q``, the curvature)."""
    samples: int = 0
    """Batches observed."""
    effective_samples: float = 0.0
    """Batches' worth of evidence still counted after forgetting and down-weighting."""
    fit_error: float = 0.0
    """Typical relative error of a prediction made before its batch ran (0.05 = 5%), over the last 32 batches."""
    ready: bool = False
    """True after the warm-up: predictions can be trusted."""
    shifts: int = 0
    """Changes of the model's speed detected."""
    outliers: int = 0
    """Batches down-weighted or left out as outliers."""
    updated_at: float | None = None
    """The caller's clock (``loop.time()``) at the last batch; None before any."""

    def predict(self, size: float, cost: float) -> float:
        """Predicted seconds (>= 0.0) for a batch of ``size`` records of counted cost ``cost``."""
        n, c = check_number(size, "size"), check_number(cost, "cost")
        return self.intercept_s + self.per_record_s * n + self.per_cost_s * c + self.per_cost_squared_s * c * c

    def largest_batch(self, seconds: float, cost_per_record: float, limit: int) -> int:
        """The most records, up to ``limit``, whose batch is predicted to take at most ``seconds``.

        Args:
            seconds: The time the batch may take.
            cost_per_record: Counted cost per record: a batch of ``n`` costs ``n * cost_per_record``.
            limit: The largest answer (e.g. ``max_batch_size``).

        Returns:
            ``n`` in ``[0, limit]``; 0 when even one record is predicted too slow.
        """
        t, k = check_number(seconds, "seconds"), check_number(cost_per_record, "cost_per_record")
        quad, lin, room = self.per_cost_squared_s * k * k, self.per_record_s + self.per_cost_s * k, t - self.intercept_s
        if room < 0:
            return 0
        if quad > 0:  # the positive root of quad * n**2 + lin * n = room, in a form that cannot cancel
            denominator = lin + math.sqrt(lin * lin + 4 * quad * room)
            n = 2 * room / denominator if denominator > 0 else 0.0
        else:
            n = room / lin if lin > 0 else math.inf
        best = int(min(n, check_int(limit, "limit", 0)))
        while best > 0 and self.predict(best, best * k) > t:  # rounding
            best -= 1
        return best


class DurationModel:
    """The live duration model (see the module docstring); only its owner observes.

    Args:
        half_life: Batches after which old evidence counts half.
        warmup: Batches before predictions are ``ready``.

    Raises:
        ValueError: ``half_life`` is not a number > 0, or ``warmup`` is not an int >= 1.
    """

    def __init__(self, *, half_life: float = 50.0, warmup: int = 8) -> None:
        if not math.isfinite(half_life) or half_life <= 0:
            raise ValueError(f"half_life must be a finite number > 0, got {half_life!r}")
        self._decay, self._warmup = 0.5 ** (1.0 / half_life), check_int(warmup, "warmup", 1)
        self._a = [[0.0] * 4 for _ in range(4)]  # sum of weight * z z^T
        self._g = [0.0] * 4  # sum of weight * z * duration
        self._weight = self._count = 0.0  # sum of weights; the same in batches (1 per fully trusted one)
        self._residuals: deque[float] = deque(maxlen=RESIDUALS)
        self._ratios: deque[float] = deque(maxlen=RATIOS)  # duration over its prediction, since the warm-up
        self._recent: deque[tuple[_Batch, float, float]] = deque(maxlen=SHIFT_RUN)  # and weight, precision
        self._high = self._low = 0.0  # the shift detector's CUSUMs
        self._early: list[_Batch] = []
        self._scaled: tuple[list[int], list[float], list[list[float]]] = ([], [], [])
        self._fit = DurationFit()

    @property
    def fit(self) -> DurationFit:
        """The current snapshot (immutable; each batch replaces it)."""
        return self._fit

    def ratio_quantile(self, q: float, least: int = 1) -> float | None:
        """The ``q``-quantile of recent batches' durations over their predictions (made before each ran).

        Over the last ``RATIOS`` (128) batches since the warm-up (or the last
        change of speed): 1.3 at ``q=0.9`` means one batch in ten took 30% longer
        than predicted, or more.  Planning with the prediction times this leaves
        room for slow batches that the mean (``fit_error``) does not.

        Args:
            q: The quantile, in ``[0, 1]``.
            least: The fewest batches to answer from.

        Returns:
            The quantile (linear between order statistics), or None with fewer than ``least`` batches.
        """
        q = check_number(q, "q")
        if q > 1:
            raise ValueError(f"q must be in [0, 1], got {q!r}")
        ordered = sorted(self._ratios)
        if len(ordered) < max(1, least):
            return None
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    def observe(self, size: int, cost: float, duration_s: float, now: float) -> None:
        """Learn from one finished batch.

        Args:
            size: Records in the batch (>= 1).
            cost: Its counted cost, padded or sum (>= 0).
            duration_s: Seconds ``process_fn`` took (>= 0).
            now: The caller's clock when it finished (``loop.time()``), for ``updated_at``.

        Raises:
            ValueError: An argument is out of range or not finite.
        """
        check_int(size, "size", 1)
        c, y = check_number(cost, "cost"), check_number(duration_s, "duration_s")
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now!r}")
        z, fit = (1.0, float(size), c, c * c), self._fit
        guess = fit.predict(size, c) if fit.samples else y
        ref = _reference(max(guess, 1e-3 * self._g[0] / self._weight if self._weight else 0.0))
        precision = 1.0 / (ref * ref)
        residual = (y - guess) / ref / math.sqrt(1.0 + self._leverage(z, precision))  # studentized
        weight, outlier, shifted = precision, False, False
        if len(self._residuals) >= 3:
            scale = max(fit.fit_error, MIN_ERROR_SCALE)
            outlier = abs(residual) > HUBER_K * scale
            if outlier:
                weight *= HUBER_K * scale / abs(residual) if abs(residual) <= REJECT_K * scale else 0.0
            if fit.ready and len(self._residuals) >= self._warmup:
                u = max(-CUSUM_CLIP, min(CUSUM_CLIP, residual / scale))
                self._high, self._low = max(0.0, self._high + u - CUSUM_SLACK), max(0.0, self._low - u - CUSUM_SLACK)
                shifted = max(self._high, self._low) > CUSUM_ALARM
        if fit.samples:
            self._residuals.append(abs(residual))
        if fit.ready:
            self._ratios.append(y / _reference(guess))
        self._discount(self._decay)
        self._add(z, y, weight, precision)
        self._recent.append(((z, y), weight, precision))
        if shifted:
            self._shift()
        self._refit(fit.samples + 1, fit.shifts + shifted, fit.outliers + outlier, float(now))
        if len(self._early) < self._warmup:
            self._early.append((z, y))
            if len(self._early) == self._warmup:
                self._restart()

    def _shift(self) -> None:
        """The speed changed: move the old evidence to the new speed, keep a share, re-add the recent batches."""
        fit, recent = self._fit, list(self._recent)
        ratio = min(16.0, max(1 / 16, median([y / _guess(fit, z) for (z, y), _, _ in recent])))
        for age, ((z, y), weight, precision) in enumerate(reversed(recent)):
            self._add(z, y, -weight * self._decay**age, precision)  # out, as they were counted
        self._discount(SHIFT_KEEP, ratio)
        spread = REJECT_K * max(fit.fit_error, MIN_ERROR_SCALE)
        for (z, y), _, precision in recent:  # those off the new speed (from before the change, outliers) go
            if abs(y / (_guess(fit, z) * ratio) - 1) <= spread:
                self._add(z, y, precision / ratio**2, precision / ratio**2)
        self._high = self._low = 0.0
        self._recent.clear()
        self._residuals.clear()
        self._ratios.clear()

    def _restart(self) -> None:
        """End of the warm-up: refit its batches together, leaving out up to a quarter as outliers.

        Each round leaves out the batch without which the others fit best, if the
        fit without it calls it an outlier.
        """
        fit, kept = self._fit, list(enumerate(self._early))
        dropped = 0
        for _ in range(len(kept) // 4):
            best: tuple[float, int] | None = None
            for i, (_, (z, y)) in enumerate(kept):
                scale = max(1.4826 * median(self._refit_from(kept[:i] + kept[i + 1 :])), MIN_ERROR_SCALE)
                if abs(y / _guess(self._fit, z) - 1) > HUBER_K * scale and (best is None or scale < best[0]):
                    best = (scale, i)
            if best is None:
                break
            kept.pop(best[1])
            dropped += 1
        # Each kept batch's error under the fit of the others: honest residuals, so that the first
        # batches after the warm-up are judged (outlier, change of speed) at the scale of its noise.
        unseen: list[float] = []
        for i, (_, (z, y)) in enumerate(kept):
            self._refit_from(kept[:i] + kept[i + 1 :])
            unseen.append(abs(y / _guess(self._fit, z) - 1))
        self._refit_from(kept)
        self._residuals.clear()
        self._residuals.extend(unseen)
        self._recent.clear()
        self._refit(fit.samples, fit.shifts, dropped, fit.updated_at or 0.0)

    def _refit_from(self, batches: list[tuple[int, _Batch]]) -> list[float]:
        """Refit from scratch on warm-up batches (numbered by arrival); their relative errors."""
        for rounds in range(2):  # weigh by observed, then by predicted durations
            self._discount(0.0)
            for number, (z, y) in batches:
                ref = _guess(self._fit, z) if rounds else _reference(y)
                self._add(z, y, self._decay ** (self._warmup - 1 - number) / ref**2, 1 / ref**2)
            self._refit(0, self._fit.shifts, 0, 0.0)
        return [abs(y / _guess(self._fit, z) - 1) for _, (z, y) in batches]

    def _discount(self, factor: float, ratio: float = 1.0) -> None:
        """Scale the evidence by ``factor``; with ``ratio``, as if every duration had been ``ratio`` times longer."""
        self._count *= factor
        self._weight *= factor / ratio**2  # relative weights: 1 / duration**2
        self._g = [v * factor / ratio for v in self._g]
        self._a = [[v * factor / ratio**2 for v in row] for row in self._a]

    def _add(self, z: tuple[float, ...], y: float, weight: float, precision: float) -> None:
        """Add one batch at ``weight`` (``precision`` for a fully trusted one)."""
        self._count += weight / precision
        self._weight += weight
        for i in range(4):
            self._g[i] += weight * z[i] * y
            for j in range(4):
                self._a[i][j] += weight * z[i] * z[j]

    def _leverage(self, z: tuple[float, ...], precision: float) -> float:
        """``w z^T A^-1 z``: the fit's own variance at ``z``, in units of the noise."""
        active, d, m = self._scaled
        zs = [z[j] * d[p] for p, j in enumerate(active)]
        return max(0.0, precision * sum(a * b for a, b in zip(zs, gauss(m, zs), strict=True))) if active else 0.0

    def _refit(self, samples: int, shifts: int, outliers: int, now: float) -> None:
        a, g = self._a, self._g
        prior = [0.0] * 4  # duration proportional to cost, or to size when every cost is 0
        feature = 2 if a[0][2] > 0 else 1
        prior[feature] = g[0] / a[0][feature] if a[0][feature] > 0 else 0.0
        active, d, m, coef = ridge_nonnegative(a, g, prior)
        beta = [0.0] * 4 if active else prior
        for p, j in enumerate(active):
            beta[j] = coef[p]
        self._scaled = (active, d, m)
        self._fit = DurationFit(
            intercept_s=beta[0],
            per_record_s=beta[1],
            per_cost_s=beta[2],
            per_cost_squared_s=beta[3],
            samples=samples,
            effective_samples=self._count,
            fit_error=1.4826 * median(list(self._residuals)),
            ready=samples >= self._warmup,
            shifts=shifts,
            outliers=outliers,
            updated_at=now,
        )
