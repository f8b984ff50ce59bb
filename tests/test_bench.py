"""The benchmark suite in tests/bench/ still runs as a module from the repository root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "module",
    [
        "tests.bench",
        "tests.bench.model",
        "tests.bench.model_overload",
        "tests.bench.soak",
        "tests.bench.tuning",
        "tests.bench.tuning_model",
    ],
)
def test_the_bench_modules_run_from_the_repository_root(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ")
