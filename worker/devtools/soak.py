"""A soak: the lifecycle workload at a steady rate for minutes, sampled at intervals.

`jobctl bench --soak MINUTES` runs one exactly-once worker (`jobctl run`, as in production)
while a paced producer sends start requests for a rotating set of job types and a simulated
executor completes every `started` run. At every sample it records:

- the worker's resident memory (VmRSS);
- the orchestrator group's consumer lag: input records (requests and results) not yet
  committed by the worker;
- p99 of request → `started` seen by a read_committed consumer, over the interval.

It fails when, after the first sample (which includes start-up), any of these grows past its
bound: RSS more than `RSS_GROWTH` plus `RSS_SLACK_MB` over the first sample; lag over two
seconds of requests; an interval's p99 over `P99_LIMIT_MS`. Ended runs stay in the worker's
memory until their changelog tombstone (`JOBS_RUN_RETENTION_S`), so the soak sets a short
retention: the history then stops growing in memory after that long, and growth beyond it
would be a leak.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaProducer
from rich.table import Table

from worker.devtools.bench import (
    BenchError,
    _Bench,
    _percentile,
    _producer,
    _send_starts,
    _Tail,
    _Worker,
    start_body,
)
from worker.settings import Topics

RSS_GROWTH = 0.25  # of the first sample's RSS
RSS_SLACK_MB = 16.0
P99_LIMIT_MS = 1000.0
JOB_TYPES = 500  # rotated through: each job type's runs follow one another


@dataclass(frozen=True)
class SoakSample:
    """One interval of the soak."""

    elapsed_s: float
    rss_mb: float
    lag: int
    p99_ms: float
    started: int  # runs started during the interval


@dataclass
class SoakReport:
    """Every sample, the bounds, and what went past them."""

    rate: float
    samples: list[SoakSample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def table(self) -> Table:
        """The samples as a rich table."""
        table = Table(
            "elapsed s",
            "RSS MB",
            "lag",
            "p99 ms",
            "started",
            title=f"soak at {self.rate:,.0f} starts/s",
            caption=f"bounds: RSS ≤ first * {1 + RSS_GROWTH:.2f} + {RSS_SLACK_MB:.0f} MB, "
            f"lag ≤ {2 * self.rate:,.0f}, p99 ≤ {P99_LIMIT_MS:,.0f} ms",
        )
        for s in self.samples:
            table.add_row(
                f"{s.elapsed_s:,.0f}",
                f"{s.rss_mb:,.1f}",
                f"{s.lag:,}",
                f"{s.p99_ms:,.1f}",
                f"{s.started:,}",
            )
        return table

    def judge(self) -> None:
        """Fill `failures` from the samples."""
        if len(self.samples) < 2:
            self.failures.append("fewer than two samples: soak longer than two intervals")
            return
        first = self.samples[0]
        for s in self.samples[1:]:
            if s.rss_mb > first.rss_mb * (1 + RSS_GROWTH) + RSS_SLACK_MB:
                self.failures.append(f"RSS {s.rss_mb:.1f} MB at {s.elapsed_s:.0f} s")
            if s.lag > 2 * self.rate:
                self.failures.append(f"lag {s.lag} at {s.elapsed_s:.0f} s")
            if s.p99_ms > P99_LIMIT_MS:
                self.failures.append(f"p99 {s.p99_ms:.0f} ms at {s.elapsed_s:.0f} s")


def _rss_mb(worker: _Worker) -> float:
    for line in Path(f"/proc/{worker.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError("no VmRSS in /proc/<pid>/status")


async def _lag(bench: _Bench, topics: Topics) -> int:
    """Input records the orchestrator's group has not committed yet."""
    group = f"{topics.requests.removesuffix('.requests')}.orchestrator"
    committed = await bench.admin.list_consumer_group_offsets(group)
    inputs = [tp for tp in committed if tp.topic in (topics.requests, topics.results)]
    ends = await bench.reader.end_offsets(inputs) if inputs else {}
    return sum(max(0, ends[tp] - committed[tp].offset) for tp in inputs)


class _Pacer:
    """Sends start requests at `rate` per second, job types in rotation, until stopped."""

    def __init__(self, prefix: str, rate: float) -> None:
        self.prefix = prefix
        self.rate = rate
        self.sent: dict[str, float] = {}

    async def run(self, producer: AIOKafkaProducer, topics: Topics) -> None:
        began = time.perf_counter()
        for i in itertools.count():
            delay = began + i / self.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            job_type, request_id = f"{self.prefix}-job-{i % JOB_TYPES}", f"{self.prefix}-{i}"
            self.sent[request_id] = time.perf_counter()
            await producer.send(
                topics.requests, start_body(job_type, request_id), key=job_type.encode()
            )


async def run_soak(
    bench: _Bench, minutes: float, rate: float, interval_s: float, retention_s: int
) -> SoakReport:
    """Soak one worker for `minutes` at `rate` starts/s, sampled every `interval_s`."""
    topics = await bench.topics("soak", bench.options.partitions)
    prefix = topics.requests.removesuffix(".requests")
    worker = bench.worker(topics, "exactly_once", run_retention_s=str(retention_s))
    report = SoakReport(rate)
    async with _producer(bench.kafka, linger_ms=0) as producer:
        tail = _Tail(bench.kafka, topics.status, executor=(producer, topics.results), track=True)
        await tail.start()
        pacer = _Pacer(prefix, rate)
        sending: asyncio.Task[None] | None = None
        try:
            await worker.start()
            warm = [(f"{prefix}-warm-{i}", f"{prefix}-warm-{i}") for i in range(8)]
            await _send_starts(producer, topics, warm)
            await tail.until(lambda: tail.types["completed"] >= 8, "warm-up", 120, worker)
            sending = asyncio.create_task(pacer.run(producer, topics))
            began = time.perf_counter()
            while time.perf_counter() - began < minutes * 60:
                window_start = time.perf_counter()
                await asyncio.sleep(interval_s)  # the interval itself is what is measured
                if sending.done():
                    sending.result()
                worker.check_alive()
                lag = await _lag(bench, topics)
                elapsed = time.perf_counter() - began
                report.samples.append(_sample(tail, pacer, worker, lag, window_start, elapsed))
                bench.say(_line(report.samples[-1]))
            await worker.stop()
        finally:
            if sending is not None:
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
            await worker.close()
            await tail.stop()
    report.judge()
    return report


def _sample(
    tail: _Tail, pacer: _Pacer, worker: _Worker, lag: int, window_start: float, elapsed: float
) -> SoakSample:
    latencies = sorted(
        (seen - pacer.sent[rid]) * 1000
        for rid, seen in tail.started_seen.items()
        if rid in pacer.sent and seen >= window_start
    )
    return SoakSample(
        elapsed_s=elapsed,
        rss_mb=_rss_mb(worker),
        lag=lag,
        p99_ms=_percentile(latencies, 99) if latencies else 0.0,
        started=len(latencies),
    )


def _line(s: SoakSample) -> str:
    return (
        f"soak {s.elapsed_s:,.0f} s: RSS {s.rss_mb:,.1f} MB, lag {s.lag:,}, "
        f"p99 {s.p99_ms:,.1f} ms, {s.started:,} started"
    )
