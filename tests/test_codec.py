"""Decoding input records: commands for good input, re-routes for misplaced input, dead letters."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner, murmur2 as aiokafka_murmur2
from hypothesis import HealthCheck, given, settings, strategies as st

from schemas import DeadLetter, RunStatus, Source
from tests.hostile import hostile_records
from worker.core.lifecycle import Cancel, Command, Finish, Progress, Start, run_size
from worker.core.limits import InputLimits
from worker.engine import codec
from worker.engine.codec import (
    MAX_DEAD_LETTER_VALUE,
    Bad,
    InputRecord,
    Reroute,
    TopicRole,
    dead_letter,
    decode,
    nesting_depth_over,
    partition_for,
)
from worker.settings import Topics

PARTITIONS = 6
MAX_BYTES = 1024
JOB = "post_scoring"
TIMESTAMP_MS = 1_735_787_045_250  # 2025-01-02 03:04:05.250 UTC
AT = datetime(2025, 1, 2, 3, 4, 5, 250_000, tzinfo=UTC)
NOW = datetime(2025, 1, 2, 3, 5, 0, tzinfo=UTC)
RUN_ID = "250102-030405-5.17"


def p(key: str) -> int:
    """The partition `key` belongs to."""
    return partition_for(key.encode(), PARTITIONS)


def wrong_p(key: str) -> int:
    """A partition `key` does not belong to."""
    return (p(key) + 1) % PARTITIONS


def record(
    value: bytes | dict[str, Any] | list[Any] | None,
    *,
    role: TopicRole = "requests",
    key: bytes | None = JOB.encode(),
    partition: int | None = None,
    offset: int = 17,
    headers: Sequence[tuple[str, bytes | None]] = (),
) -> InputRecord:
    """An input record; dicts and lists are encoded as JSON, keys default to the right partition."""
    if isinstance(value, dict | list):
        value = json.dumps(value).encode()
    if partition is None:
        partition = partition_for(key or b"", PARTITIONS)
    return InputRecord(
        role=role,
        topic=f"jobs.{role}",
        partition=partition,
        offset=offset,
        timestamp_ms=TIMESTAMP_MS,
        key=key,
        value=value,
        headers=headers,
    )


def run(rec: InputRecord) -> Command | Bad | Reroute:
    """Decode `rec` with the test's limits and clock."""
    return decode(rec, partitions=PARTITIONS, limits=InputLimits(record_bytes=MAX_BYTES), now=NOW)


def b64(data: bytes) -> str:
    """Base64 text of `data`."""
    return base64.b64encode(data).decode("ascii")


def test_partition_for_is_stable_and_in_range() -> None:
    """partition_for is murmur2 mod count: deterministic and within the partition count."""
    assert p(JOB) == p(JOB)
    assert all(0 <= partition_for(k.encode(), PARTITIONS) < PARTITIONS for k in ("a", "b", JOB))
    assert partition_for(JOB.encode(), 1) == 0


def test_murmur2_is_the_java_clients_on_any_bytes() -> None:
    """Our murmur2 (compiled with machine integers) equals aiokafka's, the Java client's
    port, on keys of every length and byte, hostile ones among them; and so the partition
    a keyed record is routed to is the one aiokafka's default partitioner picks."""
    rng = random.Random(20261204)
    keys = [rng.randbytes(rng.randrange(0, 64)) for _ in range(5_000)]
    keys += [b"", b"\x00", b"\xff" * 3, b"\xff" * 4, b"\xff" * 1_001, "é".encode() * 9]
    hostile = hostile_records(Topics.for_prefix("jobs"), PARTITIONS, 60)
    keys += [part for r in hostile for part in (r.key, r.value) if part is not None]
    assert [codec.murmur2(k) for k in keys] == [aiokafka_murmur2(k) & 0xFFFFFFFF for k in keys]
    picker = DefaultPartitioner()
    for key in keys[:500]:
        assert partition_for(key, 7) == picker(key, list(range(7)), list(range(7)))


def test_record_time_and_source() -> None:
    """An input record's time is its broker timestamp in UTC; its source is its coordinates."""
    rec = record({"job_type": JOB})
    assert rec.at == AT
    assert rec.source == Source(topic="jobs.requests", partition=p(JOB), offset=17)


# --- good input -------------------------------------------------------------------------------


def test_start_snake_case() -> None:
    """A snake_case start request becomes a Start with the record's time and coordinates."""
    rec = record(
        {
            "kind": "start",
            "request_id": "req-1",
            "job_type": JOB,
            "client_id": "acme",
            "initial_data": {"batch": [1, 2], "deep": {"x": None}},
        }
    )
    assert run(rec) == Start(
        request_id="req-1",
        job_type=JOB,
        client_id="acme",
        initial_data={"batch": [1, 2], "deep": {"x": None}},
        at=AT,
        source=rec.source,
        size=run_size(len(rec.value or b""), "acme"),
    )


def test_start_seed_camel_case() -> None:
    """The seed's camelCase names are accepted on a start request."""
    rec = record(
        {"requestId": "req-2", "jobType": JOB, "clientId": "acme", "initialData": {"n": 1}}
    )
    command = run(rec)
    assert isinstance(command, Start)
    assert command.request_id == "req-2"
    assert command.job_type == JOB
    assert command.client_id == "acme"
    assert command.initial_data == {"n": 1}


