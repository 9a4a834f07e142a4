"""What an input record may be before the worker dead-letters it (settings `JOBS_MAX_*`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InputLimits:
    """Bounds on an input record; beyond them it is dead-lettered (settings `JOBS_MAX_*`)."""

    record_bytes: int = 1_048_576  # the whole value
    nesting_depth: int = 32  # arrays and objects inside one another, the message itself is 1
    data_bytes: int = 65_536  # `initial_data`, `final_metrics` or `metrics`, as JSON
