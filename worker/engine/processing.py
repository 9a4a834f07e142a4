"""One batch of one partition, from records to committed outcome, and what a failure does.

A batch: load the idle job states its records name, let the partition's task decide, have
the record collector publish the outcome with its input offsets, then queue it for SQLite.

A failed batch is retried from what Kafka committed, after a backoff. A failure the broker
causes is only retried. A failure tied to what the batch holds (a record the broker refuses,
an error while deciding) switches the partition to one record per batch until the failed
batch is behind it, so the others go through; a record that fails alone `RECORD_ATTEMPTS`
times is dead-lettered `unprocessable`, in a transaction with its offset, exactly once.
After `MAX_FAILURES` failed attempts in a row the worker stops.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import structlog
from aiokafka.errors import (
    CorruptRecordException,
    InvalidMessageError,
    InvalidProducerEpoch,
    InvalidTimestampError,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFenced,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnsupportedForMessageFormatError,
)

from worker.engine.codec import InputRecord
from worker.engine.collector import FencedError, RecordCollector
from worker.engine.hooks import Hooks
from worker.engine.observe import Metrics
from worker.engine.partitions import BACKOFF_FIRST_S, BACKOFF_MAX_S, Owned, PartitionManager
from worker.engine.state import StateManager
from worker.engine.task import BatchOutcome, UnreadableState

log = structlog.get_logger("worker")

# Kafka errors caused by what a batch holds, not by the broker's health: retrying the batch
# as it is cannot succeed.
_RECORD_ERRORS = (
    CorruptRecordException,
    InvalidMessageError,
    InvalidTimestampError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnsupportedForMessageFormatError,
)
RECORD_ATTEMPTS = 3  # a record that fails alone this often is dead-lettered `unprocessable`
# Failed attempts in a row after which the worker stops (about five minutes of backoff): a
# fault that outlasts them needs a restart or a person, and a supervisor sees the exit.
MAX_FAILURES = 35
_ERROR_CHARS = 500  # of an error's text, in a dead letter's reason


def tied_to_input(exc: BaseException) -> bool:
    """Whether a failed batch may have failed because of one of its input records.

    Kafka's own failures (connections, timeouts, coordinators) are the broker's; retrying
    them later succeeds. SQLite's are the machine's. Anything else came from deciding or
    serializing what the records hold.
    """
    if isinstance(exc, KafkaError):
        return isinstance(exc, _RECORD_ERRORS)
    return not isinstance(exc, sqlite3.Error | OSError)


@dataclass
class Trouble:
    """A partition whose batches fail: retried with backoff, then one record at a time."""

    failures: int = 0  # consecutive failed attempts, for the backoff
    until: dict[str, int] = field(default_factory=dict)  # empty: not isolating
    record: tuple[str, int] | None = None  # the record last tried alone
    record_failures: int = 0  # how often it failed alone
    error: str = ""  # the last failure

    def backoff(self) -> float:
        """Seconds to wait before the next attempt."""
        return float(min(BACKOFF_FIRST_S * 2 ** (self.failures - 1), BACKOFF_MAX_S))

    def given_up(self, record: InputRecord) -> bool:
        """Whether `record` failed alone often enough to be dead-lettered."""
        return (
            self.record == (record.topic, record.offset) and self.record_failures >= RECORD_ATTEMPTS
        )

    def failed_alone(self, record: InputRecord) -> None:
        """Count a failure of `record` tried alone."""
        if self.record == (record.topic, record.offset):
            self.record_failures += 1
        else:
            self.record, self.record_failures = (record.topic, record.offset), 1

    def passed(self, applied: dict[str, int]) -> bool:
        """Whether every record of the failed batch has been applied or dead-lettered."""
        return all(applied.get(topic, 0) >= offset for topic, offset in self.until.items())


class BatchRunner:
    """Runs the batches of every owned partition; keeps each partition's trouble."""

    def __init__(
        self,
        partitions: PartitionManager,
        collector: RecordCollector,
        state: StateManager,
        hooks: Hooks,
        stop: Callable[[BaseException], None],
        metrics: Metrics,
    ) -> None:
        self._partitions = partitions
        self._collector = collector
        self._state = state
        self._hooks = hooks
        self._stop = stop
        self._metrics = metrics
        self._trouble: dict[int, Trouble] = {}
        self._mended: set[int] = set()  # partitions restored for a damaged stored state

    def isolating(self, number: int) -> bool:
        """Whether partition `number` takes one record per batch (after a failed batch)."""
        trouble = self._trouble.get(number)
        return trouble is not None and bool(trouble.until)

    async def run(
        self, owned: Owned, records: list[InputRecord], wall_clock: datetime | None = None
    ) -> None:
        """Run one batch of `owned` (records in decision order; none for a tick)."""
        number = owned.task.number
        started = time.perf_counter()
        trouble = self._trouble.get(number)
        alone = trouble is not None and bool(trouble.until) and len(records) == 1
        try:
            outcome = await self._publish(owned, records, wall_clock, trouble, alone)
            self._metrics.committed(outcome, time.perf_counter() - started)
        except (ProducerFenced, InvalidProducerEpoch, FencedError) as exc:
            self._partitions.fence(owned, exc)
        except Exception as exc:
            self._metrics.failed()
            try:
                await self._failed(owned, records, exc, alone)
            except Exception as failure:
                # Retrying could not take the partition again (its producer is closed by
                # then): nothing is left to serve it, so the one failure rule applies now,
                # not when a later record happens to reach the dead partition.
                log.exception("retrying a failed batch failed; stopping", partition=number)
                self._stop(failure)
        else:
            if trouble is not None:
                self._recovered(owned, trouble, alone)

    async def _publish(
        self,
        owned: Owned,
        records: list[InputRecord],
        wall_clock: datetime | None,
        trouble: Trouble | None,
        alone: bool,
    ) -> BatchOutcome:
        """Decide the batch and commit its outcome. The collector knows the batch is on its
        way from when the intake starts it until it hands its outcome in, or fails (not
        through the backoff of a retry): worker-wide transactions wait for it."""
        number = owned.task.number
        try:
            if trouble is not None and alone and trouble.given_up(records[0]):
                outcome = self._unprocessable(owned, records[0], trouble)
            else:
                outcome = await self._decide(owned, records, wall_clock, wait=not alone)
            await self._commit(owned, outcome, len(records))
        finally:
            self._collector.end(number)
        return outcome

    async def _decide(
        self,
        owned: Owned,
        records: list[InputRecord],
        wall_clock: datetime | None,
        *,
        wait: bool = True,
    ) -> BatchOutcome:
        task = owned.task
        wanted = task.wanted_states([*task.held, *records])  # held records may be decided now
        task.add_states(await self._state.states(wanted))
        lagging = await self._partitions.lagging(task.number)
        self._hooks.point("batch")
        outcome = task.apply(records, wall_clock, lagging, wait=wait, queued=owned.queued)
        task.evict_idle([*wanted, *outcome.changed])
        return outcome

    async def _commit(self, owned: Owned, outcome: BatchOutcome, records: int) -> None:
        if outcome.empty:
            return
        number = owned.task.number
        self._state.check()  # a failed SQLite write: commit nothing more to Kafka
        began = time.perf_counter()
        try:
            position = await self._collector.commit(number, outcome, owned.task.applied)
        except BaseException:
            self._metrics.publish_failed()
            raise
        self._metrics.published(time.perf_counter() - began)
        if outcome.settings_row is not None:
            owned.task.settings_logged = True
        if outcome.view_mark is not None:
            owned.task.view.committed(outcome.view_mark)
        self._hooks.point("after_commit")
        # Written behind: the partition goes on while SQLite catches up (a crash before the
        # write is the restore-from-changelog case); taking a partition flushes first.
        await self._state.record(number, outcome, position)
        log.debug(
            "batch committed",
            partition=number,
            records=records,
            events=len(outcome.events),
            dead_letters=len(outcome.dead_letters),
            offsets=outcome.next_offsets,
        )

    async def _failed(
        self, owned: Owned, records: list[InputRecord], exc: Exception, alone: bool
    ) -> None:
        """Retry after a backoff from what Kafka committed; isolate records at fault."""
        number = owned.task.number
        self._partitions.pause(number)  # read again from the committed offsets after the reset
        if isinstance(exc, UnreadableState) and number not in self._mended:
            # The file's damage, not the records': restore the partition and decide again.
            # Once per partition: damage the restore does not mend fails as any batch does.
            self._mended.add(number)
            log.warning(
                "a job state in the SQLite file is damaged: restoring its partition from "
                "the changelog",
                partition=number,
                job_type=exc.job_type,
                error=exc.error,
            )
            self._state.restore_next(number)
            await self._partitions.reset(owned)
            return
        tied = tied_to_input(exc)
        if not tied and not isinstance(exc, KafkaError):
            log.exception("batch failed unexpectedly; stopping", partition=number)
            self._stop(exc)
            return
        trouble = self._trouble.setdefault(number, Trouble())
        trouble.failures += 1
        trouble.error = f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]
        if trouble.failures > MAX_FAILURES:
            log.error(
                "batches keep failing; stopping",
                partition=number,
                attempts=trouble.failures,
                error=trouble.error,
            )
            self._stop(exc)
            return
        if tied and records:
            if alone:
                trouble.failed_alone(records[0])
            elif not trouble.until:
                for record in records:
                    end = trouble.until.get(record.topic, 0)
                    trouble.until[record.topic] = max(end, record.offset + 1)
        backoff = trouble.backoff()
        log.warning(
            "batch failed; retrying from the committed offsets",
            partition=number,
            error=trouble.error,
            attempt=trouble.failures,
            backoff_s=backoff,
            one_record_at_a_time=bool(trouble.until),
        )
        await self._partitions.back_off(backoff)
        await self._partitions.reset(owned)

    def _recovered(self, owned: Owned, trouble: Trouble, alone: bool) -> None:
        """A batch of a troubled partition committed: go on, or back to whole batches."""
        trouble.failures = 0
        if alone:
            # Records fetched after this one were not applied: read them again.
            self._partitions.reposition(owned)
        if trouble.passed(owned.task.applied):
            del self._trouble[owned.task.number]
            log.info("partition back to whole batches", partition=owned.task.number)

    def _unprocessable(self, owned: Owned, record: InputRecord, trouble: Trouble) -> BatchOutcome:
        """Dead-letter a record that failed alone `RECORD_ATTEMPTS` times, and move on.

        When even that dead letter failed, the next one copies nothing of the record.
        """
        message = (
            f"processing failed {trouble.record_failures} times with this record alone; "
            f"last error: {trouble.error}"
        )
        log.error(
            "dead-lettered after repeated failures",
            code="unprocessable",
            error=trouble.error,
            partition=record.partition,
            offset=record.offset,
            topic=record.topic,
        )
        copy = trouble.record_failures <= RECORD_ATTEMPTS
        return owned.task.unprocessable(record, message, copy=copy)
