"""The pure lifecycle core: every transition, policy, scope and rejection, and replay properties."""

from __future__ import annotations

import heapq
import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pydantic import ValidationError

from schemas import ENDED_STATUSES, EventType, RunStatus, Source, StatusEvent
from worker.core.lifecycle import (
    TRANSITIONS,
    Action,
    AdvanceTime,
    Cancel,
    Command,
    Decided,
    Decision,
    EndedRun,
    Finish,
    JobConfig,
    JobState,
    Limits,
    Policy,
    Progress,
    Queued,
    Reject,
    Run,
    Scope,
    Start,
    _active_in as active_in,
    decide,
    decision_clock,
    dump_state,
    event_id,
    load_state,
    merge_inputs,
    next_deadline,
    overdue,
    scope_key,
    stream_time,
)
from worker.core.runid import RUN_ID_RE, make_run_id


def running_info(
    state: JobState, client_id: str | None = None, config: JobConfig = JobConfig()
) -> Run | None:
    """The active run in the scope of `client_id` (any active run for a per-client job type
    asked without a client)."""
    if config.scope is Scope.JOB_TYPE_CLIENT and client_id is None:
        return state.active[0] if state.active else None
    return active_in(state, scope_key(config, client_id))


def is_running(
    state: JobState, client_id: str | None = None, config: JobConfig = JobConfig()
) -> bool:
    """Whether a run is active in the scope of `client_id`."""
    return running_info(state, client_id, config) is not None


JOB = "post_scoring"
OTHER = "feed_import"
T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
MID = T0 + timedelta(minutes=5)
TIMEOUT = timedelta(minutes=10)
REQUESTS = "jobs.requests"
RESULTS = "jobs.results"

REJECT = JobConfig()
QUEUE = JobConfig(policy=Policy.QUEUE)
REPLACE = JobConfig(policy=Policy.REPLACE)
PER_CLIENT = JobConfig(scope=Scope.JOB_TYPE_CLIENT)
TIMED = JobConfig(timeout=TIMEOUT)
QUEUE_TIMED = JobConfig(policy=Policy.QUEUE, timeout=TIMEOUT)

ENDED_EVENT = {
    RunStatus.COMPLETED: EventType.COMPLETED,
    RunStatus.FAILED: EventType.FAILED,
    RunStatus.CANCELLED: EventType.CANCELLED,
    RunStatus.TIMED_OUT: EventType.TIMED_OUT,
}
ENDED_EVENT_STATUS = {event: status for status, event in ENDED_EVENT.items()}


def start(
    offset: int,
    *,
    job_type: str = JOB,
    partition: int = 0,
    at: datetime = T0,
    request_id: str | None = None,
    client_id: str | None = None,
    initial_data: dict[str, Any] | None = None,
) -> Start:
    """A start command read from the requests topic at `partition`/`offset`."""
    return Start(
        request_id=request_id or f"req-{partition}-{offset}",
        job_type=job_type,
        client_id=client_id,
        initial_data=initial_data if initial_data is not None else {},
        at=at,
        source=Source(topic=REQUESTS, partition=partition, offset=offset),
    )


def finish(
    run_id: str,
    offset: int,
    *,
    status: RunStatus = RunStatus.COMPLETED,
    job_type: str = JOB,
    partition: int = 0,
    at: datetime = T0 + timedelta(minutes=1),
    metrics: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> Finish:
    """A result command read from the results topic at `partition`/`offset`."""
    return Finish(
        job_type=job_type,
        run_id=run_id,
        status=status,
        metrics=metrics if metrics is not None else {},
        request_id=request_id,
        at=at,
        source=Source(topic=RESULTS, partition=partition, offset=offset),
    )


def cancel(
    offset: int,
    *,
    run_id: str | None = None,
    client_id: str | None = None,
    reason: str | None = None,
    request_id: str | None = None,
    job_type: str = JOB,
    at: datetime = T0 + timedelta(minutes=1),
) -> Cancel:
    """A cancel command (by run ID, else by scope) read from the requests topic at `offset`."""
    return Cancel(
        request_id=request_id or f"cancel-{offset}",
        job_type=job_type,
        client_id=client_id,
        run_id=run_id,
        reason=reason,
        at=at,
        source=Source(topic=REQUESTS, partition=0, offset=offset),
    )


def progress(
    run_id: str,
    offset: int,
    *,
    metrics: dict[str, Any] | None,
    at: datetime = MID,
    request_id: str | None = None,
    job_type: str = JOB,
) -> Progress:
    """A progress report (`metrics=None`: a heartbeat) read from the results topic at `offset`."""
    return Progress(
        job_type=job_type,
        run_id=run_id,
        metrics=metrics,
        request_id=request_id,
        at=at,
        source=Source(topic=RESULTS, partition=0, offset=offset),
    )


def advance(now: datetime, job_type: str = JOB) -> AdvanceTime:
    """Time reaches `now` for `job_type`."""
    return AdvanceTime(job_type=job_type, now=now)


def reject(
    offset: int,
    *,
    job_type: str = JOB,
    request_id: str | None = "req-bad",
    run_id: str | None = None,
    reason: str = "schema_invalid: invalid request: job_type: missing",
) -> Reject:
    """A Reject command for an input the shell could not decode."""
    return Reject(
        job_type=job_type,
        request_id=request_id,
        run_id=run_id,
        reason=reason,
        at=T0,
        source=Source(topic=REQUESTS, partition=0, offset=offset),
    )


def only(decision: Decision) -> StatusEvent:
    """The single event of a decision."""
    assert len(decision.events) == 1, decision.events
    return decision.events[0]


def play(
    state: JobState, *commands: Command, config: JobConfig = REJECT, limits: Limits = Limits()
) -> tuple[JobState, list[StatusEvent]]:
    """Apply `commands` in order; the final state and every event."""
    events: list[StatusEvent] = []
    for command in commands:
        state, produced = decide(state, command, config, limits)
        events.extend(produced)
    return state, events


def at_of(command: Command) -> datetime:
    """The time a command happens at."""
    return command.now if isinstance(command, AdvanceTime) else command.at


def runs(state: JobState) -> tuple[Any, ...]:
    """Everything about a state's runs, leaving out the idempotency window."""
    return (state.job_type, state.active, state.queue, state.ended)


def status_in(state: JobState, run_id: str) -> RunStatus | None:
    """A run's status as the state records it, or None for a run it does not know."""
    for run in state.active:
        if run.run_id == run_id:
            return run.status
    if any(q.run_id == run_id for q in state.queue):
        return RunStatus.QUEUED
    ended = [e.status for e in state.ended if e.run_id == run_id]
    return ended[-1] if ended else None


def running_state(
    job_type: str = JOB,
    offset: int = 10,
    at: datetime = T0,
    config: JobConfig = REJECT,
    client_id: str | None = None,
) -> tuple[JobState, Run]:
    """A state with one active run started from `offset`, and that run."""
    cmd = start(offset, job_type=job_type, at=at, client_id=client_id)
    state = decide(JobState(job_type), cmd, config).state
    (run,) = state.active
    return state, run


def ended_state(status: RunStatus) -> tuple[JobState, str]:
    """A state whose only run ended with `status` (as the changelog could restore it)."""
    run_id = make_run_id(T0, 0, 10)
    return JobState(JOB, ended=(EndedRun(run_id, status, T0 + timedelta(minutes=1)),)), run_id


# --- start ------------------------------------------------------------------------------------


def test_start_creates_a_run() -> None:
    """A start with no active run starts one, with a run ID of the documented format."""
    cmd = start(42, partition=0, request_id="r1", client_id="acme", initial_data={"a": [1, 2]})
    decision = decide(JobState(JOB), cmd)
    event = only(decision)
    assert event.type is EventType.STARTED
    assert event.status is RunStatus.RUNNING
    assert event.from_status is None
    assert event.run_id == "250102-030405-0.42"
    assert event.run_id == make_run_id(cmd.at, cmd.source.partition, cmd.source.offset)
    assert RUN_ID_RE.match(event.run_id)
    assert event.request_id == "r1"
    assert event.job_type == JOB
    assert event.client_id == "acme"
    assert event.initial_data == {"a": [1, 2]}
    assert event.started_at == T0
    assert event.occurred_at == T0
    assert event.source == cmd.source
    assert event.event_id == event_id(cmd.source, 0)
    assert event.reason is None
    assert decision.state.active == (
        Run(
            run_id=event.run_id,
            job_type=JOB,
            client_id="acme",
            request_id="r1",
            status=RunStatus.RUNNING,
            started_at=T0,
            initial_data={"a": [1, 2]},
            scope="",
            deadline=None,
        ),
    )
    assert decision.state.queue == ()
    assert decision.state.decided == (Decided("r1", EventType.STARTED, event.run_id),)


def test_second_start_is_refused() -> None:
    """A start while a run is active is refused, naming the active run; only the window grows."""
    state, run = running_state(offset=10)
    later = T0 + timedelta(seconds=30)
    cmd = start(11, at=later, request_id="r2", client_id="other")
    decision = decide(state, cmd)
    event = only(decision)
    assert event.type is EventType.REFUSED
    assert event.run_id == run.run_id
    assert event.started_at == run.started_at == T0
    assert event.status is RunStatus.RUNNING
    assert event.from_status is None
    assert event.request_id == "r2"
    assert event.client_id == "other"
    assert event.occurred_at == later
    assert event.reason is not None
    assert run.run_id in event.reason
    assert runs(decision.state) == runs(state)
    assert decision.state.decided[-1] == Decided("r2", EventType.REFUSED, run.run_id)


def test_refused_start_in_the_same_second_keeps_the_first_run() -> None:
    """Two starts in the same second give one run and one refusal, not two equal run IDs."""
    state, run = running_state(offset=10)
    event = only(decide(state, start(11)))
    assert event.type is EventType.REFUSED
    assert event.run_id == run.run_id


def test_decide_refuses_a_state_of_another_job_type() -> None:
    """Handing the core a command with another job type's state is a programming error."""
    with pytest.raises(ValueError, match="given state of"):
        decide(JobState(OTHER), start(1))


# --- results ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "event_type"),
    [(RunStatus.COMPLETED, EventType.COMPLETED), (RunStatus.FAILED, EventType.FAILED)],
)
def test_result_ends_the_run(status: RunStatus, event_type: EventType) -> None:
    """A result for the active run ends it with its metrics, from RUNNING, and frees the slot."""
    state = decide(JobState(JOB), start(10, client_id="acme", request_id="r1")).state
    (run,) = state.active
    at = T0 + timedelta(minutes=5)
    cmd = finish(run.run_id, 3, status=status, metrics={"scored": 12}, request_id="res-1", at=at)
    decision = decide(state, cmd)
    event = only(decision)
    assert event.type is event_type
    assert event.status is status
    assert event.from_status is RunStatus.RUNNING
    assert event.run_id == run.run_id
    assert event.metrics == {"scored": 12}
    assert event.client_id == "acme"
    assert event.request_id == "res-1"
    assert event.started_at == T0
    assert event.occurred_at == at
    assert event.source == cmd.source
    assert event.event_id == event_id(cmd.source, 0)
    assert decision.state.active == ()
    assert decision.state.ended == (EndedRun(run.run_id, status, at),)
    assert decision.state.decided == state.decided
    restarted = only(decide(decision.state, start(11, at=at)))
    assert restarted.type is EventType.STARTED
    assert restarted.run_id != run.run_id


def test_result_with_an_unnormalized_run_id_ends_the_run() -> None:
    """A result naming the run in upper case, padded, with leading zeros, still ends it."""
    state, run = running_state(offset=10)
    event = only(decide(state, finish("  250102-030405-000.0010 \n", 1)))
    assert event.type is EventType.COMPLETED
    assert event.run_id == run.run_id


