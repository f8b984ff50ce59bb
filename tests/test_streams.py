"""Streaming: an async generator ``process_fn``, ``submit_stream`` and its ``Stream``.

Every test runs on the virtual clock, where a reader left waiting forever is a
``Deadlock``, not a hang.  A decode "step" takes one virtual second, so when an
entry arrives says exactly which step produced it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_virtual
from test_docs import ROOT, code_block
from tokenbatcher import (
    END,
    BatchAbortedError,
    BatcherStoppedError,
    DynamicBatcher,
    End,
    Stream,
    StreamBatch,
    StreamOverflowError,
    TokenBatcher,
    batched,
)


@dataclass
class Seq:
    """A sequence to decode: ``length`` tokens named after it, then END."""

    name: str
    length: int


@dataclass
class Log:
    """What the generator saw: each batch, and at each step which records were wanted."""

    batches: list[list[str]] = field(default_factory=list)
    steps: list[tuple[float, dict[str, bool]]] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)


def decoder(log: Log, step_s: float = 1.0, fail_at: int | None = None, junk: object = "junk") -> Any:
    """A streaming process_fn: at step ``k`` each sequence gets ``name:k``, then END; ``junk`` once ended."""

    async def decode(batch: StreamBatch[Seq]) -> AsyncIterator[list[str | End | object]]:
        loop = asyncio.get_running_loop()
        log.batches.append([s.name for s in batch])
        try:
            for k in range(max(s.length for s in batch)):
                await asyncio.sleep(step_s)
                log.steps.append((loop.time(), {s.name: batch.wanted(i) for i, s in enumerate(batch)}))
                if k == fail_at:
                    raise ValueError(f"model failed at step {k}")
                yield [f"{s.name}:{k}" if k < s.length else END if k == s.length else junk for s in batch]
            await asyncio.sleep(step_s)
        finally:
            log.closed.append(",".join(s.name for s in batch))

    return decode


def tokens(seq: Seq, upto: int | None = None) -> list[str]:
    n = seq.length if upto is None else min(seq.length, upto)
    return [f"{seq.name}:{k}" for k in range(n)]


async def read(stream: Stream[Any]) -> tuple[list[Any], list[float]]:
    loop = asyncio.get_running_loop()
    got: list[Any] = []
    times: list[float] = []
    async for entry in stream:
        got.append(entry)
        times.append(loop.time())
    return got, times


async def read_all(stream: Stream[Any]) -> list[Any]:
    return [entry async for entry in stream]


# --------------------------------------------------------------------- delivery


@pytest.mark.asyncio
async def test_entries_arrive_in_order_each_as_its_step_is_produced() -> None:
    log = Log()
    seqs = [Seq("a", 10), Seq("b", 4), Seq("c", 7)]
    async with DynamicBatcher(decoder(log), batch_timeout_s=0.5) as batcher:
        streams = [await batcher.submit_stream(s) for s in seqs]
        results = await asyncio.gather(*(read(s) for s in streams))
    assert log.batches == [["a", "b", "c"]]
    for seq, (got, times) in zip(seqs, results, strict=True):
        assert got == tokens(seq)
        # step k is produced at 0.5 (the window) + k + 1 seconds, and read at that very moment
        assert times == [0.5 + k + 1 for k in range(seq.length)]
    a_times = results[0][1]
    assert (a_times[0], a_times[-1]) == (1.5, 10.5)  # the first long before the last
    assert batcher.stats.total_completed == 3


@pytest.mark.asyncio
async def test_a_reader_may_read_its_whole_stream_before_another_starts() -> None:
    log = Log()
    async with DynamicBatcher(decoder(log, step_s=0.0), max_batch_size=2) as batcher:
        first = await batcher.submit_stream(Seq("a", 50))
        second = await batcher.submit_stream(Seq("b", 50))
        assert await read_all(first) == tokens(Seq("a", 50))
        assert log.closed == ["a,b"]  # the generator ran to its end without waiting for b's reader
        assert await read_all(second) == tokens(Seq("b", 50))


@pytest.mark.asyncio
async def test_end_ends_one_stream_and_later_entries_for_it_are_ignored() -> None:
    log = Log()
    async with DynamicBatcher(decoder(log, junk="junk")) as batcher:
        short, long = [await batcher.submit_stream(s) for s in (Seq("s", 2), Seq("l", 5))]
        got_short, got_long = await asyncio.gather(read_all(short), read_all(long))
    assert got_short == ["s:0", "s:1"]  # no END, no "junk" after it
    assert got_long == tokens(Seq("l", 5))
    wanted = [w for _, w in log.steps]
    assert [w["s"] for w in wanted] == [True, True, True, False, False]  # ended by END at step 2
    assert all(w["l"] for w in wanted)
    assert batcher.stats.total_completed == 2
    assert repr(short) == "<Stream ended buffered=0>"
    assert repr(END) == str(END) == "tokenbatcher.END"


@pytest.mark.asyncio
async def test_a_stream_ends_exactly_once() -> None:
    async with DynamicBatcher(decoder(Log())) as batcher:
        stream = await batcher.submit_stream(Seq("a", 1))
        assert await anext(stream) == "a:0"
        for _ in range(3):
            with pytest.raises(StopAsyncIteration):
                await anext(stream)
        failing = DynamicBatcher(decoder(Log(), fail_at=0))
    async with failing:
        stream = await failing.submit_stream(Seq("b", 3))
        with pytest.raises(ValueError, match="failed at step 0"):
            await anext(stream)
        with pytest.raises(StopAsyncIteration):  # the error is reported once
            await anext(stream)


# --------------------------------------------------------------------- failures


@pytest.mark.asyncio
async def test_an_exception_ends_every_open_stream_after_the_entries_already_delivered() -> None:
    log = Log()
    async with DynamicBatcher(decoder(log, fail_at=3)) as batcher:
        seqs = [Seq("done", 2), Seq("open", 9), Seq("also", 5)]
        streams = [await batcher.submit_stream(s) for s in seqs]
        outcomes = await asyncio.gather(*(drain(s) for s in streams))
    assert outcomes[0] == (["done:0", "done:1"], None)  # ended by END before the failure
    for seq, (entries, error) in zip(seqs[1:], outcomes[1:], strict=True):
        assert entries == tokens(seq, upto=3)
        assert isinstance(error, ValueError)
        assert str(error) == "model failed at step 3"
    assert outcomes[1][1] is outcomes[2][1]  # one exception, as a batch's futures share it
    stats = batcher.stats
    assert (stats.total_completed, stats.total_failed) == (1, 2)
    assert log.closed == ["done,open,also"]


async def drain(stream: Stream[Any]) -> tuple[list[Any], Exception | None]:
    """The entries of a stream, and the exception that ended it (None if it ended normally)."""
    entries: list[Any] = []
    try:
        async for entry in stream:
            entries.append(entry)
    except Exception as exc:
        return entries, exc
    return entries, None


@pytest.mark.asyncio
async def test_a_base_exception_from_the_generator_becomes_batch_aborted() -> None:
    class Abort(BaseException):
        pass

    async def decode(batch: StreamBatch[str]) -> AsyncIterator[list[str]]:
        yield list(batch)
        raise Abort("stop right there")

    async with DynamicBatcher(decode) as batcher:
        stream = await batcher.submit_stream("x")
        assert await anext(stream) == "x"
        with pytest.raises(BatchAbortedError, match="Abort") as info:
            await anext(stream)
        assert isinstance(info.value.__cause__, Abort)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("step", "error", "message"),
    [
        (["one"], ValueError, r"process_fn yielded a step of 1 entries for a batch of 2 records"),
        (["one", "two", "three"], ValueError, r"a step of 3 entries for a batch of 2 records"),
        ("ab", TypeError, r"must yield a list of 2 entries per step \(one per record\), got str"),
    ],
)
async def test_a_step_of_the_wrong_shape_fails_the_batchs_streams_and_closes_the_generator(
    step: Any, error: type[Exception], message: str
) -> None:
    closed: list[bool] = []

    async def decode(batch: StreamBatch[str]) -> AsyncIterator[Any]:
        try:
            yield list(batch)
            yield step
            yield list(batch)
        finally:
            closed.append(True)

    async with DynamicBatcher(decode, batch_timeout_s=1.0) as batcher:
        streams = [await batcher.submit_stream(x) for x in ("a", "b")]
        for stream, first in zip(streams, ("a", "b"), strict=True):
            assert await anext(stream) == first
            with pytest.raises(error, match=message):
                await anext(stream)
    assert closed == [True]
    assert batcher.stats.total_failed == 2


@pytest.mark.asyncio
async def test_a_process_fn_that_returns_no_async_iterator_fails_its_batch() -> None:
    class Liar:
        async def __call__(self, batch: StreamBatch[str]) -> AsyncIterator[list[str]]:
            yield list(batch)

    batcher = DynamicBatcher(Liar())
    batcher._process_fn = lambda batch: [1]  # type: ignore[assignment,return-value]  # detected, then swapped
    async with batcher:
        stream = await batcher.submit_stream("a")
        with pytest.raises(TypeError, match="must return an async iterator, got list"):
            await anext(stream)


# --------------------------------------------------------------------- readers that leave


async def _leave_by(how: str, batcher: DynamicBatcher[Seq, str], seq: Seq, after: int) -> list[str]:
    """Read ``after`` entries of ``seq``'s stream, then leave as ``how`` says; return what was read."""
    got: list[str] = []
    if how == "break":  # the for loop holds the only reference: it is dropped at the break
        async for entry in await batcher.submit_stream(seq):
            got.append(entry)
            if len(got) == after:
                break
        await asyncio.sleep(0)  # the freeing is scheduled on the loop, not done inside a collection
        return got
    stream = await batcher.submit_stream(seq)
    async for entry in stream:
        got.append(entry)
        if len(got) == after:
            break
    if how == "aclose":
        await stream.aclose()
        await stream.aclose()  # twice is fine
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
        return got
    assert how == "cancel"  # the reader's task is cancelled while it waits for the next entry
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.25)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    return got


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["aclose", "break", "cancel"])
async def test_a_reader_that_leaves_frees_its_record_and_process_fn_sees_it_unwanted(how: str) -> None:
    log = Log()
    async with DynamicBatcher(decoder(log), batch_timeout_s=0.5) as batcher:
        stays = asyncio.ensure_future(read_all(await batcher.submit_stream(Seq("stays", 6))))
        got = await _leave_by(how, batcher, Seq("leaves", 6), after=2)
        assert got == ["leaves:0", "leaves:1"]
        assert await stays == tokens(Seq("stays", 6))
    wanted = [w["leaves"] for _, w in log.steps]
    assert wanted == [True, True, False, False, False, False]  # left right after reading step 1
    stats = batcher.stats
    assert (stats.total_completed, stats.total_cancelled, stats.total_failed) == (1, 1, 0)


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["aclose", "break"])
async def test_a_stream_left_while_queued_is_never_processed(how: str) -> None:
    log = Log()
    async with DynamicBatcher(decoder(log), batch_timeout_s=1.0) as batcher:
        stream = await batcher.submit_stream(Seq("gone", 3))
        if how == "aclose":
            await stream.aclose()
        else:
            del stream
            gc.collect()
            await asyncio.sleep(0)
        assert batcher.stats.queue_depth == 0  # it left the queue at once
        assert await read_all(await batcher.submit_stream(Seq("next", 1))) == ["next:0"]
    assert log.batches == [["next"]]
    assert batcher.stats.total_cancelled == 1


