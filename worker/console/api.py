"""The console's HTTP API (aiohttp, JSON) and its page.

Every refusal is JSON, `{"error": <a sentence>, "parameter": <its name>}` for a bad
parameter (400), `{"error": ...}` otherwise; an unexpected failure is logged and answered
500 without details, and never ends the process.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from schemas import RunStatus
from worker.client import JobClient
from worker.console import params
from worker.console.cancel import Refused, cancel, not_allowed, read_reason
from worker.console.db import Folded
from worker.console.follow import Follower, Hub, Subscription
from worker.console.guard import Guard, Handler
from worker.console.openapi import document
from worker.console.params import BadParameter, RunFilter
from worker.console.queries import Queries

log = structlog.get_logger("worker")

STATIC = Path(__file__).resolve().parent / "static"
_KEEPALIVE_S = 15.0
MAX_STREAMS = 100  # event streams open at once (`GET /api/events`)
_RUN_PARAMS = (*params.FILTERS, "limit", "cursor")
_RUNNING_PARAMS = ("job_type", "client_id", "since", "until", "limit", "cursor")
_EVENT_PARAMS = (*params.FILTERS, "after")

QUERIES: web.AppKey[Queries] = web.AppKey("queries", Queries)
HUB: web.AppKey[Hub] = web.AppKey("hub", Hub)
FOLLOWER: web.AppKey[Follower] = web.AppKey("follower", Follower)
# The client that sends cancel requests: None unless the console runs with --allow-cancel.
CLIENT: web.AppKey[JobClient | None] = web.AppKey("client")


def _error(status: int, message: str, parameter: str | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if parameter is not None:
        body["parameter"] = parameter
    return web.json_response(body, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refusals as JSON; a failure as a 500, logged, that leaves the console running."""
    try:
        return await handler(request)
    except BadParameter as exc:
        return _error(400, exc.message, exc.parameter)
    except Refused as exc:
        return _error(exc.status, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("a console request failed", path=request.path)
        return _error(500, "the console failed to answer; its log says why")


def _query(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    return params.parse_query(request.rel_url.raw_query_string, allowed)


async def _page(request: web.Request, f: RunFilter, query: dict[str, str]) -> web.Response:
    limit = params.limit(query.get("limit"))
    after = params.cursor(query["cursor"]) if "cursor" in query else None
    runs, following = await request.app[QUERIES].runs(f, limit, after)
    return web.json_response({"runs": runs, "next": following})


async def runs(request: web.Request) -> web.Response:
    """GET /api/runs: runs, newest first, filtered, a page at a time."""
    query = _query(request, _RUN_PARAMS)
    return await _page(request, params.run_filter(query), query)


async def running(request: web.Request) -> web.Response:
    """GET /api/runs/running: the runs RUNNING now, newest first."""
    query = _query(request, _RUNNING_PARAMS)
    f = dataclasses.replace(params.run_filter(query), status=RunStatus.RUNNING)
    return await _page(request, f, query)


async def run(request: web.Request) -> web.Response:
    """GET /api/runs/{run_id}: one run and its every status event."""
    _query(request, ())
    run_id = params.run_id(request.rel_url.raw_path.rsplit("/", 1)[-1])
    found = await request.app[QUERIES].run(run_id)
    if found is None:
        topic = request.app[QUERIES].topic
        return _error(404, f"no run {run_id!r} is recorded in {topic}, as far as read")
    return web.json_response(found)


async def cancel_run(request: web.Request) -> web.Response:
    """POST /api/runs/{run_id} with {"status": "CANCELLED"}: cancel a running or queued run (only
    with --allow-cancel; 403 otherwise)."""
    client = request.app[CLIENT]
    if client is None:
        raise not_allowed()
    _query(request, ())
    run_id = params.run_id(request.rel_url.raw_path.rsplit("/", 1)[-1])
    reason = await read_reason(request)
    return web.json_response(await cancel(client, request.app[QUERIES], run_id, reason))


def _type_page(query: dict[str, str]) -> tuple[str | None, str | None]:
    """(`job_type`, the job type after which the page starts) of a job types request."""
    job_type = params.job_type(query["job_type"]) if "job_type" in query else None
    return job_type, params.type_cursor(query["cursor"]) if "cursor" in query else None


async def durations(request: web.Request) -> web.Response:
    """GET /api/job-types/durations: a page of job types, each with its last ended runs and
    their durations."""
    query = _query(request, ("job_type", "limit", "types", "cursor"))
    job_type, after = _type_page(query)
    found, following = await request.app[QUERIES].durations(
        job_type,
        params.limit(query.get("limit")),
        params.limit(query.get("types"), "types"),
        after,
    )
    return web.json_response({"job_types": found, "next": following})


async def job_types(request: web.Request) -> web.Response:
    """GET /api/job-types: a page of job types, each with a summary of its runs."""
    query = _query(request, ("job_type", "limit", "cursor"))
    job_type, after = _type_page(query)
    found, following = await request.app[QUERIES].job_types(
        job_type, params.limit(query.get("limit")), after
    )
    return web.json_response({"job_types": found, "next": following})


async def status(request: web.Request) -> web.Response:
    """GET /api/status: what the console has read of the status topic."""
    _query(request, ())
    follower = request.app[FOLLOWER]
    return web.json_response(
        {
            "topic": follower.topic,
            "caught_up": follower.caught_up.is_set(),
            "lag": await follower.lag(),
            "events_folded": follower.folded,
            "streams": request.app[HUB].streams,
            "allow_cancel": request.app[CLIENT] is not None,
        }
    )


async def openapi(request: web.Request) -> web.Response:
    """GET /openapi.json: this API, as OpenAPI 3."""
    _query(request, ())
    return web.json_response(document())


async def page(request: web.Request) -> web.FileResponse:
    """GET /: the console's page."""
    return web.FileResponse(STATIC / "index.html")


def _frame(seq: int, body: str) -> bytes:
    # JSON keeps newlines only as whitespace between tokens, so they may go.
    data = body.replace("\r", " ").replace("\n", " ")
    return f"id: {seq}\ndata: {data}\n\n".encode()


def _resume_from(request: web.Request, query: dict[str, str]) -> int | None:
    if "after" in query:
        return params.sequence(query["after"], "after")
    header = request.headers.get("Last-Event-ID")
    return None if header is None else params.sequence(header.strip(), "Last-Event-ID")


async def events(request: web.Request) -> web.StreamResponse:
    """GET /api/events: status events as they are folded, as Server-Sent Events."""
    query = _query(request, _EVENT_PARAMS)
    f = params.run_filter(query)
    after = _resume_from(request, query)
    hub = request.app[HUB]
    if hub.streams >= MAX_STREAMS:  # each holds a connection, a queue and maybe a replay
        raise Refused(503, f"the console serves {MAX_STREAMS} event streams at once; try later")
    subscription = hub.subscribe(f)  # before the replay: nothing falls between the two
    try:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        topic = request.app[QUERIES].topic
        await response.write(f": following {topic}\nretry: 2000\n\n".encode())
        if after is not None:
            after = await _replay(request.app[QUERIES], response, f, after)
        await _stream(response, subscription, after)
        return response
    finally:
        hub.unsubscribe(subscription)


def _passed(seq: int) -> bytes:
    # An ID without data moves the client's Last-Event-ID without an event: a filtered
    # stream that reconnects resumes from what it has read past, not from its last match.
    return f"id: {seq}\n\n".encode()


async def _replay(queries: Queries, response: web.StreamResponse, f: RunFilter, after: int) -> int:
    """Send the stored events after `after` that pass `f`; the last stream ID read past,
    which the client is told."""
    told = after
    async for rows in queries.events_after(after):
        for seq, _, _, job_type, status, client, occurred_at, body in rows:
            if f.matches(job_type, status, client, occurred_at):
                await response.write(_frame(seq, body))
                told = seq
        after = rows[-1][0]
    if after > told:
        await response.write(_passed(after))
    return after


async def _stream(
    response: web.StreamResponse, subscription: Subscription, after: int | None
) -> None:
    while True:
        try:
            item: Folded | None = await asyncio.wait_for(subscription.queue.get(), _KEEPALIVE_S)
        except TimeoutError:
            offered = subscription.offered  # the queue is empty: all of it up to here sent
            if offered > (after or 0):
                after = offered
                await response.write(b": keep-alive\n" + _passed(offered))
            else:
                await response.write(b": keep-alive\n\n")
            continue
        if item is None:
            if subscription.overflowed:
                await response.write(b"event: overflow\ndata: {}\n\n")
            return
        if after is not None and item.seq <= after:
            continue  # sent by the replay
        await response.write(_frame(item.seq, item.body))
        after = item.seq


def make_app(
    queries: Queries,
    hub: Hub,
    follower: Follower,
    client: JobClient | None = None,
    guard: Guard | None = None,
) -> web.Application:
    """The console's application; with `client`, it may cancel runs. `guard` says whom it
    answers (by default, as listening on the loopback interface)."""
    guard = guard or Guard("127.0.0.1")
    app = web.Application(middlewares=[_errors, guard.middleware])
    app.on_response_prepare.append(guard.headers)
    app[QUERIES] = queries
    app[HUB] = hub
    app[FOLLOWER] = follower
    app[CLIENT] = client
    app.router.add_get("/", page)
    app.router.add_get("/api/runs/running", running)
    app.router.add_get("/api/runs", runs)
    app.router.add_get("/api/runs/{run_id}", run)
    app.router.add_post("/api/runs/{run_id}", cancel_run)
    app.router.add_get("/api/job-types", job_types)
    app.router.add_get("/api/job-types/durations", durations)
    app.router.add_get("/api/events", events)
    app.router.add_get("/api/status", status)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_static("/static", STATIC, append_version=False)
    return app
