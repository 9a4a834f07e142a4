"""The console (`jobctl serve`): following the status topic, the HTTP API, the event stream.

Against the session's real broker: a real worker's runs, and synthetic status events (the
console reads whatever the status topic holds) where exact times are needed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import pytest
import typer
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from typer.testing import CliRunner
from yarl import URL

from schemas import EventType, RunStatus, StatusEvent
from tests.conftest import RunningWorker, publish_status
from worker.client import JobClient
from worker.console import api as console_api
from worker.console.api import STATIC
from worker.console.command import serve
from worker.console.db import ConsoleDb
from worker.console.follow import _QUEUE_DEPTH, Subscription
from worker.console.params import RunFilter, cursor, run_filter, stored_time
from worker.console.queries import _COUNTS, _NEXT_TYPE, Queries
from worker.console.service import Console
from worker.kafkaio import connection
from worker.settings import Settings

pytestmark = pytest.mark.kafka

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
DEADLINE_S = 30.0

# -- helpers ------------------------------------------------------------------------------


async def until(
    condition: Callable[[], Awaitable[Any]], what: str, timeout: float = DEADLINE_S
) -> Any:
    """Poll `condition` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        found = await condition()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout:g}s")
        await asyncio.sleep(0.05)


class Api:
    """GETs on a console, answering (status, JSON body)."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def get(self, path: str, **query: Any) -> tuple[int, Any]:
        async with self.session.get(self.base + path, params=query or None) as response:
            return response.status, await response.json()

    async def raw(self, target: str) -> tuple[int, bytes]:
        """GET `target` (path and query) exactly as given: no quoting added."""
        url = URL(self.base + target, encoded=True)
        async with self.session.get(url) as response:
            return response.status, await response.read()

    async def ok(self, path: str, **query: Any) -> Any:
        status, body = await self.get(path, **query)
        assert status == 200, body
        return body

    async def all_runs(self, path: str = "/api/runs", **query: Any) -> list[dict[str, Any]]:
        """Every page of `path`, in order."""
        found: list[dict[str, Any]] = []
        page = await self.ok(path, **query)
        while True:
            found += page["runs"]
            if page["next"] is None:
                return found
            page = await self.ok(path, **query, cursor=page["next"])


@pytest.fixture
async def api(console: Console) -> AsyncIterator[Api]:
    """An HTTP client of the console."""
    async with aiohttp.ClientSession() as session:
        yield Api(session, console.url)


def lifecycle(n: int) -> list[StatusEvent]:
    """Synthetic run `n`: three job types, three clients, every ending, some still running."""
    job_type = ["etl", "mail", "report"][n % 3]
    at = T0 + timedelta(minutes=n)
    run_id = f"{at:%y%m%d-%H%M%S}-{n}"
    client = [None, "acme", "umbrella"][n % 4 % 3]
    started = StatusEvent(
        event_id=f"s{n}",
        type=EventType.STARTED,
        status=RunStatus.RUNNING,
        request_id=f"req-{n}",
        job_type=job_type,
        client_id=client,
        run_id=run_id,
        initial_data={"n": n},
        started_at=at,
        occurred_at=at,
    )
    if n % 7 == 0:
        return [started]  # still running
    ending, status = [
        (EventType.COMPLETED, RunStatus.COMPLETED),
        (EventType.COMPLETED, RunStatus.COMPLETED),
        (EventType.FAILED, RunStatus.FAILED),
        (EventType.TIMED_OUT, RunStatus.TIMED_OUT),
        (EventType.CANCELLED, RunStatus.CANCELLED),
    ][n % 5]
    ended = started.model_copy(
        update={
            "event_id": f"e{n}",
            "type": ending,
            "status": status,
            "from_status": RunStatus.RUNNING,
            "initial_data": None,
            "metrics": {"rows": n},
            "occurred_at": at + timedelta(seconds=(n * 37) % 300 + 1),
        }
    )
    return [started, ended]


async def publish(settings: Settings, events: Sequence[StatusEvent]) -> None:
    """Write `events` to the status topic as the worker does: keyed and placed by job type."""
    await publish_status(settings, events, 2)


async def folded(api: Api, events: int) -> None:
    """Wait until the console has folded `events` status events since it started."""

    async def enough() -> bool:
        return bool((await api.ok("/api/status"))["events_folded"] >= events)

    await until(enough, f"the console did not fold {events} events")


def expected(runs: list[StatusEvent], keep: Callable[[StatusEvent], bool]) -> list[str]:
    """The run IDs of started events passing `keep`, newest first."""
    chosen = [e for e in runs if keep(e)]
    chosen.sort(key=lambda e: (stored_time(e.occurred_at), e.run_id or ""), reverse=True)
    return [e.run_id or "" for e in chosen]


# -- following a real worker --------------------------------------------------------------


async def test_follows_the_runs_of_a_real_worker(
    worker: RunningWorker, topics: Settings, api: Api
) -> None:
    """Runs started and completed through a real worker show up running, then ended, with
    their every event; the job type's summary counts them."""
    async with JobClient(topics) as client:
        first = await client.start_job("nightly", "acme", {"day": 1})
        assert first.run_id is not None

        async def listed_running() -> bool:
            running = (await api.ok("/api/runs/running"))["runs"]
            return [r["run_id"] for r in running] == [first.run_id]

        await until(listed_running, "the started run was not listed as running")
        run = await api.ok(f"/api/runs/{first.run_id}")
        assert (run["job_type"], run["client_id"], run["status"]) == ("nightly", "acme", "RUNNING")
        assert run["initial_data"] == {"day": 1}

        await client.complete_job("nightly", first.run_id, {"rows": 12})
        failed = await client.start_job("nightly", "acme")
        assert failed.run_id is not None
        await client.fail_job("nightly", failed.run_id, error="disk full")

    async def ended() -> Any:
        # The console follows the status topic on its own; it may not have read the run yet.
        status, run = await api.get(f"/api/runs/{failed.run_id}")
        return run if status == 200 and run["status"] == "FAILED" else None

    assert (await until(ended, "the failure was not recorded"))["metrics"] == {"error": "disk full"}
    done = await api.ok(f"/api/runs/{first.run_id}")
    assert done["status"] == "COMPLETED"
    assert done["metrics"] == {"rows": 12}
    assert done["duration_s"] >= 0
    assert [e["type"] for e in done["events"]] == ["started", "completed"]
    started_event, completed_event = done["events"]
    assert started_event["source"]["topic"] == topics.topics.requests
    assert completed_event["source"]["topic"] == topics.topics.results
    assert completed_event["metrics"] == {"rows": 12}
    for event in done["events"]:
        assert event["record"]["topic"] == topics.topics.status
        assert event["occurred_at"]
    assert (await api.ok("/api/runs/running"))["runs"] == []
    summary = (await api.ok("/api/job-types"))["job_types"]
    assert [(s["job_type"], s["runs"], s["completed"], s["failures"]) for s in summary] == [
        ("nightly", 2, 1, 1)
    ]
    assert summary[0]["last_run"]["run_id"] == failed.run_id
    status = await api.ok("/api/status")
    assert status["topic"] == topics.topics.status


