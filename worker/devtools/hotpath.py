"""The worker's own work per transition, without a broker: `python -m worker.devtools.hotpath`.

Lifecycles go through one partition's task as the live worker's batches do, in batches of a
given size (all start requests first, then a result for each run, as `jobctl bench` and its
simulated executor send them, each lifecycle of a job type of its own). With `--job-types
N` they take N job types in turn instead, each start followed by its run's result in the
same batch, as a busy job type's backlog is decided once its windows are full (1,000
request IDs and 256 ended runs each, after the first lifecycles). Each batch goes in three
steps:

- deciding: `PartitionTask.apply` (decoding, the lifecycle, the changelog rows);
- records: `records.write_outcome` into aiokafka record batches, which are never sent;
- SQLite: the batch queued on the store's write-behind and written by its thread
  (`Store.open`, `state.queue_outcome`, `flush`), as the worker's store writes it.

A young collection runs after a batch when `gctuning.Collector` says one is due, as `jobctl
run`'s timer makes them (`gctuning.collecting`), within the CPU time. It prints the
process's CPU time in those steps per transition (both threads) and the wall time of each
step per transition, in µs (the input records are made outside the measure).
Kafka's requests and the consumer are left out (`jobctl bench` measures the whole worker);
what is left is the work a lever on the worker's own code changes, measured with less noise
than live rounds, and in one process, so that `py-spy record --native` sees into the
compiled modules.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aiokafka import AIOKafkaProducer

from worker import compiled, gctuning
from worker.core.config import JobsConfig
from worker.core.lifecycle import Limits, merge_inputs
from worker.core.limits import InputLimits
from worker.core.runid import make_run_id
from worker.devtools.bench import result_body, start_body
from worker.engine.codec import InputRecord
from worker.engine.records import RecordBatches, write_outcome
from worker.engine.state import queue_outcome
from worker.engine.store import Store
from worker.engine.task import BatchOutcome, PartitionTask, Rules
from worker.logs import configure as configure_logs
from worker.settings import Topics

_BROKER_MS = 1_700_000_000_000  # the inputs' broker time; results a millisecond later


@dataclass(frozen=True)
class Split:
    """µs per transition: the process's CPU time, and the wall time of each step."""

    transitions: int
    cpu_us: float
    deciding_us: float
    records_us: float
    sqlite_us: float

    def line(self) -> str:
        return (
            f"{self.transitions:,} transitions: {self.cpu_us:.1f} µs CPU a transition; "
            f"deciding {self.deciding_us:.1f}, records {self.records_us:.1f}, "
            f"SQLite {self.sqlite_us:.1f}"
        )


class _Steps:
    """One partition's task, a producer that never connects, and a store."""

    def __init__(self, store: Store, producer: AIOKafkaProducer) -> None:
        self.topics = Topics.for_prefix("jobs")
        rules = Rules(1, JobsConfig(), Limits(), InputLimits(), timedelta(days=1))
        self.task = PartitionTask(0, rules)
        self.store = store
        self.producer = producer
        self.seconds = {"cpu": 0.0, "deciding": 0.0, "records": 0.0, "sqlite": 0.0}
        self.transitions = 0
        self.collector = gctuning.Collector()
        self.next_collection = time.monotonic() + self.collector.wait_s

    async def batch(self, records: list[InputRecord]) -> BatchOutcome:
        cpu = time.process_time()
        began = time.perf_counter()
        outcome = self.task.apply(merge_inputs(records))
        decided = time.perf_counter()
        write_outcome(RecordBatches(self.producer.create_batch), self.topics, 0, outcome)
        written = time.perf_counter()
        queue_outcome(self.store, 0, outcome, outcome.next_offsets)
        await self.store.flush()
        stored = time.perf_counter()
        if time.monotonic() >= self.next_collection:
            self.next_collection = time.monotonic() + self.collector()
        self.seconds["cpu"] += time.process_time() - cpu
        self.seconds["deciding"] += decided - began
        self.seconds["records"] += written - decided
        self.seconds["sqlite"] += stored - written
        self.transitions += len(outcome.events)
        return outcome


