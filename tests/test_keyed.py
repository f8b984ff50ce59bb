"""Keyed batches: records with different keys never share a batch; the key whose head is oldest goes first.

Unit tests of every way a key comes in, of the order between keys, and of the
queue at scale (``KeyedPending``); then a property over random keys,
priorities, costs, cancellations and every dispatch, grouping and budget mode.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import OnLoop, run_virtual
from tokenbatcher import END, BatchInfo, DynamicBatcher, End, Stream, StreamBatch, TokenBatcher, batched
from tokenbatcher._keyed import KeyedPending, KeyedRecord
from tokenbatcher._pending import Pending, Record


@dataclass(frozen=True)
class Req:
    model: str
    n: int


class Recorder:
    """A process_fn that records each batch; it can wait for a gate."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, batch: list[Any]) -> list[Any]:
        self.batches.append(list(batch))
        self.entered.set()
        await self.gate.wait()
        return [("result", item) for item in batch]


def model_of(req: Req) -> str:
    return req.model


@pytest.mark.asyncio
async def test_records_with_different_keys_never_share_a_batch_and_key_overrides_batch_key() -> None:
    fn = Recorder()
    infos: list[BatchInfo] = []
    async with DynamicBatcher(fn, batch_key=model_of, max_batch_size=4, on_batch=infos.append) as batcher:
        reqs = [Req(m, i) for i, m in enumerate("aabbabba")]
        futures = [await batcher.submit(r) for r in reqs]
        odd = await batcher.submit(Req("a", 99), key="b")  # key= wins over batch_key
        results = await asyncio.gather(*futures, odd)
    assert results == [("result", r) for r in [*reqs, Req("a", 99)]]
    assert fn.batches == [
        [Req("a", 0), Req("a", 1), Req("a", 4), Req("a", 7)],
        [Req("b", 2), Req("b", 3), Req("b", 5), Req("b", 6)],
        [Req("a", 99)],
    ]
    assert [info.key for info in infos] == ["a", "b", "b"]


@pytest.mark.asyncio
async def test_every_way_in_takes_a_key() -> None:
    fn = Recorder()
    async with TokenBatcher(fn, dispatch="eager", max_batch_size=10) as batcher:
        fn.gate.clear()
        blocker = await batcher.submit("blocker")
        await fn.entered.wait()
        futures = [
            await batcher.submit("s1", key=1),
            await batcher.submit("s2", estimated_tokens=2, key=2),
            batcher.submit_nowait("n1", key=1),
            batcher.submit_nowait("n2", estimated_tokens=2, key=2),
            *await batcher.submit_batch(["b1", "b1'"], key=1),
            *await batcher.submit_batch(["b2"], estimated_tokens=[1], key=2),
            asyncio.ensure_future(batcher.call("c1", key=1)),
            asyncio.ensure_future(DynamicBatcher.call(batcher, "c2", key=2)),
            asyncio.ensure_future(batcher.call("none")),
        ]
        await asyncio.sleep(0)
        fn.gate.set()
        await asyncio.gather(blocker, *futures)
    assert fn.batches == [["blocker"], ["s1", "n1", "b1", "b1'", "c1"], ["s2", "n2", "b2", "c2"], ["none"]]


@pytest.mark.real_clock
@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_submit_threadsafe_takes_a_key() -> None:
    fn = Recorder()
    loop = asyncio.get_running_loop()
    async with DynamicBatcher(fn, batch_timeout_s=0.01) as batcher:

        def from_thread() -> list[concurrent.futures.Future[Any]]:
            with pytest.raises(TypeError, match=r"key must be hashable, got \[1\] \(list\)"):
                batcher.submit_threadsafe("z", key=[1])  # type: ignore[arg-type]
            return [batcher.submit_threadsafe(f"{k}{i}", key=k) for i in range(3) for k in "xy"]

        futures = await loop.run_in_executor(None, from_thread)
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    assert results == [("result", f"{k}{i}") for i in range(3) for k in "xy"]
    assert all(len({item[0] for item in batch}) == 1 for batch in fn.batches)
    assert batcher.stats.total_submitted == 6


@pytest.mark.asyncio
async def test_batched_calls_take_a_key_and_batch_key() -> None:
    seen: list[list[str]] = []

    @batched(batch_key=lambda text: text[0], max_batch_size=8)
    async def upper(texts: list[str]) -> list[str]:
        seen.append(list(texts))
        return [t.upper() for t in texts]

    try:
        got = await asyncio.gather(upper("ab"), upper("ba"), upper("ac"), upper("bb", key="a"))
    finally:
        await upper.aclose()
    assert got == ["AB", "BA", "AC", "BB"]
    assert seen == [["ab", "ac", "bb"], ["ba"]]


