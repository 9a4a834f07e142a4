"""Garbage-collector thresholds for the worker's long batch loops.

Deciding, replaying and restoring allocate a few dozen short-lived objects per record while
a large state stays alive. At CPython's default first threshold (700 allocations) young
collections ran every few records and, with the state growing, cost a fifth to a quarter of
the time (`jobctl bench`). Almost all of that garbage is freed by reference counting anyway.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

THRESHOLDS = (10_000, 10, 10)


def tune() -> None:
    """Use `THRESHOLDS` for the rest of the process (the worker's `jobctl run`)."""
    gc.set_threshold(*THRESHOLDS)


@contextlib.contextmanager
def tuned() -> Iterator[None]:
    """Use `THRESHOLDS` inside the block (a replay, a restore), then restore the previous."""
    previous = gc.get_threshold()
    gc.set_threshold(*THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*previous)