@dataclass(frozen=True)
class RejectCase:
    """A result that must be rejected: the state it meets and what the reason must say."""

    name: str
    state: JobState
    command: Finish
    reason_contains: tuple[str, ...]
    run_id: str | None
    status: RunStatus | None = None


def _reject_cases() -> list[RejectCase]:
    running, run = running_state(offset=10)
    _, other_run = running_state(job_type=OTHER, offset=20)
    done = decide(running, finish(run.run_id, 1)).state
    failed = decide(running, finish(run.run_id, 1, status=RunStatus.FAILED)).state
    queued = decide(running, start(11, request_id="rq"), QUEUE).state
    unknown = make_run_id(T0, 0, 99)
    return [
        RejectCase(
            "unknown run, nothing active",
            JobState(JOB),
            finish(unknown, 5),
            ("unknown run", unknown, JOB),
            unknown,
        ),
        RejectCase(
            "unknown run, another run active",
            running,
            finish(unknown, 5),
            ("unknown run", unknown),
            unknown,
        ),
        RejectCase(
            "run of another job type, nothing active",
            JobState(JOB),
            finish(other_run.run_id, 5),
            ("unknown run", other_run.run_id, JOB),
            other_run.run_id,
        ),
        RejectCase(
            "run of another job type, own run active",
            running,
            finish(other_run.run_id, 5, status=RunStatus.FAILED),
            ("unknown run", other_run.run_id),
            other_run.run_id,
        ),
        RejectCase(
            "run already completed",
            done,
            finish(run.run_id, 5, status=RunStatus.FAILED),
            ("already ended", "COMPLETED", run.run_id),
            run.run_id,
            RunStatus.COMPLETED,
        ),
        RejectCase(
            "run already failed",
            failed,
            finish(run.run_id, 5),
            ("already ended", "FAILED"),
            run.run_id,
            RunStatus.FAILED,
        ),
        RejectCase(
            "run still queued",
            queued,
            finish(make_run_id(T0, 0, 11), 5),
            ("queued", "has not started", make_run_id(T0, 0, 11)),
            make_run_id(T0, 0, 11),
            RunStatus.QUEUED,
        ),
        RejectCase(
            "invalid run ID",
            running,
            finish("not-a-run", 5),
            ("not-a-run", "YYMMDD-HHMMSS-<partition>.<offset>"),
            "not-a-run",
        ),
        RejectCase(
            "impossible date in run ID",
            running,
            finish("251399-030405-0.10", 5),
            ("impossible date",),
            "251399-030405-0.10",
        ),
        RejectCase(
            "seed-style run ID with no match",
            running,
            finish("250102-030406", 5),
            ("no run", "seed-style", "250102-030406"),
            "250102-030406",
        ),
        RejectCase(
            "seed-style run ID with another client",
            running,
            finish("250102-030405-acme", 5),
            ("no run", "seed-style"),
            "250102-030405-acme",
        ),
    ]


@pytest.mark.parametrize("case", _reject_cases(), ids=lambda c: c.name)
def test_result_rejected(case: RejectCase) -> None:
    """A result that cannot apply yields one rejected event with a specific reason, no change."""
    decision = decide(case.state, case.command.replace(request_id="res-9"), QUEUE)
    event = only(decision)
    assert decision.state is case.state
    assert event.type is EventType.REJECTED
    assert event.run_id == case.run_id
    assert event.status is case.status
    assert event.request_id == "res-9"
    assert event.job_type == JOB
    assert event.from_status is None
    assert event.metrics is None
    assert event.source == case.command.source
    assert event.event_id == event_id(case.command.source, 0)
    assert event.reason is not None
    for fragment in case.reason_contains:
        assert fragment in event.reason


def test_result_for_another_job_types_run_leaves_both_runs_alone() -> None:
    """A result sent under the wrong job type neither ends that run nor the job type's own run."""
    own, own_run = running_state(JOB, offset=10)
    other, other_run = running_state(OTHER, offset=20)
    decision = decide(own, finish(other_run.run_id, 5))
    assert only(decision).type is EventType.REJECTED
    assert running_info(decision.state) == own_run
    assert running_info(other) == other_run


# --- seed-style run IDs -----------------------------------------------------------------------


def test_seed_run_id_resolves_to_the_only_matching_active_run() -> None:
    """A seed-style ID matching exactly the active run ends that run."""
    state, run = running_state(offset=10)
    event = only(decide(state, finish("250102-030405", 1)))
    assert event.type is EventType.COMPLETED
    assert event.run_id == run.run_id


def test_seed_run_id_resolves_to_an_ended_run() -> None:
    """A seed-style ID matching exactly one ended run is rejected as already ended."""
    state, run = running_state(offset=10)
    state = decide(state, finish(run.run_id, 1)).state
    later = T0 + timedelta(hours=1)
    state = decide(state, start(11, at=later)).state
    decision = decide(state, finish("250102-030405", 2))
    event = only(decision)
    assert event.type is EventType.REJECTED
    assert event.run_id == run.run_id
    assert event.status is RunStatus.COMPLETED
    assert decision.state is state


def test_seed_run_id_ambiguous() -> None:
    """A seed-style ID matching two runs started in the same second is rejected as ambiguous."""
    state, first = running_state(offset=10)
    state = decide(state, finish(first.run_id, 1, at=T0)).state
    state = decide(state, start(11, at=T0)).state
    (second,) = state.active
    assert second.run_id != first.run_id
    decision = decide(state, finish("250102-030405", 2))
    event = only(decision)
    assert event.type is EventType.REJECTED
    assert decision.state is state
    assert event.reason is not None
    assert "ambiguous" in event.reason
    assert first.run_id in event.reason
    assert second.run_id in event.reason


def test_seed_run_id_is_refused_once_a_run_of_its_second_may_be_forgotten() -> None:
    """Two runs of one second ended; a third pushes the first out of an ended window of 2.
    The seed-style ID now matches only the second run, but it may have meant the first:
    it is refused, asking for the full run ID, instead of landing on a guess."""
    limits = Limits(ended_window=2)
    state, _ = play(
        JobState(JOB),
        start(10, at=T0),
        finish(make_run_id(T0, 0, 10), 11, at=T0),
        start(12, at=T0),
        finish(make_run_id(T0, 0, 12), 13, at=T0 + timedelta(seconds=1)),
        limits=limits,
    )
    remembered = decide(state, finish("250102-030405", 14), REJECT, limits)
    assert "ambiguous" in (only(remembered).reason or "")  # both still in the window
    later = T0 + timedelta(hours=1)
    state, _ = play(
        state, start(15, at=later), finish(make_run_id(later, 0, 15), 16, at=later), limits=limits
    )
    assert [e.run_id for e in state.ended] == [make_run_id(T0, 0, 12), make_run_id(later, 0, 15)]
    event = only(decide(state, finish("250102-030405", 17, at=later), REJECT, limits))
    assert event.type is EventType.REJECTED
    assert event.reason is not None
    assert "give the full run ID" in event.reason
    # The full run ID still resolves.
    full = only(decide(state, finish(make_run_id(T0, 0, 12), 18, at=later), REJECT, limits))
    assert "already ended" in (full.reason or "")


def test_seed_run_id_with_no_runs_at_all() -> None:
    """A seed-style ID for a job type that never ran is rejected as matching no run."""
    event = only(decide(JobState(JOB), finish("250102-030405", 2)))
    assert event.type is EventType.REJECTED
    assert event.reason is not None
    assert "no run" in event.reason


def test_seed_run_id_resolves_a_queued_run_for_a_cancel() -> None:
    """A seed-style ID naming a queued run cancels that run."""
    state, _ = running_state(offset=10, config=QUEUE)
    later = T0 + timedelta(seconds=7)
    state = decide(state, start(11, at=later), QUEUE).state
    event = only(decide(state, cancel(20, run_id="250102-030412"), QUEUE))
    assert event.type is EventType.CANCELLED
    assert event.run_id == make_run_id(later, 0, 11)
    assert event.from_status is RunStatus.QUEUED


# --- policies ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "busy", "idle"),
    [
        (REJECT, [EventType.REFUSED], [EventType.STARTED]),
        (QUEUE, [EventType.QUEUED], [EventType.STARTED]),
        (REPLACE, [EventType.CANCELLED, EventType.STARTED], [EventType.STARTED]),
    ],
    ids=["reject", "queue", "replace"],
)
def test_policy_decides_a_start(
    config: JobConfig, busy: list[EventType], idle: list[EventType]
) -> None:
    """A start on a free scope starts under every policy; on a busy one it follows the policy."""
    assert [e.type for e in decide(JobState(JOB), start(1), config).events] == idle
    state, _ = running_state(config=config)
    assert [e.type for e in decide(state, start(11), config).events] == busy


def test_default_policy_is_reject_and_scope_is_job_type() -> None:
    """JobConfig() is the seed's behaviour: reject, one run per job type, no timeout."""
    assert JobConfig() == JobConfig(policy=Policy.REJECT, scope=Scope.JOB_TYPE, timeout=None)


def test_queue_policy_queues_a_start_with_a_run_id_of_its_own() -> None:
    """Under `queue`, a start while a run is active is queued with its own run ID, not started."""
    state, run = running_state(config=QUEUE)
    later = T0 + timedelta(seconds=30)
    cmd = start(11, at=later, request_id="r2", client_id="c", initial_data={"k": 1})
    decision = decide(state, cmd, QUEUE)
    event = only(decision)
    assert event.type is EventType.QUEUED
    assert event.status is RunStatus.QUEUED
    assert event.from_status is None
    assert event.run_id == make_run_id(later, 0, 11)
    assert event.run_id != run.run_id
    assert event.request_id == "r2"
    assert event.client_id == "c"
    assert event.initial_data == {"k": 1}
    assert event.reason is not None
    assert run.run_id in event.reason
    assert event.source == cmd.source
    assert event.event_id == event_id(cmd.source, 0)
    assert decision.state.active == (run,)
    assert decision.state.queue == (
        Queued(event.run_id, "r2", "c", "", later, initial_data={"k": 1}),
    )
    assert decision.state.decided[-1] == Decided("r2", EventType.QUEUED, event.run_id)
    assert running_info(decision.state, "c", QUEUE) == run


def _queue_of_three() -> tuple[JobState, Run, Queued, Queued]:
    """A running run A (request ra) with B (rb, client b) and C (rc) queued behind it."""
    state, _ = play(
        JobState(JOB),
        start(10, request_id="ra"),
        start(
            11,
            request_id="rb",
            client_id="b",
            initial_data={"who": "b"},
            at=T0 + timedelta(seconds=1),
        ),
        start(12, request_id="rc", at=T0 + timedelta(seconds=2)),
        config=QUEUE_TIMED,
    )
    (a,) = state.active
    b, c = state.queue
    return state, a, b, c


ENDINGS: dict[str, Callable[[Run], tuple[Command, EventType]]] = {
    "completed": lambda a: (finish(a.run_id, 1, at=MID), EventType.COMPLETED),
    "failed": lambda a: (finish(a.run_id, 1, at=MID, status=RunStatus.FAILED), EventType.FAILED),
    "cancelled by run ID": lambda a: (cancel(20, run_id=a.run_id, at=MID), EventType.CANCELLED),
    "cancelled by job type": lambda a: (cancel(20, at=MID), EventType.CANCELLED),
    "timed out at the deadline": lambda a: (advance(T0 + TIMEOUT), EventType.TIMED_OUT),
    "timed out after the deadline": lambda a: (advance(T0 + 2 * TIMEOUT), EventType.TIMED_OUT),
}