@pytest.mark.asyncio
async def test_a_bad_key_is_refused_before_anything_is_queued() -> None:
    async with DynamicBatcher(Recorder(), batch_key=lambda r: r) as batcher:
        with pytest.raises(TypeError, match=r"batch_key\(record\) must be hashable, got \['x'\] \(list\)"):
            await batcher.submit(["x"])
        with pytest.raises(TypeError, match=r"key must be hashable, got \{\} \(dict\)"):
            batcher.submit_nowait("y", key={})  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"batch_key\(record\) must be hashable"):
            await batcher.submit_batch(["fine", ["bad"]])
        assert batcher.stats.total_submitted == 0

    def broken(record: Any) -> str:
        raise LookupError("no model field")

    async with DynamicBatcher(Recorder(), batch_key=broken) as batcher:
        with pytest.raises(LookupError, match="no model field"):
            await batcher.submit("r")
        assert batcher.stats.total_submitted == 0
    with pytest.raises(TypeError, match="batch_key must be callable or None"):
        DynamicBatcher(Recorder(), batch_key="model")  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_the_key_whose_head_is_oldest_goes_first_and_priority_counts() -> None:
    fn = Recorder()
    async with DynamicBatcher(fn, dispatch="eager", max_batch_size=2, priority_aging_s=10.0) as batcher:
        fn.gate.clear()
        blocker = await batcher.submit("blocker")
        await fn.entered.wait()
        futures = []
        for name, key in [("a1", "a"), ("b1", "b"), ("a2", "a"), ("c1", "c"), ("a3", "a"), ("a4", "a")]:
            futures.append(await batcher.submit(name, key=key))
            await asyncio.sleep(1.0)
        futures.append(await batcher.submit("c2", key="c", priority=-1))  # 10 s ahead: its key goes first
        fn.gate.set()
        await asyncio.gather(blocker, *futures)
    # c2 (key t-10) heads c; then a (a1 oldest), then b, then a again (a3 now heads a), ...
    assert fn.batches == [["blocker"], ["c2", "c1"], ["a1", "a2"], ["b1"], ["a3", "a4"]]


@pytest.mark.asyncio
async def test_a_trickling_key_is_not_starved_by_a_flooding_one() -> None:
    fn = Recorder()
    async with DynamicBatcher(fn, dispatch="eager", max_batch_size=4, max_queue_size=10_000) as batcher:
        fn.gate.clear()
        blocker = await batcher.submit("blocker")
        await fn.entered.wait()
        flood = [await batcher.submit(("hot", i), key="hot") for i in range(400)]
        await asyncio.sleep(0.5)
        rare = await batcher.submit(("rare", 0), key="rare")
        flood += [await batcher.submit(("hot", i), key="hot") for i in range(400, 800)]
        fn.gate.set()
        await asyncio.gather(blocker, *flood, rare)
    position = next(i for i, b in enumerate(fn.batches) if ("rare", 0) in b)
    assert position == 1 + 100  # after the blocker and the 100 batches of the hot records older than it
    assert all(len({type(x) is tuple and x[0] for x in b}) == 1 for b in fn.batches)


@pytest.mark.asyncio
async def test_window_a_key_whose_records_waited_through_other_windows_goes_at_once() -> None:
    fn = Recorder()
    infos: list[BatchInfo] = []
    async with DynamicBatcher(fn, batch_timeout_s=1.0, max_batch_size=8, on_batch=infos.append) as batcher:
        t0 = asyncio.get_running_loop().time()
        futures = [await batcher.submit(f"{k}{i}", key=k) for i in range(2) for k in "abcd"]
        await asyncio.gather(*futures)
    assert fn.batches == [["a0", "a1"], ["b0", "b1"], ["c0", "c1"], ["d0", "d1"]]
    # a's window runs its full second; b, c and d waited through it, so they go right after, not a second each
    assert [info.started_at - t0 for info in infos] == [1.0, 1.0, 1.0, 1.0]
    assert [info.reason for info in infos] == ["timeout"] * 4


@pytest.mark.asyncio
async def test_records_queued_before_the_first_key_keep_their_place() -> None:
    fn = Recorder()
    async with DynamicBatcher(fn, dispatch="eager", max_batch_size=3) as batcher:
        fn.gate.clear()
        blocker = await batcher.submit("blocker")
        await fn.entered.wait()
        plain = [await batcher.submit(f"p{i}") for i in range(4)]
        keyed = [await batcher.submit(f"k{i}", key="k") for i in range(2)]
        more = await batcher.submit("p4")  # no key: joins the records queued without one
        fn.gate.set()
        await asyncio.gather(blocker, *plain, *keyed, more)
    assert fn.batches == [["blocker"], ["p0", "p1", "p2"], ["p3", "p4"], ["k0", "k1"]]