async def test_resumes_from_the_offsets_it_stored(topics: Settings, tmp_path: Path) -> None:
    """A console restarted on its file reads only what came after; nothing is folded twice."""
    path = tmp_path / "console.db"
    runs = [lifecycle(n) for n in range(1, 7)]
    earlier = [e for run in runs[:3] for e in run]
    await publish(topics, earlier)
    first = await Console(topics, path, port=0).start()
    try:
        async with aiohttp.ClientSession() as session:
            await folded(Api(session, first.url), len(earlier))
    finally:
        await first.stop()

    later = [e for run in runs[3:] for e in run]
    await publish(topics, later)
    second = await Console(topics, path, port=0).start()
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(session, second.url)
            await folded(api, len(later))
            assert second.follower is not None
            await asyncio.wait_for(second.follower.caught_up.wait(), DEADLINE_S)
            assert second.follower.folded == len(later)  # only the new records
            for run in runs:
                assert run[0].run_id is not None
                found = await api.ok(f"/api/runs/{quote(run[0].run_id)}")
                assert [e["type"] for e in found["events"]] == [e.type.value for e in run]
    finally:
        await second.stop()


def misshapen(started: StatusEvent, ending: StatusEvent) -> list[bytes]:
    """Records on the status topic that no reader can fold: bytes that are not a status
    event (random, bad UTF-8, deep nesting, a huge value, wrong types), and status events
    that pass the wire model but not what a fold relies on (a start without its start time,
    an ending without its status, times without an offset or out of any reader's range)."""
    rng = random.Random(11)
    first, last = started.model_dump(mode="json"), ending.model_dump(mode="json")
    shapes: list[dict[str, Any]] = [
        {**first, "started_at": None},
        {**first, "run_id": None},
        {**last, "status": None},
        {**last, "status": "RUNNING"},
        {**last, "run_id": None},
        {**first, "occurred_at": "0001-01-01T00:00:00+05:00"},
        {**first, "occurred_at": "9999-12-31T23:59:59-05:00"},
        {**first, "started_at": "2026-11-20T10:00:00"},
        {**last, "occurred_at": "1969-12-31T23:59:59+00:00"},
        {**first, "job_type": ["etl"]},
        {**first, "initial_data": {"x": "y" * 1_000_000}, "type": "nope"},
    ]
    return [
        bytes(rng.randrange(256) for _ in range(200)),
        b"\xff\xfe{}",
        b"[" * 100_000 + b"]" * 100_000,
        json.dumps({**first, "reason": "[" * 10_000}).encode()[:-1],
        *(json.dumps(shape).encode() for shape in shapes),
    ]


