"""The log set-up: one format, and a library's repeated lines kept readable."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections import Counter
from datetime import timedelta
from pathlib import Path

import structlog
from aiokafka import AIOKafkaProducer

from schemas import DeadLetter, EventType
from tests.chaos import WorkerProcess
from worker.client.watch import StatusTail
from worker.core.config import JobsConfig
from worker.core.lifecycle import Limits
from worker.core.limits import InputLimits
from worker.devtools.bench import start_body
from worker.engine.codec import InputRecord
from worker.engine.task import PartitionTask, Rules
from worker.logs import REPEAT_BURST, LibraryNoise, Repeats, configure
from worker.settings import Settings


def _record(name: str, msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_a_repeated_library_line_is_shown_once_per_window_with_a_count() -> None:
    """An outage's hundred identical aiokafka lines become one, then one saying how many
    were left out; our own lines are never held back."""
    now = [0.0]
    noise = LibraryNoise(window=10, clock=lambda: now[0])
    template = 'Unable connect to "%s:%s": %s'
    shown = [noise.filter(_record("aiokafka", template, "h", 1, "refused")) for _ in range(100)]
    assert shown.count(True) == 1
    now[0] = 10.5
    later = _record("aiokafka", template, "h", 1, "refused")
    assert noise.filter(later)
    assert later.getMessage().endswith("(and 99 more like it in 10 s)")
    assert all(noise.filter(_record("worker", "batch failed")) for _ in range(5))


def test_a_coordinator_being_elected_is_not_an_error_line() -> None:
    """aiokafka retries GroupCoordinatorNotAvailableError at start; it is not shown."""
    noise = LibraryNoise()
    line = "Group Coordinator Request failed: [Error 15] GroupCoordinatorNotAvailableError"
    assert not noise.filter(_record("aiokafka.consumer.group_coordinator", line))


async def test_the_worker_logs_what_it_decided_at_info_level(
    topics: Settings, producer: AIOKafkaProducer, tmp_path: Path
) -> None:
    """`jobctl run` logs, at info level, a line with the events it decided by type and the
    dead letters by reason since the last such line, and none while idle."""
    worker = WorkerProcess(topics, "summary", tmp_path, log_summary_s="0.5")
    try:
        async with StatusTail(topics.bootstrap_servers, topics.topics) as tail:
            worker.start()
            for n in range(3):
                body = {"job_type": f"daily-{n}", "request_id": f"r{n}"}
                await producer.send_and_wait(
                    topics.topics.requests, json.dumps(body).encode(), key=f"daily-{n}".encode()
                )
            await producer.send_and_wait(topics.topics.requests, b"{oops", key=b"daily-0")
            for n in range(3):
                await tail.wait_event(request_id=f"r{n}", timeout=60)
            await tail.wait_for(lambda item: isinstance(item, DeadLetter), timeout=60)

            def summed() -> tuple[Counter[str], Counter[str]]:
                events: Counter[str] = Counter()
                letters: Counter[str] = Counter()
                for line in worker.log_text().splitlines():
                    entry = json.loads(line) if line.startswith("{") else {}
                    if entry.get("event") == "decided" and entry.get("level") == "info":
                        events.update(entry["events"])
                        letters.update(entry["dead_letters"])
                return events, letters

            async with asyncio.timeout(30):
                while summed() != (Counter(started=3), Counter(malformed_json=1)):  # noqa: ASYNC110
                    await asyncio.sleep(0.1)  # the worker writes its log file on its own
            assert await worker.terminate() == 0
    finally:
        worker.ensure_dead()


def test_a_library_exception_in_json_logs_carries_its_traceback() -> None:
    """In JSON format an exception logged by a library through the standard library (as
    aiokafka logs its failures) is one JSON line whose `exception` holds the traceback, as
    one logged through structlog is, not the repr of its exc_info tuple."""
    out = io.StringIO()
    configure("info", "json", stream=out)

    def connect() -> None:
        raise ConnectionError("broker went away")

    try:
        connect()
    except ConnectionError:
        logging.getLogger("aiokafka.conn").error("cannot connect", exc_info=True)
        structlog.get_logger("worker").exception("cannot connect")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["cannot connect", "cannot connect"]
    for line in lines:
        assert "exc_info" not in line, line
        assert line["exception"].startswith("Traceback (most recent call last)"), line
        assert "in connect" in line["exception"]
        assert line["exception"].rstrip().endswith("ConnectionError: broker went away")


def _decide_one_start(level: str) -> list[dict[str, object]]:
    out = io.StringIO()
    configure(level, "json", stream=out)
    try:
        rules = Rules(1, JobsConfig(), Limits(), InputLimits(), timedelta(days=1))
        task = PartitionTask(0, rules)
        body = start_body("daily", "r1")
        record = InputRecord("requests", "jobs.requests", 0, 7, 1_700_000_000_000, b"daily", body)
        outcome = task.apply([record])
        assert [e.type for e in outcome.events] == [EventType.STARTED]
    finally:
        configure("info", "json", stream=io.StringIO())
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_each_decision_is_a_debug_line_at_debug_level_only() -> None:
    """At debug level a partition's task logs each event it decides (type, job type, run,
    offset); at info level it logs none."""
    lines = [line for line in _decide_one_start("debug") if line["event"] == "decided"]
    assert len(lines) == 1
    line = lines[0]
    assert (line["type"], line["job_type"], line["offset"], line["partition"]) == (
        "started",
        "daily",
        7,
        0,
    )
    assert isinstance(line["run_id"], str)
    assert line["run_id"]
    assert [line for line in _decide_one_start("info") if line["event"] == "decided"] == []


def test_a_flood_of_one_warning_is_a_few_lines_then_a_count() -> None:
    """The worker's own warnings of one kind (event and reason code): the first few of a
    window are shown, then none; the next one shown, a window later, counts those left
    out. Another kind, and info lines, are never held back by them."""
    now = [0.0]
    repeats = Repeats(window=10, burst=3, clock=lambda: now[0])

    def shown(method: str, **fields: object) -> dict[str, object] | None:
        try:
            return repeats(None, method, dict(fields))
        except structlog.DropEvent:
            return None

    flood = [shown("warning", event="dead-lettered", code="malformed_json") for _ in range(50)]
    assert sum(line is not None for line in flood) == 3
    assert all("left_out" not in line for line in flood if line is not None)
    assert shown("warning", event="dead-lettered", code="too_deep") is not None
    assert all(shown("info", event="decided") is not None for _ in range(10))
    now[0] = 10.0
    later = shown("warning", event="dead-lettered", code="malformed_json")
    assert later is not None
    assert later["left_out"] == 47


def test_a_partition_fed_garbage_logs_a_few_dead_letters_and_decides_on() -> None:
    """Thousands of bad records in a batch make thousands of dead letters but only
    `REPEAT_BURST` warning lines; `verify`'s quiet task logs none."""
    out = io.StringIO()
    configure("info", "json", stream=out)
    try:
        rules = Rules(1, JobsConfig(), Limits(), InputLimits(), timedelta(days=1))
        garbage = [
            InputRecord("requests", "jobs.requests", 0, n, 1_700_000_000_000, b"x", b"\xff{")
            for n in range(2_000)
        ]
        good = InputRecord(
            "requests",
            "jobs.requests",
            0,
            2_000,
            1_700_000_000_000,
            b"daily",
            start_body("daily", "r1"),
        )
        outcome = PartitionTask(0, rules).apply([*garbage, good])
        assert len(outcome.dead_letters) == 2_000
        assert [e.type for e in outcome.events] == [EventType.STARTED]
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        letters = [line for line in lines if line["event"] == "dead-lettered"]
        assert len(letters) == REPEAT_BURST
        assert {line["code"] for line in letters} == {"malformed_json"}
        out = io.StringIO()
        configure("info", "json", stream=out)  # a limiter of its own, nothing seen yet
        quiet = PartitionTask(0, rules)
        quiet.quiet = True
        assert len(quiet.apply(garbage[:3]).dead_letters) == 3
        assert "dead-lettered" not in out.getvalue()
    finally:
        configure("info", "json", stream=io.StringIO())
