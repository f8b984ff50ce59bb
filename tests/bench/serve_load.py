"""Load on the embed endpoint of docs/examples/serve_fastapi.py, batched and one request per model call.

The server runs in a subprocess (uvicorn on a free loopback port); this
process is the load generator: ``N`` concurrent clients (httpx, one
keep-alive connection each), each sending one ``POST /embed`` and waiting for
its answer before the next (a closed loop).  For each client count the clients
first run ``--warmup`` seconds unmeasured, then ``--duration`` seconds
measured: requests/s counts the answers of the measured part, p50/p99 their
latencies as the clients saw them.  The same texts (a deterministic mix of
lengths, log-uniform between 4 and 256 tokens) go to two servers:

* **batched**: the example as it ships (``dispatch="eager"``,
  ``batch_cost="padded"``, ``grouping="similar_cost"``, up to 64 texts a call);
* **unbatched**: the same server with ``--no-batching`` (``max_batch_size=1``:
  one text per model call, behind the same queue).

The model is the simulated one by default (its call takes what MiniLM's does
on a 2-core CPU: 20 ms plus 0.3 ms per padded token, without using the CPU);
``--model minilm`` runs the real one (the ``models`` extra).  The clients and
the server share the machine: on a small or busy one the figures are rough.

Run from the repository root::

    python -m pip install -e '.[serve]'
    python -m tests.bench.serve_load                  # the markdown table on stdout
    python -m tests.bench.serve_load --model minilm --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "serve_fastapi.py"
COMMAND = "python -m tests.bench.serve_load"


class ServerProcess:
    """docs/examples/serve_fastapi.py in a subprocess on 127.0.0.1 and a free port.

    ``with ServerProcess("--model", "simulated") as server:`` starts it and
    waits until it prints the address it listens on (``server.url``); leaving
    the block stops it (SIGTERM, then SIGKILL after ``stop_timeout_s``).  Its
    output is collected in ``server.lines``.
    """

    def __init__(self, *flags: str, ready_timeout_s: float = 60.0, stop_timeout_s: float = 30.0) -> None:
        self.flags = flags
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.lines: list[str] = []
        self.url = ""
        self._ready = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def proc(self) -> subprocess.Popen[str]:
        assert self._proc is not None, "the server is not started"
        return self._proc

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def start(self) -> ServerProcess:
        command = [sys.executable, str(EXAMPLE), "--host", "127.0.0.1", "--port", "0", *self.flags]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
        )
        self._reader = threading.Thread(target=self._read, name="server-output", daemon=True)
        self._reader.start()
        if not self._ready.wait(self.ready_timeout_s) or not self.url:
            self.stop()
            raise RuntimeError(f"the server did not start in {self.ready_timeout_s}s:\n{self.output}")
        return self

    def _read(self) -> None:
        stream = self.proc.stdout
        assert stream is not None
        for line in stream:
            self.lines.append(line)
            if not self.url and line.startswith("listening on "):
                self.url = line.split()[2]
                self._ready.set()
        self._ready.set()  # the process ended: wake start() either way

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        """The exit code once the process has ended; its output is then complete."""
        code = self.proc.wait(timeout=timeout_s)
        assert self._reader is not None
        self._reader.join(timeout=timeout_s)
        return code

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL if need be; return the exit code (None if never started)."""
        proc = self._proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                return self.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                return self.wait(self.stop_timeout_s)
        finally:
            if proc.stdout is not None:
                proc.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


# --------------------------------------------------------------------- the load

WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week case point "
    "government company number group problem fact model batch token request answer server client queue"
).split()


