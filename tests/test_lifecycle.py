"""The pure lifecycle core: every transition, every rejection, and replay properties."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import ENDED_STATUSES, EventType, RunStatus, Source, StatusEvent
from worker.lifecycle import (
    TRANSITIONS,
    Action,
    AdvanceTime,
    Cancel,
    Command,
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
    Start,
    decide,
    dump_state,
    event_id,
    is_running,
    load_state,
    running_info,
)
from worker.runid import RUN_ID_RE, make_run_id

JOB = "post_scoring"
OTHER = "feed_import"
T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
REQUESTS = "jobs.requests"
RESULTS = "jobs.results"


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


def active(state: JobState) -> Run | None:
    """The single active run of a job-type-scoped state, if any."""
    assert len(state.active) <= 1
    return state.active[0] if state.active else None


def only(decision: Decision) -> StatusEvent:
    """The single event of a decision."""
    assert len(decision.events) == 1, decision.events
    return decision.events[0]


def running_state(job_type: str = JOB, offset: int = 10, at: datetime = T0) -> tuple[JobState, Run]:
    """A state with one active run started from `offset`, and that run."""
    state = decide(JobState(job_type), start(offset, job_type=job_type, at=at)).state
    run = active(state)
    assert run is not None
    return state, run


def ended_state(status: RunStatus) -> tuple[JobState, str]:
    """A state whose only run ended with `status` (as the changelog could restore it)."""
    run_id = make_run_id(T0, 0, 10)
    return JobState(JOB, ended=(EndedRun(run_id, status, T0 + timedelta(minutes=1)),)), run_id


# --- start ------------------------------------------------------------------------------------


def test_start_creates_a_run() -> None:
    """A start with no active run starts one, with a run ID of the DESIGN format."""
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
    run = active(decision.state)
    assert run == Run(
        run_id=event.run_id,
        job_type=JOB,
        client_id="acme",
        request_id="r1",
        status=RunStatus.RUNNING,
        started_at=T0,
        initial_data={"a": [1, 2]},
    )


def test_second_start_is_refused() -> None:
    """A start while a run is active is refused, naming the active run, and changes nothing."""
    state, run = running_state(offset=10)
    later = T0 + timedelta(seconds=30)
    cmd = start(11, at=later, request_id="r2", client_id="other")
    decision = decide(state, cmd)
    event = only(decision)
    assert event.type is EventType.REFUSED
    assert event.run_id == run.run_id
    assert event.started_at == run.started_at == T0
    assert event.status is RunStatus.RUNNING
    assert event.request_id == "r2"
    assert event.client_id == "other"
    assert event.occurred_at == later
    assert event.reason is not None
    assert run.run_id in event.reason
    assert replace(decision.state, decided=state.decided) == state


def test_refused_start_in_the_same_second_keeps_the_first_run() -> None:
    """Two starts in the same second give one run and one refusal, not two equal run IDs."""
    state, run = running_state(offset=10)
    event = only(decide(state, start(11)))
    assert event.type is EventType.REFUSED
    assert event.run_id == run.run_id


# --- results ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "event_type"),
    [(RunStatus.COMPLETED, EventType.COMPLETED), (RunStatus.FAILED, EventType.FAILED)],
)
def test_result_ends_the_run(status: RunStatus, event_type: EventType) -> None:
    """A result for the active run ends it with its metrics, from RUNNING, and frees the slot."""
    state = decide(JobState(JOB), start(10, client_id="acme", request_id="r1")).state
    assert active(state) is not None
    run = active(state)
    assert run is not None
    run_id = run.run_id
    at = T0 + timedelta(minutes=5)
    cmd = finish(run_id, 3, status=status, metrics={"scored": 12}, request_id="res-1", at=at)
    decision = decide(state, cmd)
    event = only(decision)
    assert event.type is event_type
    assert event.status is status
    assert event.from_status is RunStatus.RUNNING
    assert event.run_id == run_id
    assert event.metrics == {"scored": 12}
    assert event.client_id == "acme"
    assert event.request_id == "res-1"
    assert event.started_at == T0
    assert event.occurred_at == at
    assert event.source == cmd.source
    assert event.event_id == event_id(cmd.source, 0)
    assert active(decision.state) is None
    assert decision.state.ended == (EndedRun(run_id, status, at),)
    restarted = only(decide(decision.state, start(11, at=at)))
    assert restarted.type is EventType.STARTED
    assert restarted.run_id != run_id


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
    decision = decide(case.state, replace(case.command, request_id="res-9"))
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


def test_decide_refuses_a_state_of_another_job_type() -> None:
    """Handing the core a command with another job type's state is a programming error."""
    with pytest.raises(ValueError, match="given state of"):
        decide(JobState(OTHER), start(1))


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
    assert active(state) is not None
    second_run = active(state)
    assert second_run is not None
    second = second_run.run_id
    assert second != first.run_id
    decision = decide(state, finish("250102-030405", 2))
    event = only(decision)
    assert event.type is EventType.REJECTED
    assert decision.state is state
    assert event.reason is not None
    assert "ambiguous" in event.reason
    assert first.run_id in event.reason
    assert second in event.reason


