"""Wire models of every message: frozen pydantic models, snake_case on the wire.

Input models (requests and results) also accept the seed's camelCase names (``jobType``,
``clientId``, ``initialData``, ``runId``, ``finalMetrics``, ``requestId``) and reject unknown
fields, so a misspelt field is reported instead of silently dropped.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from operator import attrgetter
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    AliasGenerator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel


def _snake_or_camel(name: str) -> AliasChoices:
    return AliasChoices(name, to_camel(name))


# The times the orchestrator writes are UTC broker and wall-clock times. A reader does
# arithmetic on them (durations, a margin before a view mark, Kafka timestamps, which start
# in 1970), so a time it cannot do that with is refused where it is read, not where it is used.
_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST = datetime(9000, 1, 1, tzinfo=UTC)


def time_problem(value: datetime) -> str | None:
    """Why `value` is not a time the orchestrator writes (None: it is one)."""
    if value.tzinfo is None or value.utcoffset() is None:
        return f"{value.isoformat()} has no UTC offset"
    if not _EARLIEST <= value < _LATEST:
        return f"{value.isoformat()} is not between 1970 and 9000"
    return None


def _checked_time(value: datetime) -> datetime:
    if (problem := time_problem(value)) is not None:
        raise ValueError(problem)
    # Held in UTC, whatever offset it was written with: times are compared and stored
    # (SQLite's text columns, the console's filters) as UTC.
    return value if value.utcoffset() == _NO_OFFSET else value.astimezone(UTC)


_NO_OFFSET = timedelta(0)
WireTime = Annotated[datetime, AfterValidator(_checked_time)]
# What the schema documents say of every time (readers refuse others: `time_problem`).
TIME_RULE = "With a UTC offset, from 1970 to 9000 (readers skip others)."


class WireModel(BaseModel):
    """Base of all wire models: immutable, strict about unknown fields."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=AliasGenerator(validation_alias=_snake_or_camel),
        populate_by_name=True,
    )


# Names: no whitespace and no control characters (a NUL in a key or a log line is trouble
# for every consumer downstream). IDs may hold spaces but no control characters. Lengths are
# bounded in characters and in UTF-8 bytes alike: the orchestrator's state repeats these IDs,
# and what it keeps per job type must fit one Kafka record.
_NAME = r"^[^\s\x00-\x1f\x7f]+$"
_TEXT = r"^[^\x00-\x1f\x7f]+$"


def _utf8_at_most(limit: int) -> AfterValidator:
    def check(value: str) -> str:
        # A character is at most 4 bytes: short text needs no encoding to be measured.
        if 4 * len(value) > limit and len(value.encode("utf-8", "surrogatepass")) > limit:
            raise ValueError(f"at most {limit} bytes as UTF-8")
        return value

    return AfterValidator(check)


def _chars(max_length: int, pattern: str) -> StringConstraints:
    return StringConstraints(
        strip_whitespace=True, min_length=1, max_length=max_length, pattern=pattern
    )


JobType = Annotated[str, _chars(200, _NAME), _utf8_at_most(200)]
ClientId = Annotated[str, _chars(128, _NAME), _utf8_at_most(128)]
RequestId = Annotated[str, _chars(200, _TEXT), _utf8_at_most(200)]
# The worker names a request sent without an ID `auto-<partition>.<offset>` (its record's
# coordinates): a request may not take such a name itself, or it could claim another
# request's and have that one answered as its duplicate.
AUTO_REQUEST_ID = "auto-"
_AUTOMATIC = re.compile(r"auto-[0-9]+\.[0-9]+")


def _not_automatic(value: str) -> str:
    if value.startswith(AUTO_REQUEST_ID) and _AUTOMATIC.fullmatch(value):
        raise ValueError(
            "request IDs of the form auto-<partition>.<offset> are the worker's own, for "
            "requests sent without one; choose another (a UUID) or leave it out"
        )
    return value


SentRequestId = Annotated[
    RequestId,
    AfterValidator(_not_automatic),
    Field(description="Not of the form auto-<partition>.<offset>: the worker's own IDs."),
]
RunIdText = Annotated[str, _chars(400, _TEXT), _utf8_at_most(400)]


class RunStatus(StrEnum):
    """The status of a run."""

    QUEUED = "QUEUED"  # waiting for the active run of its scope to end
    RUNNING = "RUNNING"  # started, no result yet
    COMPLETED = "COMPLETED"  # ended: the executor reported success
    FAILED = "FAILED"  # ended: the executor reported failure
    CANCELLED = "CANCELLED"  # ended: cancelled before it finished
    TIMED_OUT = "TIMED_OUT"  # ended: no result or heartbeat within its timeout

    # pydantic-core serializes an enum member by its `value`, which `Enum` defines as a
    # property written in Python; this one reads the member's attribute in C.
    value = property(attrgetter("_value_"))


ENDED_STATUSES = frozenset(
    {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.TIMED_OUT}
)


