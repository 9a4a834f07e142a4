"""Benchmark of the orchestrator worker on a real broker: `jobctl bench`.

Every figure comes from the worker exactly as it runs in production: `python -m worker.cli
run` in a child process, configured only through `JOBS_*` variables and stopped with
SIGTERM (which must exit 0). The bench process plays the producers and a simulated executor
that answers every `started` event with a `COMPLETED` result.

What is measured (throughput and latency as the median of `rounds` rounds, with min and max;
each round on fresh topics under a unique prefix, with a fresh SQLite file):

1. Worker throughput, transitions per second, with `exactly_once` and `at_least_once`,
   rounds interleaved so both see the same machine state. N start requests, each of its own
   job type (so none is refused); the executor answers each `started`. The worker is
   started first and has answered a few warm-up lifecycles (so it has joined, taken its
   partitions and is idle) when the N start requests are sent, as fast as a producer sends
   them: a backlog from its first poll on.
   Transitions are the 2N `started` and `completed` events; the time runs from the first
   of them a read_committed consumer sees to the last. Beside it, the worker's CPU time per
   transition: user plus system time of the worker process (every thread, read from /proc)
   from the end of the warm-up to the last event, over the 2N transitions. (Measured from
   the first event read instead, the work of the worker's first batch fell outside it while
   its transitions counted: with batches of thousands of records, a tenth of a
   20,000-lifecycle round's CPU went uncounted.)
2. Baseline: the same input records (copied byte for byte, same keys and partitions, from
   an exactly-once round) through a raw aiokafka consume-transform-produce loop with the
   worker's transaction sizing: one transactional producer per partition, one transaction per
   partition batch with its offsets (`compat.send_with_offsets`), partitions processed
   concurrently and paused while their transaction is in flight; and with the worker's
   client settings (fetch wait, linger, batch size) and produce path
   (`worker.engine.collector.Outbox`), so that it is the fastest pass-through this client
   gives, not a strawman. Timed the same way, first to last output record seen. The ratio worker ÷
   baseline says what the orchestrator's own work costs on top of the Kafka transactions it
   cannot avoid (one input record yields one transition).
   The contract floor (`worker.devtools.floor`) is the same loop doing the least the
   worker's contract asks of each record, without deciding anything: validate it (pydantic,
   as the worker must to dead-letter bad input), serialize one status event, send three
   records (the event and two changelog records) and write one run row to SQLite behind the
   commit. It runs as a process of its own on the same lifecycles as the worker, measured as
   item 1 measures the worker (transitions/s, CPU µs per transition). Floor ÷ baseline and
   the floor's CPU bound what any worker on this stack could reach on the same machine.
   With `quix`, so is the Quix Streams job lock (`worker.devtools.quixlock`): the least a
   lock written with that stream processor does for the same lifecycles (one run per job
   type in its RocksDB state, exactly-once), in an interpreter of its own (`quixref`).
3. End-to-end latency: from producing a request to its `started` event being visible to a
   read_committed consumer, at a fixed offered rate against a caught-up worker, seen by two
   consumers side by side: aiokafka (the one that plays the executor) and librdkafka
   (confluent-kafka, its default fetch settings, `poll` in a thread of its own). The same
   rounds, interleaved with the worker's, for the contract floor: the latency no worker on
   this stack gets under on the same machine. Beside each round, the process's CPU over
   its measured window (from the warm-up's last `started` seen to the round's last), as
   percent of one core and per transition (each measured start and its run's end): under a
   steady rate a partition commits a transaction for every few records, so this is what a
   worker costs at a steady load, where item 1's backlog spreads each transaction over
   thousands.
4. Restore: a worker with an empty SQLite file rebuilds a 1-partition changelog holding
   `restore_runs` runs; the figure is the `seconds` of its "partition restored from
   changelog" log line. The changelog is written once and restored `rounds` times (a restore
   writes nothing, so each restore reads exactly the same log).
5. Peak RSS (VmHWM) of a worker after `history_runs` lifecycles, run as an executor pool
   would: at most `history_in_flight` requests outstanding (sent, not yet completed). Ended
   runs cost the worker little (their ID and end time until the changelog tombstone); active
   runs are held in memory, so a backlog with every run active at once measures the backlog,
   not the history. Then the peak RSS of a worker restarted on that worker's SQLite file,
   and of one with an empty file, which restores every partition from the changelog, each
   once it has taken every partition.
6. Replay speed: `jobctl replay` of that worker's status topic into fresh SQLite files, as
   `jobctl replay` runs by default (one process per CPU).
7. A worker that has just joined: the same offered rate for `joined_seconds` from the moment
   a worker has taken its partitions ("partitions assigned"), p99 request → `started` seen
   by both consumers; first with an empty SQLite file on new topics (the broker's first
   writes to them in the measure), then another with an empty file on those topics once
   served (a new worker of a running deployment: it restores the changelog), then that
   one restarted on its file. Also the seconds from spawning the process to partitions taken. The
   same for the contract floor, in rounds interleaved with the worker's.
8. Client calls on an idle system, as an application makes them: `JobClient.start_job` (a
   new job type each time, so each one starts a run), `is_job_running` and
   `get_running_job_info`, one after another against a caught-up worker; the median of
   `client_calls` calls of each, per round.
9. `jobctl status` over the history of item 5, as a whole process (start-up included), with
   a worker running on it that writes view marks every `_STATUS_REFRESH_S` and once that
   history is older than the client's window: reading from the last mark, and reading the
   state topic whole (`JOBS_VIEW_REFRESH_S=0`), runs interleaved.
10. How cost grows with the work (`growth_job_types`, one row per size D, each on fresh
    topics): a worker decides a history of D lifecycles, each of a job type of its own, at
    most `history_in_flight` outstanding; then, measured like item 1, `lifecycles` more on
    job types of that history, drawn in a shuffled order and sent in waves of distinct job
    types (each wave once the one before has completed, so no start is refused), so that
    most are idle job types the worker must load. Then, as in items 5, 6 and 9: a worker
    restarted on its SQLite file and one restoring every partition from the changelog
    (spawn → partitions taken, peak RSS), `jobctl status` from the view mark and whole, and
    `jobctl replay` of the status topic, once each. The table gives, per measure, the
    exponent k of cost ∝ size^k between the two largest sizes. The smallest default size,
    10, is the other end: a few busy job types, each decided thousands of times, so its
    windows are full (1,000 request IDs, 256 ended runs) and each wave is a handful of
    records per partition.

The bench sets the worker's configuration itself; other `JOBS_*` variables inherited from the
shell are dropped so that they cannot skew the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import aiokafka
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from rich.console import Console
from rich.table import Table

from worker import compiled
from worker.audit.replay import replay
from worker.client.jobclient import JobClient
from worker.client.view import window_of
from worker.devtools.floor import PassThrough
from worker.devtools.latency import (
    BenchError as BenchError,
    Percentiles,
    RdkafkaTail,
    cpu_seconds,
    percentile,
)
from worker.devtools.localkafka import LocalKafka, _die_with_parent
from worker.devtools.quixref import LOCK as QUIX_LOCK, quix_python
from worker.engine import topics as topic_admin
from worker.kafkaio import connection, partitions_of, read_until
from worker.settings import Settings, Topics

_GUARANTEES = ("exactly_once", "at_least_once")
_NAMES = {"floor": "contract floor", "quix": "Quix Streams job lock"}  # in progress lines
_RESTORED = "partition restored from changelog"


T = TypeVar("T")


@dataclass(frozen=True)
class BenchOptions:
    """What to measure and how much of it. `quick` caps every size for the test suite."""

    bootstrap: str | None = None  # None: start a local broker for the bench
    lifecycles: int = 20_000
    partitions: int = 4
    rounds: int = 3
    batch_max_records: int = Settings.model_fields["batch_max_records"].default  # the worker's
    latency_rate: float = 1000.0
    latency_seconds: float = 10.0
    latency_warmup_seconds: float = 3.0
    joined_seconds: float = 10.0
    restore_runs: int = 10_000
    history_runs: int = 100_000
    history_in_flight: int = 1_000
    client_calls: int = 100
    growth_job_types: tuple[int, ...] = (10, 1_000, 10_000, 100_000, 1_000_000)
    quick: bool = False
    quix: bool = False  # also the Quix Streams job lock's rounds (items 2 and 3)
    transactions: Literal["partition", "worker"] = "worker"  # the workers' JOBS_TRANSACTIONS

    def sized(self) -> BenchOptions:
        """The options actually run: with `quick`, every size capped to a few seconds' work."""
        counts = {
            "lifecycles": self.lifecycles,
            "partitions": self.partitions,
            "rounds": self.rounds,
            "batch_max_records": self.batch_max_records,
            "restore_runs": self.restore_runs,
            "history_runs": self.history_runs,
            "history_in_flight": self.history_in_flight,
            "client_calls": self.client_calls,
        }
        bad = [f"{k}={v}" for k, v in counts.items() if v < 1]
        bad.extend(f"growth_job_types={n}" for n in self.growth_job_types if n < 1)
        if (
            self.latency_rate <= 0
            or self.latency_seconds <= 0
            or self.latency_warmup_seconds < 0
            or self.joined_seconds <= 0
        ):
            bad.append(
                f"latency_rate={self.latency_rate}, latency_seconds={self.latency_seconds}, "
                f"latency_warmup_seconds={self.latency_warmup_seconds}, "
                f"joined_seconds={self.joined_seconds}"
            )
        if bad:
            raise ValueError(f"bench sizes must be positive: {', '.join(bad)}")
        if not self.quick:
            return self
        return replace(
            self,
            lifecycles=min(self.lifecycles, 300),
            rounds=min(self.rounds, 1),
            latency_seconds=min(self.latency_seconds, 2.0),
            latency_warmup_seconds=min(self.latency_warmup_seconds, 0.5),
            joined_seconds=min(self.joined_seconds, 2.0),
            restore_runs=min(self.restore_runs, 300),
            history_runs=min(self.history_runs, 300),
            history_in_flight=min(self.history_in_flight, 100),
            client_calls=min(self.client_calls, 20),
            growth_job_types=(100, 300) if self.growth_job_types else (),
        )


@dataclass(frozen=True)
class Figure:
    """A figure measured over rounds: the median, the extremes and every sample."""

    median: float
    low: float
    high: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Figure:
        """Summarize `samples` (at least one)."""
        if not samples:
            raise BenchError("no samples")
        return cls(statistics.median(samples), min(samples), max(samples), tuple(samples))

    def to_json(self) -> dict[str, Any]:
        """`median`, `min`, `max`, `samples`."""
        return {
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "samples": list(self.samples),
        }


@dataclass(frozen=True)
class GrowthRow:
    """What a worker costs once it has decided a history of `job_types` lifecycles, each of
    a job type of its own (module docstring, item 10)."""

    job_types: int
    transitions_per_s: float  # the measured waves, on job types of the history
    cpu_us_per_transition: float
    making_peak_rss_mb: float  # the worker that made the history and ran the waves
    retained_runs: int  # ended runs the changelog holds (the restores' `runs`, summed)
    restore_s: float  # spawn → every partition taken, with an empty SQLite file
    restore_peak_rss_mb: float
    restart_s: float  # spawn → every partition taken, on its own SQLite file
    restart_peak_rss_mb: float
    status_marked_s: float  # `jobctl status`, from the last view mark
    status_whole_s: float  # the same, reading the state topic whole
    replay_records_per_s: float


# The growth table's measures: (attribute, label, unit, format, rate): a rate's cost is its
# inverse, so its exponent is negated.
_GROWTH_MEASURES = (
    ("transitions_per_s", "worker exactly_once", "transitions/s", ",.0f", True),
    ("cpu_us_per_transition", "worker CPU", "µs/transition", ",.0f", False),
    ("making_peak_rss_mb", "peak RSS, making the history", "MB", ",.1f", False),
    ("retained_runs", "ended runs retained", "runs", ",.0f", False),
    ("restore_s", "restore: spawn → partitions taken", "s", ",.2f", False),
    ("restore_peak_rss_mb", "peak RSS, restoring", "MB", ",.1f", False),
    ("restart_s", "restart on its file: spawn → taken", "s", ",.2f", False),
    ("restart_peak_rss_mb", "peak RSS, restarted", "MB", ",.1f", False),
    ("status_marked_s", "jobctl status, from the view mark", "s", ",.2f", False),
    ("status_whole_s", "jobctl status, state topic whole", "s", ",.2f", False),
    ("replay_records_per_s", "jobctl replay", "records/s", ",.0f", True),
)


def growth_exponent(rows: Sequence[GrowthRow], attribute: str, rate: bool = False) -> float:
    """k in cost ∝ job_types^k between the two largest sizes, where fixed costs (process
    start-up, the measured lifecycles every size adds) weigh least: about 0 is flat, 1
    linear, and a logarithmic growth a small k that shrinks as the sizes grow. A rate's
    cost is its inverse."""
    first, last = rows[-2], rows[-1]
    ratio = float(getattr(last, attribute)) / float(getattr(first, attribute))
    k = math.log(ratio) / math.log(last.job_types / first.job_types)
    return -k if rate else k


def growth_table(rows: Sequence[GrowthRow]) -> Table:
    """The growth rows as a rich table: a column per size, and the exponent."""
    table = Table(
        "measure",
        *(f"{row.job_types:,} job types" for row in rows),
        "k",
        "unit",
        title="how cost grows with the work (cost ∝ job types^k, k between the two largest)",
    )
    for attribute, label, unit, fmt, rate in _GROWTH_MEASURES:
        k = growth_exponent(rows, attribute, rate) if len(rows) > 1 else math.nan
        table.add_row(
            label,
            *(format(getattr(row, attribute), fmt) for row in rows),
            f"{k:.2f}",
            unit,
        )
    return table


@dataclass
class BenchReport:
    """Every figure of a bench run, with the sizes it was measured at."""

    lifecycles: int
    partitions: int
    rounds: int
    batch_max_records: int
    eos_transitions_per_s: Figure
    alo_transitions_per_s: Figure
    # The worker process's CPU time (user + system, every thread) ÷ transitions, in µs.
    eos_cpu_us_per_transition: Figure
    alo_cpu_us_per_transition: Figure
    baseline_records_per_s: Figure
    eos_over_baseline: float  # worker EOS transitions/s ÷ baseline records/s (medians)
    floor_records_per_s: Figure  # the contract floor (module docstring, item 2), transitions/s
    floor_cpu_us_per_transition: Figure  # its process's CPU time ÷ transitions, in µs
    floor_over_baseline: float  # what any worker on this stack could reach at best
    latency_offered_rate: float
    latency_achieved_rate: Figure  # requests/s the paced producer actually sent
    latency_requests: int  # per round
    latency_p50_ms: Figure  # aiokafka, read_committed
    latency_p95_ms: Figure
    latency_p99_ms: Figure
    librdkafka_p50_ms: Figure  # confluent-kafka, read_committed, its default fetch settings
    librdkafka_p95_ms: Figure
    librdkafka_p99_ms: Figure
    # The same, for the contract floor in rounds interleaved with the worker's.
    floor_latency_p50_ms: Figure
    floor_latency_p95_ms: Figure
    floor_latency_p99_ms: Figure
    floor_librdkafka_p50_ms: Figure
    floor_librdkafka_p95_ms: Figure
    floor_librdkafka_p99_ms: Figure
    # The process's CPU over a latency round's measured window: percent of one core, and
    # per transition (each measured start, and its run's end: twice the requests), in µs.
    latency_cpu_pct: Figure
    latency_cpu_us_per_transition: Figure
    floor_latency_cpu_pct: Figure
    floor_latency_cpu_us_per_transition: Figure
    latency_aiokafka_seen: int  # of `latency_requests`, in the round that saw fewest
    latency_librdkafka_seen: int
    joined_seconds: float  # measured after a worker has taken its partitions
    joined_new_start_s: Figure  # spawn → partitions taken, empty SQLite file, new topics
    joined_new_p99_ms: Figure  # aiokafka
    joined_new_librdkafka_p99_ms: Figure
    joined_fresh_start_s: Figure  # the same, on those topics once served
    joined_fresh_p99_ms: Figure  # aiokafka
    joined_fresh_librdkafka_p99_ms: Figure
    joined_restarted_start_s: Figure  # the same, restarted on its SQLite file
    joined_restarted_p99_ms: Figure
    joined_restarted_librdkafka_p99_ms: Figure
    # The same, for the contract floor in rounds interleaved with the worker's.
    floor_joined_new_start_s: Figure
    floor_joined_new_p99_ms: Figure
    floor_joined_new_librdkafka_p99_ms: Figure
    floor_joined_fresh_start_s: Figure
    floor_joined_fresh_p99_ms: Figure
    floor_joined_fresh_librdkafka_p99_ms: Figure
    floor_joined_restarted_start_s: Figure
    floor_joined_restarted_p99_ms: Figure
    floor_joined_restarted_librdkafka_p99_ms: Figure
    restore_runs_requested: int
    restored_runs: int  # `runs` of the worker's restore log line
    restored_records: int  # changelog records read by the restore
    restore_seconds: Figure  # `seconds` of the worker's restore log line
    history_runs: int
    history_in_flight: int  # requests outstanding at most while the history was made
    peak_rss_mb: float
    restart_peak_rss_mb: float  # a worker restarted on that history, its partitions taken
    restore_peak_rss_mb: float  # a worker with an empty SQLite file, having restored them
    replay_records_per_s: Figure  # status events `jobctl replay` applies per second
    replay_processes: int  # processes `jobctl replay` used (one per CPU)
    client_start_ms: Figure  # p50 of `start_job` per round (module docstring, item 8)
    client_is_running_ms: Figure  # p50 of `is_job_running`
    client_running_info_ms: Figure  # p50 of `get_running_job_info`
    status_marked_s: Figure  # `jobctl status` over the history, from the last view mark
    status_whole_s: Figure  # the same, reading the state topic whole
    growth: tuple[GrowthRow, ...] = ()  # module docstring, item 10
    environment: dict[str, str] = field(default_factory=dict)
    # The Quix Streams job lock (module docstring, item 2), with `BenchOptions.quix`.
    quix_transitions_per_s: Figure | None = None
    quix_cpu_us_per_transition: Figure | None = None
    quix_latency_p50_ms: Figure | None = None
    quix_latency_p95_ms: Figure | None = None
    quix_latency_p99_ms: Figure | None = None
    quix_librdkafka_p50_ms: Figure | None = None
    quix_librdkafka_p95_ms: Figure | None = None
    quix_librdkafka_p99_ms: Figure | None = None
    quix_latency_cpu_pct: Figure | None = None
    quix_latency_cpu_us_per_transition: Figure | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; figures as `{"median", "min", "max", "samples"}`."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = value.to_json() if isinstance(value, Figure) else value
        out.update(growth_json(self.growth))
        return out

    def table(self) -> Table:
        """The figures as a rich table."""
        table = Table(
            "measure",
            "median",
            "min",
            "max",
            "unit",
            title=f"worker bench: {self.lifecycles:,} lifecycles, {self.partitions} partitions, "
            f"{self.rounds} round(s), batches of {self.batch_max_records}",
            caption="baseline: a raw aiokafka transactional pass-through of the same inputs; "
            f"latency at {self.latency_offered_rate:,.0f} requests/s offered",
        )

        def row(name: str, figure: Figure, unit: str, fmt: str = ",.0f") -> None:
            table.add_row(
                name,
                format(figure.median, fmt),
                format(figure.low, fmt),
                format(figure.high, fmt),
                unit,
            )

        def single(name: str, value: str, unit: str) -> None:
            table.add_row(name, value, "", "", unit)

        row("worker exactly_once", self.eos_transitions_per_s, "transitions/s")
        row("worker at_least_once", self.alo_transitions_per_s, "transitions/s")
        row("worker CPU, exactly_once", self.eos_cpu_us_per_transition, "µs/transition")
        row("worker CPU, at_least_once", self.alo_cpu_us_per_transition, "µs/transition")
        row("baseline", self.baseline_records_per_s, "records/s")
        single("exactly_once ÷ baseline", f"{self.eos_over_baseline:.2f}", "ratio")
        row("contract floor", self.floor_records_per_s, "transitions/s")
        row("contract floor CPU", self.floor_cpu_us_per_transition, "µs/transition")
        single("contract floor ÷ baseline", f"{self.floor_over_baseline:.2f}", "ratio")
        if self.quix_transitions_per_s is not None and self.quix_cpu_us_per_transition is not None:
            row("Quix Streams job lock", self.quix_transitions_per_s, "transitions/s")
            row("Quix Streams job lock CPU", self.quix_cpu_us_per_transition, "µs/transition")
        for who, infix in (
            ("", ""),
            ("contract floor ", "floor_"),
            ("Quix Streams job lock ", "quix_"),
        ):
            for client, prefix in (("aiokafka", "latency"), ("librdkafka", "librdkafka")):
                for q in ("p50", "p95", "p99"):
                    if (figure := getattr(self, f"{infix}{prefix}_{q}_ms")) is not None:
                        row(f"{who}latency {q}, {client}", figure, "ms", ",.1f")
            if (share := getattr(self, f"{infix}latency_cpu_pct")) is not None:
                row(f"{who or 'worker '}CPU in the latency rounds", share, "% of a core")
                per = getattr(self, f"{infix}latency_cpu_us_per_transition")
                row(f"{who or 'worker '}CPU in the latency rounds", per, "µs/transition")
        row("latency: rate sent", self.latency_achieved_rate, "requests/s")
        self._joined_rows(row)
        row(f"restore {self.restored_runs:,} runs", self.restore_seconds, "s", ",.3f")
        single(
            f"peak RSS, {self.history_runs:,} runs (≤ {self.history_in_flight:,} in flight)",
            f"{self.peak_rss_mb:,.1f}",
            "MB",
        )
        single("peak RSS, restarted on them", f"{self.restart_peak_rss_mb:,.1f}", "MB")
        single("peak RSS, restoring them", f"{self.restore_peak_rss_mb:,.1f}", "MB")
        row(
            f"replay, {2 * self.history_runs:,} events, {self.replay_processes} processes",
            self.replay_records_per_s,
            "records/s",
        )
        row("client start_job p50", self.client_start_ms, "ms", ",.1f")
        row("client is_job_running p50", self.client_is_running_ms, "ms", ",.1f")
        row("client get_running_job_info p50", self.client_running_info_ms, "ms", ",.1f")
        for label, figure in (
            ("from its view mark", self.status_marked_s),
            ("whole", self.status_whole_s),
        ):
            row(
                f"jobctl status, {self.history_runs:,} ended runs, {label}",
                figure,
                "s",
                ",.2f",
            )
        return table

    def _joined_rows(self, row: Callable[[str, Figure, str, str], None]) -> None:
        """The just-joined figures of the worker and of the contract floor."""
        for who, prefix in (("worker", "joined"), ("contract floor", "floor_joined")):
            for label, shown in _JOINED:
                name = f"{who}, {shown}"
                row(
                    f"{name}: spawn → partitions taken",
                    getattr(self, f"{prefix}_{label}_start_s"),
                    "s",
                    ",.2f",
                )
                for client, infix in (("aiokafka", ""), ("librdkafka", "librdkafka_")):
                    figure = getattr(self, f"{prefix}_{label}_{infix}p99_ms")
                    row(
                        f"{name}: p99, first {self.joined_seconds:g} s, {client}",
                        figure,
                        "ms",
                        ",.1f",
                    )


