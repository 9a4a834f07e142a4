"""The console API's query parameters: parsed strictly, each refusal a sentence naming it.

The raw query string is split and decoded here rather than by aiohttp, which replaces bad
UTF-8 with U+FFFD and lets a repeated or unknown parameter pass: here a value that is not
UTF-8 once its %-escapes are decoded, a control character, a parameter given twice, an
unknown parameter or a value out of range is a `BadParameter` (a 400 naming it).
Job types and client IDs are checked with the wire format's own types, so a value that no
run can have (whitespace, over 200 characters) is refused rather than looked up.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import unquote_to_bytes

from pydantic import TypeAdapter, ValidationError

from schemas import RunStatus
from schemas.messages import ClientId, JobType
from worker.clientkey import client_key

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
_MAX_FIELDS = 16  # parameters in one query string
_MAX_TIME_CHARS = 64
_MAX_CURSOR_CHARS = 1024
_MAX_RUN_ID_CHARS = 400  # the wire format's limit
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]{1,18}")
_CURSOR = re.compile(r"[A-Za-z0-9_-]+")
_JOB_TYPE: TypeAdapter[str] = TypeAdapter(JobType)
_CLIENT_ID: TypeAdapter[str] = TypeAdapter(ClientId)


class BadParameter(ValueError):
    """A query parameter (or path part) the API cannot use: a 400 naming it."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.message = message


def _shown(text: str, limit: int = 60) -> str:
    """`text` quoted for a message: escaped, and cut short when long."""
    cut = text if len(text) <= limit else text[:limit] + "…"
    return repr(cut)


def _decode(raw: str, name: str) -> str:
    try:
        return unquote_to_bytes(raw.replace("+", " ")).decode("utf-8")
    except UnicodeDecodeError:
        raise BadParameter(
            name, f"{name} is not UTF-8 once its %-escapes are decoded ({_shown(raw)})"
        ) from None


def parse_query(raw: str, allowed: Collection[str]) -> dict[str, str]:
    """The parameters of the raw query string `raw`, each once and each in `allowed`."""
    if not raw:
        return {}
    fields = [f for f in raw.split("&") if f]
    if len(fields) > _MAX_FIELDS:
        raise BadParameter("query", f"the query has {len(fields)} parameters; at most 16")
    found: dict[str, str] = {}
    for field in fields:
        raw_name, _, raw_value = field.partition("=")
        name = _decode(raw_name, "query")
        if name not in allowed:
            takes = ", ".join(sorted(allowed)) or "no parameters"
            raise BadParameter(
                name[:100], f"unknown query parameter {_shown(name)}; this endpoint takes {takes}"
            )
        if name in found:
            raise BadParameter(name, f"{name} is given twice; give it once")
        value = _decode(raw_value, name)
        if _CONTROL.search(value):
            raise BadParameter(name, f"{name} holds a control character ({_shown(value)})")
        found[name] = value
    return found


def job_type(value: str, name: str = "job_type") -> str:
    """A job type as the wire format allows it."""
    try:
        return _JOB_TYPE.validate_python(value)
    except ValidationError:
        raise BadParameter(
            name,
            f"{name} {_shown(value)} cannot be a job type: 1 to 200 characters, without "
            "whitespace or control characters",
        ) from None


def client_id(value: str) -> str:
    """A client ID as the wire format allows it."""
    try:
        return _CLIENT_ID.validate_python(value)
    except ValidationError:
        raise BadParameter(
            "client_id",
            f"client_id {_shown(value)} cannot be a client ID: 1 to 128 characters, without "
            "whitespace or control characters",
        ) from None


def status(value: str) -> RunStatus:
    """A run status, in any case."""
    try:
        return RunStatus(value.strip().upper())
    except ValueError:
        names = ", ".join(s.value for s in RunStatus)
        raise BadParameter("status", f"status {_shown(value)} is not one of {names}") from None


def instant(value: str, name: str) -> datetime:
    """An ISO 8601 time, in UTC (a time without an offset is taken as UTC)."""
    problem = f"{name} {_shown(value)} is not an ISO 8601 time like 2026-11-28T09:30:00Z"
    if len(value) > _MAX_TIME_CHARS:
        raise BadParameter(name, problem)
    try:
        parsed = datetime.fromisoformat(value.strip())
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise BadParameter(name, problem) from None


