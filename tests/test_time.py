"""Decisions caused by time are exactly once, like those caused by records."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from schemas import EventType, StatusEvent
from tests.chaos import WorkerProcess, read_topic
from tests.conftest import create_topics
from worker.client.watch import StatusTail
from worker.settings import Settings

pytestmark = pytest.mark.kafka


async def _start(producer: AIOKafkaProducer, settings: Settings, request_id: str) -> None:
    body = {"job_type": "nightly", "request_id": request_id}
    await producer.send_and_wait(
        settings.topics.requests, json.dumps(body).encode(), key=b"nightly"
    )


async def test_a_time_out_decided_by_one_owner_is_not_decided_again_by_the_next(
    settings: Settings, producer: AIOKafkaProducer, tmp_path: Path
) -> None:
    """Worker B starts r1 and queues r2, then stops; worker A takes over and its tick times
    r1 out and starts r2; B comes back with its old SQLite file. B restores what A decided
    (the changelog moved past B's position): one `timed_out`, one `started` for r2."""
    await create_topics(settings, 1)
    config = tmp_path / "jobs.toml"
    config.write_text('[defaults]\npolicy = "queue"\ntimeout = 2\n')
    extra = {"config": str(config), "tick_s": "0.3"}
    b = WorkerProcess(settings, "b", tmp_path, **extra)
    a = WorkerProcess(settings, "a", tmp_path, **extra)
    try:
        async with StatusTail(settings.bootstrap_servers, settings.topics) as tail:
            b.start()
            await _start(producer, settings, "r1")
            await _start(producer, settings, "r2")
            r1 = await tail.wait_event(request_id="r1", type=EventType.STARTED, timeout=60)
            await tail.wait_event(request_id="r2", type=EventType.QUEUED)
            assert await b.terminate() == 0

            a.start()
            await tail.wait_event(run_id=r1.run_id, type=EventType.TIMED_OUT, timeout=60)
            await tail.wait_event(request_id="r2", type=EventType.STARTED, timeout=60)
            assert await a.terminate() == 0

            b.start()
            # A record about the same job type: a B that still believed r1 running would
            # time it out (again) before deciding it, and start r2 again.
            await _start(producer, settings, "r3")
            third = await tail.wait_event(request_id="r3", timeout=60)
            assert third.type is EventType.QUEUED
            assert await b.terminate() == 0
    finally:
        a.ensure_dead()
        b.ensure_dead()
    events = [
        StatusEvent.model_validate_json(r.value)
        for r in (await read_topic(settings.bootstrap_servers, settings.topics.status))[0]
    ]
    kinds = Counter((e.type, e.request_id or e.run_id) for e in events)
    assert kinds[(EventType.TIMED_OUT, r1.run_id)] == 1
    assert kinds[(EventType.STARTED, "r2")] == 1
    assert "partition restored from changelog" in b.log_text()


async def test_a_worker_back_on_its_own_file_restores_nothing(
    settings: Settings, producer: AIOKafkaProducer, tmp_path: Path
) -> None:
    """When no one else wrote the changelog meanwhile, a restarted worker's SQLite file is
    current: it is used as it is, not restored."""
    await create_topics(settings, 1)
    worker = WorkerProcess(settings, "w", tmp_path)
    try:
        async with StatusTail(settings.bootstrap_servers, settings.topics) as tail:
            for request_id in ("first", "second"):
                worker.start()
                await _start(producer, settings, request_id)
                await tail.wait_event(request_id=request_id, timeout=60)
                assert await worker.terminate() == 0
    finally:
        worker.ensure_dead()
    assert worker.log_text().count('"worker started"') == 2
    assert "partition restored from changelog" not in worker.log_text()
