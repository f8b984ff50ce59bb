"""The overload benchmark over several seeds, each system in a process of its own.

One run of ``tests/bench/overload.py`` draws one arrival schedule and one
sequence of model noise: on the noisy model a handful of straggler batches
decide a point, and two systems a few percent apart trade places from seed to
seed.  This runs the benchmark once per (seed, system), each in a fresh
process (so no system's leftover clients or timers slow another's loop), and
collects the runs into one file; the benchmarks page shows the newest such file
(``seeds-overload-*.json``) as a table of means with each seed's figure, and
judges the goals on the means.

Run from the repository root, alone on the machine (it measures real time)::

    python -m tests.bench.overload_seeds --seeds 1,2,3,4 --systems target,bentoml \\
        --json tests/bench/results/seeds-overload-DATE.json

Every other flag (``--models``, ``--duration``...) is passed on to
``tests.bench.overload`` as is.  ``--light`` names systems run only at the
loads below capacity (ours ``"eager"`` without a target: above capacity its
queue grows without bound, and the page's goal at 0.25x compares against it).
``--lock FILE`` holds that file's lock (``flock``) around each process, so
that other timing runs on a shared machine interleave between the processes
and never overlap one.

The goals are judged against each model's capacity at the target (see
[capacity_at_target][]), the most any scheduler can finish within it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from statistics import mean
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OURS = "target"
PEERS = ("flyte", "bentoml", "ray")
"""The other batchers: "at every load, goodput >= the best other system's" compares ours with these (our own
modes without a target are shown beside it, not judged against)."""
OVERLOAD_GOAL = 0.9
"""Share of capacity the goal asks of ours at 2x and 4x."""


def run(
    seeds: list[int],
    systems: list[str],
    passed: list[str],
    workdir: Path,
    *,
    loads: str,
    light: frozenset[str] = frozenset(),
    lock: Path | None = None,
) -> dict[str, Any]:
    """Run ``tests.bench.overload`` once per seed and system: ``{"seed<s>-<system>": its JSON}``.

    A system in ``light`` runs only at the loads of ``loads`` below 1x; with ``lock``, each process
    runs holding that file's lock.
    """
    below = ",".join(x for x in loads.split(",") if x.strip() and float(x) < 1.0)
    runs: dict[str, Any] = {}
    for seed in seeds:
        for system in systems:
            at = below if system in light else loads
            if not at:
                continue
            out = workdir / f"seed{seed}-{system}.json"
            command = [sys.executable, "-m", "tests.bench.overload", "--systems", system, "--seed", str(seed)]
            with _locked(lock):
                subprocess.run(
                    [*command, "--loads", at, *passed, "--json", str(out)],
                    cwd=ROOT,
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
            runs[f"seed{seed}-{system}"] = json.loads(out.read_text())
    return runs


@contextlib.contextmanager
def _locked(path: Path | None) -> Iterator[None]:
    """Hold ``path``'s exclusive ``flock`` (waiting for it), or nothing without a path."""
    if path is None:
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def capacity_at_target(spec: dict[str, Any]) -> float:
    """A model's capacity at the target, records/s (``spec``: a model as the JSON has it).

    Its throughput with batches of ``capacity_batch`` back to back: the batch size at which a record
    that waits out one batch and rides the next still finishes within the target, the issue's measure
    of capacity.  A noisy model's batches take longer on average (its stragglers; the jitter's mean
    is 1), which no scheduler wins back: its capacity is the noise-free figure divided by that mean.
    """
    slower = 1.0 + spec.get("straggler_p", 0.0) * (spec.get("straggler_x", 1.0) - 1.0)
    return float(spec["capacity_rps"]) / slower


def by_load(data: dict[str, Any], model: str) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """Every run's points of ``model``, grouped by ``(system, load)``, in seed order."""
    grouped: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for key in sorted(data["runs"]):
        for point in data["runs"][key]["points"]:
            if point["model"] == model:
                grouped.setdefault((point["system"], point["load"]), []).append(point)
    return grouped


