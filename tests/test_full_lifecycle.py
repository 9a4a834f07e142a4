"""The full lifecycle on a real broker: policies, scopes, idempotency, cancellation, progress,
timeouts, re-routing, and replay/verify of the resulting decision log."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from typer.testing import CliRunner

from schemas import DeadLetter, EventType, RunStatus
from tests.conftest import RunningWorker
from worker.cli import app
from worker.client.watch import StatusTail
from worker.engine.codec import partition_for
from worker.engine.store import Store
from worker.settings import Settings

pytestmark = pytest.mark.kafka

CONFIG = """
[defaults]
policy = "reject"

[job_types.queued]
policy = "queue"

[job_types.replaced]
policy = "replace"

[job_types.per-client]
scope = "job_type+client"

[job_types.slow]
timeout = "2s"
"""


@pytest.fixture
async def live(topics: Settings, tmp_path: Path) -> AsyncIterator[tuple[Settings, RunningWorker]]:
    """A worker with per-job-type settings from a TOML file."""
    path = tmp_path / "jobs.toml"
    path.write_text(CONFIG)
    configured = topics.model_copy(update={"config": path, "tick_s": 0.2})
    running = await RunningWorker(configured).start()
    yield configured, running
    await running.stop()


async def send(
    producer: AIOKafkaProducer,
    settings: Settings,
    topic: str,
    body: dict[str, Any],
    partition: int | None = None,
) -> str:
    """Send `body` keyed by its job type; return its request ID."""
    body.setdefault("request_id", str(uuid.uuid4()))
    await producer.send_and_wait(
        topic,
        json.dumps(body).encode(),
        key=body["job_type"].encode(),
        partition=partition,
    )
    return str(body["request_id"])


def start(job_type: str, **fields: Any) -> dict[str, Any]:
    """A start request."""
    return {"job_type": job_type, **fields}


async def test_queue_policy_starts_queued_requests_in_order(
    live: tuple[Settings, RunningWorker], producer: AIOKafkaProducer, tail: StatusTail
) -> None:
    """Under `queue`, later starts are queued and start one by one as runs end."""
    s, _ = live
    t = s.topics
    first = await tail.wait_event(request_id=await send(producer, s, t.requests, start("queued")))
    second_id = await send(producer, s, t.requests, start("queued"))
    third_id = await send(producer, s, t.requests, start("queued"))
    second = await tail.wait_event(request_id=second_id, type=EventType.QUEUED)
    third = await tail.wait_event(request_id=third_id, type=EventType.QUEUED)
    assert second.status is RunStatus.QUEUED
    assert second.run_id is not None
    assert second.run_id != first.run_id
    assert first.run_id is not None
    result = {"job_type": "queued", "run_id": first.run_id, "status": "COMPLETED"}
    await send(producer, s, t.results, result)
    promoted = await tail.wait_event(request_id=second_id, type=EventType.STARTED)
    assert promoted.run_id == second.run_id
    assert promoted.from_status is RunStatus.QUEUED
    assert not [e for e in tail.events if e.request_id == third_id and e.type == "started"]
    cancel = {"kind": "cancel", "job_type": "queued", "run_id": third.run_id}
    cancelled = await tail.wait_event(
        request_id=await send(producer, s, t.requests, cancel), type=EventType.CANCELLED
    )
    assert cancelled.from_status is RunStatus.QUEUED
    assert cancelled.run_id == third.run_id


async def test_replace_policy_cancels_the_active_run(
    live: tuple[Settings, RunningWorker], producer: AIOKafkaProducer, tail: StatusTail
) -> None:
    """Under `replace`, a new start cancels the active run with a reason and starts."""
    s, _ = live
    t = s.topics
    old = await tail.wait_event(request_id=await send(producer, s, t.requests, start("replaced")))
    new_id = await send(producer, s, t.requests, start("replaced"))
    cancelled = await tail.wait_event(request_id=new_id, type=EventType.CANCELLED)
    started = await tail.wait_event(request_id=new_id, type=EventType.STARTED)
    assert cancelled.run_id == old.run_id
    assert cancelled.reason is not None
    assert new_id in cancelled.reason
    assert started.run_id != old.run_id


async def test_client_scope_runs_clients_side_by_side(
    live: tuple[Settings, RunningWorker], producer: AIOKafkaProducer, tail: StatusTail
) -> None:
    """With scope job_type+client, two clients run at once; one client twice is refused."""
    s, _ = live
    t = s.topics
    a = await tail.wait_event(
        request_id=await send(producer, s, t.requests, start("per-client", client_id="Acme"))
    )
    b = await tail.wait_event(
        request_id=await send(producer, s, t.requests, start("per-client", client_id="globex"))
    )
    again = await tail.wait_event(
        request_id=await send(producer, s, t.requests, start("per-client", client_id="Acme"))
    )
    assert (a.type, b.type, again.type) == (
        EventType.STARTED,
        EventType.STARTED,
        EventType.REFUSED,
    )
    assert a.run_id is not None
    assert a.run_id.endswith("-acme")
    assert again.run_id == a.run_id


async def test_repeated_request_id_is_a_duplicate(
    live: tuple[Settings, RunningWorker], producer: AIOKafkaProducer, tail: StatusTail
) -> None:
    """A start sent twice with one request ID gets `duplicate`, never a second run."""
    s, _ = live
    t = s.topics
    body = start("nightly", request_id="retry-me")
    first = await tail.wait_event(request_id=await send(producer, s, t.requests, dict(body)))
    await send(producer, s, t.requests, dict(body))
    duplicate = await tail.wait_event(request_id="retry-me", type=EventType.DUPLICATE)
    assert duplicate.run_id == first.run_id
    assert duplicate.original_type is EventType.STARTED
    started = [e for e in tail.events if e.request_id == "retry-me" and e.type == "started"]
    assert len(started) == 1


async def test_cancel_by_job_type_and_unknown_run(
    live: tuple[Settings, RunningWorker], producer: AIOKafkaProducer, tail: StatusTail
) -> None:
    """Cancelling a job type ends its run; cancelling an unknown run is rejected."""
    s, _ = live
    t = s.topics
    run = await tail.wait_event(request_id=await send(producer, s, t.requests, start("etl")))
    cancelled = await tail.wait_event(
        request_id=await send(producer, s, t.requests, {"kind": "cancel", "job_type": "etl"})
    )
    assert (cancelled.type, cancelled.run_id) == (EventType.CANCELLED, run.run_id)
    unknown = {"kind": "cancel", "job_type": "etl", "run_id": "261128-000000-0.99999"}
    rejected = await tail.wait_event(request_id=await send(producer, s, t.requests, unknown))
    assert rejected.type is EventType.REJECTED
    assert rejected.reason is not None
    assert "unknown run" in rejected.reason


async def test_progress_heartbeat_and_timeout(
    live: tuple[Settings, RunningWorker], producer: AIOKafkaProducer, tail: StatusTail
) -> None:
    """Progress is published, heartbeats are silent, silence past the timeout ends the run."""
    s, _ = live
    t = s.topics
    run = await tail.wait_event(request_id=await send(producer, s, t.requests, start("slow")))
    assert run.run_id is not None
    report = {"kind": "progress", "job_type": "slow", "run_id": run.run_id, "metrics": {"p": 1}}
    progress = await tail.wait_event(request_id=await send(producer, s, t.results, report))
    assert (progress.type, progress.metrics) == (EventType.PROGRESS, {"p": 1})
    beat = {"kind": "progress", "job_type": "slow", "run_id": run.run_id}
    beat_id = await send(producer, s, t.results, beat)
    timed_out = await tail.wait_event(run_id=run.run_id, type=EventType.TIMED_OUT, timeout=30)
    assert timed_out.status is RunStatus.TIMED_OUT
    assert not [e for e in tail.events if e.request_id == beat_id]
    late = {"job_type": "slow", "run_id": run.run_id, "status": "COMPLETED"}
    rejected = await tail.wait_event(request_id=await send(producer, s, t.results, late))
    assert rejected.type is EventType.REJECTED
    assert rejected.reason is not None
    assert "TIMED_OUT" in rejected.reason


async def test_records_on_the_wrong_partition_are_rerouted(
    live: tuple[Settings, RunningWorker], producer: AIOKafkaProducer, tail: StatusTail
) -> None:
    """A start sent to another partition than murmur2's is decided once, by the owner."""
    s, _ = live
    t = s.topics
    right = partition_for(b"misrouted", 2)
    request_id = await send(producer, s, t.requests, start("misrouted"), partition=1 - right)
    started = await tail.wait_event(request_id=request_id)
    assert started.type is EventType.STARTED
    assert started.source is not None
    assert started.source.partition == right
    await send(producer, s, t.requests, start("after-misrouted"))  # the log moves on
    await tail.wait_event(type=EventType.STARTED, job_type="after-misrouted")
    assert len([e for e in tail.events if e.request_id == request_id]) == 1
    assert not [i for i in tail.items if isinstance(i, DeadLetter)]


