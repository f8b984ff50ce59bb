"""Run the whole benchmark suite and write ``docs/pages/benchmarks.md`` and ``docs/pages/img/*.png``.

From the repository root::

    python -m pip install -e '.[bench]'   # tokenbatcher + flyte==2.12.1 + matplotlib
    python -m tests.bench                 # ~2-3 minutes

Options: ``--quick`` (a smoke run: fewer repeats, shorter points), ``--out DIR``
(default ``docs/pages``), ``--json FILE`` (also dump the raw results), ``--from-json
FILE`` (re-render the report and plots from such a dump without measuring).

flyte and matplotlib are optional: without flyte the flyte columns and the
ratios to it are left out (with a note); without matplotlib no plots are drawn.
Every speed figure is a ratio of implementations measured side by side in the
same run, so the report means the same thing on any machine.

The "Latency targets under overload" section is measured apart (about 20
minutes: ``python -m tests.bench.overload``, and ``python -m
tests.bench.model_overload`` for the real model); the page renders the newest
of their results files in ``tests/bench/results/`` (see ``_overload_page.py``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import _overload_page, latency, overhead
from ._impls import FLYTE_ERROR, LABELS, machine_info

COMMAND = "python -m tests.bench"
INSTALL = "python -m pip install -e '.[bench]'"
COLORS = {"floor": "#7f7f7f", "flyte": "#d62728", "window": "#1f77b4", "eager": "#2ca02c"}


# --------------------------------------------------------------------- goals


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def evaluate_goals(ov: dict[str, Any], lat: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """The issue's goals: (goal, measured, met?)."""
    goals: list[tuple[str, str, bool | None]] = []
    have_flyte = "flyte" in lat["sweep"]
    for shape in ("1 producer", "16 producers"):
        row = ov["producers"].get(shape)
        if row is None:
            continue
        for name in ("window", "eager"):
            r = row[name]
            if have_flyte:
                sp = r["speedup_vs_flyte"]
                goals.append(
                    (
                        f"overhead, {shape}, {LABELS[name]}: ≥ 5x flyte's records/s",
                        f"{sp:.1f}x ({r['us_per_record']:.2f} vs {row['flyte']['us_per_record']:.1f} µs/record)",
                        sp >= 5,
                    )
                )
            else:
                goals.append(
                    (f"overhead, {shape}, {LABELS[name]}: ≥ 5x flyte's records/s", "flyte not installed", None)
                )
            goals.append(
                (
                    f"overhead, {shape}, {LABELS[name]}: ≤ 1.5x the asyncio floor",
                    f"{r['vs_floor']:.2f}x ({r['us_per_record']:.2f} vs {row['floor']['us_per_record']:.2f} µs/record)",
                    r["vs_floor"] <= 1.5,
                )
            )
    light = lat["light"]
    eager = light["points"]["eager"]
    bound = light["work_ms"] + 1.0
    goals.append(
        (
            f'"eager", light load ({light["rate"]:g} rec/s, {light["work_ms"]:g} ms work): p50 ≤ work + 1 ms',
            f"p50 {eager['p50_ms']:.2f} ms (bound {bound:.1f} ms)",
            eager["p50_ms"] <= bound,
        )
    )
    if 1000 in lat["rates"]:
        k = lat["rates"].index(1000)
        e = lat["sweep"]["eager"][k]
        if have_flyte:
            f = lat["sweep"]["flyte"][k]
            goals.append(
                (
                    '"eager", 1,000 rec/s: p50 ≤ ½ flyte\'s',
                    f"{e['p50_ms']:.1f} vs {f['p50_ms']:.1f} ms (ratio {e['p50_ms'] / f['p50_ms']:.2f})",
                    e["p50_ms"] <= 0.5 * f["p50_ms"],
                )
            )
            goals.append(
                (
                    '"eager", 1,000 rec/s: avg batch ≥ flyte\'s',
                    f"{e['avg_batch']:.1f} vs {f['avg_batch']:.1f} records",
                    e["avg_batch"] >= f["avg_batch"],
                )
            )
        else:
            goals.append(('"eager", 1,000 rec/s vs flyte', "flyte not installed", None))
    return goals


