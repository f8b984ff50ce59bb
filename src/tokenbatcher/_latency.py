"""Latency targets: when a batch leaves, how large it is, and which records are let in.

With ``latency_target_s`` set, each record is *due* its target after its
submit (or its own ``timeout_s`` after, if that is shorter).  The duration
model (``_durations.py``, fed after every successful batch by
``_processing.py``) predicts how long ``process_fn`` takes for a batch of
``n`` records of counted cost ``c``; [LatencyTarget][] turns those
predictions into four rules, which both dispatch strategies consult:

* **How much** (``take``): a batch starting at ``start`` is the longest prefix
  of the queue predicted to finish by the earliest due time among its records,
  within the hard limits (``target_batch_cost``, ``max_batch_size``; the
  target only ever tightens them).  Its first record is always taken.  With
  ``grouping="similar_cost"`` the batch is taken by cost, within the
  prefix's size and counted cost (any such batch is predicted no slower); a
  padded prefix is then counted as padded as recent batches were, not as
  padded as its mixed costs would be in one tensor.
* **When** (``hold``): the strategies still take at once when a slot is free
  (``"eager"``: work-conserving, the target is a ceiling and never a wait);
  a window, or eager's wait for ``min_batch_size``, closes early once the
  queue holds as many records as the target allows, or at the latest moment
  the queued batch can start and still finish in time.
* **Who** (``admit``, in ``_plan.py``): a record is refused with
  [OverloadedError][tokenbatcher.OverloadedError] if the batches the queue
  will make, as rule 1 forms them, end its own after its due time.
* **Giving up early** (``take``, ``trim``): a record at the head of the queue,
  or in a sealed batch about to start, that can no longer finish by its due
  time fails with ``TimeoutError`` instead of being processed late -- if it
  could have made it when it was submitted (its wait made it late).  And when
  the target would cut the next batch short, the oldest records are shed, as
  BentoML sheds: while the batch the queue makes within its hard limits is
  predicted to end after the oldest one's due time.  Under overload a full
  batch of later records serves more than a short batch of old ones, and the
  short batch would leave the next one shorter still.

A keyed batcher's next batch is one key's: rule 1 looks at the records of the
key that goes next (``in_order(next_only=True)``), and the cap applies to
that key's batch.

A batch is planned as slow as one batch in twenty runs: the model's
prediction times the 95th percentile (``QUANTILE``) of recent batches'
durations over their predictions (``DurationModel.ratio_quantile``), once 16
batches ran after the warm-up; before, times ``1 + MARGIN * fit_error`` (the
model's typical relative error).  A record is late only if its own batch
overruns (the ones queued behind a slow batch are given up on, not served
late), so the mean's margin leaves the slower batches to make their oldest
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

*Warm-up.*  Until the first batch the model knows nothing: no cap, nothing
refused or dropped, and a wait closes half the target before the oldest
record's due time at the latest (past its deadline the record would fail
unprocessed, ``_overrun.py``, and the model would never learn).  From the first batch predictions cap batches and drop
late records; admission waits until the model is ``ready`` (8 batches).
*Staying alive.*  A batcher that is idle (nothing queued or running) admits
any record, even one predicted too slow for its deadline, and records that
were predicted too slow from the start are run rather than dropped: so a
model that has become too pessimistic (the GPU was shared, and is not any
more) keeps seeing batches, and learns.

Owns: the target's decisions.  Must not touch: how a batch is run, or the
queue's order.
"""

# A policy is the engine's friend, as a strategy is: it reads the shared state of Core directly.
# pyright: reportPrivateUsage=false

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._durations import DurationFit, DurationModel
from ._pending import Limit, Record
from ._plan import GUARD, Admission, Plan

if TYPE_CHECKING:
    from ._core import Batch, Core
    from ._settings import Settings

MARGIN = 0.5
"""Predicted durations are multiplied by ``1 + MARGIN * fit_error`` (at most ``1 + MAX_MARGIN``)."""
MAX_MARGIN = 1.0
QUANTILE = 0.95
"""Once ``QUANTILE_BATCHES`` batches ran after the warm-up, predictions are the model's times this quantile
of its recent batches' durations over their predictions: planned as slow as one batch in twenty runs."""
QUANTILE_BATCHES = 16
RUNNING_QUANTILE = 0.5
"""A batch already running is planned to end at the model's prediction times this quantile of the same ratios."""
PACKING_ALPHA = 0.2
"""Weight of the last batch in the running mean of how padded ``similar_cost`` batches are."""


