"""Audit: re-decide every logged input with the current code and settings.

The status topic is the decision log: every event names its cause (`source`, or a time
advance of one job type). `verify` reads the requests, results and status topics whole and,
partition by partition, feeds each logged input to the same `PartitionTask` the live worker
runs, in the order the log recorded, advancing time where the log did. Any decision the
current code would make differently is a divergence: after an upgrade, a bug fix, or a
tampered log. Inputs that caused no event (heartbeats, re-routed originals, dead letters
without a sender) are re-decided in decision order between the logged decisions, as the
worker processes them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from schemas import StatusEvent
from worker.audit.replay import Progress, consumer_for, read_ranges, whole_topic
from worker.core.config import JobsConfig
from worker.core.lifecycle import merge_inputs
from worker.engine.codec import InputRecord, TopicRole
from worker.engine.task import BatchOutcome, PartitionTask, Rules
from worker.kafkaio import partitions_of
from worker.settings import Settings


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
    consumer = consumer_for(settings)
    await consumer.start()
    report = VerifyReport()
    try:
        t = settings.topics
        inputs: dict[int, dict[tuple[str, int], InputRecord]] = defaultdict(dict)
        roles: dict[str, TopicRole] = {t.requests: "requests", t.results: "results"}
        for topic in (t.requests, t.results):
            async for tp, records in read_ranges(
                consumer, await whole_topic(consumer, topic), topic
            ):
                for r in records:
                    inputs[tp.partition][(topic, r.offset)] = InputRecord.of(roles[topic], r)
        status_tps = await partitions_of(consumer, t.status)
        rules = Rules(
            partitions=len(status_tps),
            jobs=config,
            limits=settings.limits,
            input_limits=settings.input_limits,
            retention=timedelta(seconds=settings.run_retention_s),
        )
        logged: dict[int, list[StatusEvent]] = defaultdict(list)
        async for tp, records in read_ranges(
            consumer, await whole_topic(consumer, t.status), t.status
        ):
            for r in records:
                try:
                    logged[tp.partition].append(StatusEvent.model_validate_json(r.value))
                except ValidationError:
                    report.foreign += 1
        total = sum(len(v) for v in logged.values())
        done = 0
        for partition in sorted(set(inputs) | set(logged)):
            verify_partition(partition, rules, inputs[partition], logged[partition], report)
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


def verify_partition(
    partition: int,
    rules: Rules,
    inputs: dict[tuple[str, int], InputRecord],
    events: list[StatusEvent],
    report: VerifyReport,
) -> None:
    """Re-decide one partition's logged inputs with the live worker's `PartitionTask`.

    Also reports each time advance logged while a result about its job type, stamped
    before it, was still unread: time must not pass an input that has not been read.
    """
    _Audit(partition, rules, inputs, events, report).run(events)


class _Audit:
    """One partition's logged decisions, re-decided in the logged order."""

    def __init__(
        self,
        partition: int,
        rules: Rules,
        inputs: dict[tuple[str, int], InputRecord],
        events: list[StatusEvent],
        report: VerifyReport,
    ) -> None:
        self.partition = partition
        self.inputs = inputs
        self.report = report
        self.task = PartitionTask(partition, rules)
        self.now = datetime.now(UTC)
        self.read: set[tuple[str, int]] = set()  # inputs decided so far, in logged order
        self.results: dict[bytes | None, list[InputRecord]] = defaultdict(list)
        for item in inputs.values():
            if item.role == "results":
                self.results[item.key].append(item)
        caused = {(e.source.topic, e.source.offset) for e in events if e.source is not None}
        self.silent = merge_inputs(r for key, r in inputs.items() if key not in caused)
        self.next_silent = 0

    def run(self, events: list[StatusEvent]) -> None:
        """Compare every group of logged events with what the task decides now."""
        report = self.report
        for cause, group in _groups(events):
            report.events += len(group)
            first = group[0]
            if first.source is None:
                self.flush_silent(first.occurred_at)
                self.check_unread(cause, group)
                produced = self.advanced(first.job_type, first.occurred_at)
            else:
                record = self.inputs.get((first.source.topic, first.source.offset))
                if record is None:
                    self.diverged(cause, group, [])
                    continue
                self.flush_silent(record.at)
                report.inputs += 1
                # The worker times out overdue runs before the record that reveals them;
                # those events form their own (advance) group just before this one.
                produced = self.decided(record)
            if [_comparable(e) for e in group] != [_comparable(e) for e in produced]:
                self.diverged(cause, group, produced)
        self.flush_silent(None)
        report.inputs += len(self.silent)

    def diverged(self, cause: str, logged: list[StatusEvent], now: list[StatusEvent]) -> None:
        self.report.divergences.append(
            Divergence(
                self.partition,
                cause,
                [_comparable(e) for e in logged],
                [_comparable(e) for e in now],
            )
        )

    def decided(self, record: InputRecord) -> list[StatusEvent]:
        self.read.add((record.topic, record.offset))
        outcome = BatchOutcome()
        self.task.decide_record(record, outcome, self.now)
        return outcome.events

    def advanced(self, job_type: str, at: datetime) -> list[StatusEvent]:
        outcome = BatchOutcome()
        self.task.advance(job_type, at, outcome)
        return outcome.events

    def check_unread(self, cause: str, group: list[StatusEvent]) -> None:
        """Report a time advance logged ahead of an unread, earlier-stamped result."""
        first = group[0]
        pending = next(
            (
                r
                for r in self.results.get(first.job_type.encode(), ())
                if r.at < first.occurred_at and (r.topic, r.offset) not in self.read
            ),
            None,
        )
        if pending is not None:
            where = f"{pending.topic}:{pending.partition}:{pending.offset}"
            self.diverged(
                f"{cause}, decided while {where} (stamped {pending.at.isoformat()}) was unread",
                group,
                [],
            )

    def flush_silent(self, until: datetime | None) -> None:
        """Re-decide the inputs that caused no event, up to `until` in decision order."""
        silent = self.silent
        while self.next_silent < len(silent) and (
            until is None or silent[self.next_silent].at <= until
        ):
            record = silent[self.next_silent]
            self.next_silent += 1
            if produced := self.decided(record):
                where = f"{record.topic}:{record.partition}:{record.offset}"
                self.diverged(where, [], produced)
