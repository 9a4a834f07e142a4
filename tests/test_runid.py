"""Run IDs: made from broker time and record coordinates; normalized or rejected on input."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import pytest

from worker.core.runid import RUN_ID_RE, InvalidRunId, SeedRunId, make_run_id, normalize_run_id

AT = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_make_run_id_format() -> None:
    """A run ID is YYMMDD-HHMMSS-<partition>.<offset> of the record's broker time."""
    run_id = make_run_id(AT, 3, 1042)
    assert run_id == "250102-030405-3.1042"
    assert RUN_ID_RE.match(run_id)


def test_make_run_id_converts_to_utc() -> None:
    """A time in another zone is stamped in UTC."""
    plus_two = timezone(timedelta(hours=2))
    at = datetime(2025, 1, 2, 1, 4, 5, tzinfo=plus_two)
    assert make_run_id(at, 0, 7) == "250101-230405-0.7"


def test_make_run_id_truncates_subseconds() -> None:
    """Milliseconds of the broker time do not appear in the run ID."""
    assert make_run_id(AT.replace(microsecond=999_999), 1, 2) == "250102-030405-1.2"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_make_run_id_stamps_every_second_as_the_calendar_does(seed: int) -> None:
    """Stamps are formatted once per second and reused: times far apart, in one second,
    just before a second ends, before 1970 and in other zones are stamped as
    `strftime` stamps them in UTC, however the stamps of earlier calls were kept."""
    rng = random.Random(seed)
    zones = [UTC, timezone(timedelta(hours=-7)), timezone(timedelta(hours=5, minutes=30))]
    for _ in range(2_000):
        second = rng.choice([rng.randrange(-(10**9), 4 * 10**9), 1_700_000_000 + rng.randrange(3)])
        micros = rng.choice([0, 999_999, rng.randrange(1_000_000)])
        at = datetime.fromtimestamp(second, UTC) + timedelta(microseconds=micros)
        expected = at.strftime("%y%m%d-%H%M%S")
        assert make_run_id(at.astimezone(rng.choice(zones)), 1, 5) == f"{expected}-1.5"


def test_make_run_id_client_suffix_is_lowercased() -> None:
    """A client-scoped run ID ends with the client ID, stripped and lower-cased."""
    run_id = make_run_id(AT, 2, 9, client_id=" AcMe-Corp ")
    assert run_id == "250102-030405-2.9-acme-corp"
    assert normalize_run_id(run_id) == run_id


def test_make_run_id_same_second_differs_by_coordinates() -> None:
    """Two starts in the same second get different run IDs (the seed gave them the same)."""
    assert make_run_id(AT, 0, 1) != make_run_id(AT, 0, 2)
    assert make_run_id(AT, 0, 1) != make_run_id(AT, 1, 1)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("250102-030405-3.1042", "250102-030405-3.1042"),
        ("  250102-030405-3.1042\n", "250102-030405-3.1042"),
        ("\t250102-030405-3.1042-ACME ", "250102-030405-3.1042-acme"),
        ("250102-030405-003.0001042", "250102-030405-3.1042"),
        ("250102-030405-0.0", "250102-030405-0.0"),
        ("250102-030405-00.00-Client.X", "250102-030405-0.0-client.x"),
        ("240229-235959-1.1", "240229-235959-1.1"),
    ],
)
def test_normalize_run_id_canonical(raw: str, expected: str) -> None:
    """Case, surrounding whitespace and leading zeros in partition and offset are normalized."""
    assert normalize_run_id(raw) == expected


def test_normalize_run_id_is_idempotent() -> None:
    """A normalized run ID normalizes to itself."""
    once = normalize_run_id(" 250102-030405-007.010-ABC ")
    assert isinstance(once, str)
    assert normalize_run_id(once) == once


@pytest.mark.parametrize(
    "raw",
    [
        "251302-030405-0.1",  # month 13
        "250002-030405-0.1",  # month 0
        "250100-030405-0.1",  # day 0
        "250230-030405-0.1",  # 30 February
        "230229-030405-0.1",  # 29 February of a common year
        "250102-240000-0.1",  # hour 24
        "250102-036000-0.1",  # minute 60
        "250102-030460-0.1",  # second 60
        "251302-030405",  # seed-style, month 13
        "250102-250405-acme",  # seed-style, hour 25
    ],
)
def test_normalize_run_id_impossible_dates(raw: str) -> None:
    """A run ID whose date or time cannot exist is rejected and the message says so."""
    with pytest.raises(InvalidRunId, match="impossible date or time") as info:
        normalize_run_id(raw)
    assert repr(raw) in str(info.value)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "not-a-run-id",
        "2501-0304-0.1",
        "250102030405-0.1",
        "250102-030405-",
        "250102-030405.0.1",
        "25010-030405-0.1",
        "2501020-030405-0.1",
        "250102 -030405-0.1",
        "x250102-030405-0.1",
        "run 250102-030405-0.1",
        "250102_030405_0_1",
    ],
)
def test_normalize_run_id_garbage(raw: str) -> None:
    """Anything that is neither format raises InvalidRunId naming the input and the format."""
    with pytest.raises(InvalidRunId) as info:
        normalize_run_id(raw)
    message = str(info.value)
    assert repr(raw) in message
    assert "YYMMDD-HHMMSS-<partition>.<offset>" in message


def test_invalid_run_id_is_a_value_error() -> None:
    """InvalidRunId is a ValueError, so generic validation code catches it."""
    assert issubclass(InvalidRunId, ValueError)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("250102-030405", SeedRunId("250102-030405", None)),
        (" 250102-030405 ", SeedRunId("250102-030405", None)),
        ("250102-030405-ACME", SeedRunId("250102-030405", "acme")),
        ("250102-030405-client_1", SeedRunId("250102-030405", "client_1")),
    ],
)
def test_normalize_run_id_seed_style(raw: str, expected: SeedRunId) -> None:
    """A seed-style ID (YYMMDD-HHMMSS[-client]) comes back as a SeedRunId to resolve."""
    assert normalize_run_id(raw) == expected


@pytest.mark.parametrize(
    ("seed", "run_id", "matches"),
    [
        (SeedRunId("250102-030405", None), "250102-030405-0.1", True),
        (SeedRunId("250102-030405", None), "250102-030405-12.345", True),
        (SeedRunId("250102-030405", None), "250102-030406-0.1", False),
        (SeedRunId("250102-030405", None), "250103-030405-0.1", False),
        (SeedRunId("250102-030405", None), "250102-030405-0.1-acme", False),
        (SeedRunId("250102-030405", "acme"), "250102-030405-0.1-acme", True),
        (SeedRunId("250102-030405", "acme"), "250102-030405-0.1-other", False),
        (SeedRunId("250102-030405", "acme"), "250102-030405-0.1", False),
        (SeedRunId("250102-030405", None), "250102-030405", False),
        (SeedRunId("250102-030405", None), "garbage", False),
    ],
)
def test_seed_run_id_matches(seed: SeedRunId, run_id: str, matches: bool) -> None:
    """A seed-style ID matches full run IDs with the same stamp and the same client suffix."""
    assert seed.matches(run_id) is matches