@pytest.mark.parametrize("how", list(ENDINGS))
def test_next_queued_run_starts_when_the_active_run_ends(how: str) -> None:
    """However the active run ends, the oldest queued run starts from QUEUED with its request."""
    state, a, b, c = _queue_of_three()
    cmd, end_type = ENDINGS[how](a)
    at = at_of(cmd)
    decision = decide(state, cmd, QUEUE_TIMED)
    ended, started = decision.events
    assert ended.type is end_type
    assert ended.run_id == a.run_id
    assert ended.from_status is RunStatus.RUNNING
    assert started.type is EventType.STARTED
    assert started.status is RunStatus.RUNNING
    assert started.from_status is RunStatus.QUEUED
    assert started.run_id == b.run_id
    assert started.request_id == "rb"
    assert started.client_id == "b"
    assert started.initial_data == {"who": "b"}
    assert started.started_at == started.occurred_at == at
    assert started.source == (None if isinstance(cmd, AdvanceTime) else cmd.source)
    assert ended.event_id != started.event_id
    assert decision.state.active == (
        Run(b.run_id, JOB, "b", "rb", RunStatus.RUNNING, at, {"who": "b"}, "", at + TIMEOUT),
    )
    assert decision.state.queue == (c,)
    assert decision.state.ended[-1] == EndedRun(a.run_id, ENDED_EVENT_STATUS[end_type], at)
    # FIFO: C follows B.
    then = decide(decision.state, finish(b.run_id, 2, at=at + timedelta(minutes=1)), QUEUE_TIMED)
    assert [(e.type, e.run_id, e.request_id) for e in then.events] == [
        (EventType.COMPLETED, b.run_id, None),
        (EventType.STARTED, c.run_id, "rc"),
    ]
    assert then.state.queue == ()


def test_queued_runs_start_once_each_in_order() -> None:
    """Five queued starts run one after another, in the order they were asked for."""
    starts = [start(10 + i, request_id=f"r{i}", at=T0 + timedelta(seconds=i)) for i in range(6)]
    state, events = play(JobState(JOB), *starts, config=QUEUE)
    order = []
    for i in range(6):
        (run,) = state.active
        order.append(run.request_id)
        state, _ = play(state, finish(run.run_id, i), config=QUEUE)
    assert order == [f"r{i}" for i in range(6)]
    assert state.active == state.queue == ()
    assert [e.type for e in events] == [EventType.STARTED] + [EventType.QUEUED] * 5


def test_replace_policy_cancels_the_active_run_then_starts_the_new_one() -> None:
    """Under `replace`, a start yields `cancelled` (with a reason) then `started`, distinct IDs."""
    state, run = running_state(config=REPLACE)
    later = T0 + timedelta(seconds=30)
    cmd = start(11, at=later, request_id="r2", initial_data={"v": 2})
    decision = decide(state, cmd, REPLACE)
    cancelled, started = decision.events
    assert cancelled.type is EventType.CANCELLED
    assert cancelled.status is RunStatus.CANCELLED
    assert cancelled.from_status is RunStatus.RUNNING
    assert cancelled.run_id == run.run_id
    assert cancelled.request_id == "r2"
    assert cancelled.started_at == T0
    assert cancelled.reason is not None
    assert "replaced" in cancelled.reason
    assert "r2" in cancelled.reason
    assert started.type is EventType.STARTED
    assert started.from_status is None
    assert started.run_id == make_run_id(later, 0, 11)
    assert started.request_id == "r2"
    assert started.initial_data == {"v": 2}
    assert cancelled.event_id == event_id(cmd.source, 0)
    assert started.event_id == event_id(cmd.source, 1)
    assert cancelled.event_id != started.event_id
    assert decide(state, cmd, REPLACE) == decision
    (new,) = decision.state.active
    assert new.run_id == started.run_id
    assert decision.state.ended == (EndedRun(run.run_id, RunStatus.CANCELLED, later),)
    late = only(decide(decision.state, finish(run.run_id, 1), REPLACE))
    assert late.type is EventType.REJECTED
    assert late.reason == f"run {run.run_id} already ended CANCELLED"


def test_replace_only_replaces_the_same_clients_run() -> None:
    """Under `replace` with client scope, a start replaces its own client's run only."""
    config = JobConfig(policy=Policy.REPLACE, scope=Scope.JOB_TYPE_CLIENT)
    state, _ = play(JobState(JOB), start(1, client_id="a"), start(2, client_id="b"), config=config)
    a_run, b_run = state.active
    decision = decide(state, start(3, client_id="a"), config)
    assert [(e.type, e.run_id) for e in decision.events] == [
        (EventType.CANCELLED, a_run.run_id),
        (EventType.STARTED, make_run_id(T0, 0, 3, "a")),
    ]
    assert b_run in decision.state.active


# --- scopes -----------------------------------------------------------------------------------


def test_two_clients_run_concurrently_under_client_scope() -> None:
    """Under job_type+client, two clients each get a run, with the lower-cased client suffix."""
    state, events = play(
        JobState(JOB), start(10, client_id="Acme"), start(11, client_id="bob"), config=PER_CLIENT
    )
    assert [e.type for e in events] == [EventType.STARTED, EventType.STARTED]
    acme, bob = state.active
    assert acme.run_id == "250102-030405-0.10-acme"
    assert bob.run_id == "250102-030405-0.11-bob"
    assert (acme.scope, bob.scope) == ("acme", "bob")  # as the run-ID suffix spells it
    assert running_info(state, "Acme", PER_CLIENT) == acme
    assert running_info(state, "bob", PER_CLIENT) == bob
    assert not is_running(state, "carol", PER_CLIENT)
    assert running_info(state, None, PER_CLIENT) in (acme, bob)
    refused = only(decide(state, start(12, client_id="Acme"), PER_CLIENT))
    assert refused.type is EventType.REFUSED
    assert refused.run_id == acme.run_id
    assert refused.reason is not None
    assert "'Acme'" in refused.reason
    done = decide(state, finish(bob.run_id, 1), PER_CLIENT).state
    assert done.active == (acme,)


def test_client_ids_differing_in_case_share_one_scope() -> None:
    """`Acme` and ` acme` are one client, as their run IDs (one suffix) say: a second start
    is refused, not a second run with the same suffix. A state written before scopes were
    lower-cased (scope `Acme`) is honoured too."""
    state, _ = play(JobState(JOB), start(10, client_id="Acme"), config=PER_CLIENT)
    refused = only(decide(state, start(11, client_id=" acme"), PER_CLIENT))
    assert refused.type is EventType.REFUSED
    old = state.replace(active=tuple(r.replace(scope="Acme") for r in state.active))
    assert only(decide(old, start(12, client_id="ACME"), PER_CLIENT)).type is EventType.REFUSED
    queued_config = JobConfig(policy=Policy.QUEUE, scope=Scope.JOB_TYPE_CLIENT)
    waiting = decide(old, start(13, client_id="acme"), queued_config).state
    (run,) = waiting.active
    ended = decide(waiting, finish(run.run_id, 14), queued_config)
    assert [e.type for e in ended.events] == [EventType.COMPLETED, EventType.STARTED]


def test_job_type_scope_ignores_the_client() -> None:
    """Under job_type scope, a start from another client is refused and run IDs get no suffix."""
    state, run = running_state(client_id="acme")
    assert run.run_id == make_run_id(T0, 0, 10)
    assert run.scope == scope_key(REJECT, "acme") == ""
    event = only(decide(state, start(11, client_id="bob")))
    assert event.type is EventType.REFUSED
    assert running_info(state, "bob") == run


def test_client_scope_without_a_client_has_its_own_scope() -> None:
    """Under job_type+client, a start without a client runs in the client-less scope."""
    state, _ = play(JobState(JOB), start(10), start(11, client_id="a"), config=PER_CLIENT)
    plain, client = state.active
    assert plain.run_id == make_run_id(T0, 0, 10)
    assert (plain.scope, client.scope) == ("", "a")
    assert only(decide(state, start(12), PER_CLIENT)).run_id == plain.run_id


def test_seed_style_id_with_client_suffix_resolves() -> None:
    """A seed-style ID with a client suffix (any case) names that client's run only."""
    state, _ = play(
        JobState(JOB), start(10, client_id="Acme"), start(11, client_id="bob"), config=PER_CLIENT
    )
    acme, _ = state.active
    event = only(decide(state, finish(" 250102-030405-ACME ", 1), PER_CLIENT))
    assert event.type is EventType.COMPLETED
    assert event.run_id == acme.run_id
    plain = only(decide(state, finish("250102-030405", 1), PER_CLIENT))
    assert plain.type is EventType.REJECTED


def test_queue_is_per_scope() -> None:
    """Under queue with client scope, a queued start waits only for its own client's run."""
    config = JobConfig(policy=Policy.QUEUE, scope=Scope.JOB_TYPE_CLIENT)
    state, events = play(
        JobState(JOB),
        start(1, client_id="a"),
        start(2, client_id="a", request_id="a2"),
        start(3, client_id="b"),
        config=config,
    )
    assert [e.type for e in events] == [EventType.STARTED, EventType.QUEUED, EventType.STARTED]
    a_run, b_run = state.active
    after_b = decide(state, finish(b_run.run_id, 1), config)
    assert [e.type for e in after_b.events] == [EventType.COMPLETED]
    after_a = decide(after_b.state, finish(a_run.run_id, 2), config)
    assert [(e.type, e.request_id) for e in after_a.events] == [
        (EventType.COMPLETED, None),
        (EventType.STARTED, "a2"),
    ]


# --- idempotency ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepeatCase:
    """A request decided before, sent again: the state it meets and the original decision."""

    name: str
    state: JobState
    command: Start | Cancel
    config: JobConfig
    original_type: EventType
    run_id: str | None
    status: RunStatus | None


def _repeat_cases() -> list[RepeatCase]:
    later = T0 + timedelta(minutes=3)
    running, run = running_state(offset=10)
    first = start(10)
    refused_cmd = start(11, request_id="again")
    refused = decide(running, refused_cmd).state
    queued_cmd = start(11, request_id="wait")
    queued = decide(running, queued_cmd, QUEUE).state
    completed = decide(running, finish(run.run_id, 1)).state
    cancel_cmd = cancel(30, run_id=run.run_id, request_id="stop")
    cancelled = decide(running, cancel_cmd).state
    return [
        RepeatCase("start that started", running, first, REJECT, EventType.STARTED, run.run_id,
                   RunStatus.RUNNING),
        RepeatCase("start that started, run since ended", completed, first, REJECT,
                   EventType.STARTED, run.run_id, RunStatus.COMPLETED),
        RepeatCase("start that was refused", refused, refused_cmd, REJECT, EventType.REFUSED,
                   run.run_id, RunStatus.RUNNING),
        RepeatCase("start that was queued", queued, queued_cmd, QUEUE, EventType.QUEUED,
                   make_run_id(T0, 0, 11), RunStatus.QUEUED),
        RepeatCase("cancel that cancelled", cancelled, cancel_cmd, REJECT, EventType.CANCELLED,
                   run.run_id, RunStatus.CANCELLED),
        RepeatCase("start repeated with other fields", running,
                   first.replace(client_id="x", initial_data={"y": 1}, at=later), REJECT,
                   EventType.STARTED, run.run_id, RunStatus.RUNNING),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _repeat_cases(), ids=lambda c: c.name)
def test_repeated_request_is_a_duplicate(case: RepeatCase) -> None:
    """A request ID seen in the window gets `duplicate` with the original decision; no change."""
    resent = case.command.replace(source=Source(topic=REQUESTS, partition=0, offset=900))
    decision = decide(case.state, resent, case.config)
    event = only(decision)
    assert decision.state is case.state
    assert event.type is EventType.DUPLICATE
    assert event.original_type is case.original_type
    assert event.run_id == case.run_id
    assert event.status is case.status
    assert event.request_id == case.command.request_id
    assert event.from_status is None
    assert event.source == resent.source
    assert event.event_id == event_id(resent.source, 0)
    assert event.reason is not None
    assert case.command.request_id in event.reason


