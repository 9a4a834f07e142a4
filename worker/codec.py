"""Input records to core commands, or to dead letters with a specific reason.

Checks, in order: size, JSON, schema, key (every record is keyed by its job type), partition
(the key's murmur2 partition; a valid record on another partition is re-routed there). A
record that fails a check becomes a dead letter carrying the original bytes; if the sender can
be identified (a request ID or run ID and a job type), it also becomes a `Reject` command so
the sender gets a `rejected` status event.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from aiokafka.partitioner import murmur2
from pydantic import ValidationError

from schemas import DeadLetter, DeadLetterReason, Header, JobRequest, JobResult, RunStatus, Source
from worker.lifecycle import Cancel, Command, Finish, Progress, Reject, Start

TopicRole = Literal["requests", "results"]


@dataclass(frozen=True, slots=True)
class InputRecord:
    """The parts of a Kafka record the orchestrator uses (no Kafka types past this point)."""

    role: TopicRole
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]] = ()

    @classmethod
    def of(cls, role: TopicRole, record: Any) -> InputRecord:
        """From an aiokafka `ConsumerRecord` of the requests or results topic."""
        return cls(
            role=role,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp,
            key=record.key,
            value=record.value,
            headers=tuple(record.headers or ()),
        )

    @property
    def source(self) -> Source:
        """The record's coordinates."""
        return Source(topic=self.topic, partition=self.partition, offset=self.offset)

    @property
    def at(self) -> datetime:
        """The record's broker time (UTC)."""
        return datetime.fromtimestamp(self.timestamp_ms / 1000, tz=UTC)


@dataclass(frozen=True, slots=True)
class Reroute:
    """A valid record on the wrong partition: it belongs on `partition`, keyed `key`."""

    partition: int
    key: bytes


REROUTED_FROM = "jobs.rerouted-from"  # header: "<topic>:<partition>:<offset>" of the original


@dataclass(frozen=True, slots=True)
class Bad:
    """An input record that cannot become a command."""

    dead_letter: DeadLetter
    reject: Reject | None


@functools.lru_cache(maxsize=4096)
def partition_for(key: bytes, partitions: int) -> int:
    """The partition of `key` under murmur2, as the Java client and aiokafka choose it.

    Cached: aiokafka's murmur2 is pure Python, and a job type's records keep coming.
    """
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


# Base64 grows a value by a third: a larger original would make a dead letter the broker
# refuses (1 MiB by default), and the partition could not move past it.
MAX_DEAD_LETTER_VALUE = 512 * 1024


def dead_letter(record: InputRecord, code: str, message: str, now: datetime) -> DeadLetter:
    """A dead letter for `record` with the original key, value and headers intact.

    A value over `MAX_DEAD_LETTER_VALUE` bytes is left out (the reason says so); `source`
    still points at the original record.
    """
    value = record.value
    if value is not None and len(value) > MAX_DEAD_LETTER_VALUE:
        message += (
            f" (the {len(value)}-byte value is not copied here: over {MAX_DEAD_LETTER_VALUE}"
            " bytes; read it at the source offset)"
        )
        value = None
    return DeadLetter(
        reason=DeadLetterReason(code=code, message=message),
        source=record.source,
        key=_b64(record.key),
        value=_b64(value),
        headers=tuple(Header(key=k, value=_b64(v)) for k, v in record.headers),
        dead_lettered_at=now,
    )


def _summarize(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "message"
        parts.append(f"{where}: {item['msg']}")
    more = error.error_count() - 5
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def _text(value: object) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _reject_for(
    record: InputRecord, payload: object, reason: str, key_text: str | None
) -> Reject | None:
    """A `Reject` when the sender can be identified from what did parse."""
    data: dict[str, Any] = payload if isinstance(payload, dict) else {}
    request_id = _text(data.get("request_id", data.get("requestId")))
    run_id = _text(data.get("run_id", data.get("runId")))
    job_type = _text(data.get("job_type", data.get("jobType"))) or key_text
    if job_type is None or (request_id is None and run_id is None):
        return None
    return Reject(
        job_type=job_type,
        request_id=request_id,
        run_id=run_id,
        reason=reason,
        at=record.at,
        source=record.source,
    )


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def decode(
    record: InputRecord, *, partitions: int, max_bytes: int, now: datetime
) -> Command | Bad | Reroute:
    """Turn an input record into a core command, or explain why it cannot be one."""

    def bad(code: str, message: str, payload: object = None, key_text: str | None = None) -> Bad:
        reject = _reject_for(record, payload, f"{code}: {message}", key_text)
        return Bad(dead_letter(record, code, message, now), reject)

    value = record.value
    if not value:
        return bad("empty_value", "the record has no value; expected a JSON object")
    if len(value) > max_bytes:
        return bad(
            "oversized",
            f"the record is {len(value)} bytes; the limit is {max_bytes} (JOBS_MAX_RECORD_BYTES)",
        )
    try:
        # Decode explicitly: json.loads(bytes) would also accept UTF-16 and UTF-32.
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return bad("malformed_json", f"the value is not UTF-8: {exc.reason} at byte {exc.start}")
    try:
        payload = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        return bad("malformed_json", f"the value is not JSON: {exc.msg} at position {exc.pos}")
    except ValueError as exc:
        return bad("malformed_json", f"the value is not JSON: {exc}")
    key_text: str | None = None
    if record.key is not None:
        try:
            key_text = record.key.decode("utf-8")
        except UnicodeDecodeError:
            key_text = None
    model: type[JobRequest] | type[JobResult] = (
        JobRequest if record.role == "requests" else JobResult
    )
    try:
        message = model.model_validate(payload)
    except ValidationError as exc:
        what = "request" if record.role == "requests" else "result"
        return bad("schema_invalid", f"invalid {what}: {_summarize(exc)}", payload, key_text)
    if record.key is not None and key_text != message.job_type:
        return bad(
            "key_mismatch",
            f"records must be keyed by their job type {message.job_type!r}; "
            f"the key is {key_text!r}",
            payload,
        )
    key = message.job_type.encode()
    expected = partition_for(key, partitions)
    if expected != record.partition or record.key is None:
        # Another partitioner (librdkafka's CRC32, a keyless send): the owner of the job
        # type's partition must decide, so the record moves there inside this transaction.
        return Reroute(partition=expected, key=key)
    if isinstance(message, JobRequest):
        request_id = message.request_id or f"auto-{record.partition}.{record.offset}"
        if message.kind == "cancel":
            return Cancel(
                request_id=request_id,
                job_type=message.job_type,
                client_id=message.client_id,
                run_id=message.run_id,
                reason=message.reason,
                at=record.at,
                source=record.source,
            )
        return Start(
            request_id=request_id,
            job_type=message.job_type,
            client_id=message.client_id,
            initial_data=message.initial_data,
            at=record.at,
            source=record.source,
        )
    if message.kind == "progress":
        return Progress(
            job_type=message.job_type,
            run_id=message.run_id,
            metrics=message.metrics,
            request_id=message.request_id,
            at=record.at,
            source=record.source,
        )
    assert message.status is not None
    return Finish(
        job_type=message.job_type,
        run_id=message.run_id,
        status=RunStatus(message.status),
        metrics=message.final_metrics,
        request_id=message.request_id,
        at=record.at,
        source=record.source,
    )
