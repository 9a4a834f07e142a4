"""Per-job-type TOML settings: values, defaults, and errors that name the line."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from worker.config import ConfigError, load, parse
from worker.lifecycle import JobConfig, Policy, Scope

VALID = """\
[defaults]
policy = "queue"
timeout = "15m"

[job_types.post_scoring]
policy = "replace"

[job_types."email.digest"]
scope = "job_type+client"
timeout = 90
"""


def test_tables_override_defaults_and_inherit_the_rest() -> None:
    """A job type's table overrides `[defaults]` field by field; others use the defaults."""
    config = parse(VALID)
    assert config.for_job("post_scoring") == JobConfig(
        Policy.REPLACE, Scope.JOB_TYPE, timedelta(minutes=15)
    )
    assert config.for_job("email.digest") == JobConfig(
        Policy.QUEUE, Scope.JOB_TYPE_CLIENT, timedelta(seconds=90)
    )
    assert config.for_job("unknown") == JobConfig(
        Policy.QUEUE, Scope.JOB_TYPE, timedelta(minutes=15)
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400), ("2.5", 2.5), ("45", 45)],
)
def test_durations(text: str, seconds: float) -> None:
    """Timeouts are seconds, or a number with s, m, h or d."""
    value = f'"{text}"' if not text.replace(".", "").isdigit() else text
    config = parse(f"[defaults]\ntimeout = {value}\n")
    assert config.defaults.timeout == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ('[defaults]\npolicy = "reject"\n\n[job_types.a]\npolicy = "queu"\n', 5, "policy"),
        ('[job_types.a]\ntimeout = 5\n\n[job_types.b]\nscope = "client"\n', 5, "scope"),
        ("[defaults]\n# comment\ntimeout = -3\n", 3, "positive"),
        ('[defaults]\ntimeout = "soon"\n', 2, "duration"),
        ("[defaults]\npolicy = 'reject'\nretries = 3\n", 3, "retries"),
        ("[defaults\npolicy = 'reject'\n", 1, "line 1"),
    ],
)
def test_invalid_files_name_the_line_and_the_problem(text: str, line: int, fragment: str) -> None:
    """Each error says which file, which line and what is wrong."""
    with pytest.raises(ConfigError) as caught:
        parse(text, "jobs.toml")
    message = str(caught.value)
    assert message.startswith("jobs.toml")
    assert f"jobs.toml:{line}:" in message or f"line {line}" in message
    assert fragment in message


def test_no_file_means_built_in_defaults(tmp_path: Path) -> None:
    """Without JOBS_CONFIG every job type is `reject`, scoped by job type, with no timeout."""
    assert load(None).for_job("x") == JobConfig()
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")