def test_duplicate_of_a_replacing_start_names_the_new_run() -> None:
    """A repeated replacing start answers `duplicate` of `started`, naming the run it started."""
    state, _ = running_state(config=REPLACE)
    cmd = start(11, request_id="r2")
    state = decide(state, cmd, REPLACE).state
    (new,) = state.active
    resent = cmd.replace(source=Source(topic=REQUESTS, partition=0, offset=12))
    event = only(decide(state, resent, REPLACE))
    assert event.type is EventType.DUPLICATE
    assert (event.original_type, event.run_id) == (EventType.STARTED, new.run_id)


def test_repeat_outside_the_window_is_decided_anew() -> None:
    """A request ID that fell out of the window is decided again, as if new."""
    limits = Limits(idempotency_window=2)
    state = JobState(JOB)
    for i in range(3):
        at = T0 + timedelta(minutes=i)
        state, (event,) = play(state, start(i, request_id=f"r{i}", at=at), limits=limits)
        assert event.run_id is not None
        state, _ = play(state, finish(event.run_id, i, at=at), limits=limits)
    assert [d.request_id for d in state.decided] == ["r1", "r2"]
    repeat_old = only(
        decide(state, start(50, request_id="r0", at=T0 + timedelta(hours=1)), limits=limits)
    )
    assert repeat_old.type is EventType.STARTED
    assert repeat_old.run_id == make_run_id(T0 + timedelta(hours=1), 0, 50)
    repeat_recent = only(decide(state, start(51, request_id="r1"), limits=limits))
    assert repeat_recent.type is EventType.DUPLICATE


def test_window_of_zero_remembers_nothing_but_a_start_is_never_a_second_run() -> None:
    """With idempotency_window=0 nothing is remembered, yet a repeat of a start whose run is
    still active is a `duplicate` naming that run (never refused naming itself, queued
    behind itself or replacing itself); once the run has ended, a repeat is decided anew."""
    limits = Limits(idempotency_window=0)
    state = decide(JobState(JOB), start(10, request_id="r1"), limits=limits).state
    assert state.decided == ()
    for config in (REJECT, QUEUE, REPLACE):
        decision = decide(state, start(11, request_id="r1"), config, limits=limits)
        event = only(decision)
        assert event.type is EventType.DUPLICATE
        assert event.original_type is EventType.STARTED
        assert event.run_id == make_run_id(T0, 0, 10)
        assert decision.state is state
    ended = decide(state, finish(make_run_id(T0, 0, 10), 12), limits=limits).state
    assert only(decide(ended, start(13, request_id="r1"), limits=limits)).type is (
        EventType.STARTED
    )


def test_window_keeps_the_newest_decisions() -> None:
    """The window keeps the last `idempotency_window` decisions, oldest first."""
    limits = Limits(idempotency_window=3)
    commands = [start(i, request_id=f"r{i}") for i in range(6)]
    state, _ = play(JobState(JOB), *commands, limits=limits)
    assert [d.request_id for d in state.decided] == ["r3", "r4", "r5"]


def test_reject_and_results_are_not_remembered() -> None:
    """Results, progress and Reject commands never enter the idempotency window."""
    state, run = running_state(config=TIMED)
    state, _ = play(
        state,
        progress(run.run_id, 1, metrics={"a": 1}, request_id="p1"),
        reject(2, request_id="x1"),
        finish(run.run_id, 3, request_id="f1"),
        config=TIMED,
    )
    assert [d.request_id for d in state.decided] == [run.request_id]


# --- cancel -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "expected"),
    [("wrong input", "wrong input"), (None, "cancelled by request stop-1")],
)
def test_cancel_by_run_id_ends_the_active_run(reason: str | None, expected: str) -> None:
    """A cancel naming the active run ends it CANCELLED with the given (or a default) reason."""
    state, run = running_state(client_id="acme")
    cmd = cancel(20, run_id=run.run_id.upper(), reason=reason, request_id="stop-1")
    decision = decide(state, cmd)
    event = only(decision)
    assert event.type is EventType.CANCELLED
    assert event.status is RunStatus.CANCELLED
    assert event.from_status is RunStatus.RUNNING
    assert event.run_id == run.run_id
    assert event.request_id == "stop-1"
    assert event.client_id == "acme"
    assert event.reason == expected
    assert event.started_at == T0
    assert event.source == cmd.source
    assert decision.state.active == ()
    assert decision.state.ended == (EndedRun(run.run_id, RunStatus.CANCELLED, cmd.at),)
    assert decision.state.decided[-1] == Decided("stop-1", EventType.CANCELLED, run.run_id)


def test_cancel_a_queued_run() -> None:
    """A cancel naming a queued run ends it from QUEUED; the active run and the rest stay."""
    state, a, b, c = _queue_of_three()
    cmd = cancel(20, run_id=b.run_id, reason="not needed", at=MID)
    decision = decide(state, cmd, QUEUE_TIMED)
    event = only(decision)
    assert event.type is EventType.CANCELLED
    assert event.status is RunStatus.CANCELLED
    assert event.from_status is RunStatus.QUEUED
    assert event.run_id == b.run_id
    assert event.client_id == "b"
    assert event.reason == "not needed"
    assert decision.state.active == (a,)
    assert decision.state.queue == (c,)
    assert decision.state.ended == (EndedRun(b.run_id, RunStatus.CANCELLED, MID),)
    then = decide(decision.state, finish(a.run_id, 1, at=MID), QUEUE_TIMED)
    assert [(e.type, e.run_id) for e in then.events] == [
        (EventType.COMPLETED, a.run_id),
        (EventType.STARTED, c.run_id),
    ]


def test_cancel_by_job_type_ends_the_active_run() -> None:
    """A cancel naming no run ends the job type's active run."""
    state, run = running_state()
    event = only(decide(state, cancel(20, client_id="whoever")))
    assert event.type is EventType.CANCELLED
    assert event.run_id == run.run_id


def test_cancel_by_job_type_and_client_ends_only_that_clients_run() -> None:
    """Under client scope, a cancel naming a client ends that client's run and no other."""
    state, _ = play(
        JobState(JOB), start(1, client_id="a"), start(2, client_id="b"), config=PER_CLIENT
    )
    a_run, b_run = state.active
    decision = decide(state, cancel(20, client_id="b"), PER_CLIENT)
    event = only(decision)
    assert event.type is EventType.CANCELLED
    assert event.run_id == b_run.run_id
    assert event.client_id == "b"
    assert decision.state.active == (a_run,)


@dataclass(frozen=True)
class CancelRejectCase:
    """A cancel that must be rejected: the state, the cancel, and what the reason must say."""

    name: str
    state: JobState
    command: Cancel
    config: JobConfig
    reason_contains: tuple[str, ...]
    run_id: str | None
    status: RunStatus | None = None


def _cancel_reject_cases() -> list[CancelRejectCase]:
    running, run = running_state(offset=10)
    done = decide(running, finish(run.run_id, 1)).state
    timed_out = decide(running_state(config=TIMED)[0], advance(T0 + TIMEOUT), TIMED).state
    clients = decide(JobState(JOB), start(1, client_id="a"), PER_CLIENT).state
    unknown = make_run_id(T0, 0, 99)
    return [
        CancelRejectCase("ended run", done, cancel(20, run_id=run.run_id), REJECT,
                         ("already ended", "COMPLETED", run.run_id), run.run_id,
                         RunStatus.COMPLETED),
        CancelRejectCase("timed-out run", timed_out, cancel(20, run_id=run.run_id), TIMED,
                         ("already ended", "TIMED_OUT"), run.run_id, RunStatus.TIMED_OUT),
        CancelRejectCase("unknown run", running, cancel(20, run_id=unknown), REJECT,
                         ("unknown run", unknown), unknown),
        CancelRejectCase("invalid run ID", running, cancel(20, run_id="nope"), REJECT,
                         ("nope",), "nope"),
        CancelRejectCase("nothing active", done, cancel(20), REJECT,
                         ("nothing to cancel", JOB), None),
        CancelRejectCase("nothing active for the client", clients, cancel(20, client_id="b"),
                         PER_CLIENT, ("nothing to cancel", "'b'"), None),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _cancel_reject_cases(), ids=lambda c: c.name)
def test_cancel_rejected(case: CancelRejectCase) -> None:
    """A cancel that cannot apply is rejected with a specific reason and the state unchanged."""
    decision = decide(case.state, case.command, case.config)
    event = only(decision)
    assert event.type is EventType.REJECTED
    assert event.run_id == case.run_id
    assert event.status is case.status
    assert event.request_id == case.command.request_id
    assert event.client_id == case.command.client_id
    assert event.from_status is None
    assert event.reason is not None
    for fragment in case.reason_contains:
        assert fragment in event.reason
    assert decision.state is case.state


def test_rejected_cancel_is_not_remembered() -> None:
    """A rejected cancel leaves no trace, so the same request sent again is decided anew."""
    stop = cancel(20, request_id="stop")
    state = JobState(JOB)
    assert decide(state, stop).state is state
    state, run = running_state()
    resent = stop.replace(source=Source(topic=REQUESTS, partition=0, offset=21))
    event = only(decide(state, resent))
    assert event.type is EventType.CANCELLED
    assert event.run_id == run.run_id


def test_cancel_by_job_type_under_client_scope_does_not_deny_active_runs() -> None:
    """A cancel naming only the job type never claims it has no active run while runs are active."""
    state = decide(JobState(JOB), start(1, client_id="a"), PER_CLIENT).state
    assert is_running(state, None, PER_CLIENT)
    event = only(decide(state, cancel(20), PER_CLIENT))
    assert event.type is EventType.CANCELLED or "has no active run" not in (event.reason or "")


# --- progress and heartbeats ------------------------------------------------------------------


def test_progress_reports_metrics_and_renews_the_deadline() -> None:
    """Progress with metrics emits `progress` and moves the deadline to its time plus timeout."""
    state, run = running_state(config=TIMED, client_id="acme")
    assert run.deadline == T0 + TIMEOUT
    cmd = progress(run.run_id, 4, metrics={"done": 3}, request_id="p1")
    decision = decide(state, cmd, TIMED)
    event = only(decision)
    assert event.type is EventType.PROGRESS
    assert event.status is RunStatus.RUNNING
    assert event.from_status is RunStatus.RUNNING
    assert event.run_id == run.run_id
    assert event.metrics == {"done": 3}
    assert event.request_id == "p1"
    assert event.client_id == "acme"
    assert event.started_at == T0
    assert event.occurred_at == MID
    assert event.source == cmd.source
    assert event.event_id == event_id(cmd.source, 0)
    assert decision.state.active == (run.replace(deadline=MID + TIMEOUT),)
    assert decision.state.decided == state.decided


def test_progress_without_a_timeout_changes_no_state() -> None:
    """Progress for a run without a timeout emits `progress` and leaves the state as it was."""
    state, run = running_state()
    decision = decide(state, progress(run.run_id, 4, metrics={"n": 1}))
    assert only(decision).type is EventType.PROGRESS
    assert decision.state is state


def test_heartbeat_renews_the_deadline_silently() -> None:
    """A heartbeat emits nothing and renews the deadline; the run then times out later."""
    state, run = running_state(config=TIMED)
    decision = decide(state, progress(run.run_id, 4, metrics=None), TIMED)
    assert decision.events == ()
    assert decision.state.active == (run.replace(deadline=MID + TIMEOUT),)
    assert decide(decision.state, advance(T0 + TIMEOUT), TIMED).events == ()
    late = only(decide(decision.state, advance(MID + TIMEOUT), TIMED))
    assert late.type is EventType.TIMED_OUT


def test_heartbeat_without_a_timeout_is_a_no_op() -> None:
    """A heartbeat for a run without a timeout emits nothing and changes nothing."""
    state, run = running_state()
    decision = decide(state, progress(run.run_id, 4, metrics=None))
    assert decision.events == ()
    assert decision.state is state


