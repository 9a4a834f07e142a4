"""The worker loop: consume requests and results, decide in the core, publish, record.

One consumer in the group `<prefix>.orchestrator` reads `<prefix>.requests` and
`<prefix>.results`; the range assignor keeps partition N of both topics on one member, so the
owner of N serializes every transition of N's job types. Partitions are processed
concurrently, each by one batch at a time (N is paused while its batch is in flight):

1. decode and validate each record (bad input becomes a dead letter, and a `rejected` event
   where the sender can be identified);
2. feed the commands to the core in broker-time order;
3. in ONE transaction of N's producer (transactional ID `<group>.<N>`): the status events,
   changelog rows and dead letters, all to partition N, and the input offsets of requests N
   and results N (`send_offsets_to_transaction`); commit;
4. then queue runs, job states and applied offsets for SQLite. N is resumed at once; a
   writer task merges the queued batches of all partitions into one SQLite transaction at a
   time, so the file always holds a prefix of what Kafka committed (a crash before the
   write is the restore case below).

On assignment of N, in this order: start N's producer (which fences the previous owner and
waits out its open transaction), read the group's committed offsets for N and seek to them,
and restore N from `<prefix>.state` when SQLite's applied offsets differ. On revocation the
batch in flight finishes (commits or aborts) and N's producer is closed.

With `processing_guarantee = "at_least_once"` step 3 uses one idempotent producer without a
transaction, and the offsets are committed once its records are acknowledged: a crash in
between republishes.
Any failure of a batch resets the partition to what Kafka committed (the in-memory state is
rebuilt), so a failed attempt leaves no trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import os
import signal
import sqlite3
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import (
    CommitFailedError,
    CorruptRecordException,
    IllegalStateError,
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
from aiokafka.producer.transaction_manager import TransactionState
from rbloom import Bloom

from schemas import DeadLetter, EventType, StatusEvent
from worker import gctuning
from worker.core.config import JobsConfig
from worker.core.config import load as load_config
from worker.core.lifecycle import AdvanceTime, Command, JobState, decide, dump_state, load_state
from worker.engine import changelog
from worker.engine import compat as kafkarecords
from worker.engine import topics as topic_admin
from worker.engine.codec import (
    REROUTED_FROM,
    Bad,
    InputRecord,
    Reroute,
    TopicRole,
    dead_letter,
    dead_letter_key,
    decode,
)
from worker.engine.kafkaio import Outbox
from worker.engine.store import RunRow, Store, run_change, started_row
from worker.settings import Settings

log = structlog.get_logger("worker")


class FencedError(RuntimeError):
    """Another worker owns the partition now; this one must stop writing to it."""


class InjectedFault(RuntimeError):
    """Testing only: a record marked to fail (`JOBS_FAULT_RECORD`)."""


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
_BACKOFF_FIRST_S = 0.2
_BACKOFF_MAX_S = 10.0
_ERROR_CHARS = 500  # of an error's text, in a dead letter's reason
# Failed attempts in a row after which the worker stops (about five minutes of backoff): a
# fault that outlasts them needs a restart or a person, and a supervisor sees the exit.
_MAX_FAILURES = 35
_TAKE_ATTEMPTS = 5


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
    """A partition whose batches fail: retried with backoff, then one record at a time.

    After a batch fails for a reason tied to its input, the records it held (up to `until`,
    the next offset of each input topic) are applied one per batch, so the record at fault
    fails alone and the others go through; a record that fails alone `RECORD_ATTEMPTS`
    times is dead-lettered `unprocessable`, in a transaction with its offset, exactly once.
    """

    failures: int = 0  # consecutive failed attempts, for the backoff
    until: dict[str, int] = field(default_factory=dict)  # empty: not isolating
    record: tuple[str, int] | None = None  # the record last tried alone
    record_failures: int = 0  # how often it failed alone
    error: str = ""  # the last failure

    def backoff(self) -> float:
        """Seconds to wait before the next attempt."""
        return float(min(_BACKOFF_FIRST_S * 2 ** (self.failures - 1), _BACKOFF_MAX_S))

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


@dataclass
class Owner:
    """What the owner of one partition holds in memory."""

    number: int
    producer: AIOKafkaProducer | None  # N's transactional producer (exactly_once)
    # Job types with an active or queued run, plus idle ones a batch has loaded (serialized
    # with `dump_state`). Idle job types are dropped after each batch: memory follows the
    # work in flight, not the history; SQLite (or the write queue) has their state.
    jobs: dict[str, JobState | bytes]
    runs: dict[str, RunRow]  # active runs, by run ID
    retained: Retained  # ended runs still in the changelog
    applied: dict[str, int]  # input topic -> next offset to apply
    deadlines: list[tuple[datetime, str]] = field(default_factory=list)  # heap, may be stale
    stream_time: datetime | None = None  # highest broker time seen
    task: asyncio.Task[None] | None = None  # the batch in flight (N is paused meanwhile)
    fenced: bool = False
    # Job types that may have a stored state; a job type not in it is new, and its first
    # records need no SQLite read (a Bloom filter: false positives only cost that read).
    known: Bloom = field(default_factory=lambda: _known(()))


class Retained:
    """Ended runs still in the changelog, in the order they ended, until their tombstone.

    It holds a run for `JOBS_RUN_RETENTION_S` of broker time, so it grows with the history
    of that window: a run costs its ID and an 8-byte time here (a heap of (datetime, str)
    tuples cost about 180 bytes a run, 18 MB of a 100,000-run worker). Runs end in stream
    time order; when a producer's clock sends one back in time, it leaves with the run
    before it: never earlier than its retention, at most as late as that disorder.
    """

    def __init__(self) -> None:
        self._ended = array("d")  # POSIX seconds
        self._run_ids: list[str] = []
        self._head = 0  # entries before it are gone

    def add(self, ended_at: datetime, run_id: str) -> None:
        """Hold `run_id`, which ended at `ended_at`."""
        self._ended.append(ended_at.timestamp())
        self._run_ids.append(run_id)

    def expire(self, horizon: datetime) -> list[str]:
        """The runs that ended at or before `horizon`, in order; they are no longer held."""
        limit = horizon.timestamp()
        ended, start = self._ended, self._head
        end = start
        while end < len(ended) and ended[end] <= limit:
            end += 1
        if end == start:
            return []
        gone = self._run_ids[start:end]
        self._head = end
        if end > len(ended) // 2:  # drop the expired part (amortized over what expired)
            del ended[:end]
            del self._run_ids[:end]
            self._head = 0
        return gone

    def __len__(self) -> int:
        return len(self._ended) - self._head


@dataclass
class BatchOutcome:
    """What processing one partition's batch produced."""

    events: list[StatusEvent] = field(default_factory=list)
    dead_letters: list[tuple[bytes | None, DeadLetter]] = field(default_factory=list)
    changed: dict[str, JobState] = field(default_factory=dict)
    states: dict[str, bytes] = field(default_factory=dict)  # `changed`, serialized
    runs: dict[str, RunRow] = field(default_factory=dict)
    tombstones: list[str] = field(default_factory=list)
    reroutes: list[tuple[InputRecord, Reroute]] = field(default_factory=list)
    next_offsets: dict[str, int] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """Whether there is nothing to publish or record."""
        return not (
            self.events
            or self.dead_letters
            or self.changed
            or self.runs
            or self.tombstones
            or self.reroutes
            or self.next_offsets
        )


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # aiokafka swallows exceptions raised in listeners; log them ourselves.
        try:
            await self._worker._on_revoked(revoked)
        except Exception:
            log.exception("partition revocation failed")
            raise

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        try:
            await self._worker._on_assigned(assigned)
        except Exception:
            log.exception("partition assignment failed")
            raise