def test_seed_run_id_with_no_runs_at_all() -> None:
    """A seed-style ID for a job type that never ran is rejected as matching no run."""
    event = only(decide(JobState(JOB), finish("250102-030405", 2)))
    assert event.type is EventType.REJECTED
    assert event.reason is not None
    assert "no run" in event.reason


# --- the transition table ---------------------------------------------------------------------

FINISH_STATUS = {Action.COMPLETE: RunStatus.COMPLETED, Action.FAIL: RunStatus.FAILED}
QUEUE = JobConfig(policy=Policy.QUEUE, timeout=timedelta(seconds=30))
# Actions a command names a run for; START/ENQUEUE/DEQUEUE/TIME_OUT are driven differently.
NAMING = (Action.COMPLETE, Action.FAIL, Action.CANCEL, Action.PROGRESS)


def _naming(action: Action, run_id: str, offset: int) -> Command:
    """A command that applies `action` to `run_id`."""
    at = T0 + timedelta(seconds=1)
    results = Source(topic=RESULTS, partition=0, offset=offset)
    if action is Action.CANCEL:
        requests = Source(topic=REQUESTS, partition=0, offset=offset)
        return Cancel(f"cancel-{offset}", JOB, None, run_id, None, at, requests)
    if action is Action.PROGRESS:
        return Progress(JOB, run_id, {"p": 1}, None, at, results)
    return finish(run_id, offset, status=FINISH_STATUS[action])


def test_every_transition_row_is_exercised() -> None:
    """A scripted life under the queue policy goes through every row of TRANSITIONS."""
    row_of = {
        (before, after, event_type): (before, action)
        for (before, action), (after, event_type) in TRANSITIONS.items()
    }
    events: list[StatusEvent] = []

    def step(state: JobState, cmd: Command) -> JobState:
        decision = decide(state, cmd, QUEUE)
        events.extend(decision.events)
        return decision.state

    state = step(JobState(JOB), start(1))  # START
    first = active(state)
    assert first is not None
    state = step(state, start(2))  # ENQUEUE
    state = step(state, start(3))  # ENQUEUE
    queued = [q.run_id for q in state.queue]
    state = step(state, _naming(Action.PROGRESS, first.run_id, 1))  # PROGRESS
    state = step(state, finish(first.run_id, 2))  # COMPLETE, then DEQUEUE
    second = active(state)
    assert second is not None
    assert second.run_id == queued[0]
    state = step(state, _naming(Action.CANCEL, queued[1], 4))  # CANCEL of a queued run
    state = step(state, start(5))  # ENQUEUE
    state = step(state, _naming(Action.CANCEL, second.run_id, 6))  # CANCEL, then DEQUEUE
    third = active(state)
    assert third is not None
    state = step(state, AdvanceTime(JOB, T0 + timedelta(hours=1)))  # TIME_OUT
    state = step(state, start(7, at=T0 + timedelta(hours=2)))
    fourth = active(state)
    assert fourth is not None
    state = step(state, finish(fourth.run_id, 8, status=RunStatus.FAILED))  # FAIL
    exercised = {row_of.get((e.from_status, e.status, e.type)) for e in events} - {None}
    assert exercised == set(TRANSITIONS)


@pytest.mark.parametrize(
    ("status_before", "action"),
    [
        (s, a)
        for s in (None, RunStatus.QUEUED, *sorted(ENDED_STATUSES))
        for a in NAMING
        if (s, a) not in TRANSITIONS
    ],
    ids=lambda v: str(v),
)
def test_pair_not_in_table_changes_nothing(status_before: RunStatus | None, action: Action) -> None:
    """A move not in TRANSITIONS is rejected, with a reason, and the state is unchanged."""
    run_id = make_run_id(T0, 0, 10)
    if status_before is None:
        state = JobState(JOB)
    elif status_before is RunStatus.QUEUED:
        state = JobState(JOB, queue=(Queued(run_id, "req-0", None, {}, "", T0),))
    else:
        state = JobState(JOB, ended=(EndedRun(run_id, status_before, T0),))
    decision = decide(state, _naming(action, run_id, 20), QUEUE)
    event = only(decision)
    assert event.type is EventType.REJECTED
    assert event.reason
    assert decision.state == state


