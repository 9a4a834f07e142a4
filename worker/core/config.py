"""Per-job-type settings from a TOML file (`JOBS_CONFIG`).

    [defaults]                # for job types without a table of their own
    policy = "reject"         # reject | queue | replace
    scope = "job_type"        # job_type | job_type+client
    timeout = "30m"           # seconds as a number, or "90s", "15m", "2h", "1d"; none by default

    [job_types.post_scoring]
    policy = "queue"
    timeout = 600

An invalid file stops start-up with a message naming the file, the line and the problem.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, field_validator

from worker.core.lifecycle import JobConfig, Policy, Scope

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_LONGEST = 10 * 365 * 86400  # also rules out inf and nan, which compare false
_DURATIONS = '"90s", "15m", "2h", "1d"'
# What a job type is on the wire (schemas.messages.JobType): 1-200 characters, at most 200
# bytes as UTF-8, no whitespace or control character (the worker strips it at the ends).
_JOB_TYPE_CHARS = re.compile(r"[^\s\x00-\x1f\x7f]+")
_JOB_TYPE_MAX = 200


def _job_type_name(name: str) -> str:
    """`name`, a `[job_types.<name>]` table's, when a record can carry it as its job type;
    else why not (a table no job type would ever use)."""
    if not name:
        raise ValueError("never a job type: a job type is not empty")
    if _JOB_TYPE_CHARS.fullmatch(name) is None:
        raise ValueError("never a job type: a job type holds no whitespace or control character")
    if len(name) > _JOB_TYPE_MAX or len(name.encode("utf-8", "surrogatepass")) > _JOB_TYPE_MAX:
        raise ValueError(f"never a job type: a job type is at most {_JOB_TYPE_MAX} bytes as UTF-8")
    return name


_SHOWN = 80  # characters of a table's name a message shows
_JobTypeName = Annotated[str, AfterValidator(_job_type_name)]


class ConfigError(ValueError):
    """The TOML file is unreadable or invalid; the message names the line and the problem."""


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["reject", "queue", "replace"] | None = None
    scope: Literal["job_type", "job_type+client"] | None = None
    timeout: float | None = None

    @field_validator("timeout", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError(
                f"a duration is a number of seconds or like {_DURATIONS}, not true/false"
            )
        if isinstance(value, str):
            m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)
            if m is None:
                raise ValueError(f"a duration is a number of seconds or like {_DURATIONS}")
            return float(m.group(1)) * _UNITS[m.group(2) or "s"]
        return value

    @field_validator("timeout")
    @classmethod
    def _positive(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value <= _LONGEST:
            raise ValueError("the timeout must be positive and at most 10 years")
        return value


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    defaults: _Table = _Table()
    job_types: dict[_JobTypeName, _Table] = {}


def _merge(base: JobConfig, table: _Table) -> JobConfig:
    return JobConfig(
        policy=Policy(table.policy) if table.policy else base.policy,
        scope=Scope(table.scope) if table.scope else base.scope,
        timeout=timedelta(seconds=table.timeout) if table.timeout is not None else base.timeout,
    )


@dataclass(frozen=True)
class JobsConfig:
    """Resolved settings: `for_job(job_type)` answers for any job type."""

    defaults: JobConfig = field(default_factory=JobConfig)
    job_types: dict[str, JobConfig] = field(default_factory=dict)

    def for_job(self, job_type: str) -> JobConfig:
        """The settings of `job_type` (its own table, else `[defaults]`)."""
        return self.job_types.get(job_type, self.defaults)


def parse(text: str, source: str = "<config>") -> JobsConfig:
    """Parse TOML text; raise `ConfigError` with `source:line: problem` when invalid."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except RecursionError:
        # tomllib reads arrays and inline tables by recursion: a few hundred levels exhaust
        # Python's stack, long before any setting would care how deep a value is.
        raise ConfigError(f"{source}: arrays or inline tables nest too deeply") from None
    except ValueError as exc:
        # Not a TOMLDecodeError: an integer of more digits than Python converts to int.
        raise ConfigError(_long_integer(text, source) or f"{source}: {exc}") from None
    try:
        parsed = _File.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{source}:{_line_of(text, item['loc'])}: {_where(item['loc'])}: "
            f"{item['msg'].removeprefix('Value error, ')}"
            for item in exc.errors(include_url=False)
        ]
        raise ConfigError("\n".join(problems)) from None
    defaults = _merge(JobConfig(), parsed.defaults)
    return JobsConfig(
        defaults=defaults,
        job_types={name: _merge(defaults, table) for name, table in parsed.job_types.items()},
    )


def load(path: Path | None) -> JobsConfig:
    """Read the TOML file at `path` (no file: every job type uses the built-in defaults)."""
    if path is None:
        return JobsConfig()
    if path.exists() and not path.is_file():  # a FIFO would block the read, uninterruptibly
        raise ConfigError(f"the job-type settings {path} is not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the job-type settings {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse(text, str(path))


def _where(loc: tuple[Any, ...]) -> str:
    """The setting at `loc`, dotted; a job type's table that cannot be one as its header,
    the name quoted as TOML reads it (escapes for control characters)."""
    if len(loc) == 3 and loc[0] == "job_types" and loc[2] == "[key]":
        name = str(loc[1])
        shown = json.dumps(name[:_SHOWN], ensure_ascii=False)
        if len(name) > _SHOWN:
            shown = shown[:-1] + '..."'
        return f"[job_types.{shown}]"
    return ".".join(map(str, loc))


def _long_integer(text: str, source: str) -> str | None:
    """The error for an integer too long to convert, at its line; None if there is none."""
    limit = sys.get_int_max_str_digits()
    found = re.search(rf"[0-9][0-9_]{{{limit},}}", text)
    if found is None:
        return None
    line = text.count("\n", 0, found.start()) + 1
    return f"{source}:{line}: an integer has more than {limit} digits"


def _line_of(text: str, loc: tuple[Any, ...]) -> int:
    """Best-effort line number of the setting at `loc` (tomllib keeps no positions)."""
    lines = text.splitlines()
    if not loc:
        return 1
    if loc[0] == "defaults":
        header = r"\[\s*defaults\s*\]"
        key_index = 1
    elif loc[0] == "job_types" and len(loc) > 1:
        name = re.escape(str(loc[1]))
        escaped = re.escape(json.dumps(str(loc[1]), ensure_ascii=False))  # "\t", "\u0000"
        header = rf"""\[\s*job_types\s*\.\s*(?:(["']?){name}\1|{escaped})\s*\]"""
        key_index = 2
    else:
        header = rf"\[\s*{re.escape(str(loc[0]))}\b"
        key_index = 1
    start = next((i for i, line in enumerate(lines) if re.match(header, line.strip())), None)
    if start is None and loc[0] == "job_types" and len(loc) > 2:
        # `[job_types]` with dotted keys: `name.key = ...`
        name, key = re.escape(str(loc[1])), re.escape(str(loc[2]))
        dotted = rf"""(["']?){name}\1\s*\.\s*(["']?){key}\2\s*="""
        found = next((i for i, line in enumerate(lines) if re.match(dotted, line.strip())), None)
        return 1 if found is None else found + 1
    if start is None:
        return 1
    if len(loc) > key_index:
        key = re.escape(str(loc[key_index]))
        for i in range(start + 1, len(lines)):
            stripped = lines[i].strip()
            if stripped.startswith("["):
                break
            if re.match(rf'("?){key}\1\s*=', stripped):
                return i + 1
    return start + 1
