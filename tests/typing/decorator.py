"""Type-checked, never run: ``@batched`` keeps the record and result types.

mypy --strict and pyright (strict) check this file; ``assert_type`` pins what
each call returns.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from typing_extensions import assert_type

from tokenbatcher import END, BatchStats, End, Prompt, Stream, StreamBatch, TokenBatcher, batched


@batched(target_batch_tokens=8_000, max_batch_size=64, dispatch="eager")
async def embed(prompts: list[Prompt]) -> list[list[float]]:
    return [[0.0] for _ in prompts]


@batched
async def lengths(texts: list[str]) -> list[int]:
    return [len(t) for t in texts]


@batched(executor=concurrent.futures.ThreadPoolExecutor(2))
def encode(texts: list[str]) -> list[bytes]:  # a plain function: runs in a worker thread
    return [t.encode() for t in texts]


async def _upper(texts: list[str]) -> list[str]:
    return [t.upper() for t in texts]


def flyte_style(texts: list[str]) -> Coroutine[Any, Any, list[str]]:
    return _upper(texts)


upper = batched(max_batch_size=8)(flyte_style)


class Model:
    def __init__(self, scale: float) -> None:
        self.scale = scale

    @batched(max_batch_size=32)
    async def predict(self, xs: list[float]) -> list[float]:
        return [x * self.scale for x in xs]

    @batched
    def classify(self, xs: list[float]) -> list[bool]:
        return [x > self.scale for x in xs]


@batched(max_batch_size=16, stream_buffer=512)
async def generate(prompts: StreamBatch[str]) -> AsyncIterator[list[str | End]]:
    yield [p if prompts.wanted(i) else END for i, p in enumerate(prompts)]


@batched
async def spell(words: list[str]) -> AsyncIterator[list[str]]:
    yield [w[:1] for w in words]


class Decoder:
    @batched(max_batch_size=4)
    async def tokens(self, prompts: StreamBatch[str]) -> AsyncIterator[list[int | End]]:
        yield [len(p) for p in prompts]


async def streams(decoder: Decoder) -> None:
    assert_type(await generate("once"), Stream[str])
    async for token in await generate("upon", estimated_tokens=2, priority=1):
        assert_type(token, str)
    assert_type(await spell("abc"), Stream[str])
    assert_type(await decoder.tokens("a time"), Stream[int])


async def calls(model: Model) -> None:
    assert_type(await embed(Prompt("hi")), list[float])
    assert_type(await embed(Prompt("hi"), estimated_tokens=3, timeout_s=1.0, priority=-1), list[float])
    assert_type(await embed(Prompt("hi"), key="adapter-7"), list[float])
    assert_type(await lengths("abc", estimated_cost=1), int)
    assert_type(await encode("abc"), bytes)
    assert_type(await upper("abc"), str)
    assert_type(await model.predict(2.0), float)
    assert_type(await model.classify(2.0), bool)
    assert_type(embed.batcher, TokenBatcher[Prompt, list[float]])
    assert_type(model.predict.batcher, TokenBatcher[float, float])
    assert_type(embed.batcher.stats, BatchStats)
    await embed.aclose()
    await model.predict.aclose()


async def misuse(model: Model) -> None:
    await lengths(3)  # type: ignore[arg-type]
    await model.predict("x")  # type: ignore[arg-type]
    await embed(Prompt("hi"), priority="high")  # type: ignore[arg-type]
    batched(max_batch_size="8")  # type: ignore[call-overload]
    batched(max_batch_sise=8)  # type: ignore[call-overload]
