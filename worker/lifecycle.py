"""The pure lifecycle core: every decision about job runs, with no I/O, clock or Kafka types.

Theory of operation:

1. All records about a job type share one key and so one partition; every decision about a
   job type depends only on that job type's state. The core therefore works on one
   `JobState` at a time: ``decide(state, command) -> Decision(state, events)``.
2. Time and the coordinates of the record that caused a command come in with the command.
   Run IDs are made from them (see `worker.runid`), so replaying the same commands gives the
   same run IDs, states and events.
3. Every lifecycle move is a row of `TRANSITIONS`: (status before, action) -> (status after,
   event type). A command whose move is not in the table yields one `rejected` event and
   leaves the state unchanged; bad input is data, not a crash.
4. At most one run per job type is active. A start while one is active is `refused` and
   names the active run's ID and start time.
5. A result names its run. An unknown run, a run of another job type, and a run that has
   already ended are all `rejected`; a result never touches another run's state.
6. Each event gets an ID derived from its cause (source coordinates and position), so the
   same input always yields the same event IDs.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple

from pydantic import TypeAdapter

from schemas import EventType, RunStatus, Source, StatusEvent
from worker.runid import InvalidRunId, make_run_id, normalize_run_id

_EVENT_NAMESPACE = uuid.UUID("6f1f4c1e-8a53-4f4f-9a4e-2a0d3c9b7e11")


class Action(StrEnum):
    """What a command asks of a run."""

    START = "start"  # create a run
    COMPLETE = "complete"  # the executor reports success
    FAIL = "fail"  # the executor reports failure


# (status before or None for "no run", action) -> (status after, event emitted)
TRANSITIONS: Mapping[tuple[RunStatus | None, Action], tuple[RunStatus, EventType]] = {
    (None, Action.START): (RunStatus.RUNNING, EventType.STARTED),
    (RunStatus.RUNNING, Action.COMPLETE): (RunStatus.COMPLETED, EventType.COMPLETED),
    (RunStatus.RUNNING, Action.FAIL): (RunStatus.FAILED, EventType.FAILED),
}


@dataclass(frozen=True, slots=True)
class Run:
    """An active run, as the core needs to know it."""

    run_id: str
    job_type: str
    client_id: str | None
    request_id: str
    status: RunStatus
    started_at: datetime
    initial_data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EndedRun:
    """A recently ended run, kept so late results are rejected with the right reason."""

    run_id: str
    status: RunStatus
    ended_at: datetime


@dataclass(frozen=True, slots=True)
class JobState:
    """Everything the core knows about one job type."""

    job_type: str
    active: Run | None = None
    ended: tuple[EndedRun, ...] = ()  # oldest first, at most `Limits.ended_window` long


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on the state kept per job type."""

    ended_window: int = 256


@dataclass(frozen=True, slots=True)
class Start:
    """Start a run of `job_type`."""

    request_id: str
    job_type: str
    client_id: str | None
    initial_data: Mapping[str, Any]
    at: datetime
    source: Source


@dataclass(frozen=True, slots=True)
class Finish:
    """An executor's result for `run_id`: COMPLETED or FAILED, with its final metrics."""

    job_type: str
    run_id: str
    status: RunStatus
    metrics: Mapping[str, Any]
    request_id: str | None
    at: datetime
    source: Source


@dataclass(frozen=True, slots=True)
class Reject:
    """An input the shell could not turn into a command, but whose sender can be told."""

    job_type: str
    request_id: str | None
    run_id: str | None
    reason: str
    at: datetime
    source: Source


Command = Start | Finish | Reject


class Decision(NamedTuple):
    """The state after a command and the events it caused."""

    state: JobState
    events: tuple[StatusEvent, ...]


_STATE_ADAPTER: TypeAdapter[JobState] = TypeAdapter(JobState)


def dump_state(state: JobState) -> bytes:
    """Serialize a job type's state to JSON (for SQLite and the changelog)."""
    return _STATE_ADAPTER.dump_json(state)


def load_state(data: bytes | str | dict[str, Any]) -> JobState:
    """Inverse of `dump_state`; also accepts the already-parsed JSON object."""
    if isinstance(data, dict):
        return _STATE_ADAPTER.validate_python(data)
    return _STATE_ADAPTER.validate_json(data)


def event_id(source: Source, index: int) -> str:
    """A deterministic event ID: the same cause always gets the same ID."""
    name = f"{source.topic}/{source.partition}/{source.offset}/{index}"
    return str(uuid.uuid5(_EVENT_NAMESPACE, name))


def decide(state: JobState, command: Command, limits: Limits = Limits()) -> Decision:
    """Apply one command to one job type's state."""
    if command.job_type != state.job_type:
        raise ValueError(f"command for {command.job_type!r} given state of {state.job_type!r}")
    if isinstance(command, Start):
        return _start(state, command)
    if isinstance(command, Finish):
        return _finish(state, command, limits)
    return _rejected(state, command, command.reason, request_id=command.request_id)


