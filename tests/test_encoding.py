"""The JSON written by msgspec (`worker.engine.encoding`) is pydantic's, byte for byte."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pydantic import TypeAdapter

from schemas import DeadLetterReason, EventType, RunStatus, Source, StatusEvent
from worker.core.jobstate import Decided, EndedRun, JobState, Queued, Run
from worker.core.runs import RunRow
from worker.engine import encoding, stored

SETTINGS = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
STATE = TypeAdapter(JobState).serializer.to_json
WINDOWS = {"decided": True, "ended": True}


def _floats(exponents: bool) -> st.SearchStrategy[float]:
    finite = st.floats(allow_nan=False, allow_infinity=False)
    return finite if exponents else finite.filter(lambda f: "e" not in repr(f))


def _values(exponents: bool) -> st.SearchStrategy[Any]:
    """JSON values as a record's payload holds them once read: any text, any integer."""
    return st.recursive(
        st.none() | st.booleans() | st.integers() | _floats(exponents) | st.text(),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )


def _payloads(exponents: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.text(max_size=8), _values(exponents), max_size=4)


names = st.text(min_size=1, max_size=12)
maybe_names = st.none() | names
statuses = st.sampled_from(list(RunStatus))
times = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(8999, 1, 1), timezones=st.just(UTC)
)
sources = st.builds(
    Source, topic=names, partition=st.integers(0, 2**31), offset=st.integers(0, 2**62)
)


@st.composite
def events(draw: st.DrawFn, exponents: bool = False) -> StatusEvent:
    payloads = _payloads(exponents)
    return StatusEvent(
        event_id=draw(names),
        type=draw(st.sampled_from(list(EventType))),
        status=draw(st.none() | statuses),
        from_status=draw(st.none() | statuses),
        request_id=draw(maybe_names),
        job_type=draw(names),
        client_id=draw(maybe_names),
        run_id=draw(maybe_names),
        reason=draw(st.none() | st.text()),
        metrics=draw(st.none() | payloads),
        initial_data=draw(st.none() | payloads),
        started_at=draw(st.none() | times),
        original_type=draw(st.none() | st.sampled_from(list(EventType))),
        occurred_at=draw(times),
        source=draw(st.none() | sources),
    )


@st.composite
def run_rows(draw: st.DrawFn) -> RunRow:
    return RunRow(
        draw(names),
        draw(names),
        draw(maybe_names),
        draw(maybe_names),
        draw(statuses),
        draw(st.integers(0, 2**31)),
        draw(times),
        draw(st.none() | times),
        draw(_payloads()),
        draw(st.none() | _payloads()),
        draw(st.none() | st.text()),
    )


runs = st.builds(
    Run,
    run_id=names,
    job_type=names,
    client_id=maybe_names,
    request_id=names,
    status=statuses,
    started_at=times,
    initial_data=_payloads(),
    scope=st.text(max_size=8),
    deadline=st.none() | times,
    size=st.integers(0, 2**20),
    was_queued=st.booleans(),
)
queued = st.builds(
    Queued,
    run_id=names,
    request_id=names,
    client_id=maybe_names,
    scope=st.text(max_size=8),
    queued_at=times,
    size=st.integers(0, 2**20),
    initial_data=_payloads(),
)
decided = st.builds(
    Decided, request_id=names, type=st.sampled_from(list(EventType)), run_id=maybe_names
)
ended = st.builds(EndedRun, run_id=names, status=statuses, ended_at=times)
states = st.builds(
    JobState,
    job_type=names,
    active=st.lists(runs, max_size=3).map(tuple),
    queue=st.lists(queued, max_size=3).map(tuple),
    ended=st.lists(ended, max_size=3).map(tuple),
    decided=st.lists(decided, max_size=3).map(tuple),
    ended_next=st.integers(0, 2**40),
    decided_next=st.integers(0, 2**40),
)


@SETTINGS
@given(events())
def test_a_status_event_is_written_as_pydantic_writes_it(event: StatusEvent) -> None:
    assert encoding.event_json(event) == event.model_dump_json().encode()


@SETTINGS
@given(run_rows())
def test_a_run_row_is_written_as_pydantic_writes_it(row: RunRow) -> None:
    assert encoding.run_json(row) == TypeAdapter(RunRow).dump_json(row)


@SETTINGS
@given(states)
def test_a_head_is_the_state_without_its_windows_as_pydantic_writes_it(state: JobState) -> None:
    head = encoding.head_json(state)
    assert head == STATE(state, exclude=WINDOWS)
    assert stored.head(state) == head
    assert list(json.loads(head)) == ["job_type", "active", "queue", "ended_next", "decided_next"]


