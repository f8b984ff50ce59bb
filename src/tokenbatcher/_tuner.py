"""Choosing the batch limits that give the most records per second.

The user's ``target_batch_cost`` and ``max_batch_size`` are ceilings; the tuner
scales both by one factor from a log grid (``step`` apart) down to one record,
each factor an *arm* (both scale: a batch closes at whichever limit binds first,
the budget for tokens, the size for records of cost 1).

*Evidence.*  An arm is judged by records per second, ``n / duration``, of
batches its own limits closed (``"budget"``, ``"max_size"``); one closed because
a slot was free or its window ran out is as large as the queue was, not as the
arm allows.  (Every batch still teaches the duration model, which the caller
feeds.)  Until that model is ready an arm's estimate is its measured rate;
then, the model's prediction for the batch the arm forms times the arm's speed
measured relative to the model (the nearest measured arm's, for one never
tried): this cancels most of the noise a mix of cheap and costly records puts
into raw rates, and lets the model extrapolate.

*Moves.*  It starts at the ceilings.  After ``dwell`` limited batches on an arm
it takes the largest batches within a tie of the best estimate (a tie is the
model's typical error on one batch, 2% to 5%), leaves the ceilings only for a
gain of two ties (a flat curve stays there), and replaces its best arm only for
``MARGIN`` more.  Before the model is ready, the best arm's untried neighbours
go first (hill climbing).  It probes a neighbour of the best arm every
``probe_every`` limited batches, forgets measurements older than ``memory`` of
them, and all of them when the model detects a change of speed.

*Latency target.*  Arms whose batch is predicted too slow are not chosen (the
smallest always may be), and every decision is clipped to the largest batch
predicted to finish in time, in records and in cost at the recent cost per
record; predicted duration grows with both, so nothing the decision allows is
predicted slower.  Before any batch is seen, that is one record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._durations import DurationModel
from ._numbers import check_int

TIE, TIE_MAX = 0.02, 0.05  # bounds of a tie: a relative difference in records/s taken for noise
MARGIN = 0.03  # the gain that replaces the best arm
SHAPE_ALPHA = 0.1  # weight of a new batch in an arm's average batch (records, cost, seconds)
SPEED_ALPHA = 0.15  # and in its average speed relative to the duration model
PRIOR_BATCHES = 3.0  # batches' worth of trust in the model when calibrating an arm against it
LIMITED = frozenset({"budget", "max_size"})


@dataclass(frozen=True, slots=True)
class Decision:
    """The limits for the next batch."""

    budget: int
    """The cost budget (<= ``target_batch_cost``)."""
    max_size: int
    """The most records (<= ``max_batch_size``)."""
    arm: int
    """Its place on the grid (0: the ceilings); hand the decision back to ``observe``."""
    exploring: bool
    """True while trying an arm other than the best known."""


@dataclass(frozen=True, slots=True)
class ArmEstimate:
    """What the tuner knows about one arm."""

    budget: int
    """The arm's cost budget."""
    max_size: int
    """The arm's record cap."""
    records_per_s: float
    """Records per second measured on the batches its limits closed lately."""
    estimate: float
    """Records per second it is judged by (0.0 if over the latency target)."""
    batches: int
    """Batches measured since its evidence was last forgotten."""


@dataclass(frozen=True, slots=True)
class TunerStats:
    """An immutable snapshot of the throughput tuner."""

    budget: int
    """The best arm's cost budget (the one used when not exploring)."""
    max_size: int
    """The best arm's record cap."""
    exploring: bool
    """True while trying another arm."""
    limited_batches: int
    """Batches closed by the chosen limits (the ones that measure an arm)."""
    switches: int
    """Times the chosen arm changed."""
    target_cap: tuple[int, int] | None
    """The (budget, max_size) the latency target allows at most (None without a target)."""
    arms: tuple[ArmEstimate, ...]
    """The arms measured lately, largest batches first."""


