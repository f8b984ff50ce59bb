"""``python -m tokenbatcher``: a simulated LLM service, batched and unbatched.

Many concurrent clients send prompts of varied lengths to one simulated GPU
whose time per call grows with the tokens in the call (a fixed launch cost
plus a cost per token).  The same workload then goes through unbatched, one
prompt per call, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TextIO

from ._stats import BatchStats
from ._token import TokenBatcher
from ._types import Prompt

WORDS = "the model reads every token of a prompt and pads the short ones to the longest in its batch".split()


class SimulatedGPU:
    """One device: a call costs ``launch_s`` plus ``per_token_s`` for each token, one call at a time."""

    def __init__(self, launch_s: float, per_token_s: float) -> None:
        self.launch_s = launch_s
        self.per_token_s = per_token_s
        self._device = asyncio.Lock()

    async def generate(self, batch: list[Prompt]) -> list[str]:
        tokens = sum(p.estimate_tokens() for p in batch)
        async with self._device:
            await asyncio.sleep(self.launch_s + self.per_token_s * tokens)
        return [f"completion of {p.estimate_tokens()} tokens" for p in batch]


def make_prompts(count: int, seed: int) -> list[Prompt]:
    rng = random.Random(seed)
    # Mostly short prompts, some long: roughly log-uniform from 4 to 1,000 tokens.
    return [Prompt(" ".join(rng.choices(WORDS, k=int(10 ** rng.uniform(0.5, 3.0))))) for _ in range(count)]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def run_clients(prompts: list[Prompt], clients: int, send: Callable[[Prompt], Awaitable[object]]) -> list[float]:
    """Split ``prompts`` among ``clients`` tasks that each send theirs one by one; return latencies."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []

    async def client(mine: list[Prompt]) -> None:
        for prompt in mine:
            started = loop.time()
            await send(prompt)
            latencies.append(loop.time() - started)

    await asyncio.gather(*(client(prompts[i::clients]) for i in range(clients)))
    return latencies


async def progress(batcher: TokenBatcher[Prompt, str], total: int, stream: TextIO, every_s: float) -> None:
    started = time.perf_counter()
    while True:
        await asyncio.sleep(every_s)
        stats = batcher.stats
        rate = stats.total_completed / (time.perf_counter() - started)
        print(
            f"  {stats.total_completed:>6}/{total} done · {stats.total_batches} batches · "
            f"queue {stats.queue_depth:>4} · {rate:,.0f} prompts/s",
            file=stream,
            flush=True,
        )


async def demo(args: argparse.Namespace) -> BatchStats:
    prompts = make_prompts(args.records, args.seed)
    gpu = SimulatedGPU(args.launch_ms / 1000, args.per_token_us / 1e6)
    out = sys.stdout
    print(
        f"tokenbatcher demo: {args.clients} clients send {args.records} prompts "
        f"({sum(p.estimate_tokens() for p in prompts):,} tokens) to one simulated GPU\n"
        f"  GPU call = {args.launch_ms} ms + {args.per_token_us} µs/token; "
        f"budget {args.budget:,} tokens/batch; batch_timeout_s={args.timeout}; dispatch={args.dispatch!r}\n",
        file=out,
    )
    batcher = TokenBatcher(
        inference_fn=gpu.generate,
        target_batch_tokens=args.budget,
        batch_timeout_s=args.timeout,
        dispatch=args.dispatch,
    )

    async def send_batched(prompt: Prompt) -> str:
        return await (await batcher.submit(prompt))

    async with batcher:
        reporter = asyncio.create_task(progress(batcher, args.records, out, args.progress_s))
        started = time.perf_counter()
        batched = await run_clients(prompts, args.clients, send_batched)
        batched_s = time.perf_counter() - started
        reporter.cancel()
        stats = batcher.stats

    sample = prompts[: max(1, args.records // 10)]
    print(f"\n  now unbatched, one prompt per GPU call, on the first {len(sample)} prompts ...", file=out)
    started = time.perf_counter()
    unbatched = await run_clients(sample, args.clients, lambda p: gpu.generate([p]))
    unbatched_s = time.perf_counter() - started

    rate, rate_alone = len(batched) / batched_s, len(unbatched) / unbatched_s
    rows = [
        ("prompts/s", f"{rate:,.0f}", f"{rate_alone:,.0f}"),
        ("latency p50", f"{percentile(batched, 0.5) * 1000:,.1f} ms", f"{percentile(unbatched, 0.5) * 1000:,.1f} ms"),
        ("latency p99", f"{percentile(batched, 0.99) * 1000:,.1f} ms", f"{percentile(unbatched, 0.99) * 1000:,.1f} ms"),
        ("GPU calls", f"{stats.total_batches:,}", f"{len(unbatched):,}"),
    ]
    print("\nSummary", file=out)
    print(f"  {'':<14}{'batched':>14}{'unbatched':>14}", file=out)
    for name, a, b in rows:
        print(f"  {name:<14}{a:>14}{b:>14}", file=out)
    print(
        f"\n  {stats.total_batches} batches, {stats.avg_batch_size:.1f} prompts and "
        f"{stats.avg_batch_cost:,.0f} tokens each on average "
        f"({stats.avg_batch_cost / args.budget:.0%} of the {args.budget:,}-token budget)\n"
        f"  GPU utilization {stats.utilization:.0%}; "
        f"batching was {rate / rate_alone:.1f}x the throughput of one prompt at a time "
        f"(mean latency {statistics.fmean(batched) * 1000:.1f} ms)",
        file=out,
    )
    return stats


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tokenbatcher",
        description="Simulate an LLM service: concurrent clients, one GPU, token-budgeted batches.",
    )
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--records", type=int, default=3000, help="prompts in all (default 3000)")
    parser.add_argument("--budget", type=int, default=8192, help="target_batch_tokens (default 8192)")
    parser.add_argument("--timeout", type=float, default=0.02, help="batch_timeout_s (default 0.02)")
    parser.add_argument("--dispatch", choices=["window", "eager"], default="eager", help="dispatch (default eager)")
    parser.add_argument("--launch-ms", type=float, default=8.0, help="fixed GPU cost per call, ms (default 8)")
    parser.add_argument("--per-token-us", type=float, default=3.0, help="GPU cost per token, µs (default 3)")
    parser.add_argument("--seed", type=int, default=7, help="random seed for the prompts")
    parser.add_argument("--progress-s", type=float, default=0.5, help="seconds between progress lines")
    args = parser.parse_args(argv)
    for name in ("clients", "records", "budget"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return the process exit code."""
    asyncio.run(demo(parse(argv)))
    return 0
