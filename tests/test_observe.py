"""The worker's HTTP endpoints and metrics, on `jobctl run` against the real broker."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer

from schemas import DeadLetter, EventType
from tests.chaos import WorkerProcess
from tests.conftest import create_topics
from worker.client.watch import StatusTail
from worker.settings import Settings

pytestmark = pytest.mark.kafka


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as response:
        return response.status, await response.text()


async def test_health_readiness_and_metrics(
    settings: Settings, producer: AIOKafkaProducer, tmp_path: Path
) -> None:
    """/healthz answers, /readyz turns 200 once the partitions are taken, and /metrics counts
    the events and dead letters the worker published, by type and reason code."""
    await create_topics(settings, 2)
    port = _free_port()
    worker = WorkerProcess(settings.model_copy(update={"http_port": port}), "http", tmp_path)
    base = f"http://127.0.0.1:{port}"
    worker.start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            StatusTail(settings.bootstrap_servers, settings.topics) as tail,
        ):
            async with asyncio.timeout(60):
                while True:
                    assert worker.alive(), worker.log_text()[-3000:]
                    try:
                        status, body = await _get(session, f"{base}/readyz")
                    except aiohttp.ClientConnectionError:
                        status, body = 0, ""
                    if status == 200:
                        break
                    await asyncio.sleep(0.1)
            assert json.loads(body) == {"ready": True}
            assert (await _get(session, f"{base}/healthz"))[0] == 200
            body_ok = json.dumps({"job_type": "etl", "request_id": "m1"}).encode()
            await producer.send_and_wait(settings.topics.requests, body_ok, key=b"etl")
            await producer.send_and_wait(settings.topics.requests, b"", key=b"etl")
            assert (await tail.wait_event(request_id="m1")).type is EventType.STARTED
            await tail.wait_for(lambda i: isinstance(i, DeadLetter))
            # Counted right after the commit the tail has seen: scrape until they show.
            wanted = (
                'jobs_status_events_total{type="started"} 1.0',
                'jobs_dead_letters_total{code="empty_value"} 1.0',
            )
            async with asyncio.timeout(30):
                while True:
                    status, text = await _get(session, f"{base}/metrics")
                    if all(line in text for line in wanted):
                        break
                    await asyncio.sleep(0.1)
        assert status == 200
        assert 'jobs_batches_total{outcome="committed"}' in text
        assert "jobs_ready 1.0" in text
        assert "jobs_partitions_owned 2.0" in text
        assert 'jobs_consumer_lag{input="requests",partition="0"}' in text
        assert "etl" not in text  # no label names a job type
        assert await worker.terminate() == 0
    finally:
        worker.ensure_dead()
