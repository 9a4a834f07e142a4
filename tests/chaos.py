"""Harness for the crash, scale-out and zombie tests: worker processes, load, and the oracle.

The oracle checks, on what read_committed consumers see:
1. every input record is the `source` of at most one dead letter and no event is published
   twice (event IDs derive from their cause, so a repeated decision repeats its ID), and every
   input record is accounted for by a status event or a dead letter;
2. each run's events form a legal path of the lifecycle;
3. no run ID appears in two `started` events;
4. the SQLite file of each partition's final owner equals the state rebuilt from the status
   topic alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from schemas import DeadLetter, EventType, StatusEvent
from worker.core.lifecycle import TRANSITIONS, Action
from worker.core.runs import RunRow
from worker.engine.store import Store, fold_events
from worker.kafkaio import partitions_of
from worker.settings import Settings


class WorkerProcess:
    """`jobctl run` in a child process, with its own SQLite file and log; by default through
    the crash tests' entry point, which adds the fault points of `JOBS_FAULT_*`."""

    module = "worker.devtools.faults"  # "worker.cli": `jobctl run` itself

    def __init__(self, settings: Settings, name: str, directory: Path, **extra: str) -> None:
        self.name = name
        self.db_path = directory / f"{name}.db"
        self.log_path = directory / f"{name}.log"
        self.env = {
            **os.environ,
            "JOBS_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "JOBS_TOPIC_PREFIX": settings.topic_prefix,
            "JOBS_DB_PATH": str(self.db_path),
            "JOBS_SESSION_TIMEOUT_MS": str(settings.session_timeout_ms),
            "JOBS_HEARTBEAT_INTERVAL_MS": str(settings.heartbeat_interval_ms),
            "JOBS_POLL_TIMEOUT_MS": str(settings.poll_timeout_ms),
            "JOBS_BATCH_MAX_RECORDS": str(settings.batch_max_records),
            "JOBS_LOG_FORMAT": "json",
            "JOBS_HTTP_PORT": str(settings.http_port),
            **{f"JOBS_{k.upper()}": v for k, v in extra.items()},
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._log_mark = 0  # where this start's lines begin in the log

    def start(self, **extra: str) -> None:
        """Start (or restart) the process; `extra` overrides settings for this start only."""
        env = {**self.env, **{f"JOBS_{k.upper()}": v for k, v in extra.items()}}
        with self.log_path.open("ab") as log:
            self._log_mark = log.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "run"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL and reap."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` (SIGSTOP, SIGCONT...)."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 60) -> int:
        """Wait for the process to exit; its return code."""
        assert self.proc is not None
        return await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout)

    async def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, as an orchestrator would on shutdown; the exit code.

        Sent once this start has logged `worker started` (its handler is installed by then):
        a SIGTERM while the interpreter is still importing would kill it before it is a
        worker, which says nothing about how a worker stops.
        """
        assert self.proc is not None
        with contextlib.suppress(TimeoutError):  # one that never starts is stopped anyway
            await self._started(timeout)
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return await self.wait_exit(timeout)
        except TimeoutError:
            raise AssertionError(
                f"{self.name} did not exit {timeout}s after SIGTERM:\n{self.log_text()[-4000:]}"
            ) from None

    async def _started(self, timeout: float) -> None:
        """Until this start has logged `worker started`, or exited.

        Only this start's lines count: a start that exited before it logged the line (the
        broker down at start-up) must not leave its successor waiting out the timeout.
        """
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            # Polling a file another process writes: there is no event to wait on.
            while self.proc.poll() is None and (  # noqa: ASYNC110
                b'"worker started"' not in self._this_start_log()
            ):
                await asyncio.sleep(0.05)

    def _this_start_log(self) -> bytes:
        with self.log_path.open("rb") as log:
            log.seek(self._log_mark)
            return log.read()

    def alive(self) -> bool:
        """Whether the process is running."""
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """Everything the process logged."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ensure_dead(self) -> None:
        """Kill if still running (test clean-up)."""
        if self.proc is not None and self.proc.poll() is None:
            with_cont = self.proc
            with_cont.send_signal(signal.SIGCONT)
            with_cont.kill()
            with_cont.wait()


