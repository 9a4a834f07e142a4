"""Replay and audit from the decision log (`<prefix>.status`).

- `replay` rebuilds a SQLite store's run history from status events, from an offset or a
  timestamp: the same function (`Store.apply_events`) records runs live, so the result equals
  the live store by construction.
- `verify` re-runs the core over the input records in the order the decision log recorded and
  lists every decision the current code would make differently. Inputs that caused no event
  (heartbeats, re-routed originals, dead letters without a sender) are replayed in broker-time
  order between the logged decisions, as the worker processes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from schemas import StatusEvent
from worker import gctuning
from worker.codec import Bad, InputRecord, Reroute, TopicRole, decode
from worker.config import JobsConfig
from worker.kafkaio import partitions_of
from worker.lifecycle import AdvanceTime, Command, JobState, Limits, decide
from worker.settings import Settings
from worker.store import Store

Progress = Callable[[int, int], None]  # (records done, records in all)


def parse_events(values: Sequence[bytes | None]) -> list[StatusEvent]:
    """The status events among `values`; records that are not status events are skipped."""
    events = []
    for value in values:
        if not value:
            continue
        try:
            events.append(StatusEvent.model_validate_json(value))
        except ValidationError:
            continue  # not ours; `verify` reports foreign records
    return events


def _consumer(settings: Settings) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )


async def _read(
    consumer: AIOKafkaConsumer, starts: dict[TopicPartition, int], ends: dict[TopicPartition, int]
) -> AsyncIterator[tuple[TopicPartition, list[Any]]]:
    """Batches of committed records from `starts` up to `ends` (positions, not records)."""
    todo = [tp for tp in starts if starts[tp] < ends[tp]]
    if not todo:
        return
    consumer.assign(todo)
    for tp in todo:
        consumer.seek(tp, starts[tp])
    while todo:
        batch = await consumer.getmany(*todo, timeout_ms=1000, max_records=20_000)
        for tp, records in batch.items():
            yield tp, records
        todo = [tp for tp in todo if await consumer.position(tp) < ends[tp]]


@dataclass
class ReplayReport:
    """What `replay` did."""

    events: int
    runs: int
    seconds: float

    @property
    def rate(self) -> float:
        """Status events applied per second."""
        return self.events / self.seconds if self.seconds else 0.0


async def replay(
    settings: Settings,
    db_path: Path,
    *,
    from_offset: int | None = None,
    from_timestamp: datetime | None = None,
    progress: Progress | None = None,
) -> ReplayReport:
    """Apply `<prefix>.status` from an offset (each partition) or a time to `db_path`."""
    with gctuning.tuned():
        return await _replay(settings, db_path, from_offset, from_timestamp, progress)


async def _replay(
    settings: Settings,
    db_path: Path,
    from_offset: int | None,
    from_timestamp: datetime | None,
    progress: Progress | None,
) -> ReplayReport:
    started = time.perf_counter()
    consumer = _consumer(settings)
    await consumer.start()
    store = await Store.open(db_path)
    applied = 0
    try:
        tps = await partitions_of(consumer, settings.topics.status)
        ends = await consumer.end_offsets(tps)
        starts = dict.fromkeys(tps, from_offset or 0)
        if from_timestamp is not None:
            stamp = int(from_timestamp.timestamp() * 1000)
            found = await consumer.offsets_for_times(dict.fromkeys(tps, stamp))
            starts = {tp: (found[tp].offset if found.get(tp) else ends[tp]) for tp in tps}
        else:
            beginnings = await consumer.beginning_offsets(tps)
            starts = {tp: max(starts[tp], beginnings[tp]) for tp in tps}
        total = sum(max(0, ends[tp] - starts[tp]) for tp in tps)
        done = 0
        writing: asyncio.Task[None] | None = None
        try:
            async for tp, records in _read(consumer, starts, ends):
                events = parse_events([r.value for r in records])
                # SQLite writes one batch (in its thread) while the next is fetched and parsed.
                if writing is not None:
                    await writing
                writing = asyncio.create_task(store.apply_events(tp.partition, events))
                applied += len(events)
                done += len(records)
                if progress is not None:
                    progress(done, total)
            if writing is not None:
                await writing
        finally:
            if writing is not None and not writing.done():
                writing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writing
        runs = await store.count_runs()
    finally:
        await store.close()
        await consumer.stop()
    return ReplayReport(applied, runs, time.perf_counter() - started)


@dataclass
class Divergence:
    """A logged decision the current code makes differently (or not at all)."""

    partition: int
    cause: str
    logged: list[dict[str, Any]]
    recomputed: list[dict[str, Any]]


@dataclass
class VerifyReport:
    """What `verify` found."""

    inputs: int = 0
    events: int = 0
    divergences: list[Divergence] = field(default_factory=list)
    foreign: int = 0  # records of the status topic that are not status events


def _comparable(event: StatusEvent) -> dict[str, Any]:
    return event.model_dump(mode="json")


async def verify(
    settings: Settings, config: JobsConfig, progress: Progress | None = None
) -> VerifyReport:
    """Re-decide every logged input with the current core and configuration."""
    consumer = _consumer(settings)
    await consumer.start()
    report = VerifyReport()
    limits = Limits(
        ended_window=settings.ended_window, idempotency_window=settings.idempotency_window
    )
    try:
        t = settings.topics
        inputs: dict[int, dict[tuple[str, int], InputRecord]] = defaultdict(dict)
        roles: dict[str, TopicRole] = {t.requests: "requests", t.results: "results"}
        for topic in (t.requests, t.results):
            tps = await partitions_of(consumer, topic)
            ends = await consumer.end_offsets(tps)
            starts = await consumer.beginning_offsets(tps)
            async for tp, records in _read(consumer, starts, ends):
                for r in records:
                    inputs[tp.partition][(topic, r.offset)] = InputRecord.of(roles[topic], r)
        status_tps = await partitions_of(consumer, t.status)
        partitions = len(status_tps)
        logged: dict[int, list[StatusEvent]] = defaultdict(list)
        ends = await consumer.end_offsets(status_tps)
        starts = await consumer.beginning_offsets(status_tps)
        async for tp, records in _read(consumer, starts, ends):
            for r in records:
                try:
                    logged[tp.partition].append(StatusEvent.model_validate_json(r.value))
                except ValidationError:
                    report.foreign += 1
        total = sum(len(v) for v in logged.values())
        done = 0
        for partition in sorted(set(inputs) | set(logged)):
            _verify_partition(
                partition, partitions, inputs[partition], logged[partition], config, limits, report
            )
            done += len(logged[partition])
            if progress is not None:
                progress(done, total)
    finally:
        await consumer.stop()
    return report


def _groups(events: list[StatusEvent]) -> list[tuple[str, list[StatusEvent]]]:
    """Consecutive events with one cause: an input record, or one job type's time advance."""
    groups: list[tuple[str, list[StatusEvent]]] = []
    for event in events:
        if event.source is not None:
            cause = f"{event.source.topic}:{event.source.partition}:{event.source.offset}"
        else:
            cause = f"advance:{event.job_type}:{event.occurred_at.isoformat()}"
        if groups and groups[-1][0] == cause:
            groups[-1][1].append(event)
        else:
            groups.append((cause, [event]))
    return groups


