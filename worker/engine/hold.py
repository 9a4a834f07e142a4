"""Records of one input waiting for the other input of their partition to catch up.

aiokafka fills a batch from one partition's buffer before another's, so a fetch can bring a
backlog of requests while the results input, with a result stamped earlier, is still unread.
Deciding the requests first would decide in an order the broker times contradict (a late
start timing out a run whose result was on time). A record therefore waits while the other
input has unread records and has not been fetched up to its broker time; a request ties
with an equal result and goes first, as `merge_inputs` orders them. Waiting records are not
decided, so their offsets are not committed: a new owner reads them again. The wait is
bounded (`Rules.hold`); past it, they are decided with a warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import structlog

from worker.core.lifecycle import merge_inputs
from worker.engine.codec import InputRecord

log = structlog.get_logger("worker")


class InputHold:
    """One partition's held records and how far each input has been fetched."""

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.records: list[InputRecord] = []  # held, in decision order
        self.since: datetime | None = None  # when the oldest wait began
        self.fetched: dict[str, datetime] = {}  # input role -> latest broker time fetched

    def ready(
        self,
        records: Sequence[InputRecord],
        lagging: frozenset[str],
        now: datetime,
        limit: timedelta,
        queued: Sequence[InputRecord] = (),
    ) -> list[InputRecord]:
        """The held and new records that can be decided now, in decision order; the rest
        stay held. `lagging`: the inputs with records not yet fetched; `queued`: records
        fetched for a later batch; `limit`: the longest wait (zero: no wait)."""
        for record in records:
            self._fetched(record)
        first: dict[str, datetime] = {}  # the earliest broker time queued, by input
        for record in queued:
            self._fetched(record)
            earliest = first.get(record.role)
            if earliest is None or record.at < earliest:
                first[record.role] = record.at
        pending = merge_inputs([*self.records, *records]) if self.records else list(records)
        cut = len(pending)
        if (lagging or first) and limit > timedelta(0):
            cut = next((i for i, r in enumerate(pending) if self._waits(r, lagging, first)), cut)
        if cut == len(pending):
            self.drop()
            return pending
        if self.since is None:
            self.since = now
        elif now - self.since > limit:
            log.warning(
                "records waited too long for the other input to catch up; going on",
                partition=self.partition,
                lagging=sorted(lagging),
                held=len(pending) - cut,
                held_seconds=round((now - self.since).total_seconds(), 1),
            )
            self.drop()
            return pending
        self.records = pending[cut:]
        return pending[:cut]

    def _fetched(self, record: InputRecord) -> None:
        at = record.at  # a property: asked once
        seen = self.fetched.get(record.role)
        if seen is None or at > seen:
            self.fetched[record.role] = at

    def _waits(
        self, record: InputRecord, lagging: frozenset[str], first: dict[str, datetime]
    ) -> bool:
        other = "results" if record.role == "requests" else "requests"
        queued = first.get(other)  # the other input's earliest record in a later batch
        if queued is not None and _first(queued, record):
            return True
        if other not in lagging:
            return False
        shown = self.fetched.get(other)
        return shown is None or _first(shown, record)

    def drop(self) -> None:
        """Forget the held records (decided now, or to be fetched again)."""
        self.records, self.since = [], None

    def too_long(self, now: datetime, limit: timedelta) -> bool:
        """Whether held records have waited out `limit` (a tick then decides them)."""
        return self.since is not None and now - self.since > limit


def _first(other: datetime, record: InputRecord) -> bool:
    """Whether a record of the other input stamped `other` is decided before `record` (a
    request ties with an equal result and goes first)."""
    return other < record.at if record.role == "requests" else other <= record.at
