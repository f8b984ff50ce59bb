"""Benchmarks for tokenbatcher, side by side with flyte.extras and an asyncio floor.

Run everything (writes ``docs/benchmarks.md`` and ``docs/img/*.png``)::

    python -m bench

from the repository root.  See :mod:`bench.run` for the options.
"""
