"""Per-job-type TOML settings: values, defaults, and errors that name the file, line and field."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.core.config import ConfigError, JobsConfig, load, parse
from worker.core.lifecycle import JobConfig, Policy, Scope
from worker.settings import LONGEST_S, Settings

VALID = """\
# Job-type settings for the orchestrator.
[defaults]
policy = "queue"
timeout = "15m"

[job_types.post_scoring]
policy = "replace"

[job_types."email.digest"]
scope = "job_type+client"
timeout = 90

[job_types.nightly]
policy = "reject"
scope = "job_type"
timeout = "1d"

[job_types.plain]
"""


def error_of(text: str) -> BaseException | None:
    """The exception `parse` raises for `text` (any kind), or None when it parses."""
    try:
        parse(text, "jobs.toml")
    except Exception as exc:  # the tests check the kind
        return exc
    return None


# --- valid files ------------------------------------------------------------------------------


def test_tables_override_defaults_and_inherit_the_rest() -> None:
    """A job type's table overrides `[defaults]` field by field and inherits the others."""
    config = parse(VALID)
    assert config.defaults == JobConfig(Policy.QUEUE, Scope.JOB_TYPE, timedelta(minutes=15))
    assert config.for_job("post_scoring") == JobConfig(
        Policy.REPLACE, Scope.JOB_TYPE, timedelta(minutes=15)
    )
    assert config.for_job("email.digest") == JobConfig(
        Policy.QUEUE, Scope.JOB_TYPE_CLIENT, timedelta(seconds=90)
    )
    assert config.for_job("nightly") == JobConfig(Policy.REJECT, Scope.JOB_TYPE, timedelta(days=1))
    assert config.for_job("plain") == config.defaults
    assert set(config.job_types) == {"post_scoring", "email.digest", "nightly", "plain"}


def test_unknown_job_type_uses_the_defaults() -> None:
    """A job type without a table of its own gets `[defaults]`."""
    config = parse(VALID)
    assert config.for_job("never_mentioned") == config.defaults
    assert config.for_job("post_scoring.extra") == config.defaults


def test_empty_file_gives_the_built_in_defaults() -> None:
    """An empty file (or one without `[defaults]`) means reject, job-type scope, no timeout."""
    assert parse("") == JobsConfig()
    assert parse("# nothing yet\n").for_job("x") == JobConfig()
    only_one = parse('[job_types.a]\npolicy = "queue"\n')
    assert only_one.for_job("a") == JobConfig(policy=Policy.QUEUE)
    assert only_one.for_job("b") == JobConfig()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"90s"', timedelta(seconds=90)),
        ('"15m"', timedelta(minutes=15)),
        ('"2h"', timedelta(hours=2)),
        ('"1d"', timedelta(days=1)),
        ('"1.5h"', timedelta(minutes=90)),
        ('"45"', timedelta(seconds=45)),
        ("45", timedelta(seconds=45)),
        ("2.5", timedelta(seconds=2.5)),
    ],
)
def test_durations(value: str, expected: timedelta) -> None:
    """A timeout is a number of seconds, or a string with an s, m, h or d unit."""
    assert parse(f"[defaults]\ntimeout = {value}\n").defaults.timeout == expected


