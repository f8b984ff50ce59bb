"""Choosing the batch limits that give the most records per second.

The user's ``target_batch_cost`` and ``max_batch_size`` are ceilings; the tuner
divides them by factors on a log grid (``step`` apart), each factor an *arm*.
While every record costs 1 it scales both (the size is what binds), down to one
record; once a record costs more (tokens), only the budget, down to 1: a
record count scaled with it would close batches of short texts long before
their budget, and the budget is what groups and pads them.

*Evidence.*  An arm is judged by the records per second of the batches formed
under it, whatever closed them: that is the throughput it gives at the load
there is.  Per second of *work*, in fact: the records' own costs summed
(tokens, unpadded) over the duration, turned into records at the recent cost
per record.  A batch of long texts takes longer than one of short texts
without its arm being worse: dividing its work by its time cancels the mix,
and keeps what the arm does to it (padding, the model's cost per token).
Until the duration model is ready an arm's estimate is its measured rate;
then, the model's prediction for the batch the arm forms times the arm's speed
measured relative to the model (the nearest measured arm's, for one never
tried, whose batch is extrapolated at the recent work per record, padded as
the nearest measured arm's are).  A batch closed because a slot was free or
its window ran out is as large as the queue was: while most are, they tell
the *natural* batch, and an arm whose limits exceed it forms that batch too
(arms above it are one arm, and the climb skips them).

*Moves.*  It starts at a 64th of the ceilings (``START``) and climbs
down an arm every ``dwell`` batches until the model is ready (slow start:
small batches are cheap to learn from; on a model whose cost per record grows
with the batch one batch at the ceilings can take as long as dozens of small
ones).  Then it takes the largest batches within a tie of the best estimate
(a tie is the model's typical error on one batch, 2% to 5%), prefers the
largest reachable arm unless beaten by two ties (a flat curve goes to the
ceilings), and replaces its best arm only for ``MARGIN`` more.  Larger
batches than any measured are reachable ``GROWTH`` arms at a time and scored
as the largest measured one (the model's extrapolation there is a guess, and
those batches cost the most to try).  Untried neighbours of the best go next
(hill climbing, on the way it went while that does not lose), a neighbour is
probed every ``probe_every`` batches, measurements older than ``memory``
batches are forgotten, and all of them when the model detects a change of
speed.

*Latency target.*  Arms whose batch is predicted too slow are not chosen (the
smallest always may be), and every decision is clipped to the largest batch
predicted to finish in time, in records and in cost at the recent cost per
record; predicted duration grows with both, so nothing the decision allows is
predicted slower.  Before any batch is seen, that is one record.
"""

from __future__ import annotations

import math

from ._arms import SHAPE_ALPHA, Arm, ArmEstimate, Decision, TunerStats
from ._durations import DurationModel
from ._numbers import check_int

__all__ = ["ArmEstimate", "Decision", "ThroughputTuner", "TunerStats"]

TIE, TIE_MAX = 0.02, 0.05  # bounds of a tie: a relative difference in records/s taken for noise
MARGIN = 0.03  # the gain that replaces the best arm
GROWTH = 2  # arms beyond the largest measured one that a move may reach (a factor of 2 in batch size)
START = 64.0  # the first decision: the ceilings divided by this
NATURAL_ALPHA = 0.2  # weight of a new batch in the share of natural batches
NATURAL = frozenset({"free_slot", "timeout"})  # closed with all the queue offered (within the limits)