@pytest.mark.asyncio
async def test_the_generator_is_closed_once_nobody_reads_its_batch() -> None:
    log = Log()
    async with DynamicBatcher(decoder(log)) as batcher:
        streams = [await batcher.submit_stream(Seq(n, 1000)) for n in "ab"]
        for stream in streams:
            assert await anext(stream) in ("a:0", "b:0")
        for stream in streams:
            await stream.aclose()
        await asyncio.sleep(5)
        assert log.closed == ["a,b"]
        assert len(log.steps) == 2  # closed at the yield after the readers left
        assert batcher.stats.in_flight_batches == 0


@pytest.mark.asyncio
async def test_one_task_reads_a_stream_at_a_time() -> None:
    async with DynamicBatcher(decoder(Log())) as batcher:
        stream = await batcher.submit_stream(Seq("a", 2))
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="already being read by another task"):
            await anext(stream)
        assert await first == "a:0"
        assert await read_all(stream) == ["a:1"]


@pytest.mark.asyncio
async def test_aclose_from_another_task_ends_a_waiting_read() -> None:
    async with DynamicBatcher(decoder(Log())) as batcher:
        stream = await batcher.submit_stream(Seq("a", 5))
        reading = asyncio.ensure_future(read_all(stream))
        await asyncio.sleep(1.5)  # a:0 read; the reader waits for a:1
        await stream.aclose()
        assert await reading == ["a:0"]
        assert repr(stream) == "<Stream closed buffered=0>"
    assert batcher.stats.total_cancelled == 1


