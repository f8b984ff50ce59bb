"""``tune="throughput"`` on the real model: all-MiniLM-L6-v2 on the CPU (``tests/bench/model.py``'s set-up).

Ours with ``batch_cost="padded"``, ``grouping="similar_cost"``,
``dispatch="eager"``, fed by ``--producers`` clients with ``--texts``
log-uniform texts (most short, a few long), at:

* the default budget (32,000 tokens, ``max_batch_size=256``), fixed;
* the same ceilings, ``tune="throughput"``;
* fixed budgets of a sweep (``--sweep``), for the best fixed budget.

Texts/s is texts over wall time, the model in one worker thread with
``--threads`` torch threads; on a shared machine every figure is a loaded
one.  Not here (left for later): the offline sorted-batch sweep and
mixedbread ``batched`` of the issue.

Run: ``python -m tests.bench.tuning_model [--texts 600] [--producers 32]``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from .model import load_example, run_batcher


def main(argv: list[str] | None = None) -> None:
    """Print a markdown table of texts/s."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=600)
    parser.add_argument("--producers", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sweep", default="1024,4096", help="fixed budgets to compare (comma-separated)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from tokenbatcher import TokenBatcher

    ex = load_example()
    model = ex.MiniLM(threads=args.threads)
    texts = ex.make_texts(model, ex.text_lengths(args.texts, mix="loguniform", seed=args.seed), seed=args.seed)

    def make(budget: int, **settings: Any) -> Any:
        def build(fn: Any) -> Any:
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

        return build

    variants = {"default 32,000": make(32_000), "tuned (ceiling 32,000)": make(32_000, tune="throughput")}
    variants.update({f"fixed {int(b):,}": make(int(b)) for b in args.sweep.split(",")})
    asyncio.run(run_batcher(ex, model, texts[:64], make(4_096), args.producers))  # warm the model up
    print(f"all-MiniLM-L6-v2, {args.texts} log-uniform texts, {args.producers} producers, texts/s (loaded machine)\n")
    print("| variant | texts/s | mean batch | final tuned budget |")
    print("|---|---|---|---|")
    for name, build in variants.items():
        started = time.perf_counter()
        _, stats = asyncio.run(run_batcher(ex, model, texts, build, args.producers))
        rate = len(texts) / (time.perf_counter() - started)
        tuned = f"{stats.tuned_budget:,}" if stats.tuned_budget else "-"
        print(f"| {name} | {rate:.1f} | {stats.avg_batch_size:.1f} | {tuned} |", flush=True)


if __name__ == "__main__":
    main()
