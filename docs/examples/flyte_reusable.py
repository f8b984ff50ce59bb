"""One TokenBatcher shared by many concurrent Flyte task invocations.

A reusable Flyte environment (``flyte.ReusePolicy``) keeps its worker
processes alive between task invocations and runs up to ``concurrency``
invocations at once in each replica.  Build the batcher once per process with
an ``alru_cache(maxsize=1)`` coroutine: every invocation that lands in that
process awaits the same batcher, so records from different invocations share
batches -- one model call serves all of them.

Run it locally (no cluster, no network), from a clone of the repository, at its root::

    python -m pip install '.[flyte]'
    python docs/examples/flyte_reusable.py --invocations 40 --prompts 6

In local mode ``flyte.run`` executes every task call as a coroutine on one
event loop that lives in a background thread, so all invocations share the
singleton just as the invocations on one replica of a cluster do.

Lifetime of the singleton: on a cluster the batcher lives as long as the
replica's process, and Flyte ends that process when the replica has been idle
for ``idle_ttl``; every invocation has awaited its own results before it
returned, so nothing is lost then.  A local script exits right after its
runs, so it runs one more task, :func:`shutdown`, on the same event loop: it
stops the batcher (draining it), clears the cache and reports the final stats.
That way no batcher task is left pending when the interpreter exits.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import flyte
from async_lru import alru_cache

from tokenbatcher import TokenBatcher

# --------------------------------------------------------------------- records and the model


@dataclass(frozen=True)
class Request:
    """One prompt, tagged with the task invocation that submitted it."""

    invocation: int
    text: str

    def estimate_tokens(self) -> int:
        return len(self.text) // 4 + 1


@dataclass(frozen=True)
class Reply:
    """The model's answer to one request, and which batch computed it."""

    text: str
    batch_id: str
    """``pid:batcher:batch``, unique across replicas and batcher instances."""
    batch_size: int
    batch_invocations: int
    """How many different task invocations had records in that batch."""


_batchers_built = itertools.count(1)


def make_model(batcher_no: int) -> Callable[[list[Request]], Awaitable[list[Reply]]]:
    """A simulated LLM: one call per batch, time proportional to its tokens."""
    batch_numbers = itertools.count(1)
    pid = os.getpid()

    async def generate(batch: list[Request]) -> list[Reply]:
        tokens = sum(r.estimate_tokens() for r in batch)
        await asyncio.sleep(0.004 + 20e-6 * tokens)  # the "GPU" time of one forward pass
        batch_id = f"{pid}:{batcher_no}:{next(batch_numbers)}"
        invocations = len({r.invocation for r in batch})
        return [Reply(r.text.upper()[:24], batch_id, len(batch), invocations) for r in batch]

    return generate


# --------------------------------------------------------------------- the per-process singleton


@alru_cache(maxsize=1)
async def get_batcher() -> TokenBatcher[Request, Reply]:
    """The process-wide batcher, built and started by the first caller.

    Concurrent first calls share one pending build (async-lru runs the body
    once), so exactly one batcher exists per process and event loop.  The
    batcher binds to the loop that started it; Flyte runs every invocation
    of a process on that one loop.
    """
    generate = make_model(next(_batchers_built))
    batcher: TokenBatcher[Request, Reply] = TokenBatcher(
        inference_fn=generate,
        target_batch_tokens=2_000,
        max_batch_size=48,
        batch_timeout_s=0.02,
    )
    await batcher.start()
    return batcher


# --------------------------------------------------------------------- Flyte tasks

# The workers: reusable replicas, each running up to 10 invocations at once in one process.
env = flyte.TaskEnvironment(
    name="tokenbatcher_reusable",
    reusable=flyte.ReusePolicy(replicas=2, concurrency=10),
)
# The driver gets an environment of its own, so that it does not hold a worker slot.
driver_env = flyte.TaskEnvironment(name="tokenbatcher_driver", depends_on=[env])


@dataclass
class InvocationResult:
    invocation: int
    answers: list[str] = field(default_factory=list)
    batch_ids: list[str] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    batch_invocations: list[int] = field(default_factory=list)


@dataclass
class RunSummary:
    invocations: int = 0
    records: int = 0
    batches: int = 0
    batchers: int = 0
    """Distinct batcher instances that served the run (one per replica process)."""
    mixed_batches: int = 0
    """Batches holding records of two or more invocations."""
    max_invocations_per_batch: int = 0
    mean_invocations_per_batch: float = 0.0
    mean_batch_size: float = 0.0


@dataclass
class BatcherReport:
    running_before: bool = False
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    batches: int = 0
    avg_batch_size: float = 0.0
    avg_batch_tokens: float = 0.0
    utilization: float = 0.0
    queue_wait_p95_ms: float = 0.0
    dispatch_reasons: dict[str, int] = field(default_factory=dict)


def prompts_for(invocation: int, count: int) -> list[Request]:
    words = "the quick brown fox jumps over a lazy dog while batching tokens".split()
    return [
        Request(invocation, f"invocation {invocation} prompt {j}: " + " ".join(words[: 3 + (invocation + j) % 10]) * 4)
        for j in range(count)
    ]


