"""``tune="throughput"``: the batcher's limits, learned by the throughput tuner.

The tuner (``_tuner.py``) is pure: it says which limits the next batch gets
(``decide``) and learns from each finished batch (``observe``).  [Tuning][]
wires it into a batcher:

* the queue is built with the decided limits (``sync``, before each batch is
  taken, and after each batch the tuner learned from), so a ``"window"``
  closes when a batch is *tuned*-full and the queue says which limit closed
  it; the queue is re-measured only when the decision changes (an arm
  switch), never per record;
* each batch taken remembers the decision it was formed under (``taken``),
  and hands it back with its size, counted cost and duration once
  ``process_fn`` succeeded (``finished``), after the shared duration model
  has been fed with the same batch (``_processing.py``);
* with ``latency_target_s``, the latency policy caps batches within the
  decided limits too (``LatencyTarget.limit``), and the tuner, sharing the
  policy's duration model, keeps to the budgets predicted to meet the target.

The user's ``target_batch_cost`` and ``max_batch_size`` are the ceilings: no
decision exceeds them.  Changing a ceiling, the target or ``tune`` with
``configure`` starts a fresh tuner (the duration model is kept).

Owns: the decisions in force.  Must not touch: how a batch is run.
"""

# A policy is the engine's friend, as a strategy is: it reads the shared state of Core directly.
# pyright: reportPrivateUsage=false

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._durations import DurationModel
from ._tuner import Decision, ThroughputTuner, TunerStats

if TYPE_CHECKING:
    from ._core import Batch, Core
    from ._settings import Settings


def apply_tune(batcher: Core[Any, Any], settings: Settings) -> None:
    """Adopt ``settings.tune`` (after the latency target): a fresh tuner when switched on or its ceilings changed."""
    tuning = batcher._tuning
    if settings.tune == "off":
        if tuning is not None:  # back to the settings' own limits
            batcher._tuning = None
            padded, similar = settings.batch_cost == "padded", settings.grouping == "similar_cost"
            budget, max_size = settings.target_batch_cost, settings.max_batch_size
            batcher._pending.reconfigure(budget=budget, max_size=max_size, padded=padded, similar=similar)
            if batcher._latency is not None:
                batcher._latency.reconfigure(settings)
        return
    ceilings = (settings.target_batch_cost, settings.max_batch_size, settings.latency_target_s)
    if tuning is None or tuning.ceilings != ceilings:
        if batcher._durations is None:
            batcher._durations = DurationModel()
        tuning = batcher._tuning = Tuning(batcher._durations, settings)
    tuning.applied = None  # the queue and the policy may have been rebuilt with the ceilings
    tuning.sync(batcher)


MAX_REMEMBERED = 4_096
"""Decisions of batches taken and not yet finished kept at most (a batch that never finishes is forgotten)."""


class Tuning:
    """The throughput tuner of one batcher (see the module docstring).

    Args:
        model: The duration model the batcher feeds (shared with a latency target).
        settings: The settings whose limits are the ceilings.
    """

    def __init__(self, model: DurationModel, settings: Settings) -> None:
        self.model = model
        self.ceilings = (settings.target_batch_cost, settings.max_batch_size, settings.latency_target_s)
        """What the tuner was built for; another value needs a fresh tuner."""
        self.tuner = ThroughputTuner(
            model,
            target_batch_cost=settings.target_batch_cost,
            max_batch_size=settings.max_batch_size,
            latency_target_s=settings.latency_target_s,
        )
        self.applied: tuple[int, int] | None = None
        """The (budget, max_size) the queue was last built with; None: not the tuner's."""
        self.stats: TunerStats = self.tuner.snapshot()
        """The snapshot ``stats`` reads (taken on the loop's thread after each batch)."""
        self._decisions: dict[Batch, Decision] = {}

    def sync(self, batcher: Core[Any, Any]) -> None:
        """Build the queue (and the latency policy) with the decided limits, if they changed."""
        decision = self.tuner.decide()
        limits = (decision.budget, decision.max_size)
        if limits == self.applied:
            return
        self.applied = limits
        settings = batcher._settings
        batcher._pending.reconfigure(
            budget=decision.budget,
            max_size=decision.max_size,
            padded=settings.batch_cost == "padded",
            similar=settings.grouping == "similar_cost",
        )
        if batcher._latency is not None:
            batcher._latency.limit(decision.budget, decision.max_size)
        if batcher._arrival_waiters and batcher._pending.full:
            batcher._wake_arrivals()  # a window waiting for a full batch has one now

    def taken(self, batch: Batch) -> None:
        """``batch`` was taken under the decision in force."""
        decisions = self._decisions
        if len(decisions) >= MAX_REMEMBERED:
            decisions.clear()
        decisions[batch] = self.tuner.decide()

    def finished(
        self, batcher: Core[Any, Any], batch: Batch, ok: bool, cost: int, duration_s: float, work: int
    ) -> None:
        """``batch`` left ``process_fn`` (the model was fed first if ``ok``): learn, and adopt the next limits.

        ``cost`` is its counted cost, ``work`` the sum of its records' own costs (less, if padded).
        """
        decision = self._decisions.pop(batch, None)
        if decision is None or not ok:
            return
        loop = batcher._loop
        assert loop is not None
        self.tuner.observe(
            decision,
            size=len(batch.records),
            cost=cost,
            duration_s=duration_s,
            now=loop.time(),
            reason=batch.reason,
            work=work,
        )
        self.stats = self.tuner.snapshot()
        self.sync(batcher)

    def forget(self, batch: Batch) -> None:
        """``batch`` ended without running (every record was dropped)."""
        self._decisions.pop(batch, None)
