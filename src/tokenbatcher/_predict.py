"""The latency policy's predictions: how long a batch takes, as slow as it is planned, and when slots free up.

``LatencyTarget`` (``_latency.py``) decides with these; the duration model
(``_durations.py``) is fed by ``_processing.py`` after every successful batch,
and [Predictions][] adopts its fit (``_learn``) with a safety margin.

Under overload a batch is planned as slow as one batch in twenty runs: the
model's prediction times the 95th percentile (``QUANTILE``) of recent
batches' durations over their predictions (``DurationModel.ratio_quantile``),
once 16 batches ran after the warm-up; before, times ``1 + MARGIN *
fit_error`` (the model's typical relative error).  Near capacity (an offered
load up to ``LIGHT_LOAD`` = 1.2 times the records per second served within the
target, batches of the largest size a record can wait out and then ride in)
it is planned at the 60th percentile (``LIGHT_QUANTILE``), and in between
(up to ``HEAVY_LOAD`` = 2x) at a quantile linear in the load: under overload a
batch that ends late is replaced by a full one of later records, so smaller,
safer batches pay; near capacity there are no later records, and a batch
planned that slow refuses records (and sheds some) that would have made it.
(Noisy overload bench, virtual clock, 8 seeds: +6 and +58 records/s at 0.9x
and 1.2x, the same at 2x and 4x; the clean model's ratios are all 1.)

A record is late only if its own batch overruns (the ones queued behind a
slow batch are given up on, not served late), so the mean's margin leaves the slower batches to make their oldest
records late; the quantile leaves them room, at the price of smaller batches
on a noisy model.  For the same reason a batch already *running* is planned to
end as a typical one does (``RUNNING_QUANTILE``, the median ratio): if it
overruns, the records planned behind it are given up on when it ends.  Planning
its end at the slow quantile too counted the margin twice: it refused records
the next batch had room for, and the batch, starting earlier than planned, ran
with more margin than needed.  (On the noisy overload bench, virtual clock, 12
seeds: 1-3% more goodput at 0.9x-4x than the 90th percentile for both, as
many late records.)  Each due time is also moved ``GUARD`` of the target
earlier, for the event loop's own delays.

A running batch may also end early, and the batch after it then starts with
only the records that have arrived so far: on a noisy model under overload,
the batches after an early end were the smallest (a running batch 20% early,
a next batch about 30% smaller).  So each running batch also has an *early*
end, at the 25th percentile of the same ratios (``EARLY_QUANTILE``, relative
to the median), and admission lets the next batch's records in for a start
that early (``_plan.py``).  On the clean model the ratios are all 1, and the
early end is the typical one.  (Noisy overload bench, real clock, 4 seeds of
12 s, paired: 1.0-1.3% more goodput at 0.9x-4x, batches 7-14% larger from
1.2x on, and 1.5x the shed records; virtual clock, 8 seeds: +1.7% and +2.1%
at 2x and 4x, and the 10th percentile only a little more, for more shed.)

Owns: the predictions and the state they come from (the running batches, the
margin).  Must not touch: the decisions made with them.
"""

# A policy is the engine's friend, as a strategy is: it reads the shared state of Core directly.
# pyright: reportPrivateUsage=false

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from ._durations import DurationFit, DurationModel
from ._pending import Record
from ._plan import GUARD, Plan

if TYPE_CHECKING:
    from ._core import Batch, Core

MARGIN = 0.5
"""Predicted durations are multiplied by ``1 + MARGIN * fit_error`` (at most ``1 + MAX_MARGIN``)."""
MAX_MARGIN = 1.0
QUANTILE = 0.95
"""Once ``QUANTILE_BATCHES`` batches ran after the warm-up, predictions are the model's times this quantile
of its recent batches' durations over their predictions: planned as slow as one batch in twenty runs."""
QUANTILE_BATCHES = 16
LIGHT_QUANTILE = 0.6
RUNNING_QUANTILE = 0.5
"""A batch already running is planned to end at the model's prediction times this quantile of the same ratios."""
EARLY_QUANTILE = 0.25
"""And it may end as early as this quantile of them: the next batch's records are let in for that start."""
LIGHT_LOAD, HEAVY_LOAD = 1.2, 2.0
"""Offered load (arrivals over the most records served within the target) up to which batches are planned at
``LIGHT_QUANTILE``, and from which at ``QUANTILE``; linear in between."""
PACKING_ALPHA = 0.2
"""Weight of the last batch in the running mean of how padded ``similar_cost`` batches are."""


class Ends(NamedTuple):
    """When a running batch is predicted to end."""

    typical: float
    """As the median batch does (``RUNNING_QUANTILE``)."""
    early: float
    """As an early one does (``EARLY_QUANTILE``)."""


def _scaled(fit: DurationFit, scale: float) -> DurationFit:
    """``fit``'s coefficients times ``scale``."""
    return DurationFit(
        intercept_s=fit.intercept_s * scale,
        per_record_s=fit.per_record_s * scale,
        per_cost_s=fit.per_cost_s * scale,
        per_cost_squared_s=fit.per_cost_squared_s * scale,
    )


