"""structlog set-up: JSON lines when not on a terminal, console rendering on one.

Messages of libraries that log through the standard library (aiokafka) go through the same
renderer, so a worker's output is one format.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog


def configure(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
    library_level: str = "warning",
    quiet_kafka: bool = False,
) -> None:
    """Configure structlog and route the standard library's logging through it."""
    out = stream if stream is not None else sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
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
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    if quiet_kafka:
        # A command reports what went wrong in one line of its own; aiokafka's records still
        # reach their loggers (`compat.connect_failure` reads the cause from them).
        handler.addFilter(lambda record: not record.name.startswith("aiokafka"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.getLevelNamesMapping()[library_level.upper()])
