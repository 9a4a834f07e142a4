"""What the worker shows of itself: Prometheus metrics and its HTTP endpoints.

`JOBS_HTTP_PORT` (default 8080; 0 switches it off) serves:

- `/healthz`: 200 while the event loop answers;
- `/readyz`: 200 once every assigned partition is taken and restored and the broker
  answers (the owned partitions' end offsets within 2 s), 503 with a `reason` otherwise:
  while a partition is being taken (a restore), none is assigned yet, or the broker is
  unreachable;
- `/metrics`: Prometheus text format, from a registry of this worker's own, with the
  process's own series (`process_*`: CPU, memory, open files) and the interpreter's
  (`python_gc_*`, `python_info`). `jobs_ready` is what `/readyz` answers, checked anew at
  each scrape.

Labels stay bounded: event types and dead-letter codes are fixed sets, partitions are as
many as the topics have; no label names a job type. The series of those fixed sets are
made at start, at 0, so that a rate or an alert on a failure has a series before the first
one happens. No counter has a `_created` series beside it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
from aiohttp import web
from aiokafka.errors import KafkaError
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter as MetricCounter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from schemas import EventType
from worker import compiled
from worker.core.config import ConfigError
from worker.engine.task import BatchOutcome

log = structlog.get_logger("worker")

_BROKER_PROBE_S = 2.0  # how long /readyz waits for the broker before it says not ready
_BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_RESTORE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# The reason codes of dead letters (README, "Bad input and dead letters").
DEAD_LETTER_CODES = (
    "empty_value",
    "oversized",
    "malformed_header",
    "malformed_json",
    "too_deep",
    "schema_invalid",
    "run_id_not_allowed",
    "too_large",
    "key_mismatch",
    "unprocessable",
)
# The process's series: prometheus_client's own collectors, added to each worker's registry.
_RUNTIME_COLLECTORS = (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR)
# A counter's `_created` series doubles the series and says nothing a restart's reset of
# the counter does not (process-wide: every registry of the process).
disable_created_metrics()  # type: ignore[no-untyped-call]


@dataclass
class Summary:
    """Counts since the last info-level summary line (`Metrics.summary`)."""

    events: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    failed: int = 0
    transactions: int = 0

    def __bool__(self) -> bool:
        # Whether anything was decided (or failed): an idle worker's batches (a view mark
        # refreshed, a tick) decide nothing and make no line.
        return bool(self.events or self.dead_letters or self.failed)


class Metrics:
    """The worker's metrics, in a registry of its own (several workers may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        for collector in _RUNTIME_COLLECTORS:
            r.register(collector)
        self.events = MetricCounter(
            "jobs_status_events", "Status events published, by type.", ["type"], registry=r
        )
        self.dead_letters = MetricCounter(
            "jobs_dead_letters",
            "Input records dead-lettered, by reason code.",
            ["code"],
            registry=r,
        )
        self.batches = MetricCounter(
            "jobs_batches", "Partition batches, by outcome.", ["outcome"], registry=r
        )
        self.batch_seconds = Histogram(
            "jobs_batch_seconds",
            "From a batch's records to its commit.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.commits = MetricCounter(
            "jobs_commits",
            "Outcomes published (each in a Kafka transaction, exactly-once: see "
            "jobs_transactions), by result: committed, or aborted (nothing of it became "
            "visible).",
            ["result"],
            registry=r,
        )
        self.transactions = MetricCounter(
            "jobs_transactions",
            "Kafka transactions committed (exactly-once): one an outcome with a producer per "
            "partition, one for every outcome handed in meanwhile with JOBS_TRANSACTIONS=worker.",
            registry=r,
        )
        self.commit_seconds = Histogram(
            "jobs_commit_seconds",
            "Publishing one batch's outcome: its records, its offsets and the commit.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.restore_seconds = Histogram(
            "jobs_restore_seconds",
            "Restoring a partition from the changelog.",
            buckets=_RESTORE_BUCKETS,
            registry=r,
        )
        self.active_runs = Gauge(
            "jobs_active_runs", "Runs RUNNING on owned partitions.", registry=r
        )
        self.partitions = Gauge("jobs_partitions_owned", "Partitions this worker owns.", registry=r)
        self.sqlite_backlog = Gauge(
            "jobs_sqlite_backlog",
            "Rows committed to Kafka, not yet written to SQLite.",
            registry=r,
        )
        self.ready = Gauge("jobs_ready", "1 when every assigned partition is served.", registry=r)
        self.compiled = Gauge(
            "jobs_compiled",
            "1 when the hot modules run compiled (make compile), 0 when from source.",
            registry=r,
        )
        self.compiled.set(1 if compiled.state() == "compiled" else 0)
        self._since = Summary()
        self.lag = Gauge(
            "jobs_consumer_lag",
            "Input records not yet consumed, by owned partition and input.",
            ["partition", "input"],
            registry=r,
        )
        for kind in EventType:
            self.events.labels(kind.value)
        for code in DEAD_LETTER_CODES:
            self.dead_letters.labels(code)
        for outcome in ("committed", "failed"):
            self.batches.labels(outcome)
        for result in ("committed", "aborted"):
            self.commits.labels(result)

    def committed(self, outcome: BatchOutcome, seconds: float) -> None:
        """Count a committed batch."""
        self.batches.labels("committed").inc()
        self.batch_seconds.observe(seconds)
        # Counted per batch, not per event: a label lookup per event costs the hot path.
        kinds = outcome.event_counts()
        for kind, n in kinds.items():
            self.events.labels(kind).inc(n)
        codes = Counter(letter.reason.code for _, letter in outcome.dead_letters)
        for code, n in codes.items():
            self.dead_letters.labels(code).inc(n)
        self._since.events.update(kinds)
        self._since.dead_letters.update(codes)
        self._since.batches += 1

    def transaction(self) -> None:
        """Count a committed Kafka transaction."""
        self.transactions.inc()
        self._since.transactions += 1

    def failed(self) -> None:
        """Count a failed batch."""
        self.batches.labels("failed").inc()
        self._since.failed += 1

    def summary(self) -> Summary:
        """What was counted since the last summary, and a fresh count from now."""
        done, self._since = self._since, Summary()
        return done

    def published(self, seconds: float) -> None:
        """Count a committed publication (a transaction, exactly-once) and its latency."""
        self.commits.labels("committed").inc()
        self.commit_seconds.observe(seconds)

    def publish_failed(self) -> None:
        """Count a publication that did not commit (its transaction aborted)."""
        self.commits.labels("aborted").inc()