async def test_replay_and_verify_a_long_mixed_log(
    live: tuple[Settings, RunningWorker],
    producer: AIOKafkaProducer,
    tail: StatusTail,
    tmp_path: Path,
) -> None:
    """A mixed log replays into a store equal to the live one; verify passes, then fails."""
    s, worker = live
    t = s.topics
    last = ""
    for i in range(60):
        job = ["queued", "replaced", "per-client", "plain", "slow"][i % 5]
        rid = await send(producer, s, t.requests, start(job, client_id=f"c{i % 3}"))
        event = await tail.wait_event(request_id=rid)
        if i % 7 == 0:
            await send(producer, s, t.requests, start(job, request_id=rid))  # duplicate
        if event.type == "started" and event.run_id and i % 2 == 0:
            status = "FAILED" if i % 4 == 0 else "COMPLETED"
            body = {"job_type": job, "run_id": event.run_id, "status": status}
            body["final_metrics"] = {"i": i}
            last = await send(producer, s, t.results, body)
        if i % 11 == 0:
            await send(producer, s, t.requests, {"kind": "cancel", "job_type": job})
        if i % 13 == 0:
            await producer.send_and_wait(t.requests, b"{bad json", key=job.encode())
        if i % 17 == 0:
            wrong = 1 - partition_for(job.encode(), 2)
            last = await send(producer, s, t.requests, start(job), partition=wrong)
    await tail.wait_event(request_id=last, timeout=30)
    await worker.stop()

    rebuilt = tmp_path / "rebuilt.db"
    runner = CliRunner()
    args = ["-b", s.bootstrap_servers, "--prefix", s.topic_prefix]
    # The CLI runs its own event loop, so it runs in a thread here.
    replayed = await asyncio.to_thread(
        runner.invoke, app, ["replay", "--db", str(rebuilt), "--from-offset", "0", *args]
    )
    assert replayed.exit_code == 0, replayed.output
    live_store, rebuilt_store = await Store.open(s.db_path), await Store.open(rebuilt)
    try:
        live_runs = await live_store.runs()
        assert len(live_runs) > 20
        assert live_runs == await rebuilt_store.runs()
    finally:
        await live_store.close()
        await rebuilt_store.close()

    config: list[str] = []  # the settings in force are in the log
    verified = await asyncio.to_thread(runner.invoke, app, ["verify", *args, *config])
    assert verified.exit_code == 0, verified.output
    assert "0 divergences" in verified.output

    forged = next(e for e in tail.events if e.type == "completed")
    tampered = forged.model_copy(update={"metrics": {"i": -1}})
    await producer.send_and_wait(
        t.status,
        tampered.model_dump_json().encode(),
        key=forged.job_type.encode(),
        partition=forged.source.partition if forged.source else 0,
    )
    caught = await asyncio.to_thread(runner.invoke, app, ["verify", *args, *config])
    assert caught.exit_code == 1
    assert "1 divergences" in caught.output
