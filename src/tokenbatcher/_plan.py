"""Who is let in under a latency target: the plan of the queued records, and the refusal.

The plan lays the queued records out, in dispatch order, into the batches that
``_latency.py``'s rule 1 will form, one after another on the processing
slots, from when each slot is predicted free (running batches, and sealed
ones waiting for a slot, by their predicted durations).  A running batch
ends as a typical one does, or early (``_predict.py``), so each batch has two
starts, and the plan keeps both.  Only its last batch (``_Tail``) and the
other slots' free times are kept:

* a new record joins the last batch if that batch still fits the hard limits
  and, started early, is predicted to finish by every due time in it, the
  new one's included.  Started as typical, its oldest records are then shed
  (``_latency.py``), and a full batch of the later ones runs: after an early
  end the batch is as large as after a typical one, not as small as the
  records gathered by then would make it;
* else it starts a batch of its own: after the last one on the first free
  slot.  But not behind a batch the *target* closed, on the same slot: that
  batch would start late and be as small as its first record's slack.  Under
  load, later records make a larger batch there, so this one is refused
  until the last batch has started (``retry_after_s`` says when);
* if even its own batch ends after its due time, it is refused;
* and a record that would head a batch starting later (every slot busy) needs
  the slack that batch is likely to use: under overload, records arriving
  later fill it in time, and a larger batch than an early head's slack would
  allow serves more.  ``_batch_goal``: at the measured arrival rate, a batch
  of ``n`` gathers its records over ``n`` gaps and then runs, so the largest
  ``n`` whose gathering plus running fits the target gives the slack asked
  for, at the batch's early start.  The batch is planned as slow as
  ``_predict.py`` plans every batch, which is the model's noise accounted
  for.  (Asking less the noisier the model, as this rule once did, made
  smaller batches: on the noisy overload bench, virtual clock, 8 seeds of
  8 s, 1% less goodput at 2x and 4x, the same below.)

The plan is rebuilt from the queue (O(queue)) only after a batch was taken,
started or finished, or the model changed, or when a running batch, not
ended by its early end, has made the plan's last batch unable to end in time
even if it started now; in between,
each admission is O(1).  (Rebuilt, the plan leaves out the records that can
no longer make it, as ``take`` will: kept, that last batch refused every
arrival until the overrun ended, though the records arriving late in a long
overrun can still make their deadlines.  On the noisy overload bench, virtual
clock, 8 seeds: 1% more goodput at 0.9x-2x, the same at 4x.)  Records that
leave the queue early (cancelled, expired) stay in the plan until then: it
errs on the safe side.  With priorities or
``grouping="similar_cost"`` a record may overtake others; the plan still
places it last (also safe).  A keyed batcher's plan lays the keys out one
after another, in the order of their heads (``KeyedPending.in_order``), and a
record joins the last batch only if it has that batch's key; a new record whose
key has records earlier in the plan starts a batch of its own at the end
(safe again: it would join theirs, or go no later).  An idle batcher (nothing queued or running) lets
the first record of a call in whatever is predicted, so the model keeps
learning.

Owns: the admission decision.  The calls that ask for it are in ``_intake.py``.
"""

# The engine's friend, as a strategy is: it reads the shared state of Core directly.
# pyright: reportPrivateUsage=false

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from ._durations import DurationFit
from ._errors import OverloadedError
from ._keyed import group_of

if TYPE_CHECKING:
    from ._core import Batch, Core
    from ._predict import Ends

MIN_RETRY_S = 0.001
"""The least ``retry_after_s``: a batch overrunning its prediction leaves the plan behind time."""
GUARD = 0.05
"""Share of each record's deadline kept back for the event loop's own delays."""
GAP_ALPHA = 1 / 128
"""Weight of the newest gap in the running mean gap between arrivals."""


class _Tail(NamedTuple):
    """The plan's last batch."""

    start: float
    """When it starts, if the batch before it on its slot ends as a typical one does."""
    early: float
    """When it starts if that batch ends early (``_predict.py``): no later than ``start``."""
    n: int
    total: int
    largest: int
    due: float
    """The earliest due time among its records."""
    group: Hashable
    """Its records' batch key (None unkeyed): only records of that key may join it."""


class Plan(NamedTuple):
    """Where the queued records are predicted to run: the last planned batch, and the other slots' free times."""

    tail: _Tail | None
    free: tuple[float, ...]
    """Sorted; ``max_concurrent_batches`` entries without a tail, one fewer with one."""
    early: tuple[float, ...]
    """The same slots' free times if their batches end early."""


