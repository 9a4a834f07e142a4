"""Audit: re-decide every logged input with the settings that were in force, or others.

The status topic is the decision log: every event names its cause (`source`, or a time
advance of one job type) and, in its `jobs-settings` header, the settings it was decided
with (their documents are changelog rows, `worker.engine.rulebook`). `verify` reads the
requests, results and status topics and, partition by partition, feeds each logged input to
the same `PartitionTask` the live worker runs, in the order the log recorded, advancing time
where the log did, with the settings each decision was made with. Any decision the current
code makes differently is a divergence: after an upgrade, a bug fix, or a tampered log.
Inputs that caused no event (heartbeats, re-routed originals, dead letters without a sender)
are re-decided in decision order between the logged decisions, as the worker processes them.

`settings` given (`jobctl verify --config`) asks another question: what would these
settings have decided? Every input is then re-decided with them.

Where verification starts: events before a window (`from_offset`/`from_timestamp`) and
events whose input the retention has deleted cannot be re-decided; they are *adopted*
(`worker.core.adopt`): their state is taken from the log and verification goes on after the
last of them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas import EventType, StatusEvent, read_status_event
from worker.audit.replay import Progress, consumer_for, read_ranges, whole_topic
from worker.core.adopt import adopt, with_deadline
from worker.core.config import JobsConfig
from worker.core.lifecycle import merge_inputs
from worker.engine import rulebook
from worker.engine.codec import InputRecord, TopicRole
from worker.engine.task import BatchOutcome, PartitionTask, Rules
from worker.kafkaio import partitions_of, start_client
from worker.settings import Settings


@dataclass
class Divergence:
    """A logged decision the current code makes differently (or not at all)."""

    partition: int
    cause: str
    logged: list[dict[str, Any]]
    recomputed: list[dict[str, Any]]

    def line(self) -> str:
        """The divergence in one line: where, what was logged, what is decided now."""
        text = (
            f"partition {self.partition}, {self.cause}: logged {_summary(self.logged)}; "
            f"now {_summary(self.recomputed)}"
        )
        if fields := _differing(self.logged, self.recomputed):
            text += f" (differs in {', '.join(fields)})"
        return text

    def as_json(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "cause": self.cause,
            "logged": self.logged,
            "recomputed": self.recomputed,
        }


def _summary(events: list[dict[str, Any]]) -> str:
    if not events:
        return "no event"
    return ", ".join(
        " ".join(str(e[k]) for k in ("type", "run_id", "status") if e.get(k)) for e in events
    )


def _differing(logged: list[dict[str, Any]], now: list[dict[str, Any]]) -> list[str]:
    """The fields that differ between same-typed events, in order of first difference."""
    if len(logged) != len(now) or [e["type"] for e in logged] != [e["type"] for e in now]:
        return []
    found: list[str] = []
    for a, b in zip(logged, now, strict=True):
        found += [k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in found]
    return sorted(found)


@dataclass
class VerifyReport:
    """What `verify` found."""

    inputs: int = 0  # re-decided
    events: int = 0  # logged events read
    divergences: list[Divergence] = field(default_factory=list)
    foreign: int = 0  # records of the status topic that are not status events
    adopted: int = 0  # events before the window, taken as logged
    unretained: int = 0  # of those, events whose input the retention deleted
    settings: Counter[str] = field(default_factory=Counter)  # digest -> events decided with it
    unrecorded: int = 0  # events that name no settings (logged before they were recorded)
    missing: set[str] = field(default_factory=set)  # named settings with no readable row

    @property
    def ok(self) -> bool:
        return not (self.divergences or self.foreign or self.missing)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "inputs": self.inputs,
            "events": self.events,
            "adopted": self.adopted,
            "unretained": self.unretained,
            "foreign": self.foreign,
            "settings": dict(self.settings),
            "unrecorded": self.unrecorded,
            "missing_settings": sorted(self.missing),
            "divergences": [d.as_json() for d in self.divergences],
        }


@dataclass
class Logged:
    """One status event as read: the event, its record offset and time, its settings."""

    event: StatusEvent
    offset: int
    timestamp_ms: int
    settings: str | None


@dataclass(frozen=True)
class Window:
    """Where verification starts in each status partition: what comes before is adopted."""

    from_offset: int | None = None
    from_timestamp: datetime | None = None

    def starts_at(self, logged: Logged) -> bool:
        if self.from_offset is not None and logged.offset < self.from_offset:
            return False
        if self.from_timestamp is not None:
            return logged.timestamp_ms >= self.from_timestamp.timestamp() * 1000
        return True


async def verify(
    settings: Settings,
    config: JobsConfig,
    progress: Progress | None = None,
    window: Window = Window(),
    *,
    fixed: bool = False,
) -> VerifyReport:
    """Re-decide the logged inputs with the settings in force when each was decided (events
    that name none: with `config`), or all of them with `config` when `fixed`."""
    consumer = consumer_for(settings)
    await start_client(consumer)
    report = VerifyReport()
    try:
        t = settings.topics
        inputs: dict[int, dict[tuple[str, int], InputRecord]] = defaultdict(dict)
        retained: dict[tuple[str, int], int] = {}  # (topic, partition) -> first offset kept
        roles: dict[str, TopicRole] = {t.requests: "requests", t.results: "results"}
        for topic in (t.requests, t.results):
            ranges = await whole_topic(consumer, topic)
            retained.update({(topic, p): start for p, (start, _) in ranges.items()})
            async for tp, records in read_ranges(consumer, ranges, topic):
                for r in records:
                    inputs[tp.partition][(topic, r.offset)] = InputRecord.of(roles[topic], r)
        documents: dict[str, bytes] = {}
        async for _, records in read_ranges(
            consumer, await whole_topic(consumer, t.state), t.state
        ):
            for r in records:
                if (found := rulebook.document_in(r.key, r.value)) is not None:
                    documents[found[0]] = found[1]
        status_tps = await partitions_of(consumer, t.status)
        base = Rules(
            partitions=len(status_tps),
            jobs=config,
            limits=settings.limits,
            input_limits=settings.input_limits,
            retention=timedelta(seconds=settings.run_retention_s),
            hold=timedelta(seconds=settings.time_hold_s),
            skew=timedelta(seconds=settings.max_clock_skew_s),
        )
        book = Rulebook(base, documents, fixed=fixed, report=report)
        logged: dict[int, list[Logged]] = defaultdict(list)
        async for tp, records in read_ranges(
            consumer, await whole_topic(consumer, t.status), t.status
        ):
            for r in records:
                try:
                    event = read_status_event(r.value)
                except ValueError:
                    report.foreign += 1
                    continue
                digest = rulebook.digest_in(r.headers)
                logged[tp.partition].append(Logged(event, r.offset, r.timestamp, digest))
        total = sum(len(v) for v in logged.values())
        done = 0
        for partition in sorted(set(inputs) | set(logged)):
            events = logged[partition]
            start = _start_of(events, window, retained, report)
            _Audit(partition, book, inputs[partition], events, report).run(start)
            done += len(events)
            if progress is not None:
                progress(done, total)
    finally:
        await consumer.stop()
    return report


def _start_of(
    events: list[Logged],
    window: Window,
    retained: Mapping[tuple[str, int], int],
    report: VerifyReport,
) -> int:
    """Index of the first event to verify: at the window's start and after the last event
    whose input is no longer retained, never inside a group of one cause."""

    def gone(item: Logged) -> bool:
        source = item.event.source
        return source is not None and source.offset < retained.get(
            (source.topic, source.partition), 0
        )

    report.unretained += sum(1 for e in events if gone(e))
    start = next((i for i, e in enumerate(events) if window.starts_at(e)), len(events))
    if 0 < start < len(events):
        start = _group_end(events, start - 1)
    last_gone = next((i for i in range(len(events) - 1, -1, -1) if gone(events[i])), None)
    return start if last_gone is None else max(start, _group_end(events, last_gone))


def _group_end(events: list[Logged], i: int) -> int:
    """The index after the group of events that shares event `i`'s cause."""
    cause = _cause(events[i].event)
    while i < len(events) and _cause(events[i].event) == cause:
        i += 1
    return i