@pytest.mark.asyncio
async def test_batch_key_set_by_configure_applies_to_later_records() -> None:
    fn = Recorder()
    async with DynamicBatcher(fn, dispatch="eager") as batcher:
        fn.gate.clear()
        blocker = await batcher.submit("blocker")
        await fn.entered.wait()
        early = [await batcher.submit(s) for s in ("x1", "y1")]
        batcher.configure(batch_key=lambda s: s[0])
        late = [await batcher.submit(s) for s in ("y2", "x2")]
        batcher.configure(batch_key=None)
        last = await batcher.submit("z")  # no key again: with the early ones' key, None
        fn.gate.set()
        await asyncio.gather(blocker, *early, *late, last)
    assert fn.batches == [["blocker"], ["x1", "y1", "z"], ["y2"], ["x2"]]


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["cancel", "expire"])
async def test_cancelled_and_expired_records_leave_their_key_at_once(how: str) -> None:
    fn = Recorder()
    async with DynamicBatcher(fn, dispatch="eager", max_queue_size=3, max_batch_size=8) as batcher:
        fn.gate.clear()
        blocker = await batcher.submit("blocker")
        await fn.entered.wait()
        a1 = await batcher.submit("a1", key="a", timeout_s=1.0)
        b1 = await batcher.submit("b1", key="b", timeout_s=1.0)
        a2 = await batcher.submit("a2", key="a")
        waiting = asyncio.ensure_future(batcher.submit("b2", key="b"))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        if how == "cancel":
            a1.cancel()
            b1.cancel()
        else:
            await asyncio.sleep(1.0)
        await asyncio.sleep(0)
        assert waiting.done()  # a place was freed
        assert batcher.stats.queue_depth == 2
        fn.gate.set()
        await asyncio.gather(blocker, a2, await waiting)
    assert fn.batches == [["blocker"], ["a2"], ["b2"]]


@pytest.mark.asyncio
@pytest.mark.parametrize("grouping", ["fifo", "similar_cost"])
@pytest.mark.parametrize("batch_cost", ["sum", "padded"])
async def test_each_key_forms_batches_by_the_budget_and_grouping(grouping: str, batch_cost: str) -> None:
    fn = Recorder()
    async with DynamicBatcher(
        fn, dispatch="eager", grouping=grouping, batch_cost=batch_cost, target_batch_cost=8, max_batch_size=4
    ) as batcher:
        fn.gate.clear()
        blocker = await batcher.submit(("-", 0))
        await fn.entered.wait()
        costs = [1, 7, 2, 2, 6, 1, 1, 3, 8, 2]
        futures = [await batcher.submit((k, c), estimated_cost=c, key=k) for c in costs for k in "xy"]
        fn.gate.set()
        await asyncio.gather(blocker, *futures)
    for batch in fn.batches[1:]:
        assert len({k for k, _ in batch}) == 1
        counted = [c for _, c in batch]
        total = len(counted) * max(counted) if batch_cost == "padded" else sum(counted)
        assert len(batch) == 1 or total <= 8
    # submitted in turns, the keys are served in turns: after a batch of x, y's head is the oldest
    keys = [batch[0][0] for batch in fn.batches[1:]]
    assert keys[:4] == ["x", "y", "x", "y"]


def make_record(group: Any, seq: int, cost: int = 1, t: float = 0.0, priority_s: float = 0.0) -> Record[Any]:
    loop = asyncio.new_event_loop()
    try:
        rec: KeyedRecord[Any] = KeyedRecord(loop=loop)
    finally:
        loop.close()
    rec.item, rec.cost, rec.t, rec.key, rec.seq, rec.group = seq, cost, t, t + priority_s, seq, group
    return rec


