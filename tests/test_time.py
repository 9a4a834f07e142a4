"""Decisions caused by time are exactly once, like those caused by records."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from schemas import EventType, StatusEvent
from tests.chaos import WorkerProcess, read_topic
from tests.conftest import RunningWorker, create_topics
from worker.audit.verify import VerifyReport, verify_partition
from worker.client.watch import StatusTail
from worker.core.config import JobsConfig
from worker.core.lifecycle import JobConfig, Limits
from worker.core.limits import InputLimits
from worker.engine.codec import InputRecord
from worker.engine.task import PartitionTask, Rules
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


async def _result_then_backlog(
    producer: AIOKafkaProducer, settings: Settings, worker_settings: Settings, tail: StatusTail
) -> StatusEvent:
    """A worker starts a run of `slow` (timeout 3 s) and stops; the run's COMPLETED result
    is appended before the deadline; once broker time is past the deadline, 3,000 requests
    for other job types follow. Returns the run's `started` event."""
    running = await RunningWorker(worker_settings).start()
    try:
        body = {"job_type": "slow", "request_id": "s1"}
        await producer.send_and_wait(
            settings.topics.requests, json.dumps(body).encode(), key=b"slow"
        )
        started = await tail.wait_event(request_id="s1")
    finally:
        await running.stop()
    assert started.run_id is not None
    assert started.started_at is not None
    result = {"job_type": "slow", "run_id": started.run_id, "status": "COMPLETED"}
    await producer.send_and_wait(settings.topics.results, json.dumps(result).encode(), key=b"slow")
    # The scenario needs broker time past the deadline before the backlog is written.
    deadline = started.started_at + timedelta(seconds=3.5)
    await asyncio.sleep(max(0.0, (deadline - datetime.now(UTC)).total_seconds()))
    sends = [
        await producer.send(
            settings.topics.requests,
            json.dumps({"job_type": f"other-{i}", "request_id": f"o{i}"}).encode(),
            key=f"other-{i}".encode(),
        )
        for i in range(3000)
    ]
    await asyncio.gather(*sends)
    return started


async def test_a_result_behind_a_backlog_of_requests_completes_its_run(
    settings: Settings, producer: AIOKafkaProducer, tmp_path: Path
) -> None:
    """A run's COMPLETED result, appended before its deadline while the worker was down, is
    read after 3,000 later requests for other job types: time does not pass the unread
    result, so the run completes instead of timing out."""
    await create_topics(settings, 1)
    config = tmp_path / "jobs.toml"
    config.write_text("[job_types.slow]\ntimeout = 3\n")
    worker_settings = settings.model_copy(update={"config": config, "tick_s": 30.0})
    async with StatusTail(settings.bootstrap_servers, settings.topics) as tail:
        started = await _result_then_backlog(producer, settings, worker_settings, tail)
        running = await RunningWorker(worker_settings).start()
        try:
            ended = await tail.wait_for(
                lambda i: (
                    isinstance(i, StatusEvent)
                    and i.run_id == started.run_id
                    and i.type in (EventType.COMPLETED, EventType.TIMED_OUT)
                ),
                timeout=60,
            )
            await tail.wait_event(request_id="o2999", timeout=60)
        finally:
            await running.stop()
    assert isinstance(ended, StatusEvent)
    assert ended.type is EventType.COMPLETED
    assert not [e for e in tail.events if e.type is EventType.REJECTED]


def test_verify_reports_a_time_out_decided_ahead_of_an_unread_result() -> None:
    """A log where a run timed out while its COMPLETED result, stamped before the deadline,
    was still unread is reported by `verify`, naming the result's coordinates."""
    config = JobsConfig(defaults=JobConfig(timeout=timedelta(seconds=3)))
    rules = Rules(1, config, Limits(), InputLimits(), timedelta(days=1))
    t0 = 1_764_640_000_000  # ms
    start_body = json.dumps({"job_type": "slow", "request_id": "s1"}).encode()
    start = InputRecord("requests", "p.requests", 0, 0, t0, b"slow", start_body)
    live = PartitionTask(0, rules)
    started = live.apply([start]).events
    run_id = started[0].run_id
    result_body = json.dumps({"job_type": "slow", "run_id": run_id, "status": "COMPLETED"})
    result = InputRecord("results", "p.results", 0, 0, t0 + 1_000, b"slow", result_body.encode())
    # What a worker that let time pass the unread result logged: the time-out, then the
    # result rejected.
    late = datetime.fromtimestamp((t0 + 10_000) / 1000, tz=UTC)
    timed_out = live.apply([], wall_clock=late).events
    rejected = live.apply([result]).events
    assert [e.type for e in (*timed_out, *rejected)] == [EventType.TIMED_OUT, EventType.REJECTED]
    report = VerifyReport()
    inputs = {(r.topic, r.offset): r for r in (start, result)}
    verify_partition(0, rules, inputs, [*started, *timed_out, *rejected], report)
    (divergence,) = report.divergences
    assert "p.results:0:0" in divergence.cause
    assert "was unread" in divergence.cause


