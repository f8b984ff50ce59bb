"""``tune="throughput"`` on the real model: all-MiniLM-L6-v2 on the CPU (``tests/bench/model.py``'s set-up).

The same ``--texts`` log-uniform texts (most short, a few long) are embedded
by each variant, in two ways of feeding them:

* ``service``: ``--producers`` clients, each submitting one text and awaiting
  its embedding before the next (a closed loop: at most that many texts wait);
* ``job``: every text submitted at once, then awaited (a batch job's shard).

The variants, in one run, round-robin ``--repeats`` times (the median is shown):

* **offline best**: the texts known in advance, sorted by length and cut into
  the largest padded batches within each budget of ``--sweep``, run one after
  another: no batcher can group better; the best budget is the yardstick;
* **ours, default**: ``TokenBatcher`` with ``batch_cost="padded"``,
  ``grouping="similar_cost"``, ``dispatch="eager"`` and the default budget
  (32,000 tokens, ``max_batch_size=256``), fixed;
* **ours, tuned**: the same with ``tune="throughput"`` (the defaults are its
  ceilings);
* **ours, fixed B**: the same with ``target_batch_tokens=B`` for B in the sweep;
* **batched, length-sorted B**: mixedbread ``batched`` 0.1.5,
  ``batched.aio.dynamically`` with ``priority_strategy=LENGTH`` (shortest
  first), ``small_batch_threshold=0`` (so single texts are sorted too),
  ``max_batch_length=B`` tokens (its budget is a sum of lengths) and
  ``batch_size=256``; and with its own defaults for the limits (32 texts a
  batch, no token budget).

Texts/s is texts over wall time; the model runs in one worker thread with
``--threads`` torch threads.  Every variant's embeddings are checked against
the first one's, so a fast variant cannot be a wrong one.

Run (from the repository root, alone on the machine)::

    python -m pip install -e '.[models,bench]'
    python -m tests.bench.tuning_model [--texts 1000] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .model import load_example, loadavg, max_abs_diff, run_batcher

DEFAULT_BUDGET, DEFAULT_SIZE = 32_000, 256
BATCHED_DEFAULTS = "batched, length-sorted, its defaults"
TUNED, DEFAULT = "ours, tuned (ceiling 32,000)", "ours, default (32,000)"


@dataclass
class Variant:
    name: str
    run: Callable[[Sequence[str], str], Awaitable[list[Any]]]
    """Embed the texts fed the given way (``service`` or ``job``); the embeddings in text order."""
    budget: int | None = None


def offline_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices sorted by length, cut into the largest runs whose padded size fits ``budget``."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[i] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def build(ex: Any, model: Any, args: argparse.Namespace) -> list[Variant]:
    """Every variant (see the module docstring)."""
    from tokenbatcher import TokenBatcher

    def ours(budget: int, **settings: Any) -> Callable[[Sequence[str], str], Awaitable[list[Any]]]:
        def make(fn: Any) -> Any:
            return TokenBatcher(
                inference_fn=fn,
                token_estimator=model.count_tokens,
                target_batch_tokens=budget,
                batch_cost="padded",
                grouping="similar_cost",
                dispatch="eager",
                max_queue_size=max(args.texts, 1),
                **settings,
            )

        async def run(texts: Sequence[str], feed: str) -> list[Any]:
            if feed == "service":
                results, stats = await run_batcher(ex, model, texts, make, args.producers)
            else:
                results, stats = await run_job(ex, model, texts, make)
            last_stats.clear()
            last_stats.append(stats)
            return results

        return run

    def offline(budget: int) -> Callable[[Sequence[str], str], Awaitable[list[Any]]]:
        async def run(texts: Sequence[str], feed: str) -> list[Any]:
            del feed  # everything is known in advance
            lengths = [model.count_tokens(t) for t in texts]
            results: list[Any] = [None] * len(texts)
            worker = ex.ModelWorker(model)
            try:
                for batch in offline_batches(lengths, budget):
                    for i, embedding in zip(batch, await worker.embed([texts[i] for i in batch]), strict=True):
                        results[i] = embedding
            finally:
                worker.close()
            return results

        return run

    def mixedbread(budget: int | None) -> Callable[[Sequence[str], str], Awaitable[list[Any]]]:
        async def run(texts: Sequence[str], feed: str) -> list[Any]:
            return await run_batched(ex, model, texts, budget, feed, args.producers)

        return run

    sweep = [int(b) for b in args.sweep.split(",")]
    variants = [Variant(f"offline sorted {b:,}", offline(b), b) for b in sweep]
    variants.append(Variant(DEFAULT, ours(DEFAULT_BUDGET)))
    variants.append(Variant(TUNED, ours(DEFAULT_BUDGET, tune="throughput")))
    variants += [Variant(f"ours, fixed {b:,}", ours(b), b) for b in sweep]
    variants += [Variant(f"batched, length-sorted {b:,}", mixedbread(b), b) for b in sweep]
    variants.append(Variant(BATCHED_DEFAULTS, mixedbread(None)))
    return variants


last_stats: list[Any] = []
"""The stats of our last run (read for the tuned budget)."""


async def run_job(ex: Any, model: Any, texts: Sequence[str], make: Callable[[Any], Any]) -> tuple[list[Any], Any]:
    """Every text submitted at once, then every embedding awaited."""
    worker = ex.ModelWorker(model)
    batcher = make(worker.embed)
    try:
        async with batcher:
            futures = [await batcher.submit(text) for text in texts]
            results = list(await asyncio.gather(*futures))
    finally:
        worker.close()
    return results, batcher.stats


async def run_batched(
    ex: Any, model: Any, texts: Sequence[str], budget: int | None, feed: str, producers: int
) -> list[Any]:
    """mixedbread ``batched``'s length-sorted dynamic batching, fed like ours (``budget=None``: its defaults)."""
    import dataclasses

    from batched.aio import dynamically
    from batched.aio.batch_generator import AsyncBatchItem
    from batched.types import PriorityStrategy

    @dataclasses.dataclass
    class TokenItem(AsyncBatchItem[str, Any]):  # type: ignore[misc]
        def __len__(self) -> int:  # its budget counts tokens, as ours does
            return int(model.count_tokens(self.content))

    worker = ex.ModelWorker(model)
    try:
        limits = {} if budget is None else {"batch_size": DEFAULT_SIZE, "max_batch_length": budget}
        embed = dynamically(
            worker.embed,
            small_batch_threshold=0,
            priority_strategy=PriorityStrategy.LENGTH,
            batch_item_cls=TokenItem,
            **limits,
        )
        if feed == "job":
            return list(await embed(list(texts)))

        async def submit(text: str) -> asyncio.Future[Any]:
            return asyncio.ensure_future(embed(text))

        results = await ex.serve(submit, texts, producers)
        embed._task.cancel()  # its batch loop runs forever
        return list(results)
    finally:
        worker.close()