def test_start_without_request_id_gets_one_from_its_coordinates() -> None:
    """A start with no request_id gets auto-<partition>.<offset>."""
    rec = record({"job_type": JOB}, offset=4242)
    command = run(rec)
    assert isinstance(command, Start)
    assert command.request_id == f"auto-{p(JOB)}.4242"
    assert command.client_id is None
    assert command.initial_data == {}


@pytest.mark.parametrize("status", ["COMPLETED", "completed", " Completed "])
def test_result_completed(status: str) -> None:
    """A result becomes a Finish with its run ID, upper-cased status and final metrics."""
    rec = record(
        {
            "job_type": JOB,
            "run_id": RUN_ID,
            "status": status,
            "final_metrics": {"scored": 3},
            "request_id": "res-1",
        },
        role="results",
    )
    assert run(rec) == Finish(
        job_type=JOB,
        run_id=RUN_ID,
        status=RunStatus.COMPLETED,
        metrics={"scored": 3},
        request_id="res-1",
        at=AT,
        source=Source(topic="jobs.results", partition=p(JOB), offset=17),
    )


def test_result_failed_camel_case() -> None:
    """A camelCase FAILED result becomes a Finish with status FAILED."""
    rec = record(
        {"jobType": JOB, "runId": RUN_ID, "status": "FAILED", "finalMetrics": {"error": "x"}},
        role="results",
    )
    command = run(rec)
    assert isinstance(command, Finish)
    assert command.status is RunStatus.FAILED
    assert command.metrics == {"error": "x"}
    assert command.request_id is None


def test_value_at_the_size_limit_is_accepted() -> None:
    """A record of exactly max_bytes is decoded."""
    body = {"job_type": JOB, "initial_data": {"pad": ""}}
    pad = MAX_BYTES - len(json.dumps(body).encode())
    body["initial_data"] = {"pad": "x" * pad}
    value = json.dumps(body).encode()
    assert len(value) == MAX_BYTES
    assert isinstance(run(record(value)), Start)


# --- bad input --------------------------------------------------------------------------------

HEADERS: tuple[tuple[str, bytes | None], ...] = (
    ("traceparent", b"00-abc-01"),
    ("binary", b"\x00\xff\xfe"),
    ("empty", None),
)


def bad(rec: InputRecord, code: str) -> Bad:
    """Decode `rec`, check it is a dead letter with `code` that keeps the original record."""
    outcome = run(rec)
    assert isinstance(outcome, Bad), outcome
    letter = outcome.dead_letter
    assert isinstance(letter, DeadLetter)
    assert letter.reason.code == code
    assert letter.reason.message
    assert letter.source == rec.source
    assert letter.key == (None if rec.key is None else b64(rec.key))
    assert letter.value == (None if rec.value is None else b64(rec.value))
    assert [(h.key, h.value) for h in letter.headers] == [
        (k, None if v is None else b64(v)) for k, v in rec.headers
    ]
    assert letter.dead_lettered_at == NOW
    # The dead letter survives its own wire format.
    assert DeadLetter.model_validate_json(letter.model_dump_json()) == letter
    if outcome.reject is not None:
        reject = outcome.reject
        assert reject.reason.startswith(f"{code}: ")
        assert letter.reason.message in reject.reason
        assert reject.at == rec.at
        assert reject.source == rec.source
    return outcome


def test_empty_value() -> None:
    """A record with no value is dead-lettered as empty_value, with no reject."""
    outcome = bad(record(None, headers=HEADERS), "empty_value")
    assert outcome.reject is None


def test_zero_length_value_is_empty() -> None:
    """A record whose value is zero bytes long is dead-lettered as empty_value."""
    bad(record(b""), "empty_value")


def test_oversized() -> None:
    """A value over max_bytes is dead-lettered as oversized, naming both sizes, unparsed."""
    value = json.dumps(
        {"request_id": "req-1", "job_type": JOB, "initial_data": {"pad": "x" * MAX_BYTES}}
    ).encode()
    outcome = bad(record(value, headers=HEADERS), "oversized")
    assert str(len(value)) in outcome.dead_letter.reason.message
    assert str(MAX_BYTES) in outcome.dead_letter.reason.message
    assert outcome.reject is None


def test_a_dead_letter_leaves_out_a_value_too_large_to_forward() -> None:
    """A value over MAX_DEAD_LETTER_VALUE is not copied into the dead letter (it would be
    larger than the broker accepts and stall the partition); the reason says where it is."""
    value = b"{" + b" " * MAX_DEAD_LETTER_VALUE + b"]"
    outcome = decode(
        record(value),
        partitions=PARTITIONS,
        limits=InputLimits(record_bytes=2 * len(value)),
        now=NOW,
    )
    assert isinstance(outcome, Bad)
    letter = outcome.dead_letter
    assert letter.reason.code == "malformed_json"
    assert letter.value is None
    assert f"the {len(value)}-byte value is not copied here" in letter.reason.message
    assert len(letter.model_dump_json()) < 10_000


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (b"{not json", "not JSON"),
        (b'{"job_type": "post_scoring"', "not JSON"),
        (b"   ", "not JSON"),
        (b'{"job_type": "post_scoring"} trailing', "not JSON"),
        (b'{"request_id": "r\xff\xfe", "job_type": "post_scoring"}', "not UTF-8"),
        (b"\xc3\x28", "not UTF-8"),
    ],
)
def test_malformed_json(value: bytes, fragment: str) -> None:
    """A value that is not UTF-8 JSON is dead-lettered as malformed_json with the bytes intact."""
    outcome = bad(record(value, headers=HEADERS), "malformed_json")
    assert fragment in outcome.dead_letter.reason.message
    assert outcome.reject is None
    assert outcome.dead_letter.value is not None
    assert base64.b64decode(outcome.dead_letter.value) == value