async def test_a_start_behind_a_backlog_waits_for_the_unread_result_of_its_job_type(
    settings: Settings, producer: AIOKafkaProducer, tmp_path: Path
) -> None:
    """As above, with a start for the *same* job type at the end of the backlog, stamped
    after the deadline: deciding it must not time the run out while the run's COMPLETED
    result (stamped before the deadline) is unread. Records of one input wait for the other
    input to catch up to their time, so the result is decided first: `completed`, then
    `started` for the new start."""
    await create_topics(settings, 1)
    config = tmp_path / "jobs.toml"
    config.write_text("[job_types.slow]\ntimeout = 3\n")
    worker_settings = settings.model_copy(
        update={"config": config, "tick_s": 30.0, "batch_max_records": 200}
    )
    async with StatusTail(settings.bootstrap_servers, settings.topics) as tail:
        started = await _result_then_backlog(producer, settings, worker_settings, tail)
        await producer.send_and_wait(
            settings.topics.requests,
            json.dumps({"job_type": "slow", "request_id": "s2"}).encode(),
            key=b"slow",
        )
        running = await RunningWorker(worker_settings).start()
        try:
            second = await tail.wait_event(request_id="s2", timeout=60)
        finally:
            await running.stop()
    about_s1 = [e.type for e in tail.events if e.run_id == started.run_id]
    assert about_s1 == [EventType.STARTED, EventType.COMPLETED]
    assert second.type is EventType.STARTED
    assert not [e for e in tail.events if e.type is EventType.REJECTED]


def _records(t0: int) -> tuple[Rules, PartitionTask, InputRecord, InputRecord, InputRecord]:
    """A started run of `slow` (timeout 3 s); its COMPLETED result stamped 1 s in; a start
    of `slow` stamped 10 s in, past the deadline."""
    config = JobsConfig(defaults=JobConfig(timeout=timedelta(seconds=3)))
    rules = Rules(1, config, Limits(), InputLimits(), timedelta(days=1))
    start = InputRecord(
        "requests", "p.requests", 0, 0, t0, b"slow", b'{"job_type":"slow","request_id":"s1"}'
    )
    task = PartitionTask(0, rules)
    (started,) = task.apply([start]).events
    result_body = json.dumps({"job_type": "slow", "run_id": started.run_id, "status": "COMPLETED"})
    result = InputRecord("results", "p.results", 0, 0, t0 + 1_000, b"slow", result_body.encode())
    late = InputRecord(
        "requests",
        "p.requests",
        0,
        1,
        t0 + 10_000,
        b"slow",
        b'{"job_type":"slow","request_id":"s2"}',
    )
    return rules, task, start, result, late


def test_a_request_waits_while_the_results_input_is_behind_its_time() -> None:
    """A batch that brings only the requests input (the results input has unread records):
    the late start is held, not decided, so it cannot time the run out; once the result is
    fetched both are decided in broker-time order: `completed`, then `started`."""
    _, task, _, result, late = _records(1_764_640_000_000)
    assert task.apply([late], lagging=frozenset({"results"})).events == []
    assert task.held == [late]
    outcome = task.apply([result], lagging=frozenset())
    assert [(e.type, e.request_id) for e in outcome.events] == [
        (EventType.COMPLETED, None),
        (EventType.STARTED, "s2"),
    ]
    assert task.held == []
    assert outcome.next_offsets == {"p.requests": 2, "p.results": 1}


def test_held_records_are_decided_once_the_hold_runs_out() -> None:
    """An input that stays behind holds the other no longer than `Rules.hold`: a tick then
    decides what waited (here timing the run out first, as its time says), and a held record
    is never committed before it is decided."""
    _, task, _, _, late = _records(1_764_640_000_000)
    waiting = task.apply([late], lagging=frozenset({"results"}))
    assert waiting.next_offsets == {}
    now = datetime.now(UTC)
    assert not task.hold.too_long(now, timedelta(seconds=5))
    task.hold.since = now - timedelta(seconds=30)
    assert task.due(now)
    outcome = task.apply([], lagging=frozenset({"results"}))
    assert [e.type for e in outcome.events] == [EventType.TIMED_OUT, EventType.STARTED]
    assert outcome.next_offsets == {"p.requests": 2}


def test_a_request_waits_for_an_earlier_result_queued_for_the_next_batch() -> None:
    """With worker-wide transactions a partition's records fetched while its batch is in
    flight wait in a queue for its next batch. A queued result stamped before a request in
    this batch holds the request (it would time the run out first); both are then decided
    in broker-time order. A queued result stamped after it holds nothing."""
    _, task, _, result, late = _records(1_764_640_000_000)
    assert task.apply([late], queued=[result]).events == []
    assert task.held == [late]
    outcome = task.apply([result])
    assert [(e.type, e.request_id) for e in outcome.events] == [
        (EventType.COMPLETED, None),
        (EventType.STARTED, "s2"),
    ]

    _, task, _, result, late = _records(1_764_640_000_000)
    queued_after = InputRecord(
        "results", "p.results", 0, 0, late.timestamp_ms + 1, result.key, result.value
    )
    outcome = task.apply([late], queued=[queued_after])
    assert [e.type for e in outcome.events] == [EventType.TIMED_OUT, EventType.STARTED]


def test_time_does_not_pass_a_record_queued_for_the_next_batch() -> None:
    """A batch's time does not move past a record queued for the next batch: a start of
    another job type 10 s in (past the run's deadline) does not time the run out at the
    batch's end while its result, stamped 1 s in, is queued; without the queue it does."""
    t0 = 1_764_640_000_000
    other = InputRecord(
        "requests", "p.requests", 0, 1, t0 + 10_000, b"other", b'{"job_type":"other"}'
    )
    _, task, _, result, _ = _records(t0)
    outcome = task.apply([other], wait=False, queued=[result])
    assert [e.type for e in outcome.events] == [EventType.STARTED]
    assert [e.type for e in task.apply([result]).events] == [EventType.COMPLETED]

    _, task, _, result, _ = _records(t0)
    outcome = task.apply([other], wait=False)
    assert sorted(e.type for e in outcome.events) == [EventType.STARTED, EventType.TIMED_OUT]