async def test_records_that_are_not_status_events_are_skipped(
    topics: Settings, tmp_path: Path
) -> None:
    """A record on the status topic that cannot be folded (see `misshapen`) is skipped, as
    `replay` skips it: the console keeps running and folds every status event around it,
    and a console restarted on its file does not meet it again."""
    runs = [lifecycle(n) for n in range(1, 5)]
    good = [e for run in runs for e in run]
    bad = misshapen(*lifecycle(1))
    producer = AIOKafkaProducer(**connection(topics), max_request_size=4_000_000)
    await producer.start()
    try:
        await publish(topics, good[:3])
        for value in bad:
            await producer.send_and_wait(topics.topics.status, value, key=b"etl", partition=0)
        await publish(topics, good[3:])
    finally:
        await producer.stop()
    path = tmp_path / "console.db"
    for _ in range(2):  # the second time on the file it wrote
        console = await Console(topics, path, port=0).start()
        try:
            async with aiohttp.ClientSession() as session:
                api = Api(session, console.url)
                assert console.follower is not None
                await asyncio.wait_for(console.follower.caught_up.wait(), DEADLINE_S)
                shown = (await api.ok("/api/runs"))["runs"]
                assert sorted(r["run_id"] for r in shown) == sorted(r[0].run_id for r in runs)
                for run in runs:
                    found = await api.ok(f"/api/runs/{quote(run[0].run_id or '')}")
                    assert [e["type"] for e in found["events"]] == [e.type.value for e in run]
                assert (await api.ok("/api/status"))["caught_up"] is True
        finally:
            await console.stop()


async def test_a_file_follows_one_prefix(topics: Settings, tmp_path: Path) -> None:
    """A console file made for one prefix is refused for another, and held by one process."""
    from worker.console.db import ConsoleError

    path = tmp_path / "console.db"
    db = await ConsoleDb.open(path, topics.topics.status)
    try:
        with pytest.raises(ConsoleError, match="in use"):
            await ConsoleDb.open(path, topics.topics.status)
    finally:
        await db.close()
    with pytest.raises(ConsoleError, match=f"follows {topics.topics.status}"):
        await ConsoleDb.open(path, "other.status")


# -- filters and pagination ----------------------------------------------------------------


@pytest.fixture
async def history(topics: Settings, api: Api) -> list[StatusEvent]:
    """60 synthetic runs in the status topic, folded by the console; their started events."""
    runs = [lifecycle(n) for n in range(60)]
    events = [e for run in runs for e in run]
    await publish(topics, events)
    await folded(api, len(events))
    return [run[0] for run in runs]


def _status(n: int) -> str:
    return (
        "RUNNING"
        if n % 7 == 0
        else ["COMPLETED", "COMPLETED", "FAILED", "TIMED_OUT", "CANCELLED"][n % 5]
    )


async def test_filters_and_pages(history: list[StatusEvent], api: Api) -> None:
    """Each filter, alone and together, paged in any size, gives what a user expects."""
    status_of = {e.run_id: _status(int(e.event_id[1:])) for e in history}
    everything = expected(history, lambda e: True)
    for size in (1, 7, 60, 500):
        assert [r["run_id"] for r in await api.all_runs(limit=size)] == everything
    assert len((await api.ok("/api/runs"))["runs"]) == 50  # the default page
    since, until_ = T0 + timedelta(minutes=10), T0 + timedelta(minutes=40)
    cases: list[tuple[dict[str, str], Callable[[StatusEvent], bool]]] = [
        ({"job_type": "mail"}, lambda e: e.job_type == "mail"),
        ({"status": "failed"}, lambda e: status_of[e.run_id] == "FAILED"),
        ({"client_id": "acme"}, lambda e: e.client_id == "acme"),
        ({"since": since.isoformat()}, lambda e: e.occurred_at >= since),
        ({"until": "2026-11-20T08:40:00Z"}, lambda e: e.occurred_at < until_),
        (
            {"job_type": "etl", "status": "COMPLETED", "since": "2026-11-20T08:10:00"},
            lambda e: (
                e.job_type == "etl"
                and status_of[e.run_id] == "COMPLETED"
                and e.occurred_at >= since
            ),
        ),
        (
            {"client_id": "umbrella", "until": until_.isoformat(), "since": since.isoformat()},
            lambda e: e.client_id == "umbrella" and since <= e.occurred_at < until_,
        ),
        ({"job_type": "nope"}, lambda e: False),
    ]
    for query, keep in cases:
        want = expected(history, keep)
        assert [r["run_id"] for r in await api.all_runs(**query, limit=4)] == want, query
        assert [r["run_id"] for r in await api.all_runs(**query)] == want, query
    running = [r["run_id"] for r in await api.all_runs("/api/runs/running", limit=3)]
    assert running == expected(history, lambda e: status_of[e.run_id] == "RUNNING")
    acme_running = await api.all_runs("/api/runs/running", client_id="acme")
    assert all(r["client_id"] == "acme" and r["status"] == "RUNNING" for r in acme_running)


