"""With ``latency_target_s``: the admission step every way in ends with.

A record the latency policy (``_latency.py``) predicts would miss its deadline
is refused with ``OverloadedError`` at once -- also when the queue is full,
before its caller would wait for room -- and records submitted together are
admitted all or none: the policy's plan is committed only once every one of
them is queued.

Owns: asking the latency policy, counting refusals.  Must not touch: how a
record is priced, checked or queued (``_intake.py``), nor the policy itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

from ._core import Core
from ._errors import OverloadedError
from ._latency import LatencyTarget
from ._pending import Record
from ._plan import Plan
from ._types import RecordT, ResultT


class Admission(Core[RecordT, ResultT]):
    """Latency admission (mixed into DynamicBatcher through its ways in)."""

    if TYPE_CHECKING:  # provided by Intake

        def _enqueue(
            self,
            item: RecordT,
            cost: int,
            timeout_s: float | None,
            priority: int,
            kind: type[Record[Any]] = ...,
            group: Hashable = ...,
        ) -> Record[Any]: ...

    def _admit(
        self, latency: LatencyTarget, costs: Sequence[int], timeout_s: float | None, groups: Sequence[Hashable]
    ) -> Plan | None:
        """Ask the latency policy to let these records (of keys ``groups``) in; a refusal counts them as rejected."""
        loop = self._loop
        assert loop is not None
        try:
            return latency.admit(costs, groups, latency.span(timeout_s), loop.time())
        except OverloadedError:
            self._rec.rejected += len(costs)
            raise

    def _admit_all(
        self,
        latency: LatencyTarget,
        items: Sequence[RecordT],
        costs: Sequence[int],
        timeout_s: float | None,
        priority: int,
        groups: Sequence[Hashable],
    ) -> list[asyncio.Future[ResultT]]:
        """Admit and queue records, all or none (there is room for them)."""
        plan = self._admit(latency, costs, timeout_s, groups)
        futures: list[asyncio.Future[ResultT]] = [
            self._enqueue(item, cost, timeout_s, priority, group=group)
            for item, cost, group in zip(items, costs, groups, strict=True)
        ]
        latency.commit(plan)
        return futures