# -- helpers ---------------------------------------------------------------------------------


_percentile = percentile  # the soak's name for it


def start_body(job_type: str, request_id: str) -> bytes:
    """A start request's value as the bench's producers send it (`hotpath`'s too)."""
    return json.dumps(
        {"job_type": job_type, "request_id": request_id, "initial_data": {"bench": True}},
        separators=(",", ":"),
    ).encode()


def result_body(job_type: str, run_id: str, n: int) -> bytes:
    """A `COMPLETED` result's value as the bench's simulated executor sends it (`hotpath`'s
    too), its metrics counting the `started` events seen."""
    body = {
        "job_type": job_type,
        "run_id": run_id,
        "status": "COMPLETED",
        "final_metrics": {"n": n},
    }
    return json.dumps(body, separators=(",", ":")).encode()


async def _send_starts(
    producer: AIOKafkaProducer, topics: Topics, items: Sequence[tuple[str, str]]
) -> None:
    """Send (job type, request ID) start requests keyed by job type; wait for every ack."""
    futures = [
        await producer.send(
            topics.requests, start_body(job_type, request_id), key=job_type.encode()
        )
        for job_type, request_id in items
    ]
    await asyncio.gather(*futures)


@contextlib.asynccontextmanager
async def _producer(kafka: dict[str, Any], **config: Any) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(acks="all", **kafka, **config)
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def _stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """Stop a group-less consumer, absorbing aiokafka's spurious CancelledError.

    aiokafka can raise CancelledError when such a consumer stops soon after it started; only
    a cancellation really requested of this task is passed on.
    """
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


def _timeout_for(records: int) -> float:
    # Generous: a stuck bench should fail with a clear message, not hang for ever, but a slow
    # machine must not fail a healthy run (100 records/s is far below anything seen).
    return 120.0 + records / 100