class _Arm:
    """Running averages over the batches an arm's limits closed (plain means while few)."""

    __slots__ = ("batches", "checked", "cost", "last", "ratio", "records", "seconds")

    def __init__(self) -> None:
        self.batches = self.checked = self.last = 0
        self.records = self.cost = self.seconds = self.ratio = 0.0

    def add(self, size: int, cost: float, seconds: float, predicted: float | None, step: int) -> None:
        self.batches, self.last = self.batches + 1, step
        new = max(SHAPE_ALPHA, 1 / self.batches)
        self.records += new * (size - self.records)
        self.cost += new * (cost - self.cost)
        self.seconds += new * (seconds - self.seconds)
        if predicted is not None:  # the model's error on this batch, while it is ready
            self.checked += 1
            self.ratio += max(SPEED_ALPHA, 1 / self.checked) * (predicted / max(seconds, 1e-12) - self.ratio)

    def calibration(self) -> float:
        """How much faster the arm runs than the model predicts, shrunk toward 1 while checked little."""
        weight = min(self.checked, 2 / SPEED_ALPHA)
        return self.ratio ** (weight / (weight + PRIOR_BATCHES)) if self.checked else 1.0


class ThroughputTuner:
    """Learns the budget with the most records per second (see the module docstring).

    Args:
        model: The duration model; the caller feeds it every batch, before ``observe``.
        target_batch_cost: The budget ceiling.
        max_batch_size: The record ceiling.
        latency_target_s: If set, the longest a batch may be predicted to take.
        step: Ratio between neighbouring arms (> 1).
        dwell: Limited batches on an arm before comparing it.
        probe_every: Limited batches at the best arm between probes of a neighbour.
        memory: Limited batches after which an arm's measurement is forgotten.

    Raises:
        ValueError: A setting is out of range.
    """

    def __init__(
        self,
        model: DurationModel,
        *,
        target_batch_cost: int,
        max_batch_size: int,
        latency_target_s: float | None = None,
        step: float = math.sqrt(2.0),
        dwell: int = 2,
        probe_every: int = 10,
        memory: int = 60,
    ) -> None:
        ints = {"target_batch_cost": target_batch_cost, "max_batch_size": max_batch_size, "dwell": dwell}
        for name, value in {**ints, "probe_every": probe_every, "memory": memory}.items():
            check_int(value, name, 1)
        if latency_target_s is not None and not (0 < latency_target_s < math.inf):
            raise ValueError(f"latency_target_s must be a number > 0, got {latency_target_s!r}")
        if not (1 < step < math.inf):
            raise ValueError(f"step must be a number > 1, got {step!r}")
        self._model, self._target = model, latency_target_s
        self._dwell, self._probe_every, self._memory = dwell, probe_every, memory
        count = 1 + math.ceil(math.log(max_batch_size) / math.log(step) - 1e-9)
        self._limits = [
            (max(1, round(target_batch_cost / step**k)), max(1, round(max_batch_size / step**k))) for k in range(count)
        ]
        self._arms = [_Arm() for _ in self._limits]
        self._current: int = 0  # the arm the next batch uses
        self._best: int = 0  # the arm with the best estimate
        self._on_arm = self._steps = self._switches = 0
        self._shifts = model.fit.shifts
        self._per_record = 0.0  # running average of counted cost per record, over every batch

    def decide(self) -> Decision:
        """The limits for the next batch (no side effects; call it before forming each batch)."""
        return Decision(*self._capped(self._current), self._current, self._current != self._best)

    def observe(
        self, decision: Decision, *, size: int, cost: float, duration_s: float, now: float, reason: str
    ) -> None:
        """Learn from one finished batch formed under ``decision``.

        Args:
            decision: What ``decide`` returned when the batch was formed.
            size: Records in the batch.
            cost: Its counted cost (padded or sum).
            duration_s: Seconds ``process_fn`` took.
            now: The caller's clock (``loop.time()``); unused today, kept so every learner is fed alike.
            reason: Why the batch was closed; only ``"budget"`` and ``"max_size"`` measure an arm.
        """
        del now
        check_int(size, "size", 1)
        self._per_record += SHAPE_ALPHA * (cost / size - self._per_record) if self._per_record else cost / size
        if self._model.fit.shifts != self._shifts:  # the speed changed: old measurements mislead
            self._shifts = self._model.fit.shifts
            self._arms = [_Arm() for _ in self._limits]
        if reason not in LIMITED or not 0 <= decision.arm < len(self._arms):
            return
        self._steps += 1
        fit = self._model.fit
        predicted = fit.predict(size, cost) if fit.ready else None
        self._arms[decision.arm].add(size, cost, duration_s, predicted, self._steps)
        if decision.arm == self._current:
            self._on_arm += 1
            if self._on_arm >= self._dwell:
                self._move()

    def _move(self) -> None:
        """Compare the arms and pick the next one."""
        for k, arm in enumerate(self._arms):
            if arm.batches and self._steps - arm.last > self._memory:
                self._arms[k] = _Arm()
        scores, current = self._scores(), self._current
        best = self._choose(scores)
        if current == self._best and scores[best] <= scores[current] * (1 + MARGIN):
            best = current  # not enough better to leave the best
        self._best = target = best
        untried = [k for k in (best + 1, best - 1) if 0 <= k < len(self._arms) and not self._arms[k].batches]
        if untried and not self._model.fit.ready:
            target = untried[0]  # hill climbing until the model can judge arms never tried
        elif best == current and self._on_arm >= self._probe_every:
            target = self._probe()
        if target != current:
            self._current, self._on_arm, self._switches = target, 0, self._switches + 1

    def snapshot(self) -> TunerStats:
        """The tuner's state for stats (immutable)."""
        scores = self._scores()
        arms = tuple(
            ArmEstimate(b, s, a.records / a.seconds if a.seconds > 0 else 0.0, max(scores[k], 0.0), a.batches)
            for k, ((b, s), a) in enumerate(zip(self._limits, self._arms, strict=True))
            if a.batches
        )
        exploring = self._current != self._best
        return TunerStats(*self._capped(self._best), exploring, self._steps, self._switches, self._target_cap(), arms)

    def _scores(self) -> list[float]:
        """Each arm's estimated records per second (see the module docstring); -inf if unknown or too slow."""
        fit, arms = self._model.fit, self._arms
        measured = [k for k, arm in enumerate(arms) if arm.batches]
        scores = [-math.inf] * len(arms)
        for k, arm in enumerate(arms):
            if not fit.ready or not measured:
                scores[k] = arm.records / max(arm.seconds, 1e-12) if arm.batches else -math.inf
                continue
            near = arms[min(measured, key=lambda j: abs(j - k))]
            records, cost = self._batch_at(k, near)
            predicted = fit.predict(records, cost)
            if self._target is None or predicted <= self._target or k == len(arms) - 1:
                scores[k] = records / max(predicted, 1e-12) * near.calibration()
        return scores

    def _batch_at(self, k: int, near: _Arm) -> tuple[float, float]:
        """(records, cost) of arm ``k``'s batches: as measured, else at ``near``'s cost per record."""
        if near is self._arms[k]:
            return near.records, near.cost
        per_record = near.cost / near.records
        budget, size = self._limits[k]
        records = max(1.0, min(float(size), budget / per_record if per_record > 0 else math.inf))
        return records, records * per_record

    def _choose(self, scores: list[float]) -> int:
        """The best arm: the ceilings unless beaten by two ties, else the largest within half a tie."""
        tie = min(max(self._model.fit.fit_error, TIE), TIE_MAX)
        top = max(scores)
        if scores[0] >= top * (1 - 2 * tie):
            return 0
        return next((k for k, score in enumerate(scores) if score >= top * (1 - tie / 2)), 0)

    def _probe(self) -> int:
        """A neighbour of the best arm to measure again: the one measured longest ago."""
        near = [k for k in (self._best - 1, self._best + 1) if 0 <= k < len(self._arms)]
        return min(near, key=lambda k: self._arms[k].last) if near else self._best

    def _capped(self, k: int) -> tuple[int, int]:
        """Arm ``k``'s (budget, max_size), clipped to the latency target's cap."""
        budget, size = self._limits[k]
        cap = self._target_cap()
        return (budget, size) if cap is None else (min(budget, cap[0]), min(size, cap[1]))

    def _target_cap(self) -> tuple[int, int] | None:
        """(cost, records) of the largest batch predicted to finish within the latency target."""
        fit = self._model.fit
        if self._target is None:
            return None
        if not fit.samples:
            return 1, 1  # nothing known yet: one record
        records = max(1, fit.largest_batch(self._target, self._per_record, self._limits[0][1]))
        return max(1, math.floor(records * self._per_record)), records
