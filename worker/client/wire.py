"""A request or result, checked as the orchestrator will read it, before it is sent.

What the worker would dead-letter (not JSON, NaN or Infinity, nested deeper than
`JOBS_MAX_NESTING_DEPTH`, a record over `JOBS_MAX_RECORD_BYTES`, data over
`JOBS_MAX_DATA_BYTES`, a field the wire models refuse) raises `JobInvalidError` here, naming
what is wrong: no answer would ever come. The limits are the client's settings, the worker's
defaults unless set alike. The IDs are sent as the worker reads them (trimmed), so that its
answer names the request ID the caller waits for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from schemas import JobRequest, JobResult
from worker.client.answers import JobInvalidError
from worker.settings import Settings

_IDS = ("job_type", "request_id", "client_id", "run_id")
_DATA = ("initial_data", "final_metrics", "metrics")


def encoded(
    model: type[JobRequest] | type[JobResult], body: Mapping[str, Any], settings: Settings
) -> tuple[dict[str, Any], bytes]:
    """`body` with its IDs as the worker reads them, and its JSON; `JobInvalidError` for a
    body the worker would dead-letter."""
    what = "request" if model is JobRequest else "result"
    request_id = body.get("request_id")

    def invalid(problem: str) -> JobInvalidError:
        return JobInvalidError(
            f"not a valid {what}, not sent: {problem}",
            request_id if isinstance(request_id, str) else None,
        )

    if _depth(body, settings.max_nesting_depth) > settings.max_nesting_depth:
        raise invalid(
            f"arrays and objects nest more than {settings.max_nesting_depth} deep "
            "(JOBS_MAX_NESTING_DEPTH)"
        )
    try:
        text = json.dumps(body, allow_nan=False)
    except (TypeError, ValueError) as exc:  # a datetime, a set, NaN or Infinity
        raise invalid(f"not JSON: {exc}") from None
    try:
        message = model.model_validate_json(text)
    except ValidationError as exc:
        raise invalid(
            "; ".join(
                f"{'.'.join(str(part) for part in e['loc']) or 'body'}: {e['msg']}"
                for e in exc.errors(include_url=False, include_input=False)
            )
        ) from None
    sent = dict(body)
    for name in _IDS:
        if isinstance(value := getattr(message, name, None), str) and sent.get(name) != value:
            sent[name] = value
    payload = json.dumps(sent).encode() if sent != body else text.encode()
    if len(payload) > settings.max_record_bytes:
        raise invalid(
            f"it is {len(payload)} bytes as JSON; the limit is {settings.max_record_bytes} "
            "(JOBS_MAX_RECORD_BYTES)"
        )
    for name in _DATA:
        if (data := sent.get(name)) is not None:
            # As the worker measures it: compact JSON, UTF-8.
            size = len(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode())
            if size > settings.max_data_bytes:
                raise invalid(
                    f"{name} is {size} bytes as JSON; the limit is {settings.max_data_bytes} "
                    "(JOBS_MAX_DATA_BYTES)"
                )
    return sent, payload


def _depth(value: object, limit: int) -> int:
    """How deep maps and lists nest in `value` (a map alone is 1), looked into no further
    than past `limit` (a value may nest far deeper than a recursion goes)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > limit + 1:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest
