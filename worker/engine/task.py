"""The partition task: what the owner of one partition knows, and its decisions.

A task turns a partition's input records into a `BatchOutcome`: decode each record, decide
it in the core, keep the run rows in step with the events, time out overdue runs, and say
which job states changed and which ended runs leave the changelog. It does no I/O and knows
no Kafka client: the live worker and `verify` drive the same task, so an audit re-decides
with exactly the code that decided.

Memory follows the work in flight: job types with an active or queued run stay parsed; idle
ones stay while they were used recently (`IdleStates`, bounded by the window entries they
hold) and otherwise leave after their batch (`evict_idle`), to be loaded back when a record
names them (`wanted_states` / `add_states`). A Bloom filter of stored job types spares a new
job type that lookup.
"""

from __future__ import annotations

import heapq
import logging
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

import structlog
from rbloom import Bloom

from schemas import DeadLetter, EventType, StatusEvent, ViewMark
from worker.core.config import JobsConfig
from worker.core.lifecycle import (
    AdvanceTime,
    Command,
    JobConfig,
    JobState,
    Limits,
    decide,
    decision_clock,
    load_state,
    next_deadline,
    overdue,
    stream_time,
)
from worker.core.limits import InputLimits
from worker.core.runs import RunRow, changed, new_row, run_change
from worker.engine import rulebook
from worker.engine.codec import (
    Bad,
    InputRecord,
    Reroute,
    dead_letter,
    dead_letter_key,
    decode,
)
from worker.engine.envelope import trace_of
from worker.engine.hold import InputHold
from worker.engine.staterows import Row, StateRows
from worker.settings import Settings

log = structlog.get_logger("worker")


class UnreadableState(Exception):
    """A job state read back from SQLite does not parse (a damaged window entry or head in
    a file whose pages are sound): damage of the file, confined to its partition, which a
    restore from the changelog mends; the records of the batch are not at fault."""

    def __init__(self, partition: int, job_type: str, error: str) -> None:
        super().__init__(f"the stored state of job type {job_type!r} does not parse: {error}")
        self.partition = partition
        self.job_type = job_type
        self.error = error


# Called through its descriptor: compiled, `t.timestamp()` looks the method up at each call.
_TIMESTAMP: Final = datetime.timestamp
# A compiled constant: read from its class, a member is looked up through a hook.
_PROGRESS: Final = EventType.PROGRESS


class Retained:
    """Ended runs still in the changelog, in the order they ended, until their tombstone.

    It holds a run for `JOBS_RUN_RETENTION_S` of broker time, so it grows with the history
    of that window: a run costs its ID and an 8-byte time here (a heap of (datetime, str)
    tuples cost about 180 bytes a run, 18 MB of a 100,000-run worker). Runs end in stream
    time order; when a producer's clock sends one back in time, it leaves with the run
    before it: never earlier than its retention, at most as late as that disorder.
    """

    def __init__(self) -> None:
        self._ended = array("d")  # POSIX seconds
        self._run_ids: list[str] = []
        self._head = 0  # entries before it are gone

    def add(self, ended_at: datetime, run_id: str) -> None:
        """Hold `run_id`, which ended at `ended_at`."""
        self._ended.append(_TIMESTAMP(ended_at))
        self._run_ids.append(run_id)

    def expire(self, horizon: datetime) -> list[str]:
        """The runs that ended at or before `horizon`, in order; they are no longer held."""
        limit = horizon.timestamp()
        ended, start = self._ended, self._head
        end = start
        while end < len(ended) and ended[end] <= limit:
            end += 1
        if end == start:
            return []
        gone = self._run_ids[start:end]
        self._head = end
        if end > len(ended) // 2:  # drop the expired part (amortized over what expired)
            del ended[:end]
            del self._run_ids[:end]
            self._head = 0
        return gone

    def __len__(self) -> int:
        return len(self._ended) - self._head


