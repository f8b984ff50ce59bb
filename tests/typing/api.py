"""Type-checked, never run: the public API as a user's code sees it.

mypy --strict and pyright (strict) check this file; ``assert_type`` pins what
each call returns, so a change in the generics breaks the type check.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass

from typing_extensions import assert_type

from tokenbatcher import (
    BatchInfo,
    BatchStats,
    CostEstimator,
    DispatchReason,
    DynamicBatcher,
    OverloadedError,
    Percentiles,
    Prompt,
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
