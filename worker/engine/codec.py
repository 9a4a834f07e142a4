"""Input records to core commands, or to dead letters with a specific reason.

Checks, in order: size, JSON, schema, key (every record is keyed by its job type), partition
(the key's murmur2 partition; a valid record on another partition is re-routed there). A
record that fails a check becomes a dead letter carrying the original bytes; if the sender can
be identified (a request ID or run ID and a job type), it also becomes a `Reject` command so
the sender gets a `rejected` status event.

A record that passes every check is validated once, by pydantic-core straight from its bytes
into a dict of its fields (`_well_formed`, `worker.engine.inputshapes`); only a record that
may fail one goes through the checks one by one, and its model, which say what is wrong.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import TypeAdapter, ValidationError
from pydantic_core import to_json

from schemas import DeadLetter, DeadLetterReason, Header, JobRequest, JobResult, RunStatus, Source
from schemas.messages import AUTO_REQUEST_ID, RequestId, RunIdText
from worker.core.lifecycle import (
    Cancel,
    Command,
    Finish,
    ModelFields,
    Progress,
    Reject,
    Start,
    built,
    run_size,
)
from worker.core.limits import InputLimits
from worker.core.values import Value
from worker.engine.inputshapes import REQUEST_FIELDS, RESULT_FIELDS

if TYPE_CHECKING:
    from mypy_extensions import i64  # a machine integer where compiled

TopicRole = Literal["requests", "results"]


_SOURCE_FIELDS = ModelFields(Source)


class InputRecord(Value):
    """The parts of a Kafka record the orchestrator uses (no Kafka types past this point).

    A native class where compiled (`worker.core.values`)."""

    FIELDS = ("role", "topic", "partition", "offset", "timestamp_ms", "key", "value", "headers")
    __slots__ = (*FIELDS, "_at")

    def __init__(
        self,
        role: TopicRole,
        topic: str,
        partition: int,
        offset: int,
        timestamp_ms: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]] = (),
    ) -> None:
        self.role: Final = role
        self.topic: Final = topic
        self.partition: Final = partition
        self.offset: Final = offset
        self.timestamp_ms: Final = timestamp_ms
        self.key: Final = key
        self.value: Final = value
        self.headers: Final = headers
        # `at`, once asked for (holding, deciding and the command each ask).
        self._at: datetime | None = None

    @classmethod
    def of(cls, role: TopicRole, record: Any) -> InputRecord:
        """From an aiokafka `ConsumerRecord` of the requests or results topic."""
        return cls(  # by position: a call by keyword builds a dict of them first
            role,
            record.topic,
            record.partition,
            record.offset,
            record.timestamp,  # timestamp_ms
            record.key,
            record.value,
            tuple(record.headers or ()),
        )

    @property
    def source(self) -> Source:
        """The record's coordinates (Kafka's, not validated again: `built`)."""
        coordinates = {"topic": self.topic, "partition": self.partition, "offset": self.offset}
        return built(Source, _SOURCE_FIELDS, coordinates)

    @property
    def at(self) -> datetime:
        """The record's broker time (UTC)."""
        at = self._at
        if at is None:  # made when first asked: a stamp out of range fails the record's batch
            at = broker_time(self.timestamp_ms)
            self._at = at
        return at


_MILLISECONDS = tuple(timedelta(milliseconds=n) for n in range(1000))
_SECONDS: dict[int, datetime] = {}  # the UTC times of whole seconds lately seen
_SECONDS_KEPT = 1_024


def broker_time(timestamp_ms: int) -> datetime:
    """A Kafka timestamp (milliseconds since the epoch) as a UTC time: its whole second's,
    made once per second and kept, plus its milliseconds, in a third of
    `datetime.fromtimestamp`'s time (the records of a batch share a few seconds).

    The same time as `datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)` between the
    years 1697 and 2242; further out, where a float of seconds loses milliseconds, it is
    still exact. Out of `datetime`'s years it raises ValueError, as that does."""
    second, milliseconds = divmod(timestamp_ms, 1000)
    whole = _SECONDS.get(second)
    if whole is None:
        if len(_SECONDS) >= _SECONDS_KEPT:
            _SECONDS.clear()
        whole = _SECONDS[second] = datetime.fromtimestamp(second, tz=UTC)
    return whole + _MILLISECONDS[milliseconds]