@pytest.mark.parametrize(
    "value",
    [
        b'{"job_type": "post_scoring", "request_id": "r", "initial_data": {"x": "\\ud800"}}',
        b'{"job_type": "post_scoring", "request_id": "r", "initial_data": {"\\uDC00": 1}}',
        b'{"job_type": "post_scoring", "request_id": "r", "initial_data": {"x": ["a\\udfffb"]}}',
        b'{"job_type": "post_scoring", "run_id": "r", "status": "COMPLETED", '
        b'"final_metrics": {"x": "\\ud83d"}}',
    ],
)
def test_a_lone_surrogate_escape_is_malformed(value: bytes) -> None:
    """JSON may escape half of a UTF-16 pair alone; Python reads it as a string no UTF-8 can
    carry, so no event could hold it: the record is dead-lettered as malformed_json, saying
    so, rather than failing its batch where the event is written."""
    outcome = bad(record(value), "malformed_json")
    assert "lone UTF-16 surrogate" in outcome.dead_letter.reason.message


def test_a_surrogate_pair_and_an_escaped_backslash_are_text() -> None:
    """An escaped pair is one character, and `\\ud800` escaping the backslash is six."""
    for text in ("\U0001f600", "\\ud800"):
        payload = {"job_type": JOB, "request_id": "r", "initial_data": {"x": text}}
        value = json.dumps(payload).encode()
        assert (b"\\ud83d\\ude00" in value) or (b"\\\\ud800" in value)
        command = run(record(value))
        assert isinstance(command, Start), command
        assert command.initial_data == {"x": text}


def test_utf16_json_is_malformed() -> None:
    """A UTF-16 encoded JSON value is not UTF-8 and is dead-lettered as malformed_json."""
    value = json.dumps({"request_id": "r", "job_type": JOB}).encode("utf-16")
    bad(record(value), "malformed_json")


def test_nan_is_malformed_json() -> None:
    """NaN and Infinity are not JSON; a value using them is dead-lettered as malformed_json."""
    value = b'{"request_id": "r", "job_type": "post_scoring", "initial_data": {"x": NaN}}'
    bad(record(value), "malformed_json")


@pytest.mark.parametrize(
    ("role", "body", "key", "fragment", "reject"),
    [
        pytest.param(
            "requests",
            {"request_id": "req-1", "jobtype": JOB},
            JOB,
            "jobtype",
            ("req-1", None, JOB),
            id="unknown-field-job-type-from-key",
        ),
        pytest.param(
            "requests",
            {"request_id": "req-1", "job_type": JOB, "initial_dat": {}},
            JOB,
            "initial_dat",
            ("req-1", None, JOB),
            id="misspelt-field",
        ),
        pytest.param(
            "requests",
            {"requestId": "req-1", "jobType": JOB, "initialData": []},
            JOB,
            "initialData",  # the error names the field as the sender spelt it
            ("req-1", None, JOB),
            id="camel-case-wrong-type",
        ),
        pytest.param(
            "requests",
            {"request_id": "req-1", "job_type": "has space"},
            "has space",
            "job_type",
            ("req-1", None, "has space"),
            id="job-type-with-space",
        ),
        pytest.param(
            "requests",
            {"request_id": "req-1", "job_type": JOB, "kind": "stop"},
            JOB,
            "kind",
            ("req-1", None, JOB),
            id="unknown-kind-value",
        ),
        pytest.param(
            "requests",
            {"job_type": JOB, "extra": 1},
            JOB,
            "extra",
            None,
            id="no-request-id-no-reject",
        ),
        pytest.param(
            "requests",
            {"request_id": "req-1"},
            None,
            "job_type",
            None,
            id="no-job-type-anywhere-no-reject",
        ),
        pytest.param(
            "requests",
            ["not", "an", "object"],
            JOB,
            "",
            None,
            id="array-not-object",
        ),
        pytest.param(
            "requests",
            {"request_id": 5, "job_type": JOB},
            JOB,
            "request_id",
            None,
            id="request-id-not-text",
        ),
        pytest.param(
            "results",
            {"job_type": JOB, "run_id": RUN_ID},
            JOB,
            "status",
            (None, RUN_ID, JOB),
            id="result-without-status",
        ),
        pytest.param(
            "results",
            {"jobType": JOB, "runId": RUN_ID, "status": "DONE"},
            JOB,
            "status",
            (None, RUN_ID, JOB),
            id="result-bad-status",
        ),
        pytest.param(
            "results",
            {"job_type": JOB, "status": "COMPLETED", "request_id": "res-1"},
            JOB,
            "run_id",
            ("res-1", None, JOB),
            id="result-without-run-id",
        ),
        pytest.param(
            "results",
            {"run_id": RUN_ID, "status": "COMPLETED"},
            JOB,
            "job_type",
            (None, RUN_ID, JOB),
            id="result-job-type-from-key",
        ),
    ],
)
def test_schema_invalid(
    role: TopicRole,
    body: dict[str, Any] | list[Any],
    key: str | None,
    fragment: str,
    reject: tuple[str | None, str | None, str] | None,
) -> None:
    """A value failing the schema is schema_invalid; a Reject only when the sender is known."""
    rec = record(body, role=role, key=None if key is None else key.encode(), headers=HEADERS)
    outcome = bad(rec, "schema_invalid")
    message = outcome.dead_letter.reason.message
    assert message.startswith(f"invalid {'request' if role == 'requests' else 'result'}: ")
    assert fragment in message
    if reject is None:
        assert outcome.reject is None
    else:
        assert outcome.reject is not None
        got = (outcome.reject.request_id, outcome.reject.run_id, outcome.reject.job_type)
        assert got == reject


