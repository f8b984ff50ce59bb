"""The other batchers of the overload benchmark, each driven the way its own project drives it.

Every system is opened with ``open_<name>(model, target_s)``, an async context
manager that yields an [Adapter][]: ``await adapter.submit(record)`` hands the
record over and returns an awaitable of its result.  An exception from
``submit`` that is one of ``adapter.refused`` counts as refused at submit; one
from awaiting the result that is one of ``adapter.shed`` counts as accepted and
then dropped (a timeout, an overload error); any other exception is a failure.

This module imports no peer package at import time: [probe][] tries each
import and says why a system is missing, so the benchmark and its test run
with only tokenbatcher installed.

What is measured, per peer:

* **flyte** ``flyte.extras.DynamicBatcher`` 2.12.1 with its defaults;
  ``await submit(record)`` then ``await future``, as its documentation shows.
* **BentoML** ``bentoml._internal.marshal.dispatcher.CorkDispatcher``, the
  adaptive batching dispatcher of a BentoML service, run unmodified in plain
  asyncio.  Built as ``_bentoml_impl/server/app.py`` builds it for a batchable
  API (``fallback`` raises ``ServiceUnavailable("process is overloaded")``),
  with ``max_latency_ms`` = the target and ``max_batch_size=100`` (the
  ``@bentoml.api`` default), each request carrying one record
  (``get_batch_size`` = 1).  Requests it sheds from the head of its queue fail
  with ``ServiceUnavailable`` (HTTP 503): counted as shed.
* **Ray** ``ray.serve.batch`` (``max_batch_size=64``, the default
  ``batch_wait_timeout_s=0.01`` and ``max_concurrent_batches=1``).  It does
  *not* run in plain asyncio as shipped: the first call builds its
  ``_BatchQueue``, whose constructor calls ``serve.get_replica_context()`` to
  warn about ``max_ongoing_requests``, and that raises ``RayServeException``
  outside a replica.  So while a point runs we install a stand-in replica
  context (``ray.serve.context._set_internal_replica_context``, what a replica
  process does at start-up) with ``max_ongoing_requests`` large enough to
  silence the warning; no Ray cluster is started (``ray.is_initialized()``
  stays False) and Ray's code is not changed.  What this measures is
  ``@serve.batch``'s own queue and timing, without Serve's router, proxy or
  ``max_ongoing_requests`` admission in front of it.
"""

from __future__ import annotations

import asyncio
import importlib
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Any

ProcessFn = Callable[[list[Any]], Awaitable[list[Any]]]
Submit = Callable[[Any], Awaitable[Awaitable[Any]]]
Opener = Callable[[ProcessFn, float], AbstractAsyncContextManager["Adapter"]]


@dataclass(frozen=True)
class Adapter:
    """How the harness talks to one running system.

    Attributes:
        submit: ``await submit(record)`` returns an awaitable of the record's result.
        refused: Exceptions of ``submit`` that mean "refused at submit".
        shed: Exceptions of the result that mean "accepted, then dropped
            unprocessed" (a timeout or an overload error).
    """

    submit: Submit
    refused: tuple[type[BaseException], ...] = ()
    shed: tuple[type[BaseException], ...] = ()


@dataclass(frozen=True)
class Peer:
    """One peer system: its key, its label, and how to open it (None when its package is missing)."""

    key: str
    label: str
    note: str
    open: Opener | None
    version: str | None
    missing: str | None = None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _import(name: str) -> tuple[Any, str | None]:
    """Import a module; return it, or None and the reason it cannot be imported."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flyte's and ray's imports announce deprecations
            return importlib.import_module(name), None
    except Exception as exc:  # ImportError, or whatever a package's import chain raises
        return None, f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------- flyte


def _open_flyte(extras: Any) -> Opener:
    @asynccontextmanager
    async def open_flyte(model: ProcessFn, target_s: float) -> AsyncIterator[Adapter]:
        batcher = extras.DynamicBatcher(model)  # flyte's defaults, the target is not one of its settings
        await batcher.start()
        try:
            yield Adapter(submit=batcher.submit)
        finally:
            await batcher.stop()

    return open_flyte


# --------------------------------------------------------------------- BentoML

BENTOML_MAX_BATCH_SIZE = 100
"""``@bentoml.api(batchable=True)``'s default ``max_batch_size``."""


