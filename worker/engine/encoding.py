"""The JSON the worker writes of its own values on every transition, written by msgspec.

A status event, a run's row, a job state's head, a window entry and the JSON columns of a
run's SQLite row are written here in a fraction of what pydantic's serializers take for
them (docs/performance.md, "Status events and rows written by msgspec"), as the same bytes:
the same keys in the same order, times as RFC 3339 with `Z` for UTC and microseconds only
when there are some, strings escaped alike. One spelling differs: a number written with an
exponent has no plus sign in it (`1e20` where pydantic writes `1e+20`), the same number
to any JSON reader. Infinity and NaN, which no input carries, are written as `null`.
`tests/test_encoding.py` checks both serializers against each other over generated values.

The worker's own values (a run row, a job state's runs and window entries) are handed to
msgspec as structs of their fields (`_plain`): msgspec writes a struct's keys as it made
them once, where a dict of the fields (`Value.as_dict`) was built for each value and its
keys escaped again each time (a run row in 0.39 µs instead of 0.69).

Whatever msgspec cannot encode goes to pydantic's serializer, as before. Everything the
worker reads is still validated by pydantic. A hot module (`worker.compiled`).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from pydantic import TypeAdapter

from schemas import RUN_ROW_PREFIX, Source, StatusEvent
from worker.core.jobstate import Decided, EndedRun, JobState, Run
from worker.core.runs import RunRow
from worker.core.values import Value

# What msgspec raises for a value it cannot write (a type it does not know, nesting past
# its depth): pydantic's serializer then writes it, or fails as it always did.
_CANNOT = (TypeError, ValueError, RecursionError, msgspec.EncodeError)


def _struct(value_class: type[Value]) -> Any:
    """A msgspec struct class of `value_class`'s fields, in order, of any type; not tracked
    by the garbage collector (one lives only while its value is written)."""
    fields = [(name, Any) for name in value_class.FIELDS]
    return msgspec.defstruct(f"{value_class.__name__}Fields", fields, gc=False)


_RUN_ROW: Final[Any] = _struct(RunRow)
_RUN: Final[Any] = _struct(Run)
_DECIDED: Final[Any] = _struct(Decided)
_ENDED: Final[Any] = _struct(EndedRun)
# A head is the state without its windows (rows of their own) and without the index of its
# idempotency window, which is never written (`JobState.decided_index`): its other fields.
_NO_WINDOWS = {"decided": True, "ended": True}
_HEAD: Final[Any] = msgspec.defstruct(
    "JobStateHead", [(n, Any) for n in JobState.FIELDS if n not in _NO_WINDOWS], gc=False
)


def _plain(value: Any) -> Any:
    """What msgspec writes for a value it does not know: an event's source as its fields (a
    frozen model: its `__dict__`), a value a transition writes as a struct of its fields,
    in order (`_struct`; any other `Value` as the dict of them)."""
    if isinstance(value, Run):
        return _RUN(
            value.run_id,
            value.job_type,
            value.client_id,
            value.request_id,
            value.status,
            value.started_at,
            value.initial_data,
            value.scope,
            value.deadline,
            value.size,
            value.was_queued,
        )
    if isinstance(value, Decided):
        return _DECIDED(value.request_id, value.type, value.run_id)
    if isinstance(value, EndedRun):
        return _ENDED(value.run_id, value.status, value.ended_at)
    if isinstance(value, RunRow):
        return _row_fields(value)
    if type(value) is Source:
        return value.__dict__
    if isinstance(value, Value):  # a queued start: a queue is seldom written
        return value.as_dict()
    raise TypeError(f"{type(value).__name__} is not written by msgspec")


def _row_fields(row: RunRow) -> Any:
    return _RUN_ROW(
        row.run_id,
        row.job_type,
        row.client_id,
        row.request_id,
        row.status,
        row.partition,
        row.started_at,
        row.ended_at,
        row.initial_data,
        row.metrics,
        row.reason,
    )


_ENCODE = msgspec.json.Encoder(enc_hook=_plain).encode

# The worker's adapters of a job state and a run row (`stored`, `staterows` and `changelog`
# use them too: one schema built for each at start-up).
STATE: TypeAdapter[JobState] = TypeAdapter(JobState)
RUN: TypeAdapter[RunRow] = TypeAdapter(RunRow)
_EVENT_JSON = StatusEvent.__pydantic_serializer__.to_json
_RUN_JSON = RUN.serializer.to_json
_STATE_JSON = STATE.serializer.to_json
_ANY_JSON = TypeAdapter(Any).serializer.to_json


def event_json(event: StatusEvent) -> bytes:
    """A status event's JSON (`StatusEvent` is a frozen model: its `__dict__` is its fields,
    in their order)."""
    try:
        return _ENCODE(event.__dict__)
    except _CANNOT:
        return _EVENT_JSON(event)


def run_json(row: RunRow) -> bytes:
    """A run row's JSON, as in its changelog row."""
    try:
        return _ENCODE(_row_fields(row))
    except _CANNOT:
        return _RUN_JSON(row)


def run_row(row: RunRow) -> tuple[bytes, bytes]:
    """(key, value) of a run's changelog row (`worker.engine.changelog`'s format), here in a
    compiled module: every transition writes one."""
    return row.run_id.encode(), RUN_ROW_PREFIX + run_json(row) + b"}"


def head_json(state: JobState) -> bytes:
    """A job state's JSON without its windows: its head row (`stored.head`)."""
    try:
        return _ENCODE(
            _HEAD(state.job_type, state.active, state.queue, state.ended_next, state.decided_next)
        )
    except _CANNOT:
        return _STATE_JSON(state, exclude=_NO_WINDOWS)


def value_json(value: Any) -> bytes:
    """The JSON of a window entry (`Decided`, `EndedRun`), or of a JSON value as read
    (initial data, metrics)."""
    try:
        return _ENCODE(value)
    except _CANNOT:
        return _ANY_JSON(value)
