"""Replay from the decision log (`<prefix>.status`).

`replay` rebuilds a SQLite store's run history from status events, from an offset or a
timestamp, into the rows the worker records live (`store.fold_events` builds them with the
core's `new_row` and `run_change`). Partitions are replayed in parallel processes
(`python -m worker.audit.replay`). `verify` (in `worker.audit.verify`) re-decides them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import SecretStr

from schemas import StatusEvent, read_status_event
from worker import gctuning
from worker.engine.sqlfile import (
    StoreError,
    hold_lock,
    lock_exists,
    open_lock_file,
    release_lock,
)
from worker.engine.store import RunWrites, Store, fold_events
from worker.kafkaio import connection, partitions_of, read_until, start_client
from worker.settings import Settings

Progress = Callable[[int, int], None]  # (records done, records in all)


def parse_events(values: Sequence[bytes | None]) -> list[StatusEvent]:
    """The status events among `values`; records that are not status events are skipped."""
    events = []
    for value in values:
        if not value:
            continue
        try:
            events.append(read_status_event(value))
        except ValueError:
            continue  # not ours; `verify` reports foreign records
    return events


def consumer_for(settings: Settings) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        **connection(settings),
    )


async def read_ranges(
    consumer: AIOKafkaConsumer, ranges: Mapping[int, tuple[int, int]], topic: str
) -> AsyncIterator[tuple[TopicPartition, list[Any]]]:
    """Batches of committed records of `topic`'s partitions in `ranges`: partition ->
    (first position, end position), positions, not records."""
    ends = {TopicPartition(topic, p): end for p, (start, end) in ranges.items() if start < end}
    if not ends:
        return
    consumer.assign(list(ends))
    try:
        for tp in ends:
            consumer.seek(tp, ranges[tp.partition][0])
        async for tp, records in read_until(consumer, ends, max_records=20_000):
            yield tp, records
    finally:
        # Nothing left assigned: an assigned partition keeps a fetch waiting at the broker,
        # and the broker answers a connection in order, so the next offsets request (the
        # next topic's ranges) waited that fetch out: half a second a topic.
        consumer.assign([])


async def whole_topic(consumer: AIOKafkaConsumer, topic: str) -> dict[int, tuple[int, int]]:
    """Every partition of `topic` -> (log start, end) positions, for `_read`."""
    tps = await partitions_of(consumer, topic)
    starts = await consumer.beginning_offsets(tps)
    ends = await consumer.end_offsets(tps)
    return {tp.partition: (starts[tp], ends[tp]) for tp in tps}


@dataclass
class ReplayReport:
    """What `replay` did."""

    events: int
    runs: int
    seconds: float
    processes: int = 1

    @property
    def rate(self) -> float:
        """Status events applied per second."""
        return self.events / self.seconds if self.seconds else 0.0


class ReplayError(RuntimeError):
    """A replay process failed; the message says which partitions and why."""


async def replay(
    settings: Settings,
    db_path: Path,
    *,
    from_offset: int | None = None,
    from_timestamp: datetime | None = None,
    progress: Progress | None = None,
    processes: int | None = None,
) -> ReplayReport:
    """Apply `<prefix>.status` from an offset (each partition) or a time to `db_path`.

    Partitions are independent (a run's events all sit in its job type's partition), so they
    are replayed by up to `processes` processes (default: one per CPU), each writing its own
    partitions' rows into the file: one process parses, folds and writes about 40,000
    events a second, all of it under one GIL.
    """
    started = time.perf_counter()
    # The lock a worker or console holds on its file while it runs: replay writes runs a
    # running one does not expect, so a file in use is refused; while replay runs, a worker
    # or console is refused the file instead. Its processes share it (`_in_processes`).
    made = not lock_exists(db_path)
    held = hold_lock(
        db_path, advice="stop the worker or console that uses it, or give replay another --db"
    )
    try:
        # Opened first: a file it cannot use is refused before any record is read. The
        # schema exists before processes share the file.
        store = await Store.open(db_path)
    except BaseException:
        release_lock(db_path, held, remove=made)
        raise
    try:
        ranges = await _ranges(settings, from_offset, from_timestamp)
        groups = _groups_of(ranges, processes or os.cpu_count() or 1)
        total = sum(max(0, end - start) for start, end in ranges.values())
        done = 0

        def advance(records: int, events: int) -> None:
            nonlocal done
            done += records
            if progress is not None:
                progress(done, total)

        if len(groups) <= 1:
            applied = await _apply_ranges(settings, db_path, ranges, advance)
        else:
            applied = await _in_processes(settings, db_path, groups, advance)
        if progress is not None:
            # The ranges count offsets, transaction markers among them (no record is read
            # for those): the bar ends at its total once every range has been read.
            progress(total, total)
        runs = await store.count_runs()
    finally:
        try:
            await store.close()
        finally:
            release_lock(db_path, held, remove=made)
    return ReplayReport(applied, runs, time.perf_counter() - started, max(1, len(groups)))


async def _ranges(
    settings: Settings, from_offset: int | None, from_timestamp: datetime | None
) -> dict[int, tuple[int, int]]:
    """Status partition -> (first position, end position) to replay."""
    consumer = consumer_for(settings)
    await start_client(consumer)
    try:
        whole = await whole_topic(consumer, settings.topics.status)
        if from_timestamp is None:
            return {p: (max(from_offset or 0, start), end) for p, (start, end) in whole.items()}
        topic = settings.topics.status
        # No record is stamped before 1970: every one is at or after such a time.
        stamp = max(0, int(from_timestamp.timestamp() * 1000))
        found = await consumer.offsets_for_times({TopicPartition(topic, p): stamp for p in whole})
        firsts = {tp.partition: at.offset for tp, at in found.items() if at is not None}
        return {p: (firsts.get(p, end), end) for p, (_, end) in whole.items()}
    finally:
        await consumer.stop()


def _groups_of(
    ranges: Mapping[int, tuple[int, int]], processes: int
) -> list[dict[int, tuple[int, int]]]:
    """Partitions with records to replay, dealt into at most `processes` groups of about
    equal size (largest first, each to the group with the least so far)."""
    busy = sorted(
        (p for p, (start, end) in ranges.items() if end > start),
        key=lambda p: ranges[p][0] - ranges[p][1],
    )
    groups: list[dict[int, tuple[int, int]]] = [{} for _ in range(min(processes, len(busy)))]
    sizes = [0] * len(groups)
    for partition in busy:
        smallest = sizes.index(min(sizes))
        groups[smallest][partition] = ranges[partition]
        sizes[smallest] += ranges[partition][1] - ranges[partition][0]
    return groups


async def _apply_ranges(
    settings: Settings,
    db_path: Path,
    ranges: Mapping[int, tuple[int, int]],
    advance: Callable[[int, int], None],
    lock_path: Path | None = None,
) -> int:
    """Replay `ranges` of the status topic into `db_path` in this process; the events applied.

    SQLite writes one batch in its thread while the next is read and folded. Processes that
    share the file take `lock_path` around each write: SQLite's own wait for a lock polls
    with growing sleeps, and two processes writing in turn lost a second and more to it.
    """
    applied = 0
    consumer = consumer_for(settings)
    await start_client(consumer)
    store = await Store.open(db_path)
    lock = None if lock_path is None else lock_path.open("rb")

    async def write(writes: RunWrites) -> None:
        if lock is None:
            return await store.write_runs(writes)
        await asyncio.to_thread(fcntl.flock, lock.fileno(), fcntl.LOCK_EX)
        try:
            await store.write_runs(writes)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    writing: asyncio.Task[None] | None = None
    try:
        with gctuning.tuned():
            async for tp, records in read_ranges(consumer, ranges, settings.topics.status):
                events = parse_events([r.value for r in records])
                writes = fold_events(tp.partition, events)
                if writing is not None:
                    await writing
                writing = asyncio.create_task(write(writes))
                await asyncio.sleep(0)  # hands the write to SQLite's thread before reading on
                applied += len(events)
                advance(len(records), len(events))
            if writing is not None:
                await writing
    finally:
        if writing is not None and not writing.done():
            writing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writing
        if lock is not None:
            lock.close()
        await store.close()
        await consumer.stop()
    return applied


async def _in_processes(
    settings: Settings,
    db_path: Path,
    groups: list[dict[int, tuple[int, int]]],
    advance: Callable[[int, int], None],
) -> int:
    """Replay each group of partitions in a process of its own (`python -m worker.audit.replay`),
    which reports each batch as a JSON line; the events applied in all."""
    children = []
    lock_path = db_path.with_name(f".{db_path.name}.replay-lock")
    try:
        os.close(open_lock_file(lock_path))  # not through a link planted in its place
    except OSError as exc:
        raise StoreError(f"cannot use the lock file {lock_path}: {exc.strerror}") from None
    try:
        for ranges in groups:
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "worker.audit.replay",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            children.append(child)
            assert child.stdin is not None
            child.stdin.write(_job(settings, db_path, lock_path, ranges))
            child.stdin.close()
        follows = [
            asyncio.create_task(_follow(child, sorted(ranges), advance))
            for child, ranges in zip(children, groups, strict=True)
        ]
        try:
            await asyncio.wait(follows, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for follow in follows:
                follow.cancel()
            await asyncio.gather(*follows, return_exceptions=True)
        for follow in follows:
            if not follow.cancelled() and (failure := follow.exception()) is not None:
                raise failure
        return sum(follow.result() for follow in follows)
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()
        lock_path.unlink(missing_ok=True)


def _job(
    settings: Settings, db_path: Path, lock_path: Path, ranges: Mapping[int, tuple[int, int]]
) -> bytes:
    """The JSON job of a replay process, for its stdin (never its argv, which `ps` shows).

    `model_dump` writes a secret as `**********`, and a process with that password would not
    get in: the secret fields go with their values, only in this job."""
    values = settings.model_dump(mode="json")
    values.update(
        (name, value.get_secret_value()) for name, value in settings if isinstance(value, SecretStr)
    )
    job = {
        "settings": values,
        "db": str(db_path),
        "lock": str(lock_path),
        "ranges": {str(p): list(r) for p, r in ranges.items()},
    }
    return json.dumps(job).encode()


def _settings_of(job: Mapping[str, Any]) -> Settings:
    """The settings of a `_job`, as the process that wrote it had them."""
    return Settings.model_validate(job["settings"])


async def _follow(
    child: asyncio.subprocess.Process,
    partitions: list[int],
    advance: Callable[[int, int], None],
) -> int:
    """Pass a replay process's progress on; its events applied, or `ReplayError`."""
    assert child.stdout is not None
    assert child.stderr is not None
    errors = asyncio.create_task(child.stderr.read())
    applied = 0
    async for line in child.stdout:
        batch = json.loads(line)
        applied += batch["events"]
        advance(batch["records"], batch["events"])
    code = await child.wait()
    problem = (await errors).decode(errors="replace").strip()
    if code != 0:
        last = problem.splitlines()[-1] if problem else f"exit status {code}"
        raise ReplayError(f"replaying status partitions {partitions} failed: {last}")
    return applied


def _child() -> None:
    """`python -m worker.audit.replay`: replay the ranges of a JSON job read from stdin, printing
    `{"records": n, "events": n}` per batch; on failure, one line on stderr and exit 1."""
    job = json.load(sys.stdin)
    settings = _settings_of(job)
    ranges = {int(p): (start, end) for p, (start, end) in job["ranges"].items()}

    def report(records: int, events: int) -> None:
        print(json.dumps({"records": records, "events": events}), flush=True)

    try:
        asyncio.run(
            _apply_ranges(settings, Path(job["db"]), ranges, report, lock_path=Path(job["lock"]))
        )
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _child()
