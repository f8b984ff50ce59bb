"""The compatible surface of SPEC part 1: names, signatures, defaults, errors."""

from __future__ import annotations

import asyncio
import inspect
import types
from dataclasses import dataclass
from typing import Any

import pytest

import tokenbatcher
from tokenbatcher import (
    BatchStats,
    CostEstimator,
    DynamicBatcher,
    Prompt,
    TokenBatcher,
    TokenEstimator,
)

REFERENCE_NAMES = {
    "BatchStats",
    "CostEstimator",
    "CostEstimatorFn",
    "DynamicBatcher",
    "InferenceFn",
    "ProcessFn",
    "Prompt",
    "TokenBatcher",
    "TokenEstimator",
    "TokenEstimatorFn",
}


async def echo(batch: list[Any]) -> list[Any]:
    return list(batch)


def test_all_is_complete_and_holds_every_reference_name() -> None:
    public = {name for name in dir(tokenbatcher) if not name.startswith("_")}
    assert set(tokenbatcher.__all__) == public
    assert set(tokenbatcher.__all__) >= REFERENCE_NAMES


@pytest.mark.parametrize("name", tokenbatcher.__all__)
def test_every_public_name_is_documented(name: str) -> None:
    obj = getattr(tokenbatcher, name)
    # A type alias such as ``ProcessFn`` is documented by the docstring under it, which Python does not keep;
    # on 3.10 ``inspect.isclass`` says True for ``Callable[...]`` aliases, so they are told apart explicitly.
    if isinstance(obj, types.GenericAlias):
        return
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert inspect.getdoc(obj), name
        for attr, member in vars(obj).items():
            if not attr.startswith("_") and (inspect.isfunction(member) or isinstance(member, property)):
                assert inspect.getdoc(member), f"{name}.{attr}"


