"""The console API as an OpenAPI 3 document (`GET /openapi.json`), written by hand.

`tests/test_console.py` checks that every route of the application is in it.
"""

from __future__ import annotations

from typing import Any

from schemas import EventType, RunStatus
from worker.console.cancel import MAX_REASON_CHARS
from worker.console.params import DEFAULT_LIMIT, MAX_LIMIT


def _param(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


_TIME = {"type": "string", "format": "date-time"}
_NEXT = {"type": ["string", "null"], "description": "The next page's `cursor`; null on the last."}
_SIZE = {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT}
_RUN_ID = {"name": "run_id", "in": "path", "required": True, "schema": {"type": "string"}}
_PARAMETERS: dict[str, dict[str, Any]] = {
    "job_type": _param("job_type", "Only this job type.", {"type": "string", "maxLength": 200}),
    "status": _param(
        "status",
        "Only runs with this status (any case).",
        {"type": "string", "enum": [s.value for s in RunStatus]},
    ),
    "client_id": _param(
        "client_id", "Only this client's runs.", {"type": "string", "maxLength": 128}
    ),
    "since": _param(
        "since",
        "Runs started (events occurred) at or after this time; UTC without an offset.",
        _TIME,
    ),
    "until": _param("until", "Runs started (events occurred) before this time.", _TIME),
    "limit": _param("limit", f"Runs a page (default {DEFAULT_LIMIT}).", _SIZE),
    "cursor": _param("cursor", "The `next` of the previous page.", {"type": "string"}),
    "types_limit": _param("limit", f"Job types a page (default {DEFAULT_LIMIT}).", _SIZE),
    "types": _param("types", f"Job types a page (default {DEFAULT_LIMIT}).", _SIZE),
    "chart_runs": _param("limit", f"Ended runs of each job type (default {DEFAULT_LIMIT}).", _SIZE),
    "types_cursor": _param(
        "cursor", "The `next` of the previous page of job types.", {"type": "string"}
    ),
    "after": _param(
        "after",
        "Replay the stored events after this event ID first (as the `Last-Event-ID` header).",
        {"type": "integer", "minimum": 0},
    ),
}


def _refs(*names: str) -> list[dict[str, str]]:
    return [{"$ref": f"#/components/parameters/{name}"} for name in names]


def _json(schema: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


_BAD = _json("Error", "A bad parameter: `error` says what is wrong, `parameter` names it.")
_NULLABLE_STR = {"type": ["string", "null"]}
_NULLABLE_NUM = {"type": ["number", "null"]}
_NULLABLE_OBJ = {"type": ["object", "null"]}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}, "parameter": {"type": "string"}},
    },
    "Run": {
        "type": "object",
        "properties": {
            "run_id": {"type": "string"},
            "job_type": {"type": "string"},
            "client_id": _NULLABLE_STR,
            "request_id": _NULLABLE_STR,
            "status": {"type": "string", "enum": [s.value for s in RunStatus]},
            "partition": {"type": "integer"},
            "started_at": _TIME,
            "ended_at": {"type": ["string", "null"], "format": "date-time"},
            "duration_s": _NULLABLE_NUM,
            "initial_data": {"type": "object"},
            "metrics": _NULLABLE_OBJ,
            "reason": _NULLABLE_STR,
        },
    },
    "RunPage": {
        "type": "object",
        "properties": {
            "runs": {"type": "array", "items": {"$ref": "#/components/schemas/Run"}},
            "next": _NEXT,
        },
    },
    "Event": {
        "type": "object",
        "properties": {
            "seq": {"type": "integer", "description": "The event's ID in the event stream."},
            "event_id": {"type": "string"},
            "type": {"type": "string", "enum": [t.value for t in EventType]},
            "status": _NULLABLE_STR,
            "from_status": _NULLABLE_STR,
            "occurred_at": _TIME,
            "request_id": _NULLABLE_STR,
            "reason": _NULLABLE_STR,
            "metrics": _NULLABLE_OBJ,
            "source": {"type": ["object", "null"], "description": "The input record."},
            "record": {"type": "object", "description": "The status record."},
        },
    },
    "RunWithEvents": {
        "allOf": [
            {"$ref": "#/components/schemas/Run"},
            {
                "type": "object",
                "properties": {
                    "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}}
                },
            },
        ]
    },
    "JobTypes": {
        "type": "object",
        "properties": {
            "job_types": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "job_type": {"type": "string"},
                        "runs": {"type": "integer"},
                        "running": {"type": "integer"},
                        "queued": {"type": "integer"},
                        "completed": {"type": "integer"},
                        "failures": {"type": "integer"},
                        "timeouts": {"type": "integer"},
                        "cancelled": {"type": "integer"},
                        "median_duration_s": _NULLABLE_NUM,
                        "p95_duration_s": _NULLABLE_NUM,
                        "last_run": _NULLABLE_OBJ,
                    },
                },
            },
            "next": _NEXT,
        },
    },
    "Status": {
        "type": "object",
        "properties": {
            "topic": {"type": "string"},
            "caught_up": {"type": "boolean"},
            "lag": {"type": ["integer", "null"]},
            "events_folded": {"type": "integer"},
            "streams": {"type": "integer"},
            "allow_cancel": {
                "type": "boolean",
                "description": "Whether this console may cancel runs (`--allow-cancel`).",
            },
        },
    },
    "Durations": {
        "type": "object",
        "properties": {
            "job_types": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "job_type": {"type": "string"},
                        "runs": {
                            "type": "array",
                            "description": "The last ended runs by start, oldest first.",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "run_id": {"type": "string"},
                                    "status": {"type": "string"},
                                    "started_at": _TIME,
                                    "ended_at": _TIME,
                                    "duration_s": {"type": "number"},
                                },
                            },
                        },
                    },
                },
            },
            "next": _NEXT,
        },
    },
    "CancelRequest": {
        "type": "object",
        "required": ["status"],
        "additionalProperties": False,
        "properties": {
            "status": {"const": "CANCELLED"},
            "reason": {"type": "string", "minLength": 1, "maxLength": MAX_REASON_CHARS},
        },
    },
    "Cancelled": {
        "type": "object",
        "properties": {
            "run_id": {"type": "string"},
            "type": {"type": "string", "description": "The decision: `cancelled`."},
            "status": _NULLABLE_STR,
            "request_id": {"type": "string"},
            "reason": _NULLABLE_STR,
            "occurred_at": _TIME,
        },
    },
}


