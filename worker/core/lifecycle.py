"""The pure lifecycle core: every decision about job runs, with no I/O, clock or Kafka types.

Theory of operation:

1. All records about a job type share one key and so one partition; every decision about a
   job type depends only on that job type's state and configuration. The core therefore
   works on one `JobState` at a time: ``decide(state, command, config) -> Decision``.
2. Time and the coordinates of the record that caused a command come in with the command.
   Run IDs are made from them (see `worker.core.runid`), so replaying the same commands gives the
   same run IDs, states and events. Time passes only through `AdvanceTime`.
3. Every change of a run's status is a row of `TRANSITIONS`: (status before, action) ->
   (status after, event type). A command whose move is not in the table yields one
   `rejected` event and leaves the state unchanged; bad input is data, not a crash.
4. A scope (the job type, or the job type and client) has at most one active run. A start
   while one is active follows the job type's policy: `reject` (a `refused` event naming the
   active run), `queue` (`queued` now, `started` in FIFO order when the scope frees up) or
   `replace` (the active run ends `cancelled`, the new one starts).
5. A request ID seen within the idempotency window is answered with `duplicate`, carrying
   the original decision; it never changes state.
6. A result, progress report or cancel names its run. An unknown run, a run of another job
   type, a run that has already ended are all `rejected`; a command never touches another
   run's state.
7. A run with a timeout must report (result, progress or heartbeat) before its deadline;
   `AdvanceTime(now)` ends overdue runs `timed_out`. Progress and heartbeats renew the
   deadline; a heartbeat (progress without metrics) changes nothing else and emits nothing.
   A run whose deadline passed before a record about its job type arrived times out before
   that record is decided (`overdue`). Time reaches a partition as its stream time (the
   broker time of its records, held back to what an input with unread records has shown:
   `stream_time`) or, for an idle partition whose inputs are both read, the wall clock when
   that is later (`decision_clock`).
8. A job type's active and queued runs together hold at most `Limits.run_bytes` (each run
   counts `Start.size`, what its request took on the wire, with room for its IDs); a start
   that would go over is `rejected`, so no producer can grow a job type's state past what
   one changelog record can carry.
9. Records of one input partition are decided in offset order, whatever their timestamps
   (a broker clock stepping back reorders nothing); the two inputs are merged by broker
   time, requests first at equal times (`merge_inputs`).
10. Each event gets an ID derived from its cause (source coordinates or the time advance, and
   its position among the command's events), so the same input always yields the same IDs.
"""

from __future__ import annotations

import hashlib
import heapq
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final, NamedTuple, Protocol, TypeVar

from pydantic import BaseModel

from schemas import EventType, RunStatus, Source, StatusEvent
from worker.core.jobstate import (
    Decided as Decided,
    EndedRun as EndedRun,
    JobState as JobState,
    Queued as Queued,
    Run as Run,
    dump_state as dump_state,
    load_state as load_state,
)
from worker.core.runid import InvalidRunId, make_run_id, normalize_run_id
from worker.core.values import Value

_EVENT_NAMESPACE = uuid.UUID("6f1f4c1e-8a53-4f4f-9a4e-2a0d3c9b7e11")
_NAMESPACE_SHA1 = hashlib.sha1(_EVENT_NAMESPACE.bytes)
# Its methods called through their descriptors: compiled, `sha1.copy()` looks the method up
# by name at each call (the same for `Retained`'s and the run IDs' `datetime.timestamp`).
_SHA1_COPY: Final = type(_NAMESPACE_SHA1).copy
_SHA1_UPDATE: Final = type(_NAMESPACE_SHA1).update
_SHA1_HEXDIGEST: Final = type(_NAMESPACE_SHA1).hexdigest
# An RFC 4122 variant's first hex digit (binary 10xx) for each first digit of a hash.
_VARIANT: Final = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


class Action(StrEnum):
    """What a command asks of a run."""

    START = "start"  # create a run and start it
    ENQUEUE = "enqueue"  # create a run that waits for its scope to free up
    DEQUEUE = "dequeue"  # start a queued run
    COMPLETE = "complete"  # the executor reports success
    FAIL = "fail"  # the executor reports failure
    CANCEL = "cancel"  # a cancel request, or a replacing start
    PROGRESS = "progress"  # the executor reports progress metrics
    TIME_OUT = "time_out"  # the deadline passed without a report


# (status before, or None for "no run yet", action) -> (status after, event emitted)
TRANSITIONS: dict[tuple[RunStatus | None, Action], tuple[RunStatus, EventType]] = {
    (None, Action.START): (RunStatus.RUNNING, EventType.STARTED),
    (None, Action.ENQUEUE): (RunStatus.QUEUED, EventType.QUEUED),
    (RunStatus.QUEUED, Action.DEQUEUE): (RunStatus.RUNNING, EventType.STARTED),
    (RunStatus.QUEUED, Action.CANCEL): (RunStatus.CANCELLED, EventType.CANCELLED),
    (RunStatus.RUNNING, Action.COMPLETE): (RunStatus.COMPLETED, EventType.COMPLETED),
    (RunStatus.RUNNING, Action.FAIL): (RunStatus.FAILED, EventType.FAILED),
    (RunStatus.RUNNING, Action.CANCEL): (RunStatus.CANCELLED, EventType.CANCELLED),
    (RunStatus.RUNNING, Action.PROGRESS): (RunStatus.RUNNING, EventType.PROGRESS),
    (RunStatus.RUNNING, Action.TIME_OUT): (RunStatus.TIMED_OUT, EventType.TIMED_OUT),
}


