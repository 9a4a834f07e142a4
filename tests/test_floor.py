"""The bench's contract floor as a process: hostile input is dead-lettered, the rest flows."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import pytest
from aiokafka import AIOKafkaConsumer

from schemas import DeadLetter
from tests.hostile import RawProducer, hostile_records
from worker.settings import Settings

pytestmark = pytest.mark.kafka


async def _read(
    settings: Settings, expected: int, floor: asyncio.subprocess.Process
) -> tuple[list[dict[str, object]], list[object]]:
    """Committed status events and dead letters, until `expected` records in all."""
    topics = settings.topics
    consumer = AIOKafkaConsumer(
        topics.status,
        topics.dlq,
        bootstrap_servers=settings.bootstrap_servers,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    events: list[dict[str, object]] = []
    letters: list[object] = []
    try:
        async with asyncio.timeout(90):
            while len(events) + len(letters) < expected and floor.returncode is None:
                for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                    for r in records:
                        if tp.topic == topics.status:
                            events.append(json.loads(r.value))
                        else:
                            letters.append(r)
    finally:
        await consumer.stop()
    return events, letters


async def test_the_floor_dead_letters_hostile_input_and_decides_every_valid_record(
    topics: Settings,
) -> None:
    """Random bytes, bad UTF-8, deep nesting, huge values and wrong types go to the
    dead-letter topic with their reason; every valid start gets its `started` event with its
    request ID; SIGTERM stops the floor with exit 0 and every row written."""
    records = hostile_records(topics.topics, 2, 60)
    producer = RawProducer(topics.bootstrap_servers)
    await producer.send(records)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBS_")}
    env.update(
        JOBS_BOOTSTRAP_SERVERS=topics.bootstrap_servers,
        JOBS_TOPIC_PREFIX=topics.topic_prefix,
        JOBS_DB_PATH=str(topics.db_path),
    )
    floor = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.devtools.floor",
        "2",
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        events, letters = await _read(topics, len(records), floor)
    finally:
        if floor.returncode is None:
            floor.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(floor.communicate(), 60)
    assert floor.returncode == 0, err.decode(errors="replace")[-2000:]

    # Every input became an event or a dead letter, and nothing else was written.
    assert len(events) + len(letters) == len(records)
    valid = {r.request_id for r in records if r.valid}
    started = {e["request_id"] for e in events if e["type"] == "started"}
    assert valid <= started
    # Whatever cannot be read as JSON at all is among the dead letters, each with its reason.
    sources = {}
    for record in letters:
        letter = DeadLetter.model_validate_json(record.value)  # type: ignore[attr-defined]
        assert letter.reason.code == "schema_invalid"
        assert letter.reason.message.startswith(("invalid request: ", "invalid result: "))
        source = letter.source
        sources[f"{source.topic}:{source.partition}:{source.offset}"] = letter.reason.message
    unreadable = set()
    for index, record in enumerate(records):
        try:
            json.loads(record.value or b"")
        except (ValueError, RecursionError):
            topic, partition, offset = producer.sent[index]
            unreadable.add((record.kind, f"{topic}:{partition}:{offset}"))
    assert {kind for kind, _ in unreadable} >= {"random_bytes", "bad_utf8_value", "empty_value"}
    assert {source for _, source in unreadable} <= sources.keys()
    # Wrong types are read, and refused by the schema.
    wrong = [i for i, r in enumerate(records) if r.kind == "wrong_types"]
    assert wrong
    assert all("{}:{}:{}".format(*producer.sent[i]) in sources for i in wrong)
    stopped = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    assert stopped[-1]["event"] == "floor stopped"
    assert stopped[-1]["rows"] == len(events)