def test_keyed_pending_at_scale_drops_empty_keys_and_bounds_its_heap() -> None:
    """Many keys, few records each: nothing kept per key once it is empty, no scan of the keys."""
    queue = KeyedPending(budget=100, max_size=4, padded=False, similar=False)
    seq = itertools.count()
    for round_ in range(3):
        records = [make_record(k, next(seq), t=float(round_)) for k in range(5_000) for _ in range(2)]
        for rec in records:
            queue.push(rec)
        assert queue.keys() == 5_000
        for rec in records[::4]:
            queue.forget(rec)  # the head of every other key
        taken = 0
        heads_seen = []
        while len(queue):
            batch, _ = queue.take()
            assert len({r.group for r in batch}) == 1  # type: ignore[attr-defined]
            heads_seen.append((batch[0].key, batch[0].seq))
            taken += len(batch)
        assert heads_seen == sorted(heads_seen)  # keys served by their heads' order
        assert taken == len(records) - len(records[::4])
        assert queue.keys() == 0
        assert len(queue._heads) <= 2 * 5_000 + 1024
        assert len(queue._spare) <= 64


def test_keyed_pending_adopts_an_unkeyed_queue_and_reconfigures_in_place() -> None:
    plain = Pending(budget=10, max_size=3, padded=False, similar=False)
    loop = asyncio.new_event_loop()
    try:
        olds = []
        for i in range(5):
            rec: Record[Any] = Record(loop=loop)
            rec.item, rec.cost, rec.t, rec.key, rec.seq = i, 1, 0.0, 0.0, i
            plain.push(rec)
            olds.append(rec)
    finally:
        loop.close()
    plain.take()
    keyed = KeyedPending.adopt(plain, budget=10, max_size=3, padded=False, similar=False)
    assert len(plain) == 0
    assert (len(keyed), keyed.peak) == (2, 5)
    keyed.push(make_record("k", 10))
    keyed.reconfigure(budget=10, max_size=1, padded=False, similar=True)
    assert keyed.full
    batches = [keyed.take()[0] for _ in range(3)]
    assert [[r.seq for r in b] for b in batches] == [[3], [4], [10]]
    assert keyed.take() == ([], None)


# ---------------------------------------------------------------------- the property


@dataclass(frozen=True)
class Item:
    rid: int
    key: str
    cost: int
    priority: int
    gap: float
    cancel_after: float | None


