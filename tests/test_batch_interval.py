"""`JOBS_BATCH_INTERVAL_MS`: a partition's batches begin at most that often, so a steady
trickle of records shares transactions; every record is still decided once."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import ValidationError

from schemas import StatusEvent
from tests.conftest import RunningWorker
from worker.client.watch import StatusTail
from worker.engine.codec import partition_for
from worker.kafkaio import connection
from worker.settings import Settings

pytestmark = pytest.mark.kafka

REQUESTS = 12
SPACING_S = 0.05  # the trickle: 12 requests over 0.55 s
INTERVAL_MS = 400


async def _status_offsets(settings: Settings, partition: int) -> dict[str, int]:
    """The offset of each status event in `partition`, by request ID (read_committed)."""
    consumer = AIOKafkaConsumer(
        **connection(settings), enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        tp = TopicPartition(settings.topics.status, partition)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        found: dict[str, int] = {}
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            for record in batch.get(tp, []):
                event = StatusEvent.model_validate_json(record.value or b"")
                if event.request_id is not None:
                    found[event.request_id] = record.offset
        return found
    finally:
        await consumer.stop()


async def test_a_batch_interval_makes_a_trickle_share_transactions(
    topics: Settings, tail: StatusTail, producer: AIOKafkaProducer
) -> None:
    """With `JOBS_BATCH_INTERVAL_MS=400`, a start request every 50 ms for 0.55 s is decided
    in at most 3 transactions (each one's events are consecutive offsets of the status
    partition, its commit marker the gap after them), not one each; each is answered once."""
    settings = topics.model_copy(update={"batch_interval_ms": INTERVAL_MS})
    running = await RunningWorker(settings).start()
    ids = [f"trickle-{i}" for i in range(REQUESTS)]
    try:
        for request_id in ids:
            body = json.dumps({"job_type": "etl", "request_id": request_id}).encode()
            await producer.send_and_wait(settings.topics.requests, body, key=b"etl")
            await asyncio.sleep(SPACING_S)  # the trickle's pace, not a wait for the worker
        for request_id in ids:
            await tail.wait_event(request_id=request_id)
    finally:
        await running.stop()
    assert sorted(e.request_id for e in tail.events if e.request_id in ids) == sorted(ids)
    offsets = await _status_offsets(settings, partition_for(b"etl", 2))
    assert sorted(offsets) == sorted(ids)
    ordered = sorted(offsets.values())
    transactions = 1 + sum(b != a + 1 for a, b in itertools.pairwise(ordered))
    assert transactions <= 3, ordered


@pytest.mark.parametrize("value", ["-1", "60001", "1e9", "0.5", "soon", "\udcff"])
def test_a_batch_interval_out_of_range_is_refused_naming_it(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative, more than a minute, fractional or not a number: refused when the settings
    are read, naming the variable; 0 (the default) and 60000 are taken."""
    monkeypatch.setenv("JOBS_BATCH_INTERVAL_MS", value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert [e["loc"] for e in refused.value.errors()] == [("batch_interval_ms",)]
    monkeypatch.setenv("JOBS_BATCH_INTERVAL_MS", "60000")
    assert Settings().batch_interval_ms == 60_000
    monkeypatch.delenv("JOBS_BATCH_INTERVAL_MS")
    assert Settings().batch_interval_ms == 0
