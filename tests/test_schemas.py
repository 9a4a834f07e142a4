"""Wire models: JSON Schema files in step with the models, and the models' input rules."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

import schemas
from schemas import (
    ALL_MODELS,
    SCHEMA_DIR,
    DeadLetter,
    DeadLetterReason,
    EventType,
    Header,
    JobRequest,
    JobResult,
    RunStatus,
    Source,
    StatusEvent,
)

AT = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
DOCUMENTS = schemas.json_schema_documents()


@pytest.mark.parametrize(("name", "text"), sorted(DOCUMENTS.items()))
def test_schema_file_matches_models(name: str, text: str) -> None:
    """Each JSON Schema file on disk is exactly what the models generate."""
    path = SCHEMA_DIR / name
    assert path.exists(), f"{path} is missing: run `jobctl schemas export`"
    assert path.read_text() == text, (
        f"{path} is out of date with schemas/messages.py: run `jobctl schemas export`"
    )


def test_every_model_has_a_schema_document() -> None:
    """There is one schema document per wire model, each a valid JSON object with its $id."""
    assert set(DOCUMENTS) == {f"{name}.schema.json" for name in ALL_MODELS} | {"asyncapi.json"}
    for name, text in DOCUMENTS.items():
        if name == "asyncapi.json":
            continue
        document = json.loads(text)
        assert document["$id"] == name
        assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_no_stray_schema_files() -> None:
    """Every schema file in schemas/ belongs to a model (a removed model leaves no file)."""
    on_disk = {path.name for path in SCHEMA_DIR.glob("*.json")}
    assert on_disk == set(DOCUMENTS)


def test_export_writes_the_documents(tmp_path: Path) -> None:
    """export_json_schemas writes exactly the generated documents."""
    written = schemas.export_json_schemas(tmp_path)
    assert {path.name for path in written} == set(DOCUMENTS)
    for path in written:
        assert path.read_text() == DOCUMENTS[path.name]


# --- requests ---------------------------------------------------------------------------------


def test_request_defaults() -> None:
    """A request with only a job type is a start with no IDs and empty initial data."""
    request = JobRequest.model_validate({"job_type": "a"})
    assert request.kind == "start"
    assert request.request_id is None
    assert request.client_id is None
    assert request.initial_data == {}
    assert request.run_id is None


def test_request_camel_case_equals_snake_case() -> None:
    """The seed's camelCase names give the same request as snake_case."""
    snake = JobRequest.model_validate(
        {"request_id": "r", "job_type": "a", "client_id": "c", "initial_data": {"x": 1}}
    )
    camel = JobRequest.model_validate(
        {"requestId": "r", "jobType": "a", "clientId": "c", "initialData": {"x": 1}}
    )
    assert snake == camel


def test_request_round_trip_is_snake_case() -> None:
    """A request serializes with snake_case names and reads back equal."""
    request = JobRequest(
        kind="cancel", request_id="r", job_type="a", client_id="c", run_id="250102-030405-0.1"
    )
    data = json.loads(request.model_dump_json())
    assert "job_type" in data
    assert "jobType" not in data
    assert JobRequest.model_validate(data) == request
    assert JobRequest.model_validate_json(request.model_dump_json()) == request


def test_request_strips_identifiers() -> None:
    """Job type, client ID and request ID are stripped of surrounding whitespace."""
    request = JobRequest.model_validate({"request_id": " r ", "job_type": " a ", "client_id": " c"})
    assert (request.request_id, request.job_type, request.client_id) == ("r", "a", "c")


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"job_type": ""},
        {"job_type": "   "},
        {"job_type": "two words"},
        {"job_type": "x" * 201},
        {"job_type": "a", "client_id": "has space"},
        {"job_type": "a", "request_id": ""},
        {"job_type": "a", "kind": "stop"},
        {"job_type": "a", "initial_data": [1]},
        {"job_type": "a", "unknown": 1},
        {"job_type": "a", "JobType": "a"},
    ],
)
def test_request_invalid(data: dict[str, Any]) -> None:
    """Missing, empty, oversized, mistyped and unknown fields are rejected."""
    with pytest.raises(ValidationError):
        JobRequest.model_validate(data)


# --- results ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [("COMPLETED", "COMPLETED"), ("completed", "COMPLETED"), (" Failed ", "FAILED")],
)
def test_result_status_is_upper_cased(given: str, expected: str) -> None:
    """A result's status is upper-cased and stripped before validation."""
    result = JobResult.model_validate({"job_type": "a", "run_id": "r", "status": given})
    assert result.status == expected


def test_result_camel_case_equals_snake_case() -> None:
    """The seed's camelCase names give the same result as snake_case."""
    snake = JobResult.model_validate(
        {
            "job_type": "a",
            "run_id": "r",
            "status": "FAILED",
            "final_metrics": {"e": 1},
            "request_id": "q",
        }
    )
    camel = JobResult.model_validate(
        {
            "jobType": "a",
            "runId": "r",
            "status": "failed",
            "finalMetrics": {"e": 1},
            "requestId": "q",
        }
    )
    assert snake == camel


