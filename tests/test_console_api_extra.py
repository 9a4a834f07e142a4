"""The console's duration chart data and its cancel endpoint (`jobctl serve --allow-cancel`).

Against the session's real broker: synthetic status events where exact durations are
needed, a real worker where a run must really be cancelled.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer

from tests.conftest import RunningWorker
from tests.test_console import Api, folded, lifecycle, publish, until
from worker.client import JobClient
from worker.console.service import Console
from worker.kafkaio import connection, partitions_of
from worker.settings import Settings

pytestmark = pytest.mark.kafka


async def post(
    session: aiohttp.ClientSession, url: str, body: Any, content_type: str = "application/json"
) -> tuple[int, dict[str, Any]]:
    """POST `body` (JSON-encoded unless already bytes) to `url`; (status, JSON answer)."""
    import json

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(url, data=data, headers={"Content-Type": content_type}) as r:
        return r.status, await r.json()


async def requests_written(settings: Settings) -> int:
    """How many records the requests topic holds."""
    consumer = AIOKafkaConsumer(**connection(settings))
    await consumer.start()
    try:
        partitions = await partitions_of(consumer, settings.topics.requests)
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


# -- the duration chart's data ------------------------------------------------------------


async def test_durations_per_job_type(
    topics: Settings, console: Console, session: aiohttp.ClientSession
) -> None:
    """Each job type's last ended runs by start, oldest first, with their durations; the
    running runs are left out; `limit` and `job_type` narrow it."""
    api = Api(session, console.url)
    runs = [lifecycle(n) for n in range(40)]
    events = [e for run in runs for e in run]
    await publish(topics, events)
    await folded(api, len(events))

    def ended(job_type: str) -> list[tuple[str | None, float]]:
        # lifecycle(n) starts at T0 + n minutes and lasts (n * 37) % 300 + 1 seconds
        return [
            (run[0].run_id, float((n * 37) % 300 + 1))
            for n, run in enumerate(runs)
            if run[0].job_type == job_type and len(run) == 2
        ]

    body = await api.ok("/api/job-types/durations")
    assert [e["job_type"] for e in body["job_types"]] == ["etl", "mail", "report"]
    for entry in body["job_types"]:
        want = ended(entry["job_type"])
        assert len(want) > 5
        assert [(r["run_id"], r["duration_s"]) for r in entry["runs"]] == want
        assert all(r["status"] != "RUNNING" and r["ended_at"] for r in entry["runs"])
    last3 = await api.ok("/api/job-types/durations", job_type="mail", limit="3")
    assert [(r["run_id"], r["duration_s"]) for r in last3["job_types"][0]["runs"]] == ended("mail")[
        -3:
    ]
    assert len(last3["job_types"]) == 1
    assert (await api.ok("/api/job-types/durations", job_type="nope"))["job_types"] == []
    assert body["next"] is None
    # a page of two job types at a time, then the rest
    first = await api.ok("/api/job-types/durations", types="2", limit="3")
    assert [e["job_type"] for e in first["job_types"]] == ["etl", "mail"]
    rest = await api.ok("/api/job-types/durations", types="2", limit="3", cursor=first["next"])
    assert [e["job_type"] for e in rest["job_types"]] == ["report"]
    assert rest["next"] is None
    assert [len(e["runs"]) for e in first["job_types"] + rest["job_types"]] == [3, 3, 3]
    for query, parameter in (("limit=0", "limit"), ("status=FAILED", "status")):
        status, answer = await api.raw(f"/api/job-types/durations?{query}")
        assert status == 400
        assert f'"parameter": "{parameter}"' in answer.decode()


async def test_the_openapi_document_has_the_new_operations(
    console: Console, session: aiohttp.ClientSession
) -> None:
    document = await Api(session, console.url).ok("/openapi.json")
    cancel = document["paths"]["/api/runs/{run_id}"]["post"]
    assert {"200", "403", "404", "409", "415"} <= set(cancel["responses"])
    assert "/api/job-types/durations" in document["paths"]
    assert "allow_cancel" in document["components"]["schemas"]["Status"]["properties"]


# -- cancelling -----------------------------------------------------------------------------


async def test_cancel_is_refused_without_allow_cancel(
    topics: Settings, console: Console, session: aiohttp.ClientSession
) -> None:
    """403 with a sentence saying how to allow it; nothing is written to Kafka."""
    api = Api(session, console.url)
    await publish(topics, lifecycle(7))  # a running run
    await folded(api, 1)
    run_id = lifecycle(7)[0].run_id
    assert (await api.ok(f"/api/runs/{run_id}"))["status"] == "RUNNING"
    assert (await api.ok("/api/status"))["allow_cancel"] is False
    status, answer = await post(
        session, f"{console.url}/api/runs/{run_id}", {"status": "CANCELLED"}
    )
    assert status == 403
    assert "--allow-cancel" in answer["error"]
    assert (await api.ok(f"/api/runs/{run_id}"))["status"] == "RUNNING"
    assert await requests_written(topics) == 0


async def test_cancel_through_the_api(
    worker: RunningWorker, topics: Settings, cancelling: Console, session: aiohttp.ClientSession
) -> None:
    """With --allow-cancel a running run is cancelled through the orchestrator; bad bodies
    are 400 naming the field, a form post 415, an unknown run 404, an ended one 409."""
    api = Api(session, cancelling.url)
    assert (await api.ok("/api/status"))["allow_cancel"] is True
    async with JobClient(topics) as client:
        started = await client.start_job("nightly", "acme", {"day": 1})
    run_id = started.run_id
    assert run_id is not None
    url = f"{cancelling.url}/api/runs/{run_id}"

    async def listed() -> bool:
        status, run = await api.get(f"/api/runs/{run_id}")
        return status == 200 and run["status"] == "RUNNING"

    await until(listed, "the console did not read the started run")
    form = await post(session, url, b"status=CANCELLED", "application/x-www-form-urlencoded")
    assert form[0] == 415
    for body, parameter in [
        (b"{", "body"),
        ([1], "body"),
        ({}, "status"),
        ({"status": "FAILED"}, "status"),
        ({"status": "CANCELLED", "reason": ""}, "reason"),
        ({"status": "CANCELLED", "reason": "x" * 1001}, "reason"),
        ({"status": "CANCELLED", "force": True}, "force"),
        # hostile bytes: deep nesting, not UTF-8, UTF-16, a lone surrogate, random bytes
        (b"[" * 100_000, "body"),
        (b'{"status": "CANCELLED", "reason": "\xff"}', "body"),
        ('{"status": "CANCELLED"}'.encode("utf-16"), "body"),
        (b'{"status": "CANCELLED", "reason": "\\ud800"}', "reason"),
        (bytes(range(256)), "body"),
    ]:
        status, answer = await post(session, url, body)
        assert (status, answer.get("parameter")) == (400, parameter), (body, answer)
    assert (await api.ok(f"/api/runs/{run_id}"))["status"] == "RUNNING"  # none of it was sent
    unknown = await post(session, f"{cancelling.url}/api/runs/nope-1", {"status": "CANCELLED"})
    assert unknown[0] == 404
    # A run read from the status topic whose job type no request can carry (a forged event):
    # 409 at once, saying why, not 504 after waiting for an answer that never comes.
    forged = lifecycle(7)[0].model_copy(
        update={"job_type": "K" * 300, "run_id": "261201-000000-0.99", "event_id": "forged"}
    )
    await publish(topics, [forged])

    async def forged_listed() -> bool:
        return (await api.get("/api/runs/261201-000000-0.99"))[0] == 200

    await until(forged_listed, "the console did not read the forged run")
    status, answer = await post(
        session, f"{cancelling.url}/api/runs/261201-000000-0.99", {"status": "CANCELLED"}
    )
    assert status == 409, answer
    assert "cannot be cancelled by a request" in answer["error"]
    assert "job_type" in answer["error"]

    status, answer = await post(session, url, {"status": "CANCELLED", "reason": "by hand"})
    assert status == 200, answer
    assert (answer["run_id"], answer["type"], answer["status"]) == (
        run_id,
        "cancelled",
        "CANCELLED",
    )

    async def cancelled() -> Any:
        # The run's row is written just before its events: wait for both.
        run = await api.ok(f"/api/runs/{run_id}")
        return run if run["status"] == "CANCELLED" and len(run["events"]) == 2 else None

    run = await until(cancelled, "the console did not record the cancel")
    assert [e["type"] for e in run["events"]] == ["started", "cancelled"]
    assert run["events"][-1]["reason"] == "by hand"
    again = await post(session, url, {"status": "CANCELLED"})
    assert again[0] == 409
    assert "already ended" in again[1]["error"]


async def test_a_page_on_another_name_or_origin_can_neither_read_nor_cancel(
    worker: RunningWorker, topics: Settings, cancelling: Console, session: aiohttp.ClientSession
) -> None:
    """DNS rebinding: a request naming a host the console does not serve (an attacker's name
    pointed at its address) is refused, reads as well as cancels; a cancel posted with
    another page's Origin is refused; the console's own page (its Origin, an IP address or
    localhost as host) cancels. Every answer forbids framing and sniffing."""
    async with JobClient(topics) as client:
        run_id = (await client.start_job("nightly", "acme")).run_id
    api = Api(session, cancelling.url)

    async def listed() -> bool:
        return (await api.get(f"/api/runs/{run_id}"))[0] == 200

    await until(listed, "the console did not read the started run")
    port = cancelling.url.rsplit(":", 1)[1]
    url = f"{cancelling.url}/api/runs/{run_id}"
    rebound = {"Host": f"rebind.attacker.example:{port}"}
    async with session.get(f"{cancelling.url}/api/runs", headers=rebound) as read:
        assert read.status == 403
        assert "--allowed-host rebind.attacker.example" in (await read.json())["error"]
    for headers in (
        {**rebound, "Origin": f"http://rebind.attacker.example:{port}"},
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
    ):
        async with session.post(
            url,
            json={"status": "CANCELLED"},
            headers={**headers, "Content-Type": "application/json"},
        ) as refused:
            assert refused.status == 403, headers
    assert (await api.ok(f"/api/runs/{run_id}"))["status"] == "RUNNING"
    assert await requests_written(topics) == 1  # the start alone
    async with session.get(f"{cancelling.url}/", headers={"Host": f"localhost:{port}"}) as page:
        assert page.status == 200
        assert page.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        assert page.headers["X-Content-Type-Options"] == "nosniff"
    own = {"Origin": cancelling.url, "Content-Type": "application/json"}
    async with session.post(url, json={"status": "CANCELLED"}, headers=own) as cancelled:
        assert cancelled.status == 200, await cancelled.text()
        assert cancelled.headers["X-Frame-Options"] == "DENY"


def test_the_guard_reads_host_names_as_browsers_send_them() -> None:
    """IP addresses (v4, v6 in brackets) and localhost are served whatever the options; a
    name only when it is --host or given with --allowed-host, in any case."""
    from worker.console.guard import Guard

    default = Guard("127.0.0.1")
    for host in ("127.0.0.1:8081", "[::1]:8081", "10.0.0.7", "localhost:8081", "app.localhost"):
        assert default.serves(host), host
    hostile = ["[", "[::1", ":", "\udcff\udcfe:80", "a" * 10_000, "127.0.0.1:80:80", "\x00"]
    for host in ("console.internal:8081", "", None, "127.0.0.1.nip.io", *hostile):
        assert not default.serves(host), host
    for host in ("localhost.:8081", "127.0.0.1.:8081"):  # a name's root: the same host
        assert default.serves(host), host
    named = Guard("0.0.0.0", ["Console.Internal"])
    assert named.serves("console.internal.")
    assert named.serves("console.internal:8081")
    assert named.serves("CONSOLE.internal")
    assert Guard("console.internal").serves("console.internal:80")


async def test_a_cancel_through_a_proxy_that_sends_its_own_host_is_the_console_s_own() -> None:
    """Behind a proxy that sends `Host: 127.0.0.1:8081`, the page's `Origin` is the public
    name: a change from it is the console's own when that name is --allowed-host, and
    still refused from any other origin."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from worker.console.guard import Guard

    guard = Guard("127.0.0.1", ["console.example.com"])

    async def changed(request: web.Request) -> web.Response:
        return web.json_response({"changed": True})

    app = web.Application(middlewares=[guard.middleware])
    app.router.add_post("/change", changed)
    async with TestClient(TestServer(app)) as client:
        proxied = {"Host": "127.0.0.1:8081"}
        own = await client.post(
            "/change", headers={**proxied, "Origin": "https://console.example.com"}
        )
        assert own.status == 200
        other = await client.post("/change", headers={**proxied, "Origin": "https://evil.example"})
        assert other.status == 403