class Policy(StrEnum):
    """What a start does while its scope has an active run."""

    REJECT = "reject"  # refuse the start, naming the active run
    QUEUE = "queue"  # queue the start; FIFO when the scope frees up
    REPLACE = "replace"  # cancel the active run and start the new one


class Scope(StrEnum):
    """What "at most one active run" counts over."""

    JOB_TYPE = "job_type"  # one run per job type
    JOB_TYPE_CLIENT = "job_type+client"  # one run per job type and client ID


# The members the rules read on every transition, in compiled constants: read from their
# classes, each is looked up through `EnumType`'s `__getattr__` hook, at several hundred
# instructions a read.
_JOB_TYPE_CLIENT: Final = Scope.JOB_TYPE_CLIENT
_REJECT: Final = Policy.REJECT
_QUEUE: Final = Policy.QUEUE
_REPLACE: Final = Policy.REPLACE
_START: Final = Action.START
_COMPLETE: Final = Action.COMPLETE
_FAIL: Final = Action.FAIL
_QUEUED_RUN: Final = RunStatus.QUEUED
_COMPLETED_RUN: Final = RunStatus.COMPLETED
_REJECTED: Final = EventType.REJECTED


@dataclass(frozen=True, slots=True)
class JobConfig:
    """Per-job-type settings (the TOML file's `[job_types.NAME]` or `[defaults]`)."""

    policy: Policy = Policy.REJECT
    scope: Scope = Scope.JOB_TYPE
    timeout: timedelta | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on the state kept per job type."""

    ended_window: int = 256
    idempotency_window: int = 1000
    run_bytes: int = 393_216  # what active and queued runs of a job type may hold together


class Start(Value):
    """Start a run of `job_type` (requests topic, kind `start`); `size` is what the run will
    hold in the state (see `run_size`)."""

    FIELDS = (
        "request_id",
        "job_type",
        "client_id",
        "initial_data",
        "at",
        "source",
        "size",
    )
    __slots__ = FIELDS

    def __init__(
        self,
        request_id: str,
        job_type: str,
        client_id: str | None,
        initial_data: Mapping[str, Any],
        at: datetime,
        source: Source,
        size: int = 0,
    ) -> None:
        self.request_id: Final = request_id
        self.job_type: Final = job_type
        self.client_id: Final = client_id
        self.initial_data: Final = initial_data
        self.at: Final = at
        self.source: Final = source
        self.size: Final = size


class Cancel(Value):
    """Cancel a run by ID, or the active run of a scope (requests topic, kind `cancel`)."""

    FIELDS = ("request_id", "job_type", "client_id", "run_id", "reason", "at", "source")
    __slots__ = FIELDS

    def __init__(
        self,
        request_id: str,
        job_type: str,
        client_id: str | None,
        run_id: str | None,
        reason: str | None,
        at: datetime,
        source: Source,
    ) -> None:
        self.request_id: Final = request_id
        self.job_type: Final = job_type
        self.client_id: Final = client_id
        self.run_id: Final = run_id
        self.reason: Final = reason
        self.at: Final = at
        self.source: Final = source


class Finish(Value):
    """An executor's result for `run_id`: COMPLETED or FAILED, with its final metrics."""

    FIELDS = ("job_type", "run_id", "status", "metrics", "request_id", "at", "source")
    __slots__ = FIELDS

    def __init__(
        self,
        job_type: str,
        run_id: str,
        status: RunStatus,
        metrics: Mapping[str, Any],
        request_id: str | None,
        at: datetime,
        source: Source,
    ) -> None:
        self.job_type: Final = job_type
        self.run_id: Final = run_id
        self.status: Final = status
        self.metrics: Final = metrics
        self.request_id: Final = request_id
        self.at: Final = at
        self.source: Final = source


class Progress(Value):
    """An executor's progress report; `metrics=None` is a heartbeat."""

    FIELDS = ("job_type", "run_id", "metrics", "request_id", "at", "source")
    __slots__ = FIELDS

    def __init__(
        self,
        job_type: str,
        run_id: str,
        metrics: Mapping[str, Any] | None,
        request_id: str | None,
        at: datetime,
        source: Source,
    ) -> None:
        self.job_type: Final = job_type
        self.run_id: Final = run_id
        self.metrics: Final = metrics
        self.request_id: Final = request_id
        self.at: Final = at
        self.source: Final = source


class AdvanceTime(Value):
    """Time has reached `now` for this job type: overdue runs time out."""

    FIELDS = ("job_type", "now")
    __slots__ = FIELDS

    def __init__(self, job_type: str, now: datetime) -> None:
        self.job_type: Final = job_type
        self.now: Final = now


class Reject(Value):
    """An input the shell could not turn into a command, but whose sender can be told."""

    FIELDS = ("job_type", "request_id", "run_id", "reason", "at", "source")
    __slots__ = FIELDS

    def __init__(
        self,
        job_type: str,
        request_id: str | None,
        run_id: str | None,
        reason: str,
        at: datetime,
        source: Source,
    ) -> None:
        self.job_type: Final = job_type
        self.request_id: Final = request_id
        self.run_id: Final = run_id
        self.reason: Final = reason
        self.at: Final = at
        self.source: Final = source