class _Worker:
    """`python -m worker.cli run` in a child process, its stderr parsed as JSON log lines;
    or another module given as `command` (the contract floor's)."""

    def __init__(
        self,
        env: dict[str, str],
        directory: Path,
        name: str,
        command: Sequence[str] = ("-m", "worker.cli", "run"),
    ) -> None:
        self.env = env
        self.executable = sys.executable
        self.command = tuple(command)
        self.directory = directory
        self.name = name
        self.proc: asyncio.subprocess.Process | None = None
        self.events: list[dict[str, Any]] = []
        self.tail: deque[str] = deque(maxlen=40)
        self._changed = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None
        self.spawned_at = 0.0

    async def start(self) -> None:
        """Spawn the worker; its log lines are collected as they come."""
        self.spawned_at = time.perf_counter()
        self.proc = await asyncio.create_subprocess_exec(
            self.executable,
            *self.command,
            env=self.env,
            cwd=self.directory,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            limit=4 * 1024 * 1024,
            # A bench killed outright must not leave workers behind: they get SIGTERM.
            preexec_fn=_die_with_parent,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        # The pipe must be drained continuously, or a chatty worker blocks on its stderr.
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            with contextlib.suppress(ValueError):
                parsed = json.loads(line)
                if isinstance(parsed, dict):
                    self.events.append(parsed)
            async with self._changed:
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        """The worker's process ID."""
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        """Raise `BenchError` with the worker's last log lines if it has exited."""
        if self.proc is not None and self.proc.returncode is not None:
            raise BenchError(
                f"worker {self.name} exited with code {self.proc.returncode}:\n"
                + "\n".join(self.tail)
            )

    async def wait_log(self, message: str, timeout: float) -> dict[str, Any]:
        """The first JSON log line whose `event` is `message`."""

        def found() -> dict[str, Any] | None:
            return next((e for e in self.events if e.get("event") == message), None)

        try:
            async with asyncio.timeout(timeout), self._changed:
                while (line := found()) is None:
                    if self._reader is None or self._reader.done():
                        self.check_alive()
                        raise BenchError(f"worker {self.name} closed its log without {message!r}")
                    await self._changed.wait()
                return line
        except TimeoutError:
            raise BenchError(
                f"worker {self.name} did not log {message!r} within {timeout:.0f} s:\n"
                + "\n".join(self.tail)
            ) from None

    def peak_rss_mb(self) -> float:
        """VmHWM, the peak resident set size, from /proc (Linux)."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError as exc:
            raise BenchError(f"cannot read the worker's memory figures: {exc}") from exc
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MB
        raise BenchError("no VmHWM in /proc/<pid>/status")

    async def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM, as a supervisor stops it; the worker must exit 0."""
        assert self.proc is not None
        self.check_alive()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise BenchError(f"worker {self.name} did not exit within {timeout:.0f} s") from None
        if self._reader is not None:
            await self._reader
        if code != 0:
            raise BenchError(
                f"worker {self.name} exited with code {code} on SIGTERM:\n" + "\n".join(self.tail)
            )

    async def close(self) -> None:
        """Kill the process if it still runs (clean-up after a failure); reap it."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


class _Tail:
    """A read_committed reader of one output topic: counts, first/last seen, and optionally
    the simulated executor (a `COMPLETED` result for every `started` event).
    """

    def __init__(
        self,
        kafka: dict[str, Any],
        topic: str,
        *,
        decode: bool = True,
        executor: tuple[AIOKafkaProducer, str] | None = None,
        track: bool = False,
        isolation_level: str = "read_committed",
        probe: Callable[[], float] | None = None,
    ) -> None:
        self.kafka = kafka
        self.topic = topic
        self.decode = decode
        self.executor = executor
        self.track = track
        self.isolation_level = isolation_level
        # Sampled after every batch with records: (probe(), records seen), first and last.
        self.probe = probe
        self.first_probe: tuple[float, int] | None = None
        self.last_probe: tuple[float, int] | None = None
        self.count = 0
        self.types: Counter[str] = Counter()
        self.first_seen: float | None = None
        self.last_seen: float | None = None
        self.started_seen: dict[str, float] = {}  # request ID -> when its `started` was seen
        self._changed = asyncio.Condition()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._delivery_errors: list[BaseException] = []

    async def start(self) -> None:
        """Subscribe from the beginning of the (fresh) topic and read in the background."""
        self._consumer = AIOKafkaConsumer(
            self.topic,
            isolation_level=self.isolation_level,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            **self.kafka,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._read())

    def _delivered(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self._delivery_errors.append(future.exception())  # type: ignore[arg-type]

    async def _read(self) -> None:
        assert self._consumer is not None
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            # One timestamp per fetched batch: records arrive together, and this is when the
            # bench could first act on them.
            now = time.perf_counter()
            for records in batch.values():
                for record in records:
                    self.count += 1
                    if self.decode:
                        await self._handle(json.loads(record.value), now)
                    if self.first_seen is None:
                        self.first_seen = now
                    self.last_seen = now
            if batch and self.probe is not None:
                self.last_probe = (self.probe(), self.count)
                self.first_probe = self.first_probe or self.last_probe
            async with self._changed:
                self._changed.notify_all()

    async def _handle(self, event: dict[str, Any], now: float) -> None:
        kind = event["type"]
        self.types[kind] += 1
        if kind != "started":
            return
        if self.track and event.get("request_id") is not None:
            self.started_seen.setdefault(event["request_id"], now)
        if self.executor is not None:
            producer, results = self.executor
            job_type = event["job_type"]
            body = result_body(job_type, event["run_id"], self.types["started"])
            # Not awaited here: waiting for each ack would serialize the executor on the
            # broker's round trip; failures are collected and raised by `until`.
            future = await producer.send(results, body, key=job_type.encode())
            future.add_done_callback(self._delivered)

    def _check(self, worker: _Worker | None) -> None:
        if self._delivery_errors:
            raise BenchError(f"executor could not send a result: {self._delivery_errors[0]!r}")
        if self._task is not None and self._task.done():
            error = self._task.exception()
            raise BenchError(f"reading {self.topic} failed: {error!r}")
        if worker is not None:
            worker.check_alive()

    async def until(
        self,
        predicate: Callable[[], bool],
        what: str,
        timeout: float,
        worker: _Worker | None = None,
    ) -> None:
        """Wait until `predicate()` holds (checked after every fetch), the worker alive."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                while not predicate():
                    self._check(worker)
                    await self._changed.wait()
        except TimeoutError:
            raise BenchError(
                f"timed out after {timeout:.0f} s waiting for {what}; {self.topic} had "
                f"{self.count} records ({dict(self.types)})"
            ) from None
        self._check(worker)

    def measure_from_here(self, now: bool = False) -> None:
        """Time and probe from the next batch on, leaving out what was read so far; with
        `now`, probe from this moment (a sample now), time from the next batch."""
        self.first_probe = None
        self.first_seen = None
        if now and self.probe is not None:
            self.first_probe = (self.probe(), self.count)

    def probed(self) -> tuple[float, int]:
        """How much the probe grew and how many records were seen between its first sample
        (after the first batch) and its last."""
        if self.first_probe is None or self.last_probe is None:
            raise BenchError(f"no probe samples on {self.topic}")
        (first, seen_first), (last, seen_last) = self.first_probe, self.last_probe
        if seen_last <= seen_first:
            raise BenchError(f"too few batches on {self.topic} to measure anything")
        return last - first, seen_last - seen_first

    @property
    def elapsed(self) -> float:
        """Seconds from the first record seen to the last."""
        if self.first_seen is None or self.last_seen is None or self.last_seen <= self.first_seen:
            raise BenchError(f"too few records on {self.topic} to time anything")
        return self.last_seen - self.first_seen

    async def stop(self) -> None:
        """Stop reading."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await _stop_consumer(self._consumer)


@dataclass
class _Recorded:
    """Input records of one round: topic role -> partition -> [(key, value)]."""

    records: dict[str, dict[int, list[tuple[bytes | None, bytes | None]]]]

    @property
    def count(self) -> int:
        """How many records in all."""
        return sum(len(rs) for parts in self.records.values() for rs in parts.values())


def _connection_env(settings: Settings) -> dict[str, str]:
    """The `JOBS_*` variables that connect a worker process as `settings` do."""
    env = {
        "JOBS_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "JOBS_SECURITY_PROTOCOL": settings.security_protocol,
        "JOBS_SASL_MECHANISM": settings.sasl_mechanism,
    }
    optional = {
        "JOBS_SASL_USERNAME": settings.sasl_username,
        "JOBS_SASL_PASSWORD": settings.password(),
        "JOBS_SSL_CAFILE": settings.ssl_cafile,
        "JOBS_SSL_CERTFILE": settings.ssl_certfile,
        "JOBS_SSL_KEYFILE": settings.ssl_keyfile,
        "JOBS_SSL_KEY_PASSWORD": (
            None
            if settings.ssl_key_password is None
            else settings.ssl_key_password.get_secret_value()
        ),
    }
    env.update({name: str(value) for name, value in optional.items() if value is not None})
    return env


class _Bench:
    """Shared state of one bench run: broker clients, temp directory, created topics."""

    def __init__(self, options: BenchOptions, console: Console, settings: Settings, tmp: Path):
        self.options = options
        self.console = console
        self.settings = settings  # the cluster and how to connect to it (JOBS_SECURITY_*...)
        self.kafka = connection(settings)
        self.tmp = tmp
        self.created: list[str] = []
        self.admin = AIOKafkaAdminClient(**self.kafka)
        # One long-lived group-less reader for metadata and for reading topics back.
        self.reader = AIOKafkaConsumer(
            isolation_level="read_committed", enable_auto_commit=False, **self.kafka
        )
        self._workers = 0
        self.quix_python: Path | None = None  # with `options.quix`: made by `with_bench`

    async def start(self) -> None:
        """Connect the admin client and the reader."""
        await self.admin.start()
        await self.reader.start()

    async def close(self, delete_topics: bool) -> None:
        """Disconnect; on a shared cluster, delete the topics this run created."""
        await _stop_consumer(self.reader)
        if delete_topics and self.created:
            # Leave a shared cluster as we found it (a local broker is discarded whole).
            with contextlib.suppress(Exception):
                await self.admin.delete_topics(self.created)
        await self.admin.close()

    async def topics(self, label: str, partitions: int) -> Topics:
        """Fresh topics under a prefix no other round uses."""
        prefix = f"bench-{uuid.uuid4().hex[:8]}-{label}"
        topics = Topics.for_prefix(prefix)
        self.created.extend(topics.all())
        await topic_admin.create(self.admin, topics, partitions)
        return topics

    def worker(
        self,
        topics: Topics,
        guarantee: str,
        log_level: str = "warning",
        db: str | None = None,
        **settings: str,
    ) -> _Worker:
        """A worker on `topics` with an empty SQLite file of its own, or with `db`; other
        `settings` as `JOBS_<NAME>` variables."""
        self._workers += 1
        name = f"{topics.requests.removesuffix('.requests')}-{self._workers}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBS_")}
        env.update(_connection_env(self.settings))
        env.update(
            JOBS_TOPIC_PREFIX=topics.requests.removesuffix(".requests"),
            JOBS_DB_PATH=db or str(self.tmp / f"{name}.db"),
            JOBS_PROCESSING_GUARANTEE=guarantee,
            JOBS_TRANSACTIONS=self.options.transactions,
            JOBS_BATCH_MAX_RECORDS=str(self.options.batch_max_records),
            JOBS_LOG_LEVEL=log_level,
            JOBS_LOG_FORMAT="json",
            JOBS_HTTP_PORT="0",  # several workers may run at once
            PYTHONUNBUFFERED="1",
        )
        env.update({f"JOBS_{k.upper()}": v for k, v in settings.items()})
        return _Worker(env, self.tmp, name)

    def floor(self, topics: Topics, db: str | None = None) -> _Worker:
        """The contract floor (`worker.devtools.floor`) as a process, configured and
        stopped as a worker is, on `topics` with an empty SQLite file of its own or `db`."""
        floor = self.worker(topics, "exactly_once", db=db)
        floor.command = ("-m", "worker.devtools.floor", str(self.options.partitions))
        return floor

    def quix(self, topics: Topics) -> _Worker:
        """The Quix Streams job lock (`worker.devtools.quixlock`) as a process on `topics`,
        in the interpreter `with_bench` made ready for it, stopped as a worker is."""
        if self.quix_python is None:
            raise BenchError("the Quix Streams job lock needs BenchOptions.quix")
        lock = self.worker(topics, "exactly_once")
        lock.executable = str(self.quix_python)
        lock.command = (str(QUIX_LOCK),)
        return lock

    def contender(
        self, topics: Topics, who: str, guarantee: str = "exactly_once", **settings: str
    ) -> _Worker:
        """What a round measures on `topics`: a worker with `guarantee` and `settings`, or
        `who` "floor" (the contract floor) or "quix" (the Quix Streams job lock)."""
        if who == "floor":
            return self.floor(topics)
        if who == "quix":
            return self.quix(topics)
        return self.worker(topics, guarantee, **settings)

    async def read_all(self, topic: str) -> dict[int, list[tuple[bytes | None, bytes | None]]]:
        """Every committed record of `topic`, per partition, in offset order."""
        tps = await partitions_of(self.reader, topic)
        self.reader.assign(tps)
        await self.reader.seek_to_beginning(*tps)
        ends = await self.reader.end_offsets(tps)
        out: dict[int, list[tuple[bytes | None, bytes | None]]] = {}
        for tp in tps:
            rows = out.setdefault(tp.partition, [])
            async for _, records in read_until(self.reader, {tp: ends[tp]}, max_records=10_000):
                rows.extend((r.key, r.value) for r in records)
        self.reader.assign([])
        return out

    def say(self, message: str) -> None:
        """A progress line."""
        self.console.print(message, highlight=False)


async def _run_lifecycles(
    bench: _Bench,
    topics: Topics,
    worker: _Worker,
    count: int,
    on_done: Callable[[], None] | None = None,
    in_flight: int | None = None,
    cpu: bool = False,
) -> _Tail:
    """Run `count` lifecycles through the worker and the executor until every run completed,
    call `on_done` while the worker still runs, then stop the worker (exit 0).

    Without `in_flight`, every start request is put in a backlog before the worker starts
    (with `cpu`, once it has warmed up: below); with it, start requests are sent as runs
    complete, at most `in_flight` outstanding. With `cpu`, the worker first answers
    `_warm_up` lifecycles; the tail then samples its CPU time (`measure_from_here`), again
    after each batch of events it reads, and the start requests are sent: the CPU measured
    covers all the work of the `count` lifecycles.
    """
    prefix = topics.requests.removesuffix(".requests")
    starts = [(f"bench-{i}", f"{prefix}-{i}") for i in range(count)]
    warm = _warm_count(bench.options) if cpu else 0
    async with _producer(bench.kafka, linger_ms=5) as producer:
        if in_flight is None and not cpu:
            await _send_starts(producer, topics, starts)  # waiting before the worker starts
        probe = (lambda: cpu_seconds(worker.pid)) if cpu else None
        tail = _Tail(bench.kafka, topics.status, executor=(producer, topics.results), probe=probe)
        await tail.start()
        try:
            await worker.start()
            if cpu:
                await _warm_up(tail, producer, topics, worker, prefix, warm)
                tail.measure_from_here(now=True)
            if in_flight is not None:
                await _keep_in_flight(tail, producer, topics, worker, starts, in_flight)
            elif cpu:
                await _send_starts(producer, topics, starts)
            await tail.until(
                lambda: tail.types["completed"] >= warm + count,
                f"{count} completed runs",
                _timeout_for(2 * count),
                worker,
            )
            if on_done is not None:
                on_done()
            await worker.stop()
        finally:
            await worker.close()
            await tail.stop()
    _expect_lifecycles(tail, warm + count)
    return tail


def _warm_count(options: BenchOptions) -> int:
    """Warm-up lifecycles: a few on every partition."""
    return 4 * options.partitions


async def _warm_up(
    tail: _Tail,
    producer: AIOKafkaProducer,
    topics: Topics,
    worker: _Worker,
    prefix: str,
    count: int,
) -> None:
    """`count` lifecycles answered and completed, so the worker owns its partitions, its
    producers are connected and it is idle."""
    warm = [(f"bench-warm-{i}", f"{prefix}-warm-{i}") for i in range(count)]
    done = tail.types["completed"]
    await _send_starts(producer, topics, warm)
    await tail.until(
        lambda: tail.types["completed"] >= done + count, "warm-up", _timeout_for(0), worker
    )


def _expect_lifecycles(tail: _Tail, count: int) -> None:
    """Raise unless `tail` saw `count` runs started and completed, and nothing else."""
    expected = Counter({"started": count, "completed": count})
    if tail.types != expected:
        raise BenchError(f"unexpected events: {dict(tail.types)}; expected {dict(expected)}")


def _completed(tail: _Tail, count: int) -> Callable[[], bool]:
    """Whether `tail` has seen `count` completed runs."""
    return lambda: tail.types["completed"] >= count


async def _keep_in_flight(
    tail: _Tail,
    producer: AIOKafkaProducer,
    topics: Topics,
    worker: _Worker,
    starts: Sequence[tuple[str, str]],
    in_flight: int,
) -> None:
    """Send `starts` as runs complete, at most `in_flight` outstanding, as an executor pool
    would; return once the last is sent."""
    base = tail.types["completed"]
    sent = 0
    while sent < len(starts):
        completed = tail.types["completed"] - base
        more = min(len(starts), completed + in_flight) - sent
        await _send_starts(producer, topics, starts[sent : sent + more])
        sent += more
        if sent < len(starts):
            await tail.until(
                _completed(tail, base + completed + 1),
                "a run to complete",
                _timeout_for(in_flight),
                worker,
            )


async def _in_waves(
    tail: _Tail,
    producer: AIOKafkaProducer,
    topics: Topics,
    worker: _Worker,
    starts: Sequence[tuple[str, str]],
    wave: int,
) -> None:
    """Send `starts` `wave` at a time, each wave once every run of the one before has
    completed: a job type of distinct job types within a wave is never started while its
    run of the wave before still runs."""
    base = tail.types["completed"]
    for at in range(0, len(starts), wave):
        chunk = starts[at : at + wave]
        await _send_starts(producer, topics, chunk)
        await tail.until(
            _completed(tail, base + at + len(chunk)),
            f"wave {at // wave + 1} to complete",
            _timeout_for(2 * len(chunk)),
            worker,
        )


# -- the measurements ------------------------------------------------------------------------


async def _throughput_round(
    bench: _Bench, guarantee: str, record: bool
) -> tuple[float, float, _Recorded | None]:
    """Transitions/s and the worker's CPU µs per transition of one round; the round's input
    records when `record`. `guarantee` "floor" runs the contract floor instead of a worker,
    "quix" the Quix Streams job lock.

    The CPU time is the worker process's (user + system, all its threads) between the end of
    the first batch of events the tail reads and the end of the last, over the transitions
    read in between: start-up and shutdown are left out, idle ticks and GC under load are in.
    """
    o = bench.options
    label = {"exactly_once": "eos", "at_least_once": "alo"}.get(guarantee, guarantee)
    topics = await bench.topics(label, o.partitions)
    worker = bench.contender(topics, guarantee, guarantee)
    tail = await _run_lifecycles(bench, topics, worker, o.lifecycles, cpu=True)
    rate = (2 * o.lifecycles) / tail.elapsed
    cpu, transitions = tail.probed()
    cpu_us = cpu / transitions * 1e6
    recorded = None
    if record:
        recorded = _Recorded(
            {
                "requests": await bench.read_all(topics.requests),
                "results": await bench.read_all(topics.results),
            }
        )
        expected = 2 * (_warm_count(o) + o.lifecycles)
        if recorded.count != expected:
            raise BenchError(f"recorded {recorded.count} inputs, expected {expected}")
    return rate, cpu_us, recorded


async def _baseline_round(bench: _Bench, recorded: _Recorded) -> float:
    """Records/s of a raw transactional pass-through of `recorded`, sized like the worker."""
    topics = await bench.topics("base", bench.options.partitions)
    inputs = {"requests": topics.requests, "results": topics.results}
    async with _producer(bench.kafka, linger_ms=5) as copier:
        futures = [
            await copier.send(inputs[role], value, key=key, partition=partition)
            for role, parts in recorded.records.items()
            for partition, rows in parts.items()
            for key, value in rows
        ]
        await asyncio.gather(*futures)
    group = f"{topics.requests.removesuffix('.requests')}.baseline"
    o = bench.options
    baseline = PassThrough(bench.kafka, topics, group, o.partitions, o.batch_max_records, None)
    observer = _Tail(bench.kafka, topics.status, decode=False)
    total = recorded.count
    first_step: float | None = None  # when the first step that committed anything began
    await baseline.start()
    try:
        await observer.start()
        async with asyncio.timeout(_timeout_for(total)):
            while baseline.committed < total:
                began = time.perf_counter()
                await baseline.step()
                if first_step is None and baseline.committed:
                    first_step = began
        await observer.until(lambda: observer.count >= total, f"{total} records", 60)
    finally:
        await baseline.stop()
        await observer.stop()
    if observer.count != total:
        raise BenchError(f"baseline produced {observer.count} records, expected {total}")
    first, last = observer.first_seen, observer.last_seen
    return pass_rate(total, first, last, first_step, where=topics.status)


def pass_rate(
    total: int,
    first_seen: float | None,
    last_seen: float | None,
    first_step: float | None,
    where: str = "the output",
) -> float:
    """Records/s of a pass whose output a reader saw from `first_seen` to `last_seen`.

    When the reader fetched it all at once (a few hundred records, as `quick` sends, moved
    in a few milliseconds), the pass is timed from its first committing step (`first_step`)
    to that fetch instead.
    """
    if first_seen is not None and last_seen is not None and last_seen > first_seen:
        return total / (last_seen - first_seen)
    if first_step is None or last_seen is None or last_seen <= first_step:
        raise BenchError(f"too few records on {where} to time anything")
    return total / (last_seen - first_step)


async def _paced(
    producer: AIOKafkaProducer,
    topics: Topics,
    rate: float,
    prefix: str,
    count: int,
    sent: dict[str, float] | None = None,
) -> None:
    """Send `count` start requests at `rate` per second; note each send time in `sent`."""
    futures = []
    began = time.perf_counter()
    for i in range(count):
        # Paced by an absolute schedule: a late send does not delay the ones after it.
        delay = began + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        job_type, request_id = f"{prefix}-job-{i}", f"{prefix}-{i}"
        if sent is not None:
            sent[request_id] = time.perf_counter()
        futures.append(
            await producer.send(
                topics.requests, start_body(job_type, request_id), key=job_type.encode()
            )
        )
    await asyncio.gather(*futures)


class _Observer(Protocol):
    """A reader of the status topic that notes when each request's `started` was seen."""

    types: Counter[str]
    started_seen: dict[str, float]

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float) -> None: ...