@dataclass(frozen=True, slots=True)
class Reroute:
    """A valid record on the wrong partition: it belongs on `partition`, keyed `key`."""

    partition: int
    key: bytes


REROUTED_FROM = "jobs.rerouted-from"  # header: "<topic>:<partition>:<offset>" of the original
_ORIGIN = re.compile(rb"[A-Za-z0-9._-]{1,249}:(\d{1,9}):(\d{1,19})")


@dataclass(frozen=True, slots=True)
class Bad:
    """An input record that cannot become a command."""

    dead_letter: DeadLetter
    reject: Reject | None


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 of `data` (seed 0x9747B28C) as an unsigned 32-bit value: the Java
    client's `Utils.murmur2`, which aiokafka's pure-Python one computes too.

    In machine integers where compiled (`i64`: a 32-bit value times the 31-bit multiplier
    stays below 2**63), 0.04 µs a job type against aiokafka's 1.5; from source, plain
    Python integers. `tests/test_codec.py` compares it with aiokafka's on random keys.
    """
    length: i64 = len(data)
    h: i64 = 0x9747B28C ^ length
    end: i64 = length - length % 4
    i: i64 = 0
    while i < end:
        k: i64 = data[i] | data[i + 1] << 8 | data[i + 2] << 16 | data[i + 3] << 24
        k = (k * 0x5BD1E995) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * 0x5BD1E995) & 0xFFFFFFFF
        h = ((h * 0x5BD1E995) & 0xFFFFFFFF) ^ k
        i += 4
    rest: i64 = length - end
    if rest == 3:
        h ^= data[end + 2] << 16
    if rest >= 2:
        h ^= data[end + 1] << 8
    if rest >= 1:
        h ^= data[end]
        h = (h * 0x5BD1E995) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0x5BD1E995) & 0xFFFFFFFF
    return h ^ h >> 15


@functools.lru_cache(maxsize=4096)
def partition_for(key: bytes, partitions: int) -> int:
    """The partition of `key` under murmur2, as the Java client and aiokafka choose it.

    Cached: a job type's records keep coming.
    """
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


# What a dead letter copies of the original (key, headers, value) stays under this: base64
# grows it by a third, and a dead letter over the topic's 1 MiB limit would be refused by the
# broker, so the partition could not move past its record.
MAX_DEAD_LETTER_VALUE = 512 * 1024


def _header_name(name: str) -> tuple[str, bytes]:
    """A header name as text fit for JSON, and its original bytes.

    Names that are not UTF-8 arrive with their bytes escaped as surrogates (see
    `worker.compat`); the text shows them as U+FFFD.
    """
    raw = name.encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "replace"), raw


_DEAD_LETTER_KEY_BYTES = 1024


def dead_letter_key(record: InputRecord) -> bytes | None:
    """The Kafka key of `record`'s dead letter: its own key, unless that is oversized."""
    key = record.key
    return key if key is None or len(key) <= _DEAD_LETTER_KEY_BYTES else None


def dead_letter(
    record: InputRecord, code: str, message: str, now: datetime, *, copy: bool = True
) -> DeadLetter:
    """A dead letter for `record` with the original key, value and headers.

    Together they stay under `MAX_DEAD_LETTER_VALUE` bytes: the key first, then the headers,
    then the value; what does not fit is left out and the reason says so. With `copy=False`
    nothing of them is copied. `source` still points at the original record.
    """
    if not copy:
        return DeadLetter(
            reason=DeadLetterReason(
                code=code, message=f"{message} (nothing of the original is copied here)"
            ),
            source=record.source,
            key=None,
            value=None,
            dead_lettered_at=now,
        )
    budget = MAX_DEAD_LETTER_VALUE
    left_out: list[str] = []

    def fits(what: str, size: int) -> bool:
        nonlocal budget
        if size <= budget:
            budget -= size
            return True
        left_out.append(f"the {size}-byte {what}")
        return False

    key = record.key if record.key is None or fits("key", len(record.key)) else None
    headers: list[Header] = []
    if record.headers:
        named = [(_header_name(k), v) for k, v in record.headers]
        size = sum(len(raw) + len(v or b"") for (_, raw), v in named)
        if fits("headers", size):
            headers = [Header(key=text, value=_b64(v)) for (text, _), v in named]
    value = record.value if record.value is None or fits("value", len(record.value)) else None
    if left_out:
        message += (
            f" ({' and '.join(left_out)} {'is' if len(left_out) == 1 else 'are'} not copied "
            f"here: a dead letter carries at most "
            f"{MAX_DEAD_LETTER_VALUE} bytes of the original; read it at the source offset)"
        )
    return DeadLetter(
        reason=DeadLetterReason(code=code, message=message),
        source=record.source,
        key=_b64(key),
        value=_b64(value),
        headers=tuple(headers),
        dead_lettered_at=now,
    )


