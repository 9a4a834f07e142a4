"""The record collector: a batch's outcome to Kafka records, published with its offsets.

Implementations of one protocol, chosen by `JOBS_PROCESSING_GUARANTEE` (and
`JOBS_TRANSACTIONS`: `worker.engine.shared.SharedExactlyOnce`, one transactional producer
for all partitions):

- `ExactlyOnce`: one transactional producer per partition (transactional ID `<group>.<N>`,
  which fences the previous owner when it starts); status events, changelog rows, dead
  letters and re-routed records go out in ONE transaction with the input offsets
  (`send_offsets_to_transaction`).
- `AtLeastOnce`: one idempotent producer, no transaction; the offsets are committed once the
  records are acknowledged, so a crash in between republishes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any, Protocol, cast

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from worker import compat
from worker.engine.hooks import Hooks
from worker.engine.observe import Metrics
from worker.engine.records import RecordBatches, write_outcome
from worker.engine.task import BatchOutcome
from worker.kafkaio import connection
from worker.settings import Settings


class FencedError(RuntimeError):
    """Another worker owns the partition now; this one must stop writing to it."""


class RecordCollector(Protocol):
    """Publishes the outcomes of the partitions a worker owns."""

    async def start(self) -> None:
        """Start what all partitions share."""

    async def open(self, number: int) -> None:
        """Prepare to publish for partition `number` (fencing any previous owner)."""

    def begin(self, number: int) -> None:
        """A batch of partition `number` has begun (it may hand an outcome in)."""

    def end(self, number: int) -> None:
        """The batch of partition `number` is over, whatever became of it."""

    async def commit(
        self, number: int, outcome: BatchOutcome, applied: Mapping[str, int]
    ) -> int | None:
        """Publish `outcome` with its input offsets; raise if it did not happen.

        `applied` are N's input offsets before the batch (a batch that consumed nothing
        commits none, except through `SharedExactlyOnce`, which commits these again).
        Returns the changelog position the batch leaves: the end offset of N's changelog
        partition once it is committed, or None when the batch wrote no changelog row.
        """

    async def close(self, number: int) -> None:
        """Stop publishing for partition `number`."""

    async def stop(self) -> None:
        """Release everything."""


class Outbox:
    """Records for one producer, appended straight into aiokafka record batches
    (`batches`, a `records.RecordBatches`), and sent by `flush`.

    `AIOKafkaProducer.send` costs a coroutine, a partitioner call and a future per record;
    a batch of several hundred decisions spent more time there than deciding. `flush` hands
    each record batch to the producer with `send_batch`, inside the open transaction if the
    producer is transactional, then waits for every delivery.
    """

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self.batches = RecordBatches(producer.create_batch)

    async def flush(self) -> dict[tuple[str, int], int]:
        """Send every batch and wait until all are delivered; raise the first failure.

        Returns, per topic-partition written, the offset after its last record.
        """
        futures = []
        sent: list[tuple[tuple[str, int], int]] = []  # (topic-partition, records) a batch
        for (topic, partition), builders in self.batches.take().items():
            for builder in builders:
                sent.append(((topic, partition), builder.record_count()))
                futures.append(await self._producer.send_batch(builder, topic, partition=partition))
        ends: dict[tuple[str, int], int] = {}
        if futures:
            # Every delivery is awaited, so that no failure is left unretrieved.
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
            for item in outcomes:
                if isinstance(item, BaseException):
                    raise item
            delivered = cast(list[Any], outcomes)  # RecordMetadata, none failed
            for (where, count), metadata in zip(sent, delivered, strict=True):
                # A delivered batch's metadata carries the offset of its first record.
                ends[where] = max(ends.get(where, 0), int(metadata.offset) + count)
        return ends


def _offsets(number: int, next_offsets: dict[str, int]) -> dict[TopicPartition, int]:
    return {TopicPartition(topic, number): offset for topic, offset in next_offsets.items()}


class ExactlyOnce:
    """One transaction per batch, through the partition's own transactional producer."""

    def __init__(self, settings: Settings, hooks: Hooks, metrics: Metrics) -> None:
        self._settings = settings
        self._hooks = hooks
        self._metrics = metrics
        self._producers: dict[int, AIOKafkaProducer] = {}

    async def start(self) -> None:
        """Nothing is shared between partitions."""

    def begin(self, number: int) -> None:
        """Nothing waits for other partitions."""

    def end(self, number: int) -> None:
        """Nothing waits for other partitions."""

    async def open(self, number: int) -> None:
        """Start N's producer: this fences the previous owner and waits out its transaction."""
        s = self._settings
        producer = AIOKafkaProducer(
            **connection(s),
            transactional_id=f"{s.group_id}.{number}",
            linger_ms=s.linger_ms,
            max_batch_size=s.producer_batch_bytes,
            transaction_timeout_ms=s.transaction_timeout_ms,
        )
        await producer.start()
        self._producers[number] = producer

    async def commit(
        self, number: int, outcome: BatchOutcome, applied: Mapping[str, int]
    ) -> int | None:
        """Publish `outcome` and its offsets in one transaction."""
        producer = self._producers.get(number)
        if producer is None:
            raise FencedError(f"partition {number} has no producer")
        await producer.begin_transaction()
        try:
            out = Outbox(producer)
            write_outcome(out.batches, self._settings.topics, number, outcome)
            if outcome.next_offsets:
                ends = await compat.send_with_offsets(
                    producer,
                    out.flush(),
                    _offsets(number, outcome.next_offsets),
                    self._settings.group_id,
                )
            else:
                ends = await out.flush()
            self._hooks.point("in_transaction")
            self._hooks.point("stop_in_transaction")
            await producer.commit_transaction()
        except BaseException:
            await compat.abort_if_open(producer)
            raise
        self._metrics.transaction()
        written = ends.get((self._settings.topics.state, number))
        # The commit marker follows the transaction's last record in the partition.
        return None if written is None else written + 1

    async def close(self, number: int) -> None:
        """Stop N's producer (its transactions are all finished or aborted)."""
        producer = self._producers.pop(number, None)
        if producer is not None:
            with contextlib.suppress(KafkaError):
                await producer.stop()
            compat.retrieve_failures(producer)  # a fenced one's, raised to its batch

    async def stop(self) -> None:
        """Stop every partition's producer."""
        for number in list(self._producers):
            await self.close(number)