def test_every_action_has_a_row() -> None:
    """Each action appears in the table, and ended statuses are final."""
    assert {action for _, action in TRANSITIONS} == set(Action)
    assert all(before not in ENDED_STATUSES for before, _ in TRANSITIONS)


@pytest.mark.parametrize("status", sorted(ENDED_STATUSES))
@pytest.mark.parametrize("action", [Action.COMPLETE, Action.FAIL])
def test_result_for_ended_run_rejected(status: RunStatus, action: Action) -> None:
    """A result for a run that ended in any way is rejected as already ended, with its status."""
    state, run_id = ended_state(status)
    decision = decide(state, finish(run_id, 1, status=FINISH_STATUS[action]))
    event = only(decision)
    assert event.type is EventType.REJECTED
    assert event.status is status
    assert event.reason == f"run {run_id} already ended {status}"
    assert decision.state is state


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
    limits = Limits(ended_window=3)
    state, run_ids = _run_n(5, limits)
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


def test_default_ended_window_bounds_the_state() -> None:
    """With default limits the ended runs never exceed the default window."""
    window = Limits().ended_window
    state, run_ids = _run_n(window + 10, Limits())
    assert len(state.ended) == window
    assert state.ended[-1].run_id == run_ids[-1]


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
    return [JobState(JOB), running, rich, ended, both]


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
    restored = load_state(dump_state(state))
    commands: list[Command] = [start(50, at=T0 + timedelta(days=1))]
    if (running := active(state)) is not None:
        commands.append(finish(running.run_id, 50))
    for cmd in commands:
        assert decide(restored, cmd) == decide(state, cmd)


# --- event IDs --------------------------------------------------------------------------------


def test_event_ids_are_deterministic() -> None:
    """The same command on the same state always gives the same event, ID included."""
    state, run = running_state(offset=10)
    for cmd in (start(11), finish(run.run_id, 1), finish("bogus", 2), reject(3)):
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

JOB_TYPES = ("alpha", "beta", "gamma")
VARIANTS = ("exact", "shouted", "zeros", "seed", "unknown", "garbage", "impossible")

starts = st.tuples(
    st.just("start"),
    st.integers(0, len(JOB_TYPES) - 1),
    st.sampled_from([None, "acme", "Bob"]),
    st.sampled_from([0, 0, 0, 1, 3600]),
)
results = st.tuples(
    st.just("result"),
    # None: sent under the job type of the run it names, as a well-behaved executor does.
    st.one_of(st.none(), st.none(), st.integers(0, len(JOB_TYPES) - 1)),
    st.tuples(
        st.sampled_from([RunStatus.COMPLETED, RunStatus.FAILED]),
        st.sampled_from([0, 0, 0, 1, 2, 5]),  # which run, counting back from the newest
        st.sampled_from(VARIANTS),
    ),
    st.sampled_from([0, 0, 0, 1, 3600]),
)
rejects = st.tuples(
    st.just("reject"),
    st.integers(0, len(JOB_TYPES) - 1),
    st.none(),
    st.sampled_from([0, 1]),
)
# sampled_from keeps the mix of kinds as written (one_of favours the simplest branch).
specs = st.lists(
    st.sampled_from([starts, starts, results, results, results, rejects]).flatmap(lambda s: s),
    max_size=40,
)


def _variant(run_id: str | None, variant: str, at: datetime, n: int) -> str:
    """A run ID as a sender might spell it: right, badly spelt, or bogus."""
    if run_id is None or variant == "unknown":
        return make_run_id(at, 7, 100_000 + n)
    m = RUN_ID_RE.match(run_id)
    assert m is not None
    if variant == "shouted":
        return f"  {run_id.upper()}\t"
    if variant == "zeros":
        return f"{m.group(1)}-{m.group(2)}-00{m.group(3)}.000{m.group(4)}"
    if variant == "seed":
        return f"{m.group(1)}-{m.group(2)}"
    if variant == "garbage":
        return f"run-{n}"
    if variant == "impossible":
        return f"{m.group(1)[:2]}1399-{m.group(2)}-{m.group(3)}.{m.group(4)}"
    return run_id