def test_schema_invalid_message_is_bounded() -> None:
    """A value with many errors gets a summary of the first few, not all of them."""
    body = {f"unknown_{i}": i for i in range(12)} | {"job_type": JOB}
    outcome = bad(record(body), "schema_invalid")
    message = outcome.dead_letter.reason.message
    assert "and 7 more" in message
    assert "unknown_11" not in message


@pytest.mark.parametrize(
    ("key", "role", "body", "reject"),
    [
        pytest.param(
            b"feed_import",
            "requests",
            {"request_id": "req-1", "job_type": JOB},
            ("req-1", None),
            id="other-job-type",
        ),
        pytest.param(b"\xff\xfe", "requests", {"job_type": JOB}, None, id="undecodable-no-id"),
        pytest.param(
            JOB.upper().encode(),
            "results",
            {"job_type": JOB, "run_id": RUN_ID, "status": "FAILED"},
            (None, RUN_ID),
            id="case-differs",
        ),
    ],
)
def test_key_mismatch(
    key: bytes | None,
    role: TopicRole,
    body: dict[str, Any],
    reject: tuple[str | None, str | None] | None,
) -> None:
    """A record not keyed by its job type is key_mismatch; the Reject names the payload's type."""
    rec = record(body, role=role, key=key, partition=p(JOB), headers=HEADERS)
    outcome = bad(rec, "key_mismatch")
    message = outcome.dead_letter.reason.message
    assert repr(JOB) in message
    if reject is None:
        assert outcome.reject is None
    else:
        assert outcome.reject is not None
        assert (outcome.reject.request_id, outcome.reject.run_id) == reject
        assert outcome.reject.job_type == JOB


MISPLACEABLE: list[tuple[TopicRole, dict[str, Any]]] = [
    ("requests", {"job_type": JOB, "request_id": "r-1"}),
    ("requests", {"kind": "cancel", "jobType": JOB, "requestId": "r-1", "runId": RUN_ID}),
    ("results", {"job_type": JOB, "run_id": RUN_ID, "status": "COMPLETED", "request_id": "r-1"}),
    ("results", {"kind": "progress", "job_type": JOB, "run_id": RUN_ID}),
]
MISPLACEABLE_IDS = ["start", "cancel", "result", "heartbeat"]


@pytest.mark.parametrize(("role", "body"), MISPLACEABLE, ids=MISPLACEABLE_IDS)
def test_wrong_partition_is_rerouted(role: TopicRole, body: dict[str, Any]) -> None:
    """A valid record on another partition than its key's murmur2 partition is re-routed there."""
    rec = record(body, role=role, partition=wrong_p(JOB), headers=HEADERS)
    assert run(rec) == Reroute(partition=partition_for(JOB.encode(), PARTITIONS), key=JOB.encode())


@pytest.mark.parametrize(("role", "body"), MISPLACEABLE, ids=MISPLACEABLE_IDS)
@pytest.mark.parametrize("partition", [p(JOB), wrong_p(JOB)], ids=["right", "wrong"])
def test_keyless_record_is_rerouted_with_the_job_type_as_key(
    role: TopicRole, body: dict[str, Any], partition: int
) -> None:
    """A valid keyless record is re-routed, keyed by its job type, even from the right partition."""
    rec = record(body, role=role, key=None, partition=partition)
    assert run(rec) == Reroute(partition=p(JOB), key=JOB.encode())


def test_reroute_targets_each_job_types_own_partition() -> None:
    """Keyless records of different job types arriving on one partition go to their own ones."""
    for job_type in ("a", "b", "report.daily", JOB, "ünïcode"):
        key = job_type.encode()
        outcome = run(record({"job_type": job_type}, key=None, partition=0))
        assert outcome == Reroute(partition=partition_for(key, PARTITIONS), key=key)


# --- cancel and progress ----------------------------------------------------------------------


def test_cancel_by_run_id() -> None:
    """A cancel request naming a run becomes a Cancel with that run ID and the reason."""
    rec = record(
        {
            "kind": "cancel",
            "request_id": "c-1",
            "job_type": JOB,
            "run_id": RUN_ID,
            "reason": "wrong input",
        }
    )
    assert run(rec) == Cancel(
        request_id="c-1",
        job_type=JOB,
        client_id=None,
        run_id=RUN_ID,
        reason="wrong input",
        at=AT,
        source=rec.source,
    )


def test_cancel_by_scope_camel_case() -> None:
    """A camelCase cancel naming no run becomes a Cancel of the job type and client's run."""
    rec = record(
        {"kind": "cancel", "requestId": "c-2", "jobType": JOB, "clientId": "acme", "reason": "x"}
    )
    assert run(rec) == Cancel(
        request_id="c-2",
        job_type=JOB,
        client_id="acme",
        run_id=None,
        reason="x",
        at=AT,
        source=rec.source,
    )