class AtLeastOnce:
    """Records through one idempotent producer, then the offsets committed by the consumer."""

    def __init__(self, settings: Settings, consumer: AIOKafkaConsumer) -> None:
        self._settings = settings
        self._consumer = consumer
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        """Start the shared producer."""
        s = self._settings
        self._producer = AIOKafkaProducer(
            **connection(s),
            enable_idempotence=True,
            acks="all",
            linger_ms=s.linger_ms,
            max_batch_size=s.producer_batch_bytes,
        )
        await self._producer.start()

    def begin(self, number: int) -> None:
        """Nothing waits for other partitions."""

    def end(self, number: int) -> None:
        """Nothing waits for other partitions."""

    async def open(self, number: int) -> None:
        """Nothing to fence without transactions."""

    async def commit(
        self, number: int, outcome: BatchOutcome, applied: Mapping[str, int]
    ) -> int | None:
        """Publish, wait for every acknowledgement, then commit the offsets."""
        assert self._producer is not None
        out = Outbox(self._producer)
        write_outcome(out.batches, self._settings.topics, number, outcome)
        ends = await out.flush()
        if outcome.next_offsets:
            # A failed commit (the partition moved on) fails the batch: SQLite must not
            # record offsets Kafka does not have, or the next take would skip its restore.
            await self._consumer.commit(_offsets(number, outcome.next_offsets))
        return ends.get((self._settings.topics.state, number))

    async def close(self, number: int) -> None:
        """Nothing is held per partition."""

    async def stop(self) -> None:
        """Stop the shared producer."""
        if self._producer is not None:
            with contextlib.suppress(KafkaError):
                await self._producer.stop()
            self._producer = None
