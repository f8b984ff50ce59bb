"""TokenBatcher: DynamicBatcher with token-named arguments, and nothing else."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from typing_extensions import Unpack

from ._batcher import DynamicBatcher
from ._settings import MAX_COST, TokenSettingsChanges, bad_cost
from ._stats import BatchInfo
from ._streams import Stream, StreamFn
from ._types import BatchCost, CostEstimatorFn, Dispatch, Grouping, OnBatchError, ProcessFn, RecordT, ResultT, Tune


class TokenBatcher(DynamicBatcher[RecordT, ResultT]):
    """A [DynamicBatcher][] whose costs are tokens, for LLM and embedding work.

    It maps token-named arguments onto the base class and prices a record by
    ``estimate_tokens()`` ([TokenEstimator][tokenbatcher.TokenEstimator]) before ``estimate_cost()``.
    Each pair below is "token name, else base name":

    Args:
        inference_fn: The batch function, else ``process_fn``; one is required.
        process_fn: See ``inference_fn``.
        token_estimator: ``f(record) -> int``, else ``cost_estimator``.
        cost_estimator: See ``token_estimator``.
        target_batch_tokens: The token budget of a batch, else ``target_batch_cost``.
        target_batch_cost: See ``target_batch_tokens``.
        default_token_estimate: A record's tokens when nothing prices it, else ``default_cost``.
        default_cost: See ``default_token_estimate``.
        max_batch_size: As [DynamicBatcher][]; so are all the rest.
        min_batch_size: As [DynamicBatcher][].
        batch_timeout_s: As [DynamicBatcher][].
        max_queue_size: As [DynamicBatcher][].
        prefetch_batches: As [DynamicBatcher][].
        dispatch: As [DynamicBatcher][].
        max_concurrent_batches: As [DynamicBatcher][].
        request_timeout_s: As [DynamicBatcher][].
        batch_cost: As [DynamicBatcher][].
        grouping: As [DynamicBatcher][].
        priority_aging_s: As [DynamicBatcher][].
        latency_target_s: As [DynamicBatcher][].
        on_batch: As [DynamicBatcher][].
        batch_key: As [DynamicBatcher][].
        on_batch_error: As [DynamicBatcher][].
        executor: As [DynamicBatcher][].
        stream_buffer: As [DynamicBatcher][].
        tune: As [DynamicBatcher][].

    Raises:
        TypeError: Neither ``inference_fn`` nor ``process_fn`` was given, or as
            [DynamicBatcher][].

    Examples:
        >>> import asyncio
        >>> from tokenbatcher import Prompt, TokenBatcher
        >>> async def embed(batch: list[Prompt]) -> list[int]:
        ...     return [len(p.text) for p in batch]
        >>> async def main() -> int:
        ...     async with TokenBatcher(inference_fn=embed, target_batch_tokens=1_000) as batcher:
        ...         future = await batcher.submit(Prompt("hello"))
        ...         return await future
        >>> asyncio.run(main())
        5
    """

    _estimator_name = "token_estimator"
    _cost_name = "estimated_tokens"
    _probe_names = ("estimate_tokens", "estimate_cost")

    def __init__(
        self,
        inference_fn: ProcessFn[RecordT, ResultT]
        | Callable[[list[RecordT]], list[ResultT]]
        | StreamFn[RecordT, ResultT]
        | None = None,
        *,
        process_fn: ProcessFn[RecordT, ResultT]
        | Callable[[list[RecordT]], list[ResultT]]
        | StreamFn[RecordT, ResultT]
        | None = None,
        token_estimator: CostEstimatorFn[RecordT] | None = None,
        cost_estimator: CostEstimatorFn[RecordT] | None = None,
        target_batch_tokens: int | None = None,
        target_batch_cost: int = 32_000,
        default_token_estimate: int | None = None,
        default_cost: int = 1,
        max_batch_size: int = 256,
        min_batch_size: int = 1,
        batch_timeout_s: float = 0.05,
        max_queue_size: int = 5_000,
        prefetch_batches: int = 2,
        dispatch: Dispatch = "window",
        max_concurrent_batches: int = 1,
        request_timeout_s: float | None = None,
        batch_cost: BatchCost = "sum",
        grouping: Grouping = "fifo",
        priority_aging_s: float = 1.0,
        latency_target_s: float | None = None,
        on_batch: Callable[[BatchInfo], object] | None = None,
        batch_key: Callable[[RecordT], Hashable] | None = None,
        on_batch_error: OnBatchError = "fail",
        executor: concurrent.futures.Executor | None = None,
        stream_buffer: int = 10_000,
        tune: Tune = "off",
    ) -> None:
        fn = inference_fn if inference_fn is not None else process_fn
        if fn is None:
            raise TypeError("TokenBatcher requires either 'inference_fn' or 'process_fn'")
        self._tokens_named = target_batch_tokens is not None, default_token_estimate is not None
        super().__init__(
            fn,
            cost_estimator=token_estimator if token_estimator is not None else cost_estimator,
            target_batch_cost=target_batch_tokens if target_batch_tokens is not None else target_batch_cost,
            max_batch_size=max_batch_size,
            min_batch_size=min_batch_size,
            batch_timeout_s=batch_timeout_s,
            max_queue_size=max_queue_size,
            prefetch_batches=prefetch_batches,
            default_cost=default_token_estimate if default_token_estimate is not None else default_cost,
            dispatch=dispatch,
            max_concurrent_batches=max_concurrent_batches,
            request_timeout_s=request_timeout_s,
            batch_cost=batch_cost,
            grouping=grouping,
            priority_aging_s=priority_aging_s,
            latency_target_s=latency_target_s,
            on_batch=on_batch,
            batch_key=batch_key,
            on_batch_error=on_batch_error,
            executor=executor,
            stream_buffer=stream_buffer,
            tune=tune,
        )

    def _budget_name(self) -> str:
        return "target_batch_tokens" if self._tokens_named[0] else "target_batch_cost"

    def _default_name(self) -> str:
        return "default_token_estimate" if self._tokens_named[1] else "default_cost"

    async def submit(
        self,
        record: RecordT,
        *,
        estimated_tokens: int | None = None,
        estimated_cost: int | None = None,
        timeout_s: float | None = None,
        priority: int = 0,
        key: Hashable | None = None,
    ) -> asyncio.Future[ResultT]:
        """Queue one record; return the future of its result.

        As [DynamicBatcher.submit][], with ``estimated_tokens``, which wins
        over ``estimated_cost`` when both are given.  Without either, the cost
        is ``token_estimator(record)``, ``record.estimate_tokens()``,
        ``record.estimate_cost()``, or the default, the first that applies.
        """
        if estimated_tokens is not None:
            estimated_cost = _tokens(estimated_tokens)
        return await super().submit(
            record, estimated_cost=estimated_cost, timeout_s=timeout_s, priority=priority, key=key
        )

    async def call(
        self,
        record: RecordT,
        *,
        estimated_tokens: int | None = None,
        estimated_cost: int | None = None,
        timeout_s: float | None = None,
        priority: int = 0,
        key: Hashable | None = None,
    ) -> ResultT:
        """As [DynamicBatcher.call][], with ``estimated_tokens``."""
        future = await self.submit(
            record,
            estimated_tokens=estimated_tokens,
            estimated_cost=estimated_cost,
            timeout_s=timeout_s,
            priority=priority,
            key=key,
        )
        return await future

    async def submit_stream(
        self,
        record: RecordT,
        *,
        estimated_tokens: int | None = None,
        estimated_cost: int | None = None,
        timeout_s: float | None = None,
        priority: int = 0,
        key: Hashable | None = None,
    ) -> Stream[ResultT]:
        """As [DynamicBatcher.submit_stream][], with ``estimated_tokens``."""
        if estimated_tokens is not None:
            estimated_cost = _tokens(estimated_tokens)
        return await super().submit_stream(
            record, estimated_cost=estimated_cost, timeout_s=timeout_s, priority=priority, key=key
        )

    def submit_nowait(
        self,
        record: RecordT,
        *,
        estimated_tokens: int | None = None,
        estimated_cost: int | None = None,
        timeout_s: float | None = None,
        priority: int = 0,
        key: Hashable | None = None,
    ) -> asyncio.Future[ResultT]:
        """As [DynamicBatcher.submit_nowait][], with ``estimated_tokens``."""
        if estimated_tokens is not None:
            estimated_cost = _tokens(estimated_tokens)
        return super().submit_nowait(
            record, estimated_cost=estimated_cost, timeout_s=timeout_s, priority=priority, key=key
        )

    def submit_threadsafe(
        self,
        record: RecordT,
        *,
        estimated_tokens: int | None = None,
        estimated_cost: int | None = None,
        timeout_s: float | None = None,
        priority: int = 0,
        key: Hashable | None = None,
    ) -> concurrent.futures.Future[ResultT]:
        """As [DynamicBatcher.submit_threadsafe][], with ``estimated_tokens``."""
        if estimated_tokens is not None:
            estimated_cost = _tokens(estimated_tokens)
        return super().submit_threadsafe(
            record, estimated_cost=estimated_cost, timeout_s=timeout_s, priority=priority, key=key
        )

    async def submit_batch(
        self,
        records: Sequence[RecordT],
        *,
        estimated_tokens: Sequence[int] | None = None,
        estimated_cost: Sequence[int] | None = None,
        timeout_s: float | None = None,
        priority: int = 0,
        key: Hashable | None = None,
    ) -> list[asyncio.Future[ResultT]]:
        """As [DynamicBatcher.submit_batch][], with ``estimated_tokens``."""
        if estimated_tokens is not None:
            if len(estimated_tokens) != len(records):
                raise ValueError(
                    f"estimated_tokens must have one entry per record: got {len(estimated_tokens)} "
                    f"for {len(records)} records"
                )
            estimated_cost = [_tokens(n) for n in estimated_tokens]
        return await super().submit_batch(
            records, estimated_cost=estimated_cost, timeout_s=timeout_s, priority=priority, key=key
        )

    def configure(self, **settings: Unpack[TokenSettingsChanges]) -> None:  # pyright: ignore[reportIncompatibleMethodOverride]  (it takes more names)
        """As [DynamicBatcher.configure][], with the token names too.

        ``target_batch_tokens``, ``default_token_estimate`` and
        ``token_estimator`` set what ``target_batch_cost``, ``default_cost``
        and ``cost_estimator`` set, and win when both are given.
        """
        changes: dict[str, Any] = dict(settings)
        names: dict[str, str] = {}
        for token_name, base_name, name_field in _TOKEN_NAMES:
            if token_name in changes:
                changes[base_name] = changes.pop(token_name)
                names[name_field] = token_name
            elif base_name in changes:
                names[name_field] = base_name
        self._configure(changes, names)

    @property
    def target_batch_tokens(self) -> int:
        """The token budget of one batch (the same as ``target_batch_cost``)."""
        return self._settings.target_batch_cost

    @property
    def default_token_estimate(self) -> int:
        """A record's tokens when nothing prices it (the same as ``default_cost``)."""
        return self._settings.default_cost

    @property
    def token_estimator(self) -> Callable[[RecordT], int] | None:
        """``f(record) -> int`` counting a record's tokens (the same as ``cost_estimator``)."""
        return self._settings.cost_estimator


_TOKEN_NAMES = (
    ("target_batch_tokens", "target_batch_cost", "budget_name"),
    ("default_token_estimate", "default_cost", "default_name"),
    ("token_estimator", "cost_estimator", "estimator_name"),
)
"""``(token name, base name, the Settings field that names it in errors)``."""


def _tokens(value: object) -> int:
    if type(value) is int and 0 <= value <= MAX_COST:
        return value
    return bad_cost(value, "estimated_tokens")