def _batch_latency_bound(lat: dict[str, Any]) -> str | None:
    """Why "p50 <= half flyte's with a batch at least flyte's" may be out of reach at 1,000 rec/s."""
    if 1000 not in lat["rates"] or "flyte" not in lat["sweep"]:
        return None
    k = lat["rates"].index(1000)
    f = lat["sweep"]["flyte"][k]
    model = lat["model"]
    batch = f["avg_batch"]
    gather_ms = batch / 1000 * 1e3 / 2  # a record waits, on average, for half of its batch to arrive
    work_ms = model["base_ms"] + model["per_record_ms"] * batch
    if gather_ms + work_ms <= 0.5 * f["p50_ms"]:
        return None
    return (
        f"Note on the 1,000 rec/s goal: here flyte's batches average {batch:.1f} records. Any batcher whose "
        f"batches are that large makes the typical record wait for about half of its batch to arrive "
        f"({batch:.0f} / 2 records at 1,000/s = {gather_ms:.0f} ms) and then for the work on it "
        f"({model['base_ms']:g} + {model['per_record_ms']:g} x {batch:.0f} = {work_ms:.0f} ms): about "
        f"{gather_ms + work_ms:.0f} ms, above half of flyte's median ({0.5 * f['p50_ms']:.0f} ms). The two halves "
        "of that goal cannot both hold against the flyte measured in this run; they are kept as stated."
    )


# --------------------------------------------------------------------- plots