def test_result_round_trip() -> None:
    """A result serializes and reads back equal."""
    result = JobResult(job_type="a", run_id="r", status="COMPLETED", final_metrics={"n": [1, 2]})
    assert JobResult.model_validate_json(result.model_dump_json()) == result


def test_progress_needs_no_status() -> None:
    """A progress record, with or without metrics, needs no status."""
    heartbeat = JobResult.model_validate({"kind": "progress", "job_type": "a", "run_id": "r"})
    assert heartbeat.metrics is None
    progress = JobResult.model_validate(
        {"kind": "progress", "job_type": "a", "run_id": "r", "metrics": {"done": 3}}
    )
    assert progress.metrics == {"done": 3}


@pytest.mark.parametrize(
    "data",
    [
        {"job_type": "a", "run_id": "r"},
        {"job_type": "a", "run_id": "r", "status": "DONE"},
        {"job_type": "a", "run_id": "r", "status": "RUNNING"},
        {"job_type": "a", "run_id": "r", "status": 1},
        {"job_type": "a", "status": "COMPLETED"},
        {"job_type": "a", "run_id": " ", "status": "COMPLETED"},
        {"run_id": "r", "status": "COMPLETED"},
        {"job_type": "a", "run_id": "r", "status": "COMPLETED", "finalmetrics": {}},
    ],
)
def test_result_invalid(data: dict[str, Any]) -> None:
    """A result without a valid status, run ID or job type, or with unknown fields, is invalid."""
    with pytest.raises(ValidationError):
        JobResult.model_validate(data)


# --- outputs ----------------------------------------------------------------------------------


def _event() -> StatusEvent:
    return StatusEvent(
        event_id="e-1",
        type=EventType.COMPLETED,
        status=RunStatus.COMPLETED,
        from_status=RunStatus.RUNNING,
        request_id="q",
        job_type="a",
        client_id="c",
        run_id="250102-030405-0.1",
        metrics={"n": 1},
        started_at=AT,
        occurred_at=AT,
        source=Source(topic="jobs.results", partition=0, offset=3),
    )


def _letter() -> DeadLetter:
    return DeadLetter(
        reason=DeadLetterReason(code="malformed_json", message="not JSON"),
        source=Source(topic="jobs.requests", partition=1, offset=2),
        key="YQ==",
        value=None,
        headers=(Header(key="h", value="AA=="), Header(key="n", value=None)),
        dead_lettered_at=AT,
    )


def test_status_event_round_trip() -> None:
    """A status event serializes with string enums and reads back equal."""
    event = _event()
    data = json.loads(event.model_dump_json())
    assert data["type"] == "completed"
    assert data["status"] == "COMPLETED"
    assert data["from_status"] == "RUNNING"
    assert StatusEvent.model_validate_json(event.model_dump_json()) == event


def test_dead_letter_round_trip() -> None:
    """A dead letter serializes and reads back equal, headers included."""
    letter = _letter()
    assert DeadLetter.model_validate_json(letter.model_dump_json()) == letter


def test_source_rejects_negative_coordinates() -> None:
    """A source's partition and offset cannot be negative."""
    with pytest.raises(ValidationError):
        Source(topic="t", partition=-1, offset=0)
    with pytest.raises(ValidationError):
        Source(topic="t", partition=0, offset=-1)


