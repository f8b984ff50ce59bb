"""What the numbers mean: the stats snapshot, per-batch info, and their recorder.

[BatchStats][] is an immutable snapshot; [BatchInfo][] describes one
finished batch and is what an ``on_batch`` hook receives.  The mutable
[Recorder][] lives inside the batcher and is the only thing that counts.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Generator, Hashable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Literal, TypeAlias, TypeVar

from ._durations import DurationFit
from ._tuner import TunerStats

T = TypeVar("T")

DispatchReason: TypeAlias = Literal["budget", "max_size", "timeout", "free_slot", "shutdown", "target"]
"""Why a batch was closed: its cost budget was full, it reached ``max_batch_size``,
its ``batch_timeout_s`` ran out (``"window"``), a processing slot was free
(``"eager"``), the batcher was stopping and flushed it, or it was as large as
``latency_target_s`` allows (a larger one was predicted to finish too late)."""

WINDOW = 1024
"""How many recent values each sliding window keeps."""

COPY_TRIES = 100
"""How often [copied][] tries before it gives up on a container that keeps changing."""


def copied(container: Iterable[T]) -> list[T]:
    """A list copy of a container that the event loop may change meanwhile.

    Stats are read from other threads (a metrics scraper).  A copy that meets
    a change made by the loop's thread fails with "deque mutated during
    iteration" (or "... changed size ..."): try again.  In the unlikely case
    that the loop never holds still, an empty list: reading stats never raises.
    """
    for _ in range(COPY_TRIES):
        try:
            return list(iter(container))  # iter() first: list() would call a Python __len__ mid-copy
        except RuntimeError:
            continue
    return []


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Order statistics of a sliding window of recent values (0.0 when empty)."""

    p50: float = 0.0
    """The median."""
    p95: float = 0.0
    """95th percentile."""
    p99: float = 0.0
    """99th percentile."""
    max: float = 0.0
    """The largest value in the window."""

    @classmethod
    def of(cls, values: Iterable[float]) -> Percentiles:
        """Compute the percentiles of ``values`` (nearest-rank method)."""
        ordered = sorted(values)
        if not ordered:
            return cls()

        def rank(q: float) -> float:
            return float(ordered[max(0, math.ceil(q * len(ordered)) - 1)])

        return cls(p50=rank(0.50), p95=rank(0.95), p99=rank(0.99), max=float(ordered[-1]))


