"""Cancelling a run from the console (`jobctl serve --allow-cancel`).

The console otherwise only reads. With `--allow-cancel` it opens a `JobClient` (the producer
role's rights: write `<prefix>.requests`, read status and the running view) and
`POST /api/runs/{run_id}` with `{"status": "CANCELLED"}` sends a cancel request for that run,
as `jobctl cancel` would, and answers with the orchestrator's decision. The body must be
JSON (`Content-Type: application/json`): a page of another site cannot send that without
the console's consent, so it cannot cancel runs through a visitor's browser.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from schemas import RunStatus
from worker.client import JobClient
from worker.client.answers import JobInvalidError, JobRejectedError, JobTimeoutError
from worker.console.params import BadParameter
from worker.console.queries import Queries

MAX_REASON_CHARS = 1000  # as the wire format's cancel reason
DEFAULT_REASON = "cancelled from the console"
_ANSWER_TIMEOUT_S = 15.0
_BODY_FIELDS = ("status", "reason")


class Refused(Exception):
    """A cancel the console will not send, or the orchestrator refused: (HTTP status, why)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def not_allowed() -> Refused:
    """The refusal of a console started without `--allow-cancel`."""
    return Refused(
        403,
        "this console may not cancel runs: it was started without --allow-cancel "
        "(`jobctl serve --allow-cancel`, with the producer role's Kafka rights)",
    )


async def read_reason(request: web.Request) -> str:
    """The reason of a cancel request's body `{"status": "CANCELLED", "reason": ...}`."""
    if request.content_type != "application/json":
        raise Refused(415, "send the cancel as JSON (Content-Type: application/json)")
    try:
        # UTF-8 only (json.loads of bytes would take UTF-16 and UTF-32 too); RecursionError:
        # arrays or objects nested deeper than the parser recurses.
        body = json.loads((await request.read()).decode("utf-8"))
    except UnicodeDecodeError:
        raise BadParameter("body", "the body is not UTF-8") from None
    except (ValueError, RecursionError):
        raise BadParameter("body", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadParameter("body", 'the body must be an object like {"status": "CANCELLED"}')
    for name in body:
        if name not in _BODY_FIELDS:
            raise BadParameter(
                str(name)[:100],
                f"unknown field {str(name)[:100]!r}; the body takes status and reason",
            )
    if body.get("status") != RunStatus.CANCELLED.value:
        raise BadParameter("status", 'status must be "CANCELLED", the one change asked here')
    reason = body.get("reason", DEFAULT_REASON)
    if not isinstance(reason, str) or not 1 <= len(reason) <= MAX_REASON_CHARS:
        raise BadParameter("reason", f"reason must be text of 1 to {MAX_REASON_CHARS} characters")
    try:
        reason.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escaped in the JSON: no event can carry it
        raise BadParameter("reason", "reason must be text (it escapes a lone surrogate)") from None
    return reason


async def cancel(client: JobClient, queries: Queries, run_id: str, reason: str) -> dict[str, Any]:
    """Ask the orchestrator to cancel `run_id`; its answer, as the API shows it.

    Raises `Refused`: 404 for a run the console has not read, 409 for one that has ended
    or that the orchestrator would not cancel, 504 without an answer in time."""
    run = await queries.run_row(run_id)
    if run is None:
        raise Refused(404, f"no run {run_id!r} is recorded in {queries.topic}, as far as read")
    if run["status"] not in (RunStatus.RUNNING.value, RunStatus.QUEUED.value):
        raise Refused(409, f"run {run_id} has already ended: {run['status']}")
    try:
        event = await client.cancel_job(
            run["job_type"], run_id=run_id, reason=reason, timeout=_ANSWER_TIMEOUT_S
        )
    except JobRejectedError as exc:
        raise Refused(409, f"the orchestrator did not cancel run {run_id}: {exc}") from None
    except JobInvalidError as exc:  # a run whose job type no request can name
        raise Refused(409, f"run {run_id} cannot be cancelled by a request: {exc}") from None
    except JobTimeoutError:
        raise Refused(
            504,
            f"the cancel request for run {run_id} got no answer within {_ANSWER_TIMEOUT_S:g}s; "
            "is a worker running? The run may still be cancelled",
        ) from None
    return {
        "run_id": run_id,
        "type": event.type.value,
        "status": None if event.status is None else event.status.value,
        "request_id": event.request_id,
        "reason": event.reason,
        "occurred_at": event.occurred_at.isoformat(),
    }