class Rulebook:
    """The rules each logged event was decided with."""

    def __init__(
        self, base: Rules, documents: dict[str, bytes], *, fixed: bool, report: VerifyReport
    ) -> None:
        self.base = base
        self.documents = documents
        self.fixed = fixed  # every input with `base` (`--config`)
        self.report = report
        self._parsed: dict[str, Rules] = {}

    def of(self, digest: str | None, events: int = 1) -> Rules:
        """The rules of settings `digest`, counting `events` decided with them."""
        if digest is None:
            self.report.unrecorded += events
            return self.base
        self.report.settings[digest] += events
        if self.fixed:
            return self.base
        if digest not in self._parsed:
            document = self.documents.get(digest)
            if document is None:
                self.report.missing.add(digest)
                return self.base
            try:
                self._parsed[digest] = rulebook.rules_from(document, self.base)
            except ValueError:  # pydantic's ValidationError too: not a document we wrote
                self.report.missing.add(digest)
                return self.base
        return self._parsed[digest]


def _cause(event: StatusEvent) -> str:
    if event.source is not None:
        return f"{event.source.topic}:{event.source.partition}:{event.source.offset}"
    return f"advance:{event.job_type}:{event.occurred_at.isoformat()}"


def _groups(events: list[Logged]) -> list[tuple[str, list[Logged]]]:
    """Consecutive events with one cause: an input record, or one job type's time advance."""
    groups: list[tuple[str, list[Logged]]] = []
    for item in events:
        cause = _cause(item.event)
        if groups and groups[-1][0] == cause:
            groups[-1][1].append(item)
        else:
            groups.append((cause, [item]))
    return groups