def test_cancel_without_request_id_gets_one_from_its_coordinates() -> None:
    """A cancel with no request_id gets auto-<partition>.<offset>, like a start."""
    command = run(record({"kind": "cancel", "job_type": JOB}, offset=77))
    assert isinstance(command, Cancel)
    assert command.request_id == f"auto-{p(JOB)}.77"
    assert (command.run_id, command.client_id, command.reason) == (None, None, None)


def test_progress_with_metrics() -> None:
    """A progress report becomes a Progress carrying its metrics."""
    rec = record(
        {
            "kind": "progress",
            "job_type": JOB,
            "run_id": RUN_ID,
            "metrics": {"done": 3, "of": 10},
            "request_id": "p-1",
        },
        role="results",
    )
    assert run(rec) == Progress(
        job_type=JOB,
        run_id=RUN_ID,
        metrics={"done": 3, "of": 10},
        request_id="p-1",
        at=AT,
        source=rec.source,
    )


def test_heartbeat_is_progress_without_metrics() -> None:
    """A progress report with no metrics (camelCase here) becomes a heartbeat: metrics None."""
    rec = record(
        {"kind": "progress", "jobType": JOB, "runId": RUN_ID, "requestId": "hb-1"}, role="results"
    )
    assert run(rec) == Progress(
        job_type=JOB, run_id=RUN_ID, metrics=None, request_id="hb-1", at=AT, source=rec.source
    )


@pytest.mark.parametrize(
    ("role", "body", "fragment", "reject"),
    [
        pytest.param(
            "requests",
            {"kind": "cancel", "request_id": "c-1", "job_type": JOB, "reason": ["why"]},
            "reason",
            ("c-1", None),
            id="cancel-reason-not-text",
        ),
        pytest.param(
            "results",
            {"kind": "progress", "job_type": JOB, "run_id": RUN_ID, "metrics": [1]},
            "metrics",
            (None, RUN_ID),
            id="progress-metrics-not-an-object",
        ),
        pytest.param(
            "results",
            {"kind": "progress", "job_type": JOB, "request_id": "p-1"},
            "run_id",
            ("p-1", None),
            id="progress-without-run-id",
        ),
    ],
)
def test_invalid_cancel_or_progress(
    role: TopicRole,
    body: dict[str, Any],
    fragment: str,
    reject: tuple[str | None, str | None],
) -> None:
    """An invalid cancel or progress report is schema_invalid, with a Reject for its sender."""
    outcome = bad(record(body, role=role, headers=HEADERS), "schema_invalid")
    assert fragment in outcome.dead_letter.reason.message
    assert outcome.reject is not None
    assert (outcome.reject.request_id, outcome.reject.run_id) == reject
    assert outcome.reject.job_type == JOB


def test_checks_run_in_order() -> None:
    """Size comes before JSON, schema before key, and key before re-routing."""
    huge_garbage = b"{" * (MAX_BYTES + 1)
    bad(record(huge_garbage), "oversized")
    invalid_and_miskeyed = record({"request_id": "r", "job_type": JOB, "x": 1}, key=b"other")
    bad(invalid_and_miskeyed, "schema_invalid")
    invalid_and_keyless = record({"request_id": "r", "job_type": JOB, "x": 1}, key=None)
    bad(invalid_and_keyless, "schema_invalid")
    miskeyed_and_misplaced = record(
        {"request_id": "r", "job_type": JOB}, key=b"other", partition=wrong_p(JOB)
    )
    bad(miskeyed_and_misplaced, "key_mismatch")


def test_reject_prefers_payload_ids_to_key() -> None:
    """A Reject takes the job type from the payload when it has one, else from the key."""
    rec = record({"requestId": " req-7 ", "jobType": "feed_import", "x": 1}, key=JOB.encode())
    outcome = bad(rec, "schema_invalid")
    assert outcome.reject is not None
    assert outcome.reject.request_id == "req-7"
    assert outcome.reject.job_type == "feed_import"


@pytest.mark.parametrize(
    ("text", "over"),
    [
        pytest.param(b'{"a": [[[]]]}', False, id="four-deep"),
        pytest.param(b'{"a": [[[[]]]]}', True, id="five-deep"),
        pytest.param(b'{"a": "[[[[[[[[[[[[", "b": [[]]}', False, id="brackets-in-a-string"),
        pytest.param(b'{"a": "\\"[[[[[[", "b": [{}]}', False, id="escaped-quote-then-brackets"),
        pytest.param(b"[]" * 50, False, id="many-shallow"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, True, id="100000-deep"),
        pytest.param(b'{"a": [[[[[[\xff', True, id="not-utf8-still-scanned"),
    ],
)
def test_nesting_depth_is_counted_outside_strings(text: bytes, over: bool) -> None:
    """Brackets inside JSON strings do not count; nesting is scanned, not recursed into."""
    assert nesting_depth_over(text, 4) is over


def test_a_start_nested_100000_deep_is_dead_lettered_too_deep() -> None:
    """Nesting beyond JOBS_MAX_NESTING_DEPTH is a `too_deep` dead letter, not a crash."""
    value = b'{"job_type": "post_scoring", "initial_data": {"a": ' + b"[" * 100_000
    value += b"]" * 100_000 + b"}}"
    outcome = decode(record(value), partitions=PARTITIONS, limits=InputLimits(), now=NOW)
    assert isinstance(outcome, Bad)
    assert outcome.dead_letter.reason.code == "too_deep"
    assert "JOBS_MAX_NESTING_DEPTH" in outcome.dead_letter.reason.message


