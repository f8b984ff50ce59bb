"""The overload benchmark's harness (tests/bench/overload.py), on our own systems at a tiny scale.

No figure is asserted: only that every record ends in exactly one outcome,
that the outcomes the report relies on all occur, and that the report renders.
The peers' packages are never imported here.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def bench(module: str, *args: str, timeout: float = 110) -> subprocess.CompletedProcess[str]:
    """Run ``python -m module args...`` from the repository root, as its docstring says to."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def overload() -> ModuleType:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # `tests.bench` is imported from the repository root
    return importlib.import_module("tests.bench.overload")


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_nothing_is_lost(overload: ModuleType) -> None:
    # On the virtual clock: exact, and the long drain costs no wall time.  With
    # it every record resolves before the cut: served, refused or shed.
    systems = [s for s in overload.our_systems() if s.open is not None]
    assert {"window", "eager", "tuned"} <= {s.key for s in systems}
    points = []
    for spec in overload.MODELS.values():
        for load in (0.5, 4.0):
            for system in systems:
                point = await overload.run_point(system, spec, load=load, duration=0.2, drain=5.0, warmup=0.05)
                assert point.arrivals > 0
                assert point.warmup_arrivals > 0
                assert point.failed == 0, point.errors
                assert point.cut == 0, point
                assert point.served + point.refused + point.shed == point.arrivals, point
                assert point.served_late <= point.served
                points.append(point)

    # Each outcome occurred, so each branch of the bookkeeping ran: the
    # defaults serve late at 4x; the tuned variant refuses at submit and sheds
    # on its deadline.
    assert sum(p.goodput_rps for p in points) > 0
    assert sum(p.served_late for p in points if p.system == "window") > 0
    assert sum(p.refused for p in points if p.system == "tuned") > 0
    assert sum(p.shed for p in points if p.system == "tuned") > 0


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_short_drain_cuts_the_rest_and_the_report_renders(overload: ModuleType) -> None:
    systems = [s for s in overload.our_systems() if s.key in ("window", "tuned")]
    settings = overload.Settings(duration=0.2, drain=0.1, loads=(4.0,), models=("clean",))
    points = [await overload.run_point(s, overload.MODELS["clean"], load=4.0, duration=0.2, drain=0.1) for s in systems]
    window = points[0]
    assert window.cut > 0  # a backlog of seconds cannot drain in 0.1 s
    assert window.served + window.cut == window.arrivals
    assert window.p99_lower_bound

    table = overload.format_tables(points, systems, settings)
    for system in systems:
        assert system.label in table
    assert "### clean model" in table
    assert "| 4x | 8,649 |" in table  # the goodput grid: load, offered rate
    assert ">=" in table  # a cut record's age shows as a lower bound
    dumped = json.loads(json.dumps(overload.to_json(points, systems, settings)))
    assert [p["system"] for p in dumped["points"]] == ["window", "tuned"]


@pytest.mark.real_clock
@pytest.mark.timeout(120)
def test_the_command_line_runs_from_the_repository_root(tmp_path: Path) -> None:
    out = tmp_path / "overload.json"
    done = bench(
        "tests.bench.overload",
        "--systems",
        "window,eager,tuned",
        "--models",
        "clean",
        "--loads",
        "0.5,2",
        "--duration",
        "0.2",
        "--drain",
        "0.2",
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert "| load | offered/s |" in done.stdout
    assert 'ours "eager", tuned' in done.stdout
    points = json.loads(out.read_text())["points"]
    assert len(points) == 6
    assert all(p["served"] + p["refused"] + p["shed"] + p["failed"] + p["cut"] == p["arrivals"] for p in points)


def test_the_command_line_rejects_bad_flags() -> None:
    done = bench("tests.bench.overload", "--drain", "0.01", timeout=60)
    assert done.returncode == 2
    assert "--drain must be longer than the target" in done.stderr


def test_the_page_section_renders_from_the_saved_results(tmp_path: Path) -> None:
    # Every results file the section picks (the newest of each kind) must be one it can read.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    page = importlib.import_module("tests.bench._overload_page")
    text = "\n".join(page.render(tmp_path))
    confirm, seeds = page.newest("confirm-overload-*.json"), page.newest("seeds-overload-*.json")
    shown = confirm is not None and not page.superseded(confirm, seeds)
    assert ("### A later run, after a change of the policy" in text) == shown
    assert "### Several seeds, each system in a process of its own" in text


def test_a_confirming_run_is_superseded_by_a_newer_sweep_over_seeds(overload: ModuleType) -> None:
    page = importlib.import_module("tests.bench._overload_page")
    confirm = Path("confirm-overload-2026-12-01b.json")
    assert page.superseded(confirm, Path("seeds-overload-2026-12-02.json"))
    assert not page.superseded(confirm, Path("seeds-overload-2026-12-01.json"))
    assert not page.superseded(confirm, None)


def test_the_seeds_runner_collects_one_run_per_seed_and_system(tmp_path: Path) -> None:
    out = tmp_path / "seeds.json"
    done = bench(
        "tests.bench.overload_seeds",
        "--seeds",
        "1,2",
        "--systems",
        "target,eager,window",
        "--light",
        "window",
        "--lock",
        str(tmp_path / "bench.lock"),
        "--models",
        "noisy",
        "--loads",
        "0.25,2",
        "--duration",
        "0.3",
        "--drain",
        "0.2",
        "--clock",
        "virtual",
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    runs = json.loads(out.read_text())["runs"]
    assert sorted(runs) == [f"seed{s}-{k}" for s in (1, 2) for k in ("eager", "target", "window")]
    assert {run["settings"]["seed"] for run in runs.values()} == {1, 2}
    # A --light system runs only below capacity; the others at every load.
    assert {len(run["points"]) for key, run in runs.items() if "window" not in key} == {2}
    assert {p["load"] for key, run in runs.items() if "window" in key for p in run["points"]} == {0.25}
    # The table has one row per load, each with the systems' means, and the goals judged at 0.25x and 2x.
    assert "| 0.25x |" in done.stdout
    assert "| 2x |" in done.stdout
    assert "- 0.25x: ours p50" in done.stdout  # against eager's
    assert "- 2x: ours" in done.stdout
    assert "of capacity (goal 90%)" in done.stdout
    # Judged against the noisy model's own capacity: 1% of batches 5x slower make it 1.04x slower on average.
    assert "Capacity: 2,079 records/s" in done.stdout


def test_the_capacity_at_the_target_counts_a_models_stragglers(overload: ModuleType) -> None:
    seeds = importlib.import_module("tests.bench.overload_seeds")
    clean = {"capacity_rps": 2000.0, "straggler_p": 0.0, "straggler_x": 5.0}
    noisy = {"capacity_rps": 2000.0, "straggler_p": 0.01, "straggler_x": 5.0}
    assert seeds.capacity_at_target(clean) == 2000.0
    assert seeds.capacity_at_target(noisy) == pytest.approx(2000.0 / 1.04)


def test_the_seeds_runner_rejects_a_light_system_it_does_not_run() -> None:
    done = bench(
        "tests.bench.overload_seeds", "--systems", "target", "--light", "eager", "--json", "x.json", timeout=60
    )
    assert done.returncode == 2
    assert "--light names systems not in --systems: eager" in done.stderr


def test_the_seeds_runner_rejects_bad_seeds() -> None:
    done = bench("tests.bench.overload_seeds", "--seeds", "one", "--json", "x.json", timeout=60)
    assert done.returncode == 2
    assert "--seeds must be comma-separated integers" in done.stderr
