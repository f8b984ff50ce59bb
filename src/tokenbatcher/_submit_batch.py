"""``submit_batch``: several records in at once, all or none.

Every record is priced and checked, and its key found, before any is queued;
the call waits until there is room for all of them (and, with
``latency_target_s``, the policy admits all of them or none), then queues
them at once, each as ``_intake.py`` queues one record.

Owns: the all-or-none intake of several records.  Must not touch: how one
record is priced, checked or queued (``_intake.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence

from ._intake import Intake
from ._lifecycle import RUNNING
from ._streams import use_submit_stream
from ._types import RecordT, ResultT


class SubmitBatch(Intake[RecordT, ResultT]):
    """Several records at once (mixed into DynamicBatcher)."""

    async def submit_batch(
        self,
        records: Sequence[RecordT],
        *,
        estimated_cost: Sequence[int] | None = None,
        timeout_s: float | None = None,
        priority: int = 0,
        key: Hashable | None = None,
    ) -> list[asyncio.Future[ResultT]]:
        """Submit several records; return one future per record, in order.

        All or nothing: every record is checked (costs, ``timeout_s``,
        ``priority``) before any is queued, and the call waits until there is
        room for all of them, then queues them at once.  If it raises or is
        cancelled (``stop()`` began, say), no record was queued.

        Args:
            records: The records, at most ``max_queue_size`` of them.
            estimated_cost: Their costs, a sequence as long as ``records``.
            timeout_s: As [submit][tokenbatcher.DynamicBatcher.submit], for every record.
            priority: As [submit][tokenbatcher.DynamicBatcher.submit], for every record.
            key: As [submit][tokenbatcher.DynamicBatcher.submit], for every record (without it, each record's
                own ``batch_key(record)``, if ``batch_key`` is set).

        Returns:
            One future per record, in the order of ``records``.

        Raises:
            ValueError: ``estimated_cost`` has another length than ``records``,
                or there are more records than ``max_queue_size`` (they could
                never be queued at once); nothing was queued.
            OverloadedError: As [submit][tokenbatcher.DynamicBatcher.submit], if any of the records would miss
                its deadline; none was queued.
            RuntimeError: As [submit][tokenbatcher.DynamicBatcher.submit].
        """
        if self._streaming:
            raise use_submit_stream("submit_batch", self)
        n = len(records)
        if estimated_cost is not None and len(estimated_cost) != n:
            raise ValueError(
                f"estimated_cost must have one entry per record: got {len(estimated_cost)} for {n} records"
            )
        if self._state is not RUNNING or asyncio.get_running_loop() is not self._loop:
            self._refuse()
        if n > self._max_queue_size:
            raise ValueError(
                f"submit_batch got {n} records, more than max_queue_size={self._max_queue_size}: they could never "
                "be queued at once. Split the call, or raise max_queue_size."
            )
        explicit: Sequence[int | None] = estimated_cost if estimated_cost is not None else [None] * n
        costs = [self._cost(record, cost) for record, cost in zip(records, explicit, strict=True)]
        deadline = self._check_request(timeout_s, priority)
        groups: Sequence[Hashable] = [None] * n
        if key is not None or self._batch_key is not None:
            groups = [self._group(record, key) for record in records]
        latency = self._latency
        if self._pending.size + n > self._max_queue_size:
            if latency is not None:
                self._admit(latency, costs, deadline, groups)  # refused at once, rather than after waiting for room
            await self._wait_for_room(n)
        if latency is not None:
            return self._admit_all(latency, records, costs, deadline, priority, groups)
        return [
            self._enqueue(record, cost, deadline, priority, group=group)
            for record, cost, group in zip(records, costs, groups, strict=True)
        ]
