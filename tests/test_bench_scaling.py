"""The scaling benchmark (``tests/bench/scaling.py``) runs end to end on tiny depths.

These tests check the harness, not the library's speed: every mode drains its
queue with every future resolved to its own record, the report and the JSON
render, and the time cap skips what it should.  No timing is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCALING = Path(__file__).resolve().parent / "bench" / "scaling.py"


def _load() -> ModuleType:
    """Import the benchmark by path: ``tests`` is not a package on every layout."""
    name = "tokenbatcher_bench_scaling"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCALING)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


scaling = _load()


def _quiet(message: str) -> None:
    pass


@pytest.mark.timeout(60)
def test_every_mode_drains_200_records_and_the_report_renders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scaling.json"
    assert scaling.main(["--depths", "200", "--repeats", "1", "--roundtrips", "50", "--json", str(out)]) == 0
    report = capsys.readouterr().out
    results: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))

    assert list(results["modes"]) == list(scaling.MODE_NAMES)
    for name, mode in results["modes"].items():
        point = mode["points"]["200"]
        assert not point["skipped"], name
        assert point["resolved"] == 200, name
        assert point["batches"] >= 1, name
        assert mode["bytes_per_record"] > 0, name
        assert f"| {name} | " in report
    assert results["roundtrip"]["roundtrips"] == 50
    assert "Goal check (issue 10, item 5)" in report
    assert "bytes per queued record" in report
    assert "per round trip" in report


@pytest.mark.timeout(60)
def test_the_cap_stops_a_drain_and_skips_every_deeper_point() -> None:
    # cap 0: stop(timeout=0) cuts the first drain short (5,000 records take many
    # loop iterations), and every deeper point is projected over the cap.
    results = scaling.run(
        depths=(5_000, 10_000, 20_000),
        modes=("fifo", "similar_cost"),
        cap_s=0.0,
        repeats=1,
        memory_depth=500,
        roundtrips=0,
        log=_quiet,
    )
    for name in ("fifo", "similar_cost"):
        points = results["modes"][name]["points"]
        assert points["5000"]["skipped"]
        assert points["5000"]["over_cap"]
        assert points["10000"]["skipped"]
        assert points["20000"]["projected_s"] >= points["10000"]["projected_s"] > 0
    report = scaling.format_report(results)
    assert "stopped at cap (> 0 s)" in report
    assert "skipped (projected > 0 s)" in report
    assert results["goals"]["flat"]["failures"]  # not measured is not met
    assert results["goals"]["vs_fifo"]["failures"]
    assert results["roundtrip"] is None


def test_the_projection_follows_the_growth_seen_and_is_at_least_linear() -> None:
    # (depth, wall s, CPU s): the exponent comes from CPU time, the scale from wall time
    assert scaling.project([(1_000, 2.0, 1.0)], 10_000) == pytest.approx(20.0)
    assert scaling.project([(1_000, 9.0, 1.0), (10_000, 300.0, 100.0)], 100_000) == pytest.approx(30_000.0)
    assert scaling.project([(1_000, 2.0, 2.0), (10_000, 4.0, 4.0)], 100_000) == pytest.approx(40.0)


def test_depth_labels_round_trip() -> None:
    for n in (200, 1_000, 10_000, 100_000, 1_000_000, 2_500):
        assert scaling.parse_depth(scaling.depth_label(n)) == n
    assert scaling.depth_label(1_000_000) == "1M"
    assert scaling.parse_depth("10k") == 10_000


def test_unknown_mode_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown"):
        scaling.run(depths=(10,), modes=("fifo", "lifo"), roundtrips=0, log=_quiet)


@pytest.mark.timeout(60)
def test_the_plot_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    results = scaling.run(depths=(50, 100), modes=("fifo", "eager"), repeats=1, roundtrips=0, log=_quiet)
    path = tmp_path / "scaling.png"
    scaling.plot(results, str(path))
    assert path.read_bytes().startswith(b"\x89PNG")