def stored_time(at: datetime) -> str:
    """`at` as the store writes times (UTC ISO text, which sorts as time)."""
    return at.astimezone(UTC).isoformat()


def limit(value: str | None, name: str = "limit") -> int:
    """A page size (parameter `name`): 1 to `MAX_LIMIT`, `DEFAULT_LIMIT` when not given."""
    if value is None:
        return DEFAULT_LIMIT
    if not _DIGITS.fullmatch(value) or not 1 <= int(value) <= MAX_LIMIT:
        raise BadParameter(name, f"{name} must be a whole number from 1 to {MAX_LIMIT}")
    return int(value)


def sequence(value: str, name: str) -> int:
    """An event sequence number (`after`, `Last-Event-ID`)."""
    if not _DIGITS.fullmatch(value):
        raise BadParameter(name, f"{name} must be an event ID this console gave out (digits)")
    return int(value)


def run_id(raw: str) -> str:
    """A run ID from its raw (%-escaped) path segment."""
    try:
        value = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadParameter(
            "run_id", f"run_id is not UTF-8 once its %-escapes are decoded ({_shown(raw)})"
        ) from None
    if not value or len(value) > _MAX_RUN_ID_CHARS or _CONTROL.search(value):
        raise BadParameter(
            "run_id", "run_id must be 1 to 400 characters without control characters"
        )
    return value


def make_cursor(started_at: str, run_id: str) -> str:
    """The opaque cursor of the page after the run (`started_at`, `run_id`)."""
    return _encode([started_at, run_id])


def cursor(value: str) -> tuple[str, str]:
    """(started_at, run_id) of a cursor `make_cursor` made."""
    started_at, run = _decode_cursor(value, 2)
    return started_at, run


def make_type_cursor(job_type: str) -> str:
    """The opaque cursor of the page of job types after `job_type`."""
    return _encode([job_type])


def type_cursor(value: str) -> str:
    """The job type of a cursor `make_type_cursor` made."""
    (name,) = _decode_cursor(value, 1)
    return name


def _encode(parts: list[str]) -> str:
    raw = json.dumps(parts, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(value: str, parts: int) -> list[str]:
    """The `parts` strings of a cursor `_encode` made; a run cursor is refused as a job type
    cursor and the other way round."""
    problem = BadParameter("cursor", "cursor is not one this console gave out (use `next`)")
    if len(value) > _MAX_CURSOR_CHARS or not _CURSOR.fullmatch(value):
        raise problem
    try:
        decoded = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (binascii.Error, ValueError):
        raise problem from None
    if (
        not isinstance(decoded, list)
        or len(decoded) != parts
        or not all(isinstance(part, str) and _utf8(part) for part in decoded)
    ):
        raise problem
    return decoded


def _utf8(text: str) -> bool:
    """Whether `text` can be UTF-8 (JSON's escapes can spell lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class RunFilter:
    """Which runs (or status events) a request asks for; times are stored-time text."""

    job_type: str | None = None
    status: RunStatus | None = None
    client_id: str | None = None  # as `client_key` spells it
    since: str | None = None  # inclusive
    until: str | None = None  # exclusive

    def matches(self, job_type: str, status: str | None, client: str | None, at: str) -> bool:
        """Whether a status event with these fields passes (`at`: its stored time)."""
        return (
            (self.job_type is None or job_type == self.job_type)
            and (self.status is None or status == self.status)
            and (
                self.client_id is None
                or (client is not None and client_key(client) == self.client_id)
            )
            and (self.since is None or at >= self.since)
            and (self.until is None or at < self.until)
        )


FILTERS = ("job_type", "status", "client_id", "since", "until")


def run_filter(query: dict[str, str]) -> RunFilter:
    """The filter of parsed query parameters `query` (see `FILTERS`)."""
    since = instant(query["since"], "since") if "since" in query else None
    until = instant(query["until"], "until") if "until" in query else None
    if since is not None and until is not None and until <= since:
        raise BadParameter("until", "until must be later than since")
    return RunFilter(
        job_type=job_type(query["job_type"]) if "job_type" in query else None,
        status=status(query["status"]) if "status" in query else None,
        client_id=client_key(client_id(query["client_id"])) if "client_id" in query else None,
        since=None if since is None else stored_time(since),
        until=None if until is None else stored_time(until),
    )