def test_a_header_name_that_is_not_utf8_is_dead_lettered() -> None:
    """A header name read with its bad bytes escaped is dead-lettered `malformed_header`."""
    name = b"\xff\xfeX".decode("utf-8", "surrogateescape")
    outcome = run(record({"job_type": JOB}, headers=[(name, b"v"), ("ok", None)]))
    assert isinstance(outcome, Bad)
    letter = outcome.dead_letter
    assert letter.reason.code == "malformed_header"
    assert [h.key for h in letter.headers] == ["\ufffd\ufffdX", "ok"]
    letter.model_dump_json()  # publishable: no surrogates left


@pytest.mark.parametrize("role", ["requests", "results"])
def test_data_over_the_limit_is_too_large_and_rejected(role: TopicRole) -> None:
    """`initial_data` or `final_metrics` over JOBS_MAX_DATA_BYTES: dead letter and reject."""
    blob = {"blob": "x" * 2000}
    body: dict[str, Any] = (
        {"job_type": JOB, "request_id": "r1", "initial_data": blob}
        if role == "requests"
        else {"job_type": JOB, "run_id": RUN_ID, "status": "COMPLETED", "final_metrics": blob}
    )
    limits = InputLimits(data_bytes=1000)
    outcome = decode(record(body, role=role), partitions=PARTITIONS, limits=limits, now=NOW)
    assert isinstance(outcome, Bad)
    assert outcome.dead_letter.reason.code == "too_large"
    assert "JOBS_MAX_DATA_BYTES" in outcome.dead_letter.reason.message
    assert outcome.reject is not None
    small = decode(record(body, role=role), partitions=PARTITIONS, limits=InputLimits(), now=NOW)
    assert not isinstance(small, Bad)


@pytest.mark.parametrize("field", ["run_id", "runId"])
def test_a_start_carrying_a_run_id_is_refused_with_a_stable_reason(field: str) -> None:
    """Only the orchestrator assigns run IDs: a start naming one is rejected and starts
    nothing, with the reason code `run_id_not_allowed` (a cancel may name its run)."""
    outcome = run(record({"job_type": JOB, "request_id": "r1", field: RUN_ID}))
    assert isinstance(outcome, Bad)
    assert outcome.dead_letter.reason.code == "run_id_not_allowed"
    assert outcome.reject is not None
    assert outcome.reject.reason.startswith("run_id_not_allowed: ")
    cancel = run(record({"kind": "cancel", "job_type": JOB, "request_id": "r2", field: RUN_ID}))
    assert not isinstance(cancel, Bad)


def test_rejects_never_name_a_huge_job_type_or_key() -> None:
    """A reject names only well-formed IDs, and reasons quote at most a few hundred bytes."""
    huge = "j" * 900_000
    body = {"job_type": huge, "run_id": RUN_ID, "status": "COMPLETED", "request_id": "r1"}
    outcome = decode(
        record(body, role="results", key=b"k" * 500_000),
        partitions=PARTITIONS,
        limits=InputLimits(record_bytes=2_000_000),
        now=NOW,
    )
    assert isinstance(outcome, Bad)
    assert outcome.reject is None  # neither the job type nor the key can name the sender
    assert len(outcome.dead_letter.reason.message) < 3000
    letter = outcome.dead_letter
    assert letter.key is not None
    assert letter.value is None
    assert "value is not copied here" in letter.reason.message

    mismatch = decode(
        record({"job_type": JOB, "request_id": "r1"}, key=b"k" * 500_000),
        partitions=PARTITIONS,
        limits=InputLimits(),
        now=NOW,
    )
    assert isinstance(mismatch, Bad)
    assert mismatch.dead_letter.reason.code == "key_mismatch"
    assert "and 499800 more bytes" in mismatch.dead_letter.reason.message
    assert mismatch.reject is not None
    assert len(mismatch.reject.reason) < 3000


def test_a_dead_letter_without_copy_carries_only_the_coordinates() -> None:
    """The last-resort dead letter copies nothing of the record, and says so."""
    letter = dead_letter(
        record(b"x" * 100, headers=[("h", b"v")]), "unprocessable", "boom", NOW, copy=False
    )
    assert (letter.key, letter.value, letter.headers) == (None, None, ())
    assert "nothing of the original" in letter.reason.message
    assert letter.source.offset == 17


def test_a_rerouted_start_without_request_id_keeps_its_origin_as_request_id() -> None:
    """Every re-routed copy of a start sent without a request_id is the same request (its
    ID comes from the original's coordinates), so a second copy is a duplicate, not a
    second run; a forged or malformed origin header is ignored."""
    origin = [("jobs.rerouted-from", b"jobs.requests:3:1234")]
    first = run(record({"job_type": JOB}, offset=50, headers=origin))
    second = run(record({"job_type": JOB}, offset=51, headers=origin))
    assert isinstance(first, Start)
    assert isinstance(second, Start)
    assert first.request_id == second.request_id == "auto-3.1234"
    forged = run(
        record({"job_type": JOB}, offset=52, headers=[("jobs.rerouted-from", b"x" * 9000)])
    )
    assert isinstance(forged, Start)
    assert forged.request_id == f"auto-{p(JOB)}.52"