def lines(data: dict[str, Any], source: str) -> list[str]:
    """The page's table of means over the seeds, and the goals judged on them."""
    first = next(iter(data["runs"].values()))
    settings, target_ms = first["settings"], first["settings"]["target_s"] * 1e3
    labels = {s["key"]: s["label"] for run in data["runs"].values() for s in run["systems"]}
    seeds = sorted({run["settings"]["seed"] for run in data["runs"].values()})
    md = [
        "### Several seeds, each system in a process of its own",
        "",
        f"{data.get('note', '')} Seeds {', '.join(map(str, seeds))}; {settings['warmup']:g} s warm-up, "
        f"{settings['duration']:g} s of arrivals and {settings['drain']:g} s of drain per point, on the "
        f"{settings['clock']} clock; raw results: `{source}`.",
        "",
    ]
    for model, spec in first["models"].items():
        grouped = by_load(data, model)
        systems = [s for s in labels if any(s == key for key, _ in grouped)]
        loads = sorted({load for _, load in grouped})
        capacity = capacity_at_target(spec)
        md += [
            f"**{model} model**: goodput, records/s within {target_ms:g} ms, mean over the seeds "
            "(in parentheses: its share of capacity, then each seed's figure), and the highest p99 of any seed.",
            "",
            "| load | " + " | ".join(labels[s] for s in systems) + " |",
            "|---:|" + "---|" * len(systems),
        ]
        verdicts: list[str] = []
        for load in loads:
            cells = []
            for system in systems:
                points = grouped.get((system, load), [])
                if not points:
                    cells.append("-")
                    continue
                goodput = mean(p["goodput_rps"] for p in points)
                p99 = max((p["p99_ms"] or 0.0) for p in points)
                each = ", ".join(f"{p['goodput_rps']:,.0f}" for p in points)
                cells.append(f"{goodput:,.0f} ({goodput / capacity:.0%}; {each}), p99 {p99:.0f} ms")
            md.append(f"| {load:g}x | " + " | ".join(cells) + " |")
            verdicts += _goals(grouped, load, capacity, target_ms)
        md += ["", *verdicts, ""] if verdicts else [""]
        md += [_capacity_note(spec, capacity), ""]
    return md


def _capacity_note(spec: dict[str, Any], capacity: float) -> str:
    """What "capacity" is for this model, in the page's words."""
    text = (
        f"Capacity: {capacity:,.0f} records/s, this model's throughput with batches of "
        f"{spec.get('capacity_batch', 64)} back to back (a record that waits out one batch and rides the next "
        "still finishes within the target)"
    )
    if capacity < spec["capacity_rps"]:
        text += (
            f"; its stragglers make its batches take {spec['capacity_rps'] / capacity:.2f}x as long on average as "
            f"the noise-free model's ({spec['capacity_rps']:,.0f}/s), which no scheduler wins back"
        )
    return text + "."


def _goals(
    grouped: dict[tuple[str, float], list[dict[str, Any]]], load: float, capacity: float, target_ms: float
) -> list[str]:
    """Issue 13's goals at ``load``, judged on the means of ours and of each other system."""
    ours = grouped.get((OURS, load))
    if not ours:
        return []
    goodput = mean(p["goodput_rps"] for p in ours)
    others = {
        s: mean(p["goodput_rps"] for p in points) for (s, at), points in grouped.items() if at == load and s in PEERS
    }
    out = []
    if others:
        best = max(others.values())
        out.append(
            f"- {load:g}x: ours {goodput:,.0f} vs the best other {best:,.0f}: "
            f"**{'met' if goodput >= best else 'not met'}**."
        )
    eager = grouped.get(("eager", load))
    if load == 0.25 and eager:
        ours_p50, eager_p50 = mean(p["p50_ms"] for p in ours), mean(p["p50_ms"] for p in eager)
        out.append(
            f"- {load:g}x: ours p50 {ours_p50:.2f} ms vs eager's {eager_p50:.2f} ms (goal: within 1 ms): "
            f"**{'met' if abs(ours_p50 - eager_p50) <= 1.0 else 'not met'}**."
        )
    if load >= 2:
        p99 = max((p["p99_ms"] or 0.0) for p in ours)
        ok = goodput >= OVERLOAD_GOAL * capacity and p99 <= target_ms
        out.append(
            f"- {load:g}x: ours {goodput / capacity:.1%} of capacity (goal {OVERLOAD_GOAL:.0%}), p99 {p99:.1f} ms "
            f"(goal {target_ms:g}): **{'met' if ok else 'not met'}**."
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.overload_seeds", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--seeds", default="1,2,3,4", help="comma-separated (default 1,2,3,4)")
    parser.add_argument("--systems", default="target,bentoml", help="comma-separated keys (default target,bentoml)")
    parser.add_argument("--loads", default="0.9,1.2,2,4", help="comma-separated multiples of capacity")
    parser.add_argument("--light", default="", help="systems run only at the loads below 1x (comma-separated)")
    parser.add_argument("--lock", type=Path, help="hold this file's flock around each process")
    parser.add_argument("--note", default="", help="what the page says about this run")
    parser.add_argument("--json", metavar="FILE", required=True, help="write the collected runs here")
    args, passed = parser.parse_known_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not seeds or not systems:
        parser.error("--seeds and --systems must name at least one each")
    try:
        [float(x) for x in args.loads.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--loads must be comma-separated numbers, got {args.loads!r}")
    light = frozenset(s.strip() for s in args.light.split(",") if s.strip())
    if light - set(systems):
        parser.error(f"--light names systems not in --systems: {', '.join(sorted(light - set(systems)))}")
    with tempfile.TemporaryDirectory() as workdir:
        runs = run(seeds, systems, passed, Path(workdir), loads=args.loads, light=light, lock=args.lock)
    data = {
        "note": args.note,
        "command": shlex.join(["python", "-m", "tests.bench.overload_seeds", *(argv or sys.argv[1:])]),
        "runs": runs,
    }
    Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    print("\n".join(lines(data, args.json)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
