"""structlog set-up: JSON lines when not on a terminal, console rendering on one.

Messages of libraries that log through the standard library (aiokafka) go through the same
renderer, so a worker's output is one format. aiokafka repeats itself while a broker is
away (a line per retry, ~90 a second in an outage): a repeated message is shown once per
`REPEAT_WINDOW_S`, with how many were left out; a coordinator still being elected when a
worker starts on a new cluster is retried by aiokafka and not an error for the reader.

The worker's own warnings are limited the same way (`Repeats`): a producer that sends bad
records by the thousand makes a dead letter each, but not a log line each. The first
`REPEAT_BURST` of a kind (its event and reason code) in a window are shown; the next one
shown says how many were left out (`left_out`). The dead letters themselves, with their
reasons, are on the dead-letter topic, and the periodic `decided` line counts them by code.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable
from typing import Literal, TextIO

import structlog

REPEAT_WINDOW_S = 10.0
REPEAT_BURST = 5  # lines of one kind of the worker's own warnings shown in a window
_EXPECTED_AT_START = ("GroupCoordinatorNotAvailableError",)


class LibraryNoise(logging.Filter):
    """Shows a library's repeated message once per window (then says how many were left
    out), and lets a coordinator election pass as a debug matter."""

    def __init__(
        self, window: float = REPEAT_WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.window = window
        self.clock = clock
        self._seen: dict[tuple[str, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("aiokafka"):
            return True
        if any(word in record.getMessage() for word in _EXPECTED_AT_START):
            return record.levelno >= logging.CRITICAL or logging.root.level <= logging.DEBUG
        key = (record.name, record.msg)
        now = self.clock()
        shown_at, left_out = self._seen.get(key, (float("-inf"), 0))
        if now - shown_at < self.window:
            self._seen[key] = (shown_at, left_out + 1)
            return False
        self._seen[key] = (now, 0)
        if left_out:
            record.msg = f"{record.msg} (and {left_out} more like it in {self.window:.0f} s)"
        return True


class Repeats:
    """A structlog processor: the worker's warnings of one kind (event and `code`), at most
    `burst` lines per window; the first shown after some were left out counts them."""

    def __init__(
        self,
        window: float = REPEAT_WINDOW_S,
        burst: int = REPEAT_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.burst = burst
        self.clock = clock
        # kind -> (window start, lines shown in it, lines left out since the last shown)
        self._seen: dict[tuple[object, object], tuple[float, int, int]] = {}

    def __call__(
        self, logger: object, method: str, event_dict: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        if method != "warning":
            return event_dict
        key = (event_dict.get("event"), event_dict.get("code"))
        now = self.clock()
        start, shown, left_out = self._seen.get(key, (float("-inf"), 0, 0))
        if now - start >= self.window:
            start, shown = now, 0
        if shown >= self.burst:
            self._seen[key] = (start, shown, left_out + 1)
            raise structlog.DropEvent
        self._seen[key] = (start, shown + 1, 0)
        if left_out:
            event_dict["left_out"] = left_out
        return event_dict


_json_lines = False  # whether `configure` made a service's log JSON lines


def json_lines() -> bool:
    """Whether a service's log is JSON lines (`configure`): its last word, a failure, then
    goes there as one more line, not as plain text among them."""
    return _json_lines


class _Lines(structlog.PrintLogger):
    """structlog's printer, except that a line that cannot be written (its reader gone: a
    broken pipe, a closed stream) is dropped. No log line is worth a stop that stops half-way:
    an error raised by the line that says "stopping" would skip closing SQLite, whose thread
    then keeps the process alive for good."""

    def msg(self, message: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().msg(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def configure(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
    library_level: str = "warning",
    quiet_kafka: bool = False,
    service: bool = False,
) -> None:
    """Configure structlog and route the standard library's logging through it. A
    `service` (`jobctl run`, `serve`) logging JSON lines says its last word there too
    (`json_lines`)."""
    global _json_lines
    out = stream if stream is not None else sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    _json_lines = service and not use_console
    # A traceback in the console shows no frame's locals (rich's default shows them): a
    # connection's frames hold the SASL password. Every record's exc_info is rendered by
    # `format_exc_info` before the renderer; the plain formatter is the console's fallback.
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        if use_console
        else structlog.processors.JSONRenderer()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            *shared,
            Repeats(),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: _Lines(file=out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            # A library's exc_info rendered as ours is (`format_exc_info`): a traceback in
            # `exception`, not the repr of the tuple that JSON would otherwise print.
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    if quiet_kafka:
        # A command reports what went wrong in one line of its own; aiokafka's records still
        # reach their loggers (`compat.connect_failure` reads the cause from them).
        handler.addFilter(lambda record: not record.name.startswith("aiokafka"))
    handler.addFilter(LibraryNoise())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.getLevelNamesMapping()[library_level.upper()])
