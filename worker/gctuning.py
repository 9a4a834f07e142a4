"""Garbage-collector thresholds for the worker's long batch loops.

Deciding, replaying and restoring allocate a few dozen short-lived objects per record while
a large state stays alive. At CPython's default first threshold (700 allocations) young
collections ran every few records and, with the state growing, cost a fifth to a quarter of
the time (`jobctl bench`). Almost all of that garbage is freed by reference counting anyway.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator

import structlog

log = structlog.get_logger("worker")

THRESHOLDS = (10_000, 10, 10)


def tune() -> None:
    """For the rest of the process (the worker's `jobctl run`): `THRESHOLDS`, and what is
    alive after start-up (modules, classes) frozen out of every later collection."""
    gc.set_threshold(*THRESHOLDS)
    gc.freeze()


def collect() -> float:
    """A full collection; returns the seconds it took.

    The worker runs one per tick: aiokafka's delivered record batches (up to
    `producer_batch_bytes` each) and fetch responses end up in reference cycles, which only
    a full collection frees; with the thresholds above those come rarely, and the peak RSS
    of a 100,000-run bench was 30-40 MB higher without this.
    """
    started = time.perf_counter()
    gc.collect()
    return time.perf_counter() - started


def collect_and_log() -> None:
    """`collect`, its pause logged at debug level (the worker's tick hook)."""
    pause = collect()
    log.debug("garbage collected", ms=round(pause * 1000, 1))


@contextlib.contextmanager
def tuned() -> Iterator[None]:
    """Use `THRESHOLDS` inside the block (a replay), then put the previous ones back."""
    previous = gc.get_threshold()
    gc.set_threshold(*THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*previous)