def _at_least(types: Counter[str], started: int) -> bool:
    return types["started"] >= started


async def _all_saw(
    tail: _Tail, observers: Sequence[_Observer], started: int, what: str, worker: _Worker
) -> None:
    """Wait until the executor's tail and every observer have seen `started` started events."""
    timeout = _timeout_for(started)
    await tail.until(lambda: tail.types["started"] >= started, what, timeout, worker)
    for observer in observers:
        await observer.until(partial(_at_least, observer.types, started), what, timeout)
    worker.check_alive()


@dataclass
class LatencyRound:
    """One latency round: when each measured request was sent, and who saw its `started`."""

    sent: dict[str, float]  # request ID -> when it was sent (perf_counter)
    achieved: float  # requests/s the paced producer actually sent
    # The contender's CPU time (user + system, every thread) over the measured window, from
    # the last warm-up `started` seen to the last measured one, and that window's length.
    cpu_seconds: float
    window_seconds: float
    tail: _Tail  # the aiokafka read_committed reader that plays the executor
    observers: list[_Observer]


async def latency_round(
    bench: _Bench,
    observers: Callable[[Topics], Sequence[_Observer]],
    window: Callable[[_Worker], Awaitable[None]] | None = None,
    who: str = "worker",
    **worker_settings: str,
) -> LatencyRound:
    """Start requests at the offered rate against a caught-up exactly-once worker (or
    `who`: the contract "floor", the "quix" job lock), after a warm-up; each `started` event
    timed by the aiokafka reader that plays the executor and by `observers(topics)`, side
    by side.
    `window(worker)` is awaited just before the measured requests and once every reader has
    seen them."""
    o = bench.options
    topics = await bench.topics("lat", o.partitions)
    prefix = topics.requests.removesuffix(".requests")
    total = max(1, round(o.latency_rate * o.latency_seconds))
    worker = bench.contender(topics, who, **worker_settings)
    # linger 0: a request goes out as soon as it is due; batching would add latency.
    async with _producer(bench.kafka, linger_ms=0) as producer:
        tail = _Tail(bench.kafka, topics.status, executor=(producer, topics.results), track=True)
        others = list(observers(topics))
        try:
            for observer in (tail, *others):
                await observer.start()
            await worker.start()
            # Warm-up: a few lifecycles on every partition (`_warm_up`); then the offered
            # rate for a few seconds, unmeasured, so that the figures describe the steady
            # state rather than the first seconds of a process and a broker.
            await _warm_up(tail, producer, topics, worker, prefix, _warm_count(o))
            warm_count = round(o.latency_rate * o.latency_warmup_seconds)
            await _paced(producer, topics, o.latency_rate, f"{prefix}-paced-warm", warm_count)
            warmed = _warm_count(o) + warm_count
            await _all_saw(tail, others, warmed, "warm-up", worker)
            if window is not None:
                await window(worker)
            sent: dict[str, float] = {}
            cpu = cpu_seconds(worker.pid)
            began = time.perf_counter()
            await _paced(producer, topics, o.latency_rate, prefix, total, sent)
            finished = time.perf_counter()
            await _all_saw(tail, others, warmed + total, f"{total} started events", worker)
            cpu = cpu_seconds(worker.pid) - cpu
            window_s = time.perf_counter() - began
            if window is not None:
                await window(worker)
            await worker.stop()
        finally:
            await worker.close()
            for observer in (tail, *others):
                await observer.stop()
    achieved = total / (finished - began) if finished > began else float(total)
    return LatencyRound(sent, achieved, cpu, window_s, tail, others)


