"""`worker.core.wire.made`: a wire model from values the worker made, as validation makes it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from schemas import EventType, Source, StatusEvent
from worker.core.runs import RunRow, changed
from worker.core.wire import made
from worker.engine.codec import InputRecord


def test_a_made_model_serializes_in_declaration_order_with_its_defaults() -> None:
    at = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    source = Source(topic="jobs.requests", partition=2, offset=7)
    event = made(
        StatusEvent,
        job_type="nightly",
        event_id="e-1",
        occurred_at=at,
        type=EventType.REFUSED,
        source=source,
        reason="busy",
    )
    expected = StatusEvent(
        event_id="e-1", type=EventType.REFUSED, job_type="nightly", occurred_at=at, source=source
    ).model_copy(update={"reason": "busy"})
    assert event.model_dump_json() == expected.model_dump_json()
    assert event == StatusEvent(**dict(event))
    with pytest.raises(ValueError, match="frozen"):
        event.reason = "other"  # type: ignore[misc]


def test_a_name_that_is_no_field_is_refused() -> None:
    with pytest.raises(TypeError, match="no field eventId"):
        made(Source, topic="t", partition=0, offset=0, eventId="x")


def test_a_record_source_is_the_validated_one() -> None:
    record = InputRecord("requests", "jobs.requests", 3, 41, 1_764_640_000_000, b"k", b"{}")
    assert record.source == Source(topic="jobs.requests", partition=3, offset=41)
    assert (
        record.source.model_dump_json()
        == Source(topic="jobs.requests", partition=3, offset=41).model_dump_json()
    )


def test_a_run_row_changes_only_what_an_event_changes() -> None:
    at = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    row = RunRow("r", "nightly", None, "q", "RUNNING", 0, at, None, {"a": 1}, None, None)  # type: ignore[arg-type]
    ended = changed(row, {"status": "COMPLETED", "ended_at": at, "reason": None})
    assert (ended.status, ended.ended_at, ended.initial_data) == ("COMPLETED", at, {"a": 1})
    with pytest.raises(TypeError, match="cannot change"):
        changed(row, {"partition": 3})
