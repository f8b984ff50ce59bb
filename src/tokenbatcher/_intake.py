"""How a record comes in: ``submit`` (and ``call``, ``submit_nowait``) validate, price and queue it.

Every way in (also ``submit_batch``, ``submit_stream``, and
``submit_threadsafe`` through ``submit``) shares one path: the record's cost
is found (``_cost``), its ``timeout_s`` and ``priority`` are checked
(``_check_request``), its key, if it has one, is found (``_group``; see
``_keyed.py``), the caller waits for room if it may (``_wait_for_room``) or is
refused, and the record is queued (``_enqueue``): pushed into the queue, given its deadline, and the
loops waiting for arrivals are woken when enough has arrived.  Nothing is
queued or counted before every check has passed.

With ``latency_target_s``, admission comes last (``_admission.py``): a
record predicted to miss its deadline is refused with ``OverloadedError``.

A queued record is its own future (``Record``).  When its caller cancels it,
or its deadline passes, it leaves the queue's count at once and a producer
waiting for room is let in (``_cancelled``, ``_expire``).

Owns: accepting one record, and its place in the queue until it is taken.
Must not touch: how batches are formed or run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Any, cast

from ._admission import Admission
from ._errors import QueueFullError
from ._keyed import KeyedRecord, keyed_kind
from ._lifecycle import RUNNING
from ._pending import Record
from ._settings import MAX_COST, MAX_PRIORITY, MIN_PRIORITY, bad_cost, check_int, check_seconds
from ._streams import use_submit_stream
from ._types import RecordT, ResultT


class Intake(Admission[RecordT, ResultT]):
    """Accepting records (mixed into DynamicBatcher)."""

    _estimator_name = "cost_estimator"
    _cost_name = "estimated_cost"
    _probe_names: tuple[str, ...] = ("estimate_cost",)
    """The record methods that price a record, in order of precedence."""
    _cancel_hook: Callable[[Record[Any]], None]
    """``_cancelled``, bound once: every record's cancel hook."""

    def _cost(self, record: RecordT, explicit: object) -> int:
        if explicit is not None:
            cost, source = explicit, self._cost_name
        elif self._estimator is not None:
            cost, source = self._estimator(record), self._estimator_name
        else:
            for name in self._probe_names:
                method = getattr(record, name, None)
                if method is not None:
                    cost, source = method(), f"{type(record).__name__}.{name}()"
                    break
            else:
                return self._default_cost
        if type(cost) is int and 0 <= cost <= MAX_COST:
            return cost
        return bad_cost(cost, source)

    def _check_request(self, timeout_s: float | None, priority: int) -> float | None:
        """Validate ``priority`` and ``timeout_s``; return the record's deadline in seconds, or None."""
        if type(priority) is not int or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
            check_int("priority", priority, MIN_PRIORITY, MAX_PRIORITY)
        if timeout_s is None:
            return self._request_timeout_s
        return check_seconds("timeout_s", timeout_s, allow_zero=False, capped=True)

    def _enqueue(
        self,
        item: RecordT,
        cost: int,
        timeout_s: float | None,
        priority: int,
        kind: type[Record[Any]] = Record,
        group: Hashable = None,
    ) -> Record[Any]:
        """Queue ``item`` as a new ``kind`` (a ``Record``; a ``Channel`` for ``submit_stream``); return it.

        A keyed batcher makes it a ``kind`` with a key (``_keyed.keyed_kind``), of key ``group``.
        """
        loop = self._loop
        assert loop is not None
        if self._keyed:
            rec = keyed_kind(kind)(loop=loop)
            cast("KeyedRecord[Any]", rec).group = group  # every keyed kind has the slot
        else:
            rec = kind(loop=loop)
        rec.item = item
        rec.cost = cost
        rec.t = now = loop.time()
        rec.key = now + priority * self._aging_s if priority else now
        self._seq += 1
        rec.seq = self._seq
        rec.hook = self._cancel_hook
        rec.waiting = True
        pending = self._pending
        pending.push(rec)
        latency = self._latency
        if latency is not None:  # it waits at most its deadline (_overrun.py): a timeout_s of its own
            rec.due = now + latency.span(timeout_s)
            self._deadlines.add(loop, rec, latency.deadline_s(timeout_s), pending.size)
        elif timeout_s is not None:
            self._deadlines.add(loop, rec, timeout_s, pending.size)
        if self._arrival_waiters and (pending.size >= self._wake_need or pending.full):
            self._wake_arrivals()
        return rec

    async def submit(
        self,
        record: RecordT,
        *,
        estimated_cost: int | None = None,
        timeout_s: float | None = None,
        priority: int = 0,
        key: Hashable | None = None,
    ) -> asyncio.Future[ResultT]:
        """Queue one record; return the future of its result.

        Waits while the queue holds ``max_queue_size`` records (backpressure).
        The record's cost is, the first that applies: ``estimated_cost``;
        ``cost_estimator(record)``; ``record.estimate_cost()``; ``default_cost``.

        Args:
            record: The record to process.
            estimated_cost: Its cost, a non-negative ``int``.
            timeout_s: A deadline in seconds (default ``request_timeout_s``): if
                the record is still queued then, it is never processed and its
                future fails with ``TimeoutError``.
            priority: A lower value is dispatched first; with ``grouping="fifo"``,
                FIFO within a priority; aged by ``priority_aging_s`` so no
                record starves.
            key: The record's batch key (any hashable): records with
                different keys never share a batch.  Default: ``batch_key(record)``
                if ``batch_key`` is set, else no key (None).

        Returns:
            A future resolving to this record's entry of ``process_fn``'s result.
            With ``latency_target_s``, it fails with ``TimeoutError`` if,
            while it waits for its batch, the record can no longer finish by
            its deadline.

        Raises:
            OverloadedError: With ``latency_target_s``: the record is predicted
                to miss its deadline (the target, or ``timeout_s`` if
                shorter), so it was refused at once; see its ``retry_after_s``.
            RuntimeError: The batcher is not running (or is stopping, or runs on
                another event loop).
            TypeError: A cost, ``timeout_s`` or ``priority`` of the wrong type,
                or a key that is not hashable.
            ValueError: A negative cost or a non-positive ``timeout_s``.
        """
        if self._streaming:
            raise use_submit_stream("submit", self)
        if self._state is not RUNNING or asyncio.get_running_loop() is not self._loop:
            self._refuse()
        cost = self._cost(record, estimated_cost)
        if key is not None or self._batch_key is not None:
            key = self._group(record, key)
        if timeout_s is None and type(priority) is int and MIN_PRIORITY <= priority <= MAX_PRIORITY:
            deadline = self._request_timeout_s  # the common case, without a call
        else:
            deadline = self._check_request(timeout_s, priority)
        latency = self._latency
        if self._pending.size >= self._max_queue_size:
            if latency is not None:
                self._admit(latency, (cost,), deadline, (key,))  # refused at once, rather than after waiting for room
            await self._wait_for_room()
        if latency is None:
            return self._enqueue(record, cost, deadline, priority, group=key)
        return self._admit_all(latency, (record,), (cost,), deadline, priority, (key,))[0]

    async def call(
        self,
        record: RecordT,
        *,
        estimated_cost: int | None = None,
        timeout_s: float | None = None,
        priority: int = 0,
        key: Hashable | None = None,
    ) -> ResultT:
        """Submit one record and await its result: the one-await form of [submit][].

        ``await batcher.call(record)`` is ``await (await batcher.submit(record))``.
        Cancelling the call withdraws the record.  Takes the arguments of
        [submit][] and raises what it raises, and whatever the record's
        future fails with (``process_fn``'s exception, ``TimeoutError``, ...).

        Examples:
            >>> import asyncio
            >>> from tokenbatcher import DynamicBatcher
            >>> async def double(batch: list[int]) -> list[int]:
            ...     return [2 * x for x in batch]
            >>> async def main() -> list[int]:
            ...     async with DynamicBatcher(double) as batcher:
            ...         return await asyncio.gather(*(batcher.call(x) for x in range(3)))
            >>> asyncio.run(main())
            [0, 2, 4]
        """
        future = await self.submit(
            record, estimated_cost=estimated_cost, timeout_s=timeout_s, priority=priority, key=key
        )
        return await future

    def submit_nowait(
        self,
        record: RecordT,
        *,
        estimated_cost: int | None = None,
        timeout_s: float | None = None,
        priority: int = 0,
        key: Hashable | None = None,
    ) -> asyncio.Future[ResultT]:
        """Like [submit][], but never waits: a full queue raises instead.

        Call it from the batcher's event loop (a plain, non-async method).

        Raises:
            QueueFullError: The queue holds ``max_queue_size`` records; the
                record was not accepted (and is counted in ``total_rejected``).
            OverloadedError: As [submit][] (a ``QueueFullError`` too).
            RuntimeError: As [submit][].
        """
        if self._streaming:
            raise use_submit_stream("submit_nowait", self)
        if self._state is not RUNNING or asyncio.get_running_loop() is not self._loop:
            self._refuse()
        cost = self._cost(record, estimated_cost)
        deadline = self._check_request(timeout_s, priority)
        if key is not None or self._batch_key is not None:
            key = self._group(record, key)
        latency = self._latency
        if self._pending.size >= self._max_queue_size:
            if latency is not None:
                self._admit(latency, (cost,), deadline, (key,))  # an overloaded batcher says so, with retry_after_s
            self._rec.rejected += 1
            raise QueueFullError(
                f"{type(self).__name__} queue is full ({self._max_queue_size} records, max_queue_size); record rejected"
            )
        if latency is not None:
            return self._admit_all(latency, (record,), (cost,), deadline, priority, (key,))[0]
        return self._enqueue(record, cost, deadline, priority, group=key)

    def _expire(self, rec: Record[Any], timeout_s: float) -> None:
        """A waiting record's deadline came: it fails with ``TimeoutError`` and frees its place."""
        if self._latency is None:
            waited = f"{timeout_s}s in the queue (timeout_s)"
        else:
            waited = f"{timeout_s:.6g}s in the queue (its deadline: latency_target_s, or its timeout_s if shorter)"
        self._drop(rec, TimeoutError(f"record waited {waited} and was not processed"))

    def _miss(self, rec: Record[Any]) -> None:
        """The latency policy gave up on a record its wait made late: ``TimeoutError``, as an expiry."""
        self._drop(
            rec,
            TimeoutError(
                "record could no longer finish by its deadline (latency_target_s, or its timeout_s if shorter) "
                "after waiting, and was not processed"
            ),
        )

    def _drop(self, rec: Record[Any], error: TimeoutError) -> None:
        """Fail a waiting record with ``error`` (counted as expired) and free its place."""
        rec.set_exception(error)
        self._rec.expired += 1
        if rec.queued:  # else it is in a sealed batch, which drops it at dispatch
            self._pending.forget(rec)
            if self._room_waiters:
                self._wake_room(1)

    def _cancelled(self, rec: Record[Any]) -> None:
        """A caller cancelled its record's future: count it; if still queued, free its place."""
        self._rec.cancelled += 1
        if rec.queued:
            self._pending.forget(rec)
            if self._room_waiters:
                self._wake_room(1)

    async def _wait_for_room(self, n: int = 1) -> None:
        """Wait until ``n`` more records fit in the queue; raise if this run stops accepting meanwhile."""
        loop = self._loop
        assert loop is not None
        stopped = self._stopped
        first = True
        while self._pending.size + n > self._max_queue_size:
            self._check_accepting(stopped)
            if n > self._max_queue_size:  # configure() lowered it while this submit_batch waited
                raise ValueError(
                    f"submit_batch got {n} records, more than max_queue_size={self._max_queue_size} "
                    "(lowered by configure() while it waited): they could never be queued at once"
                )
            waiter = loop.create_future()
            if first:
                self._room_waiters.append(waiter)
            else:  # woken, but others took the room: keep this producer's place in line
                self._room_waiters.appendleft(waiter)
            first = False
            try:
                await waiter
            except BaseException:
                if waiter in self._room_waiters:
                    self._room_waiters.remove(waiter)
                elif self._pending.size < self._max_queue_size:
                    self._wake_room(1)  # we were woken but leave: pass the wake-up on
                raise
        self._check_accepting(stopped)