@pytest.mark.parametrize("kind", ["start", "cancel"])
def test_a_request_may_not_name_itself_as_the_worker_names_requests_without_an_id(
    kind: str,
) -> None:
    """`auto-<partition>.<offset>` is the worker's name for a request sent without an ID: a
    request taking one (to have another producer's request answered as its duplicate) is
    dead-lettered, its sender told why; an ID of another form beginning `auto-` is fine."""
    forged = run(record({"kind": kind, "job_type": JOB, "request_id": f"auto-{p(JOB)}.18"}))
    assert isinstance(forged, Bad)
    assert forged.dead_letter.reason.code == "schema_invalid"
    assert "are the worker's own" in forged.dead_letter.reason.message
    assert forged.reject is not None
    assert "request_id" in forged.reject.reason
    for fine_id in ("not-auto-1.2", "auto-renewal-2026-01", "auto-1.2.3", "auto-1"):
        fine = run(record({"kind": kind, "job_type": JOB, "request_id": fine_id}))
        assert not isinstance(fine, Bad), fine_id


def _edge_values() -> list[InputRecord]:
    """Records on the border of what the one-pass decode takes, with the right key and
    partition unless the case is about them."""
    start = {"job_type": JOB, "request_id": "r"}
    result = {"job_type": JOB, "run_id": RUN_ID, "status": "COMPLETED"}
    values: list[bytes] = [
        json.dumps(start).encode(),
        json.dumps({**start, "initial_data": {"text": "NaN and Infinity in a string"}}).encode(),
        json.dumps({**start, "initial_data": {"x": 1e308, "y": -0.0, "z": 10**40}}).encode(),
        b'{"job_type": "post_scoring", "request_id": "r", "initial_data": {"x": 1%s}}'
        % (b"0" * 4400),  # more digits than json.loads converts
        b'{"job_type": "post_scoring", "request_id": "r", "initial_data": {"x": 1e999}}',
        b'{"job_type": "post_scoring", "request_id": "r", "initial_data": {"x": -Infinity}}',
        b'{"job_type": "post_scoring", "request_id": "r", "initial_data": {"x": "\\ud800"}}',
        b'{"job_type": "post_scoring", "job_type": "other", "request_id": "r"}',
        b'{"job_type": "post_scoring", "request_id": "r"}  \n',
        b'\xef\xbb\xbf{"job_type": "post_scoring", "request_id": "r"}',
        json.dumps(start).encode("utf-16"),
        json.dumps({**start, "run_id": RUN_ID}).encode(),
        json.dumps({**start, "runId": None}).encode(),
        json.dumps({**start, "kind": "cancel", "run_id": RUN_ID}).encode(),
        json.dumps({**start, "initial_data": {"big": "x" * 900}}).encode(),  # over data_bytes
        json.dumps({**start, "jobType": JOB}).encode(),
        json.dumps({**start, "extra": 1}).encode(),
    ]
    records = [record(v) for v in values]
    records += [
        record(json.dumps(start).encode(), key=b"other"),
        record(json.dumps(start).encode(), key=b"\xff\xfe"),
        record(json.dumps(start).encode(), key=None, partition=p(JOB)),
        record(json.dumps(start).encode(), partition=wrong_p(JOB)),
        record(json.dumps(start).encode(), headers=[("\udcff\udcfe", b"v")]),
        record(json.dumps(result).encode(), role="results"),
        record(
            json.dumps({**result, "kind": "progress", "metrics": {"n": 1}}).encode(), role="results"
        ),
        record(json.dumps({**result, "status": "DONE"}).encode(), role="results"),
        record(json.dumps({**result, "final_metrics": {"x": "y" * 900}}).encode(), role="results"),
    ]
    # What only the models' Python validators check (`codec._plain`): text bounded in UTF-8
    # bytes, the worker's own request IDs, a status spelt otherwise, none on a result.
    for job_type in ("é" * 60, "é" * 150, "x" * 200, "x" * 201, " post_scoring ", "日本"):
        starting = {**start, "job_type": job_type}
        records.append(record(json.dumps(starting).encode(), key=job_type.strip().encode()))
    for request_id in ("auto-1.2", "auto-x", "ü" * 51, "ü" * 100, "r" * 200, " r ", "\u2028"):
        records.append(record(json.dumps({**start, "request_id": request_id}).encode()))
    for client_id in ("ü" * 33, "ü" * 64, "c" * 128, "c" * 129):
        records.append(record(json.dumps({**start, "clientId": client_id}).encode()))
    for status in ("completed", " FAILED ", None, "Failed"):
        for kind in ("result", "progress", None):
            sent: dict[str, Any] = {**result, "status": status}
            if kind is not None:
                sent["kind"] = kind
            records.append(record(json.dumps(sent).encode(), role="results"))
    records.append(
        record(json.dumps({**result, "runId": "ü" * 101, "run_id": None}).encode(), role="results")
    )
    return records