Command = Start | Cancel | Finish | Progress | AdvanceTime | Reject


class Decision(NamedTuple):
    """The state after a command and the events it caused."""

    state: JobState
    events: tuple[StatusEvent, ...]


_NEW_TUPLE: Final = tuple.__new__


class Arrival(Protocol):
    """What the decision order needs to know of an input record."""

    @property
    def timestamp_ms(self) -> int:
        """Broker time of the record, milliseconds since the epoch."""

    @property
    def role(self) -> str:
        """`requests` or `results`: the input topic it came from."""

    @property
    def offset(self) -> int:
        """Its offset in that topic's partition."""


A = TypeVar("A", bound=Arrival)
T = TypeVar("T")


def merge_inputs(records: Iterable[A]) -> list[A]:
    """Rule 9: a partition's records of both inputs in the order they are decided."""
    by_role: dict[str, list[A]] = {"requests": [], "results": []}
    for record in records:
        by_role.setdefault(record.role, []).append(record)
    present = [inputs for inputs in by_role.values() if inputs]
    for inputs in present:
        inputs.sort(key=lambda r: r.offset)
    if len(present) == 1:
        return present[0]
    if len(present) == 2:
        return _merged(present[0], present[1])
    return list(heapq.merge(*present, key=_arrival))


def _arrival(record: Arrival) -> tuple[int, bool]:
    """Where a record stands in the decision order: by broker time, a request before a
    result of the same millisecond."""
    return record.timestamp_ms, record.role != "requests"


def _merged(first: list[A], second: list[A]) -> list[A]:
    """`heapq.merge(first, second, key=_arrival)` of two non-empty lists, without its
    generator and heap: the smaller head goes next, `first`'s on a tie."""
    merged: list[A] = []
    i = j = 0
    a, b = _arrival(first[0]), _arrival(second[0])  # each head's key, made once
    while True:
        if a <= b:
            merged.append(first[i])
            i += 1
            if i == len(first):
                break
            a = _arrival(first[i])
        else:
            merged.append(second[j])
            j += 1
            if j == len(second):
                break
            b = _arrival(second[j])
    merged.extend(first[i:])
    merged.extend(second[j:])
    return merged


def next_deadline(state: JobState) -> datetime | None:
    """The earliest deadline of an active run of `state`, if any."""
    earliest: datetime | None = None
    for run in state.active:
        deadline = run.deadline
        if deadline is not None and (earliest is None or deadline < earliest):
            earliest = deadline
    return earliest


def overdue(state: JobState | None, now: datetime) -> bool:
    """Rule 7: whether a run of `state` is past its deadline at `now`, so it times out
    before anything else is decided at `now`."""
    if state is None:
        return False
    deadline = next_deadline(state)
    return deadline is not None and deadline <= now


def stream_time(seen: Mapping[str, datetime], lagging: Iterable[str] = ()) -> datetime | None:
    """Rule 7: how far time has come on a partition, from the latest broker time decided of
    each input (`seen`). While an input still has records to read (`lagging`), time goes
    no further than what that input has shown, so no run times out ahead of a report that
    has not been read yet."""
    behind = list(lagging)
    if not behind:
        return max(seen.values(), default=None)
    shown = [seen.get(role) for role in behind]
    if any(t is None for t in shown):
        return None  # nothing read of a lagging input yet: time cannot move
    return min(t for t in shown if t is not None)


def decision_clock(
    stream_time: datetime | None, wall_clock: datetime | None, queued: datetime | None = None
) -> datetime | None:
    """Rule 7: what time a partition's time-outs are decided at: its stream time, or the wall
    clock of an idle partition's tick when that is later; never past the earliest record
    fetched for a later batch (`queued`), which is decided first."""
    clock = stream_time
    if wall_clock is not None and (stream_time is None or wall_clock > stream_time):
        clock = wall_clock
    if clock is not None and queued is not None and queued < clock:
        return queued
    return clock


def event_id(source: Source, index: int) -> str:
    """A deterministic event ID: the same cause always gets the same ID."""
    return _event_id(f"{source.topic}/{source.partition}/{source.offset}", index)


def _event_id(cause: str, index: int) -> str:
    """`str(uuid.uuid5(_EVENT_NAMESPACE, f"{cause}/{index}"))`, in a fifth of the time: the
    namespace's hash state copied rather than OpenSSL's SHA-1 looked up again, and the
    version and variant digits set in the hex text."""
    sha1 = _SHA1_COPY(_NAMESPACE_SHA1)
    _SHA1_UPDATE(sha1, f"{cause}/{index}".encode())
    h: str = _SHA1_HEXDIGEST(sha1)
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


def scope_key(config: JobConfig, client_id: str | None) -> str:
    """The scope a request with `client_id` counts against. Client IDs are compared as run
    IDs spell them (trimmed, lower case): `Acme` and `acme` share one scope, as they share
    one run-ID suffix."""
    if config.scope is not _JOB_TYPE_CLIENT or not client_id:
        return ""
    return client_id.strip().lower()


def _in_scope(held: str, scope: str) -> bool:
    # States written before scopes were lower-cased hold the client ID as it was sent.
    return held == scope or held.strip().lower() == scope


