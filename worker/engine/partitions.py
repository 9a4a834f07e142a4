"""The partition manager: which partitions this worker owns, taking and closing them.

The range assignor keeps partition N of requests and results on one member. On assignment
of N, in this order: open N in the record collector (exactly-once: start N's transactional
producer, which fences the previous owner and waits out its open transaction); read the
group's committed offsets for N and seek to them; load N's task through the state manager
(restoring from the changelog when SQLite differs). On revocation the batch in flight
finishes (commits or aborts) and N is closed.

Taking runs after the listener has returned, in a task per partition: aiokafka heartbeats
only once the listener is done, so a restore inside it (a partition with a long history)
would outlive the group session and get the worker dropped from the group while it is
still taking. N stays paused and unowned until its take is done. A partition revoked while
it is being taken keeps its take until the next assignment: assigned again (no one owned it
in between), the take goes on; not, its restore stops at the next chunk, the take installs
nothing and closes N, and a later take of N waits for it.

One failure rule: a partition this worker owns but cannot serve stops the worker, so that a
supervisor restarts it or the group gives the partition to another member. Taking is tried
a few times, with backoff, before that.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NodeNotReadyError,
)

from worker import compat
from worker.engine.codec import InputRecord
from worker.engine.collector import RecordCollector
from worker.engine.state import StateManager
from worker.engine.task import PartitionTask, Rules
from worker.settings import Settings

log = structlog.get_logger("worker")

TAKE_ATTEMPTS = 5
BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 10.0
# How much longer than the transaction timeout a take waits for stable offsets: the broker
# aborts timed-out transactions in a sweep every 10 s (by default).
STABLE_MARGIN_S = 15.0


@dataclass
class Owned:
    """A partition this worker owns: its task, the batch in flight and the records fetched
    meanwhile (`worker.engine.intake`)."""

    task: PartitionTask
    batch: asyncio.Task[None] | None = None
    fenced: bool = False  # another worker owns it now; nothing more is written for it
    queued: list[InputRecord] = field(default_factory=list)  # fetched, not yet in a batch
    resuming: asyncio.TimerHandle | None = None  # the next batch, after the batch interval


class PartitionManager:
    """Owns, takes, resets and closes partitions; the rebalance listener calls in here."""

    def __init__(
        self,
        settings: Settings,
        consumer: AIOKafkaConsumer,
        collector: RecordCollector,
        state: StateManager,
        rules: Callable[[], Rules],
        stop: Callable[[BaseException], None],
        stopping: asyncio.Event,
        ready: asyncio.Event,
    ) -> None:
        self._settings = settings
        self._consumer = consumer
        self._collector = collector
        self._state = state
        self._rules = rules
        self._stop = stop  # stops the worker with this error
        self._stopping = stopping
        self.owned: dict[int, Owned] = {}
        self.taking = 0  # partitions being taken (fenced, positioned, loaded) right now
        # The take of each assigned partition not yet owned; and takes of partitions revoked
        # meanwhile, which finish (a restore is not cut short) and install nothing.
        self._takes: dict[int, asyncio.Task[None]] = {}
        self._abandoned: dict[int, asyncio.Task[None]] = {}
        self.ready = ready  # set once every assigned partition is taken
        self._exact = settings.processing_guarantee == "exactly_once"
        self._by_generation = settings.worker_transactions

    def listener(self) -> ConsumerRebalanceListener:
        """The rebalance listener to subscribe with."""
        return _Rebalance(self)

    def topic_partitions(self, number: int) -> tuple[TopicPartition, TopicPartition]:
        """Partition `number` of requests and of results."""
        topics = self._settings.topics
        return TopicPartition(topics.requests, number), TopicPartition(topics.results, number)

    def pause(self, number: int) -> None:
        """Fetch nothing more for `number` until `resume`."""
        with contextlib.suppress(IllegalStateError):  # revoked meanwhile
            self._consumer.pause(*self.topic_partitions(number))

    def resume(self, number: int) -> None:
        """Fetch again for `number`, unless it is no longer ours or fenced."""
        owned = self.owned.get(number)
        if owned is not None and not owned.fenced:
            with contextlib.suppress(IllegalStateError):  # revoked meanwhile
                self._consumer.resume(*self.topic_partitions(number))

    async def lagging(self, number: int) -> frozenset[str]:
        """The inputs of `number` (`requests`, `results`) with records not yet fetched
        (those fetched and queued for a later batch are `Owned.queued`)."""
        behind = set()
        for role, tp in zip(("requests", "results"), self.topic_partitions(number), strict=True):
            stable = self._consumer.last_stable_offset(tp)
            if stable is None or await self._consumer.position(tp) < stable:
                behind.add(role)
        return frozenset(behind)

    async def lag(self, number: int) -> dict[str, int]:
        """Records of `number`'s inputs not yet consumed (as of the last fetch), by role."""
        lags: dict[str, int] = {}
        owned = self.owned.get(number)
        queued = Counter[str](r.role for r in owned.queued) if owned is not None else Counter()
        for role, tp in zip(("requests", "results"), self.topic_partitions(number), strict=True):
            with contextlib.suppress(IllegalStateError):  # revoked meanwhile
                stable = self._consumer.last_stable_offset(tp)
                if stable is not None:
                    fetched = await self._consumer.position(tp)
                    lags[role] = max(0, stable - fetched) + queued[role]
        return lags

    def reposition(self, owned: Owned) -> None:
        """Fetch `owned` again from its applied offsets (records fetched after them are
        read again)."""
        owned.task.hold.drop()
        owned.queued.clear()
        for tp in self.topic_partitions(owned.task.number):
            self._consumer.seek(tp, owned.task.applied.get(tp.topic, 0))

    async def assigned(self, assigned: Sequence[TopicPartition]) -> None:
        """Start taking every assigned partition (paused until taken) and return at once."""
        numbers = sorted({tp.partition for tp in assigned})
        for number in numbers:
            self.pause(number)
        for number, take in list(self._abandoned.items()):
            # Ours again: its take (a restore) goes on, unless fenced by the generation (its
            # offsets are of one that is over; ARCHITECTURE.md, "Worker-wide transactions").
            if number in numbers and not take.done() and not self._by_generation:
                self._takes[number] = self._abandoned.pop(number)
            else:
                self._state.abandon(number)  # its restore stops at its next chunk
        for number in numbers:
            if number not in self.owned and number not in self._takes:
                self._takes[number] = asyncio.create_task(self._take_later(number))
        if self._takes:
            self.ready.clear()  # not ready while a partition is being taken (restored)
            log.info("taking partitions", partitions=sorted(self._takes))
        else:
            self._assigned()

    def _assigned(self) -> None:
        log.info("partitions assigned", partitions=sorted(self.owned))
        self.ready.set()

    async def _take_later(self, number: int) -> None:
        """Take `number` outside the listener; the one failure rule if it cannot be."""
        this = asyncio.current_task()
        earlier = self._abandoned.get(number)
        if earlier is not None:  # revoked while it was being taken: it closes N first
            await asyncio.gather(earlier, return_exceptions=True)
        failed = False
        try:
            await self._take(number, this)
        except Exception as exc:
            if self._takes.get(number) is this and self._stopping.is_set():
                # Stopping closes the clients a take uses: what it could not finish, the
                # next owner takes. Not a partition left unserved.
                log.info("take cut short by stopping", partition=number, error=repr(exc))
            elif self._takes.get(number) is this:
                failed = True
                self._unserved([number], exc)
        finally:
            if self._takes.get(number) is this:
                del self._takes[number]
                if not self._takes and not failed and not self._stopping.is_set():
                    self._assigned()
            elif self._abandoned.get(number) is this:
                del self._abandoned[number]

    async def revoked(self, revoked: Sequence[TopicPartition]) -> None:
        """Close every revoked partition after its batch in flight; a partition still being
        taken is left to its take, which installs nothing."""
        numbers = sorted({tp.partition for tp in revoked})
        for number in numbers:
            if (take := self._takes.pop(number, None)) is not None:
                self._abandoned[number] = take  # until the next assignment says
            owned = self.owned.pop(number, None)
            if owned is not None:
                await self._close(owned)
        if numbers:  # aiokafka revokes nothing before the first assignment too
            log.info("partitions revoked", partitions=numbers)

    async def close_all(self) -> None:
        """Close every partition (shutdown), cancelling takes in progress: one waiting for
        an absent broker must not hold it (a restore's SQLite write still finishes)."""
        takes = [*self._takes.values(), *self._abandoned.values()]
        self._abandoned.update(self._takes)
        self._takes.clear()
        for take in takes:
            take.cancel()
        await asyncio.gather(*takes, return_exceptions=True)
        for number in list(self.owned):
            await self._close(self.owned.pop(number))

    def fence(self, owned: Owned, exc: BaseException) -> None:
        """Stop writing for `owned`, which another worker owns now, and ask the group to
        settle the assignment promptly."""
        owned.fenced = True
        self.pause(owned.task.number)
        log.error(
            "fenced: another worker owns this partition now; stopped writing to it",
            partition=owned.task.number,
            error=repr(exc),
        )
        compat.request_rejoin(self._consumer)

    async def reset(self, owned: Owned) -> None:
        """Take `owned`'s partition again from what Kafka committed, in place.

        `owned` stays in `self.owned` meanwhile: a revocation pops it and waits for the
        batch doing this reset, and a reset finding its partition revoked installs nothing.
        """
        number = owned.task.number
        if self.owned.get(number) is not owned:
            return
        await self._collector.close(number)
        for attempt in range(1, TAKE_ATTEMPTS + 1):
            try:
                task = await self._load(number)
            except (KafkaError, IllegalStateError) as exc:
                if self.owned.get(number) is not owned:
                    return  # revoked meanwhile: nothing left to serve
                if attempt == TAKE_ATTEMPTS:
                    self._unserved([number], exc)
                    return
                log.warning(
                    "could not take the partition again; retrying",
                    partition=number,
                    attempt=attempt,
                    error=repr(exc),
                )
                await self.back_off(BACKOFF_FIRST_S * 2**attempt)
                continue
            if self.owned.get(number) is not owned:
                await self._collector.close(number)  # revoked while it was being loaded
                return
            owned.task = task
            owned.queued.clear()  # fetched before `_load` sought the committed offsets
            return

    async def back_off(self, seconds: float) -> None:
        """Wait `seconds` (at most `BACKOFF_MAX_S`), or less when the worker is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), min(seconds, BACKOFF_MAX_S))

    def _unserved(self, numbers: list[int], exc: BaseException) -> None:
        """The one failure rule: owned but not served stops the worker."""
        log.error("could not take partitions; stopping", partitions=numbers, error=repr(exc))
        self._stop(exc)

    async def _take(self, number: int, this: asyncio.Task[None] | None) -> None:
        """Own partition `number`, unless it is revoked meanwhile; an unreachable broker (a
        restart) is tried again with backoff before the one failure rule applies."""
        for attempt in range(1, TAKE_ATTEMPTS + 1):
            if self._takes.get(number) is not this:
                return  # revoked meanwhile: nothing to serve (and no one to fence)
            try:
                task = await self._load(number)
                break
            except (KafkaConnectionError, NodeNotReadyError, KafkaTimeoutError) as exc:
                if self._takes.get(number) is not this:
                    return
                if attempt == TAKE_ATTEMPTS or self._stopping.is_set():
                    raise
                log.warning(
                    "could not reach the broker to take the partition; retrying",
                    partition=number,
                    attempt=attempt,
                    error=repr(exc),
                )
                await self.back_off(BACKOFF_FIRST_S * 2**attempt)
        if self._takes.get(number) is not this:
            await self._collector.close(number)  # revoked while it was being taken
            return
        owned = self.owned[number] = Owned(task)
        self.reposition(owned)  # what was fetched before N was paused is read again
        self._consumer.resume(*self.topic_partitions(number))

    async def _load(self, number: int) -> PartitionTask:
        """Fence, position and load partition `number`, which stays paused."""
        # aiokafka may hand out N's records while this listener still runs; paused, N yields
        # none until it is positioned and loaded (records handed out earlier are dropped by
        # the dispatch, harmlessly, since N is re-positioned below).
        self.pause(number)
        self.taking += 1
        try:
            await self._collector.open(number)  # fences the previous owner
            try:
                committed = await self._position(number)
                return await self._state.load(number, committed, self._rules(), exact=self._exact)
            except BaseException:
                await self._collector.close(number)
                raise
        finally:
            self.taking -= 1

    async def _position(self, number: int) -> dict[str, int]:
        # Always position N here, after the fencing: aiokafka fetched committed offsets while
        # joining, maybe including those of a transaction the fencing has just aborted.
        # Fenced by the generation (KIP-447): read once no transaction holds N's offsets.
        tps = self.topic_partitions(number)
        stable: dict[TopicPartition, int | None] = {}
        if self._by_generation:
            within = self._settings.transaction_timeout_ms / 1000 + STABLE_MARGIN_S
            stable = await compat.stable_committed(
                self._consumer, self._settings.group_id, list(tps), within
            )
            await self._state.settled(number, within)  # the changelog as far as they vouch
        committed: dict[str, int] = {}
        for tp in tps:
            offset = stable[tp] if stable else await self._consumer.committed(tp)
            if offset is not None:
                committed[tp.topic] = offset
            # Offset 0 when nothing is committed: if retention deleted it, the consumer's
            # out-of-range reset ("earliest") moves to the log start. (`seek_to_beginning`
            # inside the rebalance listener stalls aiokafka's fetcher.)
            self._consumer.seek(tp, offset or 0)
        return committed

    async def _close(self, owned: Owned) -> None:
        if owned.resuming is not None:
            owned.resuming.cancel()
            owned.resuming = None
        if owned.batch is not None and owned.batch is not asyncio.current_task():
            # The batch in flight commits or aborts before the partition moves.
            await asyncio.gather(owned.batch, return_exceptions=True)
        await self._collector.close(owned.task.number)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, manager: PartitionManager) -> None:
        self._manager = manager

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # aiokafka swallows exceptions raised in listeners; log them ourselves.
        try:
            await self._manager.revoked(revoked)
        except Exception:
            log.exception("partition revocation failed")
            raise

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        try:
            await self._manager.assigned(assigned)
        except Exception:
            log.exception("partition assignment failed")
            raise