def _progress_reject_cases() -> list[tuple[str, JobState, str, tuple[str, ...], RunStatus | None]]:
    running, run = running_state(config=QUEUE_TIMED)
    done = decide(running, finish(run.run_id, 1), QUEUE_TIMED).state
    queued = decide(running, start(11), QUEUE_TIMED).state
    unknown = make_run_id(T0, 0, 99)
    queued_id = make_run_id(T0, 0, 11)
    return [
        ("unknown", running, unknown, ("unknown run", unknown), None),
        ("ended", done, run.run_id, ("already ended", "COMPLETED"), RunStatus.COMPLETED),
        ("queued", queued, queued_id, ("queued", "has not started"), RunStatus.QUEUED),
    ]


@pytest.mark.parametrize("metrics", [{"n": 1}, None], ids=["progress", "heartbeat"])
@pytest.mark.parametrize(
    ("state", "run_id", "fragments", "status"),
    [case[1:] for case in _progress_reject_cases()],
    ids=[case[0] for case in _progress_reject_cases()],
)
def test_progress_rejected(
    state: JobState,
    run_id: str,
    fragments: tuple[str, ...],
    status: RunStatus | None,
    metrics: dict[str, Any] | None,
) -> None:
    """Progress or a heartbeat for an unknown, ended or queued run is rejected, state unchanged."""
    decision = decide(state, progress(run_id, 7, metrics=metrics, request_id="p9"), QUEUE_TIMED)
    event = only(decision)
    assert decision.state is state
    assert event.type is EventType.REJECTED
    assert event.run_id == run_id
    assert event.status is status
    assert event.request_id == "p9"
    assert event.reason is not None
    for fragment in fragments:
        assert fragment in event.reason


# --- timeouts ---------------------------------------------------------------------------------


def test_advance_before_the_deadline_does_nothing() -> None:
    """AdvanceTime before a run's deadline emits nothing and returns the same state."""
    state, _ = running_state(config=TIMED)
    decision = decide(state, advance(T0 + TIMEOUT - timedelta(microseconds=1)), TIMED)
    assert decision.events == ()
    assert decision.state is state


@pytest.mark.parametrize("late", [timedelta(0), timedelta(seconds=1), timedelta(days=3)])
def test_advance_at_or_after_the_deadline_times_out(late: timedelta) -> None:
    """AdvanceTime at or after the deadline ends the run TIMED_OUT and frees the slot."""
    state, run = running_state(config=TIMED, client_id="acme")
    now = T0 + TIMEOUT + late
    decision = decide(state, advance(now), TIMED)
    event = only(decision)
    assert event.type is EventType.TIMED_OUT
    assert event.status is RunStatus.TIMED_OUT
    assert event.from_status is RunStatus.RUNNING
    assert event.run_id == run.run_id
    assert event.client_id == "acme"
    assert event.request_id is None
    assert event.source is None
    assert event.occurred_at == now
    assert event.started_at == T0
    assert event.reason is not None
    assert (T0 + TIMEOUT).isoformat() in event.reason
    assert decision.state.active == ()
    assert decision.state.ended == (EndedRun(run.run_id, RunStatus.TIMED_OUT, now),)
    again = only(decide(decision.state, start(11, at=now), TIMED))
    assert again.type is EventType.STARTED


def test_result_after_the_timeout_is_rejected() -> None:
    """A result for a timed-out run is rejected: it already ended TIMED_OUT."""
    state, run = running_state(config=TIMED)
    state = decide(state, advance(T0 + TIMEOUT), TIMED).state
    decision = decide(state, finish(run.run_id, 1, at=T0 + TIMEOUT), TIMED)
    event = only(decision)
    assert event.type is EventType.REJECTED
    assert event.reason == f"run {run.run_id} already ended TIMED_OUT"
    assert event.status is RunStatus.TIMED_OUT
    assert decision.state is state


def test_run_without_a_timeout_never_times_out() -> None:
    """A run of a job type without a timeout has no deadline and survives any AdvanceTime."""
    state, run = running_state()
    assert run.deadline is None
    assert next_deadline(state) is None
    decision = decide(state, advance(T0 + timedelta(days=3650)))
    assert decision.events == ()
    assert decision.state is state


def test_overdue_runs_time_out_in_deadline_order() -> None:
    """Several overdue runs time out in one AdvanceTime, earliest deadline first, distinct IDs."""
    config = JobConfig(scope=Scope.JOB_TYPE_CLIENT, timeout=TIMEOUT)
    later = T0 + timedelta(minutes=1)
    state, _ = play(
        JobState(JOB), start(1, client_id="b", at=later), start(2, client_id="a"), config=config
    )
    assert next_deadline(state) == T0 + TIMEOUT
    decision = decide(state, advance(T0 + timedelta(hours=1)), config)
    assert [(e.type, e.client_id) for e in decision.events] == [
        (EventType.TIMED_OUT, "a"),
        (EventType.TIMED_OUT, "b"),
    ]
    assert len({e.event_id for e in decision.events}) == 2
    assert decision.state.active == ()


@settings(max_examples=300, deadline=None)
@given(
    topic=st.text(st.characters(exclude_categories=("Cs",)), max_size=60),
    partition=st.integers(0, 10_000),
    offset=st.integers(0, 2**63 - 1),
    index=st.integers(0, 50),
)
def test_event_ids_are_uuid5_of_their_cause(
    topic: str, partition: int, offset: int, index: int
) -> None:
    """An event's ID is the name-based UUID (version 5) of "<topic>/<partition>/<offset>/
    <index>" in the orchestrator's namespace, as anyone can compute it again."""
    source = Source(topic=topic or "t", partition=partition, offset=offset)
    expected = uuid.uuid5(
        uuid.UUID("6f1f4c1e-8a53-4f4f-9a4e-2a0d3c9b7e11"),
        f"{source.topic}/{partition}/{offset}/{index}",
    )
    assert event_id(source, index) == str(expected)
    assert uuid.UUID(event_id(source, index)).version == 5


def test_advance_event_ids_depend_on_the_time_and_job_type() -> None:
    """Timeout events get one ID per advance, different IDs for another time or job type."""
    state, _ = running_state(config=TIMED)
    other, _ = running_state(OTHER, config=TIMED)
    now = T0 + TIMEOUT
    first = only(decide(state, advance(now), TIMED))
    assert only(decide(state, advance(now), TIMED)) == first
    ids = {
        first.event_id,
        only(decide(state, advance(now + timedelta(seconds=1)), TIMED)).event_id,
        only(decide(other, advance(now, OTHER), TIMED)).event_id,
    }
    assert len(ids) == 3


def test_timeouts_of_different_runs_get_different_event_ids() -> None:
    """Two runs timed out by two advances to the same time get two different event IDs."""
    # The requests and results topics' broker times interleave: a start stamped T0 can be
    # read after a result stamped T0 + TIMEOUT, and the next record advances to that time again.
    state, _ = running_state(config=TIMED)
    first = decide(state, advance(T0 + TIMEOUT), TIMED)
    state = decide(first.state, start(11, at=T0), TIMED).state
    second = decide(state, advance(T0 + TIMEOUT), TIMED)
    (one,), (two,) = first.events, second.events
    assert one.run_id != two.run_id
    assert one.event_id != two.event_id


# --- the transition table ---------------------------------------------------------------------

STATUSES: tuple[RunStatus | None, ...] = (None, *RunStatus)
TABLE = JobConfig(policy=Policy.QUEUE, timeout=TIMEOUT)


def _row_case(row: tuple[RunStatus | None, Action]) -> tuple[JobState, Command, str]:
    """A state, a command that performs `row`, and the ID of the run the row moves."""
    running, run = running_state(config=TABLE)
    queued, _ = play(running, start(11, at=T0 + timedelta(seconds=1)), config=TABLE)
    queued_id = make_run_id(T0 + timedelta(seconds=1), 0, 11)
    cases: dict[tuple[RunStatus | None, Action], tuple[JobState, Command, str]] = {
        (None, Action.START): (JobState(JOB), start(10), run.run_id),
        (None, Action.ENQUEUE): (running, start(11, at=T0 + timedelta(seconds=1)), queued_id),
        (RunStatus.QUEUED, Action.DEQUEUE): (queued, finish(run.run_id, 1), queued_id),
        (RunStatus.QUEUED, Action.CANCEL): (queued, cancel(20, run_id=queued_id), queued_id),
        (RunStatus.RUNNING, Action.COMPLETE): (running, finish(run.run_id, 1), run.run_id),
        (RunStatus.RUNNING, Action.FAIL): (
            running,
            finish(run.run_id, 1, status=RunStatus.FAILED),
            run.run_id,
        ),
        (RunStatus.RUNNING, Action.CANCEL): (running, cancel(20, run_id=run.run_id), run.run_id),
        (RunStatus.RUNNING, Action.PROGRESS): (
            running,
            progress(run.run_id, 1, metrics={"n": 1}),
            run.run_id,
        ),
        (RunStatus.RUNNING, Action.TIME_OUT): (running, advance(T0 + TIMEOUT), run.run_id),
    }
    return cases[row]


@pytest.mark.parametrize(("status_before", "action"), list(TRANSITIONS), ids=str)
def test_transition_row(status_before: RunStatus | None, action: Action) -> None:
    """Each row of TRANSITIONS moves its run to the row's status and emits the row's event."""
    status_after, event_type = TRANSITIONS[(status_before, action)]
    state, command, run_id = _row_case((status_before, action))
    assert status_in(state, run_id) is status_before
    decision = decide(state, command, TABLE)
    (event,) = [e for e in decision.events if e.run_id == run_id]
    assert event.type is event_type
    assert event.status is status_after
    assert event.from_status is status_before
    assert status_in(decision.state, run_id) is status_after


def test_every_transition_row_is_exercised() -> None:
    """A scripted life of a job type goes through every row of TRANSITIONS, and only them."""
    row_of = {
        (before, after, event_type): (before, action)
        for (before, action), (after, event_type) in TRANSITIONS.items()
    }
    a, b, c = (make_run_id(T0, 0, i) for i in (1, 2, 3))
    d, e = make_run_id(MID, 0, 4), make_run_id(MID + TIMEOUT, 0, 5)
    _, events = play(
        JobState(JOB),
        start(1),
        start(2),
        start(3),
        progress(a, 1, metrics={"n": 1}, at=T0 + timedelta(seconds=30)),
        finish(a, 2),
        cancel(20, run_id=c),
        finish(b, 3, status=RunStatus.FAILED),
        start(4, at=MID),
        advance(MID + TIMEOUT),
        start(5, at=MID + TIMEOUT),
        cancel(21, run_id=e),
        config=TABLE,
    )
    assert d in {ev.run_id for ev in events}
    exercised = [row_of.get((ev.from_status, ev.status, ev.type)) for ev in events]
    assert None not in exercised
    assert set(exercised) == set(TRANSITIONS)


PAIR = JobConfig(policy=Policy.QUEUE, scope=Scope.JOB_TYPE_CLIENT)


def _target(status: RunStatus | None) -> tuple[JobState, str, str]:
    """A state in which run "target" (client a, request "req-target") has `status`."""
    target = start(2, client_id="a", request_id="req-target")
    target_id = make_run_id(T0, 0, 2, "a")
    blocker = start(1, client_id="a" if status is RunStatus.QUEUED else "b")
    ends: dict[RunStatus, Command] = {
        RunStatus.COMPLETED: finish(target_id, 1),
        RunStatus.FAILED: finish(target_id, 1, status=RunStatus.FAILED),
        RunStatus.CANCELLED: cancel(20, run_id=target_id),
        RunStatus.TIMED_OUT: advance(T0 + TIMEOUT),
    }
    if status is None:
        state, _ = play(JobState(JOB), blocker, config=PAIR)
        return state, make_run_id(T0, 0, 99, "a"), "req-never-seen"
    commands: list[Command] = [blocker, target]
    if status in ends:
        commands.append(ends[status])
    config = replace(PAIR, timeout=TIMEOUT) if status is RunStatus.TIMED_OUT else PAIR
    state, _ = play(JobState(JOB), *commands, config=config)
    assert status_in(state, target_id) is status
    return state, target_id, target.request_id


