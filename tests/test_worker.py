"""The worker end to end on a real broker: decisions, records in SQLite, bad input."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas import DeadLetter, EventType, RunStatus
from tests.chaos import read_topic
from tests.conftest import RunningWorker
from worker.client.watch import Item, StatusTail
from worker.core.runid import RUN_ID_RE
from worker.engine.codec import partition_for
from worker.engine.loop import Worker
from worker.engine.store import Store
from worker.engine.topics import TopicError, wait_for_leaders
from worker.settings import Settings

pytestmark = pytest.mark.kafka


async def request(
    producer: AIOKafkaProducer, settings: Settings, job_type: str, **fields: Any
) -> str:
    """Send a start request keyed by its job type; return its request ID."""
    request_id = str(uuid.uuid4())
    body = {"job_type": job_type, "request_id": request_id, **fields}
    await producer.send_and_wait(
        settings.topics.requests, json.dumps(body).encode(), key=job_type.encode()
    )
    return request_id


async def result(
    producer: AIOKafkaProducer,
    settings: Settings,
    job_type: str,
    run_id: str,
    status: str = "COMPLETED",
    metrics: dict[str, Any] | None = None,
) -> str:
    """Send an executor result keyed by its job type; return its request ID."""
    request_id = str(uuid.uuid4())
    body = {
        "job_type": job_type,
        "run_id": run_id,
        "status": status,
        "final_metrics": metrics or {},
        "request_id": request_id,
    }
    await producer.send_and_wait(
        settings.topics.results, json.dumps(body).encode(), key=job_type.encode()
    )
    return request_id


async def stored_runs(settings: Settings) -> dict[str, Any]:
    """run ID -> row, from the worker's SQLite file."""
    store = await Store.open(settings.db_path)
    try:
        return {r.run_id: r for r in await store.runs()}
    finally:
        await store.close()


async def test_start_gets_a_run_id_of_the_documented_format(
    worker: RunningWorker, producer: AIOKafkaProducer, tail: StatusTail, topics: Settings
) -> None:
    """A start request is answered by `started` with a run ID from the broker time and offset."""
    request_id = await request(producer, topics, "report.daily", initial_data={"day": 1})
    started = await tail.wait_event(request_id=request_id)
    assert started.type is EventType.STARTED
    assert started.status is RunStatus.RUNNING
    assert started.initial_data == {"day": 1}
    assert started.run_id is not None
    match = RUN_ID_RE.match(started.run_id)
    assert match is not None
    assert int(match.group(3)) == partition_for(b"report.daily", 2)
    assert started.source is not None
    assert int(match.group(4)) == started.source.offset
    assert started.started_at is not None
    assert started.started_at.strftime("%y%m%d-%H%M%S") == f"{match.group(1)}-{match.group(2)}"


async def test_second_start_is_refused_with_the_running_run(
    worker: RunningWorker, producer: AIOKafkaProducer, tail: StatusTail, topics: Settings
) -> None:
    """A second start of a running job type is refused and names the running run."""
    first = await tail.wait_event(request_id=await request(producer, topics, "sync"))
    second = await tail.wait_event(request_id=await request(producer, topics, "sync"))
    assert second.type is EventType.REFUSED
    assert second.run_id == first.run_id
    assert second.started_at == first.started_at
    assert second.status is RunStatus.RUNNING
    await worker.stop()
    assert list(await stored_runs(topics)) == [first.run_id]


async def test_results_complete_and_fail_runs_with_their_metrics(
    worker: RunningWorker, producer: AIOKafkaProducer, tail: StatusTail, topics: Settings
) -> None:
    """Results end runs `completed` or `failed`, and SQLite records status and metrics."""
    ok = await tail.wait_event(request_id=await request(producer, topics, "ok-job"))
    bad = await tail.wait_event(request_id=await request(producer, topics, "bad-job"))
    assert ok.run_id is not None
    assert bad.run_id is not None
    done = await tail.wait_event(
        request_id=await result(producer, topics, "ok-job", ok.run_id, metrics={"rows": 7})
    )
    failed = await tail.wait_event(
        request_id=await result(
            producer, topics, "bad-job", bad.run_id, "FAILED", {"error": "disk full"}
        )
    )
    assert (done.type, done.status, done.metrics) == (
        EventType.COMPLETED,
        RunStatus.COMPLETED,
        {"rows": 7},
    )
    assert done.from_status is RunStatus.RUNNING
    assert (failed.type, failed.status) == (EventType.FAILED, RunStatus.FAILED)
    # The slot is free again: a new start of the completed type starts a new run.
    again = await tail.wait_event(request_id=await request(producer, topics, "ok-job"))
    assert again.type is EventType.STARTED
    assert again.run_id != ok.run_id
    await worker.stop()
    runs = await stored_runs(topics)
    assert runs[ok.run_id].status is RunStatus.COMPLETED
    assert runs[ok.run_id].metrics == {"rows": 7}
    assert runs[ok.run_id].ended_at == done.occurred_at
    assert runs[bad.run_id].status is RunStatus.FAILED
    assert runs[bad.run_id].metrics == {"error": "disk full"}
    assert runs[again.run_id].status is RunStatus.RUNNING