# --- invalid files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "field", "fragment"),
    [
        pytest.param(
            '[defaults]\npolicy = "reject"\n\n[job_types.a]\nscope = "job_type"\npolicy = "drop"\n',
            6,
            "job_types.a.policy",
            "'reject', 'queue' or 'replace'",
            id="bad-policy-in-job-type",
        ),
        pytest.param(
            '[defaults]\npolicy = "first"\n',
            2,
            "defaults.policy",
            "'reject', 'queue' or 'replace'",
            id="bad-policy-in-defaults",
        ),
        pytest.param(
            "[defaults]\npolicy = 3\n",
            2,
            "defaults.policy",
            "'reject', 'queue' or 'replace'",
            id="policy-not-text",
        ),
        pytest.param(
            '[job_types.a]\ntimeout = 5\n\n[job_types.b]\nscope = "client"\n',
            5,
            "job_types.b.scope",
            "'job_type' or 'job_type+client'",
            id="bad-scope",
        ),
        pytest.param(
            "[defaults]\n# no timeout yet\ntimeout = -3\n",
            3,
            "defaults.timeout",
            "positive",
            id="negative-timeout",
        ),
        pytest.param(
            '[job_types.b]\ntimeout = "0s"\n',
            2,
            "job_types.b.timeout",
            "positive",
            id="zero-timeout",
        ),
        pytest.param(
            '[defaults]\npolicy = "queue"\ntimeout = "10 minutes"\n',
            3,
            "defaults.timeout",
            "duration",
            id="bad-duration",
        ),
        pytest.param(
            '[defaults]\ntimeout = "soon"\n',
            2,
            "defaults.timeout",
            "duration",
            id="duration-without-number",
        ),
        pytest.param(
            '[defaults]\npolicy = "queue"\n[job_types.c]\npolicy = "queue"\npolcy = "reject"\n',
            5,
            "job_types.c.polcy",
            "Extra inputs are not permitted",
            id="unknown-key-in-job-type",
        ),
        pytest.param(
            "[defaults]\npolicy = 'reject'\nretries = 3\n",
            3,
            "defaults.retries",
            "Extra inputs are not permitted",
            id="unknown-key-in-defaults",
        ),
        pytest.param(
            '[defaults]\n\n[jobtypes.c]\npolicy = "queue"\n',
            3,
            "jobtypes",
            "Extra inputs are not permitted",
            id="unknown-table",
        ),
        pytest.param(
            '[job_types."feed.import"]\npolicy = "bad"\n',
            2,
            "job_types.feed.import.policy",
            "'reject', 'queue' or 'replace'",
            id="quoted-job-type-name",
        ),
        pytest.param(
            '[job_types.ab]\npolicy = "queue"\n[job_types.a]\npolicy = "bad"\n',
            4,
            "job_types.a.policy",
            "'reject'",
            id="job-type-name-prefix-of-another",
        ),
        pytest.param(
            '# policy = "x"\n[defaults]\n# policy = "reject"\n  policy = "bad"\n',
            4,
            "defaults.policy",
            "'reject'",
            id="commented-out-key-first",
        ),
    ],
)
def test_invalid_setting_names_the_file_line_and_field(
    text: str, line: int, field: str, fragment: str
) -> None:
    """An invalid setting is a ConfigError saying `file:line: field: problem`."""
    with pytest.raises(ConfigError) as caught:
        parse(text, "jobs.toml")
    message = str(caught.value)
    assert message.startswith(f"jobs.toml:{line}: {field}: ")
    assert fragment in message


def test_every_invalid_setting_is_reported() -> None:
    """Several invalid settings give one line each, every one with its own line number."""
    text = '[defaults]\npolicy = "x"\nscope = "y"\n\n[job_types.a]\ntimeout = "z"\n'
    with pytest.raises(ConfigError) as caught:
        parse(text, "jobs.toml")
    lines = str(caught.value).splitlines()
    assert [line.split(": ")[0:2] for line in lines] == [
        ["jobs.toml:2", "defaults.policy"],
        ["jobs.toml:3", "defaults.scope"],
        ["jobs.toml:6", "job_types.a.timeout"],
    ]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('[defaults]\npolicy = "queue"\nscope = \n', 3),
        ("[defaults\npolicy = 'reject'\n", 1),
        ('[defaults]\npolicy = "queue"\npolicy = "reject"\n', 3),
        ('[defaults]\ntimeout = "90s\n', 2),
    ],
    ids=["missing-value", "unclosed-header", "duplicate-key", "unclosed-string"],
)
def test_toml_syntax_error_names_the_file_and_line(text: str, line: int) -> None:
    """A file that is not TOML is a ConfigError naming the file and the line of the problem."""
    with pytest.raises(ConfigError) as caught:
        parse(text, "jobs.toml")
    message = str(caught.value)
    assert message.startswith("jobs.toml: ")
    assert f"line {line}," in message