def summarize(error: ValidationError) -> str:
    """The first few errors of `error`, each with where it is, as one sentence."""
    parts = []
    for item in error.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "message"
        parts.append(f"{where}: {item['msg']}")
    more = error.error_count() - 5
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


# A job type with spaces is invalid, yet its sender can be answered: rejects take any job
# type a request ID could be (at most 200 characters, no control characters).
_JOB_TYPE: TypeAdapter[str] = TypeAdapter(RequestId)
_REQUEST_ID: TypeAdapter[str] = TypeAdapter(RequestId)
_RUN_ID: TypeAdapter[str] = TypeAdapter(RunIdText)


def _valid(adapter: TypeAdapter[str], value: object) -> str | None:
    """`value` as `adapter` accepts it, else None: a reject only names what is well-formed,
    so that no input can make its `rejected` event too large or malformed to publish."""
    if not isinstance(value, str):
        return None
    try:
        return adapter.validate_python(value)
    except ValidationError:
        return None


def _reject_for(
    record: InputRecord, payload: object, reason: str, key_text: str | None
) -> Reject | None:
    """A `Reject` when the sender can be identified from what did parse."""
    data: dict[str, Any] = payload if isinstance(payload, dict) else {}
    request_id = _valid(_REQUEST_ID, data.get("request_id", data.get("requestId")))
    run_id = _valid(_RUN_ID, data.get("run_id", data.get("runId")))
    job_type = _valid(_JOB_TYPE, data.get("job_type", data.get("jobType"))) or _valid(
        _JOB_TYPE, key_text
    )
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


_REASON_CHARS = 2000  # of a dead letter's or rejection's reason
_QUOTED_BYTES = 200  # of a key quoted in a reason


def _quoted(data: bytes | None) -> str:
    """`data` for a reason: its text (or bytes) repr, cut to a few hundred characters."""
    if data is None:
        return "missing"
    try:
        shown: object = data.decode("utf-8")[:_QUOTED_BYTES]
    except UnicodeDecodeError:
        shown = data[:_QUOTED_BYTES]
    more = f" (and {len(data) - _QUOTED_BYTES} more bytes)" if len(data) > _QUOTED_BYTES else ""
    return f"{shown!r}{more}"


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


# Methods of built-in types called through their descriptors: compiled, `value.count(...)`
# looks the method up by name at each call, which costs more than the count itself.
_COUNT: Final = bytes.count
_FIND: Final = bytes.find
_IS_ASCII: Final = str.isascii

# A JSON string (escapes included) or one bracket: what the nesting scan steps over.
_DEPTH_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_OPENING = frozenset(b"[{")


def nesting_depth_over(value: bytes, limit: int) -> bool:
    """Whether arrays and objects in the JSON text `value` nest deeper than `limit`.

    Scanned before parsing, so a record nested 100,000 deep costs a pass over its bytes, not
    a recursion that ends in `RecursionError`. Values with at most `limit` brackets (nearly
    all) are answered by counting alone.
    """
    if _COUNT(value, b"[") + _COUNT(value, b"{") <= limit:
        return False
    depth = 0
    for token in _DEPTH_TOKENS.finditer(value):
        first = token.group()[0]
        if first in _OPENING:
            depth += 1
            if depth > limit:
                return True
        elif first != 0x22:  # a closing bracket; strings (") are skipped whole
            depth -= 1
    return False