@dataclass
class BatchOutcome:
    """What processing one partition's batch produced."""

    events: list[StatusEvent] = field(default_factory=list)
    dead_letters: list[tuple[bytes | None, DeadLetter]] = field(default_factory=list)
    changed: dict[str, JobState] = field(default_factory=dict)
    before: dict[str, JobState] = field(default_factory=dict)  # of `changed`, as they were
    state_rows: list[Row] = field(default_factory=list)  # `changed`, changelog
    # SQLite's head rows (`stored.head`) of `changed`, where the changelog's are the same
    heads: dict[str, bytes | None] = field(default_factory=dict)
    # The window changes of `changed`, by job type (the changelog's entries, for SQLite)
    entries: list[tuple[str, bytes, int, bytes | None]] = field(default_factory=list)
    runs: dict[str, RunRow] = field(default_factory=dict)
    tombstones: list[str] = field(default_factory=list)
    reroutes: list[tuple[InputRecord, Reroute]] = field(default_factory=list)
    next_offsets: dict[str, int] = field(default_factory=dict)
    # Event ID -> (trace ID, flags) of the input that caused it, when it carried a traceparent.
    traces: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    settings: str = ""  # digest of the settings decided with: each event's `jobs-settings`
    # The changelog row of those settings, in the first batch an owner commits.
    settings_row: tuple[bytes, bytes] | None = None
    # Fresh changelog rows of the unended runs the batch left alone, and the view mark that
    # follows them (`schemas.ViewMark`); changelog only, SQLite has them already.
    view_rows: list[RunRow] = field(default_factory=list)
    view_mark: ViewMark | None = None

    def event_counts(self) -> dict[str, int]:
        """How many events of each type (its value) the batch made: compiled, for the
        metrics of every committed batch."""
        counts: dict[str, int] = {}
        for event in self.events:
            kind: str = event.__dict__["type"].value  # past pydantic's `__getattr__` hook
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    @property
    def empty(self) -> bool:
        """Whether there is nothing to publish or record."""
        return not (
            self.events
            or self.dead_letters
            or self.changed
            or self.runs
            or self.tombstones
            or self.reroutes
            or self.next_offsets
            or self.view_mark is not None
        )


