"""A job type's state: its active and queued runs and its windows, and their JSON form.

The data `worker.core.lifecycle` decides over, kept in a module of its own because pydantic
reads these classes' annotations to validate and serialize them (`load_state`, the
changelog's and SQLite's rows): this module is never compiled (`worker.compiled`), since
mypyc erases annotations it does not need.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import field
from datetime import datetime
from typing import Annotated, Any

from pydantic import Field, TypeAdapter
from pydantic.json_schema import SkipJsonSchema

from schemas import EventType, RunStatus
from worker.core.values import Count, immutable


@immutable
class Run:
    """An active run, as the core needs to know it."""

    run_id: str
    job_type: str
    client_id: str | None
    request_id: str
    status: RunStatus
    started_at: datetime
    initial_data: Mapping[str, Any] = field(default_factory=dict)
    scope: str = ""
    deadline: datetime | None = None
    size: int = 0  # counted against `Limits.run_bytes`
    # Its request was answered `queued` (it started later): how a repeat of that request is
    # answered once the idempotency window has forgotten it. Not part of a run's identity.
    was_queued: bool = field(default=False, compare=False)


@immutable
class Queued:
    """A start waiting for its scope to free up; its run ID is fixed when it is queued."""

    run_id: str
    request_id: str
    client_id: str | None
    scope: str
    queued_at: datetime
    size: int = 0  # counted against `Limits.run_bytes`
    initial_data: Mapping[str, Any] = field(default_factory=dict)


@immutable
class EndedRun:
    """A recently ended run, kept so late results are rejected with the right reason."""

    run_id: str
    status: RunStatus
    ended_at: datetime


@immutable
class Decided:
    """A request ID and the decision it got, for idempotency."""

    request_id: str
    type: EventType
    run_id: str | None


@immutable
class JobState:
    """Everything the core knows about one job type."""

    job_type: str
    active: tuple[Run, ...] = ()  # at most one per scope
    queue: tuple[Queued, ...] = ()  # FIFO over all scopes
    ended: tuple[EndedRun, ...] = ()  # oldest first, at most `Limits.ended_window`
    decided: tuple[Decided, ...] = ()  # oldest first, at most `Limits.idempotency_window`
    # How many entries each window has taken in all: the number its next entry gets. The
    # changelog keeps each entry as a row of its own under that number, so a state row
    # stays small however full its windows are; not part of what a state decides.
    ended_next: Count = field(default=0, compare=False)
    decided_next: Count = field(default=0, compare=False)
    # Each request ID of `decided` and its latest entry: an index, not part of the value.
    # Never read from input or written out; built at its first lookup and handed on to the
    # state that replaces this one (`worker.core.lifecycle`), so that a busy job type's
    # full window is not scanned at each request (26-52 bytes an entry).
    decided_index: SkipJsonSchema[Annotated[dict[str, Decided] | None, Field(exclude=True)]] = (
        field(default=None, init=False, compare=False, repr=False)
    )


_STATE_ADAPTER: TypeAdapter[JobState] = TypeAdapter(JobState)


def dump_state(state: JobState) -> bytes:
    """Serialize a job type's state to JSON (for SQLite and the changelog)."""
    return _STATE_ADAPTER.dump_json(state)


def load_state(data: bytes | str | dict[str, Any]) -> JobState:
    """Inverse of `dump_state`; also accepts the already-parsed JSON object."""
    if isinstance(data, dict):
        return _STATE_ADAPTER.validate_python(data)
    return _STATE_ADAPTER.validate_json(data)