class EventType(StrEnum):
    """What a status event reports."""

    STARTED = "started"  # a run was created; executors start it
    REFUSED = "refused"  # a start while a run of the same scope is active
    QUEUED = "queued"  # a start waits for the active run of its scope to end
    DUPLICATE = "duplicate"  # a repeated request_id; carries the original decision
    REJECTED = "rejected"  # an input that cannot apply; state unchanged
    PROGRESS = "progress"  # an executor reported progress metrics
    COMPLETED = "completed"  # a run ended successfully
    FAILED = "failed"  # a run ended in failure
    CANCELLED = "cancelled"  # a run was cancelled; executors stop it
    TIMED_OUT = "timed_out"  # a run ended for lack of a result or heartbeat

    value = property(attrgetter("_value_"))  # as RunStatus's


ENDING_EVENTS = frozenset(
    {EventType.COMPLETED, EventType.FAILED, EventType.CANCELLED, EventType.TIMED_OUT}
)


class Source(WireModel):
    """Coordinates of the input record that caused an event or a dead letter."""

    topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)


class JobRequest(WireModel):
    """A request to start a job, or to cancel one, written to `<prefix>.requests`."""

    kind: Literal["start", "cancel"] = "start"
    request_id: SentRequestId | None = None
    job_type: JobType
    client_id: ClientId | None = None
    initial_data: dict[str, Any] = Field(default_factory=dict)
    run_id: RunIdText | None = Field(
        default=None, description="For a cancel: the run to cancel (else the scope's active run)."
    )
    reason: str | None = Field(default=None, max_length=1000, description="Why, for a cancel.")

    @model_validator(mode="after")
    def _no_run_id_on_start(self) -> JobRequest:
        if self.kind == "start" and self.run_id is not None:
            raise ValueError(
                "a start request cannot carry run_id: the orchestrator assigns run IDs"
            )
        return self


