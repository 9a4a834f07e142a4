"""The settings a decision was made with, as the decision log records them.

Job-type settings and limits change over a log's life: a `queue` policy added, a timeout
shortened. To audit a decision, `verify` needs the settings in force when it was made, so
they are part of the log:

- every status event carries the header `jobs-settings`: the digest of the settings document
  its worker decided with (`document_of`: job-type settings, limits, retention, time rules,
  and the topics' partition count, which says where each job type's records go);
- the document itself is a changelog row (`<prefix>.state`), key ``\\x00settings:<digest>``,
  value ``{"row": "settings", "settings": <document>}``. A worker writes it into the first
  transaction it commits for each partition it takes, so the row is committed with (never
  after) the first event naming it, and compaction keeps it as long as the topic exists.
  The key starts with NUL, which no job type or run ID may contain.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.core.config import JobsConfig
from worker.core.lifecycle import JobConfig, Limits, Policy, Scope
from worker.core.limits import InputLimits
from worker.engine.changelog import SETTINGS_HEAD

if TYPE_CHECKING:
    from worker.engine.task import Rules

HEADER = "jobs-settings"
KEY_PREFIX = b"\x00settings:"


class _Job(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: Policy
    scope: Scope
    timeout_s: float | None


class SettingsDocument(BaseModel):
    """Everything a partition task decides with, as JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    defaults: _Job
    job_types: dict[str, _Job]
    ended_window: int
    idempotency_window: int
    run_bytes: int
    record_bytes: int
    nesting_depth: int
    data_bytes: int
    retention_s: float
    hold_s: float
    skew_s: float
    # The topics' partition count (a document written before it was recorded has none).
    partitions: int | None = Field(default=None, ge=1)


def _job(config: JobConfig) -> _Job:
    timeout = None if config.timeout is None else config.timeout.total_seconds()
    return _Job(policy=config.policy, scope=config.scope, timeout_s=timeout)


def _config(job: _Job) -> JobConfig:
    timeout = None if job.timeout_s is None else timedelta(seconds=job.timeout_s)
    return JobConfig(policy=job.policy, scope=job.scope, timeout=timeout)


def document_of(rules: Rules) -> bytes:
    """The settings document of `rules`, canonical: equal settings give equal bytes."""
    jobs = rules.jobs
    return (
        SettingsDocument(
            defaults=_job(jobs.defaults),
            job_types={name: _job(jobs.job_types[name]) for name in sorted(jobs.job_types)},
            ended_window=rules.limits.ended_window,
            idempotency_window=rules.limits.idempotency_window,
            run_bytes=rules.limits.run_bytes,
            record_bytes=rules.input_limits.record_bytes,
            nesting_depth=rules.input_limits.nesting_depth,
            data_bytes=rules.input_limits.data_bytes,
            retention_s=rules.retention.total_seconds(),
            hold_s=rules.hold.total_seconds(),
            skew_s=rules.skew.total_seconds(),
            partitions=rules.partitions,
        )
        .model_dump_json()
        .encode()
    )


def digest_of(document: bytes) -> str:
    """The short name of a settings document, as the `jobs-settings` header carries it."""
    return hashlib.sha256(document).hexdigest()[:16]


def rules_from(document: bytes, base: Rules) -> Rules:
    """`base` with the settings of `document` (its partition count when it has one; test
    hooks stay `base`'s).

    Raises ValueError for a document this code would not write, durations no `timedelta`
    holds included."""
    doc = SettingsDocument.model_validate_json(document)
    try:
        return _rules(doc, base)
    except OverflowError as exc:
        raise ValueError(f"a duration of the settings is out of range: {exc}") from None


def _rules(doc: SettingsDocument, base: Rules) -> Rules:
    return replace(
        base,
        jobs=JobsConfig(
            defaults=_config(doc.defaults),
            job_types={name: _config(job) for name, job in doc.job_types.items()},
        ),
        limits=Limits(
            ended_window=doc.ended_window,
            idempotency_window=doc.idempotency_window,
            run_bytes=doc.run_bytes,
        ),
        input_limits=InputLimits(
            record_bytes=doc.record_bytes,
            nesting_depth=doc.nesting_depth,
            data_bytes=doc.data_bytes,
        ),
        retention=timedelta(seconds=doc.retention_s),
        hold=timedelta(seconds=doc.hold_s),
        skew=timedelta(seconds=doc.skew_s),
        partitions=base.partitions if doc.partitions is None else doc.partitions,
    )


def settings_row(digest: str, document: bytes) -> tuple[bytes, bytes]:
    """(key, value) of the changelog row that records a settings document."""
    return KEY_PREFIX + digest.encode(), SETTINGS_HEAD + document + b"}"


def document_in(key: bytes | None, value: bytes | None) -> tuple[str, bytes] | None:
    """(digest, document) when a changelog record is a settings row, else None."""
    if key is None or value is None or not key.startswith(KEY_PREFIX):
        return None
    if not (value.startswith(SETTINGS_HEAD) and value.endswith(b"}")):
        return None
    return key[len(KEY_PREFIX) :].decode(errors="replace"), value[len(SETTINGS_HEAD) : -1]


def digest_in(headers: object) -> str | None:
    """The `jobs-settings` digest among a record's headers, if any."""
    if not isinstance(headers, list | tuple):
        return None
    for item in headers:
        if isinstance(item, tuple) and len(item) == 2 and item[0] == HEADER:
            value = item[1]
            if isinstance(value, bytes):
                return value.decode(errors="replace")
    return None
