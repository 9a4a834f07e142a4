"""An AsyncAPI 3 document of the five topics, generated from the wire models.

Written as `schemas/asyncapi.json` by `jobctl schemas export` and checked to be current by the
test suite, like the JSON Schema files it refers to. It describes the orchestrator: what it
receives (requests, results) and what it sends (status events, run records, dead letters).
"""

from __future__ import annotations

from typing import Any

from schemas.messages import EventType

_PREFIX = {
    "prefix": {
        "description": "The topic prefix, `JOBS_TOPIC_PREFIX`.",
        "default": "jobs",
    }
}
_KEY_IS_JOB_TYPE = {"type": "string", "description": "The job type: all its records share a key."}


def _string(description: str) -> dict[str, str]:
    return {"type": "string", "description": description}


_CLOUDEVENT_HEADERS: dict[str, Any] = {
    "type": "object",
    "description": "CloudEvents binary content mode (Kafka protocol binding), and W3C trace "
    "context when the input that caused the event carried it.",
    "properties": {
        "ce_specversion": {"type": "string", "const": "1.0"},
        "ce_id": _string("The event ID (`event_id`)."),
        "ce_type": {
            "type": "string",
            "enum": [f"job-orchestrator.{kind.value}" for kind in EventType],
        },
        "ce_source": _string("`/job-orchestrator/<prefix>`."),
        "ce_time": {"type": "string", "format": "date-time", "description": "`occurred_at`."},
        "ce_subject": _string("The run ID, when the event names a run."),
        "content-type": {"type": "string", "const": "application/json"},
        "traceparent": _string("W3C trace context: the cause's trace, a span of this event."),
    },
    "required": ["ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time"],
}

# channel -> (topic suffix, message name, schema file, key schema, what it carries)
_CHANNELS: dict[str, tuple[str, str, str, dict[str, Any], str]] = {
    "requests": (
        "requests",
        "JobRequest",
        "job_request.schema.json",
        _KEY_IS_JOB_TYPE,
        "Start and cancel requests, from producers. Topics with LogAppendTime.",
    ),
    "results": (
        "results",
        "JobResult",
        "job_result.schema.json",
        _KEY_IS_JOB_TYPE,
        "Results, progress and heartbeats, from executors. Topics with LogAppendTime.",
    ),
    "status": (
        "status",
        "StatusEvent",
        "status_event.schema.json",
        _KEY_IS_JOB_TYPE,
        "Every decision, exactly once: the decision log. Read it with read_committed.",
    ),
    "state": (
        "state",
        "RunRecord",
        "run_record.schema.json",
        _string("The run ID (run rows) or the job type (the orchestrator's own rows)."),
        'The changelog (compacted): run rows (`{"row":"run","v":1,"run":RunRecord}`), '
        "a tombstone when an ended run leaves, and each partition's view mark (key "
        '`\\u0000view`, `{"row":"view","v":1,"mark":ViewMark}`, view_mark.schema.json): '
        "every run unended when it was written has a row stamped at or after its `since`. "
        "Other rows are the orchestrator's private state.",
    ),
    "dlq": (
        "dlq",
        "DeadLetter",
        "dead_letter.schema.json",
        {"type": ["string", "null"], "description": "The original key, when it was small."},
        "Input records that could not be used, with the reason.",
    ),
}
_RECEIVES = ("requests", "results")


def asyncapi_document(version: str) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the orchestrator's topics, at package `version`."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for channel, (suffix, message, schema_file, key, what) in _CHANNELS.items():
        channels[channel] = {
            "address": "{prefix}." + suffix,
            "description": what,
            "parameters": _PREFIX,
            "messages": {message: {"$ref": f"#/components/messages/{message}"}},
        }
        messages[message] = {
            "name": message,
            "contentType": "application/json",
            "payload": {"$ref": f"./{schema_file}"},
            "bindings": {"kafka": {"key": key}},
        }
        if channel == "status":
            messages[message]["headers"] = _CLOUDEVENT_HEADERS
        action = "receive" if channel in _RECEIVES else "send"
        operations[f"{action}_{channel}"] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "job-orchestrator",
            "version": version,
            "description": "The orchestrator's topics, seen from the orchestrator: it receives "
            "requests and results and alone sends status events, run records and dead letters.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }
