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

How slow a batch is planned, and the predictions behind every rule, are in
``_predict.py``.

*Warm-up.*  Until the first batch the model knows nothing: no cap, nothing
refused or dropped, and a wait closes half the target before the oldest
record's due time at the latest (past its deadline the record would fail
unprocessed, ``_overrun.py``, and the model would never learn).  From the
first batch predictions cap batches and drop late records; admission waits
until the model is ``ready`` (8 batches).
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

import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._durations import DurationFit, DurationModel
from ._pending import Limit, Record
from ._plan import Admission, Plan
from ._predict import Ends, Predictions

if TYPE_CHECKING:
    from ._core import Batch, Core
    from ._settings import Settings


class LatencyTarget(Predictions, Admission):
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
        self._running: dict[Batch, Ends] = {}
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
        low, high = i, len(recs) - 1
        if low >= high:
            return i
        fits = self._fits_all(recs, i, start) or self._fits_limited(recs, start)
        if not fits(high):
            return i
        while low < high:
            middle = (low + high) // 2
            if fits(middle):
                high = middle
            else:
                low = middle + 1
        return low

    def _fits_all(self, recs: list[Record[Any]], i: int, start: float) -> Callable[[int], bool] | None:
        """``_shed``'s test when the hard limits leave ``recs[i:]`` whole (so every ``recs[j:]``): O(1) a test.

        The uncapped batch from ``j`` is then all of ``recs[j:]``, and sums
        from the end give its cost and its earliest due time.  Under a target
        this is the usual case (time limits a batch before its budget does).
        (Noisy overload bench, 2x, real clock: ``_shed`` from 0.18 to 0.07 ms
        a call, and the target's part of a batch hand-over from 0.25 to 0.19
        ms.)  None if the limits cut ``recs[i:]``, or might.
        """
        total = largest = 0
        due = math.inf
        suffix: list[tuple[int, int, float]] = [(0, 0, 0.0)] * len(recs)
        for j in range(len(recs) - 1, i - 1, -1):
            rec = recs[j]
            total += rec.cost
            largest = max(largest, rec.cost)
            due = min(due, rec.due)
            suffix[j] = (total, largest, due)
        n = len(recs) - i
        if n > self._max_size or self._counted(n, total, largest) >= self._budget:
            return None  # (at the budget exactly, records of cost 0 could end a batch early)

        def fits(j: int) -> bool:
            total, largest, due = suffix[j]
            n = len(recs) - j
            return start + self.duration(n, self._counted(n, total, largest)) <= due

        return fits

    def _fits_limited(self, recs: list[Record[Any]], start: float) -> Callable[[int], bool]:
        """``_shed``'s test in general: the uncapped batch from ``j``, walked within the hard limits."""

        def fits(j: int) -> bool:
            n, counted, _, due = self._batch(recs, j, start, capped=False)
            return start + self.duration(n, counted) <= due

        return fits

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
