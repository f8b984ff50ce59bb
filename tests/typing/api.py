"""Type-checked, never run: the public API as a user's code sees it.

mypy --strict and pyright (strict) check this file; ``assert_type`` pins what
each call returns, so a change in the generics breaks the type check.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from typing_extensions import assert_type

from tokenbatcher import (
    END,
    BatchInfo,
    BatchStats,
    CostEstimator,
    Dispatch,
    DispatchReason,
    DynamicBatcher,
    End,
    OnBatchError,
    OverloadedError,
    Percentiles,
    Prompt,
    Stream,
    StreamBatch,
    StreamOverflowError,
    TokenBatcher,
    TokenEstimator,
)


async def lengths(batch: list[str]) -> list[int]:
    return [len(s) for s in batch]


async def completions(batch: list[Prompt]) -> list[str]:
    return [p.text for p in batch]


@dataclass
class Doc:
    body: str

    def estimate_tokens(self) -> int:
        return len(self.body) // 4


async def embed(batch: list[Doc]) -> list[list[float]]:
    return [[0.0] for _ in batch]


def on_batch(info: BatchInfo) -> None:
    assert_type(info.size, int)
    assert_type(info.reason, DispatchReason)


async def dynamic() -> None:
    batcher: DynamicBatcher[str, int] = DynamicBatcher(lengths, cost_estimator=len, on_batch=on_batch)
    async with batcher as b:
        assert_type(b, DynamicBatcher[str, int])
        future = await b.submit("abc", estimated_cost=3, timeout_s=1.0, priority=-1)
        assert_type(future, asyncio.Future[int])
        assert_type(await future, int)
        assert_type(b.submit_nowait("x"), asyncio.Future[int])
        assert_type(await b.submit_batch(["a", "b"]), list[asyncio.Future[int]])
        assert_type(b.submit_threadsafe("x"), concurrent.futures.Future[int])
        stats = b.stats
        assert_type(stats, BatchStats)
        assert_type(await b.stats, BatchStats)
        assert_type(stats.utilization, float)
        assert_type(stats.queue_wait_s, Percentiles)
    await batcher.stop(timeout=5.0)


async def token() -> None:
    inferred = TokenBatcher(inference_fn=completions, target_batch_tokens=32_000, dispatch="eager")
    assert_type(inferred, TokenBatcher[Prompt, str])
    async with inferred as b:
        assert_type(await (await b.submit(Prompt("hi"), estimated_tokens=2)), str)
    docs = TokenBatcher(embed, batch_cost="padded", grouping="similar_cost", max_concurrent_batches=2)
    assert_type(docs, TokenBatcher[Doc, list[float]])


async def targeted() -> float:
    async with DynamicBatcher(lengths, dispatch="eager", latency_target_s=0.06) as b:
        assert_type(b.stats.predicted_wait_s, float)
        assert_type(b.stats.duration_samples, int)
        try:
            return float(await b.call("abc"))
        except OverloadedError as error:
            assert_type(error.retry_after_s, float)
            return error.retry_after_s


def protocols(doc: Doc, prompt: Prompt) -> tuple[TokenEstimator, TokenEstimator, bool]:
    return doc, prompt, isinstance(doc, CostEstimator)


async def decode(batch: StreamBatch[Prompt]) -> AsyncIterator[list[str | End]]:
    for step in range(3):
        yield [p.text[step:] if batch.wanted(i) and step < len(p.text) else END for i, p in enumerate(batch)]


async def measure(batch: list[str]) -> AsyncIterator[tuple[int, ...]]:  # a plain list, never END
    yield tuple(len(s) for s in batch)


async def streams() -> None:
    tokens = TokenBatcher(decode, stream_buffer=1_000, max_batch_size=8)
    assert_type(tokens, TokenBatcher[Prompt, str])
    async with tokens as b:
        stream = await b.submit_stream(Prompt("hi"), estimated_tokens=2, timeout_s=1.0, priority=1, key="a")
        assert_type(stream, Stream[str])
        async with contextlib.aclosing(stream):
            async for token in stream:
                assert_type(token, str)
    lengths_of = DynamicBatcher(measure)
    assert_type(lengths_of, DynamicBatcher[str, int])
    async with lengths_of as b:
        assert_type(await anext(await b.submit_stream("abc")), int)
    entry: str | End = END
    if entry is not END:
        assert_type(entry, str)
    error: RuntimeError = StreamOverflowError("behind")
    del error


async def configured() -> None:
    batcher = DynamicBatcher(lengths, batch_key=len, on_batch_error="isolate")
    assert_type(batcher.max_batch_size, int)
    assert_type(batcher.batch_timeout_s, float)
    assert_type(batcher.request_timeout_s, float | None)
    assert_type(batcher.dispatch, Dispatch)
    assert_type(batcher.on_batch_error, OnBatchError)
    batcher.configure(max_batch_size=64, batch_timeout_s=0.01, grouping="similar_cost", batch_key=None)
    batcher.configure(target_batch_tokens=10)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
    batcher.configure(max_batch_size="64")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    async with batcher as b:
        assert_type(await b.submit("abc", key="model-a"), asyncio.Future[int])
        assert_type(await b.call("abc", key=("tenant", 3)), int)
        assert_type(b.submit_nowait("x", key=7), asyncio.Future[int])
        assert_type(await b.submit_batch(["a"], key="k"), list[asyncio.Future[int]])
        assert_type(b.submit_threadsafe("x", key="k"), concurrent.futures.Future[int])
    stats = batcher.stats
    assert_type(stats.total_retries, int)
    assert_type(stats.total_isolated_failures, int)
    tokens = TokenBatcher(completions, batch_key=lambda p: p.text[:1])
    tokens.configure(target_batch_tokens=8_000, token_estimator=None, default_token_estimate=4)
    assert_type(tokens.target_batch_tokens, int)
    assert_type(await (await tokens.submit(Prompt("x"), estimated_tokens=1, key="a")), str)