def _attempt(action: Action, run_id: str, request_id: str) -> tuple[Command, JobConfig]:
    """A command that would perform `action` on the run `run_id` (sent by `request_id`)."""
    at = T0 + timedelta(days=1)
    if action in (Action.START, Action.ENQUEUE):
        policy = Policy.QUEUE if action is Action.ENQUEUE else Policy.REJECT
        resend = Start(
            request_id, JOB, "a", {}, at, Source(topic=REQUESTS, partition=0, offset=500)
        )
        return resend, replace(PAIR, policy=policy)
    commands: dict[Action, Command] = {
        Action.COMPLETE: finish(run_id, 500, at=at),
        Action.FAIL: finish(run_id, 500, status=RunStatus.FAILED, at=at),
        Action.CANCEL: cancel(500, run_id=run_id, at=at),
        Action.PROGRESS: progress(run_id, 500, metrics={"n": 1}, at=at),
        Action.TIME_OUT: advance(at),
    }
    return commands[action], PAIR


# What a move that is not in the table yields instead (default: one rejected event).
EXPECTED_REFUSAL: dict[Action, list[EventType]] = {
    Action.START: [EventType.DUPLICATE],
    Action.ENQUEUE: [EventType.DUPLICATE],
    Action.TIME_OUT: [],
}


def test_every_action_is_covered_by_the_pair_tests() -> None:
    """The table tests know how to perform every action (update them with new actions)."""
    assert set(TRANSITIONS) <= {(s, a) for s in STATUSES for a in Action}
    for status, action in TRANSITIONS:
        assert _row_case((status, action)) is not None
    for action in Action:
        if action is not Action.DEQUEUE:
            assert _attempt(action, make_run_id(T0, 0, 1), "r") is not None


@pytest.mark.parametrize(
    ("status_before", "action"),
    [
        (s, a)
        for s in STATUSES
        for a in Action
        if (s, a) not in TRANSITIONS and a is not Action.DEQUEUE
    ],
    ids=str,
)
def test_pair_not_in_table_changes_nothing(status_before: RunStatus | None, action: Action) -> None:
    """A move not in TRANSITIONS is rejected (a re-sent start: duplicate), the state unchanged."""
    state, run_id, request_id = _target(status_before)
    command, config = _attempt(action, run_id, request_id)
    decision = decide(state, command, config)
    expected = EXPECTED_REFUSAL.get(action, [EventType.REJECTED])
    assert [e.type for e in decision.events] == expected
    assert all(e.from_status is None for e in decision.events)
    assert decision.state is state


@pytest.mark.parametrize("status_before", [s for s in STATUSES if s is not RunStatus.QUEUED])
def test_only_queued_runs_are_dequeued(status_before: RunStatus | None) -> None:
    """When a scope frees up, a run that is not QUEUED is never started again."""
    state, run_id, _ = _target(status_before)
    if status_before is RunStatus.RUNNING:
        holder = running_info(state, "b", PAIR)
    else:
        state = decide(state, start(30, client_id="a", at=MID), PAIR).state
        holder = running_info(state, "a", PAIR)
    assert holder is not None
    assert holder.run_id != run_id
    decision = decide(state, finish(holder.run_id, 40, at=MID), PAIR)
    assert [(e.type, e.run_id) for e in decision.events] == [(EventType.COMPLETED, holder.run_id)]
    assert status_in(decision.state, run_id) is status_before


@pytest.mark.parametrize("status", sorted(ENDED_STATUSES))
@pytest.mark.parametrize("result", [RunStatus.COMPLETED, RunStatus.FAILED])
def test_result_for_ended_run_rejected(status: RunStatus, result: RunStatus) -> None:
    """A result for a run that ended in any way is rejected as already ended, with its status."""
    state, run_id = ended_state(status)
    decision = decide(state, finish(run_id, 1, status=result))
    event = only(decision)
    assert event.type is EventType.REJECTED
    assert event.status is status
    assert event.reason == f"run {run_id} already ended {status}"
    assert decision.state is state


def test_ended_statuses_are_final() -> None:
    """No row of TRANSITIONS leaves an ended status, and every ended status is reachable."""
    assert all(before not in ENDED_STATUSES for before, _ in TRANSITIONS)
    assert {after for after, _ in TRANSITIONS.values()} >= ENDED_STATUSES


# --- Reject commands --------------------------------------------------------------------------


def test_reject_command_yields_rejected_event() -> None:
    """A Reject command yields one rejected event carrying its reason and identifiers."""
    state = JobState(JOB)
    cmd = reject(7, request_id="req-x", run_id="250102-030405-0.1", reason="key_mismatch: oops")
    decision = decide(state, cmd)
    event = only(decision)
    assert decision.state is state
    assert event.type is EventType.REJECTED
    assert event.reason == "key_mismatch: oops"
    assert event.request_id == "req-x"
    assert event.run_id == "250102-030405-0.1"
    assert event.job_type == JOB
    assert event.client_id is None
    assert event.status is None
    assert event.occurred_at == T0
    assert event.source == cmd.source
    assert event.event_id == event_id(cmd.source, 0)


def test_reject_command_leaves_the_active_run_alone() -> None:
    """A Reject naming the active run does not end or change it."""
    state, run = running_state(offset=10)
    decision = decide(state, reject(11, request_id=None, run_id=run.run_id))
    assert only(decision).type is EventType.REJECTED
    assert decision.state is state
    assert running_info(decision.state) == run


# --- queries ----------------------------------------------------------------------------------


def test_is_running_and_running_info() -> None:
    """is_running and running_info follow the active run through start, refusal and end."""
    state = JobState(JOB)
    assert not is_running(state)
    assert running_info(state) is None
    state, run = running_state(offset=10)
    assert is_running(state)
    assert running_info(state) == run
    state = decide(state, start(11)).state
    assert running_info(state) == run
    state = decide(state, finish(run.run_id, 1, status=RunStatus.FAILED)).state
    assert not is_running(state)
    assert running_info(state) is None


def test_queued_runs_are_not_running() -> None:
    """A queued run is not reported as running; the active one is."""
    state, run = running_state(config=QUEUE)
    state = decide(state, start(11, client_id="c"), QUEUE).state
    assert running_info(state, "c", QUEUE) == run


# --- the ended window -------------------------------------------------------------------------


def _run_n(n: int, limits: Limits) -> tuple[JobState, list[str]]:
    state = JobState(JOB)
    run_ids = []
    for i in range(n):
        at = T0 + timedelta(minutes=i)
        decision = decide(state, start(i, at=at), limits=limits)
        event = only(decision)
        assert event.run_id is not None
        state = decision.state
        run_ids.append(event.run_id)
        state = decide(state, finish(event.run_id, i, at=at), limits=limits).state
    return state, run_ids


def test_ended_window_keeps_the_newest_runs() -> None:
    """Only the last `ended_window` ended runs are kept, oldest first."""
    state, run_ids = _run_n(5, Limits(ended_window=3))
    assert [r.run_id for r in state.ended] == run_ids[-3:]


def test_late_result_past_the_window_is_an_unknown_run() -> None:
    """A result for a run that fell out of the window is rejected as unknown, inside as ended."""
    limits = Limits(ended_window=3)
    state, run_ids = _run_n(5, limits)
    old = only(decide(state, finish(run_ids[0], 99), limits=limits))
    assert old.type is EventType.REJECTED
    assert old.reason is not None
    assert "unknown run" in old.reason
    recent = only(decide(state, finish(run_ids[-3], 99), limits=limits))
    assert recent.reason is not None
    assert "already ended" in recent.reason


def test_default_windows_bound_the_state() -> None:
    """With default limits the ended runs and remembered requests never exceed their windows."""
    limits = Limits()
    state, run_ids = _run_n(limits.ended_window + 10, limits)
    assert len(state.ended) == limits.ended_window
    assert state.ended[-1].run_id == run_ids[-1]
    assert len(state.decided) == limits.ended_window + 10 <= limits.idempotency_window


def test_ended_window_zero_keeps_nothing() -> None:
    """With ended_window=0 no ended run is kept."""
    state, _ = _run_n(3, Limits(ended_window=0))
    assert state.ended == ()


# --- serialization ----------------------------------------------------------------------------


def _states() -> list[JobState]:
    running, run = running_state(offset=10)
    rich = decide(
        JobState(JOB),
        start(3, client_id="acme", initial_data={"nested": {"a": [1, 2.5, None, "x"]}, "b": True}),
    ).state
    ended = decide(running, finish(run.run_id, 1, status=RunStatus.FAILED)).state
    both = decide(ended, start(11, at=T0 + timedelta(hours=1))).state
    queued, _, _, _ = _queue_of_three()
    clients, _ = play(
        JobState(JOB),
        start(1, client_id="Acme"),
        start(2, client_id="bob"),
        start(3, client_id="bob", initial_data={"q": [1]}),
        cancel(20, client_id="Acme", reason="because"),
        config=replace(PER_CLIENT, policy=Policy.QUEUE, timeout=TIMEOUT),
    )
    return [JobState(JOB), running, rich, ended, both, queued, clients]


@pytest.mark.parametrize("state", _states())
def test_dump_load_round_trip(state: JobState) -> None:
    """load_state(dump_state(s)) == s, from bytes, text and parsed JSON."""
    data = dump_state(state)
    assert isinstance(data, bytes)
    assert load_state(data) == state
    assert load_state(data.decode()) == state
    assert load_state(json.loads(data)) == state
    assert dump_state(load_state(data)) == data


@pytest.mark.parametrize("state", _states())
def test_restored_state_decides_the_same(state: JobState) -> None:
    """A state restored from its dump makes the same decisions as the original."""
    config = JobConfig(policy=Policy.QUEUE, scope=Scope.JOB_TYPE_CLIENT, timeout=TIMEOUT)
    restored = load_state(dump_state(state))
    later = T0 + timedelta(days=1)
    commands: list[Command] = [start(50, at=later), advance(later), cancel(51, client_id="bob")]
    for run in state.active:
        commands.append(finish(run.run_id, 50))
        commands.append(progress(run.run_id, 51, metrics=None))
    for waiting in state.queue:
        commands.append(cancel(52, run_id=waiting.run_id))
    for decided in state.decided:
        commands.append(start(53, request_id=decided.request_id))
    for cmd in commands:
        assert decide(restored, cmd, config) == decide(state, cmd, config)


# --- event IDs --------------------------------------------------------------------------------


def test_event_ids_are_deterministic() -> None:
    """The same command on the same state always gives the same event, ID included."""
    state, run = running_state(offset=10)
    for cmd in (start(11), finish(run.run_id, 1), finish("bogus", 2), reject(3), cancel(4)):
        assert decide(state, cmd) == decide(state, cmd)
    assert event_id(Source(topic="t", partition=1, offset=2), 0) == event_id(
        Source(topic="t", partition=1, offset=2), 0
    )


def test_event_ids_differ_by_cause() -> None:
    """Events caused by different records or positions get different IDs."""
    base = Source(topic="t", partition=1, offset=2)
    ids = {
        event_id(base, 0),
        event_id(base, 1),
        event_id(Source(topic="u", partition=1, offset=2), 0),
        event_id(Source(topic="t", partition=2, offset=2), 0),
        event_id(Source(topic="t", partition=1, offset=3), 0),
        event_id(Source(topic="t", partition=12, offset=2), 0),
        event_id(Source(topic="t", partition=1, offset=22), 0),
    }
    assert len(ids) == 7