# The phases of a just-joined round, as named in the report's fields, and as shown.
_JOINED = (
    ("new", "fresh, on new topics"),
    ("fresh", "fresh, on served topics"),
    ("restarted", "restarted on its file"),
)


async def _joined_phase(
    bench: _Bench,
    topics: Topics,
    producer: AIOKafkaProducer,
    readers: tuple[_Tail, RdkafkaTail],
    db: str,
    label: str,
    floor: bool = False,
) -> tuple[float, Percentiles, Percentiles]:
    """Start a worker (or the contract floor) on `db`; once it has taken its partitions,
    start requests at the offered rate for `joined_seconds`; every run completed, stop it.
    Seconds from spawn to partitions taken, and the latencies the aiokafka and librdkafka
    readers saw."""
    o = bench.options
    tail, rdkafka = readers
    prefix = f"{topics.requests.removesuffix('.requests')}-{label}"
    count = max(1, round(o.latency_rate * o.joined_seconds))
    before = tail.types["started"]
    if floor:
        worker = bench.floor(topics, db)
    else:
        worker = bench.worker(topics, "exactly_once", log_level="info", db=db)
    try:
        await worker.start()
        await worker.wait_log("partitions assigned", _timeout_for(0))
        joined = time.perf_counter() - worker.spawned_at
        sent: dict[str, float] = {}
        await _paced(producer, topics, o.latency_rate, prefix, count, sent)
        await _all_saw(tail, [rdkafka], before + count, f"{count} started events", worker)
        await tail.until(
            lambda: tail.types["completed"] >= before + count,
            f"{count} completed runs",
            _timeout_for(count),
            worker,
        )
        await worker.stop()
    finally:
        await worker.close()
    return (
        joined,
        Percentiles.between(sent, tail.started_seen),
        Percentiles.between(sent, rdkafka.started_seen),
    )


async def _joined_round(
    bench: _Bench, floor: bool = False
) -> list[tuple[float, Percentiles, Percentiles]]:
    """A worker with an empty SQLite file on new topics, another with an empty file on those
    topics once served, then that one restarted on its file (`_JOINED`, `_joined_phase`
    each); with `floor`, the contract floor."""
    topics = await bench.topics("joined", bench.options.partitions)
    stem = bench.tmp / topics.requests.removesuffix(".requests")
    files = {"new": f"{stem}-new.db", "fresh": f"{stem}.db", "restarted": f"{stem}.db"}
    async with _producer(bench.kafka, linger_ms=0) as producer:
        tail = _Tail(bench.kafka, topics.status, executor=(producer, topics.results), track=True)
        rdkafka = RdkafkaTail(bench.settings, topics.status, bench.options.partitions)
        try:
            await tail.start()
            await rdkafka.start()
            return [
                await _joined_phase(
                    bench, topics, producer, (tail, rdkafka), files[label], label, floor
                )
                for label, _ in _JOINED
            ]
        finally:
            await tail.stop()
            await rdkafka.stop()


async def _client_round(bench: _Bench) -> tuple[float, float, float]:
    """p50 (ms) of start_job, is_job_running and get_running_job_info, on an idle worker."""
    topics = await bench.topics("client", bench.options.partitions)
    prefix = topics.requests.removesuffix(".requests")
    worker = bench.worker(topics, "exactly_once")
    settings = bench.settings.model_copy(update={"topic_prefix": prefix, "http_port": 0})
    calls = bench.options.client_calls
    try:
        await worker.start()
        async with JobClient(settings) as jobs:
            await jobs.start_job(f"{prefix}-warm", timeout=60)  # the worker owns its partitions
            timings: list[list[float]] = [[], [], []]

            async def timed(figures: list[float], call: Awaitable[object]) -> None:
                began = time.perf_counter()
                await call
                figures.append((time.perf_counter() - began) * 1000)

            for n in range(calls):
                await timed(timings[0], jobs.start_job(f"{prefix}-{n}"))
                await timed(timings[1], jobs.is_job_running(f"{prefix}-warm"))
                await timed(timings[2], jobs.get_running_job_info(f"{prefix}-warm"))
        await worker.stop()
    finally:
        await worker.close()
    start, running, info = (statistics.median(t) for t in timings)
    return start, running, info


async def _client_rounds(bench: _Bench) -> tuple[Figure, Figure, Figure]:
    rounds: list[tuple[float, float, float]] = []
    for r in range(bench.options.rounds):
        rounds.append(await _client_round(bench))
        start, running, info = rounds[-1]
        bench.say(
            f"client calls {r + 1}/{bench.options.rounds}: start_job {start:.1f} ms, "
            f"is_job_running {running:.1f} ms, get_running_job_info {info:.1f} ms (p50)"
        )
    start_ms, running_ms, info_ms = (
        Figure.of(list(column)) for column in zip(*rounds, strict=True)
    )
    return start_ms, running_ms, info_ms


_STATUS_REFRESH_S = 2.0  # the view marks' period while `jobctl status` is timed


async def _status(
    bench: _Bench, topics: Topics, db: str, repeats: int | None = None
) -> tuple[Figure, Figure]:
    """Seconds of a `jobctl status` process over `topics`' history: from the last view mark,
    and reading the state topic whole; `repeats` (`rounds` + 2) runs of each, interleaved."""
    repeats = repeats or bench.options.rounds + 2
    refresh = str(_STATUS_REFRESH_S)
    worker = bench.worker(topics, "exactly_once", log_level="info", db=db, view_refresh_s=refresh)
    env = {**worker.env, "JOBS_LOG_LEVEL": "warning"}
    window = window_of(_STATUS_REFRESH_S)
    assert window is not None
    timings: dict[str, list[float]] = {refresh: [], "0": []}
    try:
        await worker.start()
        await worker.wait_log("partitions assigned", _timeout_for(bench.options.history_runs))
        # Let the history age past the client's window: the worker marks it meanwhile.
        await asyncio.sleep(window.total_seconds())
        for r in range(repeats):
            for setting, seconds in timings.items():
                began = time.perf_counter()
                done = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "worker.cli",
                    "status",
                    "--json",
                    env={**env, "JOBS_VIEW_REFRESH_S": setting},
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                )
                _, err = await done.communicate()
                if done.returncode != 0:
                    raise BenchError(f"jobctl status failed: {err.decode(errors='replace')}")
                seconds.append(time.perf_counter() - began)
            bench.say(
                f"  jobctl status {r + 1}/{repeats}: from the view mark "
                f"{timings[refresh][-1]:.2f} s, whole {timings['0'][-1]:.2f} s"
            )
        await worker.stop()
    finally:
        await worker.close()
    return Figure.of(timings[refresh]), Figure.of(timings["0"])


