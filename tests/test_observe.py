"""The worker's HTTP endpoints and metrics, on `jobctl run` against the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import random
import socket
from pathlib import Path

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer

from schemas import DeadLetter, EventType
from tests.chaos import WorkerProcess
from tests.conftest import RunningWorker, create_topics
from worker import compiled
from worker.client.watch import StatusTail
from worker.devtools.localkafka import LocalKafka
from worker.engine.hooks import Hooks
from worker.settings import Settings

pytestmark = pytest.mark.kafka


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as response:
        return response.status, await response.text()


_HOSTILE_HTTP = [
    random.Random(5).randbytes(2000),
    b"GET /healthz\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /metrics?" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 100_000 + b"\r\n\r\n",
    b"GET /%00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n[[[[[",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET /healthz HTTP/9.9\r\n\r\n",
]


async def _raw(port: int, request: bytes) -> bytes:
    """What the server answers `request`, sent as raw bytes on a connection of its own."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request + b"\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read(200)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_health_readiness_and_metrics(
    settings: Settings, producer: AIOKafkaProducer, tmp_path: Path
) -> None:
    """/healthz answers, /readyz turns 200 once the partitions are taken, and /metrics counts
    the events and dead letters the worker published, by type and reason code."""
    await create_topics(settings, 2)
    port = _free_port()
    worker = WorkerProcess(
        settings.model_copy(update={"http_port": port}), "http", tmp_path, http_host="127.0.0.1"
    )
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
            # Hostile bytes to the HTTP server: each answered 4xx (or the connection closed),
            # and the worker goes on answering and deciding (the start below).
            for answer in [await _raw(port, request) for request in _HOSTILE_HTTP]:
                assert answer == b"" or answer.split(b" ", 2)[1][:1] == b"4", answer[:200]
            assert worker.alive(), worker.log_text()[-3000:]
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
        assert 'jobs_commits_total{result="committed"}' in text
        assert "jobs_commit_seconds_count" in text
        assert "jobs_ready 1.0" in text
        assert "jobs_partitions_owned 2.0" in text
        # The worker runs the code this process runs: compiled under `make test`.
        assert f"jobs_compiled {1.0 if compiled.state() == 'compiled' else 0.0}" in text
        assert 'jobs_consumer_lag{input="requests",partition="0"}' in text
        assert "etl" not in text  # no label names a job type
        # Failures have a series before the first one, at 0, for rates and alerts.
        assert 'jobs_batches_total{outcome="failed"} 0.0' in text
        assert 'jobs_commits_total{result="aborted"} 0.0' in text
        assert 'jobs_dead_letters_total{code="too_deep"} 0.0' in text
        assert 'jobs_status_events_total{type="timed_out"} 0.0' in text
        assert "_created" not in text
        # The process's own series: its memory, CPU and the interpreter's collections.
        assert "process_resident_memory_bytes" in text
        assert "process_cpu_seconds_total" in text
        assert "python_gc_collections_total" in text
        assert "jobs_sqlite_backlog 0.0" in text  # written by now, whatever the last batch set
        assert await worker.terminate() == 0
    finally:
        worker.ensure_dead()


async def test_an_aborted_transaction_is_counted_and_its_batch_retried(
    topics: Settings, tail: StatusTail, producer: AIOKafkaProducer
) -> None:
    """A transaction that fails before its commit counts as aborted; the retried batch
    commits, and the start is decided once."""
    from aiokafka.errors import KafkaTimeoutError

    failures = []

    def fail_once(point: str) -> None:
        if point == "in_transaction" and not failures:
            failures.append(point)
            raise KafkaTimeoutError("injected: the broker did not answer in time")

    running = await RunningWorker(topics, Hooks(at_point=fail_once)).start()
    try:
        body = json.dumps({"job_type": "etl", "request_id": "a1"}).encode()
        await producer.send_and_wait(topics.topics.requests, body, key=b"etl")
        assert (await tail.wait_event(request_id="a1")).type is EventType.STARTED
        registry = running.worker.metrics.registry
        assert registry.get_sample_value("jobs_commits_total", {"result": "aborted"}) == 1.0
        # The retried batch; with worker-wide transactions an idle partition's tick commits
        # its offsets again too.
        committed = registry.get_sample_value("jobs_commits_total", {"result": "committed"})
        assert committed is not None
        assert committed >= 1.0
        assert [e.type for e in tail.events if e.request_id == "a1"] == [EventType.STARTED]
    finally:
        await running.stop()


