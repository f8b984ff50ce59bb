"""Benchmarks for tokenbatcher, side by side with flyte.extras and an asyncio floor.

Run everything (writes ``docs/pages/benchmarks.md`` and ``docs/pages/img/*.png``)::

    python -m tests.bench

from the repository root.  See :mod:`tests.bench.run` for the options.
"""
