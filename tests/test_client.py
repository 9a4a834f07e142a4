"""JobClient, the executor helper and the jobctl client commands, on the real broker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from typer.testing import CliRunner

from schemas import EventType, RunStatus, StatusEvent
from tests.chaos import end_offsets
from tests.conftest import RunningWorker
from worker.audit.replay import replay
from worker.cli import app
from worker.client import (
    ClientNotOpenError,
    JobClient,
    JobConnectionError,
    JobInvalidError,
    JobRejectedError,
    JobTimeoutError,
    SettingsError,
)
from worker.client.executor import Executor, RunContext
from worker.client.watch import StatusTail
from worker.engine.store import Store
from worker.settings import Settings

pytestmark = pytest.mark.kafka


@pytest.fixture
async def client(topics: Settings) -> AsyncIterator[JobClient]:
    """A client on this test's topics."""
    async with JobClient(topics) as instance:
        yield instance


async def test_start_refuse_inspect_and_complete(worker: RunningWorker, client: JobClient) -> None:
    """The seed's calls: start, refused second start, running info, completion."""
    first = await client.start_job("sync", initial_data={"day": 1})
    assert first.started
    assert first.run_id is not None
    second = await client.start_job("sync")
    assert second.already_running
    assert second.run_id is None  # not the caller's run
    assert second.running_run_id == first.run_id
    assert second.running is not None
    assert (second.running.run_id, dict(second.running.initial_data)) == (first.run_id, {"day": 1})
    assert await client.is_job_running("sync")
    info = await client.get_running_job_info("sync")
    assert info is not None
    assert (info.run_id, dict(info.initial_data)) == (first.run_id, {"day": 1})
    done = await client.complete_job("sync", first.run_id, {"rows": 3})
    assert done is not None
    assert (done.type, done.metrics) == (EventType.COMPLETED, {"rows": 3})
    assert not await client.is_job_running("sync")
    assert await client.get_running_job_info("sync") is None


async def test_fail_cancel_and_rejections(worker: RunningWorker, client: JobClient) -> None:
    """fail_job records the error; cancel_job cancels; an unknown run raises JobRejectedError."""
    run = await client.start_job("etl")
    assert run.run_id is not None
    failed = await client.fail_job("etl", run.run_id, error=ValueError("disk full"))
    assert failed is not None
    assert failed.status is RunStatus.FAILED
    assert failed.metrics == {"error": "ValueError('disk full')"}
    again = await client.start_job("etl")
    cancelled = await client.cancel_job("etl", reason="not today")
    assert cancelled is not None
    assert (cancelled.type, cancelled.run_id, cancelled.reason) == (
        EventType.CANCELLED,
        again.run_id,
        "not today",
    )
    with pytest.raises(JobRejectedError, match="unknown run"):
        await client.complete_job("etl", "261128-000000-0.424242")


async def test_start_without_worker_times_out_and_retry_is_safe(
    topics: Settings, client: JobClient
) -> None:
    """With no worker, start_job times out; retried with its request ID it starts one run."""
    with pytest.raises(JobTimeoutError, match="retry-1") as caught:
        await client.start_job("nightly", timeout=1, request_id="retry-1")
    assert "safe" in str(caught.value)
    running = await RunningWorker(topics).start()
    try:
        decision = await client.start_job("nightly", request_id="retry-1")
        assert decision.type is EventType.STARTED  # a retry answered with the original, too
        assert decision.started
        info = await client.get_running_job_info("nightly")
        assert info is not None
        assert info.run_id == decision.run_id
        assert info.request_id == "retry-1"
    finally:
        await running.stop()


async def test_progress_reports_are_published(
    worker: RunningWorker, client: JobClient, tail: StatusTail
) -> None:
    """report_progress with metrics yields a `progress` event for the run."""
    run = await client.start_job("long")
    assert run.run_id is not None
    await client.report_progress("long", run.run_id, {"done": 0.5})
    event = await tail.wait_event(run_id=run.run_id, type=EventType.PROGRESS)
    assert event.metrics == {"done": 0.5}


