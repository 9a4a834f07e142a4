"""Status records as CloudEvents (binary mode) with the trace of the input that caused them."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from hypothesis import given, strategies as st

from schemas import EventType, StatusEvent
from tests.conftest import RunningWorker
from worker.client.watch import StatusTail
from worker.engine.envelope import source_of, status_headers, trace_of
from worker.kafkaio import partitions_of
from worker.settings import Settings

TRACE = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_traceparent_is_followed_and_a_bad_one_ignored() -> None:
    """Only a well-formed W3C traceparent is propagated; anything else is ignored."""
    assert trace_of([("traceparent", TRACE)]) == (b"4bf92f3577b34da6a3ce929d0e0e4736", b"01")
    assert trace_of([("TraceParent", TRACE.upper())]) is not None  # any case
    for bad in (
        b"",
        b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01",  # all-zero trace ID
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-" + b"0" * 16 + b"-01",  # all-zero span
        b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # unknown version
        b"\xff\xfe not utf-8",
        TRACE + b"-extra",
    ):
        assert trace_of([("traceparent", bad)]) is None, bad
    assert trace_of([("traceparent", None), ("other", TRACE)]) is None


@given(st.lists(st.tuples(st.text(max_size=20), st.one_of(st.none(), st.binary(max_size=80)))))
def test_no_header_bytes_break_the_trace_reader(headers: list[tuple[str, bytes | None]]) -> None:
    """Random header names and bytes give a trace or None, never an error."""
    found = trace_of(headers)
    assert found is None or len(found[0]) == 32


def test_the_headers_make_a_cloudevent() -> None:
    """Binary-mode CloudEvents attributes, the run as subject, a child span of the trace."""
    event = StatusEvent(
        event_id="e-1",
        type=EventType.STARTED,
        job_type="etl",
        run_id="261202-101500-0.7",
        occurred_at=datetime(2026, 12, 2, 10, 15, tzinfo=UTC),
    )
    trace = trace_of([("traceparent", TRACE)])
    headers = dict(status_headers(event, source_of("jobs"), trace))
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_id"] == b"e-1"
    assert headers["ce_type"] == b"job-orchestrator.started"
    assert headers["ce_source"] == b"/job-orchestrator/jobs"
    assert headers["ce_time"] == b"2026-12-02T10:15:00Z"
    assert headers["ce_subject"] == b"261202-101500-0.7"
    assert headers["content-type"] == b"application/json"
    parent = headers["traceparent"]
    assert parent is not None
    version, trace_id, span, flags = parent.split(b"-")
    assert (version, trace_id, flags) == (b"00", b"4bf92f3577b34da6a3ce929d0e0e4736", b"01")
    assert span != b"00f067aa0ba902b7"
    assert len(span) == 16
    later = event.model_copy(
        update={"occurred_at": datetime(2026, 12, 2, 10, 15, 1, 250_000, tzinfo=UTC)}
    )
    assert dict(status_headers(later, source_of("jobs")))["ce_time"] == (
        b"2026-12-02T10:15:01.250000Z"
    )
    no_run = event.model_copy(update={"run_id": None})
    assert "ce_subject" not in dict(status_headers(no_run, source_of("jobs")))


@pytest.mark.kafka
async def test_status_records_carry_the_envelope(
    worker: RunningWorker, topics: Settings, producer: AIOKafkaProducer, tail: StatusTail
) -> None:
    """A start with a traceparent: its `started` record is a CloudEvent in the same trace;
    a start with a garbage traceparent is decided as usual."""
    body = json.dumps({"job_type": "etl", "request_id": "traced"}).encode()
    await producer.send_and_wait(
        topics.topics.requests, body, key=b"etl", headers=[("traceparent", TRACE)]
    )
    garbage = json.dumps({"job_type": "etl2", "request_id": "junk"}).encode()
    await producer.send_and_wait(
        topics.topics.requests, garbage, key=b"etl2", headers=[("traceparent", os.urandom(55))]
    )
    started = await tail.wait_event(request_id="traced")
    assert (await tail.wait_event(request_id="junk")).type is EventType.STARTED
    consumer = AIOKafkaConsumer(
        bootstrap_servers=topics.bootstrap_servers,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        consumer.assign(await partitions_of(consumer, topics.topics.status))
        found = None
        while found is None:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for record in records:
                    if json.loads(record.value)["event_id"] == started.event_id:
                        found = dict(record.headers)
    finally:
        await consumer.stop()
    assert found["ce_id"] == started.event_id.encode()
    assert found["ce_type"] == b"job-orchestrator.started"
    assert found["ce_subject"] == (started.run_id or "").encode()
    assert found["ce_source"] == f"/job-orchestrator/{topics.topic_prefix}".encode()
    assert found["traceparent"].split(b"-")[1] == b"4bf92f3577b34da6a3ce929d0e0e4736"