def _active_in(state: JobState, scope: str) -> Run | None:
    return next((r for r in state.active if _in_scope(r.scope, scope)), None)


W = TypeVar("W", StatusEvent, Source)
_NEW = object.__new__
# `BaseModel`'s slots, set through their descriptors: `object.__setattr__(m, name, v)` looks
# the name up in the model's type first, which costs half as much again.
_SET_DICT: Final = BaseModel.__dict__["__dict__"].__set__
_SET_FIELDS_SET: Final = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_SET_EXTRA: Final = BaseModel.__dict__["__pydantic_extra__"].__set__
_SET_PRIVATE: Final = BaseModel.__dict__["__pydantic_private__"].__set__


class ModelFields:
    """The set of a wire model's field names, for `built`."""

    def __init__(self, model: type[StatusEvent] | type[Source]) -> None:
        self.names: set[str] = set(model.model_fields)


def built(model: type[W], known: ModelFields, values: dict[str, Any]) -> W:
    """A `model` holding `values`, which names every field of the model (`known`, the
    model's), in its order: what `model.model_construct(**values)` makes, in a seventh of
    its time, save that every field counts as set (`model_fields_set`).

    For the sources and status events the worker makes from values it has typed and
    checked already (validating them from their fields took 1.6 µs an event, twice this):
    no validation, so no copy of the dict either. `tests/test_lifecycle_properties.py`
    checks that every event the rules make, and its source, is the one validation makes of
    its fields, with every field in order. Every model built shares one set as its
    `model_fields_set`: these models are frozen, so pydantic never changes it in place (a
    copy of a model gets a copy), and one set an event fewer is one object fewer for each
    young garbage collection to walk.

    The hot path reads such a model's fields from its `__dict__` (this `values`), not as
    attributes: `BaseModel` defines `__getattr__`, so CPython reads each attribute through
    its slower hook.
    """
    instance = _NEW(model)
    _SET_DICT(instance, values)
    _SET_FIELDS_SET(instance, known.names)
    _SET_EXTRA(instance, None)
    _SET_PRIVATE(instance, None)
    return instance


EVENT_FIELDS = ModelFields(StatusEvent)


class _Out:
    """Collects one command's events, numbering them for their IDs."""

    def __init__(self, cause: str, at: datetime, source: Source | None) -> None:
        self.cause = cause
        self.at = at
        self.source = source
        self.events: list[StatusEvent] = []

    def emit(
        self,
        type: EventType,
        job_type: str,
        *,
        status: RunStatus | None = None,
        from_status: RunStatus | None = None,
        request_id: str | None = None,
        client_id: str | None = None,
        run_id: str | None = None,
        reason: str | None = None,
        metrics: dict[str, Any] | None = None,
        initial_data: dict[str, Any] | None = None,
        started_at: datetime | None = None,
        original_type: EventType | None = None,
    ) -> StatusEvent:
        """The event of this command's next decision, every field of it named here in
        `StatusEvent`'s order (`built`), not gathered from keywords into a dict first."""
        values: dict[str, Any] = {
            "event_id": _event_id(self.cause, len(self.events)),
            "type": type,
            "status": status,
            "from_status": from_status,
            "request_id": request_id,
            "job_type": job_type,
            "client_id": client_id,
            "run_id": run_id,
            "reason": reason,
            "metrics": metrics,
            "initial_data": initial_data,
            "started_at": started_at,
            "original_type": original_type,
            "occurred_at": self.at,
            "source": self.source,
        }
        event = built(StatusEvent, EVENT_FIELDS, values)
        self.events.append(event)
        return event


def _out_for(command: Command, state: JobState) -> _Out:
    if isinstance(command, AdvanceTime):
        # Named after the runs it times out, each of which times out once: two advances to
        # the same time (the two input topics' broker times interleave) get distinct IDs.
        due = sorted(
            r.run_id for r in state.active if r.deadline is not None and r.deadline <= command.now
        )
        cause = f"advance/{command.job_type}/{command.now.isoformat()}/{','.join(due)}"
        return _Out(cause, command.now, None)
    s = command.source
    at = s.__dict__  # its fields, past pydantic's `__getattr__` hook (`built`)
    return _Out(f"{at['topic']}/{at['partition']}/{at['offset']}", command.at, s)


def decide(
    state: JobState,
    command: Command,
    config: JobConfig = JobConfig(),
    limits: Limits = Limits(),
) -> Decision:
    """Apply one command to one job type's state."""
    if command.job_type != state.job_type:
        raise ValueError(f"command for {command.job_type!r} given state of {state.job_type!r}")
    out = _out_for(command, state)
    if isinstance(command, AdvanceTime):
        new = _advance(state, command.now, config, limits, out)
    elif isinstance(command, Reject):
        out.emit(
            EventType.REJECTED,
            command.job_type,
            request_id=command.request_id,
            run_id=command.run_id,
            reason=command.reason,
        )
        new = state
    elif (
        isinstance(command, Start | Cancel)
        and (seen := _decided(state, command.request_id, isinstance(command, Start))) is not None
    ):
        out.emit(
            EventType.DUPLICATE,
            command.job_type,
            request_id=command.request_id,
            client_id=command.client_id,
            run_id=seen.run_id,
            original_type=seen.type,
            status=_status_of(state, seen.run_id),
            reason=f"request {command.request_id} was already decided: {seen.type}",
        )
        new = state
    elif isinstance(command, Start):
        new = _remember(_start(state, command, config, limits, out), command, out, limits)
    elif isinstance(command, Cancel):
        new = _remember(_cancel(state, command, config, limits, out), command, out, limits)
    elif isinstance(command, Finish):
        new = _finish(state, command, config, limits, out)
    else:
        new = _progress(state, command, config, limits, out)
    # As `Decision(...)` makes it, without the named tuple's `__new__`, which is interpreted.
    return _NEW_TUPLE(Decision, (new, tuple(out.events)))