def params(fn: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


K = inspect.Parameter.KEYWORD_ONLY
PK = inspect.Parameter.POSITIONAL_OR_KEYWORD
E = inspect.Parameter.empty


def test_dynamic_batcher_signature_matches_the_reference() -> None:
    got = params(DynamicBatcher.__init__)[1:]
    assert got[:9] == [
        ("process_fn", PK, E),
        ("cost_estimator", K, None),
        ("target_batch_cost", K, 32_000),
        ("max_batch_size", K, 256),
        ("min_batch_size", K, 1),
        ("batch_timeout_s", K, 0.05),
        ("max_queue_size", K, 5_000),
        ("prefetch_batches", K, 2),
        ("default_cost", K, 1),
    ]
    additions = dict((name, default) for name, kind, default in got[9:] if kind is K)
    assert additions == {
        "dispatch": "window",
        "max_concurrent_batches": 1,
        "request_timeout_s": None,
        "batch_cost": "sum",
        "grouping": "fifo",
        "priority_aging_s": 1.0,
        "latency_target_s": None,
        "on_batch": None,
        "batch_key": None,
        "on_batch_error": "fail",
        "executor": None,
        "stream_buffer": 10_000,
        "tune": "off",
    }


def test_token_batcher_signature_matches_the_reference() -> None:
    got = params(TokenBatcher.__init__)[1:]
    assert got[:13] == [
        ("inference_fn", PK, None),
        ("process_fn", K, None),
        ("token_estimator", K, None),
        ("cost_estimator", K, None),
        ("target_batch_tokens", K, None),
        ("target_batch_cost", K, 32_000),
        ("default_token_estimate", K, None),
        ("default_cost", K, 1),
        ("max_batch_size", K, 256),
        ("min_batch_size", K, 1),
        ("batch_timeout_s", K, 0.05),
        ("max_queue_size", K, 5_000),
        ("prefetch_batches", K, 2),
    ]
    # every addition of the base class is accepted and forwarded
    base_additions = [p[0] for p in params(DynamicBatcher.__init__)[10:]]
    assert [p[0] for p in got[13:]] == base_additions


def test_submit_signatures() -> None:
    assert params(DynamicBatcher.submit)[1:] == [
        ("record", PK, E),
        ("estimated_cost", K, None),
        ("timeout_s", K, None),
        ("priority", K, 0),
        ("key", K, None),
    ]
    assert params(TokenBatcher.submit)[1:3] == [("record", PK, E), ("estimated_tokens", K, None)]
    assert params(DynamicBatcher.submit_batch)[1:3] == [("records", PK, E), ("estimated_cost", K, None)]
    assert params(DynamicBatcher.stop)[1:] == [("timeout", K, None)]
    # call() takes exactly what submit() takes, in both classes; so do the other ways in, after the record
    for cls in (DynamicBatcher, TokenBatcher):
        submit = params(cls.submit)
        assert params(cls.call) == submit
        assert params(cls.submit_nowait) == submit
        assert params(cls.submit_threadsafe) == submit
        assert params(cls.submit_batch)[2:] == submit[2:]
    assert [p[0] for p in params(TokenBatcher.submit)[2:]] == [
        "estimated_tokens",
        "estimated_cost",
        "timeout_s",
        "priority",
        "key",
    ]


SETTINGS = [
    "cost_estimator",
    "target_batch_cost",
    "max_batch_size",
    "min_batch_size",
    "batch_timeout_s",
    "max_queue_size",
    "prefetch_batches",
    "default_cost",
    "dispatch",
    "max_concurrent_batches",
    "request_timeout_s",
    "batch_cost",
    "grouping",
    "priority_aging_s",
    "latency_target_s",
    "on_batch",
    "batch_key",
    "on_batch_error",
    "stream_buffer",
    "tune",
]
"""Every setting: a constructor argument, a read-back property and a name ``configure`` takes."""
TOKEN_NAMES = ["token_estimator", "target_batch_tokens", "default_token_estimate"]


def test_every_setting_is_a_constructor_argument_a_property_and_configurable() -> None:
    from tokenbatcher._settings import SettingsChanges, TokenSettingsChanges

    constructor = {p[0] for p in params(DynamicBatcher.__init__)} - {"self", "process_fn", "executor"}
    assert constructor == set(SETTINGS)
    assert set(SettingsChanges.__annotations__) == set(SETTINGS)
    assert set(TokenSettingsChanges.__annotations__) == set(SETTINGS) | set(TOKEN_NAMES)
    assert params(DynamicBatcher.configure)[1:] == [("settings", inspect.Parameter.VAR_KEYWORD, E)]
    for cls, names in ((DynamicBatcher, SETTINGS), (TokenBatcher, SETTINGS + TOKEN_NAMES)):
        for name in names:
            member = inspect.getattr_static(cls, name)
            assert isinstance(member, property), f"{cls.__name__}.{name}"
            assert member.fset is None, f"{cls.__name__}.{name} is read-only (change it with configure)"


def test_properties_read_back_the_constructor_arguments() -> None:
    def estimate(record: Any) -> int:
        return 2

    def hook(info: Any) -> None:
        pass

    given: dict[str, Any] = {
        "cost_estimator": estimate,
        "target_batch_cost": 77,
        "max_batch_size": 9,
        "min_batch_size": 3,
        "batch_timeout_s": 1,
        "max_queue_size": 50,
        "prefetch_batches": 4,
        "default_cost": 5,
        "dispatch": "eager",
        "max_concurrent_batches": 2,
        "request_timeout_s": 30,
        "batch_cost": "padded",
        "grouping": "similar_cost",
        "priority_aging_s": 0.5,
        "latency_target_s": 0.25,
        "on_batch": hook,
        "batch_key": len,
        "on_batch_error": "isolate",
        "stream_buffer": 64,
        "tune": "throughput",
    }
    assert set(given) == set(SETTINGS)
    batcher = DynamicBatcher(echo, **given)
    for name, value in given.items():
        assert getattr(batcher, name) == value, name
    assert type(batcher.batch_timeout_s) is float  # seconds are stored as floats
    token = TokenBatcher(echo, token_estimator=estimate, target_batch_tokens=12, default_token_estimate=3)
    assert (token.token_estimator, token.target_batch_tokens, token.default_token_estimate) == (estimate, 12, 3)
    assert (token.cost_estimator, token.target_batch_cost, token.default_cost) == (estimate, 12, 3)
    defaults = TokenBatcher(echo)
    assert (defaults.token_estimator, defaults.target_batch_tokens, defaults.default_token_estimate) == (
        None,
        32_000,
        1,
    )


def test_token_batcher_requires_a_function() -> None:
    with pytest.raises(TypeError, match="requires either"):
        TokenBatcher()


def test_batch_stats_fields_defaults_and_utilization() -> None:
    stats = BatchStats()
    assert (
        stats.total_submitted,
        stats.total_completed,
        stats.total_batches,
        stats.total_batch_cost,
        stats.avg_batch_size,
        stats.avg_batch_cost,
        stats.busy_time_s,
        stats.idle_time_s,
    ) == (0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0)
    assert stats.utilization == 0.0
    assert BatchStats(busy_time_s=3.0, idle_time_s=1.0).utilization == 0.75


def test_batch_stats_is_an_immutable_snapshot() -> None:
    stats = BatchStats(total_submitted=3)
    with pytest.raises(AttributeError):
        stats.total_submitted = 4  # type: ignore[misc]


def test_prompt_estimate() -> None:
    assert Prompt("").estimate_tokens() == 1
    assert Prompt("x" * 17).estimate_tokens() == 17 // 4 + 1
    assert isinstance(Prompt("a"), TokenEstimator)
    assert not isinstance(Prompt("a"), CostEstimator)


@pytest.mark.asyncio
async def test_submit_before_start_raises_not_running() -> None:
    batcher = DynamicBatcher(echo)
    with pytest.raises(RuntimeError, match="not running"):
        await batcher.submit(1)
    assert not batcher.is_running


@pytest.mark.asyncio
async def test_start_twice_raises_already_running() -> None:
    async with DynamicBatcher(echo) as batcher:
        assert batcher.is_running
        with pytest.raises(RuntimeError, match="already running"):
            await batcher.start()
    assert not batcher.is_running


@pytest.mark.asyncio
async def test_context_manager_returns_the_batcher_and_results_reach_their_futures() -> None:
    async with DynamicBatcher(echo) as batcher:
        futures = [await batcher.submit(i) for i in range(10)]
        assert await asyncio.gather(*futures) == list(range(10))
        batch_futures = await batcher.submit_batch(["a", "b", "c"], estimated_cost=[1, 2, 3])
        assert await asyncio.gather(*batch_futures) == ["a", "b", "c"]


@pytest.mark.asyncio
async def test_submit_batch_cost_length_must_match() -> None:
    async with DynamicBatcher(echo) as batcher:
        with pytest.raises(ValueError, match="estimated_cost must have one entry per record"):
            await batcher.submit_batch([1, 2], estimated_cost=[1])


@dataclass
class Costly:
    cost: int

    def estimate_cost(self) -> int:
        return self.cost


@dataclass
class Both:
    def estimate_cost(self) -> int:
        return 100

    def estimate_tokens(self) -> int:
        return 7


async def costs_seen(batcher_factory: Any, submits: list[tuple[Any, dict[str, Any]]]) -> list[int]:
    """Submit records one batch at a time and read the cost each batch was counted at."""
    seen: list[int] = []
    batcher = batcher_factory(on_batch=lambda info: seen.append(info.cost), max_batch_size=1)
    async with batcher:
        for record, kwargs in submits:
            await (await batcher.submit(record, **kwargs))
    return seen


@pytest.mark.asyncio
async def test_dynamic_batcher_cost_precedence() -> None:
    def make(**kw: Any) -> DynamicBatcher[Any, Any]:
        return DynamicBatcher(echo, default_cost=5, **kw)

    assert await costs_seen(make, [(Costly(3), {"estimated_cost": 9}), (Costly(3), {}), ("plain", {})]) == [9, 3, 5]

    def with_estimator(**kw: Any) -> DynamicBatcher[Any, Any]:
        return DynamicBatcher(echo, cost_estimator=lambda r: 11, **kw)

    assert await costs_seen(with_estimator, [(Costly(3), {}), (Costly(3), {"estimated_cost": 2})]) == [11, 2]
    # the base class does not probe estimate_tokens
    assert await costs_seen(make, [(Both(), {}), (Prompt("x" * 40), {})]) == [100, 5]


@pytest.mark.asyncio
async def test_token_batcher_cost_precedence_and_names() -> None:
    def make(**kw: Any) -> TokenBatcher[Any, Any]:
        return TokenBatcher(inference_fn=echo, default_token_estimate=4, default_cost=99, **kw)

    got = await costs_seen(
        make,
        [
            (Both(), {"estimated_tokens": 3, "estimated_cost": 8}),
            (Both(), {"estimated_cost": 8}),
            (Both(), {}),
            (Costly(6), {}),
            (Prompt("x" * 40), {}),
            ("plain", {}),
        ],
    )
    assert got == [3, 8, 7, 6, 11, 4]

    def fallback_names(**kw: Any) -> TokenBatcher[Any, Any]:
        return TokenBatcher(process_fn=echo, cost_estimator=lambda r: 21, target_batch_cost=50, **kw)

    assert await costs_seen(fallback_names, [("x", {})]) == [21]

    def token_estimator_wins(**kw: Any) -> TokenBatcher[Any, Any]:
        return TokenBatcher(echo, token_estimator=lambda r: 2, cost_estimator=lambda r: 21, **kw)

    assert await costs_seen(token_estimator_wins, [(Both(), {})]) == [2]


@pytest.mark.asyncio
async def test_token_batcher_budget_mapping() -> None:
    sizes: list[int] = []

    async def record_sizes(batch: list[Any]) -> list[Any]:
        sizes.append(len(batch))
        return batch

    async with TokenBatcher(record_sizes, target_batch_tokens=10, target_batch_cost=1000) as batcher:
        futures = [await batcher.submit(i, estimated_tokens=5) for i in range(6)]
        await asyncio.gather(*futures)
    assert sizes == [2, 2, 2]


@pytest.mark.asyncio
async def test_process_fn_error_reaches_every_future_and_the_batcher_keeps_running() -> None:
    calls = 0

    async def flaky(batch: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("boom")
        return batch

    async with DynamicBatcher(flaky) as batcher:
        first = [await batcher.submit(i) for i in range(3)]
        for future in first:
            with pytest.raises(KeyError, match="boom"):
                await future
        assert await (await batcher.submit(7)) == 7


@pytest.mark.asyncio
async def test_wrong_result_count_is_a_value_error_on_every_future() -> None:
    async def short(batch: list[int]) -> list[int]:
        return batch[:-1]

    async with DynamicBatcher(short) as batcher:
        futures = [await batcher.submit(i) for i in range(4)]
        for future in futures:
            with pytest.raises(ValueError, match="process_fn returned 3 results for batch of 4 records"):
                await future


@pytest.mark.asyncio
async def test_call_submits_and_awaits_the_result_and_a_cancelled_call_withdraws_the_record() -> None:
    gate = asyncio.Event()
    seen: list[str] = []

    async def work(batch: list[Prompt]) -> list[str]:
        await gate.wait()
        seen.extend(p.text for p in batch)
        return [p.text.upper() for p in batch]

    async with TokenBatcher(work, dispatch="eager", max_batch_size=1) as batcher:
        first = asyncio.ensure_future(batcher.call(Prompt("a"), estimated_tokens=3))
        await asyncio.sleep(0)
        withdrawn = asyncio.ensure_future(batcher.call(Prompt("b")))
        await asyncio.sleep(0)
        withdrawn.cancel()
        await asyncio.sleep(0)
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await withdrawn
        assert await first == "A"
        assert batcher.stats.total_cancelled == 1
        with pytest.raises(ValueError, match="estimated_tokens must be a non-negative int"):
            await batcher.call(Prompt("c"), estimated_tokens=-1)
    assert seen == ["a"]
