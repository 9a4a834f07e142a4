"""The state manager: a partition's state loaded, restored from the changelog, written behind.

SQLite (`worker.engine.store`) holds what this worker committed; `<prefix>.state` (the
changelog, `worker.engine.changelog`) holds what any worker committed. On taking a
partition, SQLite is brought level with the group's committed offsets, restoring from the
changelog when its applied offsets differ, and only the work in flight is loaded into a
`PartitionTask`. After each committed batch the task's runs, job states and offsets are
queued for SQLite; one writer merges what accumulated into one SQLite transaction, so the
file always holds a prefix of what Kafka committed (a crash before a write is the restore
case).

SQLite also records the changelog position each batch left (the end offset of the
partition's changelog after its commit). Whatever changed a partition's state is in its
changelog, input records and time alike: a tick that timed runs out commits job states
and events but no input offsets. So a partition is restored when its changelog has moved
past the position SQLite recorded (another owner wrote it meanwhile, or this worker
stopped between a commit and its SQLite write), and when its input offsets differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from datetime import timedelta
from functools import partial
from pathlib import Path

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaTimeoutError

from worker.core.lifecycle import JobState
from worker.engine import changelog
from worker.engine.observe import Metrics
from worker.engine.store import Abandoned, DamagedState, Store
from worker.engine.task import BatchOutcome, PartitionTask, Retained, Rules, known_filter
from worker.engine.topics import PartitionCountChanged
from worker.kafkaio import connection, start_client
from worker.settings import Settings

log = structlog.get_logger("worker")

# How often `settled` reads the changelog partition's last stable offset again.
SETTLE_RETRY_S = 0.02
# The longest a fetch of the changelog reader waits at the broker for records.
RESTORE_FETCH_WAIT_MS = 10


def queue_outcome(
    store: Store, number: int, outcome: BatchOutcome, offsets: Mapping[str, int]
) -> None:
    """Queue partition `number`'s committed `outcome` on `store`'s write-behind, with the
    `offsets` it applied (its inputs', and the changelog position it left)."""
    store.writes.record_batch(
        number,
        outcome.runs.values(),
        outcome.changed.items(),
        offsets,
        outcome.tombstones,
        outcome.entries,
        outcome.heads,
    )


class StateManager:
    """SQLite and the changelog behind the partitions a worker owns."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._store: Store | None = None
        self._restorer: AIOKafkaConsumer | None = None
        # read_uncommitted: the changelog's high watermarks (`settled`, worker-wide
        # transactions only).
        self._watermarks: AIOKafkaConsumer | None = None
        self._restoring = asyncio.Lock()  # one partition restored at a time
        self._abandoned: set[int] = set()  # partitions whose restore no one wants now
        # Partitions whose next load restores them whatever their offsets (`restore_next`).
        self._damaged: set[int] = set()
        self._decided_with: int | None = None  # the file's partition count, once read

    @property
    def store(self) -> Store:
        """The open SQLite store."""
        assert self._store is not None, "the state manager is not started"
        return self._store

    @property
    def failure(self) -> BaseException | None:
        """Why writing SQLite failed, if it did (the worker must stop)."""
        return None if self._store is None else self._store.failure

    def check(self) -> None:
        """Raise why writing SQLite failed, if it did: a batch must not be committed to Kafka
        once the file cannot follow (it would no longer hold a prefix of what was)."""
        if (failure := self.failure) is not None:
            raise failure

    async def start(self, db_path: Path) -> None:
        """Open the SQLite file (locked for this worker; a damaged one is moved aside and
        started empty, so every partition is restored) and the changelog reader.

        Raises `StoreError` when the file cannot be used: another worker holds it, or it is
        from a newer schema version.
        """
        store = await Store.open(db_path, exclusive=True)
        restorer = AIOKafkaConsumer(
            **connection(self._settings),
            enable_auto_commit=False,
            isolation_level="read_committed",
            # It reads up to end offsets it knows: a fetch has no reason to wait for more,
            # and one still in flight after a read delays its next request that long.
            fetch_max_wait_ms=RESTORE_FETCH_WAIT_MS,
        )
        watermarks = None
        try:
            await start_client(restorer)
            if self._settings.worker_transactions:
                watermarks = AIOKafkaConsumer(**connection(self._settings))
                try:
                    await start_client(watermarks)
                except BaseException:
                    # Stopped just after its start, aiokafka's consumer can raise the
                    # cancellation of a task of its own that had not run yet.
                    with contextlib.suppress(Exception, asyncio.CancelledError):
                        await restorer.stop()
                    raise
        except BaseException:
            # Closed, or SQLite's thread would keep the process from exiting after the error
            # (a broker down as the worker starts): releases the file's lock too.
            await store.close()
            raise
        self._store, self._restorer, self._watermarks = store, restorer, watermarks

    async def stop(self) -> None:
        """Write what is queued and close; raise the error of a failed write."""
        try:
            if self._restorer is not None:
                await self._restorer.stop()
            if self._watermarks is not None:
                await self._watermarks.stop()
        finally:
            if self._store is not None:
                await self._store.close()

    async def load(
        self, number: int, committed: dict[str, int], rules: Rules, *, exact: bool
    ) -> PartitionTask:
        """Partition `number`'s task, level with the group's `committed` offsets.

        With `exact` (exactly-once), any difference from SQLite's applied offsets restores
        the partition from the changelog; otherwise only SQLite being behind does.
        """
        store = self.store
        await store.flush()  # SQLite holds every batch this process committed
        if self._decided_with is None:
            self._decided_with = await store.partitions_decided_with(rules.partitions)
        if self._decided_with != rules.partitions:
            raise PartitionCountChanged(
                f"the SQLite file {self._settings.db_path}", self._decided_with, rules.partitions
            )
        applied = await store.applied_offsets(number)
        position = applied.pop(self._settings.topics.state, 0)
        end = await self._changelog_end(number)
        behind = any(applied.get(t, 0) < o for t, o in committed.items())
        moved = end > position  # someone wrote the changelog after this file's last batch
        restored = behind or moved or (exact and applied != committed)
        if number in self._damaged:
            self._damaged.discard(number)
            restored = True
        if restored:
            await self._restore(number, committed, rules.partitions)
            applied = committed
        try:
            busy = await store.busy_states(number)
        except DamagedState as damage:
            if restored:  # the rows just restored from the changelog: not this file's damage
                raise
            # Damage of the file, confined to this partition's rows: what moving the file
            # aside would do for them, without stopping the partitions it serves.
            log.warning(
                "a job state in the SQLite file is damaged: restoring its partition from "
                "the changelog",
                path=damage.path,
                job_type=damage.job_type,
                partition=number,
                error=damage.error,
            )
            await self._restore(number, committed, rules.partitions)
            applied = committed
            busy = await store.busy_states(number)
        # Only what has work in flight is loaded: a long history stays in SQLite.
        known = known_filter()
        async for names in store.job_types(number):
            known.update(names)
        retained = Retained()
        async for ends in store.retained_ends(number):
            for ended_at, run_id in ends:
                retained.add(ended_at, run_id)
        task = PartitionTask(
            number,
            rules,
            jobs=busy,
            runs=await store.active_runs(number),
            retained=retained,
            applied=applied,
            known=known,
        )
        task.idle.budget = self._settings.idle_state_entries
        if self._settings.view_refresh_s:
            task.view.refresh = timedelta(seconds=self._settings.view_refresh_s)
        log.debug("partition loaded", partition=number, committed=committed, restored=restored)
        return task

    async def settled(self, number: int, within: float) -> None:
        """Wait until every transaction written to `number`'s changelog partition so far is
        committed or aborted there: its last stable offset reaches the high watermark read
        first. With worker-wide transactions the committed offsets can be stable before the
        changelog's commit marker is written (the coordinator writes the markers of a
        transaction one partition at a time, after its commit returned), and a restore that
        stopped short of it would lose the decisions those offsets vouch for. (A
        partition's own producer cannot start before its last transaction is complete.)
        `KafkaTimeoutError` after `within` seconds."""
        assert self._restorer is not None
        assert self._watermarks is not None
        tp = TopicPartition(self._settings.topics.state, number)
        high = (await self._watermarks.end_offsets([tp]))[tp]
        deadline = time.monotonic() + within
        while (await self._restorer.end_offsets([tp]))[tp] < high:
            if time.monotonic() >= deadline:
                raise KafkaTimeoutError(
                    f"partition {number} of {tp.topic} kept a transaction open for {within:g} s"
                )
            await asyncio.sleep(SETTLE_RETRY_S)

    def abandon(self, number: int) -> None:
        """Stop the restore of `number` in progress, if any, at its next chunk: the load
        raises `Abandoned` and SQLite keeps what it had (the write is rolled back)."""
        self._abandoned.add(number)

    def _wanted(self, number: int) -> None:
        if number in self._abandoned:
            raise Abandoned(f"the restore of partition {number} was abandoned")

    async def _changelog_end(self, number: int) -> int:
        """The end offset of `number`'s changelog partition (read_committed: stable)."""
        assert self._restorer is not None
        tp = TopicPartition(self._settings.topics.state, number)
        return int((await self._restorer.end_offsets([tp]))[tp])

    async def _restore(self, number: int, committed: dict[str, int], partitions: int) -> None:
        assert self._restorer is not None
        started = time.perf_counter()
        # One partition at a time, read and written: one restore consumer, re-assigned per
        # partition, and one snapshot in memory.
        async with self._restoring:
            topic = self._settings.topics.state
            self._abandoned.discard(number)
            wanted = partial(self._wanted, number)
            try:
                snapshot = await changelog.read_partition(
                    self._restorer, topic, number, wanted=wanted
                )
                if snapshot.partitions not in (None, partitions):
                    raise PartitionCountChanged(
                        f"partition {number} of {topic}", snapshot.partitions, partitions
                    )
                # Shielded: a take cancelled at shutdown leaves the write to finish (or roll
                # back), never a transaction open on the store's connection.
                stale = await asyncio.shield(
                    self.store.replace_partition(
                        number,
                        snapshot.for_sqlite(),
                        changelog.load_runs(snapshot),
                        {**committed, topic: snapshot.end},
                        wanted=wanted,
                    )
                )
            except Abandoned:
                log.info("restore abandoned: the partition was revoked", partition=number)
                raise
        self._metrics.restore_seconds.observe(time.perf_counter() - started)
        log.info(
            "partition restored from changelog",
            partition=number,
            job_types=snapshot.job_types,
            runs=len(snapshot.runs),
            records=snapshot.records,
            seconds=round(time.perf_counter() - started, 3),
        )
        if snapshot.foreign:
            log.warning(
                "the changelog holds records no worker writes; skipped (who else may write "
                "it? `jobctl acls` gives that right to the orchestrator alone)",
                partition=number,
                records=snapshot.foreign,
            )
        if stale:
            log.info(
                "runs this file showed running ended under another owner; their rows are "
                "dropped (the status topic has how they ended: jobctl replay)",
                partition=number,
                runs=stale,
            )

    def restore_next(self, number: int) -> None:
        """Restore partition `number` from the changelog at its next load: its rows in the
        file are damaged (`UnreadableState`)."""
        self._damaged.add(number)

    async def states(self, job_types: list[str]) -> dict[str, JobState | bytes]:
        """The stored states of `job_types` (from the write queue or SQLite)."""
        if not job_types:
            return {}
        return await self.store.load_states(job_types)

    async def record(self, number: int, outcome: BatchOutcome, position: int | None) -> None:
        """Queue a committed batch, and the changelog `position` it left, for SQLite; wait
        when SQLite has fallen behind, so the lag (and the memory it takes) stays within
        about a batch."""
        store = self.store
        offsets = dict(outcome.next_offsets)
        if position is not None:
            offsets[self._settings.topics.state] = position
        queue_outcome(store, number, outcome, offsets)
        self._metrics.sqlite_backlog.set(store.writes.backlog)
        if store.writes.backlog > self._settings.batch_max_records:
            await store.flush()
