"""Holes found in the core, tried on the real broker through a worker: what a client sees
once the idempotency and ended windows have moved on, what records stamped by a stepped
broker clock do to a partition's time, and what a re-routed start copied by a crash is."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from schemas import EventType, StatusEvent
from tests.conftest import RunningWorker, create_topics
from worker.client import JobClient, JobRejectedError
from worker.client.watch import StatusTail
from worker.engine.codec import REROUTED_FROM, partition_for
from worker.kafkaio import connection
from worker.settings import Settings

pytestmark = pytest.mark.kafka


async def test_a_start_retried_after_its_window_is_still_its_own_run(topics: Settings) -> None:
    """The request that started the run left the idempotency window (2 decisions) while the
    run is still active: its retry is a `duplicate` naming that run, not a refusal naming
    the retry's own run as the one in the way."""
    narrow = topics.model_copy(update={"idempotency_window": 2})
    worker = await RunningWorker(narrow).start()
    try:
        async with JobClient(narrow) as client:
            first = await client.start_job("report", request_id="first")
            assert first.started
            for n in range(3):  # refused, each recorded: "first" leaves the window
                refused = await client.start_job("report", request_id=f"other-{n}")
                assert refused.type is EventType.REFUSED
            retried = await client.start_job("report", request_id="first")
            assert retried.event.type is EventType.DUPLICATE
            assert retried.run_id == first.run_id
            assert retried.started
    finally:
        await worker.stop()


async def test_client_ids_differing_in_case_share_one_scope(
    topics: Settings, tmp_path: Path
) -> None:
    """Under job_type+client scope, `Acme` and `acme` are one client, as their run IDs' one
    suffix says: the second start is refused, not a second run with the same suffix."""
    config = tmp_path / "jobs.toml"
    config.write_text('[defaults]\nscope = "job_type+client"\n')
    scoped = topics.model_copy(update={"config": config})
    worker = await RunningWorker(scoped).start()
    try:
        async with JobClient(scoped) as client:
            first = await client.start_job("report", client_id="Acme")
            assert first.started
            assert str(first.run_id).endswith("-acme")
            second = await client.start_job("report", client_id=" acme")
            assert second.type is EventType.REFUSED
            assert second.running_run_id == first.run_id
            other = await client.start_job("report", client_id="bob")
            assert other.started
    finally:
        await worker.stop()


async def test_a_late_result_for_a_forgotten_run_says_what_was_checked(
    topics: Settings,
) -> None:
    """With an ended window of 1, a second ended run evicts the first: a late result for the
    first is rejected saying it is not active, not queued and not among the last ended runs
    (not "unknown run" alone)."""
    narrow = topics.model_copy(update={"ended_window": 1})
    worker = await RunningWorker(narrow).start()
    try:
        async with JobClient(narrow) as client:
            first = await client.start_job("report")
            await client.complete_job("report", str(first.run_id))
            second = await client.start_job("report")
            await client.complete_job("report", str(second.run_id))
            with pytest.raises(JobRejectedError) as rejected:
                await client.fail_job("report", str(first.run_id))
            reason = rejected.value.event.reason or ""
            assert "not active, not queued, and not among its last 1 ended runs" in reason
            with pytest.raises(JobRejectedError, match="already ended COMPLETED"):
                await client.fail_job("report", str(second.run_id))
    finally:
        await worker.stop()


async def test_a_seed_style_id_is_refused_once_a_run_of_its_second_may_be_forgotten(
    topics: Settings, tmp_path: Path
) -> None:
    """Two runs whose requests share one second ended; a third pushes the first out of an
    ended window of 2. The seed-style ID (`YYMMDD-HHMMSS`) then matches only the second
    run, but may have meant the first: it is refused asking for the full run ID, where it
    used to land on the second run."""
    config = tmp_path / "jobs.toml"
    config.write_text('[defaults]\npolicy = "queue"\n')
    narrow = topics.model_copy(update={"ended_window": 2, "config": config})
    worker = await RunningWorker(narrow).start()
    try:
        async with JobClient(narrow) as client:
            if time.time() % 1 > 0.5:  # both requests inside one second of broker time
                await asyncio.sleep(1.01 - time.time() % 1)
            first_request = await client.start_job("report", wait=False)
            second_request = await client.start_job("report", wait=False)
            first = await client.start_job("report", request_id=first_request)
            second = await client.start_job("report", request_id=second_request)
            assert (first.type, second.type) == (EventType.STARTED, EventType.QUEUED)
            seed = str(first.run_id)[:13]  # YYMMDD-HHMMSS
            assert str(second.run_id).startswith(seed)
            await client.complete_job("report", str(first.run_id))
            await client.complete_job("report", str(second.run_id))
            with pytest.raises(JobRejectedError, match="ambiguous"):
                await client.complete_job("report", seed)
            await asyncio.sleep(1.01 - time.time() % 1)  # a run of the next second
            third = await client.start_job("report")
            assert not str(third.run_id).startswith(seed)
            await client.complete_job("report", str(third.run_id))  # evicts the first
            with pytest.raises(JobRejectedError, match="give the full run ID"):
                await client.complete_job("report", seed)
            with pytest.raises(JobRejectedError, match="already ended COMPLETED"):
                await client.complete_job("report", str(second.run_id))
    finally:
        await worker.stop()