# -- helpers ------------------------------------------------------------------------------------


def _move(before: RunStatus | None, action: Action) -> tuple[RunStatus, EventType] | None:
    """Rule 3: the only place that says whether a move is legal."""
    return TRANSITIONS.get((before, action))


def _illegal(before: RunStatus | None, action: Action) -> str:
    return f"{action.value} is not allowed for a run that is {before or 'not yet created'}"


def _decided(state: JobState, request_id: str, start: bool = False) -> Decided | None:
    """The decision `request_id` got: from the idempotency window or, for a start, from the
    active or queued run it made, however long ago (a start is never a second run)."""
    seen = _in_window(state, request_id)
    if seen is not None or not start:
        return seen
    if (run := next((r for r in state.active if r.request_id == request_id), None)) is not None:
        answer = EventType.QUEUED if run.was_queued else EventType.STARTED
        return Decided(request_id, answer, run.run_id)
    if (waiting := next((q for q in state.queue if q.request_id == request_id), None)) is not None:
        return Decided(request_id, EventType.QUEUED, waiting.run_id)
    return None


_START_ANSWERS: Final = frozenset({EventType.STARTED, EventType.QUEUED, EventType.REFUSED})


def _remember(state: JobState, command: Start | Cancel, out: _Out, limits: Limits) -> JobState:
    """Record the request's decision (its first event) in the idempotency window.

    A rejection is not recorded: an input that cannot apply leaves the state unchanged.
    """
    first = out.events[0].__dict__  # its fields, past pydantic's `__getattr__` hook (`built`)
    if first["type"] is _REJECTED:
        return state
    if isinstance(command, Start):
        # A replacing start first cancels the old run; its answer is the run it started.
        first = next(f for e in out.events if (f := e.__dict__)["type"] in _START_ANSWERS)
    decided = Decided(command.request_id, first["type"], first["run_id"])
    return _changed(state, decided=_appended(state.decided, decided, limits.idempotency_window))


def _changed(
    state: JobState,
    *,
    active: tuple[Run, ...] | None = None,
    queue: tuple[Queued, ...] | None = None,
    ended: tuple[EndedRun, ...] | None = None,
    decided: tuple[Decided, ...] | None = None,
) -> JobState:
    """`dataclasses.replace(state, ...)` in a fraction of its time (it runs on every
    transition: `replace` looks up each field's definition at every call, and a call by
    keyword builds a dict of them first); a window given takes its next entry's number
    with it. The new state takes over the window's index (`JobState.decided_index`), which
    `replace` leaves behind."""
    new = JobState(
        state.job_type,
        state.active if active is None else active,
        state.queue if queue is None else queue,
        state.ended if ended is None else ended,
        state.decided if decided is None else decided,
        state.ended_next if ended is None else state.ended_next + 1,
        state.decided_next if decided is None else state.decided_next + 1,
    )
    index = state.decided_index
    if index is not None:
        # One owner at a time: `state` builds an index of its own if it is asked again.
        state.decided_index = None
        if new.decided is state.decided or _reindex(index, state, new):
            new.decided_index = index
    return new


# Up to this many entries a window is scanned: an index would cost more than it saves.
_SCANNED = 32


def _in_window(state: JobState, request_id: str) -> Decided | None:
    """The latest entry of `request_id` in the idempotency window, through its index once
    the window is long."""
    index = state.decided_index
    if index is None:
        decided = state.decided
        if len(decided) <= _SCANNED:
            return next((d for d in reversed(decided) if d.request_id == request_id), None)
        index = {d.request_id: d for d in decided}  # the latest entry wins
        state.decided_index = index
    return index.get(request_id)


def _reindex(index: dict[str, Decided], old: JobState, new: JobState) -> bool:
    """Move `old`'s window index to `new`'s window; False when `new`'s window is not `old`'s
    with entries dropped at its start and added at its end (the index is then rebuilt)."""
    old_first = old.decided_next - len(old.decided)  # the number of its oldest entry
    first = new.decided_next - len(new.decided)
    if first < old_first or new.decided_next < old.decided_next:
        return False
    for number in range(old_first, min(first, old.decided_next)):
        gone = old.decided[number - old_first]
        if index.get(gone.request_id) is gone:
            del index[gone.request_id]
    for number in range(max(first, old.decided_next), new.decided_next):
        entry = new.decided[number - first]
        index[entry.request_id] = entry
    return True


def _appended(items: tuple[T, ...], item: T, size: int) -> tuple[T, ...]:
    """`items` with `item` at its end, of which the last `size` (a size of 0 keeps nothing).
    A full window is copied once and sliced, not extended and then sliced again (a third
    less time for a thousand entries)."""
    drop = len(items) + 1 - size
    if drop <= 0:
        return (*items, item)
    return items[drop:] + (item,) if drop <= len(items) else ()  # noqa: RUF005 (one copy)