async def test_executor_completes_fails_cancels_and_reports_progress(
    worker: RunningWorker, client: JobClient, tail: StatusTail
) -> None:
    """Return completes, raise fails, a cancel reaches the coroutine, progress is published."""
    executor = Executor(client)
    cancelled = asyncio.Event()
    blocked = asyncio.Event()

    @executor.job("ok")
    async def ok(run: RunContext) -> dict[str, Any]:
        await run.progress({"half": True})
        return {"echo": run.initial_data["n"]}

    @executor.job("boom")
    async def boom(run: RunContext) -> None:
        raise RuntimeError("exploded")

    @executor.job("forever")
    async def forever(run: RunContext) -> None:
        blocked.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    stop = asyncio.Event()
    task = asyncio.create_task(executor.run(stop))
    try:
        await asyncio.wait_for(executor.ready.wait(), 30)
        ok_run = await client.start_job("ok", initial_data={"n": 7})
        boom_run = await client.start_job("boom")
        forever_run = await client.start_job("forever")
        done = await tail.wait_event(run_id=ok_run.run_id, type=EventType.COMPLETED)
        assert done.metrics == {"echo": 7}
        half = await tail.wait_event(run_id=ok_run.run_id, type=EventType.PROGRESS)
        assert half.metrics == {"half": True}
        failed = await tail.wait_event(run_id=boom_run.run_id, type=EventType.FAILED)
        assert failed.metrics == {"error": "RuntimeError('exploded')"}
        await asyncio.wait_for(blocked.wait(), 30)
        await client.cancel_job("forever", forever_run.run_id)
        await asyncio.wait_for(cancelled.wait(), 30)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_tail_that_keeps_nothing_hands_every_event_over_and_holds_none(
    topics: Settings, producer: AIOKafkaProducer
) -> None:
    """`jobctl watch`'s tail: every event reaches `on_item`, in order, and none is kept, so
    a watch left running (or reading a long history) does not grow; one that keeps (the
    default) holds them all."""
    at = datetime(2026, 12, 4, tzinfo=UTC)
    count = 300
    for n in range(count):
        event = StatusEvent(
            event_id=f"e{n}",
            type=EventType.STARTED,
            status=RunStatus.RUNNING,
            request_id=f"req-{n}",
            job_type="report",
            run_id=f"261204-000000-0.{n}",
            started_at=at,
            occurred_at=at,
        )
        await producer.send(topics.topics.status, event.model_dump_json().encode(), partition=0)
    await producer.send_and_wait(topics.topics.status, b"\xff not json", partition=0)
    seen: list[str] = []
    all_seen = asyncio.Event()

    def take(item: Any) -> None:
        seen.append(item.event_id)
        if len(seen) == count:
            all_seen.set()

    with pytest.raises(ValueError, match="needs on_item"):
        StatusTail(topics.bootstrap_servers, topics.topics, keep=False)
    async with StatusTail(
        topics.bootstrap_servers, topics.topics, on_item=take, keep=False
    ) as following:
        await asyncio.wait_for(all_seen.wait(), 30)
        assert seen == [f"e{n}" for n in range(count)]
        assert following.items == []
        with pytest.raises(RuntimeError, match="keeps no items"):
            await following.wait_for(lambda item: True, timeout=1)
    async with StatusTail(topics.bootstrap_servers, topics.topics) as keeping:
        await keeping.wait_event(event_id=f"e{count - 1}")
        assert len(keeping.items) == count


async def _cli(*args: str) -> Any:
    # The CLI runs its own event loop, so it runs in a thread here.
    return await asyncio.to_thread(CliRunner().invoke, app, list(args))


