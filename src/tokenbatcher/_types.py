"""The shapes of the functions and records a batcher works with.

Everything here is a type: the estimator protocols a record may implement,
the aliases for the user's functions, and [Prompt][], the smallest
record that knows its own size.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeAlias, TypeVar, runtime_checkable

RecordT = TypeVar("RecordT")
ResultT = TypeVar("ResultT")

ProcessFn: TypeAlias = Callable[[list[RecordT]], Awaitable[list[ResultT]]]
"""``async def f(batch: list[RecordT]) -> list[ResultT]``: one result per record, in order."""

InferenceFn: TypeAlias = ProcessFn[RecordT, ResultT]
"""The token-flavoured name of [ProcessFn][], used by [TokenBatcher][tokenbatcher.TokenBatcher]."""

CostEstimatorFn: TypeAlias = Callable[[RecordT], int]
"""``f(record) -> int``: the cost of one record, a non-negative ``int``."""

TokenEstimatorFn: TypeAlias = CostEstimatorFn[RecordT]
"""The token-flavoured name of [CostEstimatorFn][]."""

Dispatch: TypeAlias = Literal["window", "eager"]
"""When a batch is formed; see [DynamicBatcher][tokenbatcher.DynamicBatcher]."""

BatchCost: TypeAlias = Literal["sum", "padded"]
"""How a batch's cost is counted against the budget; see [DynamicBatcher][tokenbatcher.DynamicBatcher]."""

Grouping: TypeAlias = Literal["fifo", "similar_cost"]
"""Which queued records are put together; see [DynamicBatcher][tokenbatcher.DynamicBatcher]."""

OnBatchError: TypeAlias = Literal["fail", "isolate"]
"""What a batch's futures get when ``process_fn`` raises; see [DynamicBatcher][tokenbatcher.DynamicBatcher]."""

Tune: TypeAlias = Literal["off", "throughput"]
"""Whether the batcher learns its own batch limits; see [DynamicBatcher][tokenbatcher.DynamicBatcher]."""


@runtime_checkable
class CostEstimator(Protocol):
    """A record that knows its own cost."""

    def estimate_cost(self) -> int:
        """Return this record's cost, a non-negative ``int``."""
        ...


@runtime_checkable
class TokenEstimator(Protocol):
    """A record that knows how many tokens it holds."""

    def estimate_tokens(self) -> int:
        """Return this record's token count, a non-negative ``int``."""
        ...


@dataclass
class Prompt:
    """A text prompt whose size is estimated at about four characters a token.

    Examples:
        >>> Prompt("What is Flyte?").estimate_tokens()
        4
    """

    text: str
    """The prompt's text."""

    def estimate_tokens(self) -> int:
        """Return ``len(text) // 4 + 1``, a rough token count."""
        return len(self.text) // 4 + 1