def _status_of(state: JobState, run_id: str | None) -> RunStatus | None:
    if run_id is None:
        return None
    if (run := next((r for r in state.active if r.run_id == run_id), None)) is not None:
        return run.status
    if any(q.run_id == run_id for q in state.queue):
        return RunStatus.QUEUED
    ended = _ended(state, run_id)
    return ended.status if ended is not None else None


def _ended(state: JobState, run_id: str) -> EndedRun | None:
    return next((e for e in reversed(state.ended) if e.run_id == run_id), None)


def _deadline(config: JobConfig, at: datetime) -> datetime | None:
    return None if config.timeout is None else at + config.timeout


def _start_run(
    state: JobState,
    *,
    run_id: str,
    request_id: str,
    client_id: str | None,
    initial_data: Mapping[str, Any],
    scope: str,
    before: RunStatus | None,
    action: Action,
    config: JobConfig,
    out: _Out,
    size: int = 0,
    not_before: datetime | None = None,
) -> JobState:
    move = _move(before, action)
    if move is None:
        return _reject(state, out, _illegal(before, action), request_id=request_id)
    status, event_type = move
    # A run never starts before it was asked for (a result stamped earlier may free its
    # scope); its timeout counts from its start.
    started_at = out.at if not_before is None or out.at >= not_before else not_before
    run = Run(  # by position, as `_changed` builds a state
        run_id,
        state.job_type,
        client_id,
        request_id,
        status,
        started_at,
        initial_data,
        scope,
        _deadline(config, started_at),
        size,
        before is _QUEUED_RUN,  # was_queued
    )
    out.emit(
        event_type,
        state.job_type,
        status=status,
        from_status=before,
        request_id=request_id,
        client_id=client_id,
        run_id=run_id,
        initial_data=dict(initial_data),
        started_at=started_at,
    )
    return _changed(state, active=(*state.active, run))


def _end_run(
    state: JobState,
    run: Run,
    action: Action,
    limits: Limits,
    out: _Out,
    *,
    request_id: str | None,
    metrics: Mapping[str, Any] | None = None,
    reason: str | None = None,
) -> JobState:
    """End an active run and start the next queued run of its scope, if any."""
    move = _move(run.status, action)
    if move is None:
        return _reject(state, out, _illegal(run.status, action), request_id=request_id)
    status, event_type = move
    out.emit(
        event_type,
        state.job_type,
        status=status,
        from_status=run.status,
        request_id=request_id,
        client_id=run.client_id,
        run_id=run.run_id,
        metrics=None if metrics is None else dict(metrics),
        reason=reason,
        started_at=run.started_at,
    )
    active = tuple(r for r in state.active if r is not run)
    return _with_ended(state, EndedRun(run.run_id, status, out.at), limits, active=active)


def _with_ended(
    state: JobState,
    run: EndedRun,
    limits: Limits,
    *,
    active: tuple[Run, ...] | None = None,
    queue: tuple[Queued, ...] | None = None,
) -> JobState:
    ended = _appended(state.ended, run, limits.ended_window)
    return _changed(state, ended=ended, active=active, queue=queue)


def _promote(state: JobState, scope: str, config: JobConfig, out: _Out) -> JobState:
    """Start the oldest queued run of `scope` if the scope is free."""
    scope = scope.strip().lower()
    if _active_in(state, scope) is not None:
        return state
    waiting = next((q for q in state.queue if _in_scope(q.scope, scope)), None)
    if waiting is None:
        return state
    rest = _changed(state, queue=tuple(q for q in state.queue if q is not waiting))
    started = _start_run(
        rest,
        run_id=waiting.run_id,
        request_id=waiting.request_id,
        client_id=waiting.client_id,
        initial_data=waiting.initial_data,
        scope=scope,
        before=RunStatus.QUEUED,
        action=Action.DEQUEUE,
        config=config,
        out=out,
        size=waiting.size,
        not_before=waiting.queued_at,
    )
    return state if started is rest else started  # a refused move leaves the run queued


def _resolve(state: JobState, raw: str, limits: Limits) -> tuple[str | None, str | None]:
    """Map a run ID as given to a known run ID; return (run_id, None) or (None, reason).

    A seed-style ID (no coordinates) resolves only when every run of its second is known:
    once the ended window may have forgotten a run that ended at or after that second, a
    single match may be the wrong one, so the ID is refused until given in full.
    """
    text = raw.strip().lower()
    for run in state.active:
        if run.run_id == text:
            return text, None  # the common case: an active run, named in canonical form
    try:
        normalized = normalize_run_id(raw)
    except InvalidRunId as exc:
        return None, str(exc)
    if isinstance(normalized, str):
        return normalized, None
    # Ended runs keep no client: a client-suffixed seed ID finds them only by their suffix.
    known: list[tuple[str, str | None]] = [(e.run_id, None) for e in state.ended]
    known += [(r.run_id, r.client_id) for r in state.active]
    known += [(q.run_id, q.client_id) for q in state.queue]
    matches = [run_id for run_id, client in known if normalized.matches(run_id, client)]
    if len(matches) > 1:
        return (
            None,
            f"the seed-style run ID {raw!r} is ambiguous: it matches runs {', '.join(matches)}",
        )
    if len(state.ended) >= limits.ended_window > 0 and state.ended[0].ended_at >= (
        second := normalized.second()
    ):
        return None, (
            f"the seed-style run ID {raw!r} may also match a run that ended since "
            f"{second.isoformat()} and is no longer remembered (the last "
            f"{limits.ended_window} ended runs are); give the full run ID"
        )
    if len(matches) == 1:
        return matches[0], None
    return None, f"no run of {state.job_type!r} matches the seed-style run ID {raw!r}"