def _open_bentoml(dispatcher_module: Any, exceptions: Any) -> Opener:
    service_unavailable: type[Exception] = exceptions.ServiceUnavailable

    @asynccontextmanager
    async def open_bentoml(model: ProcessFn, target_s: float) -> AsyncIterator[Adapter]:
        def fallback() -> Any:
            raise service_unavailable("process is overloaded")  # what BentoML's service app passes

        dispatcher = dispatcher_module.CorkDispatcher(
            max_latency_in_ms=round(target_s * 1000),
            max_batch_size=BENTOML_MAX_BATCH_SIZE,
            fallback=fallback,
            get_batch_size=lambda _: 1,
        )

        async def infer(batch: Sequence[Any]) -> list[Any]:
            return await model(list(batch))

        call = dispatcher(infer)

        async def submit(record: Any) -> Awaitable[Any]:
            return call(record)  # the request coroutine; the caller awaits it

        try:
            yield Adapter(submit=submit, shed=(service_unavailable,))
        finally:
            dispatcher.shutdown()

    return open_bentoml


# --------------------------------------------------------------------- Ray Serve

RAY_MAX_BATCH_SIZE = 64
"""``serve.batch``'s default is 10, whose throughput (1,250 records/s here) is below 0.9x capacity."""


def _open_ray(serve: Any) -> Opener:
    context = importlib.import_module("ray.serve.context")
    common = importlib.import_module("ray.serve._private.common")
    config = importlib.import_module("ray.serve._private.config")
    schema = importlib.import_module("ray.serve.schema")

    @asynccontextmanager
    async def open_ray(model: ProcessFn, target_s: float) -> AsyncIterator[Adapter]:
        previous = context._get_internal_replica_context()
        context._set_internal_replica_context(
            replica_id=common.ReplicaID(unique_id="bench", deployment_id=common.DeploymentID(name="overload")),
            servable_object=None,
            _deployment_config=config.DeploymentConfig(max_ongoing_requests=1_000_000),
            rank=schema.ReplicaRank(rank=0, node_rank=0, local_rank=0),
            world_size=1,
        )
        try:

            @serve.batch(max_batch_size=RAY_MAX_BATCH_SIZE)
            async def handle(batch: list[Any]) -> list[Any]:
                return await model(batch)

            async def submit(record: Any) -> Awaitable[Any]:
                return handle(record)

            yield Adapter(submit=submit)
            # serve.batch has no stop().  Let the batches it already formed run
            # out (the model is instant by now), so that closing the loop does
            # not cancel them: Ray's done-callback would log each cancellation
            # as an error.  Its batching loop itself ends with the event loop.
            in_flight = handle._get_curr_iteration_start_times  # Ray's own debugging hook
            for _ in range(5_000):
                if not in_flight().num_requests:
                    break
                await asyncio.sleep(0.001)
        finally:
            context._INTERNAL_REPLICA_CONTEXT = previous

    return open_ray


# --------------------------------------------------------------------- probe


def probe() -> list[Peer]:
    """The peers in report order, each with its opener or the reason it is missing."""
    peers: list[Peer] = []

    extras, why = _import("flyte.extras")
    version = _version("flyte")
    peers.append(
        Peer(
            key="flyte",
            label=f"flyte {version} window" if version else "flyte window",
            note="flyte.extras.DynamicBatcher, defaults (max_batch_size=256, batch_timeout_s=0.05)",
            open=_open_flyte(extras) if extras is not None else None,
            version=version,
            missing=why,
        )
    )

    dispatcher_module, why = _import("bentoml._internal.marshal.dispatcher")
    exceptions, why_exc = _import("bentoml.exceptions")
    version = _version("bentoml")
    ok = dispatcher_module is not None and exceptions is not None
    peers.append(
        Peer(
            key="bentoml",
            label=f"BentoML {version} CorkDispatcher" if version else "BentoML CorkDispatcher",
            note=(
                "BentoML's own CorkDispatcher, standalone; "
                f"max_latency_ms=target, max_batch_size={BENTOML_MAX_BATCH_SIZE}"
            ),
            open=_open_bentoml(dispatcher_module, exceptions) if ok else None,
            version=version,
            missing=None if ok else (why or why_exc),
        )
    )

    serve, why = _import("ray.serve")
    version = _version("ray")
    opener: Opener | None = None
    if serve is not None:
        try:
            opener = _open_ray(serve)
        except Exception as exc:  # the internals we borrow the replica context from moved
            why = f"{type(exc).__name__}: {exc}"
    peers.append(
        Peer(
            key="ray",
            label=f"Ray {version} @serve.batch" if version else "Ray @serve.batch",
            note=(
                f"ray.serve.batch(max_batch_size={RAY_MAX_BATCH_SIZE}) in plain asyncio, no cluster; "
                "a stand-in replica context, no router"
            ),
            open=opener,
            version=version,
            missing=None if opener is not None else why,
        )
    )
    return peers