class Predictions:
    """The predictions half of ``LatencyTarget`` (``_latency.py``), mixed into it."""

    _b: Core[Any, Any]
    model: DurationModel
    target_s: float
    _slots: int
    _max_size: int
    _padded: bool
    _similar: bool
    _packing: float
    _per_record_cost: float
    _running: dict[Batch, Ends]
    _scaled: DurationFit
    _running_fit: DurationFit
    _early: float
    """An early end of a running batch over its typical end, both from its start (<= 1)."""
    _known: bool
    _ready: bool
    _plan: Plan | None
    _gap: float

    def _quantile(self) -> float:
        """The planning quantile at the offered load: ``QUANTILE`` under overload, ``LIGHT_QUANTILE`` near capacity."""
        fit = self.model.fit
        per_record = self._per_record_cost
        n = fit.largest_batch(self.target_s * (1.0 - GUARD) / 2, per_record, self._max_size)  # wait one, ride one
        seconds = fit.predict(n, n * per_record)
        if not n or seconds <= 0 or math.isinf(self._gap) or self._gap <= 0:
            return QUANTILE
        load = seconds / (n * self._slots * self._gap)  # arrivals per second over records served per second
        share = min(1.0, max(0.0, (load - LIGHT_LOAD) / (HEAVY_LOAD - LIGHT_LOAD)))
        return LIGHT_QUANTILE + (QUANTILE - LIGHT_QUANTILE) * share

    def _learn(self) -> None:
        """Adopt the model's current fit."""
        fit = self.model.fit
        mean = 1.0 + min(MARGIN * fit.fit_error, MAX_MARGIN)
        slow = self.model.ratio_quantile(self._quantile(), QUANTILE_BATCHES)
        self._scaled = _scaled(fit, mean if slow is None else min(max(slow, 1.0), 1.0 + MAX_MARGIN))
        typical = self.model.ratio_quantile(RUNNING_QUANTILE, QUANTILE_BATCHES)
        self._running_fit = self._scaled if typical is None else _scaled(fit, min(max(typical, 1.0), 1.0 + MAX_MARGIN))
        early = self.model.ratio_quantile(EARLY_QUANTILE, QUANTILE_BATCHES)
        self._early = 1.0 if early is None or typical is None or typical <= 0 else min(early / typical, 1.0)
        self._known, self._ready = fit.samples > 0, fit.ready
        self._plan = None

    def duration(self, n: int, counted: float) -> float:
        """Predicted seconds for ``n`` records of counted cost ``counted``, with the safety margin."""
        fit = self._scaled
        return fit.intercept_s + fit.per_record_s * n + (fit.per_cost_s + fit.per_cost_squared_s * counted) * counted

    def deadline_s(self, timeout_s: float | None) -> float:
        """Seconds from submit to a record's deadline: the target, or ``timeout_s`` if shorter."""
        return self.target_s if timeout_s is None or timeout_s > self.target_s else timeout_s

    def span(self, timeout_s: float | None) -> float:
        """Seconds from submit to due: the deadline, less the guard."""
        return self.deadline_s(timeout_s) * (1.0 - GUARD)

    def _counted(self, n: int, total: int, largest: int) -> int:
        """A batch's counted cost; padded, but grouped by similar cost, as padded as recent batches were."""
        if not self._padded:
            return total
        if self._similar:
            return min(n * largest, math.ceil(total * self._packing))
        return n * largest

    def _of(self, records: Sequence[Record[Any]]) -> float:
        """Predicted seconds for a batch of exactly these records (not empty)."""
        costs = [rec.cost for rec in records]
        return self.duration(len(costs), len(costs) * max(costs) if self._padded else sum(costs))

    def _feasible(self, rec: Record[Any]) -> bool:
        """Could ``rec`` make its due time when it was submitted (alone, at once)?  False while nothing is known.

        Only such records are given up on: one predicted too slow from the
        start runs, so a model that has grown too pessimistic keeps learning.
        """
        return self._known and rec.t + self.duration(1, rec.cost) <= rec.due

    def _late(self, rec: Record[Any], start: float) -> bool:
        """Has waiting made ``rec`` miss its due time, starting alone at ``start``?"""
        return start + self.duration(1, rec.cost) > rec.due and self._feasible(rec)

    # ------------------------------------------------------------------ the slots

    def _free_times(self, now: float, *, early: bool = False) -> list[float]:
        """When each slot is predicted free for a new batch, sorted: running batches, then held ones.

        A running batch ends as a typical one does, or with ``early`` as an early one does.
        """
        free = [now] * (self._slots - len(self._running))
        free += [max(now, ends.early if early else ends.typical) for ends in self._running.values()]
        heapq.heapify(free)
        for batch in self._b._strategy.held():
            live = [rec for rec in batch.records if not rec.done()]
            if live:
                heapq.heapreplace(free, free[0] + self._of(live))
        return sorted(free)

    def started(self, batch: Batch, n: int, total: int, counted: int, now: float) -> None:
        """A batch of ``n`` records, costing ``total`` (summed) and ``counted``, entered ``process_fn``."""
        seconds = self._running_fit.predict(n, counted)
        self._running[batch] = Ends(now + seconds, now + seconds * self._early)
        if self._similar and self._padded and total:
            self._packing += PACKING_ALPHA * (counted / total - self._packing)
        per_record = counted / n
        self._per_record_cost += (
            PACKING_ALPHA * (per_record - self._per_record_cost) if self._per_record_cost else per_record
        )
        self._plan = None

    def finished(self, batch: Batch, *, learned: bool) -> None:
        """A batch left ``process_fn``; ``learned``: the model has just been fed with it."""
        self._running.pop(batch, None)
        if learned:
            self._learn()
        self._plan = None

    def learned(self) -> None:
        """The model has been fed a batch that finished earlier."""
        self._learn()