def _reject(
    state: JobState,
    out: _Out,
    reason: str,
    *,
    request_id: str | None,
    run_id: str | None = None,
    client_id: str | None = None,
) -> JobState:
    out.emit(
        EventType.REJECTED,
        state.job_type,
        status=_status_of(state, run_id),
        request_id=request_id,
        client_id=client_id,
        run_id=run_id,
        reason=reason,
    )
    return state


def _why_not(state: JobState, run_id: str, action: Action) -> str:
    ended = _ended(state, run_id)
    if ended is not None:
        return f"run {run_id} already ended {ended.status}"
    if any(q.run_id == run_id for q in state.queue):
        return f"run {run_id} is queued and has not started; cannot {action}"
    return (
        f"unknown run {run_id} of job type {state.job_type!r}: not active, not queued, and "
        f"not among its last {len(state.ended)} ended runs"
    )


# -- commands -----------------------------------------------------------------------------------


def run_size(request_bytes: int, client_id: str | None) -> int:
    """What a run started by a request of `request_bytes` counts against `Limits.run_bytes`.

    A run in the state holds what its request held, its client ID twice more (in the scope
    and the run ID), and its own fields (run ID, status, times): at most this many bytes.
    """
    client = len(client_id.encode()) if client_id else 0
    return request_bytes + 2 * client + 512


def _held(state: JobState) -> int:
    return sum(r.size for r in state.active) + sum(q.size for q in state.queue)


def _full(state: JobState, cmd: Start, limits: Limits) -> str:
    """Why a start does not fit in what its job type's runs may hold (rule 8)."""
    fix = (
        "try again when runs end"
        if cmd.size <= limits.run_bytes
        else "it alone is over the limit: send less, or raise JOBS_MAX_RUN_BYTES"
    )
    return (
        f"job type {cmd.job_type!r} is full: its active and queued runs hold "
        f"{_held(state)} bytes, and this start needs {cmd.size} more of the "
        f"{limits.run_bytes} allowed (JOBS_MAX_RUN_BYTES); {fix}"
    )


def _start(state: JobState, cmd: Start, config: JobConfig, limits: Limits, out: _Out) -> JobState:
    scope = scope_key(config, cmd.client_id)
    suffix = cmd.client_id if config.scope is _JOB_TYPE_CLIENT else None
    run_id = make_run_id(cmd.at, cmd.source.partition, cmd.source.offset, suffix)
    active = _active_in(state, scope)
    freed = active.size if active is not None and config.policy is _REPLACE else 0
    if (active is None or config.policy is not _REJECT) and (
        _held(state) - freed + cmd.size > limits.run_bytes
    ):
        return _reject(
            state,
            out,
            _full(state, cmd, limits),
            request_id=cmd.request_id,
            client_id=cmd.client_id,
        )
    if active is not None and config.policy is _QUEUE:
        move = _move(None, Action.ENQUEUE)
        if move is None:
            return _reject(state, out, _illegal(None, Action.ENQUEUE), request_id=cmd.request_id)
        status, event_type = move
        out.emit(
            event_type,
            state.job_type,
            status=status,
            request_id=cmd.request_id,
            client_id=cmd.client_id,
            run_id=run_id,
            initial_data=dict(cmd.initial_data),
            reason=f"waiting for run {active.run_id}",
        )
        waiting = Queued(
            run_id, cmd.request_id, cmd.client_id, scope, cmd.at, cmd.size, cmd.initial_data
        )
        return _changed(state, queue=(*state.queue, waiting))
    if active is not None and config.policy is not _REPLACE:
        what = f"job type {cmd.job_type!r}"
        if scope:
            what += f" for client {cmd.client_id!r}"
        out.emit(
            EventType.REFUSED,
            state.job_type,
            status=active.status,
            request_id=cmd.request_id,
            client_id=cmd.client_id,
            run_id=active.run_id,
            started_at=active.started_at,
            reason=f"{what} is already running as run {active.run_id}",
        )
        return state
    if active is not None:  # Policy.REPLACE
        state = _end_run(
            state,
            active,
            Action.CANCEL,
            limits,
            out,
            request_id=cmd.request_id,
            reason=f"replaced by request {cmd.request_id}",
        )
        # A replacing start jumps the queue: it was asked for last, but it is what is wanted.
    # Every argument named here (not a dict of them passed with `**`): compiled, that is a
    # direct call, not one through the function's Python wrapper.
    return _start_run(
        state,
        run_id=run_id,
        request_id=cmd.request_id,
        client_id=cmd.client_id,
        initial_data=cmd.initial_data,
        scope=scope,
        before=None,
        action=_START,
        config=config,
        out=out,
        size=cmd.size,
    )


