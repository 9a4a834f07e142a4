"""The worker's batch step without a broker: what a batch commits."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from schemas import EventType
from worker.core.config import JobsConfig
from worker.core.lifecycle import JobConfig, Limits, merge_inputs
from worker.core.limits import InputLimits
from worker.engine.codec import InputRecord
from worker.engine.task import IdleStates, PartitionTask, Retained, Rules


def start(offset: int, timestamp_ms: int, job_type: str) -> InputRecord:
    body = json.dumps({"job_type": job_type, "request_id": f"req-{offset}"}).encode()
    return InputRecord(
        "requests", "jobs.requests", 0, offset, timestamp_ms, job_type.encode(), body
    )


def test_the_highest_offset_is_committed_when_broker_times_go_backwards() -> None:
    """Records of one input are decided in offset order, and the batch commits past its last
    offset, even when a later offset carries an earlier time (a broker clock stepping
    back)."""
    rules = Rules(1, JobsConfig(), Limits(), InputLimits(), timedelta(days=1))
    task = PartitionTask(0, rules)
    records = [start(0, 2_000, "late"), start(1, 1_000, "early")]
    outcome = task.apply(merge_inputs(records))
    assert [e.job_type for e in outcome.events] == ["late", "early"]
    assert outcome.next_offsets == {"jobs.requests": 2}
    assert task.applied == {"jobs.requests": 2}
    assert set(outcome.changed) == {"early", "late"}


def test_ended_runs_leave_in_order_once_retention_has_passed_never_earlier() -> None:
    """A run leaves at the first horizon at or after its end; one that ended earlier than the
    run before it (a producer clock gone back) leaves with that run, not before."""
    t0 = datetime(2026, 11, 29, 7, 0, tzinfo=UTC)
    retained = Retained()
    for i, run_id in enumerate(["a", "b", "c"]):
        retained.add(t0 + timedelta(seconds=i), run_id)
    retained.add(t0 + timedelta(seconds=1.5), "late-clock")
    retained.add(t0 + timedelta(seconds=4), "d")

    assert retained.expire(t0 - timedelta(seconds=1)) == []
    assert retained.expire(t0 + timedelta(seconds=1)) == ["a", "b"]
    assert retained.expire(t0 + timedelta(seconds=1.9)) == []  # "late-clock" waits behind "c"
    assert len(retained) == 3
    retained.add(t0 + timedelta(seconds=5), "e")
    assert retained.expire(t0 + timedelta(seconds=4)) == ["c", "late-clock", "d"]
    assert retained.expire(t0 + timedelta(seconds=4)) == []
    assert (len(retained), retained.expire(t0 + timedelta(days=1))) == (1, ["e"])
    assert len(retained) == 0


def result(offset: int, timestamp_ms: int, job_type: str, run_id: str) -> InputRecord:
    body = json.dumps({"job_type": job_type, "run_id": run_id, "kind": "progress"}).encode()
    return InputRecord("results", "jobs.results", 0, offset, timestamp_ms, job_type.encode(), body)


def test_heartbeats_leave_one_deadline_entry_and_the_run_times_out_once() -> None:
    """A run with a day's timeout renewed by 1,000 heartbeats keeps one entry in the deadline
    heap (not one per heartbeat until its day is over), is not timed out at its old
    deadlines, and times out once at its last."""
    config = JobsConfig(defaults=JobConfig(timeout=timedelta(days=1)))
    task = PartitionTask(0, Rules(1, config, Limits(), InputLimits(), timedelta(days=1)))
    started = task.apply([start(0, 0, "etl")])
    (run_id,) = [e.run_id for e in started.events]
    assert run_id is not None
    for i in range(1, 1001):
        outcome = task.apply([result(i, i * 10_000, "etl", run_id)])  # every 10 s
        assert outcome.events == []
    assert len(task.deadlines) == 1
    last = datetime.fromtimestamp(1000 * 10, tz=UTC) + timedelta(days=1)
    # Its first deadline comes and goes without a time-out.
    assert (
        task.apply([], wall_clock=datetime.fromtimestamp(0, tz=UTC) + timedelta(days=1)).events
        == []
    )
    assert task.apply([], wall_clock=last - timedelta(seconds=1)).events == []
    timed_out = task.apply([], wall_clock=last).events
    assert [e.type for e in timed_out] == [EventType.TIMED_OUT]
    assert task.apply([], wall_clock=last + timedelta(hours=1)).events == []
    assert task.deadlines == []


def test_time_is_held_back_for_an_unread_input_then_goes_on() -> None:
    """While results are unread, a backlog of later requests waits (nothing decided, time
    not moved past the last result read); after `Rules.hold` of that, both go on: the
    backlog is decided, then the run times out."""
    config = JobsConfig(defaults=JobConfig(timeout=timedelta(seconds=10)))
    task = PartitionTask(0, Rules(1, config, Limits(), InputLimits(), timedelta(days=1)))
    task.apply([start(0, 0, "slow")])
    backlog = [start(i, 60_000 + i, f"other-{i}") for i in range(1, 4)]
    held = task.apply(backlog, lagging=frozenset({"results"}))
    assert held.events == []
    assert held.next_offsets == {}
    task.rules = Rules(1, config, Limits(), InputLimits(), timedelta(days=1), hold=timedelta(0))
    gone_on = task.apply([], lagging=frozenset({"results"}))  # held since the backlog
    assert [e.type for e in gone_on.events] == [EventType.STARTED] * 3 + [EventType.TIMED_OUT]


def test_a_broker_clock_stepping_forward_does_not_time_runs_out_en_masse() -> None:
    """Records stamped two hours ahead (a leader with a wrong clock) move time only to this
    worker's clock plus the skew: runs with a ten-minute timeout live on. A clock stepping
    back by less than the timeout times out no run started during the step."""
    config = JobsConfig(defaults=JobConfig(timeout=timedelta(minutes=10)))
    task = PartitionTask(0, Rules(1, config, Limits(), InputLimits(), timedelta(days=1)))
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    task.apply([start(i, now_ms, f"job-{i}") for i in range(5)])
    ahead = now_ms + 2 * 3600 * 1000
    stepped = task.apply([start(10 + i, ahead, f"late-{i}") for i in range(3)])
    assert EventType.TIMED_OUT not in [e.type for e in stepped.events]
    assert len(task.runs) == 8
    back = task.apply([start(20, now_ms - 5 * 60 * 1000, "early")])
    assert EventType.TIMED_OUT not in [e.type for e in back.events]


def test_idle_job_states_stay_parsed_within_their_budget_least_recently_used_out() -> None:
    """A job type used again soon is not loaded back from SQLite; what idle states may hold
    is bounded by their window entries, and the least recently used leave first."""
    rules = Rules(1, JobsConfig(), Limits(), InputLimits(), timedelta(days=1))
    task = PartitionTask(0, rules)
    # Room for three idle job types (a state counts 4, its windows an entry each per run),
    # one of them with two runs.
    task.idle = IdleStates(budget=2 * (4 + 2) + (4 + 4))
    for offset, job_type in enumerate(["a", "b", "c", "d", "b"]):
        # A start and its run's end: the job type is idle again, its windows one entry each.
        outcome = task.apply([start(offset, 1_000 + offset, job_type)])
        run_id = outcome.events[0].run_id or ""
        body = json.dumps({"job_type": job_type, "run_id": run_id, "status": "completed"})
        end = InputRecord(
            "results", "jobs.results", 0, offset, 1_001 + offset, job_type.encode(), body.encode()
        )
        task.apply([end])
        task.evict_idle([job_type])
    # "a" left when "d" came; "b", used again, is now the most recent, and it fits.
    assert set(task.jobs) == {"c", "d", "b"}
    assert len(task.idle) == 3
    assert task.wanted_states([start(9, 9_000, "a"), start(10, 9_001, "b")]) == ["a"]


def test_an_idle_budget_of_zero_keeps_no_idle_state() -> None:
    """`JOBS_IDLE_STATE_ENTRIES=0`: an idle job type leaves memory after its batch, as a busy
    one that becomes idle does; a busy one stays."""
    rules = Rules(1, JobsConfig(), Limits(), InputLimits(), timedelta(days=1))
    task = PartitionTask(0, rules)
    task.idle = IdleStates(budget=0)
    outcome = task.apply([start(0, 1_000, "a"), start(1, 1_001, "b")])
    run_id = next(e.run_id for e in outcome.events if e.job_type == "a") or ""
    body = json.dumps({"job_type": "a", "run_id": run_id, "status": "completed"}).encode()
    task.apply([InputRecord("results", "jobs.results", 0, 0, 1_002, b"a", body)])
    task.evict_idle(["a", "b"])
    assert set(task.jobs) == {"b"}  # "b" still runs
    assert len(task.idle) == 0