class Admission:
    """The admission half of ``LatencyTarget`` (``_latency.py``), mixed into it."""

    _b: Core[Any, Any]
    _budget: int
    _max_size: int
    _ready: bool
    _running: dict[Batch, Ends]
    _plan: Plan | None
    """None when it must be rebuilt."""
    predicted_wait_s: float
    """Seconds from submit to result predicted for the last record submitted."""
    _gap: float = math.inf
    """Running mean of the seconds between arrivals (refused ones too)."""
    _last_arrival: float | None = None
    _head_slack: float = 0.0
    """The slack a record needs to head a batch that starts later (``_batch_goal``, as of the last arrival)."""

    if TYPE_CHECKING:  # provided by LatencyTarget
        target_s: float
        _slots: int
        _scaled: DurationFit
        _per_record_cost: float

        def duration(self, n: int, counted: float) -> float: ...

        def _counted(self, n: int, total: int, largest: int) -> int: ...

        def _free_times(self, now: float, *, early: bool = False) -> list[float]: ...

    def _place(
        self, plan: Plan, cost: int, due: float, now: float, group: Hashable, *, new: bool
    ) -> tuple[Plan | None, float, float]:
        """Add a record of key ``group`` to ``plan``: ``(new plan, when its batch ends, seconds until it would fit)``.

        The plan is None when a ``new`` record is refused although its batch
        might end in time (see the module docstring).  The seconds until it
        would fit assume nothing else arrives meanwhile.
        """
        tail, free, early = plan
        alone = self.duration(1, cost)
        if tail is not None:
            start, soon = max(tail.start, now), max(tail.early, now)
            if tail.group is group or tail.group == group:
                n, total, largest = tail.n + 1, tail.total + cost, max(tail.largest, cost)
                counted = self._counted(n, total, largest)
                hard = n > self._max_size or counted > self._budget
                if not hard:
                    seconds = self.duration(n, counted)
                    first = min(due, tail.due)
                    if soon + seconds <= first:  # in time if the batch starts early; if not, its oldest are shed
                        end = start + seconds if start + seconds <= due else soon + seconds
                        joined = _Tail(tail.start, tail.early, n, total, largest, first, group)
                        return Plan(joined, free, early), end, 0.0
            else:
                hard = True  # another key's batch: this record cannot join it, whatever the target
            seconds = self.duration(tail.n, self._counted(tail.n, tail.total, tail.largest))
            ended = start + seconds
            if new and not hard and (not free or free[0] >= ended):
                # behind a batch the target closed: once that batch has started, as the head of the next
                wait = max(tail.start - now, self._head_slack - (due - ended), ended + alone - due)
                return None, ended + alone, wait
            free, early = tuple(sorted((*free, ended))), tuple(sorted((*early, soon + seconds)))
        start, soon = max(free[0], now), max(early[0], now)
        end = start + alone
        if new and start > now and due - soon < self._head_slack:
            return None, end, max(self._head_slack - (due - soon), end - due)
        return Plan(_Tail(start, soon, 1, cost, cost, due, group), free[1:], early[1:]), end, end - due

    def _current(self, now: float) -> Plan:
        """The plan of the queued records, rebuilt from the queue if something changed since."""
        plan = self._plan
        if plan is not None and plan.tail is not None:
            tail = plan.tail
            if max(tail.early, now) + self.duration(tail.n, self._counted(tail.n, tail.total, tail.largest)) > tail.due:
                plan = None  # a batch ran on: the last batch can no longer end in time, and is given up on
        if plan is None:
            plan = Plan(None, tuple(self._free_times(now)), tuple(self._free_times(now, early=True)))
            for rec in self._b._pending.in_order():
                placed, end, _ = self._place(plan, rec.cost, rec.due, now, group_of(rec), new=False)
                if placed is not None and end <= rec.due:  # else it is dropped when it reaches the head
                    plan = placed
            self._plan = plan
        return plan

    def admit(self, costs: Sequence[int], groups: Sequence[Hashable], span: float, now: float) -> Plan | None:
        """The plan with these records added, or raise [OverloadedError][] if one is refused.

        None while admission is off (warm-up).  Pass the result to ``commit``
        once the records are queued, with nothing in between.
        """
        self._arrived(len(costs), now)
        if not self._ready:
            return None
        self._head_slack = self._batch_goal()
        plan = self._current(now)
        idle = not self._running and not self._b._pending.size and not self._b._strategy.held()
        due = now + span
        for cost, group in zip(costs, groups, strict=True):
            placed, end, wait = self._place(plan, cost, due, now, group, new=True)
            self.predicted_wait_s = end - now
            if placed is None or (end > due and not idle):
                raise self._refusal(cost, span, end - now, wait)
            plan, idle = placed, False
        return plan

    def _arrived(self, n: int, now: float) -> None:
        """Count ``n`` arrivals (refused ones too) in the running mean gap between arrivals."""
        if self._last_arrival is not None:
            gap = now - self._last_arrival
            self._gap = gap if math.isinf(self._gap) else self._gap + GAP_ALPHA * (gap - self._gap)
        for _ in range(n - 1):
            self._gap -= GAP_ALPHA * self._gap  # arrivals at one instant: gaps of 0
        self._last_arrival = now

    def _batch_goal(self) -> float:
        """How much slack a record needs to head a batch that does not start at once (see the module docstring)."""
        if math.isinf(self._gap):
            return 0.0
        gap = self._gap * self._slots  # each slot sees its share of the arrivals
        per_record = self._per_record_cost
        fit = self._scaled
        waiting = DurationFit(  # a batch of n waits n gaps for its records, then runs
            intercept_s=fit.intercept_s,
            per_record_s=fit.per_record_s + gap,
            per_cost_s=fit.per_cost_s,
            per_cost_squared_s=fit.per_cost_squared_s,
        )
        n = waiting.largest_batch(self.target_s * (1.0 - GUARD), per_record, self._max_size)
        if per_record > 0:
            n = min(n, int(self._budget / per_record))
        return self.duration(n, n * per_record) if n else 0.0

    def _refusal(self, cost: int, span: float, ends_s: float, retry: float) -> OverloadedError:
        """The error for a record predicted to end ``ends_s`` after submit, that might fit ``retry`` seconds later."""
        if self.duration(1, cost) > span:
            retry = math.inf  # even alone, on an idle batcher
        retry = max(retry, MIN_RETRY_S)
        return OverloadedError(
            f"{type(self._b).__name__} is overloaded: this record is predicted to finish {ends_s:.3g}s after "
            f"submit (deadline {span:.3g}s: latency_target_s, or its timeout_s if shorter); "
            f"retry after {retry:.3g}s",
            retry,
        )

    def commit(self, plan: Plan | None) -> None:
        """Adopt a plan ``admit`` returned, now that its records are queued."""
        if plan is not None and self._plan is not None:
            self._plan = plan