async def test_a_retry_that_cannot_take_its_partition_again_stops_the_worker(
    topics: Settings, tail: StatusTail, producer: AIOKafkaProducer
) -> None:
    """A batch fails (the broker times out) and its retry cannot take the partition again
    for a reason no retry mends: the worker stops with that error at once. It used to leave
    the partition owned and unserved (its producer closed, its batch task dead with an
    error nobody read) until a later record happened to reach it. A worker started after
    it decides the start once."""
    import sqlite3

    from aiokafka.errors import KafkaTimeoutError

    failures: list[str] = []

    def fail_once(point: str) -> None:
        if point == "in_transaction" and not failures:
            failures.append(point)
            raise KafkaTimeoutError("injected: the broker did not answer in time")

    unread: list[BaseException] = []
    loop = asyncio.get_running_loop()
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unread.append(context["exception"]))
    running = await RunningWorker(topics, Hooks(at_point=fail_once)).start()
    partitions = running.worker._partitions
    assert partitions is not None

    async def unreadable(number: int) -> dict[str, int]:
        raise sqlite3.OperationalError("injected: disk I/O error")

    partitions._position = unreadable  # type: ignore[method-assign]
    body = json.dumps({"job_type": "etl", "request_id": "r1"}).encode()
    await producer.send_and_wait(topics.topics.requests, body, key=b"etl")
    try:
        with pytest.raises(sqlite3.OperationalError, match="injected"):
            await running.stopped(within=15)
        gc.collect()  # a task that died with an error nobody read reports it when freed
    finally:
        loop.set_exception_handler(handler)
    assert failures == ["in_transaction"]
    assert unread == []
    again = await RunningWorker(topics).start()
    try:
        assert (await tail.wait_event(request_id="r1")).type is EventType.STARTED
    finally:
        await again.stop()
    assert [e.type for e in tail.events if e.request_id == "r1"] == [EventType.STARTED]


async def test_not_ready_while_the_broker_does_not_answer(tmp_path: Path) -> None:
    """A hung broker (SIGSTOP): /readyz says 503 with the reason within seconds while
    /healthz stays 200; once the broker is back, ready again."""
    broker = LocalKafka(data_dir=tmp_path / "kafka")
    await asyncio.to_thread(broker.start)
    port = _free_port()
    settings = Settings(
        bootstrap_servers=broker.bootstrap_servers,
        topic_prefix="probe",
        db_path=tmp_path / "worker.db",
        http_port=port,
        poll_timeout_ms=100,
    )
    running: RunningWorker | None = None
    try:
        await create_topics(settings, 1)
        running = await RunningWorker(settings).start()
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:

            async def readiness_becomes(status: int, within: float) -> str:
                async with asyncio.timeout(within):
                    while True:
                        got, body = await _get(session, f"{base}/readyz")
                        if got == status:
                            return body
                        await asyncio.sleep(0.2)  # polls an HTTP endpoint: nothing to await

            await readiness_becomes(200, 30)
            await asyncio.to_thread(broker.freeze)
            try:
                body = await readiness_becomes(503, 15)
                assert "the broker does not answer: no answer within 2 s" in body
                assert (await _get(session, f"{base}/healthz"))[0] == 200
                # The gauge says what /readyz says, whichever was asked last.
                assert "jobs_ready 0.0" in (await _get(session, f"{base}/metrics"))[1]
            finally:
                await asyncio.to_thread(broker.thaw)
            await readiness_becomes(200, 60)
            assert "jobs_ready 1.0" in (await _get(session, f"{base}/metrics"))[1]
    finally:
        if running is not None:
            await running.stop()
        await asyncio.to_thread(broker.stop)


