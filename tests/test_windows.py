"""Job rows in the changelog stay small: the idempotency and ended-runs windows are an entry
per row, and run payloads stay in the run rows, rather than all rewritten in every job row;
a new owner restores them exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas import EventType
from tests.conftest import RunningWorker, create_topics
from worker.client import JobClient, JobRejectedError
from worker.client.watch import StatusTail
from worker.kafkaio import connection, read_until
from worker.settings import Settings

pytestmark = pytest.mark.kafka

REFUSALS = 120


async def _state_rows(settings: Settings) -> list[tuple[bytes, bytes | None]]:
    """Every committed record of the (one-partition) state topic, in order."""
    consumer = AIOKafkaConsumer(isolation_level="read_committed", **connection(settings))
    await consumer.start()
    try:
        tp = TopicPartition(settings.topics.state, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        rows = []
        async for _, records in read_until(consumer, {tp: end}, max_records=1_000):
            rows.extend((r.key, r.value) for r in records)
        return rows
    finally:
        await consumer.stop()


async def test_job_rows_stay_small_and_a_new_owner_restores_both_windows(
    settings: Settings, tmp_path: Path
) -> None:
    """A job type with a long idempotency window: each decision's job row is about a
    kilobyte, not the window (it was over 10 KB here at 120 entries). A worker with an
    empty SQLite file takes over, restores from the changelog, and answers from both
    windows as the first did: old requests are duplicates, an ended run stays ended."""
    config = tmp_path / "jobs.toml"
    config.write_text("[job_types.report]\ntimeout = 600\n")  # a heartbeat renews it
    settings = settings.model_copy(update={"config": config})
    await create_topics(settings, 1)
    first = await RunningWorker(settings).start()
    try:
        async with JobClient(settings) as client:
            running = await client.start_job("report", request_id="first")
            done = await client.start_job("audit")
            await client.complete_job("audit", str(done.run_id))
            for n in range(REFUSALS):
                refused = await client.start_job("report", request_id=f"other-{n}")
                assert refused.type is EventType.REFUSED
            await client.report_progress("report", str(running.run_id))  # a heartbeat
            await client.start_job("audit")  # decided after it: it has been recorded
    finally:
        await first.stop()

    rows = await _state_rows(settings)
    job_rows = [value for key, value in rows if key == b"report" and value is not None]
    assert len(job_rows) == 1 + REFUSALS + 1  # the start, the refusals, the heartbeat
    assert max(len(value) for value in job_rows) < 2_000
    entries = [key for key, value in rows if key.startswith(b"\x00wd\x00") and value]
    assert len(entries) == 1 + REFUSALS + 2  # a row per decision remembered, "audit"'s too

    heir = settings.model_copy(update={"db_path": tmp_path / "heir.db"})
    second = await RunningWorker(heir).start()
    try:
        async with JobClient(heir) as client:
            again = await client.start_job("report", request_id="other-7")
            assert again.event.type is EventType.DUPLICATE
            assert again.event.original_type is EventType.REFUSED
            original = await client.start_job("report", request_id="first")
            assert original.event.type is EventType.DUPLICATE
            assert original.run_id == running.run_id
            assert original.started
            with pytest.raises(JobRejectedError, match="already ended COMPLETED"):
                await client.fail_job("audit", str(done.run_id))
    finally:
        await second.stop()


async def test_queued_payloads_stay_out_of_job_rows_and_survive_a_restore(
    settings: Settings, tmp_path: Path
) -> None:
    """Three starts of 30 KB each (one running, two queued): no job row carries them, a
    heartbeat's included; a worker with an empty SQLite file takes over and starts the
    queued runs with their payloads, taken from their run rows."""
    config = tmp_path / "jobs.toml"
    config.write_text('[job_types.report]\npolicy = "queue"\ntimeout = 600\n')
    settings = settings.model_copy(update={"config": config})
    await create_topics(settings, 1)
    payloads = [{"n": n, "blob": str(n) * 30_000} for n in range(3)]
    first = await RunningWorker(settings).start()
    try:
        async with JobClient(settings) as client:
            runs = [await client.start_job("report", initial_data=p) for p in payloads]
            assert [r.type for r in runs] == [EventType.STARTED, *[EventType.QUEUED] * 2]
            await client.report_progress("report", str(runs[0].run_id))  # a heartbeat
            await client.start_job("audit")  # decided after it: it has been recorded
    finally:
        await first.stop()
    rows = await _state_rows(settings)
    job_rows = [value for key, value in rows if key == b"report" and value is not None]
    assert len(job_rows) == 4  # three starts and the heartbeat
    assert max(len(value) for value in job_rows) < 2_000

    heir = settings.model_copy(update={"db_path": tmp_path / "heir.db"})
    second = await RunningWorker(heir).start()
    try:
        async with (
            JobClient(heir) as client,
            StatusTail(heir.bootstrap_servers, heir.topics) as tail,
        ):
            await client.complete_job("report", str(runs[0].run_id))
            started = await tail.wait_event(run_id=runs[1].run_id, type=EventType.STARTED)
            assert started.initial_data == payloads[1]
            await client.cancel_job("report", str(runs[1].run_id))
            started = await tail.wait_event(run_id=runs[2].run_id, type=EventType.STARTED)
            assert started.initial_data == payloads[2]
    finally:
        await second.stop()