async def test_a_run_and_the_job_type_summary(history: list[StatusEvent], api: Api) -> None:
    """A run carries its events in order; the summary counts endings and durations."""
    ended = next(e for e in history if e.event_id == "s12")  # FAILED after 2 * ... seconds
    run = await api.ok(f"/api/runs/{ended.run_id}")
    assert run["status"] == "FAILED"
    assert [e["type"] for e in run["events"]] == ["started", "failed"]
    assert run["events"][1]["metrics"] == {"rows": 12}
    assert run["duration_s"] == pytest.approx((12 * 37) % 300 + 1)

    summary = {s["job_type"]: s for s in (await api.ok("/api/job-types"))["job_types"]}
    assert sorted(summary) == ["etl", "mail", "report"]
    for name, entry in summary.items():
        ns = [n for n in range(60) if ["etl", "mail", "report"][n % 3] == name]
        statuses = [_status(n) for n in ns]
        durations = sorted((n * 37) % 300 + 1 for n in ns if _status(n) != "RUNNING")
        assert entry["runs"] == len(ns)
        assert entry["failures"] == statuses.count("FAILED")
        assert entry["timeouts"] == statuses.count("TIMED_OUT")
        assert entry["running"] == statuses.count("RUNNING")
        assert entry["median_duration_s"] == durations[math.ceil(0.5 * len(durations)) - 1]
        assert entry["p95_duration_s"] == durations[math.ceil(0.95 * len(durations)) - 1]
        assert (
            entry["last_run"]["run_id"] == expected(history, lambda e, n=name: e.job_type == n)[0]
        )
    one = await api.ok("/api/job-types", job_type="mail")
    assert one == {"job_types": [summary["mail"]], "next": None}

    # a page at a time, by name: the next page starts after the last name of the one before
    assert (await api.ok("/api/job-types"))["next"] is None
    first = await api.ok("/api/job-types", limit="2")
    assert first["job_types"] == [summary["etl"], summary["mail"]]
    rest = await api.ok("/api/job-types", limit="2", cursor=first["next"])
    assert rest == {"job_types": [summary["report"]], "next": None}


async def test_an_unknown_run_is_404(console: Console, api: Api) -> None:
    """404 with a sentence naming the run."""
    status, body = await api.get("/api/runs/261128-093000-4.1187")
    assert status == 404
    assert "261128-093000-4.1187" in body["error"]


# -- refusals --------------------------------------------------------------------------------

BAD: list[tuple[str, str, str]] = [
    ("/api/runs", "limit=0", "limit"),
    ("/api/runs", "limit=501", "limit"),
    ("/api/runs", "limit=ten", "limit"),
    ("/api/runs", "limit=-5", "limit"),
    ("/api/runs", "limit=5_0", "limit"),
    ("/api/runs", "limit=" + "9" * 400, "limit"),
    ("/api/runs", "status=DONE", "status"),
    ("/api/runs", "since=yesterday", "since"),
    ("/api/runs", "since=0001-01-01T00:00:00%2B05:00", "since"),
    ("/api/runs", "until=2026-13-01", "until"),
    ("/api/runs", "since=2026-11-02&until=2026-11-01", "until"),
    ("/api/runs", "cursor=garbage!", "cursor"),
    ("/api/runs", "cursor=WzEsMl0", "cursor"),  # [1,2]: well-formed, not ours
    ("/api/runs", "cursor=WyJcdWRjODAiLCJ4Il0", "cursor"),  # a lone surrogate, JSON-escaped
    ("/api/runs", "job_type=two%20words", "job_type"),
    ("/api/runs", "job_type=" + "x" * 201, "job_type"),
    ("/api/runs", "client_id=%09tab", "client_id"),
    ("/api/runs", "job_type=a&job_type=b", "job_type"),
    ("/api/runs", "jobtype=etl", "jobtype"),
    ("/api/runs/running", "status=FAILED", "status"),
    ("/api/job-types", "limit=0", "limit"),
    ("/api/job-types", "types=5", "types"),
    ("/api/job-types", "job_type=%FF", "job_type"),
    ("/api/job-types", "cursor=garbage!", "cursor"),
    ("/api/job-types", "cursor=WyJhIiwiYiJd", "cursor"),  # ["a","b"]: a run page's cursor
    ("/api/job-types", "cursor=WzFd", "cursor"),  # [1]
    ("/api/job-types/durations", "types=501", "types"),
    ("/api/job-types/durations", "types=" + "9" * 400, "types"),
    ("/api/runs", "cursor=WyJhIl0", "cursor"),  # ["a"]: a job types page's cursor
    ("/api/events", "after=soon", "after"),
    ("/api/events", "status=bogus", "status"),
    ("/openapi.json", "x=1", "x"),
]


@pytest.mark.parametrize(("path", "query", "parameter"), BAD)
async def test_bad_parameters_are_400_naming_them(
    console: Console, api: Api, path: str, query: str, parameter: str
) -> None:
    """A bad parameter is a 400 whose sentence names it."""
    status, body = await api.raw(f"{path}?{query}")
    assert status == 400, body
    answer = json.loads(body)
    assert answer["parameter"] == parameter
    assert parameter in answer["error"]


async def test_a_bad_last_event_id_is_400(api: Api) -> None:
    async with api.session.get(api.base + "/api/events", headers={"Last-Event-ID": "x"}) as r:
        assert r.status == 400
        assert (await r.json())["parameter"] == "Last-Event-ID"


# Query strings built to hurt: bad UTF-8, SQL, huge values, broken syntax.
HOSTILE = [
    "job_type=%FF%FE",
    "job_type=%C3%28",
    "client_id=%ED%A0%80",  # an encoded surrogate
    "since=%F0%28%8C%28",
    "status=%E2%82",
    "%FF=1",
    "job_type=x%27%3B%20DROP%20TABLE%20runs%3B--",
    "client_id=%27%20OR%20%271%27%3D%271",
    "status=RUNNING%27%20OR%201%3D1--",
    "cursor=%27%29%20OR%201%3D1--",
    "since=2026-01-01%27%20OR%20%271%27%3D%271",
    "limit=1%20OR%201%3D1",
    "limit=" + "1" * 4000,
    "since=" + "2" * 4000,
    "cursor=" + "A" * 5000,
    "job_type=" + "%41" * 2000,
    "&".join(f"p{i}=1" for i in range(200)),
    "job_type=%00",
    "job_type=a%0Ab",
    "job_type",
    "=",
    "&&&=&=",
    "%",
    "%%%",
]