class ThroughputTuner:
    """Learns the budget with the most records per second (see the module docstring).

    Args:
        model: The duration model; the caller feeds it every batch, before ``observe``.
        target_batch_cost: The budget ceiling.
        max_batch_size: The record ceiling.
        latency_target_s: If set, the longest a batch may be predicted to take.
        step: Ratio between neighbouring arms (> 1).
        dwell: Batches on an arm before comparing it.
        probe_every: Batches at the best arm between probes of a neighbour.
        memory: Batches after which a measurement is forgotten.

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
        memory: int = 400,
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
        self._ceilings, self._step = (target_batch_cost, max_batch_size), step
        self._costed = False  # a record has cost more than 1: the budget alone scales
        self._limits = self._grid(costed=False)
        self._arms = [Arm() for _ in self._limits]
        self._natural = Arm()  # the batches the queue offered (closed by a free slot or the window)
        self._natural_share = 0.0  # running share of such batches: the natural batch counts while most are
        start = min(len(self._limits) - 1, round(math.log(START) / math.log(step)))
        self._current: int = start  # the arm the next batch uses
        self._best: int = start  # the arm with the best estimate
        self._way = 1  # the way the climb goes once the model is ready: -1 to larger batches, +1 to smaller
        self._on_arm = self._steps = self._switches = 0
        self._shifts = model.fit.shifts
        self._per_record = 0.0  # running average of counted cost per record, over every batch
        self._work_per_record = 0.0  # and of the records' own cost

    def decide(self) -> Decision:
        """The limits for the next batch (no side effects; call it before forming each batch)."""
        return Decision(*self._capped(self._current), self._current, self._current != self._best)

    def observe(
        self,
        decision: Decision,
        *,
        size: int,
        cost: float,
        duration_s: float,
        now: float,
        reason: str,
        work: float | None = None,
    ) -> None:
        """Learn from one finished batch formed under ``decision``.

        Args:
            decision: What ``decide`` returned when the batch was formed.
            size: Records in the batch.
            cost: Its counted cost (padded or sum).
            duration_s: Seconds ``process_fn`` took.
            now: The caller's clock (``loop.time()``); unused today, kept so every learner is fed alike.
            reason: Why the batch was closed (``"free_slot"`` and ``"timeout"``: all the queue offered).
            work: The records' own costs, summed (the counted cost unless padded).
        """
        del now
        check_int(size, "size", 1)
        work = cost if work is None else work
        if cost > size and not self._costed:
            self._costed = True
            self._limits = self._grid(costed=True)  # records with costs: from now on the budget alone scales
            self._arms = [Arm() for _ in self._limits]
            self._current = self._best = min(self._current, len(self._limits) - 1)
        first = not self._steps
        self._per_record = _average(self._per_record, cost / size, first)
        self._work_per_record = _average(self._work_per_record, work / size, first)
        if self._model.fit.shifts != self._shifts:  # the speed changed: old measurements mislead
            self._shifts = self._model.fit.shifts
            self._arms = [Arm() for _ in self._limits]
        self._steps += 1
        natural = reason in NATURAL
        self._natural_share += NATURAL_ALPHA * (natural - self._natural_share)
        if natural:
            self._natural.add(size, cost, work, duration_s, None, self._steps)
        if not 0 <= decision.arm < len(self._arms):
            return
        fit = self._model.fit
        predicted = fit.predict(size, cost) if fit.ready else None
        self._arms[decision.arm].add(size, cost, work, duration_s, predicted, self._steps)
        if decision.arm == self._current:
            self._on_arm += 1
            if self._on_arm >= self._dwell:
                self._move()

    def _move(self) -> None:
        """Compare the arms and pick the next one."""
        for k, arm in enumerate(self._arms):
            if arm.batches and self._steps - arm.last > self._memory:
                self._arms[k] = Arm()
        scores, current = self._scores(), self._current
        if not self._model.fit.ready:  # slow start: smaller batches, one arm at a time, until the model can judge
            self._best = target = min(current + 1, len(self._limits) - 1)
            if target != current:
                self._current, self._on_arm, self._switches = target, 0, self._switches + 1
            return
        best = self._choose(scores)
        if best != _largest(scores) and current == self._best and scores[best] <= scores[current] * (1 + MARGIN):
            best = current  # not enough better to leave the best (ties go to the largest batches, no margin)
        self._best = target = best
        if scores[current] >= scores[best] * (1 - self._tie()):
            for way in (self._way, -self._way):  # hill climbing: on the way it went while that does not lose
                k = best - 1 if way < 0 else self._below(best)
                if 0 <= k < len(self._arms) and not self._arms[k].batches:
                    target, self._way = k, way
                    break
        if target == best == current and self._on_arm >= self._probe_every:
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
        per_work = 1 / max(self._work_per_record, 1e-12)  # records per unit of work, at the recent mix
        for k, arm in enumerate(arms):
            if not fit.ready or not measured:
                scores[k] = arm.work / max(arm.seconds, 1e-12) * per_work if arm.batches else -math.inf
                continue
            near = arms[min(measured, key=lambda j: abs(j - k))]
            records, cost, work = self._batch_at(k, near)
            predicted = fit.predict(records, cost)
            if self._target is None or predicted <= self._target or k == len(arms) - 1:
                scores[k] = work / max(predicted, 1e-12) * near.calibration() * per_work
        largest = measured[0] if measured else len(arms) - 1
        for k in range(largest):  # larger than any batch measured: the model's extrapolation is a guess
            reachable = k >= largest - GROWTH and scores[k] > -math.inf
            scores[k] = max(scores[k], scores[largest]) if reachable else -math.inf  # not worse, a step at a time
        return scores

    def _batch_at(self, k: int, near: Arm) -> tuple[float, float, float]:
        """(records, cost, work) of arm ``k``'s batches: as measured, else extrapolated.

        An arm never measured forms batches of the recent work per record, padded as the nearest
        measured arm ``near``'s are (cost / work): a larger batch may pad more, so it is not assumed
        to pad less.
        """
        arm = self._arms[k]
        if arm.batches:
            return arm.records, arm.cost, arm.work
        padding = near.cost / near.work if near.work > 0 else 1.0
        per_record = self._work_per_record * padding if self._work_per_record > 0 else self._per_record
        budget, size = self._limits[k]
        records = min(float(size), budget / per_record if per_record > 0 else math.inf)
        if self._natural_share >= 0.5:  # limits above the natural batch form that batch
            records = min(records, self._natural.records)
        records = max(1.0, records)
        return records, records * per_record, records * per_record / padding

    def _below(self, k: int) -> int:
        """The next arm below ``k`` whose batches differ from ``k``'s: arms above the natural batch are one."""
        j, natural = k + 1, self._natural
        if self._natural_share >= 0.5:
            last = len(self._limits) - 1
            while j < last and self._limits[j][0] >= natural.cost and self._limits[j][1] >= natural.records:
                j += 1
        return j

    def _choose(self, scores: list[float]) -> int:
        """The best arm: the largest reachable unless beaten by two ties, else the largest within half a tie."""
        tie = self._tie()
        top = max(scores)
        largest = _largest(scores)
        if scores[largest] >= top * (1 - 2 * tie):
            return largest
        return next((k for k, score in enumerate(scores) if score >= top * (1 - tie / 2)), largest)

    def _grid(self, *, costed: bool) -> list[tuple[int, int]]:
        """The arms' (budget, max_size): both scaled down to one record, or (``costed``) the budget alone."""
        budget, size = self._ceilings
        count = 1 + math.ceil(math.log(budget if costed else size) / math.log(self._step) - 1e-9)
        factors = [self._step**k for k in range(count)]
        return [(max(1, round(budget / f)), size if costed else max(1, round(size / f))) for f in factors]

    def _tie(self) -> float:
        """A relative difference in records/s taken for noise: the model's typical error, within bounds."""
        return min(max(self._model.fit.fit_error, TIE), TIE_MAX)

    def _probe(self) -> int:
        """A neighbour of the best arm to measure again: the one measured longest ago."""
        near = [k for k in (self._best - 1, self._below(self._best)) if 0 <= k < len(self._arms)]
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


def _largest(scores: list[float]) -> int:
    """The arm with the largest batches that may be chosen (a score above -inf)."""
    return next(k for k, score in enumerate(scores) if score > -math.inf)


def _average(mean: float, value: float, first: bool) -> float:
    """``mean`` moved toward ``value`` by ``SHAPE_ALPHA`` (``value`` itself on the first batch)."""
    return value if first else mean + SHAPE_ALPHA * (value - mean)