# --- properties -------------------------------------------------------------------------------

JOB_TYPES = ("alpha", "beta")
CLIENTS = (None, "acme", "Bob")
VARIANTS = ("exact", "exact", "shouted", "seed", "unknown")

job_type_index = st.integers(0, len(JOB_TYPES) - 1)
clients = st.sampled_from(CLIENTS)
steps_back = st.sampled_from([0, 0, 0, 1, 2, 5])  # which run or request, newest first
# Time never goes backwards, as the shell's stream time does not.
gaps = st.sampled_from([0, 0, 1, 20, 120, 700])
operations = st.lists(
    st.sampled_from(
        [
            st.tuples(st.just("start"), job_type_index, clients, gaps),
            st.tuples(st.just("start"), job_type_index, clients, gaps),
            st.tuples(st.just("cancel_run"), steps_back, st.sampled_from(VARIANTS), gaps),
            st.tuples(st.just("cancel_scope"), job_type_index, clients, gaps),
            st.tuples(
                st.just("result"),
                steps_back,
                st.tuples(
                    st.sampled_from([RunStatus.COMPLETED, RunStatus.FAILED]),
                    st.sampled_from(VARIANTS),
                ),
                gaps,
            ),
            st.tuples(st.just("progress"), steps_back, st.sampled_from(VARIANTS), gaps),
            st.tuples(st.just("heartbeat"), steps_back, st.sampled_from(VARIANTS), gaps),
            st.tuples(st.just("advance"), job_type_index, st.none(), gaps),
            st.tuples(st.just("repeat"), steps_back, st.none(), gaps),
            st.tuples(st.just("reject"), job_type_index, st.none(), gaps),
        ]
    ).flatmap(lambda s: s),
    min_size=10,
    max_size=40,
)
job_configs = st.tuples(
    *(
        st.builds(
            JobConfig,
            policy=st.sampled_from(Policy),
            scope=st.sampled_from(Scope),
            timeout=st.sampled_from([None, timedelta(seconds=60), timedelta(seconds=600)]),
        )
        for _ in JOB_TYPES
    )
)
limits_strategy = st.builds(
    Limits,
    ended_window=st.sampled_from([1, 256]),
    idempotency_window=st.sampled_from([0, 3, 1000]),
)


@dataclass(frozen=True)
class Step:
    """One command fed to the core, with the state before and after and its events."""

    command: Command
    before: JobState
    after: JobState
    events: tuple[StatusEvent, ...]


def _variant(run_id: str | None, variant: str, at: datetime, n: int) -> str:
    """A run ID as a sender might spell it: right, shouted, seed-style, or unknown."""
    if run_id is None or variant == "unknown":
        return make_run_id(at, 7, 100_000 + n)
    if variant == "shouted":
        return f"  {run_id.upper()}\t"
    if variant == "seed":
        m = RUN_ID_RE.match(run_id)
        assert m is not None
        return f"{m.group(1)}-{m.group(2)}" + (f"-{m.group(5)}" if m.group(5) else "")
    return run_id


def _run(
    ops: Iterable[tuple[Any, ...]],
    configs: tuple[JobConfig, ...],
    limits: Limits,
    *,
    restore: bool = False,
) -> tuple[dict[str, JobState], list[Step]]:
    """Feed the commands the operations describe to the core; the final states and every step."""
    config_of = dict(zip(JOB_TYPES, configs, strict=True))
    states = {job_type: JobState(job_type) for job_type in JOB_TYPES}
    offsets = {REQUESTS: 0, RESULTS: 0}
    at = T0
    known: list[tuple[str, str]] = []  # (run ID, job type), in order of first mention
    live: list[tuple[str, str]] = []  # the known runs not yet ended
    requests: list[Start | Cancel] = []
    steps = []

    def source(topic: str, job_type: str) -> Source:
        # Every job type lives on its own partition; offsets count per topic.
        offsets[topic] += 1
        return Source(topic=topic, partition=JOB_TYPES.index(job_type), offset=offsets[topic])

    def named(back: int) -> tuple[str | None, str]:
        # Mostly the newest run not yet ended, as a working executor would name.
        if back == 0 and live:
            return live[-1]
        if not known:
            return None, JOB_TYPES[0]
        return known[-1 - back % len(known)]

    for n, (kind, a, b, gap) in enumerate(ops):
        at += timedelta(seconds=gap)
        cmd: Command
        if kind == "start":
            job_type = JOB_TYPES[a]
            cmd = Start(f"req-{n}", job_type, b, {"n": n}, at, source(REQUESTS, job_type))
        elif kind == "cancel_scope":
            job_type = JOB_TYPES[a]
            cmd = Cancel(f"req-{n}", job_type, b, None, None, at, source(REQUESTS, job_type))
        elif kind == "cancel_run":
            run_id, job_type = named(a)
            run_text = _variant(run_id, b, at, n)
            cmd = Cancel(
                f"req-{n}", job_type, None, run_text, f"why {n}", at, source(REQUESTS, job_type)
            )
        elif kind == "result":
            run_id, job_type = named(a)
            status, variant = b
            run_text = _variant(run_id, variant, at, n)
            cmd = Finish(job_type, run_text, status, {"n": n}, None, at, source(RESULTS, job_type))
        elif kind in ("progress", "heartbeat"):
            run_id, job_type = named(a)
            metrics = {"n": n} if kind == "progress" else None
            run_text = _variant(run_id, b, at, n)
            cmd = Progress(job_type, run_text, metrics, None, at, source(RESULTS, job_type))
        elif kind == "repeat" and requests:
            original = requests[-1 - a % len(requests)]
            cmd = original.replace(at=at, source=source(REQUESTS, original.job_type))
        elif kind == "reject":
            job_type = JOB_TYPES[a]
            cmd = Reject(job_type, f"req-{n}", None, "malformed", at, source(REQUESTS, job_type))
        else:
            cmd = AdvanceTime(JOB_TYPES[a % len(JOB_TYPES)], at)
        if isinstance(cmd, Start | Cancel) and kind != "repeat":
            requests.append(cmd)
        before = states[cmd.job_type]
        if restore:
            before = load_state(dump_state(before))
        after, events = decide(before, cmd, config_of[cmd.job_type], limits)
        for event in events:
            run = (event.run_id or "", cmd.job_type)
            if event.type in (EventType.STARTED, EventType.QUEUED) and run not in known:
                known.append(run)
                live.append(run)
            elif event.type in END_EVENTS:
                live.remove(run)
        states[cmd.job_type] = after
        steps.append(Step(cmd, before, after, events))
    return states, steps


PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
LIFECYCLE_EVENTS = {t for _, t in TRANSITIONS.values()}
END_EVENTS = set(ENDED_EVENT.values())
ANSWERS = {
    Start: {EventType.STARTED, EventType.REFUSED, EventType.QUEUED},
    Cancel: {EventType.CANCELLED},
}


@PROPERTY_SETTINGS
@given(ops=operations, configs=job_configs, limits=limits_strategy)
def test_replay_is_deterministic(
    ops: list[tuple[Any, ...]], configs: tuple[JobConfig, ...], limits: Limits
) -> None:
    """The same command sequence always yields identical states and events."""
    assert _run(ops, configs, limits) == _run(ops, configs, limits)


@PROPERTY_SETTINGS
@given(ops=operations, configs=job_configs, limits=limits_strategy)
def test_restoring_state_between_commands_changes_nothing(
    ops: list[tuple[Any, ...]], configs: tuple[JobConfig, ...], limits: Limits
) -> None:
    """Restoring each state from its dump before every command gives the same states and events."""
    plain_states, plain_steps = _run(ops, configs, limits)
    restored_states, restored_steps = _run(ops, configs, limits, restore=True)
    assert [s.events for s in plain_steps] == [s.events for s in restored_steps]
    assert plain_states == restored_states
    for step in plain_steps:
        assert load_state(dump_state(step.after)) == step.after


@PROPERTY_SETTINGS
@given(ops=operations, configs=job_configs, limits=limits_strategy)
def test_lifecycle_invariants(
    ops: list[tuple[Any, ...]], configs: tuple[JobConfig, ...], limits: Limits
) -> None:
    """One active run per scope, runs end and queued requests start at most once, repeats inert."""
    states, steps = _run(ops, configs, limits)
    rows = {(before, after, t) for (before, _), (after, t) in TRANSITIONS.items()}
    started: Counter[str] = Counter()
    ended: Counter[str] = Counter()
    queued_by: dict[str, str | None] = {}
    open_runs: set[str] = set()
    waiting: set[str] = set()
    event_ids: set[str] = set()
    decisions: dict[tuple[str, str], tuple[type, tuple[StatusEvent, ...]]] = {}
    for step in steps:
        cmd, before, after, events = step.command, step.before, step.after, step.events
        for event in events:
            assert event.event_id not in event_ids, "two events with one ID"
            event_ids.add(event.event_id)
            assert event.job_type == cmd.job_type
            if event.type in LIFECYCLE_EVENTS:
                assert (event.from_status, event.status, event.type) in rows
            run_id = event.run_id or ""
            if event.type is EventType.STARTED:
                assert RUN_ID_RE.match(run_id)
            if event.type is EventType.QUEUED:
                assert run_id not in queued_by, "a run ID queued twice"
                queued_by[run_id] = event.request_id
                waiting.add(run_id)
            elif event.type is EventType.STARTED:
                started[run_id] += 1
                assert started[run_id] == 1, "a run started twice"
                if event.from_status is RunStatus.QUEUED:
                    assert queued_by[run_id] == event.request_id
                    waiting.remove(run_id)
                else:
                    assert run_id not in queued_by
                open_runs.add(run_id)
            elif event.type in END_EVENTS:
                ended[run_id] += 1
                assert ended[run_id] == 1, "a run ended twice"
                if event.from_status is RunStatus.QUEUED:
                    waiting.remove(run_id)
                else:
                    open_runs.remove(run_id)
        scopes = [r.scope for r in after.active]
        assert len(scopes) == len(set(scopes)), "two active runs in one scope"
        assert all(r.status is RunStatus.RUNNING for r in after.active)
        assert all(q.scope in scopes for q in after.queue), "a run waits in a free scope"
        assert len(after.ended) <= limits.ended_window
        assert len(after.decided) <= limits.idempotency_window
        types = [e.type for e in events]
        if {EventType.DUPLICATE, EventType.REFUSED, EventType.REJECTED} & set(types):
            assert len(events) == 1
        if types == [EventType.DUPLICATE]:
            assert isinstance(cmd, Start | Cancel)
            assert after is before, "a repeat changed the state"
            kind, original = decisions[(cmd.job_type, cmd.request_id)]
            assert kind is type(cmd)
            answer = next(e for e in original if e.type in ANSWERS[kind])
            assert (events[0].original_type, events[0].run_id) == (answer.type, answer.run_id)
        elif isinstance(cmd, Start | Cancel) and types != [EventType.REJECTED]:
            decisions[(cmd.job_type, cmd.request_id)] = (type(cmd), events)
        if types == [EventType.REFUSED]:
            assert runs(after) == runs(before)
        if types == [EventType.REJECTED]:
            assert after is before, "a rejection changed the state"
        if isinstance(cmd, AdvanceTime) and not events:
            assert after is before
    assert {r.run_id for s in states.values() for r in s.active} == open_runs
    assert {q.run_id for s in states.values() for q in s.queue} == waiting
    for job_type, state in states.items():
        config = configs[JOB_TYPES.index(job_type)]
        for run in state.active:
            if config.scope is Scope.JOB_TYPE or run.client_id is not None:
                assert running_info(state, run.client_id, config) == run
            if config.scope is Scope.JOB_TYPE_CLIENT and run.client_id is not None:
                assert run.run_id.endswith(f"-{run.client_id.lower()}")


# -- capacity: what a job type's runs may hold -------------------------------------------------