async def test_cli_submit_status_complete_runs_and_watch(
    worker: RunningWorker, topics: Settings
) -> None:
    """submit, status, complete, fail, cancel, runs and watch: output and exit codes."""
    base = ["-b", topics.bootstrap_servers, "--prefix", topics.topic_prefix]
    submitted = await _cli(
        "submit", "report", "--client-id", "Acme", "--data", '{"day": 2}', "--json", *base
    )
    assert submitted.exit_code == 0, submitted.output
    started = json.loads(submitted.output)
    assert started["type"] == "started"
    refused = await _cli("submit", "report", *base)
    assert refused.exit_code == 3
    assert "refused" in refused.output
    bad = await _cli("submit", "report", "--data", "[1,", *base)
    assert bad.exit_code == 2  # a usage error
    assert "--data is not valid JSON" in bad.output
    shown = await _cli("status", "--json", *base)
    assert [r["run_id"] for r in json.loads(shown.output)] == [started["run_id"]]
    completed = await _cli(
        "complete", "report", started["run_id"], "--metrics", '{"rows": 5}', *base
    )
    assert completed.exit_code == 0, completed.output
    assert "completed" in completed.output
    rejected = await _cli("fail", "report", started["run_id"], *base)
    assert rejected.exit_code == 1
    assert "already ended" in rejected.output
    nothing = await _cli("cancel", "--job-type", "report", *base)
    assert nothing.exit_code == 1
    assert "nothing to cancel" in nothing.output
    watched = await _cli("watch", "--from-beginning", "--count", "2", "--json", *base)
    assert watched.exit_code == 0, watched.output
    types = [json.loads(line)["type"] for line in watched.output.splitlines()]
    assert types == ["started", "refused"]
    # a client ID as the worker compares it: in any case, trimmed
    acme = await _cli("watch", "--from-beginning", "--count", "1", "--client-id", " ACME", *base)
    assert acme.exit_code == 0, acme.output
    assert started["run_id"] in acme.output
    await worker.stop()
    history = await _cli("runs", "--db", str(topics.db_path), "--json", "--status", "completed")
    assert history.exit_code == 0, history.output
    rows = json.loads(history.output)
    assert [(r["run_id"], r["metrics"]) for r in rows] == [(started["run_id"], {"rows": 5})]
    missing = await _cli("runs", "--db", str(topics.db_path) + ".missing")
    assert missing.exit_code == 1
    assert "does not exist" in missing.output


async def test_cli_without_worker_says_so_and_times_out_with_exit_4(topics: Settings) -> None:
    """`submit` with no worker: a warning at once, then after --timeout exit code 4 (not
    Click's usage code 2), with a retry hint the command can follow."""
    base = ["-b", topics.bootstrap_servers, "--prefix", topics.topic_prefix]
    result = await _cli("submit", "x", "--timeout", "1", *base)
    assert result.exit_code == 4
    assert "no worker is running" in result.output
    assert "no answer" in result.output
    assert "Retrying with --request-id " in result.output
    assert "request_id=" not in result.output


BAD_JOB_TYPES = ["K" * 201, "", "a\x1bb", "two\nlines"]


@pytest.mark.parametrize("job_type", BAD_JOB_TYPES)
async def test_a_request_the_worker_would_dead_letter_is_refused_before_it_is_sent(
    topics: Settings, client: JobClient, job_type: str
) -> None:
    """A job type the wire models refuse (too long, empty, a control character, spaces
    around it): each call says which field and why at once, sends nothing (the worker
    would dead-letter it and no answer would ever come), and `jobctl submit` exits 2."""
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: client.start_job(job_type, timeout=1),
        lambda: client.start_job("etl", request_id="a\x01b", timeout=1),
        lambda: client.start_job("etl", request_id="auto-0.1", timeout=1),  # the worker's
        lambda: client.cancel_job(job_type, timeout=1),
        lambda: client.complete_job(job_type, "260101-000000-0.1", timeout=1),
        lambda: client.report_progress(job_type, "260101-000000-0.1", {"done": 1}),
    ]
    for call in calls:
        with pytest.raises(JobInvalidError, match=r"not sent: (job_type|request_id)"):
            await call()
    ends = await _end_offsets(topics)
    assert ends == {topics.topics.requests: 0, topics.topics.results: 0}
    base = ["-b", topics.bootstrap_servers, "--prefix", topics.topic_prefix]
    result = await _cli("submit", job_type, "--timeout", "30", *base)
    assert result.exit_code == 2, result.output
    assert "job_type" in result.output
    assert "no answer" not in result.output