async def test_an_idle_job_types_state_is_loaded_again_when_named(
    worker: RunningWorker, producer: AIOKafkaProducer, tail: StatusTail, topics: Settings
) -> None:
    """A job type without runs leaves memory after its batch; the next record naming it
    loads its state back: a repeated request is a duplicate, a late result is rejected with
    the run's end, and a new start starts."""
    first = await request(producer, topics, "nightly")
    started = await tail.wait_event(request_id=first)
    assert started.run_id is not None
    done = await tail.wait_event(
        request_id=await result(producer, topics, "nightly", started.run_id)
    )
    assert done.type is EventType.COMPLETED
    body = {"job_type": "nightly", "request_id": first}
    await producer.send_and_wait(topics.topics.requests, json.dumps(body).encode(), key=b"nightly")
    duplicate = await tail.wait_event(request_id=first, type=EventType.DUPLICATE)
    assert (duplicate.run_id, duplicate.status) == (started.run_id, RunStatus.COMPLETED)
    late = await tail.wait_event(
        request_id=await result(producer, topics, "nightly", started.run_id)
    )
    assert late.type is EventType.REJECTED
    assert late.reason == f"run {started.run_id} already ended COMPLETED"
    again = await tail.wait_event(request_id=await request(producer, topics, "nightly"))
    assert again.type is EventType.STARTED
    assert again.run_id != started.run_id


async def test_bad_input_is_dead_lettered_and_processing_goes_on(
    worker: RunningWorker, producer: AIOKafkaProducer, tail: StatusTail, topics: Settings
) -> None:
    """Malformed, invalid and inapplicable input gets a reason; valid input after it still flows."""
    t = topics.topics
    running = await tail.wait_event(request_id=await request(producer, topics, "etl"))
    junk = await producer.send_and_wait(t.requests, b"{not json", key=b"etl")
    invalid_id = str(uuid.uuid4())
    invalid = await producer.send_and_wait(
        t.requests,
        json.dumps({"job_type": "etl", "request_id": invalid_id, "intial_data": {}}).encode(),
        key=b"etl",
    )
    unknown_id = await result(producer, topics, "etl", "261128-101010-0.424242")
    after = await request(producer, topics, "etl-next")

    def letter_at(offset: int) -> Any:
        def match(item: Item) -> bool:
            return isinstance(item, DeadLetter) and item.source.offset == offset

        return match

    malformed = await tail.wait_for(letter_at(junk.offset))
    assert isinstance(malformed, DeadLetter)
    assert malformed.reason.code == "malformed_json"
    assert malformed.source.topic == t.requests
    assert malformed.source.partition == junk.partition
    schema_letter = await tail.wait_for(letter_at(invalid.offset))
    assert isinstance(schema_letter, DeadLetter)
    assert schema_letter.reason.code == "schema_invalid"
    assert "intial_data" in schema_letter.reason.message
    rejected = await tail.wait_event(request_id=invalid_id)
    assert rejected.type is EventType.REJECTED
    assert rejected.reason is not None
    assert "intial_data" in rejected.reason
    unknown = await tail.wait_event(request_id=unknown_id)
    assert unknown.type is EventType.REJECTED
    assert unknown.reason is not None
    assert "unknown run" in unknown.reason
    assert (await tail.wait_event(request_id=after)).type is EventType.STARTED

    await worker.stop()
    runs = await stored_runs(topics)
    assert sorted(r.job_type for r in runs.values()) == ["etl", "etl-next"]
    assert runs[running.run_id].status is RunStatus.RUNNING  # untouched by the bogus result


