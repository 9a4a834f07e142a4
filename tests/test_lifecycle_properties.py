"""Properties of the full lifecycle core over random command sequences (hypothesis)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings, strategies as st

from schemas import EventType, RunStatus, Source, StatusEvent, read_status_event
from worker.core import lifecycle
from worker.core.adopt import adopt
from worker.core.lifecycle import (
    AdvanceTime,
    Cancel,
    Command,
    Decided,
    Finish,
    JobConfig,
    JobState,
    Limits,
    Policy,
    Progress,
    Scope,
    Start,
    _appended,
    _in_window,
    decide,
    dump_state,
    load_state,
)

JOB = "post_scoring"
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
CLIENTS = [None, "acme", "globex"]

configs = st.builds(
    JobConfig,
    policy=st.sampled_from(list(Policy)),
    scope=st.sampled_from(list(Scope)),
    timeout=st.sampled_from([None, timedelta(seconds=30), timedelta(seconds=90)]),
)
steps = st.lists(
    st.tuples(
        st.sampled_from(["start", "start", "repeat", "cancel", "finish", "progress", "advance"]),
        st.integers(0, 2),  # client, or which known run
        st.integers(0, 40),  # seconds to move time forward
        st.booleans(),  # by run ID (cancel), success (finish), metrics (progress)
    ),
    max_size=40,
)


def _play(
    config: JobConfig, spec: list[tuple[str, int, int, bool]], window: int, restore: bool = False
) -> list[tuple[JobState, Command, JobState, tuple[StatusEvent, ...]]]:
    state = JobState(JOB)
    limits = Limits(idempotency_window=window)
    at = T0
    runs: list[str] = []
    requests: list[str] = []
    history = []
    for n, (kind, pick, dt, flag) in enumerate(spec):
        at += timedelta(seconds=dt)
        source = Source(topic="jobs.requests", partition=0, offset=n)
        client = CLIENTS[pick]
        command: Command
        if kind == "start" or (kind == "repeat" and not requests):
            requests.append(f"req-{n}")
            command = Start(requests[-1], JOB, client, {"n": n}, at, source)
        elif kind == "repeat":
            command = Start(requests[pick % len(requests)], JOB, client, {"n": n}, at, source)
        elif kind == "cancel":
            run_id = runs[pick % len(runs)] if runs and flag else None
            command = Cancel(f"cancel-{n}", JOB, client, run_id, None, at, source)
        elif kind == "advance":
            command = AdvanceTime(JOB, at)
        else:
            run_id = runs[pick % len(runs)] if runs else "260101-000000-0.1"
            results = Source(topic="jobs.results", partition=0, offset=n)
            if kind == "finish":
                status = RunStatus.COMPLETED if flag else RunStatus.FAILED
                command = Finish(JOB, run_id, status, {"n": n}, None, at, results)
            else:
                command = Progress(JOB, run_id, {"n": n} if flag else None, None, at, results)
        before = load_state(dump_state(state)) if restore else state
        state, events = decide(before, command, config, limits)
        for event in events:
            if event.type in (EventType.STARTED, EventType.QUEUED) and event.run_id:
                runs.append(event.run_id)
        history.append((before, command, state, events))
    return history


SETTINGS = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@SETTINGS
@given(config=configs, spec=steps, window=st.sampled_from([0, 3, 1000]))
def test_replay_and_restore_are_deterministic(
    config: JobConfig, spec: list[Any], window: int
) -> None:
    """The same commands give the same states and events, also restored from dumps each step."""
    plain = _play(config, spec, window)
    assert plain == _play(config, spec, window)
    restored = _play(config, spec, window, restore=True)
    assert [(s, e) for _, _, s, e in plain] == [(s, e) for _, _, s, e in restored]


@SETTINGS
@given(config=configs, spec=steps, window=st.sampled_from([0, 3, 1000]))
def test_lifecycle_invariants(config: JobConfig, spec: list[Any], window: int) -> None:
    """One active run per scope; runs end once; queued runs start once; repeats change
    nothing; every event is one the status topic's readers take (`read_status_event`)."""
    started: set[str] = set()
    ended: set[str] = set()
    queued: set[str] = set()
    event_ids: set[str] = set()
    for before, command, after, events in _play(config, spec, window):
        scopes = [r.scope for r in after.active]
        assert len(scopes) == len(set(scopes)), "two active runs in one scope"
        for event in events:
            assert event.event_id not in event_ids
            event_ids.add(event.event_id)
            # every reader takes what the core decides, as it was decided
            assert read_status_event(event.model_dump_json()) == event
            _as_validated(event)
            run_id = event.run_id
            if event.type is EventType.STARTED:
                assert run_id not in started, "a run started twice"
                started.add(run_id or "")
                if event.from_status is RunStatus.QUEUED:
                    assert run_id in queued
            elif event.type is EventType.QUEUED:
                queued.add(run_id or "")
            elif event.type in (
                EventType.COMPLETED,
                EventType.FAILED,
                EventType.CANCELLED,
                EventType.TIMED_OUT,
            ):
                assert run_id not in ended, "a run ended twice"
                ended.add(run_id or "")
            elif event.type is EventType.DUPLICATE:
                assert after == before, "an idempotent repeat changed the state"
            elif event.type is EventType.REJECTED:
                assert after == before, "a rejection changed the state"
        if isinstance(command, AdvanceTime):
            assert all(r.deadline is None or r.deadline > command.now for r in after.active)
        if isinstance(command, Progress) and command.metrics is None:
            assert all(e.type is EventType.REJECTED for e in events), "a heartbeat spoke"