@pytest.mark.parametrize("timeout", [None, 0, -1, float("nan"), float("inf"), "5"])
async def test_a_timeout_that_is_no_positive_number_is_refused_before_anything_is_sent(
    topics: Settings, client: JobClient, timeout: Any
) -> None:
    """`timeout=None` (or 0, NaN, a string) is a clear error at once, naming `timeout`, not
    a failure deep inside the wait or an answer that never comes; nothing is sent."""
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: client.start_job("etl", timeout=timeout),
        lambda: client.cancel_job("etl", timeout=timeout),
        lambda: client.complete_job("etl", "260101-000000-0.1", timeout=timeout),
        lambda: client.is_job_running("etl", timeout=timeout),
        lambda: client.running_jobs(timeout=timeout),
    ]
    for call in calls:
        with pytest.raises((TypeError, ValueError), match=r"^timeout must be"):
            await call()
    ends = await _end_offsets(topics)
    assert ends == {topics.topics.requests: 0, topics.topics.results: 0}


async def test_a_timeout_of_any_real_number_type_is_taken(
    topics: Settings, client: JobClient
) -> None:
    """A Fraction (or numpy's numbers) is a number of seconds like a float: no worker
    answers here, so the wait ends after it with JobTimeoutError."""
    from fractions import Fraction

    with pytest.raises(JobTimeoutError, match=r"within 0\.5s"):
        await client.start_job("etl", timeout=Fraction(1, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not inf"):
        await client.start_job("etl", timeout=10**5000)


async def test_an_unknown_keyword_names_the_setting_it_may_have_meant() -> None:
    """`JobClient(bootstrap=...)` is a TypeError as Python gives one for an unknown
    keyword, with the setting's name when one is close; settings that cannot work a
    `SettingsError` that keeps no value given; a known keyword still works."""
    with pytest.raises(TypeError, match="'bootstrap'; did you mean 'bootstrap_servers'"):
        JobClient(bootstrap="kafka:9092")
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'colour'$"):
        JobClient(colour="blue")
    with pytest.raises(SettingsError) as refused:
        JobClient(security_protocol="SASL_PLAINTEXT", sasl_password="S3cret-pw")
    assert str(refused.value) == "bad settings: SASL_PLAINTEXT needs JOBS_SASL_USERNAME"
    assert isinstance(refused.value, ValueError)
    seen = f"{refused.value!r} {refused.value.__context__!r} {refused.value.__cause__!r}"
    assert "S3cret-pw" not in seen  # nothing of the values given is kept
    made = JobClient(bootstrap_servers="kafka:1234")
    assert made.settings.bootstrap_servers == "kafka:1234"
    await made.close()


async def test_padded_ids_and_bad_data_are_answered_as_the_worker_reads_them(
    worker: RunningWorker, client: JobClient
) -> None:
    """A request ID or job type with spaces around it is decided trimmed, and the caller
    gets that answer (it waited for the untrimmed ID before); data that is no mapping, or
    NaN, is refused before it is sent; a client ID matches in any case, as the worker's
    scopes do."""
    decision = await client.start_job(" padded.job\t", client_id="Acme", request_id=" lead ")
    assert decision.type is EventType.STARTED
    assert decision.request_id == "lead"
    assert await client.is_job_running("padded.job", client_id="acme")
    assert await client.get_running_job_info(" padded.job ", client_id="ACME ") is not None
    for data in ([1, 2], "abc"):
        with pytest.raises(JobInvalidError, match="initial_data must be a mapping"):
            await client.start_job("etl", initial_data=data)  # type: ignore[arg-type]
    with pytest.raises(JobInvalidError, match="not JSON"):
        await client.start_job("etl", initial_data={"x": float("nan")})


async def _end_offsets(topics: Settings) -> dict[str, int]:
    """Records on each input topic, summed over its partitions."""
    consumer = AIOKafkaConsumer(bootstrap_servers=topics.bootstrap_servers)
    await consumer.start()
    try:
        inputs = [topics.topics.requests, topics.topics.results]
        ends = await end_offsets(consumer, inputs)
        return {topic: sum(n for tp, n in ends.items() if tp.topic == topic) for topic in inputs}
    finally:
        await consumer.stop()


async def test_the_running_view_follows_run_rows_only(topics: Settings) -> None:
    """Run rows make the view: RUNNING adds, an end or a tombstone removes; job-type rows
    (the worker's private state) and text that only looks like a status are not trusted."""
    from datetime import UTC, datetime

    from schemas import RUN_ROW_PREFIX, RunRecord

    def row(run_id: str, status: RunStatus, data: dict[str, Any]) -> bytes:
        record = RunRecord(
            run_id=run_id,
            job_type="etl",
            client_id=None,
            request_id=f"req-{run_id}",
            status=status,
            partition=0,
            started_at=datetime(2026, 12, 1, tzinfo=UTC),
            ended_at=None,
            initial_data=data,
            metrics=None,
            reason=None,
        )
        return RUN_ROW_PREFIX + record.model_dump_json().encode() + b"}"

    async with JobClient(topics) as client:
        _fold_rows(client, row)
        assert [run.run_id for run in client.view.runs()] == ["r4"]


def _fold_rows(client: JobClient, row: Any) -> None:
    client.view.fold(b"etl", b'{"row":"job","state":{"job_type":"etl","active":[]}}')
    client.view.fold(b"r1", row("r1", RunStatus.RUNNING, {}))
    client.view.fold(b"r2", row("r2", RunStatus.RUNNING, {}))
    client.view.fold(b"r3", row("r3", RunStatus.COMPLETED, {"note": '"status":"RUNNING"'}))
    client.view.fold(b"r1", row("r1", RunStatus.COMPLETED, {}))
    client.view.fold(b"r2", None)
    # As rows were spelled before the version field.
    client.view.fold(b"r4", b'{"row":"run","run":' + row("r4", RunStatus.RUNNING, {})[25:])


async def test_wait_false_errors_and_misuse_name_the_request(
    worker: RunningWorker, topics: Settings
) -> None:
    """wait=False gives the request ID; errors carry it; a closed client says how to open."""
    jobs = JobClient(topics)
    with pytest.raises(ClientNotOpenError, match="async with JobClient"):
        await jobs.start_job("sync")
    async with jobs:
        request_id = await jobs.start_job("sync", wait=False)
        assert isinstance(request_id, str)
        decision = await jobs.start_job("sync", request_id=request_id)
        assert decision.started  # the same request, answered with its decision
        again = await jobs.start_job("sync", request_id=request_id)
        assert (again.retried, again.started, again.run_id) == (True, True, decision.run_id)
        assert await jobs.is_run_running(decision.run_id or "")
        with pytest.raises(JobRejectedError) as rejected:
            await jobs.complete_job("sync", "261128-000000-0.1", request_id="mine-1")
        assert rejected.value.request_id == "mine-1"
    with pytest.raises(ClientNotOpenError):
        await jobs.is_job_running("sync")
    with pytest.raises(JobConnectionError, match="was closed; make a new one"):
        await jobs.open()


async def test_a_client_that_fails_to_open_leaves_nothing_open(settings: Settings) -> None:
    """Topics missing: open raises the client's connection error saying what to check,
    and no connection or task is left behind."""
    before = asyncio.all_tasks()
    with pytest.raises(JobConnectionError, match="does not exist; is the prefix") as failed:
        async with JobClient(settings):
            pass
    assert "jobctl topics create" in str(failed.value)
    assert asyncio.all_tasks() - before == set()


async def test_a_timeout_carries_the_request_id(topics: Settings, client: JobClient) -> None:
    """No worker: JobTimeoutError names the request, to retry it safely."""
    with pytest.raises(JobTimeoutError) as caught:
        await client.start_job("nightly", timeout=0.5, request_id="late-1")
    assert caught.value.request_id == "late-1"


async def test_cli_cancels_a_queued_run_by_its_id(topics: Settings, tmp_path: Path) -> None:
    """`jobctl cancel RUN_ID` reaches a queued run (not in the running view) through the start
    request its ID names; the running run goes on. An ID nothing matches says what to give."""
    queue = tmp_path / "queue.toml"
    queue.write_text('[defaults]\npolicy = "queue"\n')
    running = await RunningWorker(topics.model_copy(update={"config": queue})).start()
    base = ["-b", topics.bootstrap_servers, "--prefix", topics.topic_prefix]
    try:
        async with JobClient(topics) as client:
            first = await client.start_job("report")
            waiting = await client.start_job("report")
            assert waiting.type == "queued"
            assert waiting.run_id is not None
            cancelled = await _cli("cancel", waiting.run_id, "--json", *base)
            assert cancelled.exit_code == 0, cancelled.output
            event = json.loads(cancelled.output)
            assert (event["type"], event["run_id"]) == ("cancelled", waiting.run_id)
            assert [r.run_id for r in await client.running_jobs()] == [first.run_id]
        for nothing in ["261202-101010-1.999999", "261202-101010-99999.1"]:
            unknown = await _cli("cancel", nothing, *base)
            assert unknown.exit_code == 1
            assert "no such run was ever started; check the run ID" in unknown.output
        for nothing in ["x" * 5000, "\udcff"]:
            unknown = await _cli("cancel", nothing, *base)
            assert unknown.exit_code == 2
            assert "is not a run ID" in unknown.output
    finally:
        await running.stop()


async def test_status_shows_queued_runs_through_a_handover_and_replay_agrees(
    topics: Settings, tmp_path: Path
) -> None:
    """Queued runs have run rows: `jobctl status` lists them beside the running one, a new
    owner (its own SQLite file, so restored from the changelog) still knows them, cancels one
    while queued and starts the other, and a replay of the status topic gives the same rows."""
    queue = tmp_path / "queue.toml"
    queue.write_text('[defaults]\npolicy = "queue"\n')
    first_owner = topics.model_copy(update={"config": queue, "db_path": tmp_path / "a.db"})
    base = ["-b", topics.bootstrap_servers, "--prefix", topics.topic_prefix]
    running = await RunningWorker(first_owner).start()
    try:
        async with JobClient(topics) as client:
            first = await client.start_job("report")
            second = await client.start_job("report", initial_data={"n": 2})
            third = await client.start_job("report", client_id="acme")
            assert (second.type, third.type) == ("queued", "queued")
            queued = await client.queued_jobs()
            assert [(q.run_id, dict(q.initial_data)) for q in queued] == [
                (second.run_id, {"n": 2}),
                (third.run_id, {}),
            ]
            assert [r.run_id for r in await client.running_jobs()] == [first.run_id]
        shown = await _cli("status", "--json", *base)
        assert shown.exit_code == 0, shown.output
        assert [(r["run_id"], r["status"]) for r in json.loads(shown.output)] == [
            (first.run_id, "RUNNING"),
            (second.run_id, "QUEUED"),
            (third.run_id, "QUEUED"),
        ]
        table = await _cli("status", *base)
        assert "QUEUED" in table.output
        assert str(third.run_id) in table.output
    finally:
        await running.stop()

    heir = first_owner.model_copy(update={"db_path": tmp_path / "b.db"})
    running = await RunningWorker(heir).start()
    try:
        cancelled = await _cli("cancel", str(second.run_id), "--json", *base)
        assert cancelled.exit_code == 0, cancelled.output
        completed = await _cli("complete", "report", str(first.run_id), *base)
        assert completed.exit_code == 0, completed.output
        async with JobClient(topics) as client:
            assert await client.queued_jobs() == []
            now_running = await client.running_jobs()
            assert [r.run_id for r in now_running] == [third.run_id]
            assert now_running[0].started_at >= third.event.occurred_at  # when it started
    finally:
        await running.stop()

    store = await Store.open(heir.db_path)
    try:
        live = {r.run_id: r for r in await store.runs()}
    finally:
        await store.close()
    assert {run_id: r.status for run_id, r in live.items()} == {
        first.run_id: RunStatus.COMPLETED,
        second.run_id: RunStatus.CANCELLED,
        third.run_id: RunStatus.RUNNING,
    }
    replayed = tmp_path / "replayed.db"
    await replay(topics, replayed, from_offset=0)
    store = await Store.open(replayed)
    try:
        assert {r.run_id: r for r in await store.runs()} == live
    finally:
        await store.close()
