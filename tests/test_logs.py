"""The log set-up: one format, and a library's repeated lines kept readable."""

from __future__ import annotations

import logging

from worker.logs import LibraryNoise


def _record(name: str, msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_a_repeated_library_line_is_shown_once_per_window_with_a_count() -> None:
    """An outage's hundred identical aiokafka lines become one, then one saying how many
    were left out; our own lines are never held back."""
    now = [0.0]
    noise = LibraryNoise(window=10, clock=lambda: now[0])
    template = 'Unable connect to "%s:%s": %s'
    shown = [noise.filter(_record("aiokafka", template, "h", 1, "refused")) for _ in range(100)]
    assert shown.count(True) == 1
    now[0] = 10.5
    later = _record("aiokafka", template, "h", 1, "refused")
    assert noise.filter(later)
    assert later.getMessage().endswith("(and 99 more like it in 10 s)")
    assert all(noise.filter(_record("worker", "batch failed")) for _ in range(5))


def test_a_coordinator_being_elected_is_not_an_error_line() -> None:
    """aiokafka retries GroupCoordinatorNotAvailableError at start; it is not shown."""
    noise = LibraryNoise()
    line = "Group Coordinator Request failed: [Error 15] GroupCoordinatorNotAvailableError"
    assert not noise.filter(_record("aiokafka.consumer.group_coordinator", line))
