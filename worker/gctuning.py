"""Garbage-collector settings for the worker's long batch loops.

Deciding, replaying and restoring allocate a few dozen short-lived objects per record while
a large state stays alive. At CPython's default first threshold (700 allocations) young
collections ran every few records and, with the state growing, cost a fifth to a quarter of
the time (`jobctl bench`). Almost all of that garbage is freed by reference counting anyway,
so a young collection finds about the same few live objects (a batch's) whatever the
threshold, and a higher one only makes them rarer: 50,000 instead of 10,000 took 1.5-2.5 µs
(4%) off a transition in the in-process harness, 100,000 another 1.

The worker (`tune`, `collecting`) collects the young generations on a timer of its own and
leaves the automatic collections as a backstop (`WORKER_THRESHOLDS`). In a backlog each batch
leaves objects alive past a young collection (the busy job types' states, outcomes waiting
for their commit), 16 a transition in one round. An automatic young collection every 50,000
of them walked each once and moved it on, and the next middle or timed collection walked it
again: 258-387 ms of the worker's 3.4-4.2 s of CPU in a backlog round, against 200-225 ms
with the timed collections alone (`gc.callbacks`, three rounds each; docs/performance.md,
"Collections on a timer").

A timed collection walks every object alive that was made since the last one, so it costs
what a backlog keeps alive, whether or not it finds garbage; and the worker's own work makes
none (every young collection in backlog rounds and at 1,000 starts/s freed nothing:
docs/performance.md, "Young collections that free nothing"). So the timer follows what the
collections find: the next one comes `EVERY_S` after a collection that freed something, and
`QUIET_EVERY_S` after one that freed nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Iterator

import structlog

log = structlog.get_logger("worker")

THRESHOLDS = (50_000, 10, 10)  # a loop that collects nothing itself (`tuned`: a replay)
# The worker's: `collecting` does the work; an automatic collection comes only when a
# million more objects have been made than have died since the last collection (a backlog
# round of `jobctl bench`'s, every start before its result, leaves about 16 a transition
# alive: 640,000 in a round of 20,000 lifecycles).
WORKER_THRESHOLDS = (1_000_000, 10, 10)


def tune() -> None:
    """For the rest of the process (the worker's `jobctl run`, which runs `collecting`):
    `WORKER_THRESHOLDS`, and what is alive after start-up (modules, classes) frozen out of
    every later collection."""
    gc.set_threshold(*WORKER_THRESHOLDS)
    gc.freeze()


FULL_EVERY_S = 60.0  # a full collection at most this often
EVERY_S = 0.5  # after a collection that freed something (and before the first)
QUIET_EVERY_S = 10.0  # after one that freed nothing


def collect(full: bool = True) -> tuple[float, int]:
    """A full collection, or one of the two young generations; returns the seconds it took
    and how many unreachable objects it found.

    Garbage in reference cycles is freed only by a collection, and with the thresholds above
    those come rarely. When aiokafka's delivered record batches and fetch responses ended up
    in cycles, the peak RSS of a 100,000-run bench was 30-40 MB higher without a young
    collection every tick of the poll loop (a second); a full collection every tick also
    walked the whole live state, a fifth of the worker's time under load (py-spy), for the
    same peak RSS. Garbage is young when it becomes garbage, so the young generations free
    it; `Collector` collects them often again as soon as they find any.
    """
    started = time.perf_counter()
    found = gc.collect(2 if full else 1)
    return time.perf_counter() - started, found


class Collector:
    """A young collection each call, a full one every `FULL_EVERY_S`; each pause logged at
    debug level. Each call returns the seconds to wait before the next: `every_s` when the
    collection freed something, `quiet_every_s` when it freed nothing."""

    def __init__(self, every_s: float = EVERY_S, quiet_every_s: float = QUIET_EVERY_S) -> None:
        self._next_full = 0.0
        self._every_s = every_s
        self._quiet_every_s = quiet_every_s
        self.wait_s = every_s

    def __call__(self) -> float:
        full = time.monotonic() >= self._next_full
        if full:
            self._next_full = time.monotonic() + FULL_EVERY_S
        pause, found = collect(full)
        self.wait_s = self._every_s if found else self._quiet_every_s
        log.debug(
            "garbage collected",
            ms=round(pause * 1000, 1),
            full=full,
            found=found,
            next_s=self.wait_s,
        )
        return self.wait_s


async def collecting(every_s: float = EVERY_S, quiet_every_s: float = QUIET_EVERY_S) -> None:
    """Collect with a `Collector` until cancelled, waiting as it says: `jobctl run`'s task. A
    timer of its own, not the poll loop's tick, so that it goes on while the loop waits
    (aiokafka holds `getmany` while a partition is restored in the rebalance, which reads
    the changelog with a consumer of its own)."""
    collector = Collector(every_s, quiet_every_s)
    while True:
        await asyncio.sleep(collector.wait_s)
        collector()


@contextlib.contextmanager
def tuned() -> Iterator[None]:
    """Use `THRESHOLDS` inside the block (a replay), then put the previous ones back."""
    previous = gc.get_threshold()
    gc.set_threshold(*THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*previous)