async def _restore(bench: _Bench) -> tuple[Figure, int, int]:
    """(seconds, runs, changelog records) of restoring a 1-partition changelog."""
    o = bench.options
    topics = await bench.topics("restore", 1)
    bench.say(f"restore: writing {o.restore_runs:,} runs to a 1-partition changelog")
    await _run_lifecycles(bench, topics, bench.worker(topics, "exactly_once"), o.restore_runs)
    seconds: list[float] = []
    runs = records = 0
    for r in range(o.rounds):
        # A new SQLite file: its applied offsets (none) differ from the group's, so the new
        # worker restores the partition from the changelog before taking it.
        worker = bench.worker(topics, "exactly_once", log_level="info")
        try:
            await worker.start()
            line = await worker.wait_log(_RESTORED, _timeout_for(o.restore_runs))
            await worker.stop()
        finally:
            await worker.close()
        seconds.append(float(line["seconds"]))
        runs, records = int(line["runs"]), int(line["records"])
        bench.say(f"  restore {r + 1}/{o.rounds}: {runs:,} runs in {seconds[-1]:.3f} s")
    return Figure.of(seconds), runs, records


async def _peak_rss(bench: _Bench) -> tuple[float, float, float, Topics, str]:
    """VmHWM in MB of a worker that made `history_runs` runs, of one restarted on its SQLite
    file, and of one with an empty file (it restores every partition from the changelog),
    the last two once they have taken every partition; the topics and SQLite file of that
    history."""
    o = bench.options
    topics = await bench.topics("rss", o.partitions)
    worker = bench.worker(topics, "exactly_once")
    peak: list[float] = []
    await _run_lifecycles(
        bench,
        topics,
        worker,
        o.history_runs,
        on_done=lambda: peak.append(worker.peak_rss_mb()),
        in_flight=o.history_in_flight,
    )
    for db in (worker.env["JOBS_DB_PATH"], None):
        _, rss, _ = await _take(bench, topics, db, o.history_runs)
        peak.append(rss)
    return peak[0], peak[1], peak[2], topics, worker.env["JOBS_DB_PATH"]


async def _take(
    bench: _Bench, topics: Topics, db: str | None, runs: int
) -> tuple[float, float, int]:
    """A worker on `db` (None: an empty file, so it restores every partition from the
    changelog): seconds from spawn to every partition taken, its peak RSS then, and the runs
    its restores loaded."""
    taker = bench.worker(topics, "exactly_once", log_level="info", db=db)
    try:
        await taker.start()
        await taker.wait_log("partitions assigned", _timeout_for(runs))
        seconds = time.perf_counter() - taker.spawned_at
        rss = taker.peak_rss_mb()
        await taker.stop()
    finally:
        await taker.close()
    restored = sum(int(e["runs"]) for e in taker.events if e.get("event") == _RESTORED)
    return seconds, rss, restored


async def _growth_row(bench: _Bench, job_types: int) -> GrowthRow:
    """One row of the growth table (module docstring, item 10)."""
    o = bench.options
    topics = await bench.topics(f"growth{job_types}", o.partitions)
    prefix = topics.requests.removesuffix(".requests")
    history = [(f"bench-{i}", f"{prefix}-{i}") for i in range(job_types)]
    order = random.Random(job_types).sample(range(job_types), job_types)
    measured = [(f"bench-{order[i % job_types]}", f"{prefix}-m{i}") for i in range(o.lifecycles)]
    worker = bench.worker(topics, "exactly_once")
    bench.say(f"growth, {job_types:,} job types: the history, then {o.lifecycles:,} measured")
    async with _producer(bench.kafka, linger_ms=5) as producer:
        tail = _Tail(
            bench.kafka,
            topics.status,
            executor=(producer, topics.results),
            probe=lambda: cpu_seconds(worker.pid),
        )
        await tail.start()
        try:
            await worker.start()
            await _keep_in_flight(tail, producer, topics, worker, history, o.history_in_flight)
            await tail.until(
                _completed(tail, job_types), "the history", _timeout_for(2 * job_types), worker
            )
            tail.measure_from_here()
            wave = min(job_types, o.history_in_flight)
            await _in_waves(tail, producer, topics, worker, measured, wave)
            making_rss = worker.peak_rss_mb()
            await worker.stop()
        finally:
            await worker.close()
            await tail.stop()
    _expect_lifecycles(tail, job_types + o.lifecycles)
    cpu, transitions = tail.probed()
    db = worker.env["JOBS_DB_PATH"]
    restart_s, restart_rss, _ = await _take(bench, topics, db, job_types)
    restore_s, restore_rss, retained = await _take(bench, topics, None, job_types)
    marked, whole = await _status(bench, topics, db, repeats=1)
    replayed, _ = await _replay(bench, topics, rounds=1)
    row = GrowthRow(
        job_types=job_types,
        transitions_per_s=transitions / tail.elapsed,
        cpu_us_per_transition=cpu / transitions * 1e6,
        making_peak_rss_mb=making_rss,
        retained_runs=retained,
        restore_s=restore_s,
        restore_peak_rss_mb=restore_rss,
        restart_s=restart_s,
        restart_peak_rss_mb=restart_rss,
        status_marked_s=marked.median,
        status_whole_s=whole.median,
        replay_records_per_s=replayed.median,
    )
    bench.say(
        f"  {job_types:,} job types: {row.transitions_per_s:,.0f} transitions/s, "
        f"{row.cpu_us_per_transition:,.0f} µs CPU each; restore of {retained:,} runs "
        f"{restore_s:.2f} s, {restore_rss:,.1f} MB"
    )
    return row


async def growth_rows(bench: _Bench, environment: object = None) -> tuple[GrowthRow, ...]:
    """The growth table's rows, smallest size first (also `jobctl bench --growth-only`, as a
    `with_bench` body: hence `environment`, unused)."""
    sizes = sorted(set(bench.options.growth_job_types))
    return tuple([await _growth_row(bench, n) for n in sizes])


def growth_json(rows: Sequence[GrowthRow]) -> dict[str, Any]:
    """The rows, and each measure's exponent when there are two sizes or more."""
    out: dict[str, Any] = {"growth": [asdict(row) for row in rows]}
    if len(rows) > 1:
        out["growth_exponents"] = {
            attribute: growth_exponent(rows, attribute, rate)
            for attribute, _, _, _, rate in _GROWTH_MEASURES
        }
    return out


async def _replay(bench: _Bench, topics: Topics, rounds: int | None = None) -> tuple[Figure, int]:
    """Status events per second that `jobctl replay` applies into a fresh SQLite file
    (`rounds` times), and the processes it replayed in."""
    prefix = topics.status.rsplit(".", 1)[0]
    settings = bench.settings.model_copy(update={"topic_prefix": prefix})
    rates = []
    processes = 1
    rounds = rounds or bench.options.rounds
    for r in range(rounds):
        path = bench.tmp / f"replay-{r}.db"
        report = await replay(settings, path, from_offset=0)
        rates.append(report.rate)
        processes = report.processes
        bench.say(
            f"  replay {r + 1}/{rounds}: {report.events:,} events "
            f"in {report.seconds:.2f} s ({report.rate:,.0f}/s, {processes} processes)"
        )
    return Figure.of(rates), processes


def _environment(bootstrap: str, local: LocalKafka | None) -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "aiokafka": aiokafka.__version__,
        # The worker's hot modules: compiled with mypyc, or from source (and why).
        "worker_code": compiled.state(),
        "platform": platform.platform(),
        "cpus": str(os.cpu_count()),
        "broker": f"local Apache Kafka {local.version}" if local is not None else bootstrap,
        # Other work on the machine moves every figure: the 1-, 5- and 15-minute load.
        "load_average_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


async def run_bench(options: BenchOptions, console: Console) -> BenchReport:
    """Run every measurement and return the report; progress goes to `console`.

    The caller prints `report.table()` (or `report.to_json()`). With `options.bootstrap`
    None a local broker is started for the run and stopped afterwards; on a given cluster the
    bench deletes the topics it created.
    """
    return await with_bench(options, console, _measure)


async def with_bench(
    options: BenchOptions,
    console: Console,
    body: Callable[[_Bench, dict[str, str]], Awaitable[T]],
) -> T:
    """Run `body` with a bench (its broker clients, temp directory, created topics) and a
    description of the environment; the local broker, if one was started, stopped after."""
    o = options.sized()
    quix = None
    if o.quix:
        given = o.bootstrap is not None and Settings(bootstrap_servers=o.bootstrap)
        if given and given.security_protocol != "PLAINTEXT":
            raise BenchError("--quix connects over PLAINTEXT only; this cluster is not")
        quix = await asyncio.to_thread(quix_python, console.print)
    local: LocalKafka | None = None
    bootstrap = o.bootstrap
    if bootstrap is None:
        console.print("starting a local Kafka broker")
        local = LocalKafka()
        await asyncio.to_thread(local.start)  # blocking, and runs its own event loop inside
        bootstrap = local.bootstrap_servers
        settings = Settings(bootstrap_servers=bootstrap, security_protocol="PLAINTEXT")
    else:  # a given cluster: connected to as every other client is (JOBS_SECURITY_*, ...)
        settings = Settings(bootstrap_servers=bootstrap)
    try:
        with tempfile.TemporaryDirectory(prefix="jobs-bench-") as tmp:
            bench = _Bench(o, console, settings, Path(tmp))
            bench.quix_python = quix
            await bench.start()
            try:
                return await body(bench, _environment(bootstrap, local))
            finally:
                await bench.close(delete_topics=local is None)
    finally:
        if local is not None:
            await asyncio.to_thread(local.stop)