def _get(summary: str, parameters: list[Any], ok: dict[str, Any], **more: Any) -> dict[str, Any]:
    # every operation refuses a parameter it does not know
    responses: dict[str, Any] = {"200": ok, "400": _BAD}
    responses.update(more)
    return {"get": {"summary": summary, "parameters": parameters, "responses": responses}}


def _cancel() -> dict[str, Any]:
    return {
        "summary": "Cancel a running or queued run: send a cancel request for it and answer with "
        "the orchestrator's decision. Only on a console started with --allow-cancel. The body "
        "must be JSON (Content-Type: application/json).",
        "parameters": [_RUN_ID],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/CancelRequest"}}
            },
        },
        "responses": {
            "200": _json("Cancelled", "The run is cancelled."),
            "400": _json("Error", "A bad body: `parameter` names the field."),
            "403": _json("Error", "This console was started without --allow-cancel."),
            "404": _json("Error", "No such run has been read."),
            "409": _json(
                "Error",
                "The run has ended, the orchestrator refused, or no request can name the "
                "run's job type.",
            ),
            "415": _json("Error", "The body is not sent as JSON."),
            "504": _json("Error", "The orchestrator did not answer in time."),
        },
    }


def _paths() -> dict[str, Any]:
    page = _json("RunPage", "A page of runs, newest first.")
    one_run = _get(
        "One run with every status event that named it, in order.",
        [_RUN_ID],
        _json("RunWithEvents", "The run."),
        **{"404": _json("Error", "No such run has been read.")},
    )
    one_run["post"] = _cancel()
    return {
        "/": _get("The console's page.", [], {"description": "HTML", "content": {"text/html": {}}}),
        "/api/runs": _get(
            "Runs, newest first, filtered, a page at a time.",
            _refs("job_type", "status", "client_id", "since", "until", "limit", "cursor"),
            page,
        ),
        "/api/runs/running": _get(
            "The runs RUNNING now, newest first.",
            _refs("job_type", "client_id", "since", "until", "limit", "cursor"),
            page,
        ),
        "/api/runs/{run_id}": one_run,
        "/api/job-types": _get(
            "A page of job types, by name: each one's runs, failures, time-outs, median and "
            "p95 duration (nearest rank over ended runs), the last run.",
            _refs("job_type", "types_limit", "types_cursor"),
            _json("JobTypes", "One entry per job type, by name; `next` for the next page."),
        ),
        "/api/job-types/durations": _get(
            "A page of `types` job types, by name: each one's last `limit` ended runs by "
            "start (oldest first) and their durations, as the page charts them.",
            _refs("job_type", "chart_runs", "types", "types_cursor"),
            _json("Durations", "One entry per job type, by name; `next` for the next page."),
        ),
        "/api/events": _get(
            "Status events as the console folds them, as Server-Sent Events: `id` is the "
            "event's ID (send it back as `Last-Event-ID`, or `after`, to resume), `data` the "
            "status event's JSON as published. A filtered stream also sends an `id` without "
            "data when it has read past events its filters leave out, so that a reconnect "
            "resumes from there. A stream that falls 10,000 events behind gets an `overflow` "
            "event and is closed; reconnecting resumes it.",
            [
                *_refs("job_type", "status", "client_id", "since", "until", "after"),
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "description": "The `id` of the last event received: resume after it.",
                    "schema": {"type": "integer", "minimum": 0},
                },
            ],
            {"description": "An event stream", "content": {"text/event-stream": {}}},
            **{"503": _json("Error", "As many streams are open as the console serves (100).")},
        ),
        "/api/status": _get(
            "What the console has read of the status topic.", [], _json("Status", "Its state.")
        ),
        "/openapi.json": _get(
            "This document.", [], {"description": "OpenAPI 3", "content": {"application/json": {}}}
        ),
    }


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the console's API."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "job-orchestrator console",
            "version": "1",
            "description": "Run history and live status events, read from the status topic. "
            "Unknown, repeated or malformed query parameters are answered 400 naming the "
            "parameter.",
        },
        "paths": _paths(),
        "components": {"parameters": _PARAMETERS, "schemas": _SCHEMAS},
    }