# --------------------------------------------------------------------- the buffer bound


@pytest.mark.asyncio
async def test_a_reader_that_falls_stream_buffer_entries_behind_fails_and_the_batch_goes_on() -> None:
    log = Log()
    async with DynamicBatcher(decoder(log), stream_buffer=3, batch_timeout_s=0.5) as batcher:
        keeps_up = await batcher.submit_stream(Seq("fast", 8))
        falls_behind = await batcher.submit_stream(Seq("slow", 8))
        assert await read_all(keeps_up) == tokens(Seq("fast", 8))  # the batch never waited for "slow"
        assert log.closed == ["fast,slow"]
        got, error = await drain(falls_behind)
        assert got == tokens(Seq("slow", 3))  # what it buffered, then the error
        assert isinstance(error, StreamOverflowError)
        assert "fell 3 entries behind its batch (stream_buffer=3)" in str(error)
    assert [w["slow"] for _, w in log.steps] == [True, True, True, True, False, False, False, False]
    stats = batcher.stats
    assert (stats.total_completed, stats.total_failed) == (1, 1)


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (-1, ValueError), ("10", TypeError), (True, TypeError)])
def test_stream_buffer_is_validated(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="stream_buffer must be"):
        DynamicBatcher(decoder(Log()), stream_buffer=value)