@pytest.mark.parametrize(
    ("model", "field"),
    [
        (JobRequest.model_validate({"job_type": "a"}), "job_type"),
        (JobResult.model_validate({"job_type": "a", "run_id": "r", "status": "FAILED"}), "status"),
        (_event(), "run_id"),
        (_letter(), "reason"),
        (Source(topic="t", partition=0, offset=0), "offset"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseModel) else str(v),
)
def test_models_are_frozen(model: BaseModel, field: str) -> None:
    """Wire models cannot be changed after creation."""
    with pytest.raises(ValidationError, match="frozen"):
        setattr(model, field, None)


def test_models_are_hashable_when_fields_are() -> None:
    """Frozen models without dict fields can be used as set members."""
    assert (
        len({Source(topic="t", partition=0, offset=0), Source(topic="t", partition=0, offset=0)})
        == 1
    )


def test_the_asyncapi_document_describes_every_topic_and_resolves() -> None:
    """Five channels at the five topic addresses; every reference resolves, to the message
    components or to a schema file beside it; the status headers list every event type."""
    import json

    from schemas import SCHEMA_DIR, EventType
    from worker.settings import Topics

    doc = json.loads((SCHEMA_DIR / "asyncapi.json").read_text())
    assert doc["asyncapi"].startswith("3.")
    topics = Topics.for_prefix("jobs")
    addresses = {c["address"].replace("{prefix}", "jobs") for c in doc["channels"].values()}
    assert addresses == set(topics.all())

    def resolve(ref: str) -> object:
        if ref.startswith("./"):
            assert (SCHEMA_DIR / ref[2:]).exists(), ref
            return json.loads((SCHEMA_DIR / ref[2:]).read_text())
        node: object = doc
        for part in ref.removeprefix("#/").split("/"):
            assert isinstance(node, dict)
            node = node[part]
        return node

    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
            return found + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(doc):
        assert resolve(ref) is not None
    headers = doc["components"]["messages"]["StatusEvent"]["headers"]["properties"]
    assert set(headers["ce_type"]["enum"]) == {f"job-orchestrator.{t.value}" for t in EventType}
    actions = {name: op["action"] for name, op in doc["operations"].items()}
    assert actions["receive_requests"] == actions["receive_results"] == "receive"
    assert {actions[f"send_{c}"] for c in ("status", "state", "dlq")} == {"send"}


def test_a_status_event_its_readers_cannot_fold_is_refused_where_it_is_read() -> None:
    """`read_status_event` refuses, with a ValueError saying why, every record `misshapen`
    makes, and reads the orchestrator's own events as they were written; `replay` keeps the
    latter only, and the client's rows and view marks refuse times no reader can use."""
    from tests.test_console import lifecycle, misshapen
    from worker.audit.replay import parse_events

    good = [e for n in range(1, 8) for e in lifecycle(n)]
    bad = misshapen(*lifecycle(1))
    for value in bad:
        with pytest.raises(ValueError):  # noqa: PT011 (each has its own message)
            schemas.read_status_event(value)
    with pytest.raises(ValueError, match="has no UTC offset"):
        schemas.read_status_event(
            good[0].model_dump_json().replace("+00:00", "").replace("Z", "").encode()
        )
    for event in good:
        assert schemas.read_status_event(event.model_dump_json().encode()) == event
    assert parse_events([*bad, *(e.model_dump_json().encode() for e in good)]) == good

    row = schemas.RunRecord.model_validate(
        {
            "run_id": "r",
            "job_type": "etl",
            "client_id": None,
            "request_id": None,
            "status": "RUNNING",
            "partition": 0,
            "started_at": "2026-11-20T10:00:00+00:00",
            "ended_at": None,
            "initial_data": {},
            "metrics": None,
            "reason": None,
        }
    )
    for at in ("2026-11-20T10:00:00", "0001-01-01T00:00:00+00:00", "9999-12-31T23:59:59-05:00"):
        with pytest.raises(ValidationError):
            schemas.RunRecord.model_validate({**row.model_dump(), "started_at": at})
        with pytest.raises(ValidationError):
            schemas.ViewMark.model_validate({"since": at, "every_s": 60})


def test_a_status_event_with_nan_is_refused_and_other_offsets_are_read_as_utc() -> None:
    """NaN and Infinity, which pydantic's parser takes and JSON has not (a console would
    serve them as invalid JSON), are refused at any depth of the data; the words as text
    are not. A time written with another offset than UTC is read as the same instant in
    UTC, so that it is stored and filtered as the orchestrator's own times are."""
    from tests.test_console import lifecycle

    started = lifecycle(1)[0]
    text = started.model_dump_json()
    for data in ('{"x": NaN}', '{"a": [1, {"b": -Infinity}]}', '{"y": Infinity}'):
        forged = text.replace('"initial_data":{"n":1}', f'"initial_data":{data}')
        assert forged != text
        with pytest.raises(ValueError, match="NaN or Infinity"):
            schemas.read_status_event(forged.encode())
        with pytest.raises(ValueError, match="NaN or Infinity"):
            schemas.read_status_event(forged)
    words = text.replace('"initial_data":{"n":1}', '"initial_data":{"NaN":"Infinity"}')
    assert schemas.read_status_event(words.encode()).initial_data == {"NaN": "Infinity"}
    assert started.started_at is not None
    local = started.started_at.astimezone(timezone(timedelta(hours=-11)))
    shifted = started.model_copy(update={"started_at": local, "occurred_at": local})
    read = schemas.read_status_event(shifted.model_dump_json().encode())
    assert read.started_at == started.started_at
    assert read.started_at is not None
    assert read.started_at.utcoffset() == timedelta(0)
    assert read.occurred_at.utcoffset() == timedelta(0)


def test_status_and_event_type_members_keep_their_values_and_serialize_as_them() -> None:
    """Both enums read `value` through a C attribute getter (pydantic-core serializes a member
    by it): the members, their values and lookups by value are as a plain `StrEnum`'s."""
    for enum in (RunStatus, EventType):
        plain = StrEnum("Plain", {m.name: str(m) for m in enum})  # type: ignore[misc]
        assert [(m.name, m.value) for m in enum] == [(m.name, m.value) for m in plain]
        for member in enum:
            assert type(member.value) is str
            assert member.value == str(member) == member
            assert enum(member.value) is member
    event = StatusEvent(
        event_id="e",
        type=EventType.COMPLETED,
        job_type="report",
        occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
        status=RunStatus.COMPLETED,
        from_status=RunStatus.RUNNING,
    )
    assert b'"type":"completed"' in event.model_dump_json().encode()
    assert event.model_dump(mode="json")["from_status"] == "RUNNING"