def sized(offset: int, size: int, **fields: Any) -> Start:
    """A start whose run counts `size` bytes against `Limits.run_bytes`."""
    return start(offset, **fields).replace(size=size)


SMALL = Limits(run_bytes=1000)


def test_a_start_alone_over_the_run_bytes_is_not_told_to_wait_for_runs_to_end() -> None:
    """With nothing running, a start bigger than the whole limit never fits: its rejection
    says so, and what to change, not 'try again when runs end'."""
    _, events = decide(JobState(JOB), sized(0, 1001), QUEUE, SMALL)
    assert [e.type for e in events] == [EventType.REJECTED]
    reason = events[0].reason or ""
    assert "try again when runs end" not in reason
    assert "it alone is over the limit: send less, or raise JOBS_MAX_RUN_BYTES" in reason


def test_the_settings_minimum_run_bytes_is_what_the_smallest_run_costs() -> None:
    """JOBS_MAX_RUN_BYTES's minimum is run_size of the smallest start request the worker
    takes, and admits that run."""
    from schemas import JobRequest
    from worker.core.lifecycle import run_size
    from worker.settings import MIN_RUN_BYTES, SMALLEST_START

    JobRequest.model_validate_json(SMALLEST_START)
    assert run_size(len(SMALLEST_START), None) == MIN_RUN_BYTES
    _, events = decide(
        JobState(JOB), sized(0, MIN_RUN_BYTES), QUEUE, Limits(run_bytes=MIN_RUN_BYTES)
    )
    assert [e.type for e in events] == [EventType.STARTED]


def test_a_start_beyond_the_run_bytes_is_rejected_and_can_be_retried() -> None:
    """Queued runs fill the job type up to its limit; the next start is `rejected` (not
    remembered, so the same request succeeds once runs have ended)."""
    state = JobState(JOB)
    for offset in range(3):
        state, events = decide(state, sized(offset, 300), QUEUE, SMALL)
        assert events[0].type in (EventType.STARTED, EventType.QUEUED)
    full, events = decide(state, sized(3, 300), QUEUE, SMALL)
    assert [e.type for e in events] == [EventType.REJECTED]
    assert events[0].reason is not None
    assert "is full" in events[0].reason
    assert "JOBS_MAX_RUN_BYTES" in events[0].reason
    assert full == state
    running = state.active[0].run_id
    state, _ = decide(state, finish(running, 10), QUEUE, SMALL)
    _, events = decide(state, sized(3, 300), QUEUE, SMALL)
    assert EventType.QUEUED in [e.type for e in events]


def test_a_replacing_start_counts_without_the_run_it_replaces() -> None:
    """Under `replace`, the run being replaced frees its share before the new one counts."""
    state, _ = decide(JobState(JOB), sized(0, 700), REPLACE, SMALL)
    state, events = decide(state, sized(1, 700), REPLACE, SMALL)
    assert [e.type for e in events] == [EventType.CANCELLED, EventType.STARTED]
    assert state.active[0].size == 700


def test_a_refusal_is_not_a_capacity_question() -> None:
    """Under `reject`, a start while the scope is busy is refused, whatever the sizes."""
    state, _ = decide(JobState(JOB), sized(0, 900), REJECT, SMALL)
    _, events = decide(state, sized(1, 900), REJECT, SMALL)
    assert [e.type for e in events] == [EventType.REFUSED]


def test_sizes_survive_serialization_and_old_states_load() -> None:
    """Run and queue sizes are part of the state; states written without them load as 0."""
    state, _ = decide(JobState(JOB), sized(0, 300), QUEUE, SMALL)
    state, _ = decide(state, sized(1, 200), QUEUE, SMALL)
    loaded = load_state(dump_state(state))
    assert (loaded.active[0].size, loaded.queue[0].size) == (300, 200)
    old = json.loads(dump_state(state))
    del old["active"][0]["size"]
    del old["queue"][0]["size"]
    assert load_state(json.dumps(old)).active[0].size == 0


@pytest.mark.parametrize(("status_before", "action"), list(TRANSITIONS), ids=str)
def test_the_table_is_the_only_legality_check(
    status_before: RunStatus | None, action: Action, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without its row in TRANSITIONS, a move is `rejected` and the state stays as it was."""
    state, command, run_id = _row_case((status_before, action))
    without = {k: v for k, v in TRANSITIONS.items() if k != (status_before, action)}
    monkeypatch.setattr("worker.core.lifecycle.TRANSITIONS", without)
    decision = decide(state, command, TABLE)
    assert status_in(decision.state, run_id) is status_before
    assert EventType.REJECTED in [e.type for e in decision.events]
    assert not [
        e for e in decision.events if e.run_id == run_id and e.type is not EventType.REJECTED
    ]


@dataclass(frozen=True)
class _Arrival:
    timestamp_ms: int
    role: str
    offset: int


def test_inputs_merge_by_broker_time_and_each_keeps_its_offset_order() -> None:
    """Rule 9: within an input, offset order whatever the timestamps; across the two, broker
    time, requests first at equal times."""
    records = [
        _Arrival(2_500, "results", 8),
        _Arrival(2_000, "requests", 3),  # the broker clock stepped back after offset 2
        _Arrival(1_000, "results", 7),
        _Arrival(3_000, "requests", 2),
        _Arrival(1_000, "requests", 1),
    ]
    assert merge_inputs(records) == [
        _Arrival(1_000, "requests", 1),  # before the result of the same time
        _Arrival(1_000, "results", 7),
        _Arrival(2_500, "results", 8),
        _Arrival(3_000, "requests", 2),
        _Arrival(2_000, "requests", 3),  # after offset 2, whatever its time
    ]


@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.sampled_from(["requests", "results", "elsewhere"])),
        max_size=40,
    )
)
def test_inputs_merge_as_a_heap_merge_of_each_inputs_offset_order(
    arrivals: list[tuple[int, str]],
) -> None:
    """Rule 9 for any broker times (stepping back, equal) and any mix of inputs: the order
    is that of merging each input's records in offset order by (time, requests first)."""
    records = [_Arrival(ms, role, offset) for offset, (ms, role) in enumerate(arrivals)]
    by_role: dict[str, list[_Arrival]] = {}
    for record in records:
        by_role.setdefault(record.role, []).append(record)
    expected = list(
        heapq.merge(
            *(by_role.get(role, []) for role in ("requests", "results", "elsewhere")),
            key=lambda r: (r.timestamp_ms, r.role != "requests"),
        )
    )
    assert merge_inputs(reversed(records)) == expected


def test_a_run_is_overdue_from_its_deadline_on() -> None:
    """Rule 7: `overdue` is true at and after the earliest deadline, never for no state."""
    state, _ = decide(JobState(JOB), start(1), TIMED)
    deadline = T0 + TIMEOUT
    assert not overdue(state, deadline - timedelta(microseconds=1))
    assert overdue(state, deadline)
    assert overdue(state, deadline + timedelta(hours=1))
    assert not overdue(None, deadline)
    assert not overdue(JobState(JOB), deadline)


def test_the_clock_is_stream_time_unless_an_idle_wall_clock_is_later() -> None:
    """Rule 7: the stream time, or the tick's wall clock when later; never earlier."""
    assert decision_clock(T0, None) == T0
    assert decision_clock(None, MID) == MID
    assert decision_clock(T0, MID) == MID
    assert decision_clock(MID, T0) == MID
    assert decision_clock(None, None) is None


def test_the_clock_stops_at_a_record_queued_for_the_next_batch() -> None:
    """Rule 7: a record fetched for a later batch is decided before anything times out at a
    later time, so the clock stops at it; an earlier clock is left as it is."""
    assert decision_clock(MID, None, T0) == T0
    assert decision_clock(None, MID, T0) == T0
    assert decision_clock(T0, None, MID) == T0
    assert decision_clock(None, None, T0) is None


def test_a_report_stamped_earlier_never_moves_a_deadline_back() -> None:
    """A heartbeat renews the deadline from its own time, but one stamped before the last
    renewal leaves the later deadline in place."""
    state, _ = decide(JobState(JOB), start(1), TIMED)
    run_id = state.active[0].run_id
    state, _ = decide(state, progress(run_id, 2, metrics=None, at=MID), TIMED)
    assert state.active[0].deadline == MID + TIMEOUT
    early = decide(state, progress(run_id, 3, metrics=None, at=T0 + timedelta(seconds=1)), TIMED)
    assert early.state.active[0].deadline == MID + TIMEOUT


def test_a_queued_run_never_starts_before_it_was_asked_for() -> None:
    """A result stamped before a queued request frees the scope: the queued run starts (and
    its timeout counts) from its own request's time, not the result's."""
    state, _ = decide(JobState(JOB), start(1, at=T0), QUEUE_TIMED)
    first = state.active[0].run_id
    state, _ = decide(state, start(2, at=MID), QUEUE_TIMED)
    state, events = decide(state, finish(first, 3, at=T0 + timedelta(seconds=1)), QUEUE_TIMED)
    started = next(e for e in events if e.type is EventType.STARTED)
    assert started.started_at == MID
    assert state.active[0].started_at == MID
    assert state.active[0].deadline == MID + TIMEOUT


def test_a_result_for_a_run_no_longer_remembered_says_what_was_checked() -> None:
    """An unknown run's rejection says it is not active, not queued, and not among the
    ended runs still remembered, so a late result for an evicted run is understood."""
    limits = Limits(ended_window=1)
    state, _ = decide(JobState(JOB), start(1), limits=limits)
    first = state.active[0].run_id
    state, _ = decide(state, finish(first, 2), limits=limits)
    state, _ = decide(state, start(3), limits=limits)
    state, _ = decide(state, finish(state.active[0].run_id, 4), limits=limits)
    event = only(decide(state, finish(first, 5), limits=limits))
    assert event.type is EventType.REJECTED
    assert event.reason is not None
    assert "not among its last 1 ended runs" in event.reason


def test_stream_time_waits_for_an_input_with_unread_records() -> None:
    """Rule 7: with both inputs read, the latest broker time; while one has unread records,
    no further than what it has shown, and nowhere before it has shown anything."""
    seen = {"requests": MID, "results": T0}
    assert stream_time(seen) == MID
    assert stream_time(seen, ["results"]) == T0
    assert stream_time(seen, ["requests"]) == MID
    assert stream_time({"requests": MID}, ["results"]) is None
    assert stream_time({}) is None


def test_seed_style_id_with_client_suffix_resolves_under_the_default_scope() -> None:
    """Scoped by job type only, run IDs carry no client suffix; the seed's `-<client>` form
    still names the run when exactly one run of that client matches the time stamp."""
    state, _ = play(JobState(JOB), start(10, client_id="Acme"))
    (acme,) = state.active
    assert acme.run_id == make_run_id(T0, 0, 10)  # no suffix under the default scope
    event = only(decide(state, finish("250102-030405-acme", 1)))
    assert (event.type, event.run_id) == (EventType.COMPLETED, acme.run_id)
    other = only(decide(state, finish("250102-030405-bob", 1)))
    assert other.type is EventType.REJECTED
    assert "no run" in (other.reason or "")


def test_events_share_one_fields_set_that_nothing_changes() -> None:
    """Built events share their `model_fields_set` (`lifecycle.built`): a frozen event
    refuses a change before touching it, and a copy with changes gets a set of its own."""
    names = set(StatusEvent.model_fields)
    state, started = decide(JobState(JOB), start(1), REJECT)
    (event,) = started
    with pytest.raises(ValidationError):
        event.reason = "changed"  # type: ignore[misc]
    copy = event.model_copy(update={"reason": "changed"})
    assert copy.reason == "changed"
    assert copy.model_fields_set is not event.model_fields_set
    assert event.model_fields_set == names
    assert only(decide(state, finish(event.run_id or "", 2))).model_fields_set == names
