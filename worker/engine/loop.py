"""The worker: its Kafka clients, the poll loop, dispatch to partitions, ticks, shutdown.

One consumer in the group `<prefix>.orchestrator` reads `<prefix>.requests` and
`<prefix>.results`. The intake queues each poll's records by partition and hands them to the
batch runner in decision order, one batch per partition at a time, so the owner of N
serializes every transition of N's job types. Every `JOBS_TICK_S` an idle partition with a
run past its deadline gets an empty batch at the wall clock's time, so its runs time out
without new input.

The units (see ARCHITECTURE.md): `PartitionManager` (ownership), `Intake` (what was
fetched, batch by batch), `PartitionTask` (decisions), `StateManager` (SQLite and the
changelog), the record collector (output and offsets), `BatchRunner` (one batch, and what a
failure does).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import structlog
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError

from schemas import RunStatus
from worker import compat, compiled
from worker.core.config import JobsConfig, load as load_config
from worker.core.lifecycle import JobConfig
from worker.engine import topics as topic_admin
from worker.engine.codec import TopicRole
from worker.engine.collector import AtLeastOnce, ExactlyOnce, RecordCollector
from worker.engine.hooks import Hooks
from worker.engine.intake import Intake
from worker.engine.observe import BrokerWatch, HttpServer, Metrics, SharedProbe
from worker.engine.partitions import PartitionManager
from worker.engine.processing import BatchRunner
from worker.engine.shared import SharedExactlyOnce
from worker.engine.state import StateManager
from worker.engine.task import Rules
from worker.kafkaio import cleartext_password, connection
from worker.settings import Settings

log = structlog.get_logger("worker")


def _described(config: JobConfig) -> str:
    timeout = f"{config.timeout.total_seconds():g}s" if config.timeout else "none"
    return f"policy={config.policy.value} scope={config.scope.value} timeout={timeout}"


class StopTimedOut(RuntimeError):
    """The worker's stop outlasted `Settings.shutdown_timeout_s` (a broker that does not
    answer); it exits without waiting longer."""


Step = tuple[str, Callable[[], Awaitable[None]] | None]


async def run_steps(steps: list[Step], failed: Callable[[BaseException], None]) -> list[str]:
    """Run each step (None: nothing to do) whatever became of the ones before: a failure is
    logged and given to `failed`; returns the names of the steps that failed."""
    names = []
    for name, action in steps:
        if action is None:
            continue
        try:
            await action()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # the stop itself is cancelled
            # A wait inside the step was cancelled under it (a client closing with its broker
            # gone): the step failed; the steps after it still run, SQLite's close among them.
            names.append(name)
            log.error("a step of stopping failed; going on", step=name, error="cancelled inside")
            failed(RuntimeError(f"{name}: a wait inside it was cancelled"))
        except Exception as exc:
            names.append(name)
            log.error("a step of stopping failed; going on", step=name, error=repr(exc))
            failed(exc)
    return names


async def _leave(consumer: AIOKafkaConsumer) -> None:
    with contextlib.suppress(KafkaError):
        await consumer.stop()  # leaves the group; revokes the partitions


def _collector(
    worker: Worker, consumer: AIOKafkaConsumer, identity: Callable[[], Awaitable[str]]
) -> RecordCollector:
    """The record collector `JOBS_PROCESSING_GUARANTEE` and `JOBS_TRANSACTIONS` choose."""
    s = worker.settings
    if s.processing_guarantee == "at_least_once":
        return AtLeastOnce(s, consumer)
    if s.worker_transactions:
        stop, metrics = worker.stop_with, worker.metrics
        return SharedExactlyOnce(s, worker.hooks, consumer, identity, stop, metrics)
    return ExactlyOnce(s, worker.hooks, worker.metrics)


class Worker:
    """The orchestrator process: `await Worker(settings).run(stop_event)`."""

    def __init__(self, settings: Settings, hooks: Hooks | None = None) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.hooks = hooks or Hooks()
        self._roles: dict[str, TopicRole] = {
            self.topics.requests: "requests",
            self.topics.results: "results",
        }
        # Read at construction so that an invalid file stops start-up before any I/O.
        self.jobs_config: JobsConfig = load_config(settings.config)
        self.partition_count = 0
        self.ready = asyncio.Event()  # every assigned partition taken
        self._failure: BaseException | None = None
        self._stopping = asyncio.Event()
        self.metrics = Metrics()
        self._state = StateManager(settings, self.metrics)
        self._http: HttpServer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._collector: RecordCollector | None = None
        self._partitions: PartitionManager | None = None
        self._intake: Intake | None = None
        self._rules: Rules | None = None

    def rules(self) -> Rules:
        """What every partition task decides with (made once the partition count is known;
        the same for every take, so its settings document is made once)."""
        if self._rules is not None and self._rules.partitions == self.partition_count:
            return self._rules
        s = self.settings
        self._rules = Rules(
            partitions=self.partition_count,
            jobs=self.jobs_config,
            limits=s.limits,
            input_limits=s.input_limits,
            retention=timedelta(seconds=s.run_retention_s),
            hold=timedelta(seconds=s.time_hold_s),
            skew=timedelta(seconds=s.max_clock_skew_s),
            before_record=self.hooks.before_record,
        )
        return self._rules

    def is_ready(self) -> bool:
        """Whether every assigned partition is taken and restored, nothing failed, and the
        broker is not fencing this worker's transactions again and again."""
        partitions = self._partitions
        collector = self._collector
        return (
            self._failure is None
            and self.ready.is_set()
            and partitions is not None
            and partitions.taking == 0
            and not (isinstance(collector, SharedExactlyOnce) and collector.fenced_again())
        )

    def _halted(self) -> bool:
        return self._stopping.is_set() or self._failure is not None

    def stop_with(self, failure: BaseException) -> None:
        """Stop the worker; `run` raises `failure` once it has shut down."""
        if self._failure is None:
            self._failure = failure

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until `stop` is set (or the task is cancelled), then shut down cleanly."""
        stop = stop or asyncio.Event()
        s = self.settings
        compat.install()
        compat.quiet_fenced_futures(asyncio.get_running_loop())
        self.partition_count = await self._check_topics()
        await self._state.start(s.db_path)
        consumer = self._consumer = AIOKafkaConsumer(
            group_id=s.group_id,
            **connection(s),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            partition_assignment_strategy=(RangePartitionAssignor,),
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            max_poll_records=s.batch_max_records,
            fetch_max_wait_ms=s.fetch_max_wait_ms,
        )
        collector = self._collector = _collector(self, consumer, self._state.store.identity)
        partitions = self._partitions = PartitionManager(
            s,
            consumer,
            collector,
            self._state,
            self.rules,
            self.stop_with,
            self._stopping,
            self.ready,
        )
        runner = BatchRunner(
            partitions, collector, self._state, self.hooks, self.stop_with, self.metrics
        )
        self._intake = Intake(s, partitions, runner, collector, self._roles, self._halted)
        # One probe of the broker for /readyz, /metrics and the log's broker lines.
        broker = SharedProbe(self._probe)
        try:
            if s.http_port:
                self._http = HttpServer(
                    self.metrics,
                    self.is_ready,
                    self._measure,
                    broker,
                    s.http_port,
                    s.http_host,
                )
                await self._http.start()
            await collector.start()
            consumer.subscribe(
                [self.topics.requests, self.topics.results], listener=partitions.listener()
            )
            await consumer.start()
            log.info(
                "worker started",
                group=s.group_id,
                partitions=self.partition_count,
                guarantee=s.processing_guarantee,
                transactions=s.transactions,
                db=str(s.db_path),
                job_settings=str(s.config) if s.config is not None else "none (the defaults)",
                defaults=_described(self.jobs_config.defaults),
                job_types_configured=len(self.jobs_config.job_types),
                job_types=sorted(self.jobs_config.job_types)[:20],  # the first, for a glance
                code=compiled.state(),
            )
            if (cleartext := cleartext_password(s)) is not None:
                log.warning(cleartext)
            watch = asyncio.create_task(BrokerWatch(broker).run())
            try:
                await self._loop(stop)
            finally:
                watch.cancel()
        finally:
            await self._shutdown()
        if self._failure is not None:
            raise self._failure

    async def _check_topics(self) -> int:
        admin = AIOKafkaAdminClient(**connection(self.settings))
        await admin.start()
        try:
            count = topic_admin.check_counts(await topic_admin.describe(admin, self.topics))
            await topic_admin.check_timestamps(admin, self.topics)
            if unkept := await topic_admin.unkept(admin, self.topics):
                # The worker runs (as it always has), but what it needs kept is not.
                log.warning(
                    "the broker will delete records the worker needs kept: "
                    + "; ".join(str(m) for m in unkept),
                    fix=topic_admin.fix_command(unkept, self.settings.bootstrap_servers),
                )
            return count
        finally:
            await admin.close()

    async def _loop(self, stop: asyncio.Event) -> None:
        assert self._consumer is not None
        assert self._intake is not None
        intake, s = self._intake, self.settings
        stopping = asyncio.ensure_future(stop.wait())
        next_tick = time.monotonic() + s.tick_s
        next_summary = time.monotonic() + s.log_summary_s
        try:
            while not stop.is_set() and self._failure is None:
                fetch = asyncio.ensure_future(
                    self._consumer.getmany(
                        timeout_ms=s.poll_timeout_ms, max_records=s.batch_max_records
                    )
                )
                await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await fetch
                    break
                intake.offer(fetch.result())
                if (failure := self._state.failure) is not None:
                    log.error("writing the SQLite file failed; stopping", error=repr(failure))
                    self.stop_with(failure)
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + s.tick_s
                    intake.tick(datetime.now(UTC))
                if s.log_summary_s and time.monotonic() >= next_summary:
                    next_summary = time.monotonic() + s.log_summary_s
                    self._log_summary()
        finally:
            stopping.cancel()
            self._stopping.set()  # cuts short any retry's backoff

    def _log_summary(self) -> None:
        """One info line with what was decided since the last one (nothing when idle)."""
        done = self.metrics.summary()
        if not done:
            return
        log.info(
            "decided",
            seconds=self.settings.log_summary_s,
            events=dict(sorted(done.events.items())),
            dead_letters=dict(sorted(done.dead_letters.items())),
            batches=done.batches,
            transactions=done.transactions,
            failed_batches=done.failed,
            partitions=sorted(self._partitions.owned) if self._partitions else [],
        )

    async def _probe(self) -> None:
        """One request that only the broker can answer: its end offsets of the owned inputs."""
        if self._consumer is None or self._partitions is None:
            return
        owned = list(self._partitions.owned)
        tps = [tp for n in owned for tp in self._partitions.topic_partitions(n)]
        if tps:
            await self._consumer.end_offsets(tps)

    async def _measure(self) -> None:
        """Set the gauges a scrape reads: partitions, active runs, lag per input, and the
        rows waiting for SQLite (set at each batch too, but not when the writer drains)."""
        partitions = self._partitions
        if partitions is None:
            return
        self.metrics.sqlite_backlog.set(self._state.store.writes.backlog)
        owned = dict(partitions.owned)
        self.metrics.partitions.set(len(owned))
        self.metrics.active_runs.set(
            sum(r.status is RunStatus.RUNNING for o in owned.values() for r in o.task.runs.values())
        )
        self.metrics.lag.clear()  # partitions no longer owned leave the series
        for number in owned:
            for role, lag in (await partitions.lag(number)).items():
                self.metrics.lag.labels(str(number), role).set(lag)

    async def _drain(self) -> None:
        if self._partitions is None:
            return
        batches = [o.batch for o in self._partitions.owned.values() if o.batch is not None]
        if batches:
            await asyncio.gather(*batches, return_exceptions=True)

    async def _shutdown(self) -> None:
        """Stop in order, each step whatever became of the ones before, within
        `Settings.shutdown_timeout_s`: let the batches in flight commit, leave the group,
        close the producers, close SQLite (writing what is queued), stop the HTTP server.

        A failed step is logged and the next ones run, so SQLite is closed and its thread
        ends whatever failed before it; the first failure is what `run` raises, unless the
        stop outlasts the bound (a broker that does not answer can hold a client's close for
        ever): then `StopTimedOut`. The next owner reads again what was not committed, and
        SQLite is still a prefix of what Kafka committed. A hang the event loop cannot time
        out (a call that never returns) is `worker.watchdog`'s.
        """
        bound = self.settings.shutdown_timeout_s
        log.info("stopping", within_s=bound)
        if self.hooks.on_stop is not None:
            self.hooks.on_stop(bound)
        try:
            async with asyncio.timeout(bound):
                # Shielded so a second cancellation cannot leave the group membership dangling.
                await asyncio.shield(self._stop_steps())
        except TimeoutError:
            log.error(
                "stopping took too long (the broker does not answer); exiting without it",
                seconds=bound,
            )
            timed_out = StopTimedOut(f"stopping took over {bound:g} s; exited without it")
            timed_out.__cause__, self._failure = self._failure, timed_out  # logged before

    async def _stop_steps(self) -> None:
        consumer, partitions, collector, http = (
            self._consumer,
            self._partitions,
            self._collector,
            self._http,
        )
        steps: list[Step] = [
            ("draining the batches in flight", self._drain_to_stop),
            ("leaving the group", functools.partial(_leave, consumer) if consumer else None),
            ("closing the partitions' producers", partitions.close_all if partitions else None),
            ("stopping the record collector", collector.stop if collector else None),
            ("closing SQLite", self._state.stop),
            ("stopping the HTTP server", http.stop if http else None),
        ]
        failed = await run_steps(steps, self.stop_with)
        log.info("worker stopped", **({"failed_steps": failed} if failed else {}))

    async def _drain_to_stop(self) -> None:
        """Let every batch in flight commit before leaving the group."""
        self.hooks.point("stopping")
        await self._drain()