def random_queries(rng: random.Random, count: int) -> list[str]:
    """`count` query strings of random bytes, %-escaped, as values and as whole queries."""
    found = []
    for n in range(count):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60)))
        if n % 4 == 0:
            found.append(quote(raw, safe="=&%"))
            continue
        name = rng.choice(["job_type", "status", "client_id", "since", "until", "limit", "cursor"])
        found.append(f"{name}={quote(raw, safe='')}")
    return found


async def test_hostile_query_strings_are_400_never_500(
    console: Console, api: Api, topics: Settings
) -> None:
    """Hostile query strings on every endpoint are refused (400), never a 500; the console
    answers normally afterwards, its table intact."""
    await publish(topics, lifecycle(1))
    await folded(api, len(lifecycle(1)))
    paths = ["/api/runs", "/api/runs/running", "/api/job-types", "/api/runs/x", "/openapi.json"]
    for path in [
        "/api/runs/%FF",
        "/api/runs/%ED%A0%80",
        "/api/runs/a%0Ab",
        "/api/runs/" + "r" * 401,
    ]:
        status, body = await api.raw(path)
        assert (status, json.loads(body)["parameter"]) == (400, "run_id"), path
    for query in HOSTILE:
        for path in paths:
            status, body = await api.raw(f"{path}?{query}")
            assert status == 400, (path, query, body[:300])
            assert "error" in json.loads(body)
    for query in random_queries(random.Random(20261202), 100):
        for path in paths:
            status, body = await api.raw(f"{path}?{query}")
            # Random bytes may spell a job type that has no runs: looked up (200), else 400.
            assert status in (200, 400), (path, query, body[:300])
            assert json.loads(body)
    # A value that could name a job type, quotes and all, is looked up, not refused.
    assert (await api.ok("/api/runs", job_type="x';--"))["runs"] == []
    assert len((await api.ok("/api/runs"))["runs"]) == 1


