"""Run rows: what a run's status events make of its record (pure). A hot module
(`worker.compiled`).

The live worker, the changelog, the SQLite store and replay all derive run rows from status
events through `new_row` and `run_change`, so they cannot drift apart.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from schemas import ENDING_EVENTS, EventType, RunStatus, StatusEvent
from worker.core.values import Value

# Read on every transition, in compiled constants: an enum member read from its class is
# looked up through `EnumType`'s `__getattr__` hook, an imported name in the module's dict.
_STARTED: Final = EventType.STARTED
_QUEUED: Final = EventType.QUEUED
_PROGRESS: Final = EventType.PROGRESS
_RUNNING: Final = RunStatus.RUNNING
_QUEUED_RUN: Final = RunStatus.QUEUED
_ENDING: Final = ENDING_EVENTS


class RunRow(Value):
    """One run as recorded. A native class where compiled (`worker.core.values`); pydantic
    reads it by its shape (`worker.core.shapes`)."""

    FIELDS = (
        "run_id",
        "job_type",
        "client_id",
        "request_id",
        "status",
        "partition",
        "started_at",
        "ended_at",
        "initial_data",
        "metrics",
        "reason",
    )
    __slots__ = FIELDS

    def __init__(
        self,
        run_id: str,
        job_type: str,
        client_id: str | None,
        request_id: str | None,
        status: RunStatus,
        partition: int,
        started_at: datetime,
        ended_at: datetime | None,
        initial_data: dict[str, Any],
        metrics: dict[str, Any] | None,
        reason: str | None,
    ) -> None:
        self.run_id: Final = run_id
        self.job_type: Final = job_type
        self.client_id: Final = client_id
        self.request_id: Final = request_id
        self.status: Final = status
        self.partition: Final = partition
        self.started_at: Final = started_at
        self.ended_at: Final = ended_at
        self.initial_data: Final = initial_data
        self.metrics: Final = metrics
        self.reason: Final = reason

    def as_dict(self) -> dict[str, Any]:
        """Its fields, in order: read one by one here, which is faster than by name."""
        return {
            "run_id": self.run_id,
            "job_type": self.job_type,
            "client_id": self.client_id,
            "request_id": self.request_id,
            "status": self.status,
            "partition": self.partition,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "initial_data": self.initial_data,
            "metrics": self.metrics,
            "reason": self.reason,
        }


def new_row(event: StatusEvent, partition: int) -> RunRow | None:
    """The whole row an event creates: a run started, or queued (QUEUED, its `started_at`
    when it was queued, until its `started` event replaces the row); None for any other."""
    fields = event.__dict__  # its fields, read past pydantic's `__getattr__` hook (`built`)
    kind = fields["type"]
    if kind is _STARTED:
        started_at = fields["started_at"]
        assert started_at is not None
        return _created(fields, partition, _RUNNING, started_at)
    if kind is _QUEUED and fields["run_id"] is not None:
        return _created(fields, partition, _QUEUED_RUN, fields["occurred_at"])
    return None


def _created(fields: dict[str, Any], partition: int, status: RunStatus, at: datetime) -> RunRow:
    """The row of a run an event (its `fields`) started or queued."""
    run_id = fields["run_id"]
    assert run_id is not None
    return RunRow(  # by position: a call by keyword builds a dict of them first
        run_id,
        fields["job_type"],
        fields["client_id"],
        fields["request_id"],
        status,
        partition,
        at,  # started_at
        None,  # ended_at
        dict(fields["initial_data"] or {}),
        None,  # metrics
        None,  # reason
    )


def run_change(event: StatusEvent) -> dict[str, Any] | None:
    """The fields of an existing run row that `event` changes (None: it changes none).

    The worker's live rows and `replay` both go through here, so they cannot drift apart.
    """
    fields = event.__dict__  # its fields, read past pydantic's `__getattr__` hook (`built`)
    kind = fields["type"]
    if kind is _PROGRESS:
        return {"metrics": fields["metrics"]}
    if kind not in _ENDING:
        return None
    assert fields["status"] is not None
    change: dict[str, Any] = {
        "status": fields["status"],
        "ended_at": fields["occurred_at"],
        "reason": fields["reason"],
    }
    if (metrics := fields["metrics"]) is not None:  # else the last progress metrics stay
        change["metrics"] = metrics
    return change


_CHANGEABLE = frozenset({"status", "ended_at", "metrics", "reason"})


def changed(row: RunRow, change: dict[str, Any]) -> RunRow:
    """`row` with `run_change`'s fields changed: `dataclasses.replace` in half its time (a
    run's every progress report and end goes through here)."""
    if any(name not in _CHANGEABLE for name in change):
        raise TypeError(f"a run row cannot change {sorted(change.keys() - _CHANGEABLE)}")
    return RunRow(  # by position, as `_created`
        row.run_id,
        row.job_type,
        row.client_id,
        row.request_id,
        change.get("status", row.status),
        row.partition,
        row.started_at,
        change.get("ended_at", row.ended_at),
        row.initial_data,
        change.get("metrics", row.metrics),
        change.get("reason", row.reason),
    )