async def test_a_taken_http_port_stops_the_worker_with_one_line(
    settings: Settings, tmp_path: Path
) -> None:
    """Another program on JOBS_HTTP_PORT: the worker exits 1 with one line naming the
    setting, not a traceback."""
    await create_topics(settings, 1)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        worker = WorkerProcess(settings.model_copy(update={"http_port": port}), "port", tmp_path)
        worker.start()
        try:
            assert await worker.wait_exit() == 1
        finally:
            worker.ensure_dead()
    text = worker.log_text()
    assert "Traceback" not in text
    assert f"cannot serve the HTTP endpoints on port {port} (JOBS_HTTP_PORT)" in text
    assert "address already in use" in text.lower()
    # An address no interface of this host has (TEST-NET-3): the same, naming it.
    worker.start(http_host="203.0.113.7", http_port=str(_free_port()))
    try:
        assert await worker.wait_exit() == 1
    finally:
        worker.ensure_dead()
    assert "on 203.0.113.7 (JOBS_HTTP_HOST), port" in worker.log_text()
    assert "Traceback" not in worker.log_text()


async def test_the_worker_says_when_the_broker_stops_answering_and_when_it_answers_again() -> None:
    """One warning when the probe first fails (not one per probe), one info line with how
    long it lasted when it answers again, nothing while nothing changes."""
    from aiokafka.errors import KafkaConnectionError

    from worker.engine.observe import BrokerWatch, SharedProbe
    from worker.logs import configure

    answers = [True, False, False, False, True, True]

    async def probe() -> None:
        if not answers.pop(0):
            raise KafkaConnectionError("Unable to bootstrap from [('10.0.0.9', 9092)]")

    watch = BrokerWatch(SharedProbe(probe, fresh_s=0))  # a fresh answer at each check
    out = io.StringIO()
    configure("info", "json", stream=out)
    try:
        for _ in range(6):
            await watch.check()
    finally:
        configure("info", "json", stream=io.StringIO())
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(line["event"], line["level"]) for line in lines] == [
        ("the broker does not answer; the worker waits for it", "warning"),
        ("the broker answers again", "info"),
    ]
    assert "Unable to bootstrap" in lines[0]["reason"]
    assert lines[1]["after_s"] >= 0


def test_the_dead_letter_series_made_at_start_are_the_readmes_codes() -> None:
    """The codes whose series start at 0 are the table of README's "Bad input and dead
    letters", no more and no fewer: a code added to one without the other fails here."""
    import re

    from worker.engine.observe import DEAD_LETTER_CODES

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Bad input and dead letters", 1)[1].split("\n## ", 1)[0]
    table = re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE)
    assert sorted(table) == sorted(DEAD_LETTER_CODES)


async def test_a_flood_of_probes_asks_the_broker_once_a_second() -> None:
    """Fifty readiness checks at once ask the broker once and all get its answer; within a
    second the answer is given again; a second later the broker is asked anew; an asker that
    goes away does not cancel the others' answer."""
    from worker.engine.observe import SharedProbe

    asked = 0
    answering = asyncio.Event()
    now = [100.0]

    async def probe() -> None:
        nonlocal asked
        asked += 1
        await answering.wait()
        if asked > 1:
            raise ConnectionError("broker gone")

    shared = SharedProbe(probe, fresh_s=1.0, clock=lambda: now[0])
    askers = [asyncio.create_task(shared()) for _ in range(50)]
    await asyncio.sleep(0)
    askers[0].cancel()  # a closed request
    answering.set()
    answers = await asyncio.gather(*askers[1:])
    assert (asked, set(answers)) == (1, {None})
    now[0] += 0.5
    assert await shared() is None
    assert asked == 1
    now[0] += 0.6
    assert await shared() == "broker gone"
    assert asked == 2


async def test_a_probe_that_fails_after_every_asker_left_leaves_no_unretrieved_error() -> None:
    """The shared probe's failure is retrieved even when no asker waits for it any more:
    no "exception was never retrieved" in the worker's log."""
    from worker.engine.observe import SharedProbe

    reported: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    failing = asyncio.Event()

    async def probe() -> None:
        await failing.wait()
        raise RuntimeError("not a Kafka error")

    shared = SharedProbe(probe)
    asker = asyncio.create_task(shared())
    await asyncio.sleep(0)
    asker.cancel()
    failing.set()
    with contextlib.suppress(asyncio.CancelledError):
        await asker
    for _ in range(3):
        await asyncio.sleep(0)
    del shared, asker
    gc.collect()
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert not [c for c in reported if "never retrieved" in str(c.get("message"))], reported