def _starts(topics: Topics, first: int, count: int) -> list[InputRecord]:
    return [
        InputRecord(
            "requests",
            topics.requests,
            0,
            i,
            _BROKER_MS,
            f"job-{i}".encode(),
            start_body(f"job-{i}", f"req-{i}"),
        )
        for i in range(first, first + count)
    ]


def _results(topics: Topics, outcome: BatchOutcome, first: int) -> list[InputRecord]:
    return [
        InputRecord(
            "results",
            topics.results,
            0,
            first + i,
            _BROKER_MS + 1,
            event.job_type.encode(),
            result_body(event.job_type, event.run_id or "", first + i + 1),
        )
        for i, event in enumerate(outcome.events)
    ]


def _busy(topics: Topics, first: int, count: int, job_types: int) -> list[InputRecord]:
    """Lifecycles `first` to `first + count` on `job_types` job types in turn, each start
    (request offset n) followed by its run's result (result offset n), a millisecond apart."""
    records = []
    for n in range(first, first + count):
        job_type, at = f"job-{n % job_types}", _BROKER_MS + 2 * n
        run_id = make_run_id(datetime.fromtimestamp(at / 1000, UTC), 0, n)
        start = start_body(job_type, f"req-{n}")
        result = result_body(job_type, run_id, n + 1)
        records.append(InputRecord("requests", topics.requests, 0, n, at, job_type.encode(), start))
        records.append(
            InputRecord("results", topics.results, 0, n, at + 1, job_type.encode(), result)
        )
    return records


async def measure(
    lifecycles: int, batch: int, directory: Path, job_types: int | None = None
) -> Split:
    """Run `lifecycles` through the steps, `batch` start requests (then their results) a
    batch, with a SQLite file in `directory`; on `job_types` job types in turn, each start
    and its result in one batch, when given."""
    if lifecycles <= 0 or batch <= 0 or (job_types is not None and job_types <= 0):
        raise ValueError(
            f"lifecycles, batch and job types must be positive, not {lifecycles}, {batch} "
            f"and {job_types}"
        )
    producer = AIOKafkaProducer(bootstrap_servers="localhost:9")  # builds batches, never sends
    store = await Store.open(directory / "hotpath.db")
    try:
        steps = _Steps(store, producer)
        for first in range(0, lifecycles, batch):  # the inputs are made outside the measure
            count = min(batch, lifecycles - first)
            if job_types is not None:
                await steps.batch(_busy(steps.topics, first, count, job_types))
                continue
            started = await steps.batch(_starts(steps.topics, first, count))
            await steps.batch(_results(steps.topics, started, first))
    finally:
        await store.close()
        await producer.stop()  # never started: releases what its constructor made
    per = 1e6 / max(1, steps.transitions)
    return Split(
        steps.transitions,
        steps.seconds["cpu"] * per,
        steps.seconds["deciding"] * per,
        steps.seconds["records"] * per,
        steps.seconds["sqlite"] * per,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the arguments, measure, print one line (and which code ran)."""
    parser = argparse.ArgumentParser(
        prog="python -m worker.devtools.hotpath",
        description="The worker's own work per transition, without a broker.",
    )
    parser.add_argument("--lifecycles", type=int, default=40_000)
    parser.add_argument(
        "--batch", type=int, default=2_000, help="start requests a batch (then their results)"
    )
    parser.add_argument(
        "--job-types",
        type=int,
        default=None,
        help="this many busy job types, each start and its result in one batch "
        "(default: a job type per lifecycle)",
    )
    args = parser.parse_args(argv)
    if args.lifecycles <= 0 or args.batch <= 0:
        parser.error("--lifecycles and --batch must be positive")
    if args.job_types is not None and args.job_types <= 0:
        parser.error("--job-types must be positive")
    configure_logs("warning", "json")  # a decision's debug line is not part of the work
    gctuning.tune()  # as `jobctl run` does
    with tempfile.TemporaryDirectory(prefix="jobs-hotpath-") as tmp:
        split = asyncio.run(measure(args.lifecycles, args.batch, Path(tmp), args.job_types))
    print(f"{split.line()} (hot modules: {compiled.state()})")


if __name__ == "__main__":
    main()