async def probe_broker(probe: Callable[[], Awaitable[None]]) -> str | None:
    """Why the broker does not answer `probe` within 2 s, in the words `/readyz` and the
    log use, or None when it does."""
    try:
        async with asyncio.timeout(_BROKER_PROBE_S):
            await probe()
    except TimeoutError:
        return f"no answer within {_BROKER_PROBE_S:g} s"
    except (KafkaError, OSError) as exc:
        return str(exc) or type(exc).__name__
    return None


def _retrieved(future: asyncio.Future[str | None]) -> None:
    if not future.cancelled():
        future.exception()


class SharedProbe:
    """`probe_broker` of one probe, shared by whoever asks: an answer younger than `fresh_s`
    is given again, and askers while the broker is being asked wait for that answer. A flood
    of requests to `/readyz` or `/metrics` (which anyone reaching the port may send) asks
    the broker at most once per `fresh_s`."""

    def __init__(
        self,
        probe: Callable[[], Awaitable[None]],
        fresh_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe
        self._fresh_s = fresh_s
        self._clock = clock
        self._answer: tuple[float, str | None] | None = None  # (when, why it did not answer)
        self._asking: asyncio.Future[str | None] | None = None

    async def __call__(self) -> str | None:
        """Why the broker does not answer, or None when it does (`probe_broker`)."""
        if self._answer is not None and self._clock() - self._answer[0] < self._fresh_s:
            return self._answer[1]
        if self._asking is None:
            self._asking = asyncio.ensure_future(self._ask())
            # Retrieved even when every asker has gone: no "exception never retrieved".
            self._asking.add_done_callback(_retrieved)
        # Shielded: an asker that goes away (a closed request) does not cancel the others'.
        return await asyncio.shield(self._asking)

    async def _ask(self) -> str | None:
        try:
            problem = await probe_broker(self._probe)
            self._answer = (self._clock(), problem)
            return problem
        finally:
            self._asking = None


class BrokerWatch:
    """Says in the worker's log when the broker stops answering and when it answers again
    (aiokafka's own lines, repeated while it retries, say neither): the probe `/readyz`
    shares (a `SharedProbe`), every `every_s` seconds."""

    def __init__(self, broker: Callable[[], Awaitable[str | None]], every_s: float = 5.0) -> None:
        self._broker = broker
        self._every_s = every_s
        self._since: float | None = None  # when the broker last stopped answering

    async def run(self) -> None:
        """Probe until cancelled."""
        while True:
            await asyncio.sleep(self._every_s)
            await self.check()

    async def check(self) -> None:
        """One probe; a line when the broker's answering changed since the last."""
        problem = await self._broker()
        now = time.monotonic()
        if problem is not None and self._since is None:
            self._since = now
            log.warning("the broker does not answer; the worker waits for it", reason=problem)
        elif problem is None and self._since is not None:
            log.info("the broker answers again", after_s=round(now - self._since, 1))
            self._since = None


class HttpServer:
    """`/healthz`, `/readyz` and `/metrics` on `port`."""

    def __init__(
        self,
        metrics: Metrics,
        ready: Callable[[], bool],
        refresh: Callable[[], Awaitable[None]],
        broker: Callable[[], Awaitable[str | None]],
        port: int,
        host: str = "",
    ) -> None:
        self._metrics = metrics
        self._host = host
        self._ready = ready
        self._refresh = refresh
        self._broker = broker  # why the broker does not answer (a `SharedProbe`)
        self._port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen on `host` (every interface when empty)."""
        app = web.Application()
        app.router.add_get("/healthz", self._health)
        app.router.add_get("/readyz", self._readiness)
        app.router.add_get("/metrics", self._scrape)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, host=self._host or None, port=self._port).start()
        except OSError as exc:
            await self._runner.cleanup()
            where = f"{self._host} (JOBS_HTTP_HOST), " if self._host else ""
            raise ConfigError(
                f"cannot serve the HTTP endpoints on {where}port {self._port} (JOBS_HTTP_PORT): "
                f"{exc.strerror or exc}; give a free port, or 0 to switch them off"
            ) from None
        log.info("http endpoints listening", host=self._host or "every interface", port=self._port)

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _check(self) -> str | None:
        """Why the worker is not ready, or None when it is; `jobs_ready` says the same."""
        reason: str | None = None
        if not self._ready():
            reason = (
                "a partition is being taken, none is assigned, or transactions are being fenced"
            )
        elif (problem := await self._broker()) is not None:
            reason = f"the broker does not answer: {problem}"
        self._metrics.ready.set(1 if reason is None else 0)
        return reason

    async def _readiness(self, request: web.Request) -> web.Response:
        reason = await self._check()
        if reason is None:
            return web.json_response({"ready": True})
        return web.json_response({"ready": False, "reason": reason}, status=503)

    async def _scrape(self, request: web.Request) -> web.Response:
        await self._check()
        await self._refresh()
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