class Worker:
    """The orchestrator process: `await Worker(settings).run(stop_event)`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.exactly_once = settings.processing_guarantee == "exactly_once"
        self._roles: dict[str, TopicRole] = {
            self.topics.requests: "requests",
            self.topics.results: "results",
        }
        self._owners: dict[int, Owner] = {}
        self._store: Store | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None  # at_least_once only
        self._restorer: AIOKafkaConsumer | None = None
        self._failure: BaseException | None = None
        self._trouble: dict[int, Trouble] = {}  # partitions whose batches failed
        self._stopping = asyncio.Event()
        self._fault_record = settings.fault_record.encode()
        self._restoring = asyncio.Lock()
        self._batches = 0
        self._faulted = False
        self._retention = timedelta(seconds=settings.run_retention_s)
        self._input_limits = settings.input_limits
        self._limits = settings.limits
        # Read at construction so that an invalid file stops start-up before any I/O.
        self.jobs_config: JobsConfig = load_config(settings.config)
        self.partition_count = 0
        self.ready = asyncio.Event()
        # Bound once: the module's lazy proxy re-binds on every call, which the per-record
        # debug lines of the hot path cannot afford.
        self._log = log.bind()

    # -- lifecycle ---------------------------------------------------------------------------

    async def _check_topics(self) -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.bootstrap_servers)
        await admin.start()
        try:
            return topic_admin.check_counts(await topic_admin.describe(admin, self.topics))
        finally:
            await admin.close()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until `stop` is set (or the task is cancelled), then shut down cleanly."""
        stop = stop or asyncio.Event()
        s = self.settings
        kafkarecords.install()
        self.partition_count = await self._check_topics()
        self._store = await Store.open(s.db_path)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap_servers,
            group_id=s.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            partition_assignment_strategy=(RangePartitionAssignor,),
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            max_poll_records=s.batch_max_records,
            fetch_max_wait_ms=s.fetch_max_wait_ms,
        )
        self._restorer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap_servers,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        try:
            await self._restorer.start()
            if not self.exactly_once:
                self._producer = AIOKafkaProducer(
                    bootstrap_servers=s.bootstrap_servers,
                    enable_idempotence=True,
                    acks="all",
                    linger_ms=s.linger_ms,
                    max_batch_size=s.producer_batch_bytes,
                )
                await self._producer.start()
            self._consumer.subscribe(
                [self.topics.requests, self.topics.results], listener=_Rebalance(self)
            )
            await self._consumer.start()
            log.info(
                "worker started",
                group=s.group_id,
                partitions=self.partition_count,
                guarantee=s.processing_guarantee,
                db=str(s.db_path),
            )
            await self._loop(stop)
        finally:
            await self._shutdown()
        if self._failure is not None:
            raise self._failure

    async def _loop(self, stop: asyncio.Event) -> None:
        assert self._consumer is not None
        s = self.settings
        stopping = asyncio.ensure_future(stop.wait())
        next_tick = time.monotonic() + s.tick_s
        try:
            while not stop.is_set() and self._failure is None:
                fetch = asyncio.ensure_future(
                    self._consumer.getmany(
                        timeout_ms=s.poll_timeout_ms, max_records=s.batch_max_records
                    )
                )
                await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await fetch
                    break
                self._dispatch(fetch.result())
                if self._store is not None and self._store.failure is not None:
                    log.error(
                        "writing the SQLite file failed; stopping", error=repr(self._store.failure)
                    )
                    self._failure = self._store.failure
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + s.tick_s
                    self._tick(datetime.now(UTC))
                    pause = gctuning.collect()
                    self._log.debug("garbage collected", ms=round(pause * 1000, 1))
        finally:
            stopping.cancel()
            self._stopping.set()  # cuts short any retry's backoff
            # Graceful stop: let every batch in flight commit before leaving the group.
            await self._drain()

    async def _drain(self) -> None:
        tasks = [o.task for o in self._owners.values() if o.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _shutdown(self) -> None:
        # Shielded so a second cancellation cannot leave the group membership dangling.
        async def close() -> None:
            await self._drain()
            if self._consumer is not None:
                with contextlib.suppress(KafkaError):
                    await self._consumer.stop()  # leaves the group; revokes the partitions
            for owner in list(self._owners.values()):
                await self._close_owner(owner)
            self._owners.clear()
            for client in (self._producer, self._restorer):
                if client is not None:
                    with contextlib.suppress(KafkaError):
                        await client.stop()
            if self._store is not None:
                await self._store.close()
            log.info("worker stopped")

        await asyncio.shield(close())

    # -- ownership ---------------------------------------------------------------------------

    def _tps(self, number: int) -> tuple[TopicPartition, TopicPartition]:
        return (
            TopicPartition(self.topics.requests, number),
            TopicPartition(self.topics.results, number),
        )

    async def _on_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        numbers = sorted({tp.partition for tp in assigned})
        results = await asyncio.gather(*(self._take(n) for n in numbers), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            # A partition we own but cannot serve must not sit idle: stop, so that a
            # supervisor restarts us or the group gives the partition to another member.
            log.error("could not take partitions; stopping", error=repr(failures[0]))
            self._failure = failures[0]
            return
        log.info("partitions assigned", partitions=numbers)
        self.ready.set()

    async def _on_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        numbers = sorted({tp.partition for tp in revoked})
        for number in numbers:
            owner = self._owners.pop(number, None)
            if owner is not None:
                await self._close_owner(owner)
        log.info("partitions revoked", partitions=numbers)

    async def _close_owner(self, owner: Owner) -> None:
        if owner.task is not None and owner.task is not asyncio.current_task():
            # The batch in flight commits or aborts before the partition moves.
            await asyncio.gather(owner.task, return_exceptions=True)
        if owner.producer is not None:
            with contextlib.suppress(KafkaError):
                await owner.producer.stop()
            owner.producer = None

    async def _take(self, number: int) -> None:
        """Become the owner of partition `number` (DESIGN §5 order)."""
        assert self._consumer is not None
        assert self._store is not None
        s = self.settings
        # aiokafka may hand out N's records while this listener still runs; paused, N yields
        # none until it is positioned and loaded (records handed out earlier are dropped by
        # `_dispatch`, harmlessly, since N is re-positioned below).
        self._consumer.pause(*self._tps(number))
        producer = None
        if self.exactly_once:
            producer = AIOKafkaProducer(
                bootstrap_servers=s.bootstrap_servers,
                transactional_id=f"{s.group_id}.{number}",
                linger_ms=s.linger_ms,
                max_batch_size=s.producer_batch_bytes,
                transaction_timeout_ms=s.transaction_timeout_ms,
            )
            await producer.start()  # fences the previous owner, waits out its transaction
        try:
            await self._position_and_load(number, producer)
        except BaseException:
            if producer is not None:
                with contextlib.suppress(KafkaError):
                    await producer.stop()
            raise

    async def _position_and_load(self, number: int, producer: AIOKafkaProducer | None) -> None:
        assert self._consumer is not None
        assert self._store is not None
        # Always position N ourselves, after the fencing: aiokafka fetched committed offsets
        # while joining, possibly including the offsets of the previous owner's transaction
        # that the producer start above has just aborted.
        committed: dict[str, int] = {}
        for tp in self._tps(number):
            offset = await self._consumer.committed(tp)
            if offset is not None:
                committed[tp.topic] = offset
            # Offset 0 when nothing is committed: if retention deleted it, the consumer's
            # out-of-range reset ("earliest") moves to the log start. (`seek_to_beginning`
            # inside the rebalance listener stalls aiokafka's fetcher.)
            self._consumer.seek(tp, offset or 0)
        await self._store.flush()  # SQLite holds every batch this process committed
        applied = await self._store.applied_offsets(number)
        restored = False
        behind = any(applied.get(t, 0) < o for t, o in committed.items())
        if behind or (self.exactly_once and applied != committed):
            await self._restore(number, committed)
            applied = committed
            restored = True
        # Only what has work in flight is loaded: a long history stays in SQLite.
        jobs = await self._store.busy_states(number)
        known = _known(())
        async for names in self._store.job_types(number):
            known.update(names)
        retained = Retained()
        async for ends in self._store.retained_ends(number):
            for ended_at, run_id in ends:
                retained.add(ended_at, run_id)
        deadlines = [
            (deadline, job_type)
            for job_type, state in jobs.items()
            if (deadline := state.next_deadline()) is not None
        ]
        heapq.heapify(deadlines)
        self._owners[number] = Owner(
            number=number,
            producer=producer,
            jobs=dict[str, JobState | bytes](jobs),
            known=known,
            runs={r.run_id: r for r in await self._store.active_runs(number)},
            retained=retained,
            applied=dict(applied),
            deadlines=deadlines,
        )
        self._consumer.resume(*self._tps(number))
        log.debug("partition taken", partition=number, committed=committed, restored=restored)

    async def _restore(self, number: int, committed: dict[str, int]) -> None:
        assert self._restorer is not None
        assert self._store is not None
        started = time.perf_counter()
        # One partition at a time, read and written: one restore consumer, re-assigned per
        # partition, and one snapshot in memory.
        async with self._restoring:
            snapshot = await changelog.read_partition(self._restorer, self.topics.state, number)
            await self._store.replace_partition(
                number,
                snapshot.jobs.items(),
                map(changelog.load_run, snapshot.runs.values()),
                committed,
            )
        log.info(
            "partition restored from changelog",
            partition=number,
            job_types=len(snapshot.jobs),
            runs=len(snapshot.runs),
            records=snapshot.records,
            seconds=round(time.perf_counter() - started, 3),
        )

    # -- batches -----------------------------------------------------------------------------

    def _dispatch(self, batch: dict[TopicPartition, list[Any]]) -> None:
        assert self._consumer is not None
        by_partition: dict[int, list[InputRecord]] = {}
        for tp, records in batch.items():
            role = self._roles[tp.topic]
            by_partition.setdefault(tp.partition, []).extend(
                InputRecord.of(role, r) for r in records
            )
        for number, records in by_partition.items():
            owner = self._owners.get(number)
            if owner is None or owner.fenced:
                continue  # not ours (any more); whoever owns it reads from the committed offset
            self._consumer.pause(*self._tps(number))
            records.sort(key=lambda r: (r.timestamp_ms, r.role != "requests", r.offset))
            trouble = self._trouble.get(number)
            if trouble is not None and trouble.until:
                # One record per batch until the failed batch is behind; the rest are read
                # again (the partition is re-positioned after the batch).
                records = records[:1]
            owner.task = asyncio.create_task(self._run_batch(owner, records))

    async def _load_idle(self, owner: Owner, records: Sequence[InputRecord]) -> list[str]:
        """Load the state of the idle job types `records` are about.

        Every record that can change a job type's state is keyed by that job type (others
        are dead-lettered or re-routed), so the keys name every state a batch can change.
        """
        assert self._store is not None
        keys = {r.key for r in records if r.key is not None}
        wanted = [k.decode("utf-8", "replace") for k in keys]
        known = owner.known
        missing = [j for j in wanted if j not in owner.jobs and j in known]
        if not missing:
            return []
        loaded = await self._store.load_states(missing)
        owner.jobs.update(loaded)
        return list(loaded)

    def _tick(self, now: datetime) -> None:
        """Time out overdue runs of idle partitions by the wall clock."""
        assert self._consumer is not None
        for owner in self._owners.values():
            busy = owner.task is not None and not owner.task.done()
            if busy or owner.fenced or not owner.deadlines or owner.deadlines[0][0] > now:
                continue
            self._consumer.pause(*self._tps(owner.number))
            owner.task = asyncio.create_task(self._run_batch(owner, [], wall_clock=now))

    async def _run_batch(
        self, owner: Owner, records: list[InputRecord], wall_clock: datetime | None = None
    ) -> None:
        assert self._consumer is not None
        trouble = self._trouble.get(owner.number)
        alone = trouble is not None and bool(trouble.until) and len(records) == 1
        try:
            if trouble is not None and alone and trouble.given_up(records[0]):
                outcome = self._unprocessable(owner, records[0], trouble)
            else:
                outcome = await self._decide_batch(owner, records, wall_clock)
            await self._commit(owner, outcome, records)
        except (ProducerFenced, InvalidProducerEpoch, FencedError) as exc:
            owner.fenced = True
            log.error(
                "fenced: another worker owns this partition now; stopped writing to it",
                partition=owner.number,
                error=repr(exc),
            )
            self._request_rejoin()
        except Exception as exc:
            await self._failed(owner, records, exc, alone)
        else:
            if trouble is not None:
                self._recovered(owner, trouble, alone)
        finally:
            current = self._owners.get(owner.number)
            if current is not None and not current.fenced:
                with contextlib.suppress(IllegalStateError):
                    self._consumer.resume(*self._tps(owner.number))

    async def _decide_batch(
        self, owner: Owner, records: list[InputRecord], wall_clock: datetime | None
    ) -> BatchOutcome:
        loaded = await self._load_idle(owner, records)
        outcome = self.apply(owner, records, wall_clock)
        for job_type in (*loaded, *outcome.changed):
            held = owner.jobs.get(job_type)
            if held is not None and _idle(held):
                del owner.jobs[job_type]
        return outcome

    async def _commit(
        self, owner: Owner, outcome: BatchOutcome, records: list[InputRecord]
    ) -> None:
        """Publish `outcome` with its input offsets, then queue it for SQLite."""
        if outcome.empty:
            return
        if self.exactly_once:
            await self._commit_transaction(owner, outcome)
        else:
            await self._publish(self._producer, owner.number, outcome)
            await self._commit_offsets(owner.number, outcome.next_offsets)
        self._fault("after_commit")
        assert self._store is not None
        # Written behind: the partition goes on while SQLite catches up (a crash before
        # the write is the restore-from-changelog case); `_take` flushes before reading.
        self._store.record_batch(
            owner.number,
            outcome.runs.values(),
            outcome.states.items(),
            outcome.next_offsets,
            outcome.tombstones,
        )
        if self._store.backlog > self.settings.batch_max_records:
            # SQLite fell behind: hold this partition until it catches up, so the lag
            # (and the memory it takes) stays within about a batch.
            await self._store.flush()
        self._log.debug(
            "batch committed",
            partition=owner.number,
            records=len(records),
            events=len(outcome.events),
            dead_letters=len(outcome.dead_letters),
            offsets=outcome.next_offsets,
        )

    async def _failed(
        self, owner: Owner, records: list[InputRecord], exc: Exception, alone: bool
    ) -> None:
        """Retry after a backoff from what Kafka committed; isolate records at fault."""
        tied = tied_to_input(exc)
        if not tied and not isinstance(exc, KafkaError):
            log.exception("batch failed unexpectedly; stopping", partition=owner.number)
            self._failure = exc
            return
        trouble = self._trouble.setdefault(owner.number, Trouble())
        trouble.failures += 1
        trouble.error = f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]
        if trouble.failures > _MAX_FAILURES:
            log.error(
                "batches keep failing; stopping",
                partition=owner.number,
                attempts=trouble.failures,
                error=trouble.error,
            )
            self._failure = exc
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
            partition=owner.number,
            error=trouble.error,
            attempt=trouble.failures,
            backoff_s=backoff,
            one_record_at_a_time=bool(trouble.until),
        )
        await self._back_off(backoff)
        await self._reset(owner)

    def _recovered(self, owner: Owner, trouble: Trouble, alone: bool) -> None:
        """A batch of a troubled partition committed: go on, or back to whole batches."""
        trouble.failures = 0
        if alone:
            # Records fetched after this one were not applied: read them again.
            assert self._consumer is not None
            for tp in self._tps(owner.number):
                self._consumer.seek(tp, owner.applied.get(tp.topic, 0))
        if trouble.passed(owner.applied):
            del self._trouble[owner.number]
            log.info("partition back to whole batches", partition=owner.number)

    def _unprocessable(self, owner: Owner, record: InputRecord, trouble: Trouble) -> BatchOutcome:
        """Dead-letter a record that failed alone `RECORD_ATTEMPTS` times, and move on.

        When even that dead letter failed, the next one copies nothing of the record.
        """
        message = (
            f"processing failed {trouble.record_failures} times with this record alone; "
            f"last error: {trouble.error}"
        )
        copy = trouble.record_failures <= RECORD_ATTEMPTS
        letter = dead_letter(record, "unprocessable", message, datetime.now(UTC), copy=copy)
        log.error(
            "dead-lettered after repeated failures",
            code="unprocessable",
            error=trouble.error,
            partition=record.partition,
            offset=record.offset,
            topic=record.topic,
        )
        next_offset = record.offset + 1
        owner.applied[record.topic] = next_offset
        return BatchOutcome(
            dead_letters=[(dead_letter_key(record), letter)],
            next_offsets={record.topic: next_offset},
        )

    def _request_rejoin(self) -> None:
        """Ask the group for a new assignment, so a fenced partition is settled promptly.

        aiokafka has no public call for this; its group coordinator has `request_rejoin`.
        """
        coordinator = getattr(self._consumer, "_coordinator", None)
        if coordinator is not None and hasattr(coordinator, "request_rejoin"):
            coordinator.request_rejoin()

    async def _reset(self, owner: Owner) -> None:
        if self._owners.get(owner.number) is not owner:
            return
        if owner.producer is not None:
            with contextlib.suppress(KafkaError):
                await owner.producer.stop()
            owner.producer = None
        del self._owners[owner.number]
        for attempt in range(1, _TAKE_ATTEMPTS + 1):
            try:
                await self._take(owner.number)
                return
            except KafkaError as exc:
                if attempt == _TAKE_ATTEMPTS:
                    # Owned but not served: stop, so that a supervisor restarts the worker
                    # or the group gives the partition to another member.
                    log.error(
                        "could not take the partition again; stopping",
                        partition=owner.number,
                        attempts=attempt,
                        error=repr(exc),
                    )
                    self._failure = exc
                    return
                log.warning(
                    "could not take the partition again; retrying",
                    partition=owner.number,
                    attempt=attempt,
                    error=repr(exc),
                )
                await self._back_off(_BACKOFF_FIRST_S * 2**attempt)

    async def _back_off(self, seconds: float) -> None:
        """Wait `seconds`, or less when the worker is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), min(seconds, _BACKOFF_MAX_S))

    def _fault(self, point: str) -> None:
        """Testing only: exit hard (or freeze) at `point` in the configured batch."""
        s = self.settings
        if s.fault_point != point or self._batches < s.fault_after_batches or self._faulted:
            return
        self._faulted = True
        if point == "stop_in_transaction":
            log.warning("injected fault: freezing inside an open transaction", point=point)
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        log.warning("injected fault: exiting hard", point=point)
        os._exit(70)

    async def _commit_transaction(self, owner: Owner, outcome: BatchOutcome) -> None:
        producer = owner.producer
        if producer is None:
            raise FencedError(f"partition {owner.number} has no producer")
        await producer.begin_transaction()
        try:
            await self._publish(producer, owner.number, outcome)
            offsets = {
                TopicPartition(topic, owner.number): offset
                for topic, offset in outcome.next_offsets.items()
            }
            if offsets:
                await producer.send_offsets_to_transaction(offsets, self.settings.group_id)
            self._fault("in_transaction")
            self._fault("stop_in_transaction")
            await producer.commit_transaction()
        except BaseException:
            await _abort_quietly(producer)
            raise

    async def _publish(
        self, producer: AIOKafkaProducer | None, number: int, outcome: BatchOutcome
    ) -> None:
        assert producer is not None
        t = self.topics
        out = Outbox(producer)
        for event in outcome.events:
            out.add(t.status, number, event.job_type.encode(), event.model_dump_json().encode())
        for key, letter in outcome.dead_letters:
            out.add(t.dlq, number, key, letter.model_dump_json().encode())
        for record, reroute in outcome.reroutes:
            origin = f"{record.topic}:{record.partition}:{record.offset}".encode()
            out.add(
                record.topic,
                reroute.partition,
                reroute.key,
                record.value,
                [*record.headers, (REROUTED_FROM, origin)],
            )
        for job_type, state in outcome.states.items():
            out.add(t.state, number, *changelog.job_row(job_type, state))
        for row in outcome.runs.values():
            out.add(t.state, number, *changelog.run_row(row))
        for run_id in outcome.tombstones:
            out.add(t.state, number, run_id.encode(), None)
        await out.flush()

    async def _commit_offsets(self, number: int, next_offsets: dict[str, int]) -> None:
        assert self._consumer is not None
        if not next_offsets:
            return
        offsets = {TopicPartition(topic, number): offset for topic, offset in next_offsets.items()}
        try:
            await self._consumer.commit(offsets)
        except CommitFailedError as exc:
            # The partition moved on; its new owner reads from the last committed offset.
            log.warning("offset commit failed", partition=number, error=str(exc))

    # -- deciding ----------------------------------------------------------------------------

    def apply(
        self,
        owner: Owner,
        records: Sequence[InputRecord],
        wall_clock: datetime | None = None,
    ) -> BatchOutcome:
        """Decide on `records` of one partition, updating the owner's in-memory state.

        Time advances with the partition's stream time (the highest broker time seen) and,
        when `wall_clock` is given (an idle partition's tick), with the wall clock. A batch
        that then fails to commit resets the owner, so nothing here is undone.
        """
        self._batches += 1
        outcome = BatchOutcome()
        now = datetime.now(UTC)
        for record in records:
            if record.offset < owner.applied.get(record.topic, 0):
                continue  # already applied (at_least_once after a restart)
            # The highest offset: broker times (CreateTime) need not follow offsets.
            next_offset = outcome.next_offsets.get(record.topic, 0)
            outcome.next_offsets[record.topic] = max(next_offset, record.offset + 1)
            if self._fault_record and record.value and self._fault_record in record.value:
                raise InjectedFault(f"injected fault at {record.topic}:{record.offset}")
            if owner.stream_time is None or record.at > owner.stream_time:
                owner.stream_time = record.at
            decoded = decode(
                record,
                partitions=self.partition_count,
                limits=self._input_limits,
                now=now,
            )
            if isinstance(decoded, Reroute):
                outcome.reroutes.append((record, decoded))
                continue
            command: Command
            if isinstance(decoded, Bad):
                letter = decoded.dead_letter
                outcome.dead_letters.append((dead_letter_key(record), letter))
                self._log.warning(
                    "dead-lettered",
                    code=letter.reason.code,
                    reason=letter.reason.message,
                    partition=record.partition,
                    offset=record.offset,
                    topic=record.topic,
                )
                if decoded.reject is None:
                    continue
                command = decoded.reject
            else:
                command = decoded
            # A run whose deadline passed before this record arrived has timed out first.
            self._decide(owner, outcome, AdvanceTime(command.job_type, record.at), only_due=True)
            self._decide(owner, outcome, command)
        clock = owner.stream_time
        if wall_clock is not None and (clock is None or wall_clock > clock):
            clock = wall_clock
        if clock is not None:
            self._time_out(owner, outcome, clock)
        owner.applied.update(outcome.next_offsets)
        for job_type, state in outcome.changed.items():
            outcome.states[job_type] = dump_state(state)
        owner.known.update(outcome.states)
        if owner.stream_time is not None:
            horizon = owner.stream_time - self._retention
            outcome.tombstones.extend(owner.retained.expire(horizon))
        return outcome

    def _decide(
        self, owner: Owner, outcome: BatchOutcome, command: Command, *, only_due: bool = False
    ) -> None:
        job_type = command.job_type
        held = owner.jobs.get(job_type)
        if only_due and not isinstance(held, JobState):
            return  # unknown or idle: no run, no deadline
        if held is None:
            state = JobState(job_type)
        elif isinstance(held, bytes):
            state = load_state(held)
        else:
            state = held
        if only_due:
            assert isinstance(command, AdvanceTime)
            deadline = state.next_deadline()
            if deadline is None or deadline > command.now:
                return
        new_state, events = decide(state, command, self.jobs_config.for_job(job_type), self._limits)
        if new_state is not state:
            owner.jobs[job_type] = new_state
            outcome.changed[job_type] = new_state
            deadline = new_state.next_deadline()
            if deadline is not None:
                heapq.heappush(owner.deadlines, (deadline, job_type))
        for event in events:
            self._track_run(owner, outcome, event)
            self._log.debug(
                "decided",
                type=event.type,
                job_type=job_type,
                run_id=event.run_id,
                partition=owner.number,
                offset=event.source.offset if event.source else None,
            )
        outcome.events.extend(events)

    def _time_out(self, owner: Owner, outcome: BatchOutcome, now: datetime) -> None:
        """End every run of the partition whose deadline is at or before `now`."""
        while owner.deadlines and owner.deadlines[0][0] <= now:
            _, job_type = heapq.heappop(owner.deadlines)
            # Entries are not removed when a deadline moves; `only_due` checks the real one.
            self._decide(owner, outcome, AdvanceTime(job_type, now), only_due=True)

    def _track_run(self, owner: Owner, outcome: BatchOutcome, event: StatusEvent) -> None:
        """Keep the run rows (changelog and SQLite) in step with an event."""
        run_id = event.run_id
        if run_id is None:
            return
        if event.type is EventType.STARTED:
            row = started_row(event, owner.number)
            owner.runs[run_id] = outcome.runs[run_id] = row
            return
        change = run_change(event)
        active = owner.runs.get(run_id)
        if change is None or active is None:
            return  # a queued run cancelled before it started has no row
        row = replace(active, **change)
        outcome.runs[run_id] = row
        if event.type is EventType.PROGRESS:
            owner.runs[run_id] = row
        else:
            del owner.runs[run_id]
            owner.retained.add(event.occurred_at, run_id)


_KNOWN_CAPACITY = 250_000  # per partition at 1% false positives (~300 KB); more job types
# only raise the rate of needless reads


def _known(job_types: Iterable[str]) -> Bloom:
    known = Bloom(_KNOWN_CAPACITY, 0.01)
    known.update(job_types)
    return known


def _idle(held: JobState | bytes) -> bool:
    """Whether a job type has no active or queued run (its state can live in SQLite alone)."""
    return isinstance(held, bytes) or not (held.active or held.queue)


async def _abort_quietly(producer: AIOKafkaProducer) -> None:
    """Abort the open transaction when the producer still can; a fatal one cannot.

    aiokafka exposes no public "is a transaction open" check; its transaction manager does.
    Where abort is impossible, the next owner's producer start aborts the transaction.
    """
    txn = getattr(producer, "_txn_manager", None)
    if txn is None or txn.is_fatal_error():
        return
    if txn.state not in (TransactionState.IN_TRANSACTION, TransactionState.ABORTABLE_ERROR):
        return
    with contextlib.suppress(KafkaError, TimeoutError, AssertionError):
        async with asyncio.timeout(10):
            await producer.abort_transaction()