def _bad_header(headers: Sequence[tuple[str, bytes | None]]) -> str | None:
    """The first header name that is not UTF-8, shown with its bad bytes replaced."""
    for name, _ in headers:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            return _header_name(name)[0]
    return None


def _data_size(data: Any, record_size: int, limit: int) -> int | None:
    """The JSON size of `data` when it may exceed `limit`, else None.

    `data` came out of a record of `record_size` bytes, and its compact JSON is no larger
    than its part of that record, so only records over `limit` are measured.
    """
    if data is None or record_size <= limit:
        return None
    size = len(to_json(data))
    return size if size > limit else None


class _Unusable(Exception):
    """Why a record cannot become a command; what parsed of it, to answer its sender."""

    def __init__(
        self, code: str, message: str, payload: object = None, key_text: str | None = None
    ) -> None:
        super().__init__(message)
        if len(message) > _REASON_CHARS:  # it quotes input: keep events and letters small
            message = message[: _REASON_CHARS - 1] + "…"
        self.code = code
        self.message = message
        self.payload = payload
        self.key_text = key_text


def decode(
    record: InputRecord, *, partitions: int, limits: InputLimits, now: datetime
) -> Command | Bad | Reroute:
    """Turn an input record into a core command, or explain why it cannot be one."""
    fields = _well_formed(record, limits)
    if fields is None:  # something is off: find what, to say it
        return explained(record, partitions=partitions, limits=limits, now=now)
    return _routed(record, fields, partitions)


def explained(
    record: InputRecord, *, partitions: int, limits: InputLimits, now: datetime
) -> Command | Bad | Reroute:
    """`decode` without its one pass: parse, validate and check in turn, each saying what is
    wrong. For a record the one pass takes, the same outcome."""
    try:
        payload = _parse(record, limits)
        message, key_text = _validate(record, payload)
        _check_data(message, len(record.value or b""), limits, payload, key_text)
    except _Unusable as problem:
        reason = f"{problem.code}: {problem.message}"
        reject = _reject_for(record, problem.payload, reason, problem.key_text)
        return Bad(dead_letter(record, problem.code, problem.message, now), reject)
    return _routed(record, message.__dict__, partitions)  # a model's fields, all of them


def _routed(record: InputRecord, fields: dict[str, Any], partitions: int) -> Command | Reroute:
    """The command of a valid message (its fields: `_well_formed`'s, or a model's), or where
    its record must go instead."""
    job_type: str = fields["job_type"]  # typed, as in `_well_formed`
    key = job_type.encode()
    expected = partition_for(key, partitions)
    if expected != record.partition or record.key is None:
        # Another partitioner (librdkafka's CRC32, a keyless send): the owner of the job
        # type's partition must decide, so the record moves there inside this transaction.
        return Reroute(partition=expected, key=key)
    return _command(record, fields)


# Tokens json.loads would take for numbers, which `_parse` refuses and pydantic-core takes
# (looked for as two substrings: half a regex search's time; `in` first tries the operand
# as an integer, and formats and clears a TypeError every time).
_NAN = b"NaN"
_INFINITY = b"Infinity"
_REQUEST_FIELDS = REQUEST_FIELDS.validator.validate_json
_RESULT_FIELDS = RESULT_FIELDS.validator.validate_json
_RESULT_STATUS = {s.value: s for s in (RunStatus.COMPLETED, RunStatus.FAILED)}
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \ud800 to \udfff, either half
# The text fields whose models bound them in UTF-8 bytes (a Python validator) as well as in
# characters (the shapes' constraint, the same number): ASCII text is as long in both.
_BOUNDED_TEXT = ("job_type", "request_id", "client_id", "run_id")