@dataclass(frozen=True, slots=True)
class BatchStats:
    """An immutable snapshot of a batcher's counters, taken by ``batcher.stats``.

    The first eight fields are those of ``flyte.extras.BatchStats``; the rest are
    tokenbatcher's.  Counters are cumulative over the batcher's life, across
    ``stop()`` and ``start()``.  Every accepted record is, at any moment, in
    exactly one of: completed, failed, cancelled, expired, pending -- so
    ``total_submitted == total_completed + total_failed + total_cancelled +
    total_expired + pending``.  ``await batcher.stats`` also works and gives
    the same snapshot.
    """

    total_submitted: int = 0
    """Records accepted by ``submit`` and its siblings (rejected ones are not counted)."""
    total_completed: int = 0
    """Records whose future received a result."""
    total_batches: int = 0
    """Batches handed to ``process_fn``."""
    total_batch_cost: int = 0
    """Sum of the costs of all records handed to ``process_fn``."""
    avg_batch_size: float = 0.0
    """Mean records per batch."""
    avg_batch_cost: float = 0.0
    """Mean cost per batch (sum of record costs)."""
    busy_time_s: float = 0.0
    """Seconds spent inside ``process_fn``, summed over processing slots."""
    idle_time_s: float = 0.0
    """Seconds processing slots waited for a batch, summed over slots."""
    total_failed: int = 0
    """Records whose future received an exception (failed batch, stop timeout, ...)."""
    total_cancelled: int = 0
    """Records whose future was cancelled by its caller before a result arrived."""
    total_expired: int = 0
    """Records that got ``TimeoutError`` instead of a result: their ``timeout_s`` passed while queued, or, with
    ``latency_target_s``, their wait made them miss their deadline, or it came while their batch ran
    (``total_overrun``)."""
    total_rejected: int = 0
    """Records refused: by ``submit_nowait`` because the queue was full, or with ``OverloadedError``."""
    pending: int = 0
    """Records accepted and not yet resolved: queued, in a sealed batch, or in ``process_fn``."""
    queue_depth: int = 0
    """Records waiting in the queue now (not yet in a batch)."""
    peak_queue_depth: int = 0
    """The largest ``queue_depth`` seen."""
    in_flight_batches: int = 0
    """Batches inside ``process_fn`` now."""
    batch_size: Percentiles = field(default_factory=Percentiles)
    """Records per batch, over the last 1,024 batches."""
    batch_cost: Percentiles = field(default_factory=Percentiles)
    """Cost per batch as counted against the budget, over the last 1,024 batches."""
    process_time_s: Percentiles = field(default_factory=Percentiles)
    """Seconds per ``process_fn`` call, over the last 1,024 batches."""
    queue_wait_s: Percentiles = field(default_factory=Percentiles)
    """Seconds from ``submit`` to the start of the record's batch, over the last 1,024 records."""
    dispatch_reasons: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    """How many batches were closed for each [DispatchReason][]."""
    total_retries: int = 0
    """``process_fn`` calls that re-ran part of a failed batch (``on_batch_error="isolate"``); calls.

    Not counted in ``total_batches``: a batch counts once, however often its parts are re-run."""
    total_isolated_failures: int = 0
    """Records that failed alone when their failed batch was re-run (``on_batch_error="isolate"``); records.

    Each also counts in ``total_failed``."""
    duration_intercept_s: float = 0.0
    """Duration model (with ``latency_target_s``, else 0.0): seconds of any ``process_fn`` call, whatever its batch."""
    duration_per_record_s: float = 0.0
    """Duration model: seconds per record of a batch."""
    duration_per_cost_s: float = 0.0
    """Duration model: seconds per unit of a batch's counted cost (``batch_cost``), e.g. per token."""
    duration_per_cost_squared_s: float = 0.0
    """Duration model: seconds per squared unit of counted cost (how much a unit costs more in larger batches)."""
    duration_samples: int = 0
    """Duration model: successful batches it has learned from."""
    duration_fit_error: float = 0.0
    """Duration model: typical relative error of a prediction on recent batches (0.05 = 5%)."""
    duration_ready: bool = False
    """Duration model: True after its warm-up (8 batches); admission control starts then."""
    predicted_wait_s: float = 0.0
    """Seconds from submit to result predicted for the most recent record submitted (refused or not)."""
    total_overrun: int = 0
    """With ``latency_target_s``: of ``total_expired``, records failed at their deadline while their batch was
    in ``process_fn`` (their results, when the batch returned, were dropped)."""
    tuned_budget: int = 0
    """With ``tune="throughput"`` (else 0): the cost budget the tuner judges best now, in cost units (<= ceiling)."""
    tuned_max_size: int = 0
    """With ``tune="throughput"`` (else 0): the record cap that goes with ``tuned_budget``, in records."""
    tuned_exploring: bool = False
    """With ``tune="throughput"``: True while the next batch tries other limits than the best known."""
    tuned_records_per_s: Mapping[int, float] = field(default_factory=lambda: MappingProxyType({}))
    """With ``tune="throughput"``: each budget tried lately, and the records per second estimated for it.

    Estimates come from the duration model once it is ready, calibrated by the batches formed under the
    budget, and are records per second at the recent mix of record costs (work per second, divided by the
    recent cost of a record); 0.0 for a budget whose batches are predicted to miss ``latency_target_s``."""

    @property
    def utilization(self) -> float:
        """``busy / (busy + idle)``: the share of processing capacity used (0.0 before any)."""
        total = self.busy_time_s + self.idle_time_s
        return self.busy_time_s / total if total > 0 else 0.0

    def __await__(self) -> Generator[Any, None, BatchStats]:
        """Let notebooks write ``await batcher.stats``; gives this same snapshot."""
        return self
        yield  # pragma: no cover - makes this a generator that never suspends

    def __repr__(self) -> str:
        return (
            f"BatchStats(submitted={self.total_submitted}, completed={self.total_completed}, "
            f"failed={self.total_failed}, cancelled={self.total_cancelled}, "
            f"expired={self.total_expired}, rejected={self.total_rejected}, pending={self.pending}, "
            f"batches={self.total_batches}, avg_batch_size={self.avg_batch_size:.1f}, "
            f"avg_batch_cost={self.avg_batch_cost:.1f}, utilization={self.utilization:.1%}, "
            f"queue_depth={self.queue_depth}, peak_queue_depth={self.peak_queue_depth})"
        )

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{v}</td></tr>" for k, v in self._rows())
        return f"<table><caption>BatchStats</caption>{rows}</table>"

    def _rows(self) -> list[tuple[str, str]]:
        rows: list[tuple[str, str]] = []
        for f in fields(self):
            value: object = getattr(self, f.name)
            if isinstance(value, Percentiles):
                text = f"p50 {value.p50:.4g} · p95 {value.p95:.4g} · p99 {value.p99:.4g} · max {value.max:.4g}"
            elif f.name == "dispatch_reasons":
                text = ", ".join(f"{k}: {n}" for k, n in sorted(self.dispatch_reasons.items())) or "-"
            elif f.name == "tuned_records_per_s":
                text = ", ".join(f"{k}: {v:.4g}/s" for k, v in sorted(self.tuned_records_per_s.items())) or "-"
            elif isinstance(value, float):
                text = f"{value:.4g}"
            else:
                text = str(value)
            rows.append((f.name, text))
        rows.append(("utilization", f"{self.utilization:.1%}"))
        return rows


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """One finished batch, as given to the ``on_batch`` hook (called after ``process_fn`` returns)."""

    started_at: float
    """The event loop's clock (``loop.time()``) when the batch entered ``process_fn``."""

    size: int
    """Records handed to ``process_fn``."""
    cost: int
    """The batch's cost as counted against the budget (``batch_cost`` mode)."""
    reason: DispatchReason
    """Why the batch was closed."""
    queue_wait_max_s: float
    """Seconds the batch's oldest record waited from ``submit`` to dispatch."""
    process_time_s: float
    """Seconds inside ``process_fn``."""
    error: BaseException | None
    """What ``process_fn`` raised (or the result-shape error), None on success.

    With ``on_batch_error="isolate"``, what it raised on the whole batch: the
    records got their results or their own exceptions (see ``isolated_failures``)."""
    dropped: int
    """Records of this batch dropped just before dispatch because their futures were already done.

    Records cancelled or expired while still queued are dropped earlier and are
    not counted here; ``BatchStats.total_cancelled`` and ``total_expired`` count all."""
    key: Hashable = None
    """The batch's key (``batch_key`` or ``submit(..., key=...)``); None for unkeyed records."""
    retries: int = 0
    """``on_batch_error="isolate"``: calls that re-ran parts of this batch after it failed (``error``)."""
    isolated_failures: int = 0
    """``on_batch_error="isolate"``: records of this batch that failed alone, with their own exceptions."""


