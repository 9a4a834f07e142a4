"""What the client sends is checked as the worker reads it, before it is sent."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, strategies as st

from schemas import JobRequest, JobResult
from worker.client import JobInvalidError
from worker.client.wire import encoded
from worker.settings import Settings

SETTINGS = Settings()


def _start(**changes: Any) -> dict[str, Any]:
    return {"kind": "start", "request_id": "r1", "job_type": "etl", "initial_data": {}, **changes}


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (_start(initial_data={"x": float("nan")}), "not JSON: Out of range float"),
        (_start(initial_data={"x": float("inf")}), "not JSON"),
        (_start(initial_data={"at": datetime(2026, 1, 1, tzinfo=UTC)}), "not JSON"),
        (_start(initial_data={"seen": {1, 2}}), "not JSON"),
        (_start(initial_data={"raw": b"\xff"}), "not JSON"),
        (_start(initial_data=_nested(40)), "nest more than 32 deep"),
        (_start(initial_data={"blob": "x" * 70_000}), "initial_data is 70011 bytes"),
        (_start(initial_data={"blob": "x" * 1_100_000}), "JOBS_MAX_RECORD_BYTES"),
        (_start(job_type="K" * 201), "job_type"),
        (_start(job_type=""), "job_type"),
        (_start(job_type="a\x1bb"), "job_type"),
        (_start(request_id="a\x01b"), "request_id"),
        (_start(job_type=5), "job_type"),
        (_start(kind="launch"), "kind"),
        (_start(unexpected=1), "unexpected"),
    ],
)
def test_a_body_the_worker_would_dead_letter_is_not_sent(body: dict[str, Any], says: str) -> None:
    with pytest.raises(JobInvalidError, match="not a valid request, not sent") as refused:
        encoded(JobRequest, body, SETTINGS)
    assert says in str(refused.value)
    assert refused.value.request_id == body["request_id"]


def test_ids_go_out_as_the_worker_reads_them_and_int_keys_as_json_makes_them() -> None:
    """Padded IDs are sent trimmed (the worker's answer names the trimmed request ID, and
    the key is the job type it reads); a mapping with an integer key is JSON's string."""
    sent, payload = encoded(
        JobRequest, _start(request_id=" lead ", job_type="rev.tab\t", initial_data={1: "a"}),
        SETTINGS,
    )  # fmt: skip
    assert (sent["request_id"], sent["job_type"]) == ("lead", "rev.tab")
    decoded = json.loads(payload)
    assert decoded["initial_data"] == {"1": "a"}
    assert JobRequest.model_validate_json(payload).request_id == "lead"


def test_a_result_nested_deeper_than_the_limit_names_the_setting() -> None:
    body = {
        "kind": "result",
        "request_id": "r",
        "job_type": "etl",
        "run_id": "261201-000000-0.1",
        "status": "COMPLETED",
        "final_metrics": _nested(100_000),
    }
    with pytest.raises(JobInvalidError, match="JOBS_MAX_NESTING_DEPTH"):
        encoded(JobResult, body, SETTINGS)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=30,
)


@given(data=st.dictionaries(st.text(), JSON, max_size=5), job_type=st.text(max_size=210))
def test_any_body_is_sent_as_the_worker_reads_it_or_refused_saying_why(
    data: dict[str, Any], job_type: str
) -> None:
    """Hostile data and names: either refused with `JobInvalidError`, or sent as JSON the
    worker's model takes, with the IDs the worker reads."""
    refused: list[str] = []
    try:
        sent, payload = encoded(JobRequest, _start(job_type=job_type, initial_data=data), SETTINGS)
    except JobInvalidError as exc:
        refused.append(str(exc))
    if refused:
        assert refused[0].startswith("not a valid request, not sent: ")
        return
    message = JobRequest.model_validate_json(payload)
    assert message.job_type == sent["job_type"]
    assert len(payload) <= SETTINGS.max_record_bytes