# --------------------------------------------------------------------- stop, deadlines


@pytest.mark.asyncio
async def test_stop_drains_open_streams_to_their_end() -> None:
    log = Log()
    batcher = DynamicBatcher(decoder(log), max_batch_size=2)
    await batcher.start()
    streams = [await batcher.submit_stream(Seq(n, 4)) for n in "abc"]  # c waits for the next batch
    readers = [asyncio.ensure_future(read(s)) for s in streams]
    loop = asyncio.get_running_loop()
    await batcher.stop()
    assert loop.time() == 5 + 5  # a and b at once (a full batch), then c: four steps and a last sleep each
    with pytest.raises(RuntimeError, match="not running"):
        await batcher.submit_stream(Seq("late", 1))
    for reader, n in zip(readers, "abc", strict=True):
        got, _ = await reader
        assert got == tokens(Seq(n, 4))
    assert batcher.stats.total_completed == 3


@pytest.mark.asyncio
async def test_stop_with_a_timeout_fails_open_streams_after_their_entries() -> None:
    log = Log()
    batcher = DynamicBatcher(decoder(log, step_s=10.0), batch_timeout_s=0.0)
    await batcher.start()
    stream = await batcher.submit_stream(Seq("a", 5))
    await asyncio.sleep(0.5)
    queued = await batcher.submit_stream(Seq("b", 5))  # behind the first batch: never processed
    await batcher.stop(timeout=25.0)
    assert log.closed == ["a"]
    got, error = await drain(stream)
    assert got == ["a:0", "a:1"]
    assert isinstance(error, BatcherStoppedError)
    assert "stop(timeout=25.0) ran out" in str(error)
    with pytest.raises(BatcherStoppedError):
        await anext(queued)
    assert log.batches == [["a"]]


