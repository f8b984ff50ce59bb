"""What a batcher is set to: one frozen, validated value, and the checks behind it.

[Settings][] holds every setting of a batcher except its functions' wiring
(``process_fn``, ``executor``).  The constructor builds one, ``configure``
builds a changed copy with [Settings.replace][]; both go through the same
validation, so a batcher never holds a setting it would refuse.  The rest of
the code reads settings from here and nowhere else.

The checks also serve the per-record arguments of ``submit`` (costs,
``timeout_s``, ``priority``): every error names the parameter and the value,
and the numeric limits below keep every sum, key and average a finite float.

Owns: validation and limits.  Touches nothing else: no event loop, no state.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, SupportsIndex

from typing_extensions import TypedDict

from ._stats import BatchInfo
from ._types import BatchCost, Dispatch, Grouping, OnBatchError, Tune

MAX_COST = 2**63 - 1
"""The largest cost of one record, so every sum and average in the stats stays a finite float."""

MIN_PRIORITY, MAX_PRIORITY = -(2**63), 2**63 - 1
"""A priority is a signed 64-bit int, so a record's dispatch key stays a finite float."""

MAX_SECONDS = 1e9
"""The longest ``timeout_s``, ``request_timeout_s``, ``priority_aging_s`` and ``latency_target_s`` (about 31 years)."""


