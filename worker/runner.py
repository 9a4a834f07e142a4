"""The worker loop: consume requests and results, decide in the core, publish, record.

One consumer in the group `<prefix>.orchestrator` reads `<prefix>.requests` and
`<prefix>.results`; the range assignor keeps partition N of both topics on one member, so the
owner of N serializes every transition of N's job types. Per batch and partition:

1. decode and validate each record (bad input becomes a dead letter, and a `rejected` event
   where the sender can be identified);
2. feed the commands to the core in broker-time order;
3. publish the status events and dead letters to partition N and wait for the broker's acks;
4. record runs, job states and applied offsets in SQLite in one transaction;
5. commit the consumer offsets.

This is at-least-once: a crash between 3 and 5 republishes that batch's events on restart.
SQLite's applied offsets make the store itself apply each input once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import CommitFailedError, KafkaError

from schemas import DeadLetter, StatusEvent
from worker import topics as topic_admin
from worker.codec import Bad, InputRecord, TopicRole, decode
from worker.lifecycle import JobState, decide
from worker.settings import Settings
from worker.store import Store

log = structlog.get_logger("worker")


@dataclass
class PartitionState:
    """What the owner of one partition holds in memory."""

    number: int
    jobs: dict[str, JobState]
    applied: dict[str, int]  # input topic -> next offset to apply


@dataclass
class BatchOutcome:
    """What processing one partition's batch produced."""

    events: list[StatusEvent] = field(default_factory=list)
    dead_letters: list[tuple[bytes | None, DeadLetter]] = field(default_factory=list)
    changed: dict[str, JobState] = field(default_factory=dict)
    next_offsets: dict[str, int] = field(default_factory=dict)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # aiokafka swallows exceptions raised here; log them ourselves.
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
        self._roles: dict[str, TopicRole] = {
            self.topics.requests: "requests",
            self.topics.results: "results",
        }
        self._partitions: dict[int, PartitionState] = {}
        self._lock = asyncio.Lock()
        self._store: Store | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self.partition_count = 0
        self.ready = asyncio.Event()

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
        self.partition_count = await self._check_topics()
        self._store = await Store.open(s.db_path)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=s.bootstrap_servers,
            enable_idempotence=True,
            acks="all",
            linger_ms=2,
        )
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
        )
        try:
            await self._producer.start()
            self._consumer.subscribe(
                [self.topics.requests, self.topics.results], listener=_Rebalance(self)
            )
            await self._consumer.start()
            log.info(
                "worker started",
                group=s.group_id,
                partitions=self.partition_count,
                db=str(s.db_path),
            )
            stopping = asyncio.ensure_future(stop.wait())
            try:
                while not stop.is_set():
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
                    batch = fetch.result()
                    if batch:
                        async with self._lock:
                            await self._process(batch)
            finally:
                stopping.cancel()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        # Shielded so a second cancellation cannot leave the group membership dangling.
        async def close() -> None:
            if self._consumer is not None:
                with contextlib.suppress(KafkaError):
                    await self._consumer.stop()
            if self._producer is not None:
                with contextlib.suppress(KafkaError):
                    await self._producer.stop()
            if self._store is not None:
                await self._store.close()
            log.info("worker stopped")

        await asyncio.shield(close())

    async def _on_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        assert self._store is not None
        for number in sorted({tp.partition for tp in assigned}):
            self._partitions[number] = PartitionState(
                number=number,
                jobs=await self._store.load_partition(number),
                applied=await self._store.applied_offsets(number),
            )
        log.info("partitions assigned", partitions=sorted(self._partitions))
        self.ready.set()

    async def _on_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # Wait for the batch in flight: it commits its offsets before the partition moves.
        async with self._lock:
            for number in {tp.partition for tp in revoked}:
                self._partitions.pop(number, None)
        log.info("partitions revoked", partitions=sorted({tp.partition for tp in revoked}))

    async def _process(self, batch: dict[TopicPartition, list[Any]]) -> None:
        by_partition: dict[int, list[InputRecord]] = {}
        for tp, records in batch.items():
            role = self._roles[tp.topic]
            by_partition.setdefault(tp.partition, []).extend(
                InputRecord(
                    role=role,
                    topic=r.topic,
                    partition=r.partition,
                    offset=r.offset,
                    timestamp_ms=r.timestamp,
                    key=r.key,
                    value=r.value,
                    headers=tuple(r.headers or ()),
                )
                for r in records
            )
        for number, records in by_partition.items():
            part = self._partitions.get(number)
            if part is None:
                continue  # revoked while the batch was fetched; the new owner reads it again
            records.sort(key=lambda r: (r.timestamp_ms, r.role != "requests", r.offset))
            outcome = self.apply(part, records)
            await self._publish(number, outcome)
            assert self._store is not None
            await self._store.commit_batch(
                number, outcome.events, outcome.changed.values(), outcome.next_offsets
            )
            part.applied.update(outcome.next_offsets)
            await self._commit_offsets(number, outcome.next_offsets)

    def apply(self, part: PartitionState, records: Sequence[InputRecord]) -> BatchOutcome:
        """Decide on `records` of one partition; update its in-memory state."""
        outcome = BatchOutcome()
        now = datetime.now(UTC)
        for record in records:
            if record.offset < part.applied.get(record.topic, 0):
                continue  # already applied before a restart
            outcome.next_offsets[record.topic] = record.offset + 1
            decoded = decode(
                record,
                partitions=self.partition_count,
                max_bytes=self.settings.max_record_bytes,
                now=now,
            )
            if isinstance(decoded, Bad):
                letter = decoded.dead_letter
                outcome.dead_letters.append((record.key, letter))
                log.warning(
                    "dead-lettered",
                    code=letter.reason.code,
                    reason=letter.reason.message,
                    partition=record.partition,
                    offset=record.offset,
                    topic=record.topic,
                )
                if decoded.reject is None:
                    continue
                command: Any = decoded.reject
            else:
                command = decoded
            job_type = command.job_type
            state = part.jobs.get(job_type) or JobState(job_type)
            new_state, events = decide(state, command)
            if new_state is not state:
                part.jobs[job_type] = new_state
                outcome.changed[job_type] = new_state
            outcome.events.extend(events)
            for event in events:
                log.debug(
                    "decided",
                    type=event.type,
                    job_type=job_type,
                    run_id=event.run_id,
                    partition=record.partition,
                    offset=record.offset,
                )
        return outcome

    async def _publish(self, number: int, outcome: BatchOutcome) -> None:
        assert self._producer is not None
        futures = []
        for event in outcome.events:
            futures.append(
                await self._producer.send(
                    self.topics.status,
                    value=event.model_dump_json().encode(),
                    key=event.job_type.encode(),
                    partition=number,
                )
            )
        for key, letter in outcome.dead_letters:
            futures.append(
                await self._producer.send(
                    self.topics.dlq,
                    value=letter.model_dump_json().encode(),
                    key=key,
                    partition=number,
                )
            )
        if futures:
            await asyncio.gather(*futures)

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