def is_running(state: JobState) -> bool:
    """Whether a run of this job type is active."""
    return state.active is not None


def running_info(state: JobState) -> Run | None:
    """The active run of this job type, if any."""
    return state.active


def _rejected(
    state: JobState,
    command: Command,
    reason: str,
    *,
    request_id: str | None,
    run_id: str | None = None,
    status: RunStatus | None = None,
) -> Decision:
    event = StatusEvent(
        event_id=event_id(command.source, 0),
        type=EventType.REJECTED,
        status=status,
        request_id=request_id,
        job_type=command.job_type,
        client_id=getattr(command, "client_id", None),
        run_id=run_id if run_id is not None else getattr(command, "run_id", None),
        reason=reason,
        occurred_at=command.at,
        source=command.source,
    )
    return Decision(state, (event,))


def _start(state: JobState, cmd: Start) -> Decision:
    active = state.active
    if active is not None:
        event = StatusEvent(
            event_id=event_id(cmd.source, 0),
            type=EventType.REFUSED,
            status=active.status,
            request_id=cmd.request_id,
            job_type=cmd.job_type,
            client_id=cmd.client_id,
            run_id=active.run_id,
            started_at=active.started_at,
            reason=f"job type {cmd.job_type!r} is already running as run {active.run_id}",
            occurred_at=cmd.at,
            source=cmd.source,
        )
        return Decision(state, (event,))
    status, event_type = TRANSITIONS[(None, Action.START)]
    run = Run(
        run_id=make_run_id(cmd.at, cmd.source.partition, cmd.source.offset),
        job_type=cmd.job_type,
        client_id=cmd.client_id,
        request_id=cmd.request_id,
        status=status,
        started_at=cmd.at,
        initial_data=cmd.initial_data,
    )
    event = StatusEvent(
        event_id=event_id(cmd.source, 0),
        type=event_type,
        status=status,
        request_id=cmd.request_id,
        job_type=cmd.job_type,
        client_id=cmd.client_id,
        run_id=run.run_id,
        initial_data=dict(run.initial_data),
        started_at=run.started_at,
        occurred_at=cmd.at,
        source=cmd.source,
    )
    return Decision(replace(state, active=run), (event,))


def _resolve(state: JobState, raw: str) -> tuple[str | None, str | None]:
    """Map a run ID as given to a known run ID; return (run_id, None) or (None, reason)."""
    try:
        normalized = normalize_run_id(raw)
    except InvalidRunId as exc:
        return None, str(exc)
    if isinstance(normalized, str):
        return normalized, None
    known = [r.run_id for r in state.ended]
    if state.active is not None:
        known.append(state.active.run_id)
    matches = [run_id for run_id in known if normalized.matches(run_id)]
    if len(matches) == 1:
        return matches[0], None
    if not matches:
        return None, f"no run of {state.job_type!r} matches the seed-style run ID {raw!r}"
    return None, (
        f"the seed-style run ID {raw!r} is ambiguous: it matches runs {', '.join(matches)}"
    )


def _ended(state: JobState, run_id: str) -> EndedRun | None:
    for ended in reversed(state.ended):
        if ended.run_id == run_id:
            return ended
    return None


def _finish(state: JobState, cmd: Finish, limits: Limits) -> Decision:
    run_id, problem = _resolve(state, cmd.run_id)
    if run_id is None:
        assert problem is not None
        return _rejected(state, cmd, problem, request_id=cmd.request_id)
    action = Action.COMPLETE if cmd.status is RunStatus.COMPLETED else Action.FAIL
    active = state.active
    if active is None or active.run_id != run_id:
        ended = _ended(state, run_id)
        if ended is None:
            return _rejected(
                state,
                cmd,
                f"unknown run {run_id} of job type {cmd.job_type!r}",
                request_id=cmd.request_id,
                run_id=run_id,
            )
        return _rejected(
            state,
            cmd,
            f"run {run_id} already ended {ended.status}",
            request_id=cmd.request_id,
            run_id=run_id,
            status=ended.status,
        )
    move = TRANSITIONS.get((active.status, action))
    if move is None:
        return _rejected(
            state,
            cmd,
            f"cannot {action} run {run_id} in status {active.status}",
            request_id=cmd.request_id,
            run_id=run_id,
            status=active.status,
        )
    status, event_type = move
    event = StatusEvent(
        event_id=event_id(cmd.source, 0),
        type=event_type,
        status=status,
        from_status=active.status,
        request_id=cmd.request_id,
        job_type=cmd.job_type,
        client_id=active.client_id,
        run_id=run_id,
        metrics=dict(cmd.metrics),
        started_at=active.started_at,
        occurred_at=cmd.at,
        source=cmd.source,
    )
    ended_runs = (*state.ended, EndedRun(run_id, status, cmd.at))
    # Explicit start index: a window of 0 must keep nothing, and `[-0:]` would keep all.
    ended_runs = ended_runs[max(0, len(ended_runs) - limits.ended_window) :]
    return Decision(replace(state, active=None, ended=ended_runs), (event,))