def _well_formed(record: InputRecord, limits: InputLimits) -> dict[str, Any] | None:
    """The fields of a record that passes every check, validated by pydantic-core straight
    from its bytes into a dict (one pass, no model: `worker.engine.inputshapes`); None if
    any check might fail.

    What pydantic-core refuses here (bad UTF-8, lone surrogates, a BOM, oversized numbers,
    schema errors) `_parse` and `_validate` refuse too: they then say what is wrong. What
    only they refuse is looked for first (size, header names, nesting, NaN and Infinity),
    and what only the models' Python validators check, after (`_plain`).
    """
    value = record.value
    if (
        not value
        or len(value) > limits.record_bytes
        or (record.headers and _bad_header(record.headers) is not None)
        or nesting_depth_over(value, limits.nesting_depth)
        or _FIND(value, _NAN) >= 0
        or _FIND(value, _INFINITY) >= 0
    ):
        return None
    requests = record.role == "requests"
    fields: dict[str, Any]
    try:
        fields = _REQUEST_FIELDS(value) if requests else _RESULT_FIELDS(value)
    except ValueError:  # ValidationError included
        return None
    if not _plain(fields, requests):
        return None
    job_type: str = fields["job_type"]  # typed: a str's `encode` is compiled, an Any's looked up
    if record.key is not None and record.key != job_type.encode():
        return None  # a key mismatch, or a key that is not UTF-8
    if _data_size(_data_of(requests, fields)[1], len(value), limits.data_bytes) is not None:
        return None
    return fields


def _plain(fields: dict[str, Any], requests: bool) -> bool:
    """Whether the fields a shape took pass what only their model's Python validators check
    (or may fail it: the model then says): text within its bound in UTF-8 bytes (ASCII
    text is), a request ID not of the worker's own form, no run ID on a start, a status on
    a result."""
    for name in _BOUNDED_TEXT:
        text: str | None = fields.get(name)
        if text is not None and not _IS_ASCII(text):
            return False
    if requests:
        request_id: str | None = fields.get("request_id")
        if request_id is not None and request_id.startswith(AUTO_REQUEST_ID):
            return False
        return fields.get("kind", "start") != "start" or fields.get("run_id") is None
    return fields.get("kind", "result") != "result" or fields.get("status") is not None