def draw_plots(ov: dict[str, Any], lat: dict[str, Any], img: Path) -> list[str]:
    """Draw the PNGs; return their file names (empty without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    img.mkdir(parents=True, exist_ok=True)
    files = []
    rates = lat["rates"]

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points in lat["sweep"].items():
        c = COLORS[name]
        ax.plot(rates, [p["p50_ms"] for p in points], "o-", color=c, label=f"{LABELS[name]} p50")
        ax.plot(rates, [p["p99_ms"] for p in points], "s--", color=c, alpha=0.6, label=f"{LABELS[name]} p99")
    ax.set_xscale("log")
    ax.set_xlabel("offered load (records/s, Poisson)")
    ax.set_ylabel("submit → result latency (ms)")
    ax.set_title("Latency vs load (work: 20 ms + 0.1 ms/record)")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(img / "latency_vs_load.png", dpi=110)
    plt.close(fig)
    files.append("latency_vs_load.png")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points in lat["sweep"].items():
        ax.plot(rates, [p["avg_batch"] for p in points], "o-", color=COLORS[name], label=LABELS[name])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (records/s, Poisson)")
    ax.set_ylabel("average records per batch")
    ax.set_title("Batch fill vs load")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "batch_size_vs_load.png", dpi=110)
    plt.close(fig)
    files.append("batch_size_vs_load.png")

    shapes = list(ov["producers"])
    names = list(next(iter(ov["producers"].values())))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(7.5, 4.4), layout="constrained")
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(shapes))]
        ys = [ov["producers"][s][name]["us_per_record"] for s in shapes]
        bars = ax.bar(xs, ys, width, color=COLORS[name], label=LABELS[name])
        for bar, y in zip(bars, ys, strict=True):
            ax.annotate(f"{y:.1f}", (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(shapes)), shapes)
    ax.set_yscale("log")
    ax.set_ylabel("µs per record (median, log scale; lower is better)")
    ax.set_title("Overhead through a no-op process_fn")
    fig.legend(loc="outside lower center", ncol=len(names), fontsize=8, frameon=False)  # never over a bar
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.savefig(img / "overhead.png", dpi=110)
    plt.close(fig)
    files.append("overhead.png")

    points = lat["light"]["points"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = [LABELS[n] for n in points]
    p50 = [p["p50_ms"] for p in points.values()]
    p99 = [p["p99_ms"] for p in points.values()]
    ys = list(range(len(labels)))
    ax.barh([y + 0.2 for y in ys], p50, 0.4, color=[COLORS[n] for n in points], label="p50")
    ax.barh([y - 0.2 for y in ys], p99, 0.4, color=[COLORS[n] for n in points], alpha=0.45, label="p99")
    for y, a, b in zip(ys, p50, p99, strict=True):
        ax.annotate(f"{a:.1f}", (a, y + 0.2), va="center", fontsize=7)
        ax.annotate(f"{b:.1f}", (b, y - 0.2), va="center", fontsize=7)
    ax.set_yticks(list(ys), labels)
    ax.set_xlim(0, max(p99) * 1.12)  # room for the figure after the longest bar
    ax.axvline(lat["light"]["work_ms"], color="k", lw=0.8, ls=":")
    ax.set_xlabel(f"latency (ms); dotted line: the {lat['light']['work_ms']:g} ms of work")
    ax.set_title(f"Light load ({lat['light']['rate']:g} records/s)")
    from matplotlib.patches import Patch

    ax.legend(
        handles=[Patch(facecolor="0.3", label="p50"), Patch(facecolor="0.3", alpha=0.45, label="p99")], fontsize=8
    )
    fig.tight_layout()
    fig.savefig(img / "light_load.png", dpi=110)
    plt.close(fig)
    files.append("light_load.png")
    return files


# --------------------------------------------------------------------- report


def _span(values: list[float], fmt: str, unit: str = "") -> str:
    """``"4.5 to 5.2 µs"``, ``"11.5x to 16.1x"``, or one figure when they all print the same."""
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    if lo == hi:
        return f"{lo}{unit}"
    return f"{lo} to {hi}{unit}" if unit.startswith(" ") else f"{lo}{unit} to {hi}{unit}"


def summary(ov: dict[str, Any], lat: dict[str, Any], info: dict[str, str]) -> list[str]:
    """The page's opening: what is faster, by how much, against whom, on which machine."""
    have_flyte = "flyte" in lat["sweep"]
    rival = f"flyte.extras {info['flyte']}" if have_flyte else "the asyncio floor (flyte was not installed)"
    md = [
        "## Summary",
        "",
        f"tokenbatcher {info['tokenbatcher'].split(' ')[0]} against {rival}, measured side by side in one run "
        f"on {info['date'][:10]}: {info['cpu']}, {info['cpu_count'].split(' ')[0]} CPUs, {info['python']} "
        "(details under [Machine](#machine)). Both libraries run with their default settings, "
        'apart from `dispatch="eager"` where named. On a small shared machine a single figure varies by '
        "about ±30 %; the ratios, measured side by side, vary less.",
        "",
    ]
    shapes = [s for s in ov["producers"] if s != "task per record"]
    ours = [ov["producers"][s][n]["us_per_record"] for s in shapes for n in ("window", "eager")]
    if have_flyte:
        theirs = [ov["producers"][s]["flyte"]["us_per_record"] for s in shapes]
        speed = [ov["producers"][s][n]["speedup_vs_flyte"] for s in shapes for n in ("window", "eager")]
        line = (
            f"- **Per-record overhead: {_span(speed, '.1f', 'x')} as fast as flyte.extras.** Through a function "
            f"that does nothing, tokenbatcher spends {_span(ours, '.1f', ' µs')} on a record where flyte.extras "
            f"spends {_span(theirs, '.0f', ' µs')} (with {' and with '.join(shapes)})."
        )
        task = ov["producers"].get("task per record")
        if task is not None:
            line += (
                f" With one task per record, where creating the task dominates, "
                f"{_span([task[n]['speedup_vs_flyte'] for n in ('window', 'eager')], '.1f', 'x')}."
            )
    else:
        floor = [ov["producers"][s][n]["vs_floor"] for s in shapes for n in ("window", "eager")]
        line = (
            f"- **Per-record overhead:** {_span(ours, '.1f', ' µs')} per record through a function that does "
            f"nothing, {_span(floor, '.1f', 'x')} the asyncio floor."
        )
    md.append(line + " [More](#overhead)")

    light = lat["light"]
    points = light["points"]
    held = "flyte and the default" if have_flyte else "the default"
    against = f"flyte's {points['flyte']['p50_ms']:.0f} ms" if have_flyte else f"{points['window']['p50_ms']:.0f} ms"
    md.append(
        f'- **Light load: `dispatch="eager"` answers in {points["eager"]["p50_ms"]:.1f} ms, against {against}** '
        f"(median; {light['rate']:g} records/s into {light['work_ms']:g} ms of work). Eager hands a record to an "
        f'idle function at once; {held} `"window"` hold it for the 50 ms batch window. [More](#light-load)'
    )
    if have_flyte:
        sweep = lat["sweep"]
        flyte = sweep["flyte"]

        def ratios(name: str, key: str) -> list[float]:
            return [p[key] / f[key] for p, f in zip(sweep[name], flyte, strict=True)]

        window_off = max(abs(r - 1) for key in ("p50_ms", "avg_batch") for r in ratios("window", key))
        rates = lat["rates"]
        model = lat["model"]
        md.append(
            f'- **At {rates[0]:,g} to {rates[-1]:,g} records/s, `"eager"` has '
            f"{_span(ratios('eager', 'p50_ms'), '.2f', 'x')} flyte's median latency, with smaller batches** "
            f"({_span(ratios('eager', 'avg_batch'), '.2f', 'x')} as many records per batch; work of "
            f"{model['base_ms']:g} ms + {model['per_record_ms']:g} ms per record). Eager sends what is waiting "
            'whenever the function is free, so it makes more, smaller calls. The default `"window"` matches '
            f"flyte within {window_off * 100:.0f} % in both. [More](#latency-and-batch-fill-against-load)"
        )
        cpu = [
            p["cpu_us_per_record"] / f["cpu_us_per_record"]
            for n in ("window", "eager")
            for p, f in zip(sweep[n], flyte, strict=True)
        ]
        md.append(f"- **CPU time per record: {_span(cpu, '.2f', 'x')} flyte's** at the same loads.")
    md += [
        "",
        'What to choose: `dispatch="eager"` for the lowest latency at any load; the default `"window"` for '
        "flyte's exact batch timing and its fuller batches. [Tuning](tuning.md) explains each setting.",
        "",
    ]
    return md