@pytest.mark.asyncio
async def test_a_stream_whose_deadline_passes_in_the_queue_fails_with_timeout_error() -> None:
    log = Log()
    async with DynamicBatcher(decoder(log), batch_timeout_s=0.0) as batcher:
        busy = await batcher.submit_stream(Seq("busy", 3))
        await asyncio.sleep(0.5)
        late = await batcher.submit_stream(Seq("late", 3), timeout_s=1.0)
        with pytest.raises(TimeoutError, match=r"waited 1\.0s in the queue"):
            await anext(late)
        assert await read_all(busy) == tokens(Seq("busy", 3))
    assert log.batches == [["busy"]]
    assert batcher.stats.total_expired == 1


@pytest.mark.asyncio
async def test_submit_stream_waits_for_room_and_a_cancelled_wait_queues_nothing() -> None:
    async with DynamicBatcher(decoder(Log()), max_queue_size=1, batch_timeout_s=5.0) as batcher:
        first = await batcher.submit_stream(Seq("a", 1))
        waiting = asyncio.ensure_future(batcher.submit_stream(Seq("b", 1)))
        await asyncio.sleep(1)
        assert not waiting.done()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert batcher.stats.total_submitted == 1
        assert await read_all(first) == ["a:0"]


# --------------------------------------------------------------------- which batchers stream


async def echo(batch: list[Any]) -> list[Any]:
    return list(batch)


@pytest.mark.asyncio
async def test_submit_and_its_siblings_refuse_a_streaming_batcher_and_submit_stream_a_plain_one() -> None:
    async with DynamicBatcher(decoder(Log())) as streaming:
        with pytest.raises(TypeError, match=r"submit\(\) takes .* async generator function .* use submit_stream"):
            await streaming.submit(Seq("a", 1))
        with pytest.raises(TypeError, match=r"call\(\) takes|submit\(\) takes"):
            await streaming.call(Seq("a", 1))
        with pytest.raises(TypeError, match=r"submit_nowait\(\) takes"):
            streaming.submit_nowait(Seq("a", 1))
        with pytest.raises(TypeError, match=r"submit_batch\(\) takes"):
            await streaming.submit_batch([Seq("a", 1)])
        with pytest.raises(TypeError, match=r"submit_threadsafe\(\) takes"):
            streaming.submit_threadsafe(Seq("a", 1))
    async with DynamicBatcher(echo) as plain:
        with pytest.raises(TypeError, match=r"submit_stream\(\) needs a process_fn that is an async generator"):
            await plain.submit_stream(1)
    assert streaming.stats.total_submitted == plain.stats.total_submitted == 0


async def numbered(offset: int, batch: StreamBatch[int]) -> AsyncIterator[list[int]]:
    yield [offset + x for x in batch]


class Counter:
    async def __call__(self, batch: StreamBatch[int]) -> AsyncIterator[list[int]]:
        yield [x * 10 for x in batch]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("fn", "expected"), [(functools.partial(numbered, 100), 101), (Counter(), 10), (Counter().__call__, 10)]
)
async def test_async_generators_behind_partial_or_call_are_detected(fn: Callable[..., Any], expected: int) -> None:
    async with DynamicBatcher(fn) as batcher:
        assert await read_all(await batcher.submit_stream(1)) == [expected]


def test_an_executor_is_refused_for_a_streaming_process_fn() -> None:
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        pytest.raises(ValueError, match="executor is only used by a plain"),
    ):
        DynamicBatcher(decoder(Log()), executor=pool)


@pytest.mark.asyncio
async def test_token_batcher_prices_a_stream_by_estimated_tokens() -> None:
    log = Log()
    async with TokenBatcher(inference_fn=decoder(log), target_batch_tokens=10, batch_timeout_s=1.0) as batcher:
        streams = [
            await batcher.submit_stream(Seq("a", 1), estimated_tokens=6),
            await batcher.submit_stream(Seq("b", 1), estimated_tokens=6),  # over the budget with a
            await batcher.submit_stream(Seq("c", 1), estimated_cost=4),
        ]
        assert [await read_all(s) for s in streams] == [["a:0"], ["b:0"], ["c:0"]]
    assert log.batches == [["a"], ["b", "c"]]


