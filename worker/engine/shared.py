"""One transactional producer for all of a worker's partitions (`JOBS_TRANSACTIONS=worker`).

Partitions hand their outcomes to `commit`; one transaction at a time carries every outcome
handed in while the one before was in flight, with each partition's input offsets, and
waits for the batches that have begun to hand theirs in (`begin`): the partitions fetched
together commit together. So under
a steady load the worker commits one transaction for all its partitions where a producer per
partition commits one each, and the client work a transaction costs is paid once.

Fencing is by the group's generation (KIP-447), not by a transactional ID per partition:

- every transaction's offsets carry the consumer's generation and member ID
  (`compat.fence_by_group`), and the group refuses them from a member it has moved past
  (`MemberFenced`: the transaction aborts, the partitions are fenced and the worker rejoins);
  a tick's batch, which consumed nothing, commits its partition's applied offsets again, so
  no transaction escapes the check;
- a new owner reads the committed offsets with `require_stable`
  (`compat.stable_committed`), which waits while a transaction holding offsets of the
  partition is open: the previous owner's last batch is committed or aborted before anything
  is read.

The transactional ID is `<group>.worker.<ID>`, the ID kept in the worker's SQLite file: a
worker restarted on its file aborts its own transaction left open at once. Two workers on
copies of one file share it and fence each other by turns; the broker fencing five of a
worker's transactions within a minute, each within the group session (`_fenced`), stops it.
A worker that takes a partition aborts any other of the group's transactions still holding
records on it (`open`): every live member ended its transactions on the partitions it gave up
before the assignment, so what is left belongs to a worker that crashed, froze or was cut
off. Only a transaction holding just the partition's offsets (a tick's, with no records) is
waited out until the broker times it out (`JOBS_TRANSACTION_TIMEOUT_MS`), as is everything
on a Kafka older than 3.0, which cannot list its transactions.

A failed transaction fails every outcome in it (each partition retries from what Kafka
committed, as with a producer of its own), and the producer is started again before the next
transaction, which aborts at the broker whatever the failed one left open.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import InvalidProducerEpoch, KafkaError, ProducerFenced

from worker import compat
from worker.engine.collector import FencedError, Outbox
from worker.engine.hooks import Hooks
from worker.engine.observe import Metrics
from worker.engine.records import write_outcome
from worker.engine.sqlfile import StoreError
from worker.engine.task import BatchOutcome
from worker.kafkaio import connection
from worker.settings import Settings

log = structlog.get_logger("worker")

# A worker whose transactions the broker fences this often within `TWIN_WINDOW_S`, each
# time with a new producer, shares its transactional ID with another process (a copy of
# its SQLite file): it stops. Not "in a row": two such workers take turns, each fencing the
# other when it starts its producer again, so successes come between the fences.
PRODUCER_FENCED_TWIN = 5
TWIN_WINDOW_S = 60.0


@dataclass
class _Handed:
    """An outcome waiting for the next transaction, and who waits for it."""

    number: int
    outcome: BatchOutcome
    offsets: dict[TopicPartition, int]
    done: asyncio.Future[int | None]
    waited: bool = True  # its batch awaits `done` (not cancelled meanwhile)


def _retrieved(future: asyncio.Future[int | None]) -> None:
    future.exception()


class SharedExactlyOnce:
    """Every partition's outcomes through one transactional producer, fenced by the group."""

    def __init__(
        self,
        settings: Settings,
        hooks: Hooks,
        consumer: AIOKafkaConsumer,
        identity: Callable[[], Awaitable[str]],
        stop: Callable[[BaseException], None],
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._hooks = hooks
        self._consumer = consumer
        self._identity = identity
        self._stop = stop  # stops the worker with this error
        self._transactional_id = ""
        self._producer: AIOKafkaProducer | None = None
        self._handed: list[_Handed] = []
        self._cycle: asyncio.Task[None] | None = None
        # Partitions whose batch has begun and not handed an outcome in yet: the next
        # transaction waits for them (each decides in a few milliseconds at most, and is
        # paused once it has handed in), so the partitions fetched together commit together.
        self._deciding: set[int] = set()
        self._quiet = asyncio.Event()
        self._quiet.set()
        # When the broker fenced a transaction no partition move explains, within the window.
        self._unexplained: collections.deque[float] = collections.deque()
        self._began = 0.0  # when the transaction in flight began (time.monotonic)
        self._twin = False  # another process uses this worker's transactional ID
        self._aborting = asyncio.Lock()

    async def start(self) -> None:
        """Start the worker's producer (aborting what its last run left open)."""
        self._transactional_id = f"{self._settings.group_id}.worker.{await self._identity()}"
        await self._restart()

    async def _restart(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await _stopped(producer)
        s = self._settings
        producer = AIOKafkaProducer(
            **connection(s),
            transactional_id=self._transactional_id,
            linger_ms=s.linger_ms,
            max_batch_size=s.producer_batch_bytes,
            transaction_timeout_ms=s.transaction_timeout_ms,
        )
        try:
            await producer.start()
        except BaseException:
            with contextlib.suppress(KafkaError):
                await producer.stop()  # its connections and tasks, from a start half done
            raise
        compat.fence_by_group(producer, self._consumer)
        self._producer = producer

    async def open(self, number: int) -> None:
        """Abort the transactions a previous owner of `number` left open, if it is gone.

        Every member of the group has ended its transactions on its partitions before it
        asks for the new assignment, so a transaction of another of this group's producers
        that still holds records on `number` belongs to a process that is dead, frozen or
        cut off. Starting a producer with its transactional ID aborts it at once (and fences
        the process, should it come back), where the take's stable offsets would wait until
        the broker timed it out. A transaction holding only the partition's offsets (a tick's,
        with no records) cannot be told apart from a live member's and is still waited out.
        """
        topics = self._settings.topics
        held = {TopicPartition(t, number) for t in (topics.status, topics.state, topics.dlq)}
        async with self._aborting:  # partitions taken together: one lookup, one abort each
            try:
                # Bounded: past the transaction time-out the broker has aborted it anyway.
                async with asyncio.timeout(self._settings.transaction_timeout_ms / 1000):
                    left = await compat.open_transactions(
                        self._consumer, f"{self._settings.group_id}."
                    )
                    for transactional_id, partitions in sorted(left.items()):
                        if transactional_id != self._transactional_id and partitions & held:
                            await self._abort_left_open(transactional_id, number)
            except (KafkaError, NotImplementedError, TimeoutError) as exc:
                # An older Kafka (before 3.0) or a broker away: the take waits for the
                # broker's time-out, as it did before it could abort.
                log.warning(
                    "could not abort the transactions left open on the partition; waiting "
                    "for the broker to time them out",
                    partition=number,
                    error=repr(exc),
                )

    async def _abort_left_open(self, transactional_id: str, number: int) -> None:
        began = time.perf_counter()
        producer = AIOKafkaProducer(
            **connection(self._settings),
            transactional_id=transactional_id,
            transaction_timeout_ms=self._settings.transaction_timeout_ms,
        )
        try:
            await producer.start()  # InitProducerId: the coordinator aborts what it held
        finally:
            with contextlib.suppress(KafkaError):
                await producer.stop()
        log.info(
            "aborted a transaction its previous owner left open",
            partition=number,
            transactional_id=transactional_id,
            ms=round((time.perf_counter() - began) * 1000, 1),
        )

    def begin(self, number: int) -> None:
        """A batch of `number` has begun: the next transaction waits for its outcome."""
        self._deciding.add(number)
        self._quiet.clear()

    def end(self, number: int) -> None:
        """The batch of `number` is over (handed in, failed, or had nothing to publish)."""
        self._deciding.discard(number)
        if not self._deciding:
            self._quiet.set()

    async def commit(
        self, number: int, outcome: BatchOutcome, applied: Mapping[str, int]
    ) -> int | None:
        """Publish `outcome` and its offsets in the next transaction; raise if it did not
        commit. A batch that consumed nothing commits `applied` again."""
        offsets = outcome.next_offsets or {t: applied.get(t, 0) for t in self._inputs()}
        done: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        where = {TopicPartition(topic, number): offset for topic, offset in offsets.items()}
        handed = _Handed(number, outcome, where, done)
        self._handed.append(handed)
        self.end(number)
        if self._cycle is None or self._cycle.done():
            self._cycle = asyncio.create_task(self._transactions())
        try:
            return await asyncio.shield(done)  # a cancelled batch's outcome is still decided
        except asyncio.CancelledError:
            handed.waited = False
            raise

    def _inputs(self) -> tuple[str, str]:
        topics = self._settings.topics
        return topics.requests, topics.results

    async def _transactions(self) -> None:
        """Commit what was handed in, a transaction at a time, until nothing waits."""
        while self._handed:
            while not self._quiet.is_set():  # set, then cleared by a batch that began
                await self._quiet.wait()
            handed, self._handed = self._handed, []
            try:
                if self._producer is None:
                    await self._restart()
                ends = await self._transaction(handed)
            except BaseException as exc:
                failure = self._failure(exc)
                for item in handed:
                    item.done.set_exception(failure)
                    item.done.add_done_callback(_retrieved)  # its batch may have been cancelled
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            self._metrics.transaction()
            state = self._settings.topics.state
            for item in handed:
                if item.waited:
                    # Its partition may begin its next batch (with what was fetched during
                    # this transaction) as soon as it hears: the next transaction waits for
                    # it to begin, or to end without one (its batch's `end`).
                    self.begin(item.number)
                written = ends.get((state, item.number))
                # The commit marker follows the transaction's last record in the partition.
                item.done.set_result(None if written is None else written + 1)

    async def _transaction(self, handed: list[_Handed]) -> dict[tuple[str, int], int]:
        producer = self._producer
        assert producer is not None
        self._began = time.monotonic()
        await producer.begin_transaction()
        try:
            out = Outbox(producer)
            offsets: dict[TopicPartition, int] = {}
            for item in handed:
                write_outcome(out.batches, self._settings.topics, item.number, item.outcome)
                offsets.update(item.offsets)
            ends = await compat.send_with_offsets(
                producer, out.flush(), offsets, self._settings.group_id
            )
            self._hooks.point("in_transaction")
            self._hooks.point("stop_in_transaction")
            await producer.commit_transaction()
        except BaseException:
            # Started again before the next transaction: its InitProducerId aborts at the
            # broker whatever this one left open. An abort alone is not enough: after an
            # abortable error aiokafka forgets the transaction's partitions and "aborts" it
            # without asking the broker, so the next commit would commit it too.
            self._producer = None
            with contextlib.suppress(KafkaError):
                await producer.stop()
            # The failure is raised below; the producer's own futures holding it are not
            # left for the garbage collector to report as never retrieved.
            compat.retrieve_failures(producer)
            raise
        return ends

    def _failure(self, exc: BaseException) -> BaseException:
        """What each partition of a failed transaction is told: fenced (they rejoin and are
        taken again) when the group or the broker refused this worker's transaction."""
        if isinstance(exc, compat.MemberFenced):
            return FencedError(str(exc))
        if not isinstance(exc, ProducerFenced | InvalidProducerEpoch):
            return exc
        # The broker aborted the transaction (it outlived JOBS_TRANSACTION_TIMEOUT_MS, a
        # frozen process), another worker took a partition of it and aborted it (this one
        # had been dropped from the group meanwhile), or another process started a
        # producer with this worker's ID.
        self._fenced(time.monotonic())
        return FencedError(f"the broker fenced this worker's transaction: {exc!r}")

    def _fenced(self, now: float) -> None:
        """Count a fence of this worker's transaction; stop when another process shares its
        transactional ID.

        A transaction open longer than the group session is explained: the group may have
        dropped this worker meanwhile and its partitions' next owner aborted what it held,
        or the broker timed it out; once, for a freeze or a move. One fenced within the
        session is not: only a producer started with this worker's ID fences it, and a twin
        does so each time it starts its producer again after a fence of its own.
        """
        s = self._settings
        if now - self._began > min(s.session_timeout_ms, s.transaction_timeout_ms) / 1000:
            return
        fences = self._unexplained
        fences.append(now)
        while fences and now - fences[0] > TWIN_WINDOW_S:
            fences.popleft()
        if len(fences) >= PRODUCER_FENCED_TWIN and not self._twin:
            self._twin = True  # said once; the worker is stopping
            message = (
                f"another worker uses this worker's identity (transactional ID "
                f"{self._transactional_id!r}): it runs on a copy of this worker's SQLite file "
                f"{str(s.db_path)!r}; its transactions and this one's fenced each other "
                f"{len(fences)} times in {now - fences[0]:.0f} s. Give each worker its own "
                "SQLite file: start the other on a new, empty JOBS_DB_PATH (its partitions "
                "are restored from the changelog)"
            )
            log.error("stopping: another worker uses this worker's identity", error=message)
            self._stop(StoreError(message))

    def fenced_again(self) -> bool:
        """Whether the broker fenced more than one transaction within the window that no
        partition move explains (a twin, until it is told apart): not ready."""
        now = time.monotonic()
        return sum(1 for t in self._unexplained if now - t <= TWIN_WINDOW_S) > 1

    async def close(self, number: int) -> None:
        """Nothing is held per partition (its last batch has committed or failed)."""

    async def stop(self) -> None:
        """Let the transaction in flight end, then stop the producer."""
        if self._cycle is not None:
            await asyncio.gather(self._cycle, return_exceptions=True)
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await _stopped(producer)


async def _stopped(producer: AIOKafkaProducer) -> None:
    """Stop `producer`, whatever Kafka says. A producer stopped after a fence (a twin found,
    the worker stopping, a restart) holds the failure on futures nobody reads, before its
    stop and after: retrieved, so that asyncio does not log each at error level."""
    compat.retrieve_failures(producer)
    with contextlib.suppress(KafkaError):
        await producer.stop()
    compat.retrieve_failures(producer)