def make_texts(n: int, *, seed: int = 0) -> list[str]:
    """``n`` deterministic texts whose lengths are log-uniform between about 4 and 256 tokens."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        tokens = round(math.exp(rng.uniform(math.log(4), math.log(256))))
        words: list[str] = []
        while len(" ".join(words)) // 4 + 2 < tokens:
            words.append(rng.choice(WORDS))
        texts.append(" ".join(words))
    return texts


@dataclass
class Point:
    """One measured point: a server mode at one client count."""

    mode: str
    clients: int
    seconds: float
    latencies: list[float]
    other: int
    batch_size: float

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return math.nan
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def run_clients(
    url: str, clients: int, texts: Sequence[str], duration_s: float
) -> tuple[float, list[float], int]:
    """``clients`` closed-loop clients for ``duration_s``: (seconds, latencies of the 200s, other answers).

    Each client has an ``httpx.AsyncClient`` of its own with one connection,
    made before the clock starts: one shared pool of many connections costs
    the load generator so much CPU when many answers arrive at once (as they
    do from a batch) that it, not the server, would set the pace.
    """
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    other = 0
    import httpx  # the serve extra; imported here so the benchmarks page renders without it

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    tls = ssl.create_default_context()  # unused over http://, but each client would load the CA store again
    async with contextlib.AsyncExitStack() as stack:
        pool = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0, verify=tls))
            for _ in range(clients)
        ]
        started = loop.time()
        deadline = started + duration_s

        async def one_client(k: int) -> None:
            nonlocal other
            client, i = pool[k], k
            while loop.time() < deadline:
                sent = loop.time()
                response = await client.post("/embed", json={"text": texts[i % len(texts)]})
                if response.status_code == 200:
                    latencies.append(loop.time() - sent)
                else:
                    other += 1
                i += clients

        await asyncio.gather(*(one_client(k) for k in range(clients)))
        seconds = loop.time() - started
    return seconds, latencies, other


async def measure(url: str, mode: str, clients: int, texts: Sequence[str], warmup_s: float, duration_s: float) -> Point:
    import httpx

    if warmup_s > 0:
        await run_clients(url, clients, texts, warmup_s)
    async with httpx.AsyncClient(base_url=url) as client:
        before = (await client.get("/stats")).json()["batchers"]["embed"]
    seconds, latencies, other = await run_clients(url, clients, texts, duration_s)
    async with httpx.AsyncClient(base_url=url) as client:
        after = (await client.get("/stats")).json()["batchers"]["embed"]
    batches = after["total_batches"] - before["total_batches"]
    records = after["total_completed"] - before["total_completed"]
    return Point(mode, clients, seconds, latencies, other, records / batches if batches else 0.0)


def table(points: Sequence[Point], model: str) -> str:
    lines = [
        f"Embed endpoint, {model} model ({COMMAND}; rough: a loaded 2-core machine, clients and server on it)",
        "",
        "| server | clients | requests/s | p50 ms | p99 ms | texts per model call | non-200 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(
            f"| {p.mode} | {p.clients} | {p.rps:,.1f} | {p.percentile(0.5) * 1000:,.1f} | "
            f"{p.percentile(0.99) * 1000:,.1f} | {p.batch_size:.1f} | {p.other} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("simulated", "minilm"), default="simulated", help="default simulated")
    parser.add_argument("--clients", default="1,16,128", help="client counts, comma-separated (default 1,16,128)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per point (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each point (default 1)")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="server's event loop")
    parser.add_argument("--texts", type=int, default=2_000, help="distinct texts (default 2000)")
    parser.add_argument("--sim-call-ms", help="simulated model: ms per call (default: the server's, 20)")
    parser.add_argument("--sim-token-ms", help="simulated model: ms per padded token (default: the server's, 0.3)")
    parser.add_argument("--json", help="also add the table to this JSON file (for the benchmarks page)")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    texts = make_texts(args.texts)

    points: list[Point] = []
    for mode, extra in (("batched", ()), ("unbatched", ("--no-batching",))):
        flags = ("--model", args.model, "--loop", args.loop, "--log-level", "warning", "--max-queue-size", "8192")
        for name in ("sim_call_ms", "sim_token_ms"):
            if getattr(args, name) is not None:
                flags += (f"--{name.replace('_', '-')}", getattr(args, name))
        with ServerProcess(*flags, *extra, ready_timeout_s=180.0) as server:
            for clients in counts:
                point = asyncio.run(measure(server.url, mode, clients, texts, args.warmup, args.duration))
                p50, p99 = point.percentile(0.5) * 1000, point.percentile(0.99) * 1000
                print(
                    f"{mode:>9} {clients:>4} clients: {point.rps:8.1f} req/s, p50 {p50:7.1f} ms, "
                    f"p99 {p99:7.1f} ms, {point.batch_size:.1f} texts per call",
                    file=sys.stderr,
                    flush=True,
                )
                points.append(point)
    load = os.getloadavg()
    model = args.model
    if model == "simulated":
        call, token = args.sim_call_ms or "20", args.sim_token_ms or "0.3"
        model = f"simulated ({call} ms a call + {token} ms a padded token)"
    print(table(points, model))
    print(f"\nLoad average after the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs).")
    if args.json:
        save(args.json, points, model, load)


def save(path: str, points: Sequence[Point], model: str, load: tuple[float, float, float]) -> None:
    """Add this run's table to the JSON file ``path`` (one entry per model), for the benchmarks page."""
    target = Path(path)
    runs: dict[str, Any] = json.loads(target.read_text()) if target.exists() else {"runs": {}}
    runs["runs"][model] = {
        "table": table(points, model),
        "load_avg": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    target.write_text(json.dumps(runs, indent=1))


def format_report(results: dict[str, Any]) -> str:
    """The saved tables, one per model, each with the machine's load when it ran."""
    parts = []
    for run in results["runs"].values():
        parts += [run["table"], "", f"Measured {run['date']}; load average after the run {run['load_avg']}.", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