# --------------------------------------------------------------------- @batched


@batched(max_batch_size=8, batch_timeout_s=0.5)
async def spell(words: StreamBatch[str]) -> AsyncIterator[list[str | End]]:
    for k in range(max(len(w) for w in words)):
        await asyncio.sleep(1)
        yield [w[k] if k < len(w) else END for w in words]


class Speller:
    def __init__(self, upper: bool) -> None:
        self.upper = upper

    @batched(max_batch_size=8)
    async def spell(self, words: StreamBatch[str]) -> AsyncIterator[list[str | End]]:
        try:
            for k in range(max(len(w) for w in words)):
                yield [(w[k].upper() if self.upper else w[k]) if k < len(w) else END for w in words]
        finally:
            await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_a_batched_async_generator_returns_a_stream_per_call() -> None:
    async def letters(word: str) -> list[str]:
        return [c async for c in await spell(word)]

    assert list(await asyncio.gather(letters("tea"), letters("coffee"))) == [list("tea"), list("coffee")]
    assert spell.batcher.stats.total_batches == 1
    assert await read_all(await Speller(upper=True).spell("ok")) == ["O", "K"]
    assert await read_all(await Speller(upper=False).spell("ok")) == ["o", "k"]
    await spell.aclose()


@pytest.mark.timeout(60)
def test_the_example_of_the_concepts_page_runs() -> None:
    code = code_block(ROOT / "docs" / "pages" / "concepts.md", "## Streaming")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "['tea', 'coffee']\n"


# --------------------------------------------------------------------- the property


@dataclass
class Plan:
    """One record of the property test: its sequence, when it is submitted, and how its reader reads."""

    seq: Seq
    start: int
    """Virtual quarter-seconds after the beginning."""
    fails_at: int | None
    """Its batch's generator raises at this step (the smallest in the batch wins)."""
    leave: str
    """"no" (read to the end), "aclose", "break" or "cancel"."""
    after: int
    """Leave after reading this many entries."""
    delay: int
    """Quarter-seconds the reader dawdles between entries."""