async def test_oversized_records_are_dead_lettered(
    topics: Settings, producer: AIOKafkaProducer, tail: StatusTail
) -> None:
    """A record over JOBS_MAX_RECORD_BYTES is dead-lettered with its size and the limit."""
    running = await RunningWorker(topics.model_copy(update={"max_record_bytes": 2000})).start()
    try:
        big = await producer.send_and_wait(
            topics.topics.requests,
            json.dumps({"job_type": "big", "initial_data": {"blob": "x" * 5000}}).encode(),
            key=b"big",
        )
        letter = await tail.wait_for(
            lambda i: isinstance(i, DeadLetter) and i.source.offset == big.offset
        )
        assert isinstance(letter, DeadLetter)
        assert letter.reason.code == "oversized"
        assert "2000" in letter.reason.message
        assert letter.value is not None
        assert len(letter.value) > 5000  # the original bytes are kept, base64
    finally:
        await running.stop()


async def test_state_survives_a_restart(
    topics: Settings, producer: AIOKafkaProducer, tail: StatusTail
) -> None:
    """After a restart on the same SQLite file the running run still blocks a second start."""
    first_worker = await RunningWorker(topics).start()
    first = await tail.wait_event(request_id=await request(producer, topics, "nightly"))
    await first_worker.stop()
    second_worker = await RunningWorker(topics).start()
    try:
        refused = await tail.wait_event(request_id=await request(producer, topics, "nightly"))
        assert refused.type is EventType.REFUSED
        assert refused.run_id == first.run_id
    finally:
        await second_worker.stop()
    # Each input was decided once: no event was published twice.
    ids = [e.event_id for e in tail.events]
    assert len(ids) == len(set(ids))


async def _start_up_error(settings: Settings, new: list[NewTopic]) -> str:
    """Create `new` as they are, then the message a worker's start-up fails with."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics(new)
        await wait_for_leaders(admin, [t.name for t in new])
    finally:
        await admin.close()
    with pytest.raises(TopicError) as caught:
        await Worker(settings).run()
    return str(caught.value)


async def test_start_up_refuses_mismatched_partition_counts(settings: Settings) -> None:
    """The worker refuses to start when the five topics differ in partition count, naming them."""
    t = settings.topics
    message = await _start_up_error(
        settings, [NewTopic(name, 3 if name == t.results else 2, 1) for name in t.all()]
    )
    assert f"{t.results}=3" in message
    assert f"{t.requests}=2" in message


async def test_start_up_refuses_input_topics_stamped_by_producers(settings: Settings) -> None:
    """An input topic with CreateTime (the broker default) stops start-up, named, with the
    fix; producers' clocks would otherwise set run IDs, time-outs and the decision order."""
    t = settings.topics
    broker_time = {"message.timestamp.type": "LogAppendTime"}
    message = await _start_up_error(
        settings,
        [
            NewTopic(name, 2, 1, topic_configs=broker_time if name == t.requests else {})
            for name in t.all()
        ],
    )
    assert f"{t.results} (CreateTime)" in message
    assert t.requests not in message
    assert "LogAppendTime" in message


@pytest.fixture(params=["exactly_once", "at_least_once"])
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """Every test of this module runs under both processing guarantees."""
    return settings.model_copy(update={"processing_guarantee": request.param})


async def test_ended_runs_are_tombstoned_and_a_fresh_owner_continues(
    topics: Settings, producer: AIOKafkaProducer, tail: StatusTail, tmp_path: Path
) -> None:
    """Ended runs leave the changelog after retention; a fresh SQLite file restores the rest."""
    brief = topics.model_copy(update={"run_retention_s": 0.001})
    first = await RunningWorker(brief).start()
    done = await tail.wait_event(request_id=await request(producer, topics, "tomb"))
    assert done.run_id is not None
    await tail.wait_event(request_id=await result(producer, topics, "tomb", done.run_id))
    active = await tail.wait_event(request_id=await request(producer, topics, "tomb"))
    await first.stop()

    rows = await read_topic(topics.bootstrap_servers, topics.topics.state)
    latest = {r.key: r.value for records in rows.values() for r in records}
    assert latest[done.run_id.encode()] is None  # tombstoned
    assert active.run_id is not None
    assert latest[active.run_id.encode()] is not None

    fresh = brief.model_copy(update={"db_path": tmp_path / "fresh.db"})
    second = await RunningWorker(fresh).start()
    try:
        refused = await tail.wait_event(request_id=await request(producer, topics, "tomb"))
        assert (refused.type, refused.run_id) == (EventType.REFUSED, active.run_id)
    finally:
        await second.stop()
    store = await Store.open(fresh.db_path)
    try:
        assert [r.run_id for r in await store.runs()] == [active.run_id]
    finally:
        await store.close()
