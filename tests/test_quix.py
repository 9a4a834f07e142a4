"""The bench's Quix Streams job lock as a process: it decides every valid start, goes on
past hostile input, and stops on SIGTERM. Its interpreter is made once (`quixref`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from tests.hostile import RawProducer, hostile_records
from worker.devtools import quixref
from worker.devtools.latency import BenchError
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


def test_a_quix_venv_without_its_interpreter_is_made_again_and_a_failure_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stamp left beside a removed interpreter does not count as installed; when pip
    cannot install Quix Streams, the error names what failed and pip's last lines."""
    monkeypatch.setenv("JOBS_KAFKA_CACHE", str(tmp_path))
    venv = tmp_path / f"quixstreams-{quixref.QUIX_VERSION}"
    venv.mkdir()
    (venv / ".installed").touch()
    calls: list[list[str]] = []

    def run(step: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        calls.append(step)
        failed = "pip" in step
        stderr = "ERROR: No matching distribution found for quixstreams" if failed else ""
        return subprocess.CompletedProcess(step, 1 if failed else 0, "", stderr)

    monkeypatch.setattr(quixref.subprocess, "run", run)
    said: list[str] = []
    with pytest.raises(BenchError) as raised:
        quixref.quix_python(said.append)
    assert [step[1:3] for step in calls] == [["-m", "venv"], ["-m", "pip"]]
    assert "could not install Quix Streams" in str(raised.value)
    assert "No matching distribution" in str(raised.value)
    assert len(said) == 1
    assert "installing Quix Streams" in said[0]
