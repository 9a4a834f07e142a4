"""Adopting logged decisions into a job state, without deciding them again.

An audit that starts partway through a log (a window, or inputs the retention deleted)
cannot re-decide what came before: it takes the logged events as decided and builds the
state they imply, then re-decides from there. The status log says everything the state
holds but two things, and `adopt` says so in what it returns:

- deadlines: a heartbeat renews one without an event, so a run adopted as active has no
  known deadline (None) and its run ID is reported *uncertain*; the auditor takes the time
  of its logged `timed_out` as its deadline, or a heartbeat it reads later sets it;
- a run's size against `Limits.run_bytes` counts its request's bytes, which only the
  request holds; the size of its `initial_data` stands in for them.
"""

from __future__ import annotations

import json

from schemas import ENDING_EVENTS, EventType, RunStatus, StatusEvent
from worker.core.lifecycle import (
    Decided,
    EndedRun,
    JobConfig,
    JobState,
    Limits,
    Queued,
    Run,
    run_size,
    scope_key,
)


def _remember(state: JobState, event: StatusEvent, limits: Limits) -> JobState:
    """Record the request's decision as the core does: one entry per request, and a
    replacing start's entry is its start, not the cancel of the run it replaced."""
    if event.request_id is None:
        return state
    earlier = state.decided
    if (
        earlier
        and earlier[-1].request_id == event.request_id
        and earlier[-1].type is EventType.CANCELLED
    ):
        earlier = earlier[:-1]
    decided = (*earlier, Decided(event.request_id, event.type, event.run_id))
    return state.replace(decided=decided[max(0, len(decided) - limits.idempotency_window) :])


def _size(event: StatusEvent) -> int:
    data = json.dumps(event.initial_data or {}, separators=(",", ":")).encode()
    return run_size(len(data), event.client_id)


def _started(state: JobState, event: StatusEvent, config: JobConfig, limits: Limits) -> JobState:
    waiting = next((q for q in state.queue if q.run_id == event.run_id), None)
    run = Run(
        run_id=event.run_id or "",
        job_type=state.job_type,
        client_id=event.client_id,
        request_id=event.request_id or "",
        status=RunStatus.RUNNING,
        started_at=event.started_at or event.occurred_at,
        initial_data=event.initial_data or {},
        scope=scope_key(config, event.client_id),
        deadline=None,
        size=waiting.size if waiting is not None else _size(event),
        was_queued=waiting is not None,
    )
    state = state.replace(
        active=(*state.active, run),
        queue=tuple(q for q in state.queue if q is not waiting),
    )
    return state if waiting is not None else _remember(state, event, limits)


def _queued(state: JobState, event: StatusEvent, config: JobConfig, limits: Limits) -> JobState:
    waiting = Queued(
        run_id=event.run_id or "",
        request_id=event.request_id or "",
        client_id=event.client_id,
        initial_data=event.initial_data or {},
        scope=scope_key(config, event.client_id),
        queued_at=event.occurred_at,
        size=_size(event),
    )
    return _remember(state.replace(queue=(*state.queue, waiting)), event, limits)


def _ended(state: JobState, event: StatusEvent, limits: Limits) -> JobState:
    assert event.status is not None
    ended = (*state.ended, EndedRun(event.run_id or "", event.status, event.occurred_at))
    state = state.replace(
        active=tuple(r for r in state.active if r.run_id != event.run_id),
        queue=tuple(q for q in state.queue if q.run_id != event.run_id),
        ended=ended[max(0, len(ended) - limits.ended_window) :],
    )
    if event.type is EventType.CANCELLED and event.source is not None:
        # A cancel request (or a replacing start, whose own answer follows) is remembered.
        return _remember(state, event, limits)
    return state


def adopt(state: JobState, event: StatusEvent, config: JobConfig, limits: Limits) -> JobState:
    """The state after `event`, taken as decided. Deadlines of runs it starts are unknown."""
    if event.type is EventType.STARTED:
        return _started(state, event, config, limits)
    if event.type is EventType.QUEUED:
        return _queued(state, event, config, limits)
    if event.type is EventType.REFUSED:
        return _remember(state, event, limits)
    if event.type in ENDING_EVENTS:
        return _ended(state, event, limits)
    return state  # duplicate, rejected, progress: the state is as it was


def with_deadline(state: JobState, run_id: str, deadline: StatusEvent) -> JobState:
    """`state` with the run `run_id`'s unknown deadline set to when `deadline` (its logged
    `timed_out`) happened."""
    return state.replace(
        active=tuple(
            r.replace(deadline=deadline.occurred_at)
            if r.run_id == run_id and r.deadline is None
            else r
            for r in state.active
        ),
    )