def test_boolean_timeout_is_invalid() -> None:
    """`timeout = true` is not a duration and is reported, not read as one second."""
    error = error_of("[defaults]\ntimeout = true\n")
    assert isinstance(error, ConfigError), error
    assert str(error).startswith("jobs.toml:2: defaults.timeout: ")


@pytest.mark.parametrize("value", ["inf", "nan", "1e20", '"99999999999d"'])
def test_out_of_range_timeout_is_a_config_error(value: str) -> None:
    """A timeout too large for a duration (or not a number) is a ConfigError naming its line."""
    error = error_of(f'[defaults]\npolicy = "queue"\ntimeout = {value}\n')
    assert isinstance(error, ConfigError), repr(error)
    assert str(error).startswith("jobs.toml:3: defaults.timeout: ")


@pytest.mark.parametrize(
    "text",
    [
        "[defaults]\ntimeout = " + "[" * 100_000 + "]" * 100_000 + "\n",
        "[defaults]\ntimeout = " + "{a = " * 100_000 + "1" + "}" * 100_000 + "\n",
        "[job_types]\netl = " + "[{x = " * 50_000 + "1" + "}]" * 50_000 + "\n",
    ],
    ids=["arrays", "inline-tables", "both-in-job-types"],
)
def test_values_nested_too_deeply_are_a_config_error(text: str) -> None:
    """Arrays or inline tables nested past what tomllib's recursion takes are a ConfigError
    naming the file, not a RecursionError."""
    error = error_of(text)
    assert isinstance(error, ConfigError), repr(error)
    assert str(error) == "jobs.toml: arrays or inline tables nest too deeply"


@pytest.mark.parametrize(
    "digits",
    ["9" * 5000, "-" + "9" * 5000, "1_" * 4400 + "0"],
    ids=["long", "negative", "underscores"],
)
def test_an_integer_too_long_to_convert_is_a_config_error(digits: str) -> None:
    """An integer of more digits than Python converts is a ConfigError naming the file and
    its line, not a ValueError."""
    error = error_of(f'[defaults]\npolicy = "queue"\ntimeout = {digits}\n')
    assert isinstance(error, ConfigError), repr(error)
    assert str(error).startswith("jobs.toml:3: an integer has more than ")


def test_load_names_the_file_of_a_value_it_cannot_read(tmp_path: Path) -> None:
    """`jobctl run --config` and `verify --config` load the file: its path is in the error."""
    path = tmp_path / "jobs.toml"
    path.write_text("[defaults]\ntimeout = " + "[" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="nest too deeply") as caught:
        load(path)
    assert str(caught.value).startswith(f"{path}: ")
    path.write_text("[job_types.etl]\ntimeout = " + "9" * 5000 + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"more than \d+ digits") as caught:
        load(path)
    assert str(caught.value).startswith(f"{path}:2: ")


@pytest.mark.parametrize(
    "text",
    [
        "[job_types.'feed.import']\npolicy = 'bad'\n",
        '[job_types]\nfeed.policy = "bad"\n',
    ],
    ids=["literal-string-name", "dotted-key"],
)
def test_other_toml_spellings_get_the_right_line(text: str) -> None:
    """Errors in tables spelt with TOML's other valid syntaxes still name line 2."""
    error = error_of(text)
    assert isinstance(error, ConfigError)
    assert str(error).startswith("jobs.toml:2: ")


# --- load -------------------------------------------------------------------------------------


def test_no_file_means_built_in_defaults() -> None:
    """Without JOBS_CONFIG every job type is `reject`, scoped by job type, with no timeout."""
    config = load(None)
    assert config == JobsConfig()
    assert config.for_job("x") == JobConfig()


def test_load_reads_a_file(tmp_path: Path) -> None:
    """load() parses the file at the path."""
    path = tmp_path / "jobs.toml"
    path.write_text(VALID, encoding="utf-8")
    assert load(path) == parse(VALID)


