"""The demo a newcomer runs first, and the examples in docstrings."""

from __future__ import annotations

import doctest
import subprocess
import sys

import pytest

import tokenbatcher
from tokenbatcher import _stats, _token, _types


@pytest.mark.real_clock
@pytest.mark.timeout(60)
def test_the_demo_runs_and_prints_a_summary() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tokenbatcher", "--records", "200", "--clients", "16", "--progress-s", "0.2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    out = done.stdout
    assert "Summary" in out
    for line in ("prompts/s", "latency p50", "latency p99", "GPU calls", "utilization", "of the 8,192-token budget"):
        assert line in out
    assert " done · " in out  # progress was shown


def test_the_demo_rejects_bad_flags() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tokenbatcher", "--clients", "0"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert "--clients must be >= 1" in done.stderr


@pytest.mark.parametrize("module", [_types, _token, _stats, tokenbatcher])
def test_docstring_examples_run(module: object) -> None:
    result = doctest.testmod(module, raise_on_error=False, verbose=False)  # type: ignore[arg-type]
    assert result.failed == 0
