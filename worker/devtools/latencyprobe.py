"""Where request → `started` latency goes, consumer by consumer: `python -m
worker.devtools.latencyprobe`.

It runs the bench's latency round (`bench.latency_round`: a caught-up exactly-once worker,
start requests at the offered rate after a warm-up) with several readers of the status topic
side by side, so that every reader times the very same events on the same machine state:

- aiokafka, read_committed (the reader that plays the executor) and read_uncommitted: the
  latter sees each event once the worker has produced it, before its transaction commits;
- librdkafka (confluent-kafka) with its defaults, read_committed and read_uncommitted, and
  read_committed with each variant of fetch settings given (`--variant`).

It also reads the worker's `/metrics` before and after the measured requests: transactions
committed per second and the mean time of a commit and of a batch.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from worker.devtools.bench import (
    BenchOptions,
    _Bench,
    _Observer,
    _Tail,
    _Worker,
    latency_round,
    with_bench,
)
from worker.devtools.latency import Percentiles, RdkafkaTail, describe
from worker.logs import configure as configure_logs
from worker.settings import Topics

DEFAULT_VARIANTS: tuple[dict[str, Any], ...] = (
    {"fetch.wait.max.ms": 100},
    {"fetch.wait.max.ms": 10},
    {"fetch.min.bytes": 1_000_000},
)
_METRICS = (
    "jobs_commits_total",
    "jobs_commit_seconds_sum",
    "jobs_commit_seconds_count",
    "jobs_batch_seconds_sum",
    "jobs_batch_seconds_count",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _scrape(port: int) -> dict[str, float]:
    """The `_METRICS` sums of the worker's /metrics (over every label)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out = dict.fromkeys(_METRICS, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def _readers(
    bench: _Bench, variants: Sequence[dict[str, Any]]
) -> tuple[list[str], Callable[[Topics], list[_Observer]]]:
    """The names of the readers beside the executor's, and what makes them for a round."""
    names = [
        "aiokafka read_uncommitted",
        "librdkafka read_committed, defaults",
        "librdkafka read_uncommitted, defaults",
        "librdkafka read_committed, defaults, consume(500, 0.1 s)",
    ]
    names.extend(f"librdkafka read_committed, {describe(v)}" for v in variants)

    def make(topics: Topics) -> list[_Observer]:
        n = bench.options.partitions
        uncommitted = {"isolation.level": "read_uncommitted"}
        return [
            _Tail(bench.kafka, topics.status, track=True, isolation_level="read_uncommitted"),
            RdkafkaTail(bench.settings, topics.status, n),
            RdkafkaTail(bench.settings, topics.status, n, uncommitted),
            RdkafkaTail(bench.settings, topics.status, n, batch=500),
            *(RdkafkaTail(bench.settings, topics.status, n, v) for v in variants),
        ]

    return names, make


async def _probe(
    bench: _Bench, variants: Sequence[dict[str, Any]]
) -> tuple[dict[str, list[Percentiles]], dict[str, list[Percentiles]], list[dict[str, float]]]:
    names, make = _readers(bench, variants)
    results: dict[str, list[Percentiles]] = {"aiokafka read_committed": []}
    results.update({name: [] for name in names})
    cadence: list[dict[str, float]] = []
    deltas: dict[str, list[Percentiles]] = {}
    for r in range(bench.options.rounds):
        port = _free_port()
        scraped: list[tuple[float, dict[str, float]]] = []

        async def window(worker: _Worker, port: int = port, into: Any = scraped) -> None:
            into.append((asyncio.get_running_loop().time(), await asyncio.to_thread(_scrape, port)))

        got = await latency_round(bench, make, window, http_port=str(port))
        # Each event's time past the moment librdkafka read_uncommitted (in a thread of its
        # own, so not delayed by the bench's event loop) saw it produced: what waiting for
        # the commit and the reader's own fetching add.
        produced = {i: got.observers[2].started_seen[i] for i in got.sent}
        seen = {"aiokafka read_committed": got.tail.started_seen}
        seen.update({n: o.started_seen for n, o in zip(names, got.observers, strict=True)})
        for name, by_id in seen.items():
            results[name].append(Percentiles.between(got.sent, by_id))
            deltas.setdefault(name, []).append(Percentiles.between(produced, by_id))
        (t0, before), (t1, after) = scraped
        delta = {k: after[k] - before[k] for k in _METRICS}
        cadence.append(
            {
                "commits_per_s": delta["jobs_commits_total"] / (t1 - t0),
                "commit_ms": 1000
                * delta["jobs_commit_seconds_sum"]
                / max(1.0, delta["jobs_commit_seconds_count"]),
                "batch_ms": 1000
                * delta["jobs_batch_seconds_sum"]
                / max(1.0, delta["jobs_batch_seconds_count"]),
                "events_per_commit": len(got.sent) / max(1.0, delta["jobs_commits_total"]),
                "load_average_1min": os.getloadavg()[0],  # others' work on the machine
            }
        )
        bench.say(
            f"round {r + 1}/{bench.options.rounds}: "
            + ", ".join(f"{k} {v:,.1f}" for k, v in cadence[-1].items())
        )
        for name, rounds in results.items():
            bench.say(
                f"  {name}: {rounds[-1].line()} ({rounds[-1].count} seen); past "
                f"read_uncommitted: p50 {deltas[name][-1].p50:.1f}, p99 {deltas[name][-1].p99:.1f}"
            )
    return results, deltas, cadence


def _spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):,.1f} ({min(values):,.1f}-{max(values):,.1f})"


def _table(
    results: dict[str, list[Percentiles]],
    deltas: dict[str, list[Percentiles]],
    cadence: list[dict[str, float]],
) -> Table:
    table = Table(
        "reader of the status topic",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "past librdkafka read_uncommitted: p50 ms",
        "p99 ms",
        title="request → started, median (min-max) over rounds",
    )
    for name, rounds in results.items():
        table.add_row(
            name,
            _spread([p.p50 for p in rounds]),
            _spread([p.p95 for p in rounds]),
            _spread([p.p99 for p in rounds]),
            _spread([p.p50 for p in deltas[name]]),
            _spread([p.p99 for p in deltas[name]]),
        )
    for key in cadence[0]:
        table.add_row(f"worker: {key}", _spread([c[key] for c in cadence]))
    return table


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the arguments, run the probe, print the table."""
    parser = argparse.ArgumentParser(prog="python -m worker.devtools.latencyprobe")
    parser.add_argument("--bootstrap", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup-seconds", type=float, default=3.0)
    parser.add_argument(
        "--variant",
        action="append",
        default=None,
        help="librdkafka properties of one more read_committed reader, as k=v,k=v",
    )
    parser.add_argument("--no-variants", action="store_true", help="Only the four readers.")
    args = parser.parse_args(argv)
    variants: list[dict[str, Any]] = (
        [dict(kv.split("=", 1) for kv in v.split(",")) for v in args.variant]
        if args.variant
        else ([] if args.no_variants else list(DEFAULT_VARIANTS))
    )
    options = BenchOptions(
        bootstrap=args.bootstrap,
        rounds=args.rounds,
        latency_rate=args.rate,
        latency_seconds=args.seconds,
        latency_warmup_seconds=args.warmup_seconds,
    )
    configure_logs("error", "console", library_level="critical")
    console = Console()

    async def body(bench: _Bench, environment: dict[str, str]) -> Table:
        return _table(*await _probe(bench, variants))

    console.print(asyncio.run(with_bench(options, console, body)))


if __name__ == "__main__":
    main()