def show(value: object) -> str:
    """A value for an error message; an int too long to print is described by its size."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an int of {value.bit_length()} bits"
    return repr(value)


def check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {show(value)}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {show(value)}")
    return value


def check_seconds(name: str, value: object, *, allow_zero: bool, capped: bool = False) -> float:
    """Validate a number of seconds; ``capped`` ones must also be at most [MAX_SECONDS][] (else inf is allowed)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {value!r} ({type(value).__name__})")
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond any float
        seconds = math.inf if value > 0 else -math.inf
    if math.isnan(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {show(value)}")
    if capped and seconds > MAX_SECONDS:
        raise ValueError(f"{name} must be <= 1e9 seconds (about 31 years), got {show(value)}")
    return seconds


def check_optional_seconds(name: str, value: object, *, allow_zero: bool, capped: bool = False) -> float | None:
    return None if value is None else check_seconds(name, value, allow_zero=allow_zero, capped=capped)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def bad_cost(value: object, source: str) -> int:
    """The slow path of cost validation: convert an integer-like value or raise."""
    if not isinstance(value, bool) and isinstance(value, SupportsIndex):
        converted = operator.index(value)  # e.g. numpy.int64
        if converted < 0:
            raise ValueError(f"{source} must be a non-negative int, got {show(converted)}")
        if converted > MAX_COST:
            raise ValueError(f"{source} must be <= 2**63 - 1, got {show(converted)}")
        return converted
    raise TypeError(f"{source} must be a non-negative int, got {value!r} ({type(value).__name__})")


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of a batcher, validated on construction (see [DynamicBatcher][tokenbatcher.DynamicBatcher]).

    The three ``*_name`` fields are the public names errors use for the budget,
    the default cost and the estimator: [TokenBatcher][tokenbatcher.TokenBatcher]
    says ``target_batch_tokens`` where the base class says ``target_batch_cost``.
    """

    target_batch_cost: int = 32_000
    max_batch_size: int = 256
    min_batch_size: int = 1
    batch_timeout_s: float = 0.05
    max_queue_size: int = 5_000
    prefetch_batches: int = 2
    default_cost: int = 1
    dispatch: Dispatch = "window"
    max_concurrent_batches: int = 1
    request_timeout_s: float | None = None
    batch_cost: BatchCost = "sum"
    grouping: Grouping = "fifo"
    priority_aging_s: float = 1.0
    latency_target_s: float | None = None
    cost_estimator: Callable[[Any], int] | None = None
    on_batch: Callable[[BatchInfo], object] | None = None
    batch_key: Callable[[Any], Hashable] | None = None
    on_batch_error: OnBatchError = "fail"
    stream_buffer: int = 10_000
    tune: Tune = "off"
    budget_name: str = field(default="target_batch_cost", repr=False, compare=False)
    default_name: str = field(default="default_cost", repr=False, compare=False)
    estimator_name: str = field(default="cost_estimator", repr=False, compare=False)

    def __post_init__(self) -> None:
        """Check every setting, and store numbers in their canonical types (seconds as floats)."""
        if self.cost_estimator is not None and not callable(self.cost_estimator):
            raise TypeError(f"{self.estimator_name} must be callable or None, got {self.cost_estimator!r}")
        if self.on_batch is not None and not callable(self.on_batch):
            raise TypeError(f"on_batch must be callable or None, got {self.on_batch!r}")
        if self.batch_key is not None and not callable(self.batch_key):
            raise TypeError(f"batch_key must be callable or None, got {self.batch_key!r}")
        check_int(self.budget_name, self.target_batch_cost, 1)
        check_int("max_batch_size", self.max_batch_size, 1)
        check_int("min_batch_size", self.min_batch_size, 1)
        if self.min_batch_size > self.max_batch_size:
            raise ValueError(
                f"min_batch_size must be <= max_batch_size, got {self.min_batch_size} > {self.max_batch_size}"
            )
        seconds = {
            "batch_timeout_s": check_seconds("batch_timeout_s", self.batch_timeout_s, allow_zero=True),
            "request_timeout_s": check_optional_seconds(
                "request_timeout_s", self.request_timeout_s, allow_zero=False, capped=True
            ),
            "priority_aging_s": check_seconds("priority_aging_s", self.priority_aging_s, allow_zero=True, capped=True),
            "latency_target_s": check_optional_seconds(
                "latency_target_s", self.latency_target_s, allow_zero=False, capped=True
            ),
        }
        for name, value in seconds.items():
            object.__setattr__(self, name, value)
        check_int("max_queue_size", self.max_queue_size, 1)
        check_int("prefetch_batches", self.prefetch_batches, 1)
        check_int(self.default_name, self.default_cost, 0, MAX_COST)
        check_choice("dispatch", self.dispatch, ("window", "eager"))
        check_int("max_concurrent_batches", self.max_concurrent_batches, 1)
        check_choice("batch_cost", self.batch_cost, ("sum", "padded"))
        check_choice("grouping", self.grouping, ("fifo", "similar_cost"))
        check_choice("on_batch_error", self.on_batch_error, ("fail", "isolate"))
        check_int("stream_buffer", self.stream_buffer, 1)
        check_choice("tune", self.tune, ("off", "throughput"))

    def replace(self, names: Mapping[str, str] = MappingProxyType({}), /, **changes: Any) -> Settings:
        """A validated copy with ``changes`` applied (all or nothing: a bad value raises, nothing changes).

        Args:
            names: The public names errors use for this change (``budget_name``,
                ``default_name``, ``estimator_name``), if not those of ``self``.
            **changes: New values of settings, by field name.

        Raises:
            TypeError: A name that is no setting, or a value of the wrong type.
            ValueError: A value out of range.
        """
        unknown = sorted(set(changes) - set(SETTING_NAMES))
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(unknown)}")
        return replace(self, **{**changes, **names})


SETTING_NAMES = tuple(name for name in Settings.__dataclass_fields__ if not name.endswith("_name"))
"""The names of every setting, in declaration order."""


RESTART_ONLY = ("dispatch", "max_concurrent_batches")
"""Settings that ``configure`` changes only while the batcher is not running: they shape its loops."""


class SettingsChanges(TypedDict, total=False):
    """The keyword arguments of [DynamicBatcher.configure][tokenbatcher.DynamicBatcher.configure]: any settings."""

    cost_estimator: Callable[[Any], int] | None
    target_batch_cost: int
    max_batch_size: int
    min_batch_size: int
    batch_timeout_s: float
    max_queue_size: int
    prefetch_batches: int
    default_cost: int
    dispatch: Dispatch
    max_concurrent_batches: int
    request_timeout_s: float | None
    batch_cost: BatchCost
    grouping: Grouping
    priority_aging_s: float
    latency_target_s: float | None
    on_batch: Callable[[BatchInfo], object] | None
    batch_key: Callable[[Any], Hashable] | None
    on_batch_error: OnBatchError
    stream_buffer: int
    tune: Tune


class TokenSettingsChanges(SettingsChanges, total=False):
    """The keyword arguments of [TokenBatcher.configure][tokenbatcher.TokenBatcher.configure]: the token names too."""

    token_estimator: Callable[[Any], int] | None
    target_batch_tokens: int
    default_token_estimate: int