class JobResult(WireModel):
    """An executor's report, written to `<prefix>.results`: a result, progress or heartbeat."""

    kind: Literal["result", "progress"] = "result"
    job_type: JobType
    run_id: RunIdText
    status: Literal["COMPLETED", "FAILED"] | None = None
    final_metrics: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    request_id: RequestId | None = None

    @field_validator("status", mode="before")
    @classmethod
    def _upper_status(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _status_for_results(self) -> JobResult:
        if self.kind == "result" and self.status is None:
            raise ValueError("a result needs a status: COMPLETED or FAILED")
        return self


class StatusEvent(WireModel):
    """One decision or lifecycle transition, written by the orchestrator to `<prefix>.status`."""

    event_id: str
    type: EventType
    status: RunStatus | None = Field(
        default=None, description="The status of the run named by run_id after the event."
    )
    from_status: RunStatus | None = None
    request_id: str | None = None
    job_type: str
    client_id: str | None = None
    run_id: str | None = None
    reason: str | None = None
    metrics: dict[str, Any] | None = None
    initial_data: dict[str, Any] | None = Field(
        default=None, description="The run's initial data, on `started` events."
    )
    started_at: datetime | None = Field(
        default=None, description="When the run named by run_id started. " + TIME_RULE
    )
    original_type: EventType | None = Field(
        default=None, description="On `duplicate` events: the original decision's type."
    )
    occurred_at: datetime = Field(description="When it was decided. " + TIME_RULE)
    source: Source | None = None


def read_status_event(value: bytes | str) -> StatusEvent:
    """A status event as read from `<prefix>.status`, with what its readers rely on checked:
    its times (`time_problem`), a run ID and start time on `started`, a run ID and an ended
    status on an ending. ValueError (a pydantic `ValidationError`, whatever the bytes) for
    a record that is not one. The orchestrator builds its events with these fields; the
    check is the readers', so that a record written there by anyone else is skipped, not
    folded."""
    event = StatusEvent.model_validate_json(value)
    problem = None
    if _maybe_non_finite(value) and not all(
        _finite(data) for data in (event.metrics, event.initial_data)
    ):
        raise ValueError(
            "not a status event the orchestrator writes: NaN or Infinity, which JSON has not"
        )
    for at in (event.occurred_at, event.started_at):
        if at is not None and (problem := time_problem(at)) is not None:
            break
    else:
        if event.type is EventType.STARTED and (event.run_id is None or event.started_at is None):
            problem = "a started event names its run and its start"
        elif event.type in ENDING_EVENTS and (
            event.run_id is None or event.status not in ENDED_STATUSES
        ):
            problem = f"a {event.type.value} event names its run and the status it ended in"
    if problem is not None:
        raise ValueError(f"not a status event the orchestrator writes: {problem}")
    started = event.started_at
    if event.occurred_at.utcoffset() != _NO_OFFSET or (
        started is not None and started.utcoffset() != _NO_OFFSET
    ):  # held in UTC, as the orchestrator writes them (stored and compared as UTC)
        return event.model_copy(
            update={
                "occurred_at": event.occurred_at.astimezone(UTC),
                "started_at": None if started is None else started.astimezone(UTC),
            }
        )
    return event


def _maybe_non_finite(value: bytes | str) -> bool:
    """Whether `value` may spell NaN or Infinity (pydantic's parser takes both): looked for
    as substrings first, so an event without them is not walked."""
    if isinstance(value, str):
        return "NaN" in value or "Infinity" in value
    return value.find(b"NaN") >= 0 or value.find(b"Infinity") >= 0


def _finite(data: object) -> bool:
    """Whether no float inside `data` (maps and lists, any depth) is NaN or infinite."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


class DeadLetterReason(WireModel):
    """Why a record was dead-lettered: a stable code and a sentence for people."""

    code: str
    message: str


class Header(WireModel):
    """One Kafka record header; the value is base64 so any bytes survive."""

    key: str
    value: str | None


class DeadLetter(WireModel):
    """An input record the orchestrator could not use, written to `<prefix>.dlq`."""

    reason: DeadLetterReason
    source: Source
    key: str | None = Field(description="The original key, base64.")
    value: str | None = Field(description="The original value, base64.")
    headers: tuple[Header, ...] = ()
    dead_lettered_at: datetime


class RunRecord(BaseModel):
    """A run as the orchestrator records it: the `run` of a run row in `<prefix>.state`.

    Run rows are keyed by run ID (value ``{"row": "run", "v": 1, "run": <RunRecord>}``; a
    tombstone once an ended run has been retained long enough). The latest row of each run
    ID says its status, so the running runs are the rows whose status is RUNNING and the
    queued ones those whose status is QUEUED. Version 1; readers ignore fields they do not
    know, so later versions may add some.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    run_id: str
    job_type: str
    client_id: str | None
    request_id: str | None
    status: RunStatus
    partition: int = Field(ge=0, description="The partition of its job type.")
    started_at: WireTime = Field(
        description="When the run started; for a QUEUED run, when it was queued. " + TIME_RULE
    )
    ended_at: WireTime | None = Field(description="When the run ended. " + TIME_RULE)
    initial_data: dict[str, Any]
    metrics: dict[str, Any] | None = Field(description="The last progress or final metrics.")
    reason: str | None


RUN_ROW_VERSION = 1
RUN_ROW_PREFIX = b'{"row":"run","v":1,"run":'  # how the orchestrator writes a run row
_RUN_ROW = b'{"row":"run"'


def is_run_row(value: bytes) -> bool:
    """Whether a `<prefix>.state` record value is a run row (not a job type's row)."""
    return value.startswith(_RUN_ROW)


class _RunRow(BaseModel):
    row: Literal["run"]
    run: RunRecord


def parse_run_row(value: bytes) -> RunRecord:
    """The run of a run row, in any of its spellings; ValueError (a pydantic
    `ValidationError`, whatever the bytes: bad UTF-8, deep nesting...) if it is not one."""
    if value.startswith(RUN_ROW_PREFIX) and value.endswith(b"}"):
        return RunRecord.model_validate_json(value[len(RUN_ROW_PREFIX) : -1])
    return _RunRow.model_validate_json(value).run


class ViewMark(BaseModel):
    """A partition's view mark: the value of the ``\\x00view`` row of `<prefix>.state`.

    The orchestrator writes it every `every_s` seconds per partition, in the same transaction
    as a fresh row of each running and queued run of that partition. So every run that is
    not ended when the mark is committed has a row stamped `since` or later: a reader that
    finds a mark needs that partition only from the first record stamped `since`, not from
    its start. Value ``{"row": "view", "v": 1, "mark": <ViewMark>}``. Version 1.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    since: WireTime = Field(
        description="Every unended run has a row stamped at or after it. " + TIME_RULE
    )
    every_s: float = Field(gt=0, description="How often the orchestrator writes the mark.")


VIEW_ROW_KEY = b"\x00view"  # one per partition: compaction keeps the latest
VIEW_ROW_PREFIX = b'{"row":"view","v":1,"mark":'
_VIEW_ROW = b'{"row":"view"'


def view_row(mark: ViewMark) -> tuple[bytes, bytes]:
    """(key, value) of a partition's view mark row."""
    return VIEW_ROW_KEY, VIEW_ROW_PREFIX + mark.model_dump_json().encode() + b"}"


class _ViewRow(BaseModel):
    row: Literal["view"]
    mark: ViewMark


def parse_view_row(value: bytes) -> ViewMark | None:
    """The mark of a view row; None for any other row. ValueError (a pydantic
    `ValidationError`, whatever the bytes) for a damaged one."""
    if not value.startswith(_VIEW_ROW):
        return None
    if value.startswith(VIEW_ROW_PREFIX) and value.endswith(b"}"):
        return ViewMark.model_validate_json(value[len(VIEW_ROW_PREFIX) : -1])
    return _ViewRow.model_validate_json(value).mark


ALL_MODELS: dict[str, type[BaseModel]] = {
    "job_request": JobRequest,
    "job_result": JobResult,
    "status_event": StatusEvent,
    "dead_letter": DeadLetter,
    "run_record": RunRecord,
    "view_mark": ViewMark,
}