class Recorder:
    """The mutable counters behind [BatchStats][]; only the batcher writes them."""

    def __init__(self) -> None:
        self.completed = 0
        self.failed = 0
        self.cancelled = 0
        self.expired = 0
        self.overrun = 0
        self.rejected = 0
        self.retries = 0
        self.isolated = 0
        self.batches = 0
        self.batch_cost_sum = 0
        self.batch_size_sum = 0
        self.busy_s = 0.0
        self.idle_s = 0.0
        self.reasons: dict[str, int] = {}
        self.sizes: deque[int] = deque(maxlen=WINDOW)
        self.costs: deque[int] = deque(maxlen=WINDOW)
        self.process_times: deque[float] = deque(maxlen=WINDOW)
        self.waits: deque[float] = deque(maxlen=WINDOW)

    def batch(self, size: int, sum_cost: int, counted_cost: int, reason: str) -> None:
        """Count a batch as it is handed to ``process_fn``."""
        self.batches += 1
        self.batch_size_sum += size
        self.batch_cost_sum += sum_cost
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.sizes.append(size)
        self.costs.append(counted_cost)

    def resolved(self) -> tuple[int, int, int, int]:
        """``(completed, failed, cancelled, expired)``, read before the numbers given to [snapshot][]."""
        return self.completed, self.failed, self.cancelled, self.expired

    def snapshot(
        self,
        resolved: tuple[int, int, int, int],
        *,
        submitted: int,
        queue_depth: int,
        peak_queue_depth: int,
        in_flight: int,
        durations: DurationFit | None = None,
        predicted_wait_s: float = 0.0,
        tuner: TunerStats | None = None,
    ) -> BatchStats:
        """Freeze the counters, with the numbers the batcher keeps elsewhere.

        ``resolved`` comes from [resolved][], read first, and ``submitted`` is
        read last.  A record is counted as submitted before it can resolve, so
        in this order no record is counted twice and ``pending`` is never
        negative, even when read from another thread while the loop runs.
        """
        completed, failed, cancelled, expired = resolved
        pending = submitted - completed - failed - cancelled - expired
        n = self.batches
        fit = durations if durations is not None else DurationFit()
        return BatchStats(
            total_submitted=submitted,
            total_completed=completed,
            total_batches=n,
            total_batch_cost=self.batch_cost_sum,
            avg_batch_size=self.batch_size_sum / n if n else 0.0,
            avg_batch_cost=self.batch_cost_sum / n if n else 0.0,
            busy_time_s=self.busy_s,
            idle_time_s=self.idle_s,
            total_failed=failed,
            total_cancelled=cancelled,
            total_expired=expired,
            total_rejected=self.rejected,
            pending=pending,
            queue_depth=queue_depth,
            peak_queue_depth=peak_queue_depth,
            in_flight_batches=in_flight,
            batch_size=Percentiles.of(copied(self.sizes)),
            batch_cost=Percentiles.of(copied(self.costs)),
            process_time_s=Percentiles.of(copied(self.process_times)),
            queue_wait_s=Percentiles.of(copied(self.waits)),
            dispatch_reasons=MappingProxyType(dict(copied(self.reasons.items()))),
            total_retries=self.retries,
            total_isolated_failures=self.isolated,
            duration_intercept_s=fit.intercept_s,
            duration_per_record_s=fit.per_record_s,
            duration_per_cost_s=fit.per_cost_s,
            duration_per_cost_squared_s=fit.per_cost_squared_s,
            duration_samples=fit.samples,
            duration_fit_error=fit.fit_error,
            duration_ready=fit.ready,
            predicted_wait_s=predicted_wait_s,
            total_overrun=self.overrun,
            tuned_budget=tuner.budget if tuner is not None else 0,
            tuned_max_size=tuner.max_size if tuner is not None else 0,
            tuned_exploring=tuner.exploring if tuner is not None else False,
            tuned_records_per_s=MappingProxyType(
                {arm.budget: arm.estimate for arm in tuner.arms} if tuner is not None else {}
            ),
        )
