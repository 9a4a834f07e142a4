"""What the bench measures latency and CPU with, apart from aiokafka: a librdkafka
(confluent-kafka) reader of the status topic, and a process's CPU time from /proc.

`RdkafkaTail` is the consumer most downstream services use outside Python's asyncio world: a
confluent-kafka `Consumer` with `isolation.level=read_committed` and, unless told otherwise,
the library's default fetch settings. It runs in a thread of its own (the client blocks),
timestamps each `started` event when `poll` hands it over, and wakes the event loop after
every batch, so the bench waits on it as it waits on its aiokafka reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from worker.kafkaio import librdkafka_config
from worker.settings import Settings

_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """The benchmark could not measure something; the message says what went wrong."""


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` so far, every thread included (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        raise BenchError(f"cannot read the CPU time of process {pid}: {exc}") from exc
    # Fields after the command name, which is in parentheses and may hold spaces.
    fields = stat.rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _TICKS


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    rank = max(0, math.ceil(q / 100 * len(ordered)) - 1)
    return ordered[rank]


@dataclass(frozen=True)
class Percentiles:
    """p50, p95 and p99 of one set of latencies, in ms."""

    p50: float
    p95: float
    p99: float
    count: int

    @classmethod
    def between(cls, sent: Mapping[str, float], seen: Mapping[str, float]) -> Percentiles:
        """Latencies (ms) from `sent[id]` to `seen[id]` of every ID in `sent`; an ID missing
        from `seen` is left out (the caller checks `count`)."""
        latencies = sorted((seen[i] - at) * 1000 for i, at in sent.items() if i in seen)
        if not latencies:
            raise BenchError("no latencies: none of the requests was seen")
        return cls(
            percentile(latencies, 50),
            percentile(latencies, 95),
            percentile(latencies, 99),
            len(latencies),
        )

    def line(self) -> str:
        """`p50 … ms, p95 … ms, p99 … ms`."""
        return f"p50 {self.p50:.1f} ms, p95 {self.p95:.1f} ms, p99 {self.p99:.1f} ms"


class RdkafkaTail:
    """A librdkafka consumer of every partition of `topic` from its beginning, in a thread:
    counts of event types and when each request's `started` event was handed over.

    `overrides` are librdkafka properties set on top of the connection and
    `isolation.level=read_committed` (the bench's investigation varies fetch settings).
    """

    def __init__(
        self,
        settings: Settings,
        topic: str,
        partitions: int,
        overrides: Mapping[str, str | int | float | bool] | None = None,
        batch: int = 1,
    ) -> None:
        self.config: dict[str, str | int | float | bool] = {
            **librdkafka_config(settings),
            # Required by the client; no group is joined (partitions are assigned) and no
            # offset is committed.
            "group.id": f"bench-rdkafka-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            **(overrides or {}),
        }
        self.topic = topic
        self.partitions = partitions
        self.batch = batch  # 1: `poll` one message at a time; else `consume(batch, 0.1 s)`
        self.types: Counter[str] = Counter()
        self.started_seen: dict[str, float] = {}  # request ID -> when handed over
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        """Create the consumer and start reading in a thread of its own."""
        self._loop = asyncio.get_running_loop()
        consumer = await asyncio.to_thread(Consumer, self.config)
        consumer.assign(
            [TopicPartition(self.topic, n, OFFSET_BEGINNING) for n in range(self.partitions)]
        )
        self._thread = threading.Thread(
            target=self._run, args=(consumer,), name="bench-rdkafka", daemon=True
        )
        self._thread.start()

    def _run(self, consumer: Consumer) -> None:
        try:
            while not self._stopping.is_set():
                # `poll` returns as soon as a message is there, as a consumer's loop sees it;
                # `consume(n, timeout)` would wait for n messages or the whole timeout.
                if self.batch == 1:
                    message = consumer.poll(0.1)
                    messages = [] if message is None else [message]
                else:
                    messages = consumer.consume(num_messages=self.batch, timeout=0.1)
                now = time.perf_counter()
                for message in messages:
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            continue
                        raise BenchError(f"librdkafka consumer error: {error}")
                    self._handle(message.value(), now)
                if messages:
                    self._wake()
        except BaseException as exc:  # reported by `until`
            self.error = exc
            self._wake()
        finally:
            consumer.close()

    def _handle(self, value: bytes | None, now: float) -> None:
        if value is None:
            return
        event = json.loads(value)
        kind = event["type"]
        self.types[kind] += 1
        if kind == "started" and event.get("request_id") is not None:
            self.started_seen.setdefault(event["request_id"], now)

    def _wake(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self._loop.call_soon_threadsafe(self._changed.set)

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float) -> None:
        """Wait until `predicate()` holds, checked after every batch the consumer hands over."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    # Cleared before the check: the thread updates its counts before it
                    # schedules the wake-up, so no batch is missed between the two.
                    self._changed.clear()
                    if predicate():
                        break
                    self._check()
                    await self._changed.wait()
        except TimeoutError:
            raise BenchError(
                f"librdkafka consumer: timed out after {timeout:.0f} s waiting for {what} "
                f"on {self.topic} ({dict(self.types)})"
            ) from None
        self._check()

    def _check(self) -> None:
        if self.error is not None:
            raise BenchError(f"librdkafka consumer failed: {self.error!r}")
        if self._thread is not None and not self._thread.is_alive():
            raise BenchError("librdkafka consumer stopped")

    async def stop(self) -> None:
        """Stop reading and close the consumer."""
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)


def describe(overrides: Mapping[str, Any]) -> str:
    """A short label of librdkafka overrides, `defaults` for none."""
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