def plans() -> st.SearchStrategy[list[Plan]]:
    plan = st.builds(
        Plan,
        seq=st.builds(Seq, name=st.just(""), length=st.integers(0, 6)),
        start=st.integers(0, 12),
        fails_at=st.none() | st.integers(0, 6),
        leave=st.sampled_from(["no", "no", "aclose", "break", "cancel"]),
        after=st.integers(0, 6),
        delay=st.integers(0, 3),
    )
    return st.lists(plan, min_size=1, max_size=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plans=plans(),
    max_batch_size=st.integers(1, 5),
    slots=st.integers(1, 2),
    dispatch=st.sampled_from(["window", "eager"]),
)
def test_every_stream_gets_exactly_its_own_entries_in_order_and_ends_once(
    plans: list[Plan], max_batch_size: int, slots: int, dispatch: Any
) -> None:
    for i, plan in enumerate(plans):
        plan.seq.name = f"r{i}"
    by_name = {plan.seq.name: plan for plan in plans}
    batches: list[list[str]] = []
    steps: list[tuple[float, dict[str, bool]]] = []

    async def decode(batch: StreamBatch[Seq]) -> AsyncIterator[list[str | End]]:
        loop = asyncio.get_running_loop()
        batches.append([s.name for s in batch])
        failures = [by_name[s.name].fails_at for s in batch]
        fail_at = min((f for f in failures if f is not None), default=None)
        for k in range(max(s.length for s in batch)):
            await asyncio.sleep(0.5)
            steps.append((loop.time(), {s.name: batch.wanted(i) for i, s in enumerate(batch)}))
            if k == fail_at:
                raise ValueError(f"batch failed at step {k}")
            yield [f"{s.name}:{k}" if k < s.length else END if k == s.length else "ignored" for s in batch]
        await asyncio.sleep(0.5)

    got: dict[str, list[str]] = {}
    endings: dict[str, list[str]] = {}
    left_at: dict[str, float] = {}
    kept: list[Stream[str]] = []

    async def reader(plan: Plan) -> None:
        loop = asyncio.get_running_loop()
        name = plan.seq.name
        entries = got[name] = []
        ends = endings[name] = []
        await asyncio.sleep(plan.start / 4)
        if plan.leave != "no" and plan.after == 0:  # leaves while its record is queued
            stream = await batcher.submit_stream(plan.seq)
            left_at[name] = loop.time()
            await stream.aclose()
            return
        if plan.leave == "break":  # the for loop holds the only reference to the stream
            try:
                async for entry in await batcher.submit_stream(plan.seq):
                    entries.append(entry)
                    if len(entries) == plan.after:
                        left_at[name] = loop.time()
                        break
                    await asyncio.sleep(plan.delay / 4)
                else:
                    ends.append("end")
            except ValueError as exc:
                ends.append(str(exc))
            return
        stream = await batcher.submit_stream(plan.seq)
        try:
            async for entry in stream:
                entries.append(entry)
                if len(entries) == plan.after and plan.leave == "aclose":
                    left_at[name] = loop.time()
                    await stream.aclose()
                    return
                if len(entries) == plan.after and plan.leave == "cancel":
                    # its task is cancelled as it waits for the next entry (it reads at once, so none is buffered)
                    waiting = asyncio.ensure_future(anext(stream))
                    await asyncio.sleep(0)
                    if not waiting.done():
                        left_at[name] = loop.time()
                        waiting.cancel()
                        with pytest.raises(asyncio.CancelledError):
                            await waiting
                        kept.append(stream)  # so it is the cancelled read that frees it, not the collector
                        return
                    entries.append(await waiting)  # or raises: the stream ended just now
                    raise AssertionError("an entry was buffered")
                if plan.leave != "cancel":
                    await asyncio.sleep(plan.delay / 4)
        except StopAsyncIteration:
            ends.append("end")
        except ValueError as exc:
            ends.append(str(exc))
        else:
            ends.append("end")
        with pytest.raises(StopAsyncIteration):  # it ended once, and stays ended
            await anext(stream)

    batcher = DynamicBatcher(
        decode, max_batch_size=max_batch_size, max_concurrent_batches=slots, dispatch=dispatch, batch_timeout_s=0.25
    )

    async def main() -> None:
        async with batcher:
            results = await asyncio.gather(*(reader(p) for p in plans), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    run_virtual(main())

    in_batch = {name: batch for batch in batches for name in batch}
    everyone = [name for batch in batches for name in batch]
    assert len(everyone) == len(set(everyone))  # every record is processed at most once
    for plan in plans:
        name, seq = plan.seq.name, plan.seq
        entries, ends = got[name], endings[name]
        if plan.leave != "no" and plan.after == 0:  # left while queued: never processed
            assert name not in in_batch
            assert entries == ends == []
            continue
        fails = [by_name[n].fails_at for n in in_batch[name]]
        fail_at = min((f for f in fails if f is not None), default=None)
        longest = max(by_name[n].seq.length for n in in_batch[name])
        fails_here = fail_at is not None and fail_at < longest and fail_at <= seq.length
        expected = tokens(seq, upto=fail_at if fails_here else None)
        if name in left_at:  # left before it saw its end: as much of its own entries as it read
            assert ends == []
            assert entries == expected[: plan.after], (name, plan)
            assert len(entries) == plan.after
        else:
            assert entries == expected, (name, plan)
            assert ends == ([f"batch failed at step {fail_at}"] if fails_here else ["end"]), (name, plan)
    for name, t in left_at.items():
        assert not any(wanted[name] for when, wanted in steps if when > t and name in wanted), name
    stats = batcher.stats
    assert stats.total_submitted == len(plans)
    assert stats.total_completed + stats.total_failed + stats.total_cancelled == len(plans)
    assert stats.total_cancelled <= len(left_at)
    assert stats.pending == 0