def _run(
    spec_list: Iterable[tuple[Any, ...]], limits: Limits, *, restore: bool = False
) -> tuple[dict[str, JobState], list[tuple[JobState, JobState, StatusEvent]]]:
    """Feed the commands the specs describe to the core; return the states and every step."""
    states = {job_type: JobState(job_type) for job_type in JOB_TYPES}
    offsets = {REQUESTS: 0, RESULTS: 0}
    at = T0
    started: list[tuple[str, int]] = []  # (run ID, job type index), oldest first
    steps = []
    for n, (kind, jt, arg, dt) in enumerate(spec_list):
        named: str | None = None
        if kind == "result":
            status, ref, variant = arg
            if started:
                named, named_jt = started[-1 - ref % len(started)]
                jt = named_jt if jt is None else jt
            jt = 0 if jt is None else jt
        job_type = JOB_TYPES[jt]
        at += timedelta(seconds=dt)
        topic = RESULTS if kind == "result" else REQUESTS
        # Every job type lives on its own partition; offsets count per topic.
        source = Source(topic=topic, partition=jt, offset=offsets[topic])
        offsets[topic] += 1
        cmd: Command
        if kind == "start":
            cmd = Start(f"req-{n}", job_type, arg, {"n": n}, at, source)
        elif kind == "result":
            run_id = _variant(named, variant, at, n)
            cmd = Finish(job_type, run_id, status, {"n": n}, None, at, source)
        else:
            cmd = Reject(job_type, f"req-{n}", None, "malformed", at, source)
        before = states[job_type]
        if restore:
            before = load_state(dump_state(before))
        decision = decide(before, cmd, limits=limits)
        assert len(decision.events) == 1
        event = decision.events[0]
        if event.type is EventType.STARTED:
            assert event.run_id is not None
            started.append((event.run_id, jt))
        states[job_type] = decision.state
        steps.append((before, decision.state, event))
    return states, steps


PROPERTY_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@PROPERTY_SETTINGS
@given(spec_list=specs, window=st.sampled_from([1, 2, 256]))
def test_replay_is_deterministic(spec_list: list[tuple[Any, ...]], window: int) -> None:
    """The same command sequence always yields identical states and events."""
    limits = Limits(ended_window=window)
    first = _run(spec_list, limits)
    second = _run(spec_list, limits)
    assert first == second


@PROPERTY_SETTINGS
@given(spec_list=specs)
def test_restoring_state_between_commands_changes_nothing(
    spec_list: list[tuple[Any, ...]],
) -> None:
    """Restoring each state from its dump before every command gives the same events."""
    plain_states, plain_steps = _run(spec_list, Limits())
    restored_states, restored_steps = _run(spec_list, Limits(), restore=True)
    assert [e for _, _, e in plain_steps] == [e for _, _, e in restored_steps]
    assert plain_states == restored_states


@PROPERTY_SETTINGS
@given(spec_list=specs, window=st.sampled_from([1, 256]))
def test_lifecycle_invariants(spec_list: list[tuple[Any, ...]], window: int) -> None:
    """One active run per job type, a run ends at most once, run IDs are never reused."""
    states, steps = _run(spec_list, Limits(ended_window=window))
    open_run: dict[str, str | None] = dict.fromkeys(JOB_TYPES)
    job_type_of: dict[str, str] = {}
    ended: set[str] = set()
    event_ids: set[str] = set()
    for before, after, event in steps:
        assert event.event_id not in event_ids
        event_ids.add(event.event_id)
        if event.type is EventType.STARTED:
            assert event.run_id is not None
            assert RUN_ID_RE.match(event.run_id)
            assert event.run_id not in job_type_of, "run ID in two started events"
            assert open_run[event.job_type] is None, "two active runs of one job type"
            open_run[event.job_type] = event.run_id
            job_type_of[event.run_id] = event.job_type
        elif event.type in (EventType.COMPLETED, EventType.FAILED):
            assert event.run_id is not None
            assert event.run_id not in ended, "a run ended twice"
            assert job_type_of[event.run_id] == event.job_type
            assert open_run[event.job_type] == event.run_id
            assert event.from_status is RunStatus.RUNNING
            ended.add(event.run_id)
            open_run[event.job_type] = None
        else:
            assert event.type in (EventType.REFUSED, EventType.REJECTED)
            # A refusal is remembered for idempotency; nothing else changes.
            assert replace(after, decided=before.decided) == before, "a refusal changed runs"
            if event.type is EventType.REJECTED:
                assert after is before, "a rejection changed the state"
        if event.type is EventType.REFUSED:
            assert event.run_id == open_run[event.job_type]
        assert len(after.ended) <= window
    for job_type, state in states.items():
        active = running_info(state)
        assert (active.run_id if active else None) == open_run[job_type]
