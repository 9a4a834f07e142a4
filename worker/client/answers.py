"""What the client's calls return and raise: decisions, running runs, errors.

Every error names the request it is about (`request_id`), so a caller can retry it safely or
look it up in the status topic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from schemas import EventType, RunRecord, StatusEvent


class JobError(Exception):
    """Base of the client's errors; `request_id` is the request concerned, when there is one."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class JobTimeoutError(JobError, TimeoutError):
    """No answer within the timeout; the request may still be decided later.

    Sending the request again with the same `request_id` is safe: the orchestrator answers a
    decided request ID with its original decision. `unanswered` is the message without the
    sentence that says so (`retry_safe`), for a caller that says it in its own terms.
    """

    def __init__(
        self, message: str, request_id: str | None = None, *, retry_safe: bool = False
    ) -> None:
        self.unanswered = message
        self.retry_safe = retry_safe and request_id is not None
        if self.retry_safe:
            message = f"{message} Retrying with request_id={request_id!r} is safe"
        super().__init__(message, request_id)


class JobRejectedError(JobError):
    """The orchestrator rejected the request; `event.reason` says why."""

    def __init__(self, event: StatusEvent) -> None:
        super().__init__(event.reason or "rejected", event.request_id)
        self.event = event


class JobInvalidError(JobError, ValueError):
    """The request or result is not one the orchestrator takes (it would dead-letter it):
    the message names each bad field. Nothing was sent."""


class JobConnectionError(JobError, ConnectionError):
    """The client could not connect to Kafka: the message says why and what to check."""


class ClientNotOpenError(JobError):
    """A call on a client that is not open."""

    def __init__(self) -> None:
        super().__init__(
            "the JobClient is not open: use `async with JobClient() as jobs:` "
            "(or `await jobs.open()` ... `await jobs.close()`)"
        )


@dataclass(frozen=True)
class RunInfo:
    """A running job, as the seed's `getRunningJobInfo` returned it."""

    job_type: str
    run_id: str
    client_id: str | None
    request_id: str
    started_at: datetime
    initial_data: Mapping[str, Any]

    @classmethod
    def of(cls, run: RunRecord) -> RunInfo:
        """From a running run's record."""
        return cls(
            run.job_type,
            run.run_id,
            run.client_id,
            run.request_id or "",
            run.started_at,
            run.initial_data,
        )


@dataclass(frozen=True)
class StartDecision:
    """The answer to `start_job`.

    `run_id` is only ever the caller's own run (started or queued by this request). A start
    refused because another run of its scope is active says so in `already_running`, and names
    that other run in `running_run_id` and `running` (whose client, since when, with what
    data): it is not the caller's to complete.
    """

    request_id: str
    event: StatusEvent
    running: RunInfo | None = None
    # `event` answers an earlier record with this request ID: the original decision, read
    # as the answer to a retry (whose own answer is a `duplicate` of it).
    answered: bool = False

    @property
    def type(self) -> EventType:
        """The decision: `started`, `queued` or `refused`; a retry gets the original's."""
        if self.event.type is EventType.DUPLICATE and self.event.original_type is not None:
            return self.event.original_type
        return self.event.type

    @property
    def retried(self) -> bool:
        """Whether the request ID had been decided before and this is that decision again."""
        return self.event.type is EventType.DUPLICATE or self.answered

    @property
    def started(self) -> bool:
        """Whether this request (this time or when first sent) started a run."""
        return self.type is EventType.STARTED

    @property
    def queued(self) -> bool:
        """Whether the request waits for the active run of its scope to end."""
        return self.type is EventType.QUEUED

    @property
    def already_running(self) -> bool:
        """The seed's `alreadyRunning`: refused because another run of the scope is active."""
        return self.type is EventType.REFUSED

    @property
    def run_id(self) -> str | None:
        """This request's run (started or queued); None when refused."""
        return None if self.already_running else self.event.run_id

    @property
    def running_run_id(self) -> str | None:
        """When refused: the other run, already active, that this request did not start."""
        return self.event.run_id if self.already_running else None