RESULTS = Path(__file__).resolve().parent / "results"

STANDALONE = [
    (
        "Scaling with queue depth",
        "scaling",
        "Every batching mode draining a queue filled in advance, with a no-op model: the batcher's own "
        "cost per record at 1k to 1M queued records (CPU time, so other processes on the machine "
        "do not count), the memory a queued record takes, one caller's round trip, and the memory floor: "
        "what visiting the same records in each mode's order costs with no batcher at all.",
        "python -m tests.bench.scaling \\\n"
        "    --json tests/bench/results/scaling.json --plot docs/pages/img/scaling.png",
        "img/scaling.png",
    ),
    (
        "An HTTP service: the FastAPI example under load",
        "serve_load",
        "`docs/examples/serve_fastapi.py`'s `POST /embed`, batched (eager, padded, similar_cost) against one "
        "request per model call, driven over real HTTP by 1, 16 and 128 concurrent clients on the same "
        "machine. The simulated model's cost per call and per padded token decides whether batching pays: "
        "with a GPU-like model (5 ms a call, 0.005 ms a padded token) batching gives 2.7x to 3.5x the "
        "requests/s from 16 clients on; with the CPU fit of MiniLM (20 ms a call, 0.3 ms a padded token) "
        "a padded batch of mixed lengths costs more than the calls it saves, and at 16 clients the "
        "batched service is slower than one request per call. That is what the self-tuning budget "
        "(`tune=`, [Tuning](tuning.md)) is for.",
        "python -m pip install -e '.[serve]'\n"
        "python -m tests.bench.serve_load --json tests/bench/results/serve_load.json\n"
        "python -m tests.bench.serve_load --sim-call-ms 5 --sim-token-ms 0.005 \\\n"
        "    --json tests/bench/results/serve_load.json",
        None,
    ),
    (
        "Self-tuning budget: the real model",
        "tuning_model",
        '`tune="throughput"` at the default ceilings (32,000 tokens, 256 records) against the default '
        "budget, fixed budgets, the offline best (every text known in advance, sorted, cut into the "
        "largest padded batches within a budget) and mixedbread `batched` 0.1.5 in its length-sorted mode, "
        "all padded + similar_cost + eager on our side, fed as a service (32 clients each awaiting its "
        "result) and as a batch job (every text queued at once). The simulated models of "
        "`python -m tests.bench.tuning` (exact, on the virtual clock) are in [Tuning](tuning.md).",
        "python -m pip install -e '.[models,bench]'\n"
        "python -m tests.bench.tuning_model --threads 2 --repeats 3 \\\n"
        "    --json tests/bench/results/tuning_model.json",
        None,
    ),
]
"""Benchmarks run on their own (they take long, or need other packages), whose saved results
this page renders: (heading, module in tests/bench, what it measures, command, plot)."""


def standalone_sections() -> list[str]:
    """A section per standalone benchmark whose saved results exist, rendered by its own module."""
    md: list[str] = []
    for heading, name, what, command, image in STANDALONE:
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        module: Any = importlib.import_module(f"{__package__}.{name}")
        md += [f"## {heading}", "", what, "", "```sh", command, "```", ""]
        if image is not None:
            md += [f"![{heading}]({image})", ""]
        md += [module.format_report(json.loads(path.read_text())), ""]
    return md