@env.task
async def answer(invocation: int, prompts: int) -> InvocationResult:
    """One task invocation: submit its prompts to the shared batcher, await its answers."""
    batcher = await get_batcher()
    futures = await batcher.submit_batch(prompts_for(invocation, prompts))
    replies = await asyncio.gather(*futures)
    return InvocationResult(
        invocation=invocation,
        answers=[r.text for r in replies],
        batch_ids=[r.batch_id for r in replies],
        batch_sizes=[r.batch_size for r in replies],
        batch_invocations=[r.batch_invocations for r in replies],
    )


@driver_env.task
async def fan_out(invocations: int = 40, prompts: int = 6) -> RunSummary:
    """The driver: many concurrent ``answer`` invocations, then what their batches looked like."""
    results = await asyncio.gather(*(answer(i, prompts) for i in range(invocations)))
    batches: dict[str, tuple[int, int]] = {}  # batch id -> (size, invocations in it)
    records = 0
    for result in results:
        records += len(result.answers)
        for batch_id, size, mixed in zip(result.batch_ids, result.batch_sizes, result.batch_invocations, strict=True):
            batches[batch_id] = (size, mixed)
    mixes = [mixed for _, mixed in batches.values()]
    return RunSummary(
        invocations=len(results),
        records=records,
        batches=len(batches),
        batchers=len({batch_id.rsplit(":", 1)[0] for batch_id in batches}),
        mixed_batches=sum(1 for m in mixes if m > 1),
        max_invocations_per_batch=max(mixes, default=0),
        mean_invocations_per_batch=sum(mixes) / len(mixes) if mixes else 0.0,
        mean_batch_size=records / len(batches) if batches else 0.0,
    )


@env.task
async def shutdown() -> BatcherReport:
    """Local runs only: stop this process's batcher (draining it) and report its final stats."""
    if not get_batcher.cache_contains():
        return BatcherReport()
    batcher = await get_batcher()
    running = batcher.is_running
    await batcher.stop()
    get_batcher.cache_clear()  # a later run in this process builds a fresh batcher
    stats = batcher.stats
    return BatcherReport(
        running_before=running,
        submitted=stats.total_submitted,
        completed=stats.total_completed,
        failed=stats.total_failed,
        batches=stats.total_batches,
        avg_batch_size=stats.avg_batch_size,
        avg_batch_tokens=stats.avg_batch_cost,
        utilization=stats.utilization,
        queue_wait_p95_ms=stats.queue_wait_s.p95 * 1000,
        dispatch_reasons=dict(stats.dispatch_reasons),
    )


# --------------------------------------------------------------------- running it locally


def run_local(invocations: int = 40, prompts: int = 6) -> tuple[RunSummary, BatcherReport]:
    """Run the driver and then :func:`shutdown` in Flyte's local mode; return both outputs."""
    flyte.init()
    local = flyte.with_runcontext(mode="local")
    summary: RunSummary = local.run(fan_out, invocations=invocations, prompts=prompts).outputs()[0]
    report: BatcherReport = local.run(shutdown).outputs()[0]
    return summary, report


def plural(count: int, noun: str, nouns: str = "") -> str:
    """``"1 record"``, ``"2 records"``; ``nouns`` for an irregular plural (``"batches"``)."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


def format_summary(summary: RunSummary, report: BatcherReport) -> str:
    reasons = ", ".join(f"{k} {n}" for k, n in sorted(report.dispatch_reasons.items())) or "-"
    return "\n".join(
        [
            f"{plural(summary.invocations, 'concurrent task invocation')} submitted "
            f"{plural(summary.records, 'record')} into {plural(summary.batchers, 'shared TokenBatcher')}",
            f"batches: {summary.batches}, {summary.mean_batch_size:.1f} records each on average",
            f"mixed:   {summary.mixed_batches} of {plural(summary.batches, 'batch', 'batches')} "
            "held records of several invocations "
            f"(mean {summary.mean_invocations_per_batch:.1f}, max {summary.max_invocations_per_batch} per batch)",
            f"stats:   submitted {report.submitted}, completed {report.completed}, failed {report.failed}, "
            f"batches {report.batches}, avg {report.avg_batch_size:.1f} records / {report.avg_batch_tokens:.0f} tokens",
            f"         utilization {report.utilization:.0%}, queue wait p95 {report.queue_wait_p95_ms:.1f} ms, "
            f"closed by: {reasons}",
            "stopped: the shutdown task drained the batcher and stopped it"
            if report.running_before
            else "stopped: no batcher was running",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--invocations", type=int, default=40, help="concurrent task invocations (default 40)")
    parser.add_argument("--prompts", type=int, default=6, help="prompts per invocation (default 6)")
    args = parser.parse_args(argv)
    summary, report = run_local(args.invocations, args.prompts)
    print(format_summary(summary, report))


if __name__ == "__main__":
    main()