def main(argv: list[str] | None = None) -> None:
    """Print a markdown table per feed; with ``--json``, save every figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--producers", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sweep", default="256,512,1024,2048,4096", help="fixed budgets (comma-separated)")
    parser.add_argument("--feeds", default="service,job", help="service, job or both (comma-separated)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="save the figures here")
    args = parser.parse_args(argv)

    ex = load_example()
    model = ex.MiniLM(threads=args.threads)
    texts = ex.make_texts(model, ex.text_lengths(args.texts, mix="loguniform", seed=args.seed), seed=args.seed)
    variants = build(ex, model, args)
    asyncio.run(run_batcher(ex, model, texts[:64], lambda fn: _warm(fn, model), args.producers))
    began = time.perf_counter()
    result: dict[str, Any] = {
        "texts": args.texts,
        "producers": args.producers,
        "threads": args.threads,
        "repeats": args.repeats,
        "feeds": {},
    }
    for feed in args.feeds.split(","):
        rows: dict[str, dict[str, Any]] = {v.name: {"rates": []} for v in variants}
        reference: list[Any] | None = None
        for _ in range(args.repeats):
            for v in variants:
                model.log.clear()
                load = loadavg()
                started = time.perf_counter()
                embeddings = asyncio.run(v.run(texts, feed))
                rate = len(texts) / (time.perf_counter() - started)
                if reference is None:
                    reference = embeddings
                elif (diff := max_abs_diff(reference, embeddings)) > 1e-4:
                    raise AssertionError(f"{v.name}: embeddings differ from the first variant's by {diff}")
                row = rows[v.name]
                row["rates"].append(rate)
                row.update(model.log.summary(), load=load)
                if v.name.startswith("ours") and last_stats:
                    row["tuned_budget"] = last_stats[0].tuned_budget
                print(f"  [{feed}] {v.name}: {rate:.1f} texts/s (load {load:.2f})", flush=True)
        result["feeds"][feed] = rows
        print(table(feed, rows, result))
    print(f"took {time.perf_counter() - began:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


def _warm(fn: Any, model: Any) -> Any:
    from tokenbatcher import TokenBatcher

    return TokenBatcher(inference_fn=fn, token_estimator=model.count_tokens, target_batch_tokens=4096)


def format_report(result: dict[str, Any]) -> str:
    """The benchmarks page's section: a table per feed (``python -m tests.bench --from-json`` renders it)."""
    loads = [row["load"] for rows in result["feeds"].values() for row in rows.values() if "load" in row]
    head = (
        f"all-MiniLM-L6-v2, {result['threads']} torch thread(s), texts/s; each variant run "
        f"{result['repeats']} time(s), round-robin, the median shown; load average {min(loads):.1f}-"
        f"{max(loads):.1f} on 2 cores as the variants started (the benchmark itself keeps both busy)."
    )
    return "\n".join([head, *(table(feed, rows, result) for feed, rows in result["feeds"].items())])


def table(feed: str, rows: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """The markdown table of one feed, with the goals' ratios."""
    median = {name: statistics.median(row["rates"]) for name, row in rows.items()}
    offline = max(v for k, v in median.items() if k.startswith("offline"))
    swept = {k: v for k, v in median.items() if k.startswith("batched") and k != BATCHED_DEFAULTS}
    best_batched = max(swept, key=swept.__getitem__)
    clients = f"{meta['producers']} clients, one text each at a time"
    how = clients if feed == "service" else "every text queued at once"
    lines = [
        f"\n**{feed}**: {meta['texts']} log-uniform texts, {how}\n",
        "| variant | texts/s | of offline best | texts per call | padding | tuned budget at the end |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        tuned = f"{row['tuned_budget']:,}" if row.get("tuned_budget") else "-"
        lines.append(
            f"| {name} | {median[name]:.1f} | {median[name] / offline:.0%} | {row.get('mean_size', 0):.1f} | "
            f"{row.get('padding_share', 0):.0%} | {tuned} |"
        )
    tuned = median[TUNED]
    at_4096 = median.get("batched, length-sorted 4,096")
    lines.append(
        f"\ntuned: {tuned / offline:.0%} of the offline best (goal 95%); {tuned / median[DEFAULT]:.2f}x the default; "
        f"against `batched` (goal 1.1x): {tuned / median[best_batched]:.2f}x its best budget ({best_batched}), "
        f"{tuned / median[BATCHED_DEFAULTS]:.2f}x its defaults"
        + (f", {tuned / at_4096:.2f}x at 4,096" if at_4096 else "")
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
