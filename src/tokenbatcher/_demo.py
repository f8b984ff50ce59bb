"""``python -m tokenbatcher``: a simulated LLM service, batched and unbatched.

Many concurrent clients send prompts of varied lengths to one simulated GPU
whose time per call grows with the tokens in the call (a fixed launch cost
plus a cost per token).  Then the same clients send prompts unbatched, one
prompt per call, for comparison: both passes run the same number of clients
at once, so neither is given less concurrency than the other.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from ._stats import BatchStats
from ._token import TokenBatcher
from ._types import Prompt

WORDS = "the model reads every token of a prompt and pads the short ones to the longest in its batch".split()

UNBATCHED_SHARE = 10
"""The unbatched pass sends 1/UNBATCHED_SHARE of the prompts (it is the slow one) ..."""
UNBATCHED_PER_CLIENT = 3
"""... but at least this many per client, so that its clients run in a steady state as the batched ones do."""


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


@dataclass(frozen=True)
class DemoResult:
    """What one run of the demo measured (latencies in seconds)."""

    stats: BatchStats
    batched: list[float]
    unbatched: list[float]
    clients: int
    """Clients sending at once in each pass: ``--clients``, or fewer when there are fewer prompts."""


def plural(count: int, noun: str, nouns: str = "") -> str:
    """``"1 prompt"``, ``"3,000 prompts"``; ``nouns`` for an irregular plural (``"batches"``)."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


def make_prompts(count: int, seed: int) -> list[Prompt]:
    rng = random.Random(seed)
    # Mostly short prompts, some long: roughly log-uniform from 4 to 1,000 tokens.
    return [Prompt(" ".join(rng.choices(WORDS, k=int(10 ** rng.uniform(0.5, 3.0))))) for _ in range(count)]


def unbatched_sample_size(records: int, clients: int) -> int:
    """How many prompts the unbatched pass sends: every client of the batched pass busy, a few times over."""
    return min(records, max(records // UNBATCHED_SHARE, UNBATCHED_PER_CLIENT * clients))


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
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        await asyncio.sleep(every_s)
        stats = batcher.stats
        rate = stats.total_completed / (loop.time() - started)
        print(
            f"  {stats.total_completed:>6}/{total} done · {plural(stats.total_batches, 'batch', 'batches')} · "
            f"queue {stats.queue_depth:>4} · {rate:,.0f} prompts/s",
            file=stream,
            flush=True,
        )


async def demo(args: argparse.Namespace, stream: TextIO | None = None) -> DemoResult:
    """Run the batched pass, then the unbatched one, and print both to ``stream`` (default: stdout)."""
    out = sys.stdout if stream is None else stream
    loop = asyncio.get_running_loop()
    prompts = make_prompts(args.records, args.seed)
    clients = min(args.clients, len(prompts))
    gpu = SimulatedGPU(args.launch_ms / 1000, args.per_token_us / 1e6)
    print(
        f"tokenbatcher demo: {plural(args.records, 'prompt')} "
        f"({plural(sum(p.estimate_tokens() for p in prompts), 'token')}) "
        f"from {plural(clients, 'concurrent client')} to one simulated GPU\n"
        f"  GPU call = {args.launch_ms:g} ms + {args.per_token_us:g} µs/token; "
        f"budget {args.budget:,} tokens/batch; batch_timeout_s={args.timeout:g}; dispatch={args.dispatch!r}",
        file=out,
    )
    too_big = sum(p.estimate_tokens() > args.budget for p in prompts)
    if too_big:
        cost, each = ("costs", "it is") if too_big == 1 else ("cost", "each is")
        print(
            f"  {plural(too_big, 'prompt')} {cost} more than the {args.budget:,}-token budget: "
            f"{each} sent alone, in a batch of its own",
            file=out,
        )
    print(file=out)
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
        started = loop.time()
        batched = await run_clients(prompts, clients, send_batched)
        batched_s = loop.time() - started
        reporter.cancel()
        stats = batcher.stats

    sample = prompts[: unbatched_sample_size(len(prompts), clients)]
    which = "the same" if len(sample) == len(prompts) else "the first"
    print(
        f"\n  now unbatched, one prompt per GPU call: {which} {plural(len(sample), 'prompt')} "
        f"from the same {plural(clients, 'concurrent client')} ...",
        file=out,
    )
    started = loop.time()
    unbatched = await run_clients(sample, clients, lambda p: gpu.generate([p]))
    unbatched_s = loop.time() - started

    rate, rate_alone = len(batched) / batched_s, len(unbatched) / unbatched_s
    rows = [
        ("prompts/s", f"{rate:,.0f}", f"{rate_alone:,.0f}"),
        ("latency p50", f"{percentile(batched, 0.5) * 1000:,.1f} ms", f"{percentile(unbatched, 0.5) * 1000:,.1f} ms"),
        ("latency p99", f"{percentile(batched, 0.99) * 1000:,.1f} ms", f"{percentile(unbatched, 0.99) * 1000:,.1f} ms"),
        ("GPU calls", f"{stats.total_batches:,}", f"{len(unbatched):,}"),
    ]
    print(f"\nSummary (both passes: {plural(clients, 'client')} sending at once)", file=out)
    print(f"  {'':<14}{'batched':>14}{'unbatched':>14}", file=out)
    for name, a, b in rows:
        print(f"  {name:<14}{a:>14}{b:>14}", file=out)
    print(
        f"\n  {plural(stats.total_batches, 'batch', 'batches')}, {stats.avg_batch_size:.1f} prompts and "
        f"{stats.avg_batch_cost:,.0f} tokens each on average "
        f"({stats.avg_batch_cost / args.budget:.0%} of the {args.budget:,}-token budget)\n"
        f"  GPU utilization {stats.utilization:.0%}; "
        f"batching was {rate / rate_alone:.1f}x the throughput of one prompt at a time "
        f"(mean latency {statistics.fmean(batched) * 1000:.1f} ms)",
        file=out,
    )
    return DemoResult(stats=stats, batched=batched, unbatched=unbatched, clients=clients)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The demo's flags; a bad value exits with argparse's usage and a message naming the flag."""
    parser = argparse.ArgumentParser(
        prog="python -m tokenbatcher",
        description="Simulate an LLM service: concurrent clients, one GPU, token-budgeted batches.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients")
    parser.add_argument("--records", type=int, default=3000, help="prompts in all")
    parser.add_argument("--budget", type=int, default=8192, help="target_batch_tokens: tokens per batch")
    parser.add_argument("--timeout", type=float, default=0.02, help="batch_timeout_s, in seconds")
    parser.add_argument("--dispatch", choices=["window", "eager"], default="eager", help="dispatch")
    parser.add_argument("--launch-ms", type=float, default=8.0, help="fixed GPU cost per call, ms")
    parser.add_argument("--per-token-us", type=float, default=3.0, help="GPU cost per token, µs")
    parser.add_argument("--seed", type=int, default=7, help="random seed for the prompts")
    parser.add_argument("--progress-s", type=float, default=0.5, help="seconds between progress lines")
    args = parser.parse_args(argv)
    for name in ("clients", "records", "budget"):
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    for name, positive in (("timeout", False), ("launch_ms", False), ("per_token_us", False), ("progress_s", True)):
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            parser.error(f"{flag} must be a finite number {'> 0' if positive else '>= 0'}, got {value:g}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return the process exit code."""
    asyncio.run(demo(parse(argv)))
    return 0
