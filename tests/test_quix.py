"""The bench's Quix Streams job lock as a process: it decides every valid start, goes on
past hostile input, and stops on SIGTERM. Its interpreter is made once (`quixref`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer

from tests.hostile import RawProducer, hostile_records
from worker.devtools.quixref import LOCK, quix_python
from worker.settings import Settings

pytestmark = pytest.mark.kafka


Events = list[dict[str, object]]


async def _events_until(
    settings: Settings, done: Callable[[Events], bool], lock: asyncio.subprocess.Process
) -> Events:
    """Committed status events, until `done` says they are all there or the lock exits."""
    consumer = AIOKafkaConsumer(
        settings.topics.status,
        bootstrap_servers=settings.bootstrap_servers,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    events: Events = []
    try:
        async with asyncio.timeout(120):
            while lock.returncode is None and not done(events):
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    events.extend(json.loads(r.value) for r in records)
    finally:
        await consumer.stop()
    return events


async def test_the_quix_lock_decides_every_valid_start_past_hostile_input(
    topics: Settings,
) -> None:
    """Random bytes, bad UTF-8, deep nesting, huge values and wrong types are skipped (the
    lock stays up); every valid start, each of a job type of its own, is started once; a
    second start of a running job type is refused; SIGTERM stops it with exit 0."""
    python = await asyncio.to_thread(quix_python, print)
    records = hostile_records(topics.topics, 2, 60)
    producer = RawProducer(topics.bootstrap_servers)
    await producer.send(records)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBS_")}
    env.update(
        JOBS_BOOTSTRAP_SERVERS=topics.bootstrap_servers, JOBS_TOPIC_PREFIX=topics.topic_prefix
    )
    lock = await asyncio.create_subprocess_exec(
        str(python), str(LOCK), env=env, stderr=asyncio.subprocess.PIPE
    )
    valid = [r for r in records if r.valid]
    valid_ids = {r.request_id for r in valid}
    # A start of a job type already running: sent after the rest, so it comes after its twin.
    again = valid[:1]
    await producer.send(again)

    def done(events: Events) -> bool:
        started = {e["request_id"] for e in events if e["type"] == "started"}
        refused = {e["request_id"] for e in events if e["type"] == "refused"}
        return valid_ids <= started and again[0].request_id in refused

    try:
        events = await _events_until(topics, done, lock)
    finally:
        if lock.returncode is None:
            lock.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(lock.communicate(), 60)
    assert lock.returncode == 0, err.decode(errors="replace")[-2000:]

    started = [e for e in events if e["type"] == "started"]
    assert valid_ids <= {e["request_id"] for e in started}
    # Each valid start started once, each with a run ID of its own.
    mine = [e for e in started if e["request_id"] in valid_ids]
    assert len(mine) == len(valid_ids)
    assert len({e["run_id"] for e in mine}) == len(mine)
    refused = [e for e in events if e["type"] == "refused"]
    assert again[0].request_id in {e["request_id"] for e in refused}
    assert "skipped an input" in err.decode(errors="replace")  # the hostile ones, logged