async def _send_stamped(settings: Settings, body: dict[str, object], at: datetime) -> None:
    """Append a result-topic record stamped `at` (the topic switched to CreateTime), as a
    broker whose clock stepped would stamp it."""
    producer = AIOKafkaProducer(**connection(settings))
    await producer.start()
    try:
        value = json.dumps(body).encode()
        key = str(body["job_type"]).encode()
        stamp = int(at.timestamp() * 1000)
        await producer.send_and_wait(settings.topics.results, value, key=key, timestamp_ms=stamp)
    finally:
        await producer.stop()


async def _stamp_results_by_producer(settings: Settings) -> None:
    """Let the test stamp result records: the results topic switched to CreateTime after the
    worker checked it at start-up."""
    admin = AIOKafkaAdminClient(**connection(settings))
    await admin.start()
    try:
        config = {"message.timestamp.type": "CreateTime"}
        resource = ConfigResource(ConfigResourceType.TOPIC, settings.topics.results, config)
        await admin.alter_configs([resource])
    finally:
        await admin.close()


async def test_reports_stamped_by_a_stepped_broker_clock_move_no_run_s_time(
    settings: Settings, tmp_path: Path
) -> None:
    """A broker clock that steps back two minutes (a leader on a slow clock): a result
    stamped then starts the queued run at the partition's time, not before its own request
    (it used to start overdue and time out at once), and a heartbeat stamped then leaves the
    deadline where it was. A clock 30 minutes ahead moves the partition's time only to the
    worker's clock plus `JOBS_MAX_CLOCK_SKEW_S`: a run with a ten-minute timeout lives on."""
    config = tmp_path / "jobs.toml"
    config.write_text(
        '[job_types.report]\npolicy = "queue"\ntimeout = 60\n[job_types.long]\ntimeout = 600\n'
    )
    settings = settings.model_copy(update={"config": config, "tick_s": 0.2})
    await create_topics(settings, 1)
    worker = await RunningWorker(settings).start()
    try:
        async with (
            JobClient(settings) as client,
            StatusTail(settings.bootstrap_servers, settings.topics) as tail,
        ):
            long = await client.start_job("long")
            first = await client.start_job("report")
            second = await client.start_job("report")
            assert second.type is EventType.QUEUED
            await _stamp_results_by_producer(settings)
            back = datetime.now(UTC) - timedelta(minutes=2)
            result = {"kind": "result", "request_id": "r1", "job_type": "report"}
            result |= {"run_id": str(first.run_id), "status": "COMPLETED", "final_metrics": {}}
            await _send_stamped(settings, result, back)
            started = await tail.wait_event(run_id=second.run_id, type=EventType.STARTED)
            assert started.started_at is not None
            assert started.started_at >= second.event.occurred_at  # not before its request
            beat = {"kind": "progress", "request_id": "b1", "job_type": "report"}
            await _send_stamped(settings, beat | {"run_id": str(second.run_id)}, back)
            probe = await client.start_job("report")  # decided after the heartbeat
            assert probe.type is EventType.QUEUED  # the second run still runs
            assert not [e for e in tail.events if e.type is EventType.TIMED_OUT]

            ahead = datetime.now(UTC) + timedelta(minutes=30)
            beat = {"kind": "progress", "request_id": "b2", "job_type": "report"}
            await _send_stamped(settings, beat | {"run_id": str(second.run_id)}, ahead)
            again = await client.start_job("long")  # decided after the stamp ahead
            assert again.type is EventType.REFUSED
            assert again.running_run_id == long.run_id
    finally:
        await worker.stop()


async def test_a_re_routed_copy_left_by_a_crash_is_the_same_request(topics: Settings) -> None:
    """At least once, a crash between re-routing a start and committing its offset re-routes
    it again: two copies of one start sent without a `request_id` reach the job type's
    partition. The second is a `duplicate` of the first's run, not a request of its own (it
    used to take its own coordinates as its ID: refused, or under `queue` a second run)."""
    guarantee = topics.model_copy(update={"processing_guarantee": "at_least_once"})
    worker = await RunningWorker(guarantee).start()
    producer = AIOKafkaProducer(**connection(topics))
    await producer.start()
    try:
        async with StatusTail(topics.bootstrap_servers, topics.topics) as tail:
            key = b"report"
            wrong = 1 - partition_for(key, 2)
            body = json.dumps({"kind": "start", "job_type": "report"}).encode()
            sent = await producer.send_and_wait(
                topics.topics.requests, body, key=key, partition=wrong
            )
            started = await tail.wait_event(type=EventType.STARTED, job_type="report")
            # The copy the re-route after a crash writes: the same bytes and origin header.
            origin = f"{topics.topics.requests}:{sent.partition}:{sent.offset}".encode()
            await producer.send_and_wait(
                topics.topics.requests,
                body,
                key=key,
                partition=partition_for(key, 2),
                headers=[(REROUTED_FROM, origin)],
            )
            copy = await tail.wait_for(
                lambda e: isinstance(e, StatusEvent) and e.event_id != started.event_id
            )
            assert isinstance(copy, StatusEvent)
            assert (copy.type, copy.run_id) == (EventType.DUPLICATE, started.run_id)
            assert copy.request_id == started.request_id == f"auto-{wrong}.{sent.offset}"
    finally:
        await producer.stop()
        await worker.stop()