def _verify_partition(
    partition: int,
    partitions: int,
    inputs: dict[tuple[str, int], InputRecord],
    events: list[StatusEvent],
    config: JobsConfig,
    limits: Limits,
    report: VerifyReport,
) -> None:
    jobs: dict[str, JobState] = {}
    now = datetime.now(UTC)

    def run(command: Command) -> list[StatusEvent]:
        state = jobs.get(command.job_type) or JobState(command.job_type)
        new, produced = decide(state, command, config.for_job(command.job_type), limits)
        jobs[command.job_type] = new
        return list(produced)

    def due(job_type: str, at: datetime) -> list[StatusEvent]:
        state = jobs.get(job_type)
        deadline = state.next_deadline() if state is not None else None
        if deadline is None or deadline > at:
            return []
        return run(AdvanceTime(job_type, at))

    def command_of(record: InputRecord) -> Command | None:
        decoded = decode(record, partitions=partitions, max_bytes=2**31, now=now)
        if isinstance(decoded, Reroute):
            return None
        if isinstance(decoded, Bad):
            return decoded.reject
        return decoded

    caused = {(e.source.topic, e.source.offset) for e in events if e.source is not None}
    silent = sorted(
        (r for key, r in inputs.items() if key not in caused),
        key=lambda r: (r.timestamp_ms, r.role != "requests", r.offset),
    )
    next_silent = 0

    def flush_silent(until: datetime | None) -> None:
        nonlocal next_silent
        while next_silent < len(silent) and (until is None or silent[next_silent].at <= until):
            record = silent[next_silent]
            next_silent += 1
            command = command_of(record)
            if command is None:
                continue
            produced = due(command.job_type, record.at) + run(command)
            if produced:
                report.divergences.append(
                    Divergence(
                        partition,
                        f"{record.topic}:{record.partition}:{record.offset}",
                        [],
                        [_comparable(e) for e in produced],
                    )
                )

    for cause, group in _groups(events):
        report.events += len(group)
        first = group[0]
        if first.source is None:
            flush_silent(first.occurred_at)
            produced = run(AdvanceTime(first.job_type, first.occurred_at))
        else:
            record = inputs.get((first.source.topic, first.source.offset))
            if record is None:
                report.divergences.append(
                    Divergence(partition, cause, [_comparable(e) for e in group], [])
                )
                continue
            flush_silent(record.at)
            report.inputs += 1
            command = command_of(record)
            produced = [] if command is None else run(command)
            # The worker times out overdue runs before the record that reveals them; those
            # events form their own (advance) group just before this one.
        logged = [_comparable(e) for e in group]
        recomputed = [_comparable(e) for e in produced]
        if logged != recomputed:
            report.divergences.append(Divergence(partition, cause, logged, recomputed))
    flush_silent(None)
    report.inputs += len(silent)
