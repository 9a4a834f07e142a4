"""The last resort for a stop that never ends: exit the process hard once it is overdue.

The worker bounds its own stop (`Settings.shutdown_timeout_s`), but only while its event loop
runs: a loop blocked in a call that never returns, or a thread that never ends and so keeps
the interpreter from exiting (an SQLite connection's), outlasts any timeout inside it.
`jobctl run` arms a `StopWatchdog` when the worker begins to stop (`Hooks.on_stop`): a daemon
thread that, `GRACE_S` past that bound, logs one line and ends the process with `EXIT_CODE`.

Nothing is lost by it: what the worker had not committed to Kafka its partitions' next owner
reads again, and SQLite holds a prefix of what was committed, as after any crash.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable

import structlog

log = structlog.get_logger("worker")

GRACE_S = 5.0  # past the worker's own bound, for its timeout to log and return first
EXIT_CODE = 1


class StopWatchdog:
    """Ends the process `grace` seconds after the bound it is armed with, unless it has
    ended by then (`exit`: `os._exit`, which runs no clean-up that could hang in turn)."""

    def __init__(self, grace: float = GRACE_S, exit: Callable[[int], object] = os._exit) -> None:
        self._grace = grace
        self._exit = exit
        self._timer: threading.Timer | None = None

    def arm(self, bound: float) -> None:
        """Start counting (once: a second call keeps the first deadline)."""
        if self._timer is not None:
            return
        seconds = bound + self._grace
        self._timer = threading.Timer(seconds, self._fire, args=(seconds,))
        self._timer.daemon = True  # it never keeps the process alive itself
        self._timer.start()

    def _fire(self, seconds: float) -> None:
        with contextlib.suppress(Exception):  # nothing may keep the exit from happening
            log.error(
                "the worker has not exited since it began to stop; exiting hard",
                seconds=round(seconds, 1),
                exit_code=EXIT_CODE,
            )
        for stream in (sys.stdout, sys.stderr):
            # A closed or broken stream: the exit matters more than the line.
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        self._exit(EXIT_CODE)