def _as_validated(event: StatusEvent) -> None:
    """`event` (made without validation: `lifecycle.built`) is what validating its
    fields makes: every field, in the model's order, equal, with values of the same types,
    the same JSON and repr, its source too."""
    assert list(vars(event)) == list(StatusEvent.model_fields)
    validated = StatusEvent.model_validate(vars(event))
    assert validated == event
    assert validated.model_fields_set == event.model_fields_set == set(StatusEvent.model_fields)
    assert validated.model_dump_json() == event.model_dump_json()
    assert repr(validated) == repr(event)
    for name, value in vars(event).items():
        assert type(value) is type(getattr(validated, name)), name
    if event.source is not None:
        assert type(event.source) is Source
        assert list(vars(event.source)) == list(Source.model_fields)
        assert event.source == Source.model_validate(vars(event.source))


def _adoptable(state: JobState) -> JobState:
    """`state` without what the log does not say: deadlines and run sizes."""
    return state.replace(
        active=tuple(r.replace(deadline=None, size=0) for r in state.active),
        queue=tuple(q.replace(size=0) for q in state.queue),
    )


@SETTINGS
@given(config=configs, spec=steps, window=st.sampled_from([0, 3, 1000]))
def test_adopting_the_logged_events_rebuilds_the_state(
    config: JobConfig, spec: list[Any], window: int
) -> None:
    """A state built from the logged events alone (what an audit of a log whose inputs are
    gone does) equals the decided one in every field the log carries."""
    limits = Limits(idempotency_window=window)
    adopted = JobState(JOB)
    for _, _, decided, events in _play(config, spec, window):
        for event in events:
            adopted = adopt(adopted, event, config, limits)
        assert _adoptable(adopted) == _adoptable(decided)


def _scanned(state: JobState, request_id: str) -> Decided | None:
    """The idempotency window's latest entry for `request_id`, found the slow way."""
    return next((d for d in reversed(state.decided) if d.request_id == request_id), None)


