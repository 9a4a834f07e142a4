"""Run IDs: made from the request record's broker time and coordinates, never from a clock.

Format ``YYMMDD-HHMMSS-<partition>.<offset>`` (UTC), plus ``-<client_id>`` for client-scoped runs.
The partition and offset make two starts in the same second distinct, which the seed's
``YYMMDD-HHMMSS`` IDs were not. Run IDs are lower case; ``normalize_run_id`` fixes case and
surrounding whitespace and rejects anything else. A seed-style ID (``YYMMDD-HHMMSS[-client]``)
is recognised so it can be resolved against known runs.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

RUN_ID_RE = re.compile(r"^(\d{6})-(\d{6})-(\d+)\.(\d+)(?:-(.+))?$")
SEED_RUN_ID_RE = re.compile(r"^(\d{6})-(\d{6})(?:-(.+))?$")


class InvalidRunId(ValueError):
    """A run ID that is neither of the orchestrator's format nor of the seed's."""


@dataclass(frozen=True, slots=True)
class SeedRunId:
    """A seed-style run ID: its time stamp and optional client suffix, without coordinates."""

    stamp: str
    client: str | None

    def second(self) -> datetime:
        """The second (UTC) its time stamp names."""
        return datetime.strptime(self.stamp, "%y%m%d-%H%M%S").replace(tzinfo=UTC)

    def matches(self, run_id: str, client_id: str | None = None) -> bool:
        """Whether a full run ID has this time stamp and client: its suffix or, for a run ID
        without one (runs scoped by job type only), the run's `client_id`, any case."""
        m = RUN_ID_RE.match(run_id)
        if m is None or f"{m.group(1)}-{m.group(2)}" != self.stamp:
            return False
        if m.group(5) is not None or self.client is None:
            return m.group(5) == self.client
        return client_id is not None and client_id.lower() == self.client


# Called through its descriptor: compiled, `at.timestamp()` looks the method up at each call.
_TIMESTAMP: Final = datetime.timestamp


@functools.lru_cache(maxsize=64)
def _stamp(second: int) -> str:
    """``YYMMDD-HHMMSS`` (UTC) of a Unix time in seconds: the requests of a batch share a
    few seconds, so each stamp is formatted once, not once per start."""
    t = datetime.fromtimestamp(second, UTC)
    return f"{t.year % 100:02d}{t.month:02d}{t.day:02d}-{t.hour:02d}{t.minute:02d}{t.second:02d}"


def make_run_id(at: datetime, partition: int, offset: int, client_id: str | None = None) -> str:
    """The run ID of a request recorded at broker time `at` on `partition` at `offset`."""
    run_id = f"{_stamp(math.floor(_TIMESTAMP(at)))}-{partition}.{offset}"
    if client_id is not None:
        run_id += f"-{client_id.strip().lower()}"
    return run_id


def _check_stamp(date: str, time: str, raw: str) -> None:
    try:
        datetime.strptime(date + time, "%y%m%d%H%M%S")
    except ValueError:
        raise InvalidRunId(f"run ID {raw!r} has an impossible date or time") from None


def normalize_run_id(raw: str) -> str | SeedRunId:
    """Return the canonical run ID, or a `SeedRunId` to resolve; raise `InvalidRunId` otherwise."""
    text = raw.strip().lower()
    m = RUN_ID_RE.match(text)
    if m is not None:
        _check_stamp(m.group(1), m.group(2), raw)
        partition, offset = int(m.group(3)), int(m.group(4))
        text = f"{m.group(1)}-{m.group(2)}-{partition}.{offset}"
        return text + (f"-{m.group(5)}" if m.group(5) else "")
    m = SEED_RUN_ID_RE.match(text)
    if m is not None:
        _check_stamp(m.group(1), m.group(2), raw)
        return SeedRunId(stamp=f"{m.group(1)}-{m.group(2)}", client=m.group(3))
    raise InvalidRunId(
        f"run ID {raw!r} is not of the form YYMMDD-HHMMSS-<partition>.<offset>[-<client_id>]"
    )
