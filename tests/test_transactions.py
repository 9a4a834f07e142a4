"""Smoke tests of the Kafka transaction features the worker relies on, on the real broker."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, ProducerFenced

pytestmark = pytest.mark.kafka


@pytest.fixture
async def two_topics(kafka_bootstrap: str, prefix: str) -> tuple[str, str]:
    """An input and an output topic with one partition each."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    names = (f"{prefix}.in", f"{prefix}.out")
    try:
        await admin.create_topics([NewTopic(n, 1, 1) for n in names])
    finally:
        await admin.close()
    return names


def _consumer(bootstrap: str, group: str | None = None) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )


async def _read_all(bootstrap: str, topic: str) -> list[bytes]:
    """Every committed record of partition 0 of `topic`, up to its last stable offset."""
    consumer = _consumer(bootstrap)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        values: list[bytes] = []
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            values.extend(r.value for r in batch.get(tp, []))
        return values
    finally:
        await consumer.stop()


def _txn_producer(bootstrap: str, transactional_id: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id)


async def test_committed_transaction_carries_offsets_and_outputs(
    kafka_bootstrap: str, two_topics: tuple[str, str]
) -> None:
    """Outputs and input offsets committed in one transaction are both visible afterwards."""
    source, sink = two_topics
    group = f"{source}.group"
    plain = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await plain.start()
    for i in range(5):
        await plain.send_and_wait(source, f"in-{i}".encode(), partition=0)
    await plain.stop()

    consumer = _consumer(kafka_bootstrap, group)
    await consumer.start()
    tp = TopicPartition(source, 0)
    consumer.assign([tp])
    producer = _txn_producer(kafka_bootstrap, f"{group}.0")
    await producer.start()
    try:
        records = []
        while len(records) < 3:
            batch = await consumer.getmany(tp, timeout_ms=1000, max_records=3 - len(records))
            records.extend(batch.get(tp, []))
        async with producer.transaction():
            for record in records:
                await producer.send(sink, record.value.upper(), partition=0)
            await producer.send_offsets_to_transaction({tp: records[-1].offset + 1}, group)
    finally:
        await producer.stop()
        await consumer.stop()

    # The next owner's order (ARCHITECTURE.md): its producer with the same transactional ID starts
    # first, which waits until the previous transaction is fully completed, offsets included;
    # only then are the committed offsets read.
    successor = _txn_producer(kafka_bootstrap, f"{group}.0")
    await successor.start()
    await successor.stop()
    resumed = _consumer(kafka_bootstrap, group)
    await resumed.start()
    try:
        resumed.assign([tp])
        assert await resumed.committed(tp) == 3
        batch = await resumed.getmany(tp, timeout_ms=5000)
        assert [r.value for r in batch[tp]][:1] == [b"in-3"]
    finally:
        await resumed.stop()
    assert await _read_all(kafka_bootstrap, sink) == [b"IN-0", b"IN-1", b"IN-2"]


async def test_aborted_transaction_stays_invisible(
    kafka_bootstrap: str, two_topics: tuple[str, str]
) -> None:
    """A read_committed consumer never sees an aborted transaction's records."""
    _, sink = two_topics
    producer = _txn_producer(kafka_bootstrap, f"{sink}.abort")
    await producer.start()
    try:
        await producer.begin_transaction()
        await producer.send(sink, b"aborted", partition=0)
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send(sink, b"committed", partition=0)
    finally:
        await producer.stop()
    assert await _read_all(kafka_bootstrap, sink) == [b"committed"]


async def test_second_producer_with_same_id_fences_the_first(
    kafka_bootstrap: str, two_topics: tuple[str, str]
) -> None:
    """Starting a producer with the same transactional ID fences the old one and drops its work."""
    _, sink = two_topics
    transactional_id = f"{sink}.fence.{uuid.uuid4().hex[:6]}"
    zombie = _txn_producer(kafka_bootstrap, transactional_id)
    await zombie.start()
    successor = _txn_producer(kafka_bootstrap, transactional_id)
    try:
        await zombie.begin_transaction()
        await zombie.send_and_wait(sink, b"from-zombie", partition=0)
        await successor.start()  # InitProducerId bumps the epoch and aborts the open transaction
        with pytest.raises((ProducerFenced, KafkaError)):
            await asyncio.wait_for(zombie.commit_transaction(), 30)
        async with successor.transaction():
            await successor.send(sink, b"from-successor", partition=0)
    finally:
        await successor.stop()
        await zombie.stop()
    assert await _read_all(kafka_bootstrap, sink) == [b"from-successor"]


async def test_outbox_keeps_order_across_full_batches_and_commits_atomically(
    kafka_bootstrap: str, two_topics: tuple[str, str]
) -> None:
    """Records added through the `Outbox` arrive in order even when they span many record
    batches, and an aborted transaction's outbox is invisible."""
    from worker.engine.collector import Outbox

    _, out_topic = two_topics
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap,
        transactional_id=f"outbox-{uuid.uuid4().hex}",
        max_batch_size=1024,  # a few records per batch: the outbox opens many
    )
    await producer.start()
    try:
        await producer.begin_transaction()
        aborted = Outbox(producer)
        aborted.batches.add(out_topic, 0, b"k", b"aborted")
        await aborted.flush()
        await producer.abort_transaction()

        await producer.begin_transaction()
        out = Outbox(producer)
        for i in range(300):
            out.batches.add(
                out_topic, 0, b"k", f"record-{i:03d}-".encode() * 4, [("n", str(i).encode())]
            )
        assert out.batches.records == 300
        await out.flush()
        await producer.commit_transaction()
    finally:
        await producer.stop()
    values = await _read_all(kafka_bootstrap, out_topic)
    assert values == [f"record-{i:03d}-".encode() * 4 for i in range(300)]