def _parse(record: InputRecord, limits: InputLimits) -> object:
    """The record's value as JSON, within the size and nesting limits."""
    value = record.value
    if not value:
        raise _Unusable("empty_value", "the record has no value; expected a JSON object")
    if len(value) > limits.record_bytes:
        raise _Unusable(
            "oversized",
            f"the record is {len(value)} bytes; the limit is {limits.record_bytes} "
            "(JOBS_MAX_RECORD_BYTES)",
        )
    if record.headers and (name := _bad_header(record.headers)) is not None:
        raise _Unusable("malformed_header", f"a header name is not UTF-8: {name!r}")
    try:
        # Decode explicitly: json.loads(bytes) would also accept UTF-16 and UTF-32.
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Unusable(
            "malformed_json", f"the value is not UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    if nesting_depth_over(value, limits.nesting_depth):
        raise _Unusable(
            "too_deep",
            f"arrays and objects nest more than {limits.nesting_depth} deep "
            "(JOBS_MAX_NESTING_DEPTH)",
        )
    try:
        payload = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise _Unusable(
            "malformed_json", f"the value is not JSON: {exc.msg} at position {exc.pos}"
        ) from None
    except (ValueError, RecursionError) as exc:
        # ValueError: NaN or Infinity, or an integer of more digits than Python converts.
        raise _Unusable("malformed_json", f"the value is not JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(value) is not None and _lone_surrogate(payload):
        # json.loads reads "\ud800" without its pair as a str no UTF-8 can carry, so no
        # event or changelog row could hold it: refused here, not where it is written.
        raise _Unusable(
            "malformed_json",
            "the value is not JSON text: it escapes a lone UTF-16 surrogate "
            "(\\ud800-\\udfff without its pair)",
        )
    return payload


def _lone_surrogate(payload: object) -> bool:
    """Whether a string of `payload` (keys included) holds a lone surrogate."""
    try:
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _validate(record: InputRecord, payload: object) -> tuple[JobRequest | JobResult, str | None]:
    """The request or result `payload` is, keyed by its job type; and the key as text."""
    key_text: str | None = None
    if record.key is not None:
        try:
            key_text = record.key.decode("utf-8")
        except UnicodeDecodeError:
            key_text = None
    model: type[JobRequest] | type[JobResult] = (
        JobRequest if record.role == "requests" else JobResult
    )
    if record.role == "requests" and isinstance(payload, dict):
        start = payload.get("kind", "start") == "start"
        if start and payload.get("run_id", payload.get("runId")) is not None:
            raise _Unusable(
                "run_id_not_allowed",
                "a start request cannot carry run_id: only the orchestrator assigns run IDs",
                payload,
                key_text,
            )
    try:
        message = model.model_validate(payload)
    except ValidationError as exc:
        what = "request" if record.role == "requests" else "result"
        raise _Unusable(
            "schema_invalid", f"invalid {what}: {summarize(exc)}", payload, key_text
        ) from None
    if record.key is not None and key_text != message.job_type:
        raise _Unusable(
            "key_mismatch",
            f"records must be keyed by their job type {message.job_type!r}; "
            f"the key is {_quoted(record.key)}",
            payload,
        )
    return message, key_text


def _data_of(requests: bool, fields: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """The free-form part of a message's fields, and its name: `initial_data`, `metrics` or
    `final_metrics`."""
    if requests:
        return "initial_data", fields.get("initial_data")
    if fields.get("kind") == "progress":
        return "metrics", fields.get("metrics")
    return "final_metrics", fields.get("final_metrics")


def _check_data(
    message: JobRequest | JobResult,
    record_size: int,
    limits: InputLimits,
    payload: object,
    key_text: str | None,
) -> None:
    """`initial_data`, `final_metrics` or `metrics` within `JOBS_MAX_DATA_BYTES`."""
    name, data = _data_of(isinstance(message, JobRequest), message.__dict__)
    if (size := _data_size(data, record_size, limits.data_bytes)) is not None:
        raise _Unusable(
            "too_large",
            f"{name} is {size} bytes as JSON; the limit is {limits.data_bytes} "
            "(JOBS_MAX_DATA_BYTES)",
            payload,
            key_text,
        )


def _auto_request_id(record: InputRecord) -> str:
    """The request ID of a request sent without one: from the coordinates of the record as
    its producer sent it, so every re-routed copy of it (a crash between re-routing and
    committing, at least once, makes two) is the same request."""
    for name, value in record.headers:
        if name == REROUTED_FROM and value and (origin := _ORIGIN.fullmatch(value)):
            return f"{AUTO_REQUEST_ID}{int(origin[1])}.{int(origin[2])}"
    return f"{AUTO_REQUEST_ID}{record.partition}.{record.offset}"


def _command(record: InputRecord, fields: dict[str, Any]) -> Command:
    """The core command a valid message on its own partition asks for, from its fields
    (those of a model, or of a shape, which leaves out what was not sent)."""
    job_type: str = fields["job_type"]
    if record.role == "requests":
        request_id = fields.get("request_id") or _auto_request_id(record)
        client_id = fields.get("client_id")
        if fields.get("kind") == "cancel":
            return Cancel(
                request_id=request_id,
                job_type=job_type,
                client_id=client_id,
                run_id=fields.get("run_id"),
                reason=fields.get("reason"),
                at=record.at,
                source=record.source,
            )
        initial_data = fields.get("initial_data")
        return Start(  # by position: a call by keyword builds a dict of them first
            request_id,
            job_type,
            client_id,
            {} if initial_data is None else initial_data,
            record.at,
            record.source,
            run_size(len(record.value or b""), client_id),
        )
    if fields.get("kind") == "progress":
        return Progress(
            job_type=job_type,
            run_id=fields["run_id"],
            metrics=fields.get("metrics"),
            request_id=fields.get("request_id"),
            at=record.at,
            source=record.source,
        )
    final_metrics = fields.get("final_metrics")
    return Finish(  # by position, as a start
        job_type,
        fields["run_id"],
        _RESULT_STATUS[fields["status"]],  # the shape and the model require it of a result
        {} if final_metrics is None else final_metrics,
        fields.get("request_id"),
        record.at,
        record.source,
    )