def write_report(
    ov: dict[str, Any],
    lat: dict[str, Any],
    info: dict[str, str],
    plots: list[str],
    out: Path,
    elapsed: float,
    source: str | None = None,
) -> Path:
    """Write ``out/benchmarks.md``; ``source`` names the raw-results file the page can be re-rendered from."""
    have_flyte = "flyte" in lat["sweep"]
    md: list[str] = ["# Benchmarks", ""]
    md += [
        "Generated by the benchmark suite in `tests/bench/`; do not edit by hand. To measure again and "
        "rewrite this page and its plots, from the repository root:",
        "",
        "```sh",
        INSTALL,
        COMMAND,
        "```",
        "",
    ]
    if source is not None:
        md += [
            f"This page's raw results are in `{source}`; `{COMMAND} --from-json {source}` renders the page "
            "and the plots again from them without measuring.",
            "",
        ]
    if not have_flyte:
        md += [
            f"> **flyte is not installed** ({FLYTE_ERROR}), so the flyte columns and every ratio to flyte "
            f"are left out. Install it with `{INSTALL}` and run again.",
            "",
        ]
    md += summary(ov, lat, info)

    md += [
        "## Targets",
        "",
        "The goals the project set itself, judged on this run and kept as they were stated. "
        'Several are stricter than any comparison with flyte: "not met" means a target missed, '
        "not a loss to flyte.",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
    ]
    for goal, measured, ok in evaluate_goals(ov, lat):
        md.append(f"| {goal} | {measured} | {_verdict(ok)} |")
    md += [""]
    bound = _batch_latency_bound(lat)
    if bound is not None:
        md += [bound, ""]

    md += [
        "## Overhead",
        "",
        f"{ov['n']:,} records through `async def f(batch): return batch`, median of {ov['repeats']} "
        "interleaved runs (min-max shown). **Producers**: each of P producer coroutines submits "
        "its share with `fut = await b.submit(x)`, keeping the futures, then awaits them all. "
        "**Task per record**: one task per record doing `await (await b.submit(x))`. "
        "The **asyncio floor** is the least any batcher must do under the same harness: create a "
        "future per record, resolve it from a consumer that calls the function on up to 256 records, "
        "await it. Speed-up = flyte's µs/record / ours; x floor = ours / floor's. "
        f"{overhead.batch_sentence(ov)}Details: `tests/bench/overhead.py`.",
        "",
        overhead.format_table(ov),
        "",
    ]
    if "overhead.png" in plots:
        md += ["![overhead](img/overhead.png)", ""]

    model = lat["model"]
    md += [
        "## Latency and batch fill against load",
        "",
        f"Open-loop Poisson arrivals (the same seeded schedule for every implementation), "
        f"{lat['duration_s']:g} s of arrivals per point (at least {lat['min_records']} records), one task "
        f"per record measuring submit → result with `loop.time()`; `process_fn` sleeps "
        f"{model['base_ms']:g} ms + {model['per_record_ms']:g} ms per record. p99 at the lowest rates rests "
        "on few samples. Details: `tests/bench/latency.py`.",
        "",
        latency.format_sweep(lat),
        "",
    ]
    if have_flyte:
        md += [
            "Ratios to flyte at each load (p50 latency ratio, lower is better; batch-size ratio):",
            "",
            "| offered rec/s | window p50 / flyte | eager p50 / flyte | window batch / flyte | eager batch / flyte |",
            "|---:|---:|---:|---:|---:|",
        ]
        for k, rate in enumerate(lat["rates"]):
            f = lat["sweep"]["flyte"][k]
            w = lat["sweep"]["window"][k]
            e = lat["sweep"]["eager"][k]
            md.append(
                f"| {rate:g} | {w['p50_ms'] / f['p50_ms']:.2f} | {e['p50_ms'] / f['p50_ms']:.2f} "
                f"| {w['avg_batch'] / f['avg_batch']:.2f} | {e['avg_batch'] / f['avg_batch']:.2f} |"
            )
        md += [""]
    md += ["CPU time of the whole process per record (µs), a by-product of the same runs:", ""]
    names = list(lat["sweep"])
    md += ["| offered rec/s | " + " | ".join(LABELS[n] for n in names) + " |", "|---:|" + "---:|" * len(names)]
    for k, rate in enumerate(lat["rates"]):
        md.append(f"| {rate:g} | " + " | ".join(f"{lat['sweep'][n][k]['cpu_us_per_record']:.0f}" for n in names) + " |")
    md += [""]
    for name, title in (("latency_vs_load.png", "latency vs load"), ("batch_size_vs_load.png", "batch size vs load")):
        if name in plots:
            md += [f"![{title}](img/{name})", ""]

    light = lat["light"]
    md += [
        "## Light load",
        "",
        f"{light['rate']:g} records/s (Poisson) for {light['duration_s']:g} s into a function that takes a flat "
        f"{light['work_ms']:g} ms; default `batch_timeout_s` = 50 ms. The window designs hold every record "
        'for the batch window; "eager" hands it to the idle processor at once.',
        "",
        latency.format_light(lat),
        "",
    ]
    if "light_load.png" in plots:
        md += ["![light load](img/light_load.png)", ""]
    if not plots:
        md += ["_matplotlib is not installed: no plots were drawn._", ""]
    md += _overload_page.render(out / "img")

    md += standalone_sections()
    md += [
        "## Machine",
        "",
        "| property | value |",
        "|---|---|",
    ]
    for key in ("date", "python", "platform", "cpu", "cpu_count", "load_avg", "event_loop", "tokenbatcher", "flyte"):
        md.append(f"| {key.replace('_', ' ')} | {info[key]} |")
    md.append(f"| command | `{info['argv']}` ({elapsed:.0f} s) |")
    md += [
        "",
        "## Caveats",
        "",
        "- asyncio's timers wake through the selector with about 1 ms granularity; every latency, "
        "the simulated work included, carries up to ~1 ms of timer slack, the same for all implementations.",
        "- On a shared or small machine (other processes, 2 cores) single runs vary by ±30 %; "
        "the overhead table shows the median of interleaved runs and the spread.",
        "- The floor is not a usable batcher (no bound, no costs, no timeout, no error handling); "
        "it marks what asyncio itself costs under the same harness.",
        "",
    ]
    path = out / "benchmarks.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the tokenbatcher benchmark suite.")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer repeats, shorter points")
    parser.add_argument(
        "--out", default="docs/pages", help="directory for benchmarks.md and img/ (default: docs/pages)"
    )
    parser.add_argument("--json", default=None, help="also write the raw results to this file")
    parser.add_argument("--repeats", type=int, default=None, help="overhead repeats (default 5; 3 with --quick)")
    parser.add_argument("--duration", type=float, default=None, help="seconds of arrivals per load point")
    parser.add_argument("--from-json", default=None, help="re-render the report from a --json file; measure nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        raw = json.loads(Path(args.from_json).read_text())
        out = Path(args.out)
        plots = draw_plots(raw["overhead"], raw["latency"], out / "img")
        path = write_report(
            raw["overhead"], raw["latency"], raw["machine"], plots, out, raw.get("elapsed_s", 0.0), args.from_json
        )
        print(f"re-rendered {path} from {args.from_json}")
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    repeats = args.repeats or (3 if args.quick else 5)
    duration = args.duration or (1.0 if args.quick else 3.0)
    n = 6_400 if args.quick else 25_600
    if FLYTE_ERROR:
        print(f"note: flyte not available ({FLYTE_ERROR}); running without it", file=sys.stderr)
    t0 = time.perf_counter()
    info = machine_info()
    info["argv"] = " ".join([COMMAND, *(sys.argv[1:] if argv is None else argv)])
    print(f"overhead: {n:,} records, {repeats} repeats")
    ov = overhead.run(n=n, repeats=repeats)
    print(overhead.format_table(ov))
    print(f"latency: {duration:g} s per point")
    lat = latency.run(
        duration=duration, light_duration=2.0 if args.quick else 5.0, min_records=20 if args.quick else 50
    )
    plots = draw_plots(ov, lat, out / "img")
    elapsed = time.perf_counter() - t0
    path = write_report(ov, lat, info, plots, out, elapsed, args.json)
    if args.json:
        raw = {"machine": info, "overhead": ov, "latency": lat, "elapsed_s": elapsed}
        Path(args.json).write_text(json.dumps(raw, indent=1))
    print(f"\nwrote {path} and {len(plots)} plots in {elapsed:.0f} s")
    for goal, measured, ok in evaluate_goals(ov, lat):
        print(f"  [{'MET' if ok else ('n/a' if ok is None else 'NOT MET')}] {goal}: {measured}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
