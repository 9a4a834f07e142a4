"""Kafka headers of a status event: CloudEvents binary mode and W3C trace context.

A status record's value is the `StatusEvent` JSON, as before; its headers make it a
CloudEvent in the Kafka protocol binding's binary content mode, so CloudEvents-aware
consumers read it without code of ours:

    ce_specversion  1.0
    ce_id           the event ID (stable: a repeated decision repeats it)
    ce_type         job-orchestrator.<event type>, e.g. job-orchestrator.started
    ce_source       /job-orchestrator/<topic prefix>
    ce_time         when it was decided (RFC 3339)
    ce_subject      the run ID, when the event names a run
    content-type    application/json

and, when the input that caused it carried a valid W3C `traceparent`, a `traceparent` in the
same trace: its trace ID and flags, with a span ID derived from the event ID (deterministic,
so a decision made again after a crash carries the same one). A malformed `traceparent` is
ignored: no header of an input can stop a partition.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Final

import msgspec

from schemas import EventType, StatusEvent

SPEC_VERSION: Final = b"1.0"
CONTENT_TYPE: Final = b"application/json"
TYPE_PREFIX: Final = "job-orchestrator."

# version 00, 32 hex trace ID, 16 hex parent ID, 2 hex flags; all-zero IDs are invalid.
_TRACEPARENT = re.compile(rb"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
_TYPES: Final = {kind: (TYPE_PREFIX + kind.value).encode() for kind in EventType}


def source_of(prefix: str) -> bytes:
    """The `ce_source` of every event of the orchestrator on `prefix`."""
    return f"/job-orchestrator/{prefix}".encode()


def trace_of(headers: Sequence[tuple[str, bytes | None]]) -> tuple[bytes, bytes] | None:
    """(trace ID, flags) of a record's valid `traceparent` header, else None."""
    for name, value in headers:
        if name.lower() != "traceparent" or value is None:
            continue
        m = _TRACEPARENT.match(value.strip().lower())
        if m is None or m.group(1) == _ZERO_TRACE or m.group(2) == _ZERO_SPAN:
            return None
        return m.group(1), m.group(3)
    return None


# The event JSON's own encoder, for its time: `ce_time` is spelled as `occurred_at` is.
_ENCODE_TIME: Final = msgspec.json.Encoder().encode


def status_headers(
    event: StatusEvent, source: bytes, trace: tuple[bytes, bytes] | None = None
) -> list[tuple[str, bytes | None]]:
    """The headers of `event`'s record."""
    fields = event.__dict__  # read past pydantic's `__getattr__` hook (`lifecycle.built`)
    event_id: str = fields["event_id"]
    headers: list[tuple[str, bytes | None]] = [
        ("ce_specversion", SPEC_VERSION),
        ("ce_id", event_id.encode()),
        ("ce_type", _TYPES[fields["type"]]),
        ("ce_source", source),
        ("ce_time", _ENCODE_TIME(fields["occurred_at"])[1:-1]),  # RFC 3339, UTC as Z
        ("content-type", CONTENT_TYPE),
    ]
    run_id: str | None = fields["run_id"]
    if run_id is not None:
        headers.append(("ce_subject", run_id.encode()))
    if trace is not None:
        trace_id, flags = trace
        span = hashlib.sha256(event_id.encode()).hexdigest()[:16].encode()
        headers.append(("traceparent", b"00-" + trace_id + b"-" + span + b"-" + flags))
    return headers
