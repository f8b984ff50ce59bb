"""docs/examples/flyte_reusable.py with the real flyte package, in local mode (real time, threads).

Skipped when the ``flyte`` extra is not installed.  Flyte's local mode runs the
tasks on an event loop in a background thread, so these are plain synchronous
tests: the virtual clock of the other tests is not involved.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest

from conftest import EXAMPLES, load_example

with warnings.catch_warnings():
    # flyte.io's pydantic models still use a class-based `config` (flyte 2.12.1).
    warnings.filterwarnings("ignore", "Support for class-based", DeprecationWarning)
    pytest.importorskip("flyte")
    pytest.importorskip("async_lru")

pytestmark = [
    pytest.mark.timeout(120),
    # Raised again when a run first converts a dataclass and imports flyte.io.
    pytest.mark.filterwarnings("ignore:Support for class-based:DeprecationWarning"),
]

EXAMPLE = EXAMPLES / "flyte_reusable.py"


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return load_example("flyte_reusable.py")


def test_invocations_share_one_batcher_and_mix_in_batches(example: ModuleType) -> None:
    invocations, prompts = 24, 5
    summary, report = example.run_local(invocations, prompts)

    assert summary.invocations == invocations
    assert summary.records == invocations * prompts
    assert summary.batchers == 1  # the alru_cache singleton: one batcher for every invocation
    assert summary.batches < summary.records
    assert summary.mixed_batches >= 1
    assert summary.max_invocations_per_batch >= 2  # a batch held records of several invocations
    assert summary.mean_batch_size > 1

    # the shutdown task drained and stopped that batcher; its stats agree with the replies
    assert report.running_before
    assert report.submitted == report.completed == summary.records
    assert report.failed == 0
    assert report.batches == summary.batches
    assert report.avg_batch_size == pytest.approx(summary.mean_batch_size)
    assert sum(report.dispatch_reasons.values()) == report.batches


def test_a_second_run_builds_a_fresh_batcher_on_the_same_loop(example: ModuleType) -> None:
    # shutdown() cleared the cache; flyte keeps one event loop per process, so
    # async-lru sees no loop change (AlruCacheLoopResetWarning would be an error here).
    summary, report = example.run_local(6, 3)
    assert summary.records == 18
    assert summary.batchers == 1
    assert report.submitted == report.completed == 18  # counters of a new batcher, not the old one


def test_script_prints_a_summary_and_nothing_on_stderr(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--invocations", "12", "--prompts", "4"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    out = done.stdout
    assert "12 concurrent task invocations submitted 48 records into 1 shared TokenBatcher\n" in out
    assert "held records of several invocations" in out
    assert "submitted 48, completed 48, failed 0" in out