@dataclass
class Load:
    """Producers and a simulated executor: starts, results and bad input, seeded."""

    settings: Settings
    seed: int
    requests: int = 3000
    job_types: int = 40
    rate: float = 300.0  # start requests per second
    failure_ratio: float = 0.2
    bad_every: int = 100
    sent_requests: int = 0
    sent_results: int = 0
    answered: set[str] = field(default_factory=set)
    started_seen: set[str] = field(default_factory=set)
    producing_done: bool = False
    executor: AIOKafkaConsumer | None = None
    caught_up_batches: int = 0
    turns: asyncio.Condition = field(default_factory=asyncio.Condition)
    third_sent: asyncio.Event = field(default_factory=asyncio.Event)

    async def produce(self, producer: AIOKafkaProducer) -> None:
        """Send the start requests (and some bad input) at `rate` per second."""
        rng = random.Random(self.seed)
        t = self.settings.topics
        loop = asyncio.get_running_loop()
        began = loop.time()
        for i in range(self.requests):
            job_type = f"job-{rng.randrange(self.job_types)}"
            body = {"job_type": job_type, "request_id": f"r{i}", "initial_data": {"i": i}}
            await producer.send(t.requests, json.dumps(body).encode(), key=job_type.encode())
            self.sent_requests += 1
            if i == self.requests // 3:
                self.third_sent.set()
            if i % self.bad_every == 0:
                await producer.send(t.requests, b"{broken", key=job_type.encode())
                bogus = {
                    "job_type": job_type,
                    "run_id": f"260101-000000-0.{i}",
                    "status": "COMPLETED",
                    "request_id": f"bogus{i}",
                }
                await producer.send(t.results, json.dumps(bogus).encode(), key=job_type.encode())
                self.sent_requests += 1
                self.sent_results += 1
            # Pace the load so that it flows while workers are killed and restarted.
            delay = began + (i + 1) / self.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await producer.flush()
        self.producing_done = True

    async def execute(self, producer: AIOKafkaProducer) -> None:
        """Answer every `started` event once with a result, as an executor would."""
        rng = random.Random(self.seed + 1)
        t = self.settings.topics
        self.executor = AIOKafkaConsumer(
            t.status,
            bootstrap_servers=self.settings.bootstrap_servers,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await self.executor.start()
        try:
            while True:
                batch = await self.executor.getmany(timeout_ms=200)
                acks = []
                for records in batch.values():
                    for record in records:
                        event = StatusEvent.model_validate_json(record.value)
                        if event.type is not EventType.STARTED or event.run_id is None:
                            continue
                        if event.run_id in self.started_seen:
                            continue
                        self.started_seen.add(event.run_id)
                        failed = rng.random() < self.failure_ratio
                        body = {
                            "job_type": event.job_type,
                            "run_id": event.run_id,
                            "status": "FAILED" if failed else "COMPLETED",
                            "final_metrics": {"n": len(self.started_seen)},
                            "request_id": f"res-{event.run_id}",
                        }
                        acks.append(
                            await producer.send(
                                t.results, json.dumps(body).encode(), key=event.job_type.encode()
                            )
                        )
                        self.sent_results += 1
                await asyncio.gather(*acks)
                async with self.turns:
                    self.caught_up_batches += 1
                    self.turns.notify_all()
        finally:
            await self.executor.stop()

    async def executor_caught_up(self, status_ends: dict[TopicPartition, int]) -> bool:
        """Whether the executor has read, and answered, everything up to `status_ends`."""
        if self.executor is None:
            return False
        before = self.caught_up_batches
        for tp, end in status_ends.items():
            if tp not in self.executor.assignment() or await self.executor.position(tp) < end:
                return False
        # Positions move when a batch is fetched; its results are sent by the next loop turn.
        async with asyncio.timeout(10), self.turns:
            await self.turns.wait_for(lambda: self.caught_up_batches >= before + 2)
        return True


@contextlib.asynccontextmanager
async def flowing(load: Load) -> AsyncIterator[asyncio.Task[None]]:
    """Run the load's producer and executor; yield the producer task."""
    producer = AIOKafkaProducer(bootstrap_servers=load.settings.bootstrap_servers, linger_ms=5)
    await producer.start()
    producing = asyncio.create_task(load.produce(producer))
    executing = asyncio.create_task(load.execute(producer))
    try:
        yield producing
    finally:
        for task in (producing, executing):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await producer.stop()


async def end_offsets(consumer: AIOKafkaConsumer, topics: list[str]) -> dict[TopicPartition, int]:
    """End (last stable) offsets of every partition of `topics`."""
    tps = [tp for topic in topics for tp in await partitions_of(consumer, topic)]
    return dict(await consumer.end_offsets(tps))


async def wait_until_processed(settings: Settings, load: Load | None, timeout: float) -> None:
    """Wait until every input, including the executor's answers, is committed by the group."""
    t = settings.topics
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    # One long-lived probe: aiokafka raises CancelledError when a group-less consumer is
    # stopped right after it started.
    probe = AIOKafkaConsumer(
        t.requests,
        t.results,
        t.status,
        bootstrap_servers=settings.bootstrap_servers,
        isolation_level="read_committed",
    )
    # The high watermarks: an output partition whose last stable offset is behind its has a
    # transaction open (with JOBS_TRANSACTIONS=worker, a killed worker's, until the broker
    # times it out), and what follows it is not readable yet.
    raw = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, isolation_level="read_uncommitted"
    )
    outputs = [t.status, t.state, t.dlq]
    await admin.start()
    await probe.start()
    await raw.start()
    try:
        async with asyncio.timeout(timeout):
            while True:
                if load is None or load.producing_done:
                    status_ends = await end_offsets(probe, [t.status])
                    if load is None or await load.executor_caught_up(status_ends):
                        ends = await end_offsets(probe, [t.requests, t.results])
                        try:
                            committed = await admin.list_consumer_group_offsets(settings.group_id)
                        except KafkaError:  # a restarted broker's coordinator is not up yet
                            await asyncio.sleep(0.2)
                            continue
                        # Done only if no decision came after `status_ends`: a start the
                        # worker decided meanwhile gets an answer the worker must see too.
                        if (
                            all(
                                tp in committed and committed[tp].offset >= end
                                for tp, end in ends.items()
                                if end > 0
                            )
                            and await end_offsets(probe, [t.status]) == status_ends
                            and await end_offsets(probe, outputs) == await end_offsets(raw, outputs)
                        ):
                            return
                await asyncio.sleep(0.2)
    finally:
        await raw.stop()
        await probe.stop()
        await admin.close()