def _scaled(fit: DurationFit, scale: float) -> DurationFit:
    """``fit``'s coefficients times ``scale``."""
    return DurationFit(
        intercept_s=fit.intercept_s * scale,
        per_record_s=fit.per_record_s * scale,
        per_cost_s=fit.per_cost_s * scale,
        per_cost_squared_s=fit.per_cost_squared_s * scale,
    )


class LatencyTarget(Admission):
    """The latency-target policy of one batcher (see the module docstring; admission is in ``_plan.py``).

    Args:
        batcher: The batcher whose queue, strategy and settings it reads.
        model: The duration model the batcher feeds.
        expire: Fails one record that can no longer make its deadline.
    """

    def __init__(self, batcher: Core[Any, Any], model: DurationModel, expire: Callable[[Record[Any]], None]) -> None:
        self._b = batcher
        self.model = model
        self._expire = expire
        self.reconfigure(batcher._settings)
        self._packing = 1.0
        """Padded and ``similar_cost``: recent batches' counted cost over their summed cost (>= 1)."""
        self._per_record_cost = 0.0
        """Running mean of recent batches' counted cost per record."""
        self._running: dict[Batch, float] = {}
        """Batches inside ``process_fn``, and when each is predicted to end."""
        self._scaled = DurationFit()
        """The model's fit with the safety margin applied."""
        self._running_fit = DurationFit()
        """The model's fit as slow as a typical batch runs: when a running batch is planned to end."""
        self._known = self._ready = False
        self._plan: Plan | None = None
        """None when it must be rebuilt."""
        self.predicted_wait_s = 0.0
        """Seconds from submit to result predicted for the last record submitted."""
        self._learn()

    def reconfigure(self, settings: Settings) -> None:
        """Adopt the target and the limits of ``settings`` (``configure``): from the next decision on."""
        assert settings.latency_target_s is not None
        self.target_s = settings.latency_target_s
        self._slots = settings.max_concurrent_batches
        self._budget, self._max_size = settings.target_batch_cost, settings.max_batch_size
        self._padded = settings.batch_cost == "padded"
        self._similar = settings.grouping == "similar_cost"
        self._plan = None

    def limit(self, budget: int, max_size: int) -> None:
        """Form batches within these limits (the tuner's, under the settings' ceilings) from now on."""
        self._budget, self._max_size = budget, max_size
        self._plan = None

    # ------------------------------------------------------------------ predictions

    def _learn(self) -> None:
        """Adopt the model's current fit."""
        fit = self.model.fit
        mean = 1.0 + min(MARGIN * fit.fit_error, MAX_MARGIN)
        slow = self.model.ratio_quantile(QUANTILE, QUANTILE_BATCHES)
        self._scaled = _scaled(fit, mean if slow is None else min(max(slow, 1.0), 1.0 + MAX_MARGIN))
        typical = self.model.ratio_quantile(RUNNING_QUANTILE, QUANTILE_BATCHES)
        self._running_fit = self._scaled if typical is None else _scaled(fit, min(max(typical, 1.0), 1.0 + MAX_MARGIN))
        self._known, self._ready = fit.samples > 0, fit.ready
        self._plan = None

    def duration(self, n: int, counted: float) -> float:
        """Predicted seconds for ``n`` records of counted cost ``counted``, with the safety margin."""
        fit = self._scaled
        return fit.intercept_s + fit.per_record_s * n + (fit.per_cost_s + fit.per_cost_squared_s * counted) * counted

    def span(self, timeout_s: float | None) -> float:
        """Seconds from submit to due: the target, or ``timeout_s`` if shorter; less the guard."""
        span = self.target_s if timeout_s is None or timeout_s > self.target_s else timeout_s
        return span * (1.0 - GUARD)

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

    def _free_times(self, now: float) -> list[float]:
        """When each slot is predicted free for a new batch, sorted: running batches, then held ones."""
        free = [now] * (self._slots - len(self._running))
        free += [max(now, end) for end in self._running.values()]
        heapq.heapify(free)
        for batch in self._b._strategy.held():
            live = [rec for rec in batch.records if not rec.done()]
            if live:
                heapq.heapreplace(free, free[0] + self._of(live))
        return sorted(free)

    def started(self, batch: Batch, n: int, total: int, counted: int, now: float) -> None:
        """A batch of ``n`` records, costing ``total`` (summed) and ``counted``, entered ``process_fn``."""
        self._running[batch] = now + self._running_fit.predict(n, counted)
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

    # ------------------------------------------------------------------ how much, and when

    def _batch(self, recs: list[Record[Any]], i: int, start: float, capped: bool) -> tuple[int, int, bool, float]:
        """The batch taken from ``recs[i:]`` at ``start``: ``(records, counted cost, bound by the target, due)``.

        Within the hard limits, and with ``capped`` also the longest prefix
        predicted to finish by the earliest due time among its records.
        """
        n = total = largest = counted = 0
        due = math.inf
        for rec in itertools.islice(recs, i, None):
            n1, total1, largest1 = n + 1, total + rec.cost, max(largest, rec.cost)
            counted1 = self._counted(n1, total1, largest1)
            due1 = min(due, rec.due)
            if n and counted1 > self._budget:
                break
            if n and capped and start + self.duration(n1, counted1) > due1:
                return n, counted, self._known, due
            n, total, largest, counted, due = n1, total1, largest1, counted1, due1
            if n >= self._max_size or counted >= self._budget:
                break
        return n, counted, False, due

    def _first(self, start: float, drop: bool) -> tuple[int, int, bool, float]:
        """The batch rule 1 takes at ``start``: ``(records, counted cost, bound by the target, due time)``.

        With ``drop``, the heads it gives up on are failed first (see ``_shed``).
        """
        recs = list(itertools.islice(self._b._pending.in_order(next_only=True), 2 * self._max_size + 1))
        i = 0
        while drop and i < len(recs) and self._late(recs[i], start):
            i += 1
        n, counted, bound, due = self._batch(recs, i, start, capped=True)
        if drop and bound and self._ready:
            j = self._shed(recs, i, start)
            if j > i:
                i = j
                n, counted, bound, due = self._batch(recs, i, start, capped=True)
        for rec in recs[:i]:
            self._expire(rec)
        return n, counted, bound, due

    def _shed(self, recs: list[Record[Any]], i: int, start: float) -> int:
        """Where the batch should begin so that it is a full one, as BentoML sheds: past the heads that would shrink it.

        The first ``j >= i`` whose uncapped batch (the queue's hard limits) is
        predicted to finish by its due time (binary search: later heads are due
        later, and their batches are no larger); ``i`` if there is none.
        """

        def fits(j: int) -> bool:
            n, counted, _, due = self._batch(recs, j, start, capped=False)
            return start + self.duration(n, counted) <= due

        low, high = i, len(recs) - 1
        if low >= high or not fits(high):
            return i
        while low < high:
            middle = (low + high) // 2
            if fits(middle):
                high = middle
            else:
                low = middle + 1
        return low

    def take(self, now: float) -> tuple[list[Record[Any]], Limit | None, bool]:
        """Take the next batch at ``now`` under the target: ``(records, limit, bound by the target)``."""
        start = self._free_times(now)[0]
        n, counted, bound, _ = self._first(start, drop=True)
        self._plan = None
        if not n:
            return [], None, False
        records, limit = self._b._pending.take(max_size=n, budget=counted) if bound else self._b._pending.take()
        return records, limit, bound

    def hold(self, now: float, need: int, close_at: float) -> tuple[int, float]:
        """Tighten a strategy's wait: wake at ``need`` queued records or at ``close_at``, whichever first.

        The batch is as large as it can be when the queue reaches what the
        target allows (records arriving at the queued ones' cost per record),
        and must close by the latest moment the queued batch can start and
        still finish in time.
        """
        start = self._free_times(now)[0]
        n, counted, bound, due = self._first(start, drop=False)
        if not n:
            return need, close_at
        if not self._known:  # nothing to predict from: leave the batch half the target to run in
            return need, max(now, min(close_at, due - self.target_s / 2))
        if bound:
            return need, now  # the queue holds all the target allows: close now
        # Look again halfway to what the target allows now (it shrinks as time passes).
        allowed = self._scaled.largest_batch(max(0.0, due - start), counted / n, self._max_size)
        queued = self._b._pending.size
        need = min(need, queued + max(1, (allowed - queued) // 2))
        return need, max(now, min(close_at, due - self.duration(n, counted)))

    def trim(self, records: Sequence[Record[Any]], now: float) -> None:
        """A sealed batch starts at ``now``: fail the records that waiting made late, earliest due first."""
        live = sorted((rec for rec in records if not rec.done()), key=lambda rec: rec.due)
        while live:
            first = live[0]
            if now + self._of(live) <= first.due or not self._feasible(first):
                return
            self._expire(first)
            live.pop(0)
