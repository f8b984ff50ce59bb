"""The demo a newcomer runs first, and the examples in docstrings."""

from __future__ import annotations

import doctest
import io
import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tokenbatcher
from conftest import run_virtual
from tokenbatcher import _demo, _stats, _token, _types


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


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--clients", "0"], "--clients must be >= 1, got 0"),
        (["--timeout", "-1"], "--timeout must be a finite number >= 0, got -1"),
    ],
)
def test_the_demo_rejects_bad_flags_without_a_traceback(flags: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "tokenbatcher", *flags], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.endswith(f"python -m tokenbatcher: error: {message}\n")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--clients", "0"], "--clients must be >= 1, got 0"),
        (["--records", "-5"], "--records must be >= 1, got -5"),
        (["--budget", "0"], "--budget must be >= 1, got 0"),
        (["--timeout", "-1"], "--timeout must be a finite number >= 0, got -1"),
        (["--timeout", "nan"], "--timeout must be a finite number >= 0, got nan"),
        (["--launch-ms", "-0.5"], "--launch-ms must be a finite number >= 0, got -0.5"),
        (["--per-token-us", "inf"], "--per-token-us must be a finite number >= 0, got inf"),
        (["--progress-s", "0"], "--progress-s must be a finite number > 0, got 0"),
        (["--clients", "many"], "argument --clients: invalid int value: 'many'"),
    ],
)
def test_each_bad_flag_gets_a_usage_error_naming_it(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _demo.parse(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m tokenbatcher")
    assert err.endswith(f"python -m tokenbatcher: error: {message}\n")


def test_the_edge_values_are_accepted() -> None:
    args = _demo.parse(["--clients", "1", "--records", "1", "--budget", "1", "--timeout", "0", "--launch-ms", "0"])
    assert (args.clients, args.records, args.budget, args.timeout, args.launch_ms) == (1, 1, 1, 0.0, 0.0)


def test_help_shows_every_flags_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _demo.parse(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines to the terminal's width
    defaults = {
        "--clients CLIENTS": "64",
        "--records RECORDS": "3000",
        "--budget BUDGET": "8192",
        "--timeout TIMEOUT": "0.02",
        "--dispatch {window,eager}": "eager",
        "--launch-ms LAUNCH_MS": "8.0",
        "--per-token-us PER_TOKEN_US": "3.0",
        "--seed SEED": "7",
        "--progress-s PROGRESS_S": "0.5",
    }
    for flag, default in defaults.items():
        assert re.search(re.escape(flag) + r" [^-]*\(default: " + re.escape(default) + r"\)", text), flag
    assert text.count("(default: ") == len(defaults)


def run_demo(*flags: str) -> tuple[_demo.DemoResult, str]:
    """The demo on the virtual clock: its result and what it printed."""
    out = io.StringIO()
    result = run_virtual(_demo.demo(_demo.parse(["--progress-s", "10", *flags]), out))
    return result, out.getvalue()


@given(records=st.integers(1, 100_000), clients=st.integers(1, 10_000))
def test_the_unbatched_pass_keeps_every_client_busy(records: int, clients: int) -> None:
    size = _demo.unbatched_sample_size(records, clients)
    assert min(records, _demo.UNBATCHED_PER_CLIENT * clients) <= size <= records


def test_a_small_run_compares_the_same_prompts_at_the_same_concurrency() -> None:
    result, out = run_demo("--records", "20", "--clients", "64")
    assert result.clients == 20  # only 20 prompts: 20 clients send at once, in both passes
    assert len(result.batched) == len(result.unbatched) == 20
    assert "the same 20 prompts from the same 20 concurrent clients" in out
    assert "Summary (both passes: 20 clients sending at once)" in out
    # With the same concurrency, batching is not slower for the typical prompt.
    assert _demo.percentile(result.batched, 0.5) < _demo.percentile(result.unbatched, 0.5)


def test_a_large_run_sends_a_sample_unbatched_from_all_its_clients() -> None:
    result, out = run_demo("--records", "400", "--clients", "32")
    assert result.clients == 32
    assert len(result.unbatched) == 3 * 32  # more than 400 // 10: every client sends three
    assert "the first 96 prompts from the same 32 concurrent clients" in out


def test_prompts_over_the_budget_are_said_to_go_alone() -> None:
    costs = sorted(p.estimate_tokens() for p in _demo.make_prompts(200, seed=7))
    assert costs[-1] > costs[-2] > 100  # one largest prompt, several above 100 tokens
    many = sum(c > 100 for c in costs)
    _, out = run_demo("--records", "200", "--budget", "100")
    assert f"  {many} prompts cost more than the 100-token budget: each is sent alone, in a batch of its own" in out
    _, out = run_demo("--records", "200", "--budget", str(costs[-2]))
    assert f"  1 prompt costs more than the {costs[-2]:,}-token budget: it is sent alone, in a batch of its own" in out
    _, out = run_demo("--records", "200", "--budget", str(costs[-1]))
    assert "sent alone" not in out


def test_counts_of_one_read_in_the_singular() -> None:
    _, out = run_demo("--records", "1", "--clients", "5")
    assert "tokenbatcher demo: 1 prompt (" in out
    assert "from 1 concurrent client to one simulated GPU" in out
    assert "  1 batch, 1.0 prompts and" in out
    assert not re.search(r"\b1 (prompts|clients|batches|tokens|concurrent clients)\b", out)


@pytest.mark.parametrize("module", [_types, _token, _stats, tokenbatcher])
def test_docstring_examples_run(module: object) -> None:
    result = doctest.testmod(module, raise_on_error=False, verbose=False)  # type: ignore[arg-type]
    assert result.failed == 0