async def read_topic(bootstrap: str, topic: str) -> dict[int, list[Any]]:
    """Every committed record of `topic`, per partition, in offset order."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = await partitions_of(consumer, topic)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: dict[int, list[Any]] = {tp.partition: [] for tp in tps}
        for tp in tps:
            while await consumer.position(tp) < ends[tp]:
                batch = await consumer.getmany(tp, timeout_ms=1000, max_records=10_000)
                out[tp.partition].extend(batch.get(tp, ()))
        return out
    finally:
        await consumer.stop()


@dataclass
class Verdict:
    """What the oracle found."""

    inputs: int
    events: int
    dead_letters: int
    runs: int
    problems: list[str]


_ACTIONS = {
    EventType.COMPLETED: Action.COMPLETE,
    EventType.FAILED: Action.FAIL,
}


async def oracle(settings: Settings, db_paths: list[Path], tmp: Path) -> Verdict:
    """Check the four properties of the module docstring; list every violation."""
    t = settings.topics
    bs = settings.bootstrap_servers
    problems: list[str] = []
    inputs = {
        (topic, p, r.offset)
        for topic in (t.requests, t.results)
        for p, records in (await read_topic(bs, topic)).items()
        for r in records
    }
    status = {
        p: [StatusEvent.model_validate_json(r.value) for r in records]
        for p, records in (await read_topic(bs, t.status)).items()
    }
    letters = [
        DeadLetter.model_validate_json(r.value)
        for records in (await read_topic(bs, t.dlq)).values()
        for r in records
    ]
    events = [e for es in status.values() for e in es]

    # 1. each input decided once
    ids = [e.event_id for e in events]
    if len(ids) != len(set(ids)):
        dupes = {i for i in ids if ids.count(i) > 1}
        problems.append(f"{len(dupes)} event IDs published more than once")
    letter_sources = [(d.source.topic, d.source.partition, d.source.offset) for d in letters]
    if len(letter_sources) != len(set(letter_sources)):
        problems.append("an input record was dead-lettered more than once")
    caused = {(e.source.topic, e.source.partition, e.source.offset) for e in events if e.source}
    covered = caused | set(letter_sources)
    if covered != inputs:
        missing = sorted(inputs - covered)[:5]
        extra = sorted(covered - inputs)[:5]
        problems.append(f"inputs without a decision: {missing}; decisions without input: {extra}")

    # 2. legal lifecycle paths; 3. one `started` per run ID
    started: dict[str, int] = defaultdict(int)
    statuses: dict[str, Any] = {}
    for event in events:
        if event.run_id is None:
            continue
        if event.type is EventType.STARTED:
            started[event.run_id] += 1
            move = TRANSITIONS.get((None, Action.START))
            if event.run_id in statuses or move is None:
                problems.append(f"run {event.run_id} started twice")
            statuses[event.run_id] = event.status
        elif event.type in _ACTIONS:
            before = statuses.get(event.run_id)
            move = TRANSITIONS.get((before, _ACTIONS[event.type]))
            if move is None or move[0] is not event.status or event.from_status is not before:
                problems.append(f"illegal {event.type} of run {event.run_id} from {before}")
            statuses[event.run_id] = event.status
    twice = [r for r, n in started.items() if n > 1]
    if twice:
        problems.append(f"run IDs in two started events: {twice[:5]}")

    # 4. SQLite equals the state rebuilt from the status topic
    rebuilt = await Store.open(tmp / f"rebuilt-{uuid.uuid4().hex[:6]}.db")
    try:
        for p, es in status.items():
            await rebuilt.write_runs(fold_events(p, es))
        expected = {r.run_id: r for r in await rebuilt.runs()}
    finally:
        await rebuilt.close()
    owners = await _final_owners(db_paths, settings)
    actual: dict[str, RunRow] = {}
    for p, path in owners.items():
        store = await Store.open(path)
        try:
            actual.update({r.run_id: r for r in await store.runs() if r.partition == p})
        finally:
            await store.close()
    if actual != expected:
        differ = [k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k)]
        sample = differ[0] if differ else None
        problems.append(
            f"SQLite differs from the status topic on {len(differ)} runs, e.g. {sample}: "
            f"sqlite={actual.get(sample) if sample else None} "
            f"rebuilt={expected.get(sample) if sample else None}"
        )
    return Verdict(len(inputs), len(events), len(letters), len(expected), problems)


async def _final_owners(db_paths: list[Path], settings: Settings) -> dict[int, Path]:
    """Partition -> the SQLite file whose applied offsets match the group's commits."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(settings.group_id)
    finally:
        await admin.close()
    want: dict[int, dict[str, int]] = defaultdict(dict)
    for tp, meta in committed.items():
        want[tp.partition][tp.topic] = meta.offset
    owners: dict[int, Path] = {}
    for path in db_paths:
        if not path.exists():
            continue
        store = await Store.open(path)
        try:
            for p, offsets in want.items():
                applied = await store.applied_offsets(p)
                applied.pop(settings.topics.state, None)  # the changelog position
                if applied == offsets:
                    owners[p] = path
        finally:
            await store.close()
    missing = set(want) - set(owners)
    if missing:
        raise AssertionError(f"no SQLite file is up to date for partitions {sorted(missing)}")
    return owners