def test_load_names_the_file_in_errors(tmp_path: Path) -> None:
    """An invalid file's errors start with its path."""
    path = tmp_path / "jobs.toml"
    path.write_text('[defaults]\npolicy = "bad"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value).startswith(f"{path}:2: defaults.policy: ")


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    """A path with no file is a ConfigError naming the path and the reason."""
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as caught:
        load(path)
    message = str(caught.value)
    assert "cannot read" in message
    assert str(path) in message
    assert "No such file" in message


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_path_that_is_no_file_is_a_clear_error(tmp_path: Path, kind: str) -> None:
    """A directory, or a FIFO (whose read would block with no writer, past SIGTERM), is a
    ConfigError naming it, not a crash or a hang."""
    path = tmp_path / "jobs.toml"
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    with pytest.raises(ConfigError, match=f"{path} is not a regular file"):
        load(path)


def test_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """A file that is not UTF-8 is a ConfigError naming the file."""
    path = tmp_path / "jobs.toml"
    path.write_bytes(b'[defaults]\npolicy = "\xff"\n')
    try:
        load(path)
    except Exception as exc:  # the test checks the kind
        error: BaseException | None = exc
    else:
        error = None
    assert isinstance(error, ConfigError), repr(error)
    assert str(path) in str(error)


SECONDS_SETTINGS = [name for name, field in Settings.model_fields.items() if name.endswith("_s")]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e300", str(LONGEST_S + 1)])
@pytest.mark.parametrize("name", SECONDS_SETTINGS)
def test_a_seconds_setting_no_time_can_hold_is_refused_naming_it(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each seconds setting becomes a `timedelta` added to times: infinity, NaN, or more than
    a century is refused when the settings are read, naming the variable, not met as an
    overflow when the worker starts."""
    monkeypatch.setenv(f"JOBS_{name.upper()}", value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert [e["loc"] for e in refused.value.errors()] == [(name,)]
    monkeypatch.setenv(f"JOBS_{name.upper()}", str(LONGEST_S))
    assert getattr(Settings(), name) == LONGEST_S
    # what the worker and the readers do with it stays within the times they use
    now = datetime.now(UTC)
    assert (now - timedelta(seconds=LONGEST_S)).year > 1900
    assert (now + timedelta(seconds=LONGEST_S)).year < 2200


def test_the_seconds_settings_are_the_ones_the_worker_turns_into_durations() -> None:
    """The list above is not empty by accident: the worker's durations are among them."""
    assert {"run_retention_s", "time_hold_s", "max_clock_skew_s", "tick_s"} <= set(SECONDS_SETTINGS)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("bad type", "no whitespace or control character"),
        (" post_scoring", "no whitespace or control character"),
        ("tab\there", "no whitespace or control character"),
        ("nul\x00", "no whitespace or control character"),
        ("bell\x07", "no whitespace or control character"),
        ("", "not empty"),
        ("é" * 101, "at most 200 bytes as UTF-8"),
        ("x" * 100_000, "at most 200 bytes as UTF-8"),
    ],
)
def test_a_table_of_a_name_that_can_never_be_a_job_type_is_refused(name: str, why: str) -> None:
    """A `[job_types."..."]` whose name no record can carry (the wire's job type rules) is
    refused, naming the table, its line and why, its name cut short when long."""
    quoted = json.dumps(name, ensure_ascii=False)
    text = f'[defaults]\npolicy = "queue"\n\n[job_types.{quoted}]\npolicy = "reject"\n'
    with pytest.raises(ConfigError) as refused:
        parse(text, "jobs.toml")
    said = str(refused.value)
    assert said.startswith("jobs.toml:4: [job_types.")
    assert f"never a job type: a job type is {why}" in said or f"holds {why}" in said
    assert len(said) < 300


def test_a_valid_job_type_table_is_still_taken() -> None:
    parsed = parse('[job_types."post.scoring-v2"]\npolicy = "queue"\n')
    assert parsed.for_job("post.scoring-v2").policy is Policy.QUEUE


def test_the_bad_duration_message_lists_every_unit_taken() -> None:
    """The message lists "1d" too, which is taken."""
    with pytest.raises(ConfigError) as refused:
        parse('[defaults]\ntimeout = "3w"\n')
    assert '"90s", "15m", "2h", "1d"' in str(refused.value)
    assert parse('[defaults]\ntimeout = "1d"\n').defaults.timeout == timedelta(days=1)