async def test_hostile_bytes_on_the_wire(console: Console, api: Api) -> None:
    """Bytes no URL may hold, and over-long request lines, are refused by the HTTP parser."""
    parts = urlsplit(console.url)
    assert parts.hostname is not None
    targets = [
        b"/api/runs?job_type=\xff\xfe",
        b"/api/runs?job_type=\x00",
        b"/api/runs?job_type=' OR 1=1--",
        b"/api/runs/\xc3\x28",
        b"/api/runs?" + b"a" * 10_000,
        b"/api/runs/%00",
    ]
    for target in targets:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        host = f"{parts.hostname}:{parts.port}".encode()
        writer.write(
            b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        assert answer.split(b" ", 2)[1] in (b"400", b"404"), (target, answer[:200])
    assert (await api.get("/api/status"))[0] == 200


# -- the event stream ----------------------------------------------------------------------


async def read_frames(
    response: aiohttp.ClientResponse, want: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """SSE frames ({"id": ..., "data": <JSON>}) read from `response` until `want` holds."""
    frames: list[dict[str, Any]] = []
    frame: dict[str, Any] = {}
    async with asyncio.timeout(DEADLINE_S):
        while not want(frames):
            line = (await response.content.readline()).decode().rstrip("\n")
            if not line:
                if "data" in frame:
                    frames.append(frame)
                frame = {}
            elif line.startswith("id: "):
                frame["id"] = int(line[4:])
            elif line.startswith("data: "):
                frame["data"] = json.loads(line[6:])
            elif line.startswith("event: "):
                frame["event"] = line[7:]
    return frames


async def open_stream(api: Api, **query: Any) -> aiohttp.ClientResponse:
    """An event stream, once the console has subscribed it (its first comment is read)."""
    response = await api.session.get(api.base + "/api/events", params=query or None)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    first = await asyncio.wait_for(response.content.readline(), DEADLINE_S)
    assert first.startswith(b": following")
    return response


def resume(api: Api, job_type: str, last_id: int) -> Any:
    """A stream of `job_type`'s events resumed after `last_id` (as a browser reconnects)."""
    return api.session.get(
        api.base + "/api/events",
        params={"job_type": job_type},
        headers={"Last-Event-ID": str(last_id)},
    )


async def test_the_event_stream_delivers_new_events(
    worker: RunningWorker, topics: Settings, api: Api
) -> None:
    """A stream open before a run starts delivers its events as they are folded, filtered,
    without asking the API; reconnecting with Last-Event-ID replays what came since."""
    stream = await open_stream(api, job_type="watched")
    try:
        async with JobClient(topics) as client:
            await client.start_job("ignored")
            started = await client.start_job("watched", "acme", {"k": 1})
            assert started.run_id is not None
            (first,) = await read_frames(stream, lambda f: len(f) >= 1)
            assert first["data"]["type"] == "started"
            assert first["data"]["run_id"] == started.run_id
            await client.complete_job("watched", started.run_id, {"rows": 1})
            (done,) = await read_frames(stream, lambda f: len(f) >= 1)
            assert (done["data"]["type"], done["data"]["metrics"]) == ("completed", {"rows": 1})
            assert done["id"] > first["id"]
    finally:
        stream.close()
    # Resuming after the started event replays the completion, filters still applied.
    async with resume(api, "watched", first["id"]) as resumed:
        (replayed,) = await read_frames(resumed, lambda f: len(f) >= 1)
        assert (replayed["id"], replayed["data"]["type"]) == (done["id"], "completed")
    async with api.session.get(api.base + "/api/events", params={"after": "0"}) as everything:
        all_frames = await read_frames(everything, lambda f: len(f) >= 3)
        assert {f["data"]["job_type"] for f in all_frames} == {"ignored", "watched"}
        assert [f["id"] for f in all_frames] == sorted(f["id"] for f in all_frames)


async def test_event_streams_past_the_console_s_limit_are_refused_until_one_closes(
    api: Api, console: Console, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each open stream holds a connection and a queue: past `MAX_STREAMS` a new one is
    refused (503, saying so) instead of served; once one closes, the next is served."""
    from worker.console import api as console_api

    monkeypatch.setattr(console_api, "MAX_STREAMS", 3)
    # A closed stream is noticed at its next write: a keep-alive, every 15 s, here sooner.
    monkeypatch.setattr(console_api, "_KEEPALIVE_S", 0.2)
    streams = [await open_stream(api) for _ in range(3)]
    try:
        async with api.session.get(api.base + "/api/events") as refused:
            assert refused.status == 503
            assert "3 event streams at once" in (await refused.json())["error"]
        streams.pop().close()

        async def served() -> bool:
            async with api.session.get(api.base + "/api/status") as status:
                return int((await status.json())["streams"]) < 3

        await until(served, "the closed stream was not let go")
        streams.append(await open_stream(api))
    finally:
        for stream in streams:
            stream.close()


async def read_block(response: aiohttp.ClientResponse) -> dict[str, str]:
    """The next SSE block's fields (a comment as ":"), up to its blank line."""
    block: dict[str, str] = {}
    async with asyncio.timeout(DEADLINE_S):
        while line := (await response.content.readline()).decode().rstrip("\n"):
            name, _, value = line.partition(":")
            block[name or ":"] = value.strip()
    return block


async def test_a_filtered_stream_moves_its_id_past_what_it_leaves_out(
    worker: RunningWorker, topics: Settings, api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reconnect resumes from what a filtered stream has read past, not from its last
    match: the replay and the keep-alives send an ID without data, and only then."""
    monkeypatch.setattr(console_api, "_KEEPALIVE_S", 0.2)
    async with JobClient(topics) as client:
        await client.start_job("watched")
        stream = await open_stream(api, job_type="watched")
        try:
            await client.start_job("other")
            everything = await api.session.get(api.base + "/api/events", params={"after": "0"})
            frames = await read_frames(everything, lambda f: len(f) >= 2)
            everything.close()
            ids = {f["data"]["job_type"]: f["id"] for f in frames}
            async with asyncio.timeout(DEADLINE_S):  # keep-alives come every 0.2 s
                while (block := await read_block(stream)).get("id") != str(ids["other"]):
                    if "data" in block:  # the watched start, if folded after the stream opened
                        assert json.loads(block["data"])["job_type"] == "watched", block
        finally:
            stream.close()
    # Resuming from the watched start: the replay reads past "other" and says so.
    async with resume(api, "watched", ids["watched"]) as resumed:
        await resumed.content.readline()  # ": following ..."
        await resumed.content.readline()  # "retry: ..."
        await resumed.content.readline()
        assert await read_block(resumed) == {"id": str(ids["other"])}
        # Nothing new since: the keep-alives say no more.
        assert await read_block(resumed) == {":": "keep-alive"}


def test_a_slow_stream_overflows_and_ends() -> None:
    """A stream that falls the queue's depth behind is ended, told so, not grown."""
    subscription = Subscription(RunFilter())
    event = lifecycle(1)[0]
    from worker.console.db import Folded

    items = [Folded(n, 0, n, event, "{}") for n in range(_QUEUE_DEPTH + 5)]
    subscription.offer(items)
    assert subscription.overflowed
    assert subscription.queue.qsize() == 1
    assert subscription.queue.get_nowait() is None


# -- the document, the page, the command ----------------------------------------------------


async def test_openapi_names_every_route(console: Console, api: Api) -> None:
    """Every route the application serves (but the static files) is in /openapi.json."""
    from aiohttp import web

    document = await api.ok("/openapi.json")
    assert document["openapi"].startswith("3.")
    routes = {
        route.resource.canonical
        for route in console.app.router.routes()
        if route.resource is not None and not isinstance(route.resource, web.StaticResource)
    }
    assert routes <= set(document["paths"]), routes - set(document["paths"])
    assert "/api/runs/{run_id}" in routes
    for path, item in document["paths"].items():
        for parameter in item["get"]["parameters"]:
            if "$ref" in parameter:
                name = parameter["$ref"].rsplit("/", 1)[1]
                assert name in document["components"]["parameters"], (path, name)


async def test_the_page_and_its_script(console: Console, api: Api) -> None:
    """/ serves the page; its script and style come from /static."""
    async with api.session.get(api.base + "/") as response:
        assert response.status == 200
        html = await response.text()
    for asset in ("console.js", "console.css"):
        assert f"/static/{asset}" in html
        async with api.session.get(f"{api.base}/static/{asset}") as response:
            assert response.status == 200
            assert (STATIC / asset).read_text() == await response.text()


def test_serve_refuses_a_missing_topic(settings: Settings, tmp_path: Path) -> None:
    """`jobctl serve` on a prefix without topics exits 1 with one line saying what to do."""
    app = typer.Typer()
    app.command()(serve)
    app.command("other")(lambda: None)  # several commands, so `serve` is a subcommand
    result = CliRunner().invoke(
        app,
        [
            "serve",
            "--bootstrap",
            settings.bootstrap_servers,
            "--prefix",
            settings.topic_prefix,
            "--db",
            str(tmp_path / "c.db"),
            "--port",
            "0",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "does not exist" in result.output
    assert "jobctl topics create" in result.output


async def test_the_console_writes_nothing_to_kafka(
    topics: Settings, console: Console, api: Api
) -> None:
    """It joins no consumer group and commits nothing: the cluster has no group of its."""
    await publish(topics, lifecycle(2))
    await folded(api, len(lifecycle(2)))
    admin = AIOKafkaAdminClient(**connection(topics))
    await admin.start()
    try:
        groups = [g[0] for g in await admin.list_consumer_groups()]
    finally:
        await admin.close()
    assert not [g for g in groups if g.startswith(topics.topic_prefix)]


# -- indexes, and the time of a filtered query over many runs --------------------------------


async def build_history(path: Path, runs: int) -> None:
    """`runs` synthetic runs folded into a console file as the follower folds them."""
    db = await ConsoleDb.open(path, "jobs.status")
    try:
        offset = 0
        for first in range(0, runs, 5_000):
            items = []
            for n in range(first, min(runs, first + 5_000)):
                for event in lifecycle(n):
                    items.append((offset, event, event.model_dump_json()))
                    offset += 1
            await db.write([(0, items)], {0: offset})
        await db.analyze()
    finally:
        await db.close()


FILTERS = [
    RunFilter(),
    RunFilter(job_type="etl"),
    RunFilter(status=RunStatus.FAILED),
    RunFilter(client_id="acme"),
    RunFilter(job_type="mail", status=RunStatus.RUNNING),
    RunFilter(job_type="report", client_id="umbrella", status=RunStatus.TIMED_OUT),
    RunFilter(
        job_type="etl",
        since=stored_time(T0 + timedelta(days=20)),
        until=stored_time(T0 + timedelta(days=21)),
    ),
]


async def measure(path: Path, rounds: int = 20) -> dict[str, float]:
    """Milliseconds a page of 50 runs takes, per filter (median of `rounds`), the first page
    and the next one (from a cursor); and the job-type summary, once."""
    queries = await Queries.open(path, "jobs.status")
    timings: dict[str, float] = {}
    try:
        for f in FILTERS:
            _, following = await queries.runs(f, 50)
            pages = [("first page", None)]
            if following is not None:
                pages.append(("next page", cursor(following)))
            for label, after in pages:
                samples = []
                for _ in range(rounds):
                    started = time.perf_counter()
                    await queries.runs(f, 50, after)
                    samples.append((time.perf_counter() - started) * 1000)
                shown = {k: v for k, v in dataclasses.asdict(f).items() if v is not None}
                name = ", ".join(f"{k}={v}" for k, v in shown.items()) or "no filter"
                timings[f"{name}: {label}"] = sorted(samples)[rounds // 2]
        started = time.perf_counter()
        await queries.job_types()
        timings["job-type summary, first page"] = (time.perf_counter() - started) * 1000
    finally:
        await queries.close()
    return timings


async def measure_http(path: Path, rounds: int = 20) -> dict[str, float]:
    """Milliseconds a GET /api/runs of 50 runs takes end to end (median of `rounds`)."""
    from aiohttp import web

    from worker.console.api import make_app
    from worker.console.follow import Hub

    queries = await Queries.open(path, "jobs.status")
    runner = web.AppRunner(make_app(queries, Hub(), None))  # type: ignore[arg-type]
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}/api/runs"
    timings: dict[str, float] = {}
    try:
        async with aiohttp.ClientSession() as session:
            for query in ({}, {"job_type": "etl", "status": "FAILED"}, {"client_id": "acme"}):
                samples = []
                for _ in range(rounds):
                    started = time.perf_counter()
                    async with session.get(base, params=query) as response:
                        assert response.status == 200
                        await response.read()
                    samples.append((time.perf_counter() - started) * 1000)
                timings[str(query or "no filter")] = sorted(samples)[rounds // 2]
    finally:
        await runner.cleanup()
        await queries.close()
    return timings


@pytest.mark.parametrize("where", ["a directory", "no directory", "a pipe", "random bytes"])
def test_serve_refuses_a_file_it_cannot_use_in_one_line(tmp_path: Path, where: str) -> None:
    """`jobctl serve --db` on a directory, in a missing directory, on a FIFO (SQLite would
    block on it) or on a file that is not SQLite exits 1 with one line naming the file, and
    no traceback after it (aiosqlite's thread reports a failed open once the loop closed)."""
    import os
    import subprocess
    import sys

    db = {
        "a directory": tmp_path,
        "no directory": tmp_path / "absent" / "c.db",
        "a pipe": tmp_path / "fifo",
        "random bytes": tmp_path / "junk.db",
    }[where]
    if where == "a pipe":
        os.mkfifo(db)
    if where == "random bytes":
        db.write_bytes(random.Random(3).randbytes(4096))
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "serve", "--db", str(db), "--port", "0"],
        # plain text, as on a terminal (JSON lines are `auto`'s choice off one)
        env={**os.environ, "JOBS_BOOTSTRAP_SERVERS": "127.0.0.1:1", "JOBS_LOG_FORMAT": "console"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert str(db) in done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")], done.stderr
    if where == "random bytes":  # a console's file can be folded again: it says so
        assert "folds the status topic again" in done.stderr, done.stderr


async def test_every_filter_is_served_by_an_index(tmp_path: Path) -> None:
    """Each filtered page (and the next page's cursor) walks an index that holds every
    filter it is given, in start order: no table scan, no sort, and no run of a job type,
    status or client that was not asked for. The timings are printed (`-s`), not asserted."""
    path = tmp_path / "console.db"
    await build_history(path, 5_000)
    queries = await Queries.open(path, "jobs.status")
    try:
        for f in FILTERS:
            given = [c for c in ("job_type", "status", "client_id") if getattr(f, c) is not None]
            for after in (None, ("2026-11-21T00:00:00+00:00", "z")):
                plan = await queries.explain_runs(f, after)
                assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, (f, plan)
                assert "TEMP B-TREE" not in plan, (f, plan)
                # a client ID is sought as the worker compares it: `lower(client_id)`
                assert all(
                    ("<expr>=?" if column == "client_id" else f"{column}=?") in plan
                    for column in given
                ), (f, plan)
    finally:
        await queries.close()
    # the job types' pages: a seek for each name, counts from an index of the job type's runs
    with sqlite3.connect(path) as db:
        for sql in (_NEXT_TYPE, _COUNTS):
            plan = " ".join(r[3] for r in db.execute(f"EXPLAIN QUERY PLAN {sql}", ["etl"]))
            assert "COVERING INDEX" in plan, (sql, plan)
            assert "job_type" in plan, (sql, plan)
            assert "SCAN" not in plan, (sql, plan)
            assert "TEMP B-TREE" not in plan, (sql, plan)
    print({k: f"{v:.2f} ms" for k, v in (await measure(path)).items()})


async def test_client_filters_compare_as_the_worker_does(tmp_path: Path) -> None:
    """`Acme`, `acme` and `ACME` are one client to the worker: a filter by any of them finds
    the runs of all three, through an index, and the event stream's filter agrees. A client
    ID beyond ASCII is folded as Python folds it (SQLite's `lower()` folds ASCII only)."""
    path = tmp_path / "console.db"
    clients = ["Acme", "acme", "ACME", "acme2", None, "ÉMILE", "émile", "Émile"]
    db = await ConsoleDb.open(path, "jobs.status")
    try:
        items = []
        for n, client in enumerate(clients):
            event = lifecycle(n * 3)[0].model_copy(update={"client_id": client})
            items.append((n, event, event.model_dump_json()))
        await db.write([(0, items)], {0: len(items)})
    finally:
        await db.close()
    queries = await Queries.open(path, "jobs.status")
    try:
        for asked, found in (
            ("acme", {"Acme", "acme", "ACME"}),
            ("ACME", {"Acme", "acme", "ACME"}),
            ("Acme2", {"acme2"}),
            ("émile", {"ÉMILE", "émile", "Émile"}),
            ("ÉmIlE", {"ÉMILE", "émile", "Émile"}),
            ("nobody", set()),
        ):
            f = run_filter({"client_id": asked})
            page, _ = await queries.runs(f, 50)
            assert {r["client_id"] for r in page} == found, asked
            assert len(page) == len(found), asked
            assert {c for c in clients if c is not None and f.matches("etl", None, c, "")} == (
                found
            ), asked
        plan = await queries.explain_runs(run_filter({"client_id": "Acme"}))
        assert "INDEX console_runs_by_client_key" in plan, plan
    finally:
        await queries.close()


if __name__ == "__main__":  # python -m tests.test_console [runs]: time the queries
    import sys
    import tempfile

    async def main(runs: int) -> None:
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "console.db"
            started = time.perf_counter()
            await build_history(path, runs)
            print(f"folded {runs:,} runs in {time.perf_counter() - started:.1f}s")
            with sqlite3.connect(path) as db:
                print("runs:", db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])
            for label, ms in (await measure(path)).items():
                print(f"{ms:8.2f} ms  {label}")
            for label, ms in (await measure_http(path)).items():
                print(f"{ms:8.2f} ms  over HTTP: {label}")

    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))
