"""What the throughput tuner knows: its decisions, one arm's measurements, the snapshot stats shows.

An *arm* is one pair of limits on the tuner's grid (``_tuner.py``).  ``Arm``
keeps running averages over the batches formed under it: records, counted
cost, work (the records' own costs) and seconds, plus how fast the batches ran
against the duration model's prediction.  The rest is frozen data handed out.

Owns: the per-arm averages.  Must not touch: how arms are chosen (``_tuner.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

SHAPE_ALPHA = 0.1  # weight of a new batch in an arm's average batch (records, cost, work, seconds)
SPEED_ALPHA = 0.15  # and in its average speed relative to the duration model
PRIOR_BATCHES = 3.0  # batches' worth of trust in the model when calibrating an arm against it


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
    """Records per second measured on the batches formed under it lately (as they came: no mix correction)."""
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
    batches: int
    """Batches it has learned from."""
    switches: int
    """Times the chosen arm changed."""
    target_cap: tuple[int, int] | None
    """The (budget, max_size) the latency target allows at most (None without a target)."""
    arms: tuple[ArmEstimate, ...]
    """The arms measured lately, largest batches first."""


class Arm:
    """Running averages over the batches formed under an arm (plain means while few)."""

    __slots__ = ("batches", "checked", "cost", "last", "ratio", "records", "seconds", "work")

    def __init__(self) -> None:
        self.batches = self.checked = self.last = 0
        self.records = self.cost = self.work = self.seconds = self.ratio = 0.0

    def add(self, size: int, cost: float, work: float, seconds: float, predicted: float | None, step: int) -> None:
        self.batches, self.last = self.batches + 1, step
        new = max(SHAPE_ALPHA, 1 / self.batches)
        self.records += new * (size - self.records)
        self.cost += new * (cost - self.cost)
        self.work += new * (work - self.work)
        self.seconds += new * (seconds - self.seconds)
        if predicted is not None:  # the model's error on this batch, while it is ready
            self.checked += 1
            self.ratio += max(SPEED_ALPHA, 1 / self.checked) * (predicted / max(seconds, 1e-12) - self.ratio)

    def calibration(self) -> float:
        """How much faster the arm runs than the model predicts, shrunk toward 1 while checked little."""
        weight = min(self.checked, 2 / SPEED_ALPHA)
        return self.ratio ** (weight / (weight + PRIOR_BATCHES)) if self.checked else 1.0