ITEMS = st.lists(
    st.tuples(
        st.sampled_from("abcd"),
        st.integers(0, 6),
        st.integers(-1, 1),
        st.sampled_from([0.0, 0.0, 0.25, 1.0]),
        st.none() | st.sampled_from([0.0, 0.25, 1.0]),
    ),
    max_size=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=ITEMS,
    dispatch=st.sampled_from(["window", "eager"]),
    grouping=st.sampled_from(["fifo", "similar_cost"]),
    batch_cost=st.sampled_from(["sum", "padded"]),
    budget=st.integers(1, 12),
    max_batch_size=st.integers(1, 5),
    slots=st.integers(1, 2),
    via=st.sampled_from(["key", "batch_key"]),
    proc_time=st.sampled_from([0.0, 0.25, 0.5]),
)
def test_no_batch_mixes_keys_and_every_record_is_served(
    raw: list[tuple[str, int, int, float, float | None]],
    dispatch: str,
    grouping: str,
    batch_cost: str,
    budget: int,
    max_batch_size: int,
    slots: int,
    via: str,
    proc_time: float,
) -> None:
    items = [Item(i, *fields) for i, fields in enumerate(raw)]
    calls: list[list[Item]] = []

    def process_fn(batch: list[Item]) -> Any:
        for it in batch:
            assert not futures[it.rid].done(), f"record {it.rid} handed over with a done future"
        calls.append(list(batch))

        async def work() -> list[int]:
            await asyncio.sleep(proc_time)
            return [it.rid for it in batch]

        return work()

    futures: dict[int, asyncio.Future[Any]] = {}
    batcher = DynamicBatcher(
        process_fn,
        executor=OnLoop(),
        dispatch=dispatch,  # type: ignore[arg-type]
        grouping=grouping,  # type: ignore[arg-type]
        batch_cost=batch_cost,  # type: ignore[arg-type]
        target_batch_cost=budget,
        max_batch_size=max_batch_size,
        max_concurrent_batches=slots,
        batch_timeout_s=0.25,
        batch_key=(lambda it: it.key) if via == "batch_key" else None,
    )

    async def cancel_later(fut: asyncio.Future[Any], after: float) -> None:
        await asyncio.sleep(after)
        fut.cancel()

    async def main() -> None:
        cancellers = []
        async with batcher:
            for it in items:
                await asyncio.sleep(it.gap)
                kwargs: dict[str, Any] = {"estimated_cost": it.cost, "priority": it.priority}
                if via == "key":
                    kwargs["key"] = it.key
                futures[it.rid] = await batcher.submit(it, **kwargs)
                if it.cancel_after is not None:
                    cancellers.append(asyncio.ensure_future(cancel_later(futures[it.rid], it.cancel_after)))
            await asyncio.gather(*cancellers)
        await asyncio.sleep(0)

    run_virtual(main())
    handed = [it.rid for batch in calls for it in batch]
    assert len(handed) == len(set(handed)), "a record was handed over twice"
    for batch in calls:
        assert len({it.key for it in batch}) == 1, f"a batch mixes keys: {batch}"
        assert 1 <= len(batch) <= max_batch_size
        costs = [it.cost for it in batch]
        counted = len(costs) * max(costs) if batch_cost == "padded" else sum(costs)
        assert len(batch) == 1 or counted <= budget
    for it in items:
        fut = futures[it.rid]
        assert fut.done()
        if fut.cancelled():
            assert it.cancel_after is not None
        else:
            assert fut.result() == it.rid
            assert it.rid in handed
    stats = batcher.stats
    assert stats.total_completed == sum(1 for f in futures.values() if not f.cancelled())
    assert stats.total_cancelled == sum(1 for f in futures.values() if f.cancelled())
    assert (stats.pending, stats.queue_depth, stats.total_failed) == (0, 0, 0)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.lists(
        st.tuples(st.sampled_from("abcd"), st.integers(0, 6), st.sampled_from([0.0, 0.0, 0.25, 1.0])), max_size=30
    ),
    grouping=st.sampled_from(["fifo", "similar_cost"]),
    budget=st.integers(1, 12),
    max_batch_size=st.integers(1, 5),
    proc_time=st.sampled_from([0.25, 0.5]),
)
def test_a_keyed_record_is_taken_within_r_plus_1_batches(
    raw: list[tuple[str, int, float]], grouping: str, budget: int, max_batch_size: int, proc_time: float
) -> None:
    """concepts.md: with ``r`` live records ahead of it (any key), a record is taken within ``r + 1`` batches.

    Eager, one slot: a batch is taken when it is handed over, so batches are counted exactly."""
    calls: list[list[int]] = []
    ahead: dict[int, int] = {}
    calls_before: dict[int, int] = {}

    def process_fn(batch: list[tuple[int, str]]) -> Any:
        calls.append([rid for rid, _ in batch])

        async def work() -> list[int]:
            await asyncio.sleep(proc_time)
            return [rid for rid, _ in batch]

        return work()

    batcher = DynamicBatcher(
        process_fn,
        executor=OnLoop(),
        dispatch="eager",
        grouping=grouping,  # type: ignore[arg-type]
        target_batch_cost=budget,
        max_batch_size=max_batch_size,
        batch_key=lambda record: record[1],
    )

    async def main() -> None:
        futures = []
        async with batcher:
            for rid, (key, cost, gap) in enumerate(raw):
                await asyncio.sleep(gap)
                futures.append(await batcher.submit((rid, key), estimated_cost=cost))
                ahead[rid] = batcher.stats.queue_depth - 1
                calls_before[rid] = len(calls)
        assert [f.result() for f in futures] == list(range(len(raw)))

    run_virtual(main())
    for index, batch in enumerate(calls):
        for rid in batch:
            assert index - calls_before[rid] + 1 <= ahead[rid] + 1, (rid, ahead[rid], calls)


@pytest.mark.asyncio
async def test_streams_are_keyed_too_and_a_streaming_batcher_refuses_isolation() -> None:
    seen: list[list[str]] = []

    async def spell(words: StreamBatch[str]) -> AsyncIterator[list[str | End]]:
        seen.append(list(words))
        for step in range(max(len(w) for w in words)):
            yield [w[step] if step < len(w) else END for w in words]

    async def read(stream: Stream[str]) -> str:
        return "".join([letter async for letter in stream])

    async with TokenBatcher(spell, batch_key=len, stream_buffer=100) as batcher:
        streams = [await batcher.submit_stream(w) for w in ("ab", "cde", "fg")]
        streams.append(await batcher.submit_stream("hi", key=3))
        assert await asyncio.gather(*(read(s) for s in streams)) == ["ab", "cde", "fg", "hi"]
        with pytest.raises(ValueError, match="on_batch_error='isolate' re-runs the records"):
            batcher.configure(on_batch_error="isolate", max_batch_size=2)
        assert (batcher.on_batch_error, batcher.max_batch_size) == ("fail", 256)
        batcher.configure(stream_buffer=1)
        assert batcher.stream_buffer == 1
    assert seen == [["ab", "fg"], ["cde", "hi"]]
    with pytest.raises(ValueError, match="a streaming process_fn"):
        TokenBatcher(spell, on_batch_error="isolate")
