"""A job type's state: its active and queued runs and its windows, and their JSON form.

The data `worker.core.lifecycle` decides over, as native value classes (`worker.core.values`):
a transition builds a state, a run and a window entry, and reads their fields many times.
pydantic validates and serializes them by their shapes (`worker.core.shapes`), through
`load_state` and `dump_state` (the changelog's and SQLite's rows). A hot module
(`worker.compiled`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from pydantic import TypeAdapter

from schemas import EventType, RunStatus
from worker.core.values import Value


class Run(Value):
    """An active run, as the core needs to know it.

    `size` is what it counts against `Limits.run_bytes`. `was_queued`: its request was
    answered `queued` (it started later), which is how a repeat of that request is answered
    once the idempotency window has forgotten it; not part of a run's identity.
    """

    FIELDS = (
        "run_id",
        "job_type",
        "client_id",
        "request_id",
        "status",
        "started_at",
        "initial_data",
        "scope",
        "deadline",
        "size",
        "was_queued",
    )
    COMPARED = FIELDS[:-1]
    __slots__ = FIELDS

    def __init__(
        self,
        run_id: str,
        job_type: str,
        client_id: str | None,
        request_id: str,
        status: RunStatus,
        started_at: datetime,
        initial_data: Mapping[str, Any] | None = None,
        scope: str = "",
        deadline: datetime | None = None,
        size: int = 0,
        was_queued: bool = False,
    ) -> None:
        self.run_id: Final = run_id
        self.job_type: Final = job_type
        self.client_id: Final = client_id
        self.request_id: Final = request_id
        self.status: Final = status
        self.started_at: Final = started_at
        self.initial_data: Final[Mapping[str, Any]] = {} if initial_data is None else initial_data
        self.scope: Final = scope
        self.deadline: Final = deadline
        self.size: Final = size
        self.was_queued: Final = was_queued

    def as_dict(self) -> dict[str, Any]:
        """Its fields, in order: read one by one here, which is faster than by name."""
        return {
            "run_id": self.run_id,
            "job_type": self.job_type,
            "client_id": self.client_id,
            "request_id": self.request_id,
            "status": self.status,
            "started_at": self.started_at,
            "initial_data": self.initial_data,
            "scope": self.scope,
            "deadline": self.deadline,
            "size": self.size,
            "was_queued": self.was_queued,
        }


class Queued(Value):
    """A start waiting for its scope to free up; its run ID is fixed when it is queued.
    `size` is what it counts against `Limits.run_bytes`."""

    FIELDS = ("run_id", "request_id", "client_id", "scope", "queued_at", "size", "initial_data")
    __slots__ = FIELDS

    def __init__(
        self,
        run_id: str,
        request_id: str,
        client_id: str | None,
        scope: str,
        queued_at: datetime,
        size: int = 0,
        initial_data: Mapping[str, Any] | None = None,
    ) -> None:
        self.run_id: Final = run_id
        self.request_id: Final = request_id
        self.client_id: Final = client_id
        self.scope: Final = scope
        self.queued_at: Final = queued_at
        self.size: Final = size
        self.initial_data: Final[Mapping[str, Any]] = {} if initial_data is None else initial_data

    def as_dict(self) -> dict[str, Any]:
        """Its fields, in order: read one by one here, which is faster than by name."""
        return {
            "run_id": self.run_id,
            "request_id": self.request_id,
            "client_id": self.client_id,
            "scope": self.scope,
            "queued_at": self.queued_at,
            "size": self.size,
            "initial_data": self.initial_data,
        }


class EndedRun(Value):
    """A recently ended run, kept so late results are rejected with the right reason."""

    FIELDS = ("run_id", "status", "ended_at")
    __slots__ = FIELDS

    def __init__(self, run_id: str, status: RunStatus, ended_at: datetime) -> None:
        self.run_id: Final = run_id
        self.status: Final = status
        self.ended_at: Final = ended_at

    def as_dict(self) -> dict[str, Any]:
        """Its fields, in order: read one by one here, which is faster than by name."""
        return {
            "run_id": self.run_id,
            "status": self.status,
            "ended_at": self.ended_at,
        }


class Decided(Value):
    """A request ID and the decision it got, for idempotency."""

    FIELDS = ("request_id", "type", "run_id")
    __slots__ = FIELDS

    def __init__(self, request_id: str, type: EventType, run_id: str | None) -> None:
        self.request_id: Final = request_id
        self.type: Final = type
        self.run_id: Final = run_id

    def as_dict(self) -> dict[str, Any]:
        """Its fields, in order: read one by one here, which is faster than by name."""
        return {
            "request_id": self.request_id,
            "type": self.type,
            "run_id": self.run_id,
        }


class JobState(Value):
    """Everything the core knows about one job type.

    `active` holds at most one run per scope; `queue` is FIFO over all scopes; `ended`
    (at most `Limits.ended_window`) and `decided` (at most `Limits.idempotency_window`)
    are oldest first.

    `ended_next` and `decided_next` count the entries each window has taken in all: the
    number its next entry gets. The changelog keeps each entry as a row of its own under
    that number, so a state row stays small however full its windows are; not part of
    what a state decides.

    `decided_index` maps each request ID of `decided` to its latest entry: an index, not
    part of the value. Never read from input or written out; built at its first lookup and
    handed on to the state that replaces this one (`worker.core.lifecycle`), so that a busy
    job type's full window is not scanned at each request (26-52 bytes an entry).
    """

    FIELDS = ("job_type", "active", "queue", "ended", "decided", "ended_next", "decided_next")
    COMPARED = FIELDS[:5]
    __slots__ = (*FIELDS, "decided_index")

    def __init__(
        self,
        job_type: str,
        active: tuple[Run, ...] = (),
        queue: tuple[Queued, ...] = (),
        ended: tuple[EndedRun, ...] = (),
        decided: tuple[Decided, ...] = (),
        ended_next: int = 0,
        decided_next: int = 0,
    ) -> None:
        self.job_type: Final = job_type
        self.active: Final = active
        self.queue: Final = queue
        self.ended: Final = ended
        self.decided: Final = decided
        self.ended_next: Final = ended_next
        self.decided_next: Final = decided_next
        self.decided_index: dict[str, Decided] | None = None


_STATE_ADAPTER: TypeAdapter[JobState] = TypeAdapter(JobState)


def dump_state(state: JobState) -> bytes:
    """Serialize a job type's state to JSON (for SQLite and the changelog)."""
    return _STATE_ADAPTER.dump_json(state)


def load_state(data: bytes | str | dict[str, Any]) -> JobState:
    """Inverse of `dump_state`; also accepts the already-parsed JSON object."""
    if isinstance(data, dict):
        return _STATE_ADAPTER.validate_python(data)
    return _STATE_ADAPTER.validate_json(data)