async def _throughput_rounds(bench: _Bench) -> dict[str, Any]:
    """The throughput figures of the report: transitions/s and CPU µs per transition of each
    guarantee and of the contract floor, baseline records/s, and the ratios."""
    o = bench.options
    measured = (*_GUARANTEES, "floor", *(("quix",) if bench.quix_python else ()))
    rates: dict[str, list[float]] = {g: [] for g in measured}
    cpu: dict[str, list[float]] = {g: [] for g in measured}
    baseline: list[float] = []
    recorded: _Recorded | None = None
    for r in range(o.rounds):
        # Interleaved, so that both guarantees, the floor and the baseline see the same
        # machine state.
        for guarantee in measured:
            rate, cpu_us, got = await _throughput_round(bench, guarantee, record=recorded is None)
            recorded = recorded or got
            rates[guarantee].append(rate)
            cpu[guarantee].append(cpu_us)
            name = _NAMES.get(guarantee, guarantee)
            bench.say(
                f"round {r + 1}/{o.rounds} {name}: {rate:,.0f} transitions/s, "
                f"{cpu_us:,.0f} µs CPU per transition ({o.lifecycles:,} lifecycles)"
            )
        assert recorded is not None
        baseline.append(await _baseline_round(bench, recorded))
        bench.say(f"round {r + 1}/{o.rounds} baseline: {baseline[-1]:,.0f} records/s")
    eos, base = Figure.of(rates["exactly_once"]), Figure.of(baseline)
    least = Figure.of(rates["floor"])
    quix: dict[str, Any] = {}
    if rates.get("quix"):
        quix["quix_transitions_per_s"] = Figure.of(rates["quix"])
        quix["quix_cpu_us_per_transition"] = Figure.of(cpu["quix"])
    return quix | {
        "eos_transitions_per_s": eos,
        "alo_transitions_per_s": Figure.of(rates["at_least_once"]),
        "eos_cpu_us_per_transition": Figure.of(cpu["exactly_once"]),
        "alo_cpu_us_per_transition": Figure.of(cpu["at_least_once"]),
        "baseline_records_per_s": base,
        "eos_over_baseline": eos.median / base.median,
        "floor_records_per_s": least,
        "floor_cpu_us_per_transition": Figure.of(cpu["floor"]),
        "floor_over_baseline": least.median / base.median,
    }


def _figures(prefix: str, rounds: Sequence[Percentiles]) -> dict[str, Figure]:
    """`<prefix>_p50_ms`, `_p95_ms` and `_p99_ms` over rounds."""
    return {
        f"{prefix}_p50_ms": Figure.of([p.p50 for p in rounds]),
        f"{prefix}_p95_ms": Figure.of([p.p95 for p in rounds]),
        f"{prefix}_p99_ms": Figure.of([p.p99 for p in rounds]),
    }


async def _latency_rounds(bench: _Bench) -> dict[str, Any]:
    """The latency figures of the report: aiokafka's and librdkafka's read_committed
    consumers side by side on the status topic (librdkafka with its default settings), for
    the worker and, in rounds interleaved with its, for the contract floor."""
    o = bench.options
    seen: dict[str, list[Percentiles]] = {}
    achieved: list[float] = []
    cpu: dict[str, list[float]] = {}
    transitions = 2 * max(1, round(o.latency_rate * o.latency_seconds))
    contenders = ["worker", "floor", *(["quix"] if bench.quix_python else [])]
    for r in range(o.rounds):
        for who in contenders if r % 2 == 0 else contenders[::-1]:
            got = await latency_round(
                bench, lambda t: [RdkafkaTail(bench.settings, t.status, o.partitions)], who=who
            )
            label = "" if who == "worker" else f"{who}_"
            aio = Percentiles.between(got.sent, got.tail.started_seen)
            rdk = Percentiles.between(got.sent, got.observers[0].started_seen)
            seen.setdefault(f"{label}latency", []).append(aio)
            seen.setdefault(f"{label}librdkafka", []).append(rdk)
            if who == "worker":
                achieved.append(got.achieved)
            share = 100 * got.cpu_seconds / got.window_seconds
            per = 1e6 * got.cpu_seconds / transitions
            cpu.setdefault(f"{label}latency_cpu_pct", []).append(share)
            cpu.setdefault(f"{label}latency_cpu_us_per_transition", []).append(per)
            bench.say(
                f"latency {r + 1}/{o.rounds}{f', {_NAMES[who]}' if who in _NAMES else ''} at "
                f"{got.achieved:,.0f}/s: aiokafka {aio.line()}; librdkafka {rdk.line()}; "
                f"CPU {share:.0f}% of a core, {per:,.0f} µs a transition"
            )
    figures: dict[str, Any] = {name: Figure.of(values) for name, values in cpu.items()}
    for prefix, rounds in seen.items():
        figures.update(_figures(prefix, rounds))
    return {
        "latency_offered_rate": o.latency_rate,
        "latency_achieved_rate": Figure.of(achieved),
        "latency_requests": max(1, round(o.latency_rate * o.latency_seconds)),
        **figures,
        # Measured requests whose `started` each consumer saw, in the round that saw fewest.
        "latency_aiokafka_seen": min(
            p.count for name, rounds in seen.items() if name.endswith("latency") for p in rounds
        ),
        "latency_librdkafka_seen": min(
            p.count for name, rounds in seen.items() if name.endswith("librdkafka") for p in rounds
        ),
    }


async def _joined_rounds(bench: _Bench) -> dict[str, Any]:
    """The figures of a worker that has just joined (`_JOINED`: on new topics, fresh on
    served ones, restarted on its file); and the same of the contract floor, in rounds
    interleaved with the worker's."""
    o = bench.options
    columns: dict[str, list[float]] = {}
    for r in range(o.rounds):
        for floor in (False, True) if r % 2 == 0 else (True, False):
            who = "floor_joined" if floor else "joined"
            for label, (joined, aio, rdk) in zip(
                (label for label, _ in _JOINED), await _joined_round(bench, floor), strict=True
            ):
                for name, value in (
                    ("start_s", joined),
                    ("p99_ms", aio.p99),
                    ("librdkafka_p99_ms", rdk.p99),
                ):
                    columns.setdefault(f"{who}_{label}_{name}", []).append(value)
                bench.say(
                    f"just joined {r + 1}/{o.rounds}, {dict(_JOINED)[label]}"
                    f"{' contract floor' if floor else ''}: partitions taken {joined:.2f} s "
                    f"after spawn; first {o.joined_seconds:g} s at {o.latency_rate:,.0f}/s: "
                    f"aiokafka {aio.line()}; librdkafka {rdk.line()}"
                )
    out: dict[str, Any] = {"joined_seconds": o.joined_seconds}
    out.update((name, Figure.of(values)) for name, values in columns.items())
    return out


async def _measure(bench: _Bench, environment: dict[str, str]) -> BenchReport:
    o = bench.options
    bench.say(f"the worker's hot modules: {environment['worker_code']}")
    environment["worker_transactions"] = o.transactions
    bench.say(f"the worker's transactions: JOBS_TRANSACTIONS={o.transactions}")
    throughput = await _throughput_rounds(bench)
    restore_seconds, restored_runs, restored_records = await _restore(bench)
    bench.say(
        f"peak RSS: running {o.history_runs:,} lifecycles through one worker, "
        f"at most {o.history_in_flight:,} in flight"
    )
    rss, restart_rss, restore_rss, history, history_db = await _peak_rss(bench)
    bench.say(
        f"peak RSS: {rss:,.1f} MB; restarted on that history: {restart_rss:,.1f} MB; "
        f"restoring it from the changelog: {restore_rss:,.1f} MB"
    )
    bench.say("replay: rebuilding a store from that worker's status topic")
    replayed, replay_processes = await _replay(bench, history)
    bench.say(f"jobctl status over that history, view marks every {_STATUS_REFRESH_S:g} s")
    status_marked, status_whole = await _status(bench, history, history_db)

    # Latency last: a broker's first minutes (its JIT compiling, on a machine this small)
    # add tens of ms to the tail; a worker's production cluster has long since warmed up.
    latency = await _latency_rounds(bench)
    joined = await _joined_rounds(bench)
    client_start, client_running, client_info = await _client_rounds(bench)
    growth = await growth_rows(bench)
    environment["load_average_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return BenchReport(
        lifecycles=o.lifecycles,
        partitions=o.partitions,
        rounds=o.rounds,
        batch_max_records=o.batch_max_records,
        **throughput,
        **latency,
        **joined,
        restore_runs_requested=o.restore_runs,
        restored_runs=restored_runs,
        restored_records=restored_records,
        restore_seconds=restore_seconds,
        history_runs=o.history_runs,
        history_in_flight=o.history_in_flight,
        peak_rss_mb=rss,
        restart_peak_rss_mb=restart_rss,
        restore_peak_rss_mb=restore_rss,
        replay_records_per_s=replayed,
        replay_processes=replay_processes,
        client_start_ms=client_start,
        client_is_running_ms=client_running,
        client_running_info_ms=client_info,
        status_marked_s=status_marked,
        status_whole_s=status_whole,
        growth=growth,
        environment=environment,
    )