@SETTINGS
@given(config=configs, spec=steps, window=st.sampled_from([0, 1, 3, 1000]))
def test_the_window_index_finds_what_a_scan_finds(
    config: JobConfig, spec: list[Any], window: int
) -> None:
    """A request is found in the idempotency window exactly when a scan of the window finds
    it, through the index each new state takes over, one rebuilt for a state decided from
    again (each `before` gave its index away), and one built for a state read back."""
    asked = {f"req-{n}" for n in range(len(spec))} | {f"cancel-{n}" for n in range(len(spec))}
    scanned = lifecycle._SCANNED
    lifecycle._SCANNED = -1  # an index for every window, even an empty one
    try:
        for before, _, after, _ in _play(config, spec, window):
            for state in (after, before, load_state(dump_state(after))):
                for request_id in sorted(asked):
                    assert _in_window(state, request_id) == _scanned(state, request_id)
                # and it holds the window's request IDs, no more: a busy job type's does
                # not grow
                assert state.decided_index is not None
                assert state.decided_index.keys() == {d.request_id for d in state.decided}
    finally:
        lifecycle._SCANNED = scanned


def test_the_window_index_is_never_read_or_written() -> None:
    """The index is no part of a state's JSON, and one in a row read back is ignored: it
    cannot make a request look new, or decided."""
    window = tuple(Decided(f"r{n}", EventType.STARTED, f"run-{n}") for n in range(40))
    state = JobState(JOB, decided=window, decided_next=40)
    assert _in_window(state, "r3") == window[3]
    assert state.decided_index == {d.request_id: d for d in window}
    assert b"index" not in dump_state(state)
    entry = b'{"request_id":"b","type":"started","run_id":"r2"}'
    forged = dump_state(state)[:-1] + b',"decided_index":{"b":' + entry + b"}}"
    read = load_state(forged)
    assert read == state
    assert read.decided_index is None
    assert _in_window(read, "b") is None
    assert _in_window(read, "r39") == window[39]


def test_each_change_of_a_state_hands_its_window_index_on() -> None:
    """A start, a heartbeat that renews a deadline, a queued start and an end that promotes
    the queued run each pass the idempotency window's index on to the state they make, so
    the next request of a busy job type is looked up in it, not found by scanning its
    window again."""
    window = tuple(Decided(f"r{n}", EventType.STARTED, f"run-{n}") for n in range(40))
    state = JobState(JOB, decided=window, decided_next=40)
    config = JobConfig(policy=Policy.QUEUE, timeout=timedelta(seconds=30))
    asked = Source(topic="jobs.requests", partition=0, offset=0)
    answered = Source(topic="jobs.results", partition=0, offset=0)
    state, events = decide(state, Start("a", JOB, None, {}, T0, asked), config)
    run_id = events[0].run_id
    index = state.decided_index
    assert index is not None
    assert run_id is not None
    later = T0 + timedelta(seconds=10)
    steps: list[tuple[Command, list[EventType]]] = [
        (Progress(JOB, run_id, None, None, later, answered), []),
        (
            Start("b", JOB, None, {}, later, Source(topic="jobs.requests", partition=0, offset=1)),
            [EventType.QUEUED],
        ),
        (
            Finish(JOB, run_id, RunStatus.COMPLETED, {}, None, later, answered),
            [EventType.COMPLETED, EventType.STARTED],
        ),
    ]
    for command, expected in steps:
        before = state
        state, events = decide(state, command, config)
        assert [e.type for e in events] == expected
        assert state is not before
        assert state.decided_index is index
    assert state.active[0].deadline == later + timedelta(seconds=30)
    assert index.keys() == {d.request_id for d in state.decided}


@given(items=st.lists(st.integers(), max_size=6), size=st.integers(0, 8))
def test_a_window_keeps_its_last_entries(items: list[int], size: int) -> None:
    """A window with an entry added holds the last `size` of its entries (none for 0)."""
    kept = _appended(tuple(items), -1, size)
    expected = (*items, -1)[max(0, len(items) + 1 - size) :] if size else ()
    assert kept == expected
