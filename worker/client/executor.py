"""Executor helper: a coroutine per job type, called for each `started` run.

    executor = Executor(client)

    @executor.job("report.daily")
    async def report(run: RunContext) -> dict[str, object]:
        await run.progress({"rows": 600})        # progress; also renews the run's timeout
        return {"rows": 1200}                    # completes the run with these metrics

    await executor.run(stop_event)

What is guaranteed (the README's "What an executor guarantees" says the same):

- **Work at least once, one outcome per run.** A `started` event's offset is committed only
  after the run's outcome is delivered, so a run whose executor dies (SIGKILL, a crash, a
  machine lost) is delivered again to the next executor of the group, which checks the run is
  still RUNNING before it starts the work: a run whose outcome did land is not run again. The
  orchestrator accepts the first outcome of a run and rejects any later one.
- **Outcomes.** The return value completes the run with those metrics; an exception fails it
  (`error` in the metrics); a return value that is not a mapping, or metrics that are not
  JSON, fail it with the reason under "System Notes". Outcomes are retried with back-off
  until the orchestrator answers them.
- **Cancels and time-outs** reach the process running the job wherever its partition has
  moved: every executor reads the status topic's ends for the runs it holds. The coroutine
  sees `asyncio.CancelledError`; one that ignores it is abandoned after `cancel_grace`.
- **Stopping.** Reading stops; running jobs get `grace` seconds to finish and report; what
  still runs then is cancelled and handed back: its offset stays uncommitted and the group's
  next executor runs it again. A partition that moves to another executor in a rebalance
  hands its runs back the same way.
- **Groups.** The default group is `<prefix>.executors.<job types, sorted>`: executors for
  different job type sets never share a group, so none skips another's runs. A new group
  starts at the oldest `started` event of a run of its job types that is still RUNNING (the
  end of the topic when there is none), so runs started before it joined are run.

A run left with no executor at all stays RUNNING until an executor of its group returns (its
`started` event is uncommitted), or until its job type's `timeout` ends it; `heartbeat=`
renews that timeout while a job runs, so a timeout shorter than the job works as a lease.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from collections.abc import Callable, Iterable
from datetime import timedelta

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from schemas import EventType, RunRecord, read_status_event
from worker.client.execution import JobFunction, RunContext, RunExecution, Timing
from worker.client.jobclient import JobClient
from worker.kafkaio import connection, partitions_of, start_client

__all__ = ["Executor", "RunContext", "default_group"]

log = structlog.get_logger("executor")

_STARTED = b'"started"'


def default_group(prefix: str, job_types: Iterable[str]) -> str:
    """`<prefix>.executors.<job types, sorted and comma-joined>`, or a digest of them if long."""
    names = ",".join(sorted(job_types))
    if len(names) > 120:
        names = "sha256-" + hashlib.sha256(names.encode()).hexdigest()[:24]
    return f"{prefix}.executors.{names}"


class _Held:
    """A run this executor holds: the partition and offset of its `started` event."""

    def __init__(self, tp: TopicPartition, offset: int, task: asyncio.Task[None]) -> None:
        self.tp = tp
        self.offset = offset
        self.task = task


class Executor:
    """Runs registered job coroutines for `started` events; reports their outcomes.

    `Executor(client, group=None, *, grace=20.0, cancel_grace=10.0, heartbeat=None)`:
    `client` an open `JobClient`; `group` the consumer group that shares the `started`
    events among executor processes (by default one named after the topic prefix and the
    registered job types); `grace` the seconds running jobs have to finish once stopping
    begins; `cancel_grace` the seconds a cancelled job has to end before it is abandoned;
    `heartbeat` the seconds between heartbeats sent for each running job (None: none).
    """

    def __init__(
        self,
        client: JobClient,
        group: str | None = None,
        *,
        grace: float = 20.0,
        cancel_grace: float = 10.0,
        heartbeat: float | None = None,
    ) -> None:
        self.client = client
        self._group = group
        self.grace = grace
        self.timing = Timing(cancel_grace=cancel_grace, heartbeat=heartbeat)
        self._jobs: dict[str, JobFunction] = {}
        self._held: dict[str, _Held] = {}
        self._read: dict[TopicPartition, int] = {}  # one past the last record read
        self._committed: dict[TopicPartition, int] = {}
        self.ready = asyncio.Event()

    @property
    def group(self) -> str:
        """The consumer group: the one given, or one of its own for this job type set."""
        return self._group or default_group(self.client.settings.topic_prefix, self._jobs)

    def job(self, job_type: str) -> Callable[[JobFunction], JobFunction]:
        """Register the decorated coroutine for `job_type`."""

        def register(function: JobFunction) -> JobFunction:
            if not (
                inspect.iscoroutinefunction(function)
                or inspect.iscoroutinefunction(type(function).__call__)
            ):
                name = getattr(function, "__name__", type(function).__name__)
                raise TypeError(
                    f"@job({job_type!r}): {name} is not a coroutine function; write it with "
                    "async def (a blocking job can await asyncio.to_thread)"
                )
            self._jobs[job_type] = function
            return function

        return register

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Handle `started` events until `stop` is set; then finish or hand back the runs."""
        stop = stop or asyncio.Event()
        if not self._jobs:
            raise ValueError("no job registered: decorate a coroutine with @executor.job(...)")
        await self._start_new_group()
        consumer = AIOKafkaConsumer(
            group_id=self.group,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **connection(self.client.settings),
        )
        await start_client(consumer)
        try:
            consumer.subscribe([self.client.topics.status], listener=_Listener(self, consumer))
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=200)
                if consumer.assignment():
                    self.ready.set()
                for tp, records in batch.items():
                    for record in records:
                        self._handle(tp, record)
                await self._commit(consumer, consumer.assignment())
        finally:
            await self._stop(consumer)

    def _handle(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        self._read[tp] = record.offset + 1
        if record.value is None or _STARTED not in record.value:
            return
        try:
            event = read_status_event(record.value)
        except ValueError:
            log.warning("unreadable status event", partition=tp.partition, offset=record.offset)
            return
        function = self._jobs.get(event.job_type)
        if event.type is not EventType.STARTED or function is None or event.run_id is None:
            return
        if event.run_id in self._held:
            return  # delivered again after a rebalance; it is already running here
        context = RunContext(
            job_type=event.job_type,
            run_id=event.run_id,
            client_id=event.client_id,
            initial_data=event.initial_data or {},
            client=self.client,
        )
        task = asyncio.create_task(RunExecution(function, context, self.timing)())
        self._held[event.run_id] = _Held(tp, record.offset, task)
        task.add_done_callback(lambda done: self._release(event.run_id or "", done))

    def _release(self, run_id: str, task: asyncio.Task[None]) -> None:
        held = self._held.get(run_id)
        if held is None or held.task is not task:
            return
        if task.cancelled():
            return  # handed back: it stays held (uncommitted) until its partition is dropped
        if task.exception() is not None:
            # Not committed: delivered again after a restart or a rebalance, never lost.
            log.error(
                "run left uncommitted after an error", run_id=run_id, error=repr(task.exception())
            )
            return
        del self._held[run_id]

    def _position(self, tp: TopicPartition) -> int | None:
        """Where the group may resume `tp`: the oldest run still held, else past what was read."""
        offsets = [h.offset for h in self._held.values() if h.tp == tp]
        return min(offsets) if offsets else self._read.get(tp)

    async def _commit(self, consumer: AIOKafkaConsumer, tps: Iterable[TopicPartition]) -> None:
        offsets = {}
        for tp in tps:
            position = self._position(tp)
            if position is not None and position != self._committed.get(tp):
                offsets[tp] = position
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:  # retried with the next poll; never fatal
            log.warning("could not commit executor offsets", error=repr(exc))
            return
        self._committed.update(offsets)

    def _hand_back(self, keep: set[TopicPartition]) -> None:
        """Cancel the runs of partitions no longer ours; the next owner runs them again."""
        for run_id, held in list(self._held.items()):
            if held.tp not in keep:
                log.info("handing the run back", run_id=run_id, partition=held.tp.partition)
                held.task.cancel()
                del self._held[run_id]
        for tp in set(self._read) - keep:
            self._read.pop(tp, None)
            self._committed.pop(tp, None)

    async def _stop(self, consumer: AIOKafkaConsumer) -> None:
        tasks = [held.task for held in self._held.values()]
        if tasks:
            log.info("waiting for running jobs", runs=len(tasks), grace_s=self.grace)
            await asyncio.wait(tasks, timeout=self.grace)
        try:
            await self._commit(consumer, consumer.assignment())
        finally:
            unfinished = [held.task for held in self._held.values() if not held.task.done()]
            self._hand_back(set())
            if unfinished:
                await asyncio.wait(unfinished, timeout=self.timing.cancel_grace)
            await consumer.stop()

    async def _start_new_group(self) -> None:
        """For a group with no offsets: start at the oldest run of ours still RUNNING."""
        settings = self.client.settings
        probe = AIOKafkaConsumer(
            group_id=self.group,
            isolation_level="read_committed",
            enable_auto_commit=False,
            **connection(settings),
        )
        await probe.start()
        try:
            tps = await partitions_of(probe, self.client.topics.status)
            probe.assign(tps)
            if any([await probe.committed(tp) is not None for tp in tps]):
                return
            ends = await probe.end_offsets(tps)  # before the view: later starts are past it
            oldest = min(
                (r.started_at for r in await self._running_runs() if r.job_type in self._jobs),
                default=None,
            )
            start = dict(ends)
            if oldest is not None:
                margin = timedelta(seconds=60 + settings.max_clock_skew_s)
                # Kafka's times start in 1970: a run started just after is read from there.
                since = max(0, int((oldest - margin).timestamp() * 1000))
                found = await probe.offsets_for_times(dict.fromkeys(tps, since))
                for tp, at in found.items():
                    if at is not None:
                        start[tp] = min(start[tp], at.offset)
            await probe.commit(start)
            positions = {tp.partition: offset for tp, offset in start.items()}
            log.info("new executor group", group=self.group, start=positions)
        except KafkaError as exc:  # another member set the offsets first
            log.info("executor group offsets not set here", group=self.group, error=repr(exc))
        finally:
            await probe.stop()

    async def _running_runs(self) -> list[RunRecord]:
        await self.client.view.sync(30)
        return self.client.view.runs()


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Commits what is finished before partitions go; hands back runs of partitions gone."""

    def __init__(self, executor: Executor, consumer: AIOKafkaConsumer) -> None:
        self.executor = executor
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.executor._commit(self.consumer, revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.executor._hand_back(set(assigned))