@dataclass(frozen=True)
class Rules:
    """What every task of a worker decides with."""

    partitions: int  # of each topic
    jobs: JobsConfig
    limits: Limits
    input_limits: InputLimits
    retention: timedelta  # ended runs stay in the changelog this long
    # Longest time is held back for an input with unread records before going on.
    hold: timedelta = timedelta(seconds=5)
    # How far ahead of this worker's clock a record's broker time may move time.
    skew: timedelta = timedelta(seconds=60)
    # Testing only: called before each record is decided (to inject a failure).
    before_record: Callable[[InputRecord], None] | None = None

    # (digest, document) of these rules, as status events name them (`rulebook`); every
    # batch names them. Computed once here: mypyc compiles a `cached_property` of this
    # class as a plain property, which built the document again for each batch (7 µs).
    settings: tuple[str, bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        document = rulebook.document_of(self)
        object.__setattr__(self, "settings", (rulebook.digest_of(document), document))

    def config_for(self, job_type: str) -> JobConfig:
        """`jobs.for_job(job_type)`, compiled here: `JobsConfig`'s method is interpreted, and
        every decision asks."""
        jobs = self.jobs
        return jobs.job_types.get(job_type, jobs.defaults)


_VIEW_MARGIN = timedelta(seconds=5)
_KNOWN_CAPACITY = 250_000  # per partition at 1% false positives (~300 KB); more job types
# only raise the rate of needless reads


def known_filter(job_types: Iterable[str] = ()) -> Bloom:
    """A Bloom filter of stored job types."""
    known = Bloom(_KNOWN_CAPACITY, 0.01)
    known.update(job_types)
    return known


# What the idle job states a partition keeps parsed may hold by default
# (`JOBS_IDLE_STATE_ENTRIES`), in window entries (90-250 bytes each parsed, and up to 52
# more in the index of a long idempotency window; a state counts `_STATE_COST` more): at
# most about 5 MB, a dozen job types with full windows (1,256 entries) or a few thousand
# with short ones. Loading one with full windows back (SQLite,
# then parsing) took 2-3 ms, which a workload of a few busy job types paid on every start
# (`jobctl bench --growth 10`).
IDLE_BUDGET: int = Settings.model_fields["idle_state_entries"].default
_STATE_COST = 4  # a state's own objects, in entries


class IdleStates:
    """The idle job states a task keeps parsed, least recently used first out once they
    hold more than `budget` (window entries; `_STATE_COST` per state besides)."""

    def __init__(self, budget: int = IDLE_BUDGET) -> None:
        self.budget = budget
        self._costs: OrderedDict[str, int] = OrderedDict()
        self._held = 0

    def keep(self, job_type: str, state: JobState) -> list[str]:
        """Keep `job_type` (idle, as `state`) as the most recently used; returns the job
        types that leave to make room."""
        cost = _STATE_COST + len(state.decided) + len(state.ended)
        self._held += cost - self._costs.pop(job_type, 0)
        self._costs[job_type] = cost
        gone: list[str] = []
        while self._held > self.budget and self._costs:
            name, freed = self._costs.popitem(last=False)
            self._held -= freed
            gone.append(name)
        return gone

    def drop(self, job_type: str) -> None:
        """`job_type` is busy again (or gone): it no longer counts."""
        self._held -= self._costs.pop(job_type, 0)

    def evict(self, jobs: dict[str, JobState | bytes], job_types: Iterable[str]) -> None:
        """Of `job_types` in `jobs` (a task's), keep the idle ones as recently used, drop
        the busy ones from the count, and let what leaves the budget, and any state left
        serialized, leave `jobs`."""
        for job_type in job_types:
            held = jobs.get(job_type)
            if held is None:
                continue
            if isinstance(held, bytes):
                del jobs[job_type]
            elif held.active or held.queue:
                self.drop(job_type)
            else:
                for gone in self.keep(job_type, held):
                    kept = jobs.get(gone)
                    if kept is not None and _idle(kept):
                        del jobs[gone]

    def __len__(self) -> int:
        return len(self._costs)


def _idle(held: JobState | bytes) -> bool:
    """Whether a job type has no active or queued run (its state can live in SQLite alone)."""
    return isinstance(held, bytes) or not (held.active or held.queue)


class ViewMarks:
    """When a partition writes its view mark (`schemas.ViewMark`), and what goes with it."""

    def __init__(self) -> None:
        self.refresh: timedelta | None = None  # None: never
        self.marked: datetime | None = None  # the wall-clock time of the last one committed

    def due(self, now: datetime) -> bool:
        """Whether the next mark is due at `now` (the first one at once)."""
        if self.refresh is None:
            return False
        return self.marked is None or now - self.marked >= self.refresh

    def mark(self, outcome: BatchOutcome, runs: dict[str, RunRow], now: datetime) -> None:
        """When due: a fresh row of every running and queued run not already in the batch,
        then the mark. Committed together, they let a reader start at the mark's `since`."""
        if self.refresh is None or not self.due(now):
            return
        outcome.view_rows = [row for run_id, row in runs.items() if run_id not in outcome.runs]
        # Back by a margin: the rows are stamped when appended, after `now`, by this clock,
        # which may step back a little meanwhile.
        since = now - _VIEW_MARGIN
        outcome.view_mark = ViewMark(since=since, every_s=self.refresh.total_seconds())

    def committed(self, mark: ViewMark) -> None:
        """A batch carrying `mark` is committed: the next one is due a period later."""
        self.marked = mark.since + _VIEW_MARGIN


class PartitionTask:
    """The owner's view of one partition: its job states, active runs and deadlines."""

    def __init__(
        self,
        number: int,
        rules: Rules,
        *,
        jobs: dict[str, JobState] | None = None,
        runs: Iterable[RunRow] = (),
        retained: Retained | None = None,
        applied: dict[str, int] | None = None,
        known: Bloom | None = None,
    ) -> None:
        self.number = number
        self.rules = rules
        # Job types with an active or queued run, plus idle ones a batch has loaded
        # (serialized in `dump_state`'s shape, or as queued for SQLite) until `evict_idle`.
        self.runs = {r.run_id: r for r in runs}  # running and queued runs, by run ID
        self.rows = StateRows(self.runs)
        self.jobs: dict[str, JobState | bytes] = {
            job_type: self.rows.loaded(job_type, state) for job_type, state in (jobs or {}).items()
        }
        self.idle = IdleStates()
        self.retained = retained if retained is not None else Retained()
        self.applied = dict(applied or {})  # input topic -> next offset to apply
        self.known = known if known is not None else known_filter()
        self.stream_time: datetime | None = None  # highest broker time seen
        self.seen: dict[str, datetime] = {}  # input role -> highest broker time seen
        self._held_since: datetime | None = None  # when time was first held back
        # Records fetched but waiting for the other input to catch up to their broker time;
        # dropped when the consumer is re-positioned (it fetches them again).
        self.hold = InputHold(number)
        # A heap of (deadline, job type), at most one live entry per job type (`_in_heap`):
        # a deadline that moves later (every heartbeat) pushes nothing; its old entry, when
        # it comes up, puts the job type back at its real deadline.
        self.deadlines: list[tuple[datetime, str]] = []
        self._in_heap: dict[str, datetime] = {}
        for job_type, state in self.jobs.items():
            if isinstance(state, JobState) and (deadline := next_deadline(state)) is not None:
                self._push(job_type, deadline)
        self._log = log.bind(partition=number)
        self._debug = bool(self._log.is_enabled_for(logging.DEBUG))
        # No warnings about input records: `verify` re-decides records long decided.
        self.quiet = False
        self.settings_logged = False  # set once a batch with the settings row is committed
        self.view = ViewMarks()  # off until the engine sets its period (`verify` never)

    # -- live batches ----------------------------------------------------------------------

    def wanted_states(self, records: Sequence[InputRecord]) -> list[str]:
        """The stored job types `records` are about that are not in memory.

        Every record that can change a job type's state is keyed by that job type (others
        are dead-lettered or re-routed), so the keys name every state a batch can change.
        """
        keys = {r.key for r in records if r.key is not None}
        names = (k.decode("utf-8", "replace") for k in keys)
        return [j for j in names if j not in self.jobs and j in self.known]

    def add_states(self, states: dict[str, JobState | bytes]) -> None:
        """Hold loaded job states (serialized, or as queued for SQLite) until `evict_idle`."""
        self.jobs.update(states)

    def evict_idle(self, job_types: Iterable[str]) -> None:
        """Of `job_types`, keep the idle ones recently used (`IdleStates`) and let the rest,
        and any left serialized, leave memory."""
        self.idle.evict(self.jobs, job_types)

    def apply(
        self,
        records: Sequence[InputRecord],
        wall_clock: datetime | None = None,
        lagging: frozenset[str] = frozenset(),
        wait: bool = True,
        queued: Sequence[InputRecord] = (),
    ) -> BatchOutcome:
        """Decide `records` (in decision order), then time out what is due.

        A record waits (`held`) while the other input has an earlier record queued for a
        later batch (`queued`) or not yet fetched (`lagging`), for at most `Rules.hold`
        (`wait=False`: as given, after a failure). Time is the stream time, held back
        likewise and never past a queued record, or an idle partition's tick (`wall_clock`)
        once both inputs are read. A batch that fails to commit is thrown away whole."""
        outcome = BatchOutcome()
        now = datetime.now(UTC)
        if wait:
            records = self.hold.ready(records, lagging, now, self.rules.hold, queued)
        for record in records:
            self.decide_record(record, outcome, now)
        first = min((r.at for r in queued), default=None)  # decided before any time-out
        clock = decision_clock(self._time(lagging, now), None if lagging else wall_clock, first)
        if clock is not None:
            self.time_out(clock, outcome)
        self.close_batch(outcome)
        return outcome

    @property
    def held(self) -> list[InputRecord]:
        """Records fetched but waiting for the other input (`InputHold`)."""
        return self.hold.records

    def _time(self, lagging: frozenset[str], now: datetime) -> datetime | None:
        """The stream time, held back for a lagging input no longer than `Rules.hold`."""
        held = stream_time(self.seen, lagging)
        if held == self.stream_time:
            self._held_since = None
            return held
        if self._held_since is None:
            self._held_since = now
        elif now - self._held_since > self.rules.hold:
            self._log.warning(
                "time held back too long for an input with unread records; going on",
                lagging=sorted(lagging),
                held_seconds=round((now - self._held_since).total_seconds(), 1),
            )
            self._held_since = None
            return self.stream_time
        return held

    def due(self, now: datetime) -> bool:
        """Whether a deadline of this partition may have passed at `now`, held records have
        waited long enough, or a view mark is due."""
        return (
            (bool(self.deadlines) and self.deadlines[0][0] <= now)
            or self.hold.too_long(now, self.rules.hold)
            or self.view.due(now)
        )

    def unprocessable(self, record: InputRecord, message: str, *, copy: bool) -> BatchOutcome:
        """Skip `record` with a dead letter (`unprocessable`): its offset moves on, no state
        changes."""
        letter = dead_letter(record, "unprocessable", message, datetime.now(UTC), copy=copy)
        next_offset = record.offset + 1
        self.applied[record.topic] = next_offset
        return BatchOutcome(
            dead_letters=[(dead_letter_key(record), letter)],
            next_offsets={record.topic: next_offset},
        )

    # -- one decision path (live and verify) -----------------------------------------------

    def decide_record(
        self, record: InputRecord, outcome: BatchOutcome, now: datetime | None = None
    ) -> None:
        """Decode and decide one record: its dead letter, re-route or events go to `outcome`.

        `now` is the wall-clock time a dead letter is stamped with.
        """
        if record.offset < self.applied.get(record.topic, 0):
            return  # already applied (at_least_once after a restart)
        # The highest offset: broker times (CreateTime) need not follow offsets.
        next_offset = outcome.next_offsets.get(record.topic, 0)
        outcome.next_offsets[record.topic] = max(next_offset, record.offset + 1)
        if self.rules.before_record is not None:
            self.rules.before_record(record)
        at = record.at
        ahead = (now or datetime.now(UTC)) + self.rules.skew
        if at > ahead:
            # A broker clock stepped far forward (a leader on a wrong clock): such a record
            # moves time no further than this worker's clock allows, or every run of the
            # partition would time out at once.
            if not self.quiet:
                self._log.warning(
                    "record stamped ahead of this worker's clock; time moves only to the clock",
                    offset=record.offset,
                    topic=record.topic,
                    stamped=at.isoformat(),
                )
            at = ahead
        if self.stream_time is None or at > self.stream_time:
            self.stream_time = at
        seen = self.seen.get(record.role)
        if seen is None or at > seen:
            self.seen[record.role] = at
        decoded = decode(
            record,
            partitions=self.rules.partitions,
            limits=self.rules.input_limits,
            now=now or datetime.now(UTC),
        )
        if isinstance(decoded, Reroute):
            outcome.reroutes.append((record, decoded))
            return
        command: Command
        if isinstance(decoded, Bad):
            letter = decoded.dead_letter
            outcome.dead_letters.append((dead_letter_key(record), letter))
            if not self.quiet:
                self._log.warning(
                    "dead-lettered",
                    code=letter.reason.code,
                    reason=letter.reason.message,
                    offset=record.offset,
                    topic=record.topic,
                )
            if decoded.reject is None:
                return
            command = decoded.reject
        else:
            command = decoded
        self.advance(command.job_type, at, outcome)
        caused = len(outcome.events)
        self._decide(command, outcome)
        if record.headers and (trace := trace_of(record.headers)) is not None:
            for event in outcome.events[caused:]:
                outcome.traces[event.event_id] = trace

    def advance(self, job_type: str, now: datetime, outcome: BatchOutcome) -> None:
        """Time out the overdue runs of `job_type` at `now`, if it has any."""
        held = self.jobs.get(job_type)
        if isinstance(held, bytes):
            return  # idle: no run, no deadline
        if overdue(held, now):
            self._decide(AdvanceTime(job_type, now), outcome)

    def time_out(self, now: datetime, outcome: BatchOutcome) -> None:
        """Time out every overdue run of the partition at `now`."""
        while self.deadlines and self.deadlines[0][0] <= now:
            at, job_type = heapq.heappop(self.deadlines)
            if self._in_heap.get(job_type) != at:
                continue  # an entry an earlier deadline of the job type replaced
            del self._in_heap[job_type]
            self.advance(job_type, now, outcome)
            held = self.jobs.get(job_type)
            if isinstance(held, JobState) and (deadline := next_deadline(held)) is not None:
                self._push(job_type, deadline)

    def _push(self, job_type: str, deadline: datetime) -> None:
        """Make sure the heap comes to `job_type` by `deadline`."""
        current = self._in_heap.get(job_type)
        if current is None or deadline < current:
            heapq.heappush(self.deadlines, (deadline, job_type))
            self._in_heap[job_type] = deadline

    def close_batch(self, outcome: BatchOutcome) -> None:
        """Settle a batch: applied offsets, serialized states, tombstones due, and the
        settings decided with (their row until a batch carrying it is committed)."""
        self.applied.update(outcome.next_offsets)
        digest, document = self.rules.settings
        outcome.settings = digest
        if not self.settings_logged and (outcome.events or outcome.changed):
            outcome.settings_row = rulebook.settings_row(digest, document)
        for job_type, state in outcome.changed.items():
            rows, changes, head = self.rows.of(job_type, outcome.before[job_type], state)
            outcome.state_rows.extend(rows)
            outcome.heads[job_type] = head
            outcome.entries.extend((job_type, *change) for change in changes)
        self.known.update(outcome.changed)
        if self.stream_time is not None:
            horizon = self.stream_time - self.rules.retention
            outcome.tombstones.extend(self.retained.expire(horizon))
        self.view.mark(outcome, self.runs, datetime.now(UTC))

    def state_of(self, job_type: str) -> JobState:
        """The job type's state, parsed (a new one for an unknown job type)."""
        held = self.jobs.get(job_type)
        if held is None:
            return JobState(job_type)
        if isinstance(held, bytes):
            return self.rows.loaded(job_type, _parsed(self.number, job_type, held))
        return held

    def _decide(self, command: Command, outcome: BatchOutcome) -> None:
        job_type = command.job_type
        state = self.state_of(job_type)
        config = self.rules.config_for(job_type)
        new_state, events = decide(state, command, config, self.rules.limits)
        if new_state is not state:
            self.jobs[job_type] = new_state
            outcome.changed[job_type] = new_state
            outcome.before.setdefault(job_type, state)
            deadline = next_deadline(new_state)
            if deadline is not None:
                self._push(job_type, deadline)
        for event in events:
            self._track_run(outcome, event)
            if self._debug:  # its arguments cost more than the line not logged
                _log_decided(self._log, event)
        outcome.events.extend(events)

    def _track_run(self, outcome: BatchOutcome, event: StatusEvent) -> None:
        """Keep the run rows (changelog and SQLite) in step with an event."""
        run_id = event.__dict__["run_id"]  # past pydantic's `__getattr__` hook (`built`)
        if run_id is None:
            return
        if (row := new_row(event, self.number)) is not None:  # started or queued
            self.runs[run_id] = outcome.runs[run_id] = row
            return
        change = run_change(event)
        active = self.runs.get(run_id)
        if change is None or active is None:
            return  # a run queued before queued runs had rows, cancelled before it started
        row = changed(active, change)
        outcome.runs[run_id] = row
        if event.__dict__["type"] is _PROGRESS:
            self.runs[run_id] = row
        else:
            del self.runs[run_id]
            self.retained.add(event.occurred_at, run_id)


def _parsed(number: int, job_type: str, held: bytes) -> JobState:
    """A state read back from SQLite, parsed; one that does not parse raises
    `UnreadableState`: the file's damage, not the batch's records'."""
    try:
        return load_state(held)
    except ValueError as exc:
        raise UnreadableState(number, job_type, str(exc)) from None


def _log_decided(logger: structlog.typing.FilteringBoundLogger, event: StatusEvent) -> None:
    logger.debug(
        "decided",
        type=event.type,
        job_type=event.job_type,
        run_id=event.run_id,
        offset=event.source.offset if event.source else None,
    )