@SETTINGS
@given(st.one_of(decided, ended, _payloads()))
def test_entries_and_payloads_are_written_as_pydantic_writes_them(value: Any) -> None:
    # A window entry by its own type's schema (as the changelog reads it), a payload as any.
    kind = type(value) if isinstance(value, Decided | EndedRun) else Any
    assert encoding.value_json(value) == TypeAdapter(kind).dump_json(value)


@SETTINGS
@given(events(exponents=True))
def test_numbers_with_an_exponent_differ_only_by_their_plus_sign(event: StatusEvent) -> None:
    ours, theirs = encoding.event_json(event), event.model_dump_json().encode()
    assert json.loads(ours) == json.loads(theirs)
    assert StatusEvent.model_validate_json(ours) == event


def test_the_one_spelling_that_differs() -> None:
    assert encoding.value_json({"big": 1e20, "small": 1e-7}) == b'{"big":1e20,"small":1e-7}'
    assert TypeAdapter(Any).dump_json({"big": 1e20}) == b'{"big":1e+20}'
    assert encoding.value_json([math.inf, -math.inf, math.nan]) == b"[null,null,null]"


def test_what_msgspec_cannot_write_pydantic_writes() -> None:
    reason = DeadLetterReason(code="bad", message="a model inside a payload")
    value = {"reason": reason}
    assert encoding.value_json(value) == TypeAdapter(Any).dump_json(value)
    at = datetime(2026, 12, 6, 1, 2, 3, 1000, tzinfo=UTC)
    event = StatusEvent(
        event_id="e",
        type=EventType.STARTED,
        job_type="j",
        occurred_at=at,
        metrics={"reason": reason},
        started_at=at - timedelta(seconds=1),
    )
    assert encoding.event_json(event) == event.model_dump_json().encode()


def test_a_value_neither_can_write_fails_as_pydantic_fails() -> None:
    with pytest.raises(ValueError, match="Unable to serialize"):
        encoding.value_json({"x": object()})


def _nested(depth: int) -> Any:
    value: Any = 0
    for n in range(depth):
        value = [value] if n % 2 else {"k": value}
    return value


def test_deep_and_huge_payloads_are_written_as_pydantic_writes_them() -> None:
    for value in (_nested(200), {"x": "\u00e9\x00\x1f" * 300_000}, {"n": 10**400}):
        assert encoding.value_json(value) == TypeAdapter(Any).dump_json(value)
    with pytest.raises(ValueError, match="depth exceeded"):  # past both serializers' depth
        encoding.value_json(_nested(5_000))


def test_each_native_value_lists_its_fields_once_for_all() -> None:
    """A native value class names its fields in `FIELDS`, in its shape for pydantic
    (`worker.core.shapes`) and, in the hot classes, in `as_dict` (`__slots__`, which mypy
    checks, besides). A field added to one and not the others would be dropped where it is
    read back or written out, so they must agree, in order."""
    from typing import get_type_hints

    from worker.core.shapes import SHAPES

    for cls, shape in SHAPES.items():
        assert tuple(get_type_hints(shape)) == cls.FIELDS, cls.__name__
        built = TypeAdapter(cls).validate_python(_SAMPLES[cls])
        assert tuple(built.as_dict()) == cls.FIELDS, cls.__name__
    # A job state's head row: every field but its windows, in order.
    state = TypeAdapter(JobState).validate_python(_SAMPLES[JobState])
    head = [name for name in JobState.FIELDS if name not in ("decided", "ended")]
    assert list(json.loads(encoding.head_json(state))) == head


_AT = "2026-12-06T12:00:00Z"
_RUN = {
    "run_id": "r",
    "job_type": "t",
    "client_id": None,
    "request_id": "q",
    "status": "RUNNING",
    "started_at": _AT,
}
_SAMPLES: dict[type, dict[str, Any]] = {
    Run: _RUN,
    Queued: {"run_id": "r", "request_id": "q", "client_id": None, "scope": "", "queued_at": _AT},
    EndedRun: {"run_id": "r", "status": "COMPLETED", "ended_at": _AT},
    Decided: {"request_id": "q", "type": "started", "run_id": "r"},
    JobState: {"job_type": "t", "active": [_RUN]},
    RunRow: {
        **_RUN,
        "request_id": "q",
        "partition": 0,
        "ended_at": None,
        "initial_data": {},
        "metrics": None,
        "reason": None,
    },
}
