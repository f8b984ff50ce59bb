"""The batchers under test, behind one small interface, plus the asyncio floor.

Every implementation is built by a factory ``make(process_fn) -> batcher`` and
used only through ``await b.start()``, ``fut = await b.submit(record)`` and
``await b.stop()``: the surface that flyte's ``DynamicBatcher`` and ours share.
Both libraries are built with their default settings; ours differ only in the
``dispatch`` argument, which flyte does not have.

flyte is optional: when ``flyte.extras`` cannot be imported its factory is
absent and the reports say so.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import platform
import subprocess
import sys
import warnings
from collections import deque
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any, Literal

import tokenbatcher

ProcessFn = Callable[[list[Any]], Awaitable[list[Any]]]

# --------------------------------------------------------------------- flyte (optional)

FLYTE_ERROR: str | None = None
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flyte's import emits a pydantic DeprecationWarning
        from flyte.extras import DynamicBatcher as FlyteDynamicBatcher
except Exception as exc:  # ImportError, or anything flyte's import chain raises
    FlyteDynamicBatcher = None
    FLYTE_ERROR = f"{type(exc).__name__}: {exc}"


def flyte_version() -> str | None:
    if FlyteDynamicBatcher is None:
        return None
    try:
        return metadata.version("flyte")
    except metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------- the floor


class FloorBatcher:
    """The least any asyncio batcher must do per record, and nothing else.

    ``submit`` creates the record's future and appends ``(record, future)`` to a
    deque, waking the consumer if it sleeps.  The consumer takes up to
    ``max_batch_size`` records, awaits ``process_fn`` on them directly and sets
    each future's result.  No cost accounting, no timeout window, no
    backpressure, no stats, no error handling: an unreachable lower bound that
    shares the producers' harness with the real batchers.
    """

    def __init__(self, process_fn: ProcessFn, *, max_batch_size: int = 256) -> None:
        self._fn = process_fn
        self._max = max_batch_size
        self._items: deque[tuple[Any, asyncio.Future[Any]]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._task = self._loop.create_task(self._consume())

    async def submit(self, record: Any) -> asyncio.Future[Any]:
        fut = self._loop.create_future()  # type: ignore[union-attr]
        self._items.append((record, fut))
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set_result(None)
        return fut

    async def stop(self) -> None:
        self._stopping = True
        if self._waiter is not None:
            self._waiter.set_result(None)
            self._waiter = None
        if self._task is not None:
            await self._task

    async def _consume(self) -> None:
        items, popleft, limit = self._items, self._items.popleft, self._max
        while True:
            if not items:
                if self._stopping:
                    return
                self._waiter = self._loop.create_future()  # type: ignore[union-attr]
                await self._waiter
                continue
            batch = [popleft() for _ in range(min(len(items), limit))]
            results = await self._fn([record for record, _ in batch])
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)


# --------------------------------------------------------------------- registry


def _ours(dispatch: Literal["window", "eager"]) -> Callable[[ProcessFn], Any]:
    def make(process_fn: ProcessFn) -> Any:
        return tokenbatcher.DynamicBatcher(process_fn, dispatch=dispatch)

    return make


def _flyte(process_fn: ProcessFn) -> Any:
    assert FlyteDynamicBatcher is not None
    return FlyteDynamicBatcher(process_fn)


LABELS = {
    "floor": "asyncio floor",
    "flyte": "flyte",
    "window": 'ours "window"',
    "eager": 'ours "eager"',
}


def factories(*, floor: bool) -> dict[str, Callable[[ProcessFn], Any]]:
    """The implementations available on this machine, in report order."""
    out: dict[str, Callable[[ProcessFn], Any]] = {}
    if floor:
        out["floor"] = FloorBatcher
    if FlyteDynamicBatcher is not None:
        out["flyte"] = _flyte
    out["window"] = _ours("window")
    out["eager"] = _ours("eager")
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_state() -> str:
    """The commit the measured source came from, if it is a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(tokenbatcher.__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "src"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    return f"git {head}{' + uncommitted changes in src/' if dirty else ''}"


def machine_info() -> dict[str, str]:
    cpus = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cpus
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    loop = asyncio.new_event_loop()
    loop_name = type(loop).__name__
    loop.close()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": f"{cpus} ({usable} usable)",
        "load_avg": load,
        "event_loop": loop_name,
        "tokenbatcher": f"{tokenbatcher.__version__} ({_git_state()})",
        "flyte": flyte_version() or f"not installed ({FLYTE_ERROR})",
        "argv": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
