"""Test fixtures: every async test runs on a virtual clock that cannot hang.

``VirtualClockLoop`` is an ordinary selector event loop whose ``time()`` is a
number it owns.  Whenever nothing is ready to run, it jumps its clock straight
to the next scheduled timer instead of sleeping; if no timer is scheduled
either, nothing can ever happen again, so it raises :class:`Deadlock` -- a
future that would wait forever fails its test at once.  Tests therefore
``await asyncio.sleep(10)`` at no cost, and timings are exact.

Tests that need real threads mark themselves ``@pytest.mark.real_clock``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import selectors
import sys
from collections.abc import Coroutine
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


class Deadlock(RuntimeError):
    """Nothing is ready and no timer is scheduled: the test would hang forever."""


class _JumpingSelector(selectors.DefaultSelector):
    def __init__(self, loop: VirtualClockLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise Deadlock("nothing is ready and no timer is scheduled: something waits forever")
        self._loop.advance(timeout)
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock (see the module docstring)."""

    def __init__(self) -> None:
        self._now = 0.0
        super().__init__(selector=_JumpingSelector(self))

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a fresh virtual-clock loop; fail if it leaves tasks behind."""
    loop = VirtualClockLoop()
    try:
        result = loop.run_until_complete(coro)
        leftovers = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            raise AssertionError(f"tasks left running after the test: {leftovers}")
        return result
    finally:
        loop.close()


class OnLoop(concurrent.futures.Executor):
    """An executor that runs each call at once, on the calling thread.

    The batcher calls a plain (non-async) ``process_fn`` in a worker thread.
    The test harnesses whose plain ``process_fn`` checks the batch on the loop
    at the moment of hand-off, then returns a coroutine, pass
    ``executor=OnLoop()`` to keep that moment.
    """

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed on, as a worker thread would
            future.set_exception(exc)
        return future


EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"

# tests/bench/ is the benchmark suite (``python -m tests.bench``), not tests.
collect_ignore = ["bench"]


def load_example(filename: str) -> ModuleType:
    """Import ``docs/examples/<filename>`` as a module, so tests can call its functions."""
    path = EXAMPLES / filename
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up here
    spec.loader.exec_module(module)
    return module


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_clock: run on asyncio's real event loop (threads, wall time)")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """pytest-asyncio's hook: a virtual clock unless the test is marked ``real_clock``."""
    if item.get_closest_marker("real_clock"):
        return {"real": asyncio.new_event_loop}
    return {"virtual": VirtualClockLoop}
