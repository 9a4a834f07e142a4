"""The settings document a decision log records: stable, complete, and safe to read back."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest

from worker.audit.verify import Rulebook, VerifyReport
from worker.core.config import JobsConfig, parse
from worker.core.lifecycle import JobConfig, Limits, Policy, Scope
from worker.core.limits import InputLimits
from worker.engine import rulebook
from worker.engine.changelog import PartitionSnapshot, apply_row
from worker.engine.task import Rules


def rules(config: JobsConfig) -> Rules:
    return Rules(2, config, Limits(ended_window=7), InputLimits(data_bytes=99), timedelta(hours=3))


def test_a_document_round_trips_every_setting_a_decision_depends_on() -> None:
    config = parse(
        '[defaults]\npolicy = "queue"\ntimeout = 90\n'
        '[job_types.mail]\npolicy = "replace"\nscope = "job_type+client"\n'
    )
    original = rules(config)
    document = rulebook.document_of(original)
    back = rulebook.rules_from(document, rules(JobsConfig()))
    assert back == original
    assert back.jobs.for_job("mail") == JobConfig(
        Policy.REPLACE, Scope.JOB_TYPE_CLIENT, timedelta(seconds=90)
    )


def test_rules_build_their_settings_document_once_not_per_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every batch names the settings it decided with; the document behind the digest is
    built with the rules, not again per batch (compiled code included)."""
    built: list[Rules] = []
    real = rulebook.document_of

    def counted(of: Rules) -> bytes:
        built.append(of)
        return real(of)

    monkeypatch.setattr(rulebook, "document_of", counted)
    config = parse('[job_types.a]\npolicy = "queue"\n')
    made = rules(config)
    named = [made.settings for _ in range(5)]
    assert len(built) == 1
    assert named == [(rulebook.digest_of(real(made)), real(made))] * 5
    assert made.settings[1] == rulebook.document_of(rules(config))  # equal rules, one document


def test_equal_settings_have_one_digest_and_any_change_another() -> None:
    a = rulebook.document_of(rules(parse('[job_types.a]\npolicy = "queue"\n[job_types.b]\n')))
    b = rulebook.document_of(rules(parse('[job_types.b]\n[job_types.a]\npolicy = "queue"\n')))
    assert rulebook.digest_of(a) == rulebook.digest_of(b)
    c = rulebook.document_of(rules(parse('[job_types.a]\npolicy = "reject"\n[job_types.b]\n')))
    assert rulebook.digest_of(c) != rulebook.digest_of(a)


def test_the_settings_row_is_found_and_skipped_by_a_restore() -> None:
    document = rulebook.document_of(rules(JobsConfig()))
    key, value = rulebook.settings_row(rulebook.digest_of(document), document)
    assert rulebook.document_in(key, value) == (rulebook.digest_of(document), document)
    snapshot = PartitionSnapshot()
    apply_row(snapshot, key, value)
    assert (snapshot.jobs, snapshot.runs) == ({}, {})


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(os.urandom(64), id="random-bytes"),
        b'{"row":"settings","settings":\xff\xfe}',
        b'{"row":"settings","settings":' + b"[" * 5000 + b"}",
        b'{"row":"settings","settings":{"v":1,"defaults":{"policy":"nope"}}}',
        b'{"row":"settings","settings":{"v":1,"ended_window":"many"}}',
        b'{"row":"settings","settings":"' + b"x" * 1_000_000 + b'"}',
        pytest.param(b"", id="timeout-beyond-timedelta"),
    ],
)
def test_a_damaged_document_is_refused_with_an_error_not_a_crash(value: bytes) -> None:
    if not value:  # a document of ours, but for a time-out no duration holds
        valid = rulebook.document_of(rules(JobsConfig()))
        value = (
            b'{"row":"settings","settings":'
            + valid.replace(b'"timeout_s":null', b'"timeout_s":1e300', 1)
            + b"}"
        )
        assert b"1e300" in value
    found = rulebook.document_in(rulebook.KEY_PREFIX + b"abc", value)
    if found is None:
        return  # not even shaped as a settings row: not read as one
    with pytest.raises(ValueError, match=r"validation error|out of range"):
        rulebook.rules_from(found[1], rules(JobsConfig()))


@pytest.mark.parametrize(
    "headers",
    [
        [("jobs-settings", b"\xff\xfe\xfd")],
        [("jobs-settings", None)],
        [("other", b"x")],
        "not a list",
        [("jobs-settings",)],
    ],
)
def test_a_hostile_settings_header_never_raises(headers: object) -> None:
    digest = rulebook.digest_in(headers)
    assert digest is None or isinstance(digest, str)


def test_verify_reports_a_damaged_or_missing_document_and_goes_on() -> None:
    base = rules(JobsConfig())
    good = rulebook.document_of(rules(parse('[defaults]\npolicy = "queue"\n')))
    report = VerifyReport()
    book = Rulebook(base, {"bad": os.urandom(40), "good": good}, fixed=False, report=report)
    assert book.of("bad") is base
    assert book.of("gone") is base
    assert book.of("good").jobs.defaults.policy is Policy.QUEUE
    assert book.of(None, 3) is base
    assert report.missing == {"bad", "gone"}
    assert report.unrecorded == 3
    assert not report.ok