def test_the_one_pass_decode_agrees_with_the_checks_that_explain() -> None:
    """A record pydantic-core validates straight from its bytes decodes to what parsing
    and checking it step by step gives; everything else takes the steps, which say what is
    wrong. Edge cases and hostile records alike."""
    topics = Topics.for_prefix("jobs")
    hostile = [
        InputRecord(
            role="requests" if h.topic == topics.requests else "results",
            topic=h.topic,
            partition=h.partition
            if h.partition is not None
            else p((h.key or b"").decode("utf-8", "replace")),
            offset=n,
            timestamp_ms=TIMESTAMP_MS,
            key=h.key,
            value=h.value,
            headers=tuple((name.decode("utf-8", "surrogateescape"), v) for name, v in h.headers),
        )
        for n, h in enumerate(hostile_records(topics, PARTITIONS, 400))
    ]
    records = _edge_values() + hostile
    limits = InputLimits(record_bytes=MAX_BYTES)
    taken = [codec._well_formed(rec, limits) is not None for rec in records]
    fast = [run(rec) for rec in records]
    explained = [
        codec.explained(rec, partitions=PARTITIONS, limits=limits, now=NOW) for rec in records
    ]
    assert explained == fast
    # The one pass took the valid records, and only them.
    valid = [not isinstance(outcome, Bad) for outcome in fast]
    assert sum(taken) >= 150
    assert all(v for v, t in zip(valid, taken, strict=True) if t)
    assert sum(isinstance(o, Bad) for o in fast) >= 150


_TEXTS = st.one_of(
    st.sampled_from(["", " ", "auto-3.4", "auto-", "COMPLETED", "FAILED", "completed", JOB]),
    st.text(max_size=8),
    st.text(alphabet="aé日 \t\x00", min_size=30, max_size=210),
    st.builds(lambda n, c: c * n, st.integers(1, 420), st.sampled_from(["a", "é", "😀"])),
)
_FIELD_VALUES = st.one_of(
    _TEXTS,
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
    st.lists(st.integers(), max_size=3),
)
_FIELD_NAMES = st.sampled_from(
    [
        "kind", "request_id", "requestId", "job_type", "jobType", "client_id", "clientId",
        "initial_data", "initialData", "run_id", "runId", "reason", "status",
        "final_metrics", "finalMetrics", "metrics", "extra",
    ]
)  # fmt: skip


# Generating dictionaries of long texts is slow on a busy machine (the suite's brokers run
# beside it): no deadline, and no health check on the time a draw takes.
@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    st.sampled_from(["requests", "results"]),
    st.dictionaries(_FIELD_NAMES, _FIELD_VALUES, max_size=6),
    st.sampled_from(["start", "cancel", "result", "progress", None]),
    st.booleans(),
)
def test_the_one_pass_takes_only_what_the_models_take_as_they_take_it(
    role: TopicRole, sent: dict[str, Any], kind: str | None, keyed: bool
) -> None:
    """Generated requests and results: where the one pass takes a record (its fields
    validated into a shape, not a model), the models take it too, into the same command;
    where it does not, the models decide. Job types and IDs of every length and script,
    statuses spelt every way, fields the other input's, unknown and of the wrong type."""
    sent = {"job_type": JOB, **sent}
    if kind is not None:
        sent["kind"] = kind
    job_type = sent.get("job_type", sent.get("jobType"))
    key = job_type.strip().encode() if keyed and isinstance(job_type, str) else None
    try:
        rec = record(json.dumps(sent).encode(), role=role, key=key, partition=p(JOB))
    except UnicodeEncodeError:  # a lone surrogate in a key: not a record anyone can send
        return
    limits = InputLimits(record_bytes=MAX_BYTES)
    fast = run(rec)
    assert codec.explained(rec, partitions=PARTITIONS, limits=limits, now=NOW) == fast
    if codec._well_formed(rec, limits) is not None:
        assert not isinstance(fast, Bad)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@given(st.integers(-(2**33) * 1000, 2**33 * 1000))  # the years 1697 to 2242
def test_a_broker_time_is_the_stamps_utc_time(timestamp_ms: int) -> None:
    """`broker_time` is `datetime.fromtimestamp` of the stamp in seconds, wherever a float
    of seconds still holds every millisecond (2**33 seconds either side of 1970), and the
    record's `at`."""
    at = codec.broker_time(timestamp_ms)
    assert at == datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)
    assert at.tzinfo is UTC
    assert record(b"{}").replace(timestamp_ms=timestamp_ms).at == at


@given(
    st.integers(2**33 * 1000, 253_402_300_799_999)
    | st.integers(-62_135_596_800_000, -(2**33) * 1000)
)
def test_a_broker_time_past_those_years_keeps_its_milliseconds(timestamp_ms: int) -> None:
    """Further from 1970 a float of seconds no longer holds every millisecond: the time is
    still exactly the stamp's, to the millisecond, from year 1 to 9999."""
    assert codec.broker_time(timestamp_ms) == _EPOCH + timedelta(milliseconds=timestamp_ms)


@pytest.mark.parametrize(
    "timestamp_ms", [-62_135_596_800_001, 253_402_300_800_000, 2**63 - 1, -(2**63)]
)
def test_a_stamp_outside_the_years_a_time_can_hold_raises_as_fromtimestamp_does(
    timestamp_ms: int,
) -> None:
    with pytest.raises(ValueError, match="out of range"):
        datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)
    with pytest.raises(ValueError, match="out of range"):
        codec.broker_time(timestamp_ms)


def test_broker_times_keep_a_bounded_number_of_whole_seconds() -> None:
    for second in range(3 * codec._SECONDS_KEPT):
        assert codec.broker_time(second * 1000 + 7) == _EPOCH + timedelta(
            seconds=second, milliseconds=7
        )
        assert len(codec._SECONDS) <= codec._SECONDS_KEPT