def _cancel(state: JobState, cmd: Cancel, config: JobConfig, limits: Limits, out: _Out) -> JobState:
    reason = cmd.reason or f"cancelled by request {cmd.request_id}"
    if cmd.run_id is None:
        scope = scope_key(config, cmd.client_id)
        active = _active_in(state, scope)
        if active is None and config.scope is Scope.JOB_TYPE_CLIENT and cmd.client_id is None:
            clients = sorted(r.client_id or "" for r in state.active)
            return _reject(
                state,
                out,
                f"job type {cmd.job_type!r} runs one run per client: name the client_id or the "
                f"run_id to cancel (running for clients: {', '.join(clients) or 'none'})",
                request_id=cmd.request_id,
            )
        if active is None:
            what = f"job type {cmd.job_type!r}"
            if scope:
                what += f" for client {cmd.client_id!r}"
            return _reject(
                state,
                out,
                f"nothing to cancel: {what} has no active run",
                request_id=cmd.request_id,
                client_id=cmd.client_id,
            )
        state = _end_run(
            state, active, Action.CANCEL, limits, out, request_id=cmd.request_id, reason=reason
        )
        return _promote(state, active.scope, config, out)
    run_id, problem = _resolve(state, cmd.run_id, limits)
    if run_id is None:
        assert problem is not None
        return _reject(
            state,
            out,
            problem,
            request_id=cmd.request_id,
            run_id=cmd.run_id,
            client_id=cmd.client_id,
        )
    active = next((r for r in state.active if r.run_id == run_id), None)
    if active is not None:
        state = _end_run(
            state, active, Action.CANCEL, limits, out, request_id=cmd.request_id, reason=reason
        )
        return _promote(state, active.scope, config, out)
    waiting = next((q for q in state.queue if q.run_id == run_id), None)
    if waiting is None:
        return _reject(
            state,
            out,
            _why_not(state, run_id, Action.CANCEL),
            request_id=cmd.request_id,
            run_id=run_id,
            client_id=cmd.client_id,
        )
    move = _move(RunStatus.QUEUED, Action.CANCEL)
    if move is None:
        return _reject(
            state, out, _illegal(RunStatus.QUEUED, Action.CANCEL), request_id=cmd.request_id
        )
    status, event_type = move
    out.emit(
        event_type,
        state.job_type,
        status=status,
        from_status=RunStatus.QUEUED,
        request_id=cmd.request_id,
        client_id=waiting.client_id,
        run_id=run_id,
        reason=reason,
    )
    queue = tuple(q for q in state.queue if q is not waiting)
    return _with_ended(state, EndedRun(run_id, status, cmd.at), limits, queue=queue)


def _finish(state: JobState, cmd: Finish, config: JobConfig, limits: Limits, out: _Out) -> JobState:
    run_id, problem = _resolve(state, cmd.run_id, limits)
    if run_id is None:
        assert problem is not None
        return _reject(state, out, problem, request_id=cmd.request_id, run_id=cmd.run_id)
    action = _COMPLETE if cmd.status is _COMPLETED_RUN else _FAIL
    active = next((r for r in state.active if r.run_id == run_id), None)
    if active is None or _move(active.status, action) is None:
        return _reject(
            state, out, _why_not(state, run_id, action), request_id=cmd.request_id, run_id=run_id
        )
    state = _end_run(
        state, active, action, limits, out, request_id=cmd.request_id, metrics=cmd.metrics
    )
    return _promote(state, active.scope, config, out)


def _progress(
    state: JobState, cmd: Progress, config: JobConfig, limits: Limits, out: _Out
) -> JobState:
    run_id, problem = _resolve(state, cmd.run_id, limits)
    if run_id is None:
        assert problem is not None
        return _reject(state, out, problem, request_id=cmd.request_id, run_id=cmd.run_id)
    active = next((r for r in state.active if r.run_id == run_id), None)
    move = None if active is None else _move(active.status, Action.PROGRESS)
    if active is None or move is None:
        return _reject(
            state,
            out,
            _why_not(state, run_id, Action.PROGRESS),
            request_id=cmd.request_id,
            run_id=run_id,
        )
    deadline = _deadline(config, cmd.at)
    if deadline is not None and active.deadline is not None and deadline < active.deadline:
        deadline = active.deadline  # a report stamped earlier never moves a deadline back
    renewed = active.replace(deadline=deadline)
    if cmd.metrics is not None:
        status, event_type = move
        out.emit(
            event_type,
            state.job_type,
            status=status,
            from_status=active.status,
            request_id=cmd.request_id,
            client_id=active.client_id,
            run_id=run_id,
            metrics=dict(cmd.metrics),
            started_at=active.started_at,
        )
    if renewed == active:
        return state
    return _changed(state, active=tuple(renewed if r is active else r for r in state.active))


def _advance(
    state: JobState, now: datetime, config: JobConfig, limits: Limits, out: _Out
) -> JobState:
    overdue = sorted(
        (r for r in state.active if r.deadline is not None and r.deadline <= now),
        key=lambda r: (r.deadline, r.run_id),
    )
    for run in overdue:
        assert run.deadline is not None
        state = _end_run(
            state,
            run,
            Action.TIME_OUT,
            limits,
            out,
            request_id=None,
            reason=f"timed out: no result or heartbeat by {run.deadline.isoformat()}",
        )
        state = _promote(state, run.scope, config, out)
    return state