def verify_partition(
    partition: int,
    rules: Rules,
    inputs: dict[tuple[str, int], InputRecord],
    events: list[StatusEvent],
    report: VerifyReport,
) -> None:
    """Re-decide one partition's logged inputs, all with `rules`, from its first event.

    Also reports each time advance logged while a result about its job type, stamped
    before it, was still unread: time must not pass an input that has not been read.
    """
    book = Rulebook(rules, {}, fixed=True, report=report)
    logged = [Logged(e, i, 0, None) for i, e in enumerate(events)]
    _Audit(partition, book, inputs, logged, report).run(0)


class _Audit:
    """One partition's logged decisions, re-decided in the logged order."""

    def __init__(
        self,
        partition: int,
        book: Rulebook,
        inputs: dict[tuple[str, int], InputRecord],
        events: list[Logged],
        report: VerifyReport,
    ) -> None:
        self.partition = partition
        self.book = book
        self.inputs = inputs
        self.events = events
        self.report = report
        self.task = PartitionTask(partition, book.base)
        self.task.quiet = True  # its dead letters were logged when they were decided
        self.now = datetime.now(UTC)
        self.read: set[tuple[str, int]] = set()  # inputs decided so far, in logged order
        self.results: dict[bytes | None, list[InputRecord]] = defaultdict(list)
        for item in inputs.values():
            if item.role == "results":
                self.results[item.key].append(item)
        caused = {
            (e.event.source.topic, e.event.source.offset)
            for e in events
            if e.event.source is not None
        }
        self.silent = merge_inputs(r for key, r in inputs.items() if key not in caused)
        self.next_silent = 0
        self.uncertain: set[str] = set()  # adopted runs whose deadline the log does not say

    def run(self, start: int) -> None:
        """Adopt the events before `start`, then compare every later group of logged events
        with what the task decides now."""
        report = self.report
        self.adopt(self.events[:start])
        for cause, group in _groups(self.events[start:]):
            report.events += len(group)
            self.task.rules = self.book.of(group[0].settings, len(group))
            first = group[0].event
            logged = [g.event for g in group]
            if first.source is None:
                self.flush_silent(first.occurred_at)
                self.check_unread(cause, logged)
                self.settle_deadlines(logged)
                produced = self.advanced(first.job_type, first.occurred_at)
            else:
                record = self.inputs.get((first.source.topic, first.source.offset))
                if record is None:
                    self.diverged(cause, logged, [])
                    continue
                self.flush_silent(record.at)
                report.inputs += 1
                # The worker times out overdue runs before the record that reveals them;
                # those events form their own (advance) group just before this one.
                produced = self.decided(record)
            if [_comparable(e) for e in logged] != [_comparable(e) for e in produced]:
                self.diverged(cause, logged, produced)
        self.flush_silent(None)
        report.inputs += len(self.silent)

    def adopt(self, events: list[Logged]) -> None:
        """Take `events` as decided: their job states as they imply, their inputs as read."""
        self.report.adopted += len(events)
        if not events:
            return
        task = self.task
        for item in events:
            event = item.event
            rules = self.book.of(item.settings)
            state = task.state_of(event.job_type)
            state = adopt(state, event, rules.jobs.for_job(event.job_type), rules.limits)
            task.jobs[event.job_type] = state
            if event.type is EventType.STARTED and event.run_id is not None:
                self.uncertain.add(event.run_id)
            if event.source is not None:
                self.read.add((event.source.topic, event.source.offset))
        last = events[-1].event
        until = last.occurred_at
        if last.source is not None and (
            record := self.inputs.get((last.source.topic, last.source.offset))
        ):
            until = record.at
        # Inputs that caused nothing up to there are behind the window too.
        while self.next_silent < len(self.silent) and self.silent[self.next_silent].at <= until:
            self.next_silent += 1

    def settle_deadlines(self, logged: list[StatusEvent]) -> None:
        """An adopted run the log times out had its deadline then."""
        for event in logged:
            run_id = event.run_id
            if (
                event.type is EventType.TIMED_OUT
                and run_id is not None
                and run_id in self.uncertain
            ):
                state = self.task.state_of(event.job_type)
                self.task.jobs[event.job_type] = with_deadline(state, run_id, event)

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


def _comparable(event: StatusEvent) -> dict[str, Any]:
    return event.model_dump(mode="json")
