"""Every use of aiokafka beyond its public API, in one place, each tested against the
installed aiokafka (`tests/test_compat.py`), so an upgrade that removes one fails loudly.

- `request_rejoin`: ask the group for a new assignment (a fenced partition is settled
  promptly); aiokafka's coordinator has it, the consumer does not expose it.
- `abort_if_open`: abort a transaction only when one is open and abortable; the producer
  has no public check, its transaction manager does.
- `fetch_all_metadata`: topic metadata for a consumer without a subscription.
- `install`: fetched records whose header names are not UTF-8 become readable, not fatal
  (below); and a transactional producer whose coordinator is still completing its previous
  transaction asks again after `TXN_BUSY_BACKOFF_S`, not aiokafka's 20 ms; and an offset
  commit can be held back until the transaction's records are acknowledged.
- `send_with_offsets`: a transaction's input offsets added beside its records, and
  committed once they are acknowledged (one request fewer in turn, no superseded check).
- `retrieve_failures`: a failed transactional producer's own futures that carry the
  failure (its transaction's waiter, its record batches' drain waiters), retrieved once the
  failure has reached the caller: aiokafka leaves them for asyncio to report as "Future
  exception was never retrieved" when they are collected (tested where a transaction is
  fenced on the broker, `tests/test_worker_transactions.py`).
- `worker.engine.records.Partition` (kept with the record batches it fills, in a
  compiled module): records appended to a producer's record batch without
  `BatchBuilder.append`'s wrapper (0.56 → 0.22 µs a record; a transition writes four),
  counted as it counts them.
- `open_transactions`: the transactions open on the cluster, and the partitions each holds
  (a worker aborts those a previous owner that is gone left on the partitions it takes).
- `install` also has a produce request written in one piece: aiokafka's generic encoder
  joins each level of the request (a partition's batch, the partitions, the topic, the
  topics, the request) into bytes of its own, copying every record batch six times; a
  transaction's request carries about a megabyte of them (`_encode_produce`).
- `connect_failure`: why a client could not connect. aiokafka's bootstrap raises only
  "Unable to bootstrap from [...]" and logs the cause (a wrong password, an untrusted
  certificate); a filter on its logger keeps that cause.

Tolerant records.

Kafka header names are strings, but the broker does not check their bytes, and any client
can write a name that is not UTF-8. aiokafka decodes header names strictly while it iterates
a fetched batch: one such record raises `UnicodeDecodeError` out of `getmany` on every
fetch, so the partition, and every valid record behind it, could never be read again.

`install()` wraps the record sets aiokafka's fetcher builds. Batches are read by aiokafka's
own (compiled) decoder as before; only a batch that fails to decode is read again here, with
header names decoded with `surrogateescape`, so the original bytes can still be recovered
(`name.encode("utf-8", "surrogateescape")`) and the worker dead-letters the record
(`malformed_header`) instead of stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
import time
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import aiokafka.errors as Errors
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.client import AIOKafkaClient, CoordinationType
from aiokafka.consumer import fetcher
from aiokafka.errors import (
    AuthenticationFailedError,
    IllegalSaslStateError,
    InvalidProducerEpoch,
    KafkaError,
    ProducerFenced,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.producer import sender
from aiokafka.producer.transaction_manager import TransactionManager, TransactionState
from aiokafka.protocol import produce
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Int64,
    Schema,
    String,
    TaggedFields,
)
from aiokafka.record.default_records import _DefaultRecordBatchPy, _DefaultRecordPy
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import decode_varint

T = TypeVar("T")


class _LastConnectError(logging.Filter):
    """Keeps the cause aiokafka logs when a connection fails (it raises without it)."""

    def __init__(self) -> None:
        super().__init__()
        self.cause: object = None

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if str(record.msg).startswith("Unable connect to") and isinstance(args, tuple):
            self.cause = args[-1] if args else None
        return True


_LAST_CONNECT_ERROR = _LastConnectError()
logging.getLogger("aiokafka").addFilter(_LAST_CONNECT_ERROR)  # aiokafka/client.py logs there
_AUTH_ERRORS = (
    AuthenticationFailedError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
    IllegalSaslStateError,
)


def connect_failure(error: BaseException) -> str:
    """Why connecting failed, as a sentence that says what to check (no secret in it)."""
    cause, _LAST_CONNECT_ERROR.cause = _LAST_CONNECT_ERROR.cause, None
    if isinstance(cause, IllegalSaslStateError):
        # The listener takes no SASL handshake: a protocol for another listener.
        return (
            f"the broker's listener does not speak SASL ({cause}); check "
            "JOBS_SECURITY_PROTOCOL and JOBS_BOOTSTRAP_SERVERS"
        )
    if isinstance(cause, _AUTH_ERRORS):
        return (
            f"authentication failed ({cause}); check JOBS_SASL_USERNAME, JOBS_SASL_PASSWORD "
            "and JOBS_SASL_MECHANISM"
        )
    if isinstance(cause, ssl.SSLError):
        return f"TLS failed ({cause}); check JOBS_SSL_CAFILE and JOBS_SECURITY_PROTOCOL"
    # aiokafka's own sentence lists the resolved addresses as Python tuples.
    what = "no bootstrap server answered" if "Unable to bootstrap" in str(error) else error
    if cause is not None:
        if isinstance(cause, TimeoutError):  # connected, and no answer (a frozen broker)
            said = "it did not answer in time"
        else:  # a TLS client on a plaintext listener is cut off by an error with no text
            said = str(cause) or f"{type(cause).__name__}: the broker closed the connection"
        return f"{what} ({said}); check JOBS_BOOTSTRAP_SERVERS and JOBS_SECURITY_PROTOCOL"
    return f"{what}; check JOBS_BOOTSTRAP_SERVERS and JOBS_SECURITY_PROTOCOL"


def request_rejoin(consumer: AIOKafkaConsumer) -> None:
    """Make `consumer` rejoin its group at the next poll (a new assignment follows)."""
    consumer._coordinator.request_rejoin()


async def abort_if_open(producer: AIOKafkaProducer) -> None:
    """Abort the open transaction when the producer still can; a fatal one cannot.

    Where abort is impossible, the next owner's producer start aborts the transaction.
    """
    txn = producer._txn_manager
    if txn is None or txn.is_fatal_error():
        return
    if txn.state not in (TransactionState.IN_TRANSACTION, TransactionState.ABORTABLE_ERROR):
        return
    with contextlib.suppress(KafkaError, TimeoutError, AssertionError):
        async with asyncio.timeout(10):
            await producer.abort_transaction()


async def fetch_all_metadata(consumer: AIOKafkaConsumer) -> Any:
    """The cluster's metadata, fetched now (a consumer without a subscription knows none)."""
    return await consumer._client.fetch_all_metadata()


_LENGTH = struct.Struct(">i")  # a batch: base offset (int64), then its length (int32)
_BATCH_PREFIX = 12


# How long a transactional producer waits before asking again to add a partition to a new
# transaction while the coordinator still completes the previous one (CONCURRENT_TRANSACTIONS).
# aiokafka waits 20 ms, as the Java client does; completing takes the broker a few
# milliseconds, and a partition's owner begins its next transaction as soon as its records
# are decided, so every such wait is latency its requests see.
TXN_BUSY_BACKOFF_S = 0.002


def install() -> None:
    """Make every aiokafka consumer of this process read such records, every
    transactional producer ask again `TXN_BUSY_BACKOFF_S` after a busy coordinator, and
    hold an offset commit back while `send_with_offsets` says so (idempotent)."""
    fetcher.MemoryRecords = TolerantMemoryRecords
    sender.BACKOFF_OVERRIDE = TXN_BUSY_BACKOFF_S
    TransactionManager.offsets_to_commit = _offsets_to_commit_after_records
    for request in PRODUCE_REQUESTS:
        request.encode = _encode_produce


# aiokafka's produce requests of version 3's schema (versions 3 to 8 share it), which
# `_encode_produce` writes (`tests/test_compat.py` checks it against aiokafka's encoder); a
# version of another schema keeps aiokafka's.
PRODUCE_REQUESTS = tuple(
    request
    for request in vars(produce).values()
    if getattr(request, "SCHEMA", None) is produce.ProduceRequest_v3.SCHEMA
)
_PRODUCE_FIELDS = ("transactional_id", "required_acks", "timeout", "topics")
_INT16 = struct.Struct(">h").pack
_INT32 = struct.Struct(">i").pack
_TEXT = String("utf-8").encode


def _encode_produce(self: RequestStruct) -> bytes:
    """A produce request's body as aiokafka's `Struct.encode` writes it, joined once: each
    record batch is copied into it, not into every level's bytes on the way."""
    transactional_id, acks, timeout, topics = (self.__dict__[name] for name in _PRODUCE_FIELDS)
    parts = [_TEXT(transactional_id), _INT16(acks), _INT32(timeout), _INT32(len(topics))]
    for topic, partitions in topics:
        parts += (_TEXT(topic), _INT32(len(partitions)))
        for partition, batch in partitions:
            if batch is None:
                parts += (_INT32(partition), _INT32(-1))
            else:
                parts += (_INT32(partition), _INT32(len(batch)), batch)
    return b"".join(parts)


_log = structlog.get_logger("worker")


def quiet_fenced_futures(loop: asyncio.AbstractEventLoop) -> None:
    """Have `loop` log at debug level, not error, a future that aiokafka set with a fencing
    error and that nobody awaits: a fenced producer's transaction manager sets the error on
    futures of its own (the offsets added to the transaction, behind a shield; a waiter it
    replaces), which no caller can reach, so `retrieve_failures` misses some. The fence
    itself has reached the batch by then (`FencedError`) and is logged there. Likewise a
    produce request that outlived its sender's routine (`_orphaned_send`). Any other
    never-retrieved failure is reported as before."""
    before = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        never = "never retrieved" in str(context.get("message", ""))
        if never and isinstance(exc, ProducerFenced | InvalidProducerEpoch):
            _log.debug("a fenced producer's own future held the fence", error=repr(exc))
            return
        if never and _orphaned_send(context.get("future")):
            _log.debug("a produce request outlived its sender's routine", error=repr(exc))
            return
        if before is None:
            loop.default_exception_handler(context)
        else:
            before(loop, context)

    loop.set_exception_handler(handler)


def _orphaned_send(future: object) -> bool:
    """Whether `future` is one of aiokafka's produce tasks (`Sender._send_produce_req`).

    The sender's routine reads the result of each while it runs; one nobody read outlived
    the routine, which ended with its own error (a fence, reported where the batch fails),
    and can fail afterwards (aiokafka raises a `KeyError` for a record batch the fence has
    already failed)."""
    if not isinstance(future, asyncio.Task):
        return False
    return getattr(future.get_coro(), "__qualname__", "") == "Sender._send_produce_req"


_OFFSETS_TO_COMMIT = TransactionManager.offsets_to_commit
_RECORDS_IN_FLIGHT = "jobs_records_in_flight"  # set on a TransactionManager


def _offsets_to_commit_after_records(self: TransactionManager) -> Any:
    """aiokafka's `offsets_to_commit`, None while the transaction's records are in flight."""
    if getattr(self, _RECORDS_IN_FLIGHT, False):
        return None
    return _OFFSETS_TO_COMMIT(self)


async def send_with_offsets(
    producer: AIOKafkaProducer,
    sending: Awaitable[T],
    offsets: dict[TopicPartition, int],
    group_id: str,
) -> T:
    """Await `sending` (the open transaction's records being produced) while the group's
    offsets are added to the transaction; commit the offsets once it is done.

    aiokafka's transaction takes five requests in turn: add the partitions, produce, add
    the group, commit its offsets, end. Adding the group does not wait for the records, so
    it goes beside the produce here. The offset commit waits for them: the broker checks
    with the transaction coordinator both the records' first produce to a partition and the
    offset commit, and a second check of one producer's transaction that arrives while the
    first is in flight supersedes it; the superseded request fails as retriable (the
    produce with NOT_ENOUGH_REPLICAS, the offset commit with COORDINATOR_NOT_AVAILABLE) and
    aiokafka asks again after its 100 ms backoff.
    """
    # The hold itself (`install` sets it too, with the rest of what it installs).
    TransactionManager.offsets_to_commit = _offsets_to_commit_after_records
    txn = producer._txn_manager
    setattr(txn, _RECORDS_IN_FLIGHT, True)
    adding = asyncio.ensure_future(producer.send_offsets_to_transaction(offsets, group_id))
    try:
        sent = await sending
    except BaseException:
        # The caller aborts; the abort commits the added offsets first, or fails them.
        adding.add_done_callback(_retrieved)
        raise
    finally:
        setattr(txn, _RECORDS_IN_FLIGHT, False)
        txn.notify_task_waiter()
    await adding
    return sent


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def retrieve_failures(producer: AIOKafkaProducer) -> None:
    """Retrieve the failure each of `producer`'s own futures holds, once the caller has had
    it (a fenced or failed transaction, raised to whoever sent or committed).

    When the sender fails (`ProducerFenced`), aiokafka sets the error on the transaction's
    waiter, which only `commit_transaction` reads, and on every record batch's drain waiter,
    which only a `send` into a full batch reads; a transaction that fails before its commit
    leaves both for the garbage collector, which has asyncio log each at error level.
    Futures still pending are left alone.
    """
    txn = producer._txn_manager
    waiters: list[asyncio.Future[Any] | None] = []
    if txn is not None:
        waiters.append(txn._transaction_waiter)
    accumulator = producer._message_accumulator
    for batch in (
        *(b for bs in accumulator._batches.values() for b in bs),
        *accumulator._pending_batches,
    ):
        waiters += (batch.future, batch._drain_waiter)
    for waiter in waiters:
        if waiter is not None and waiter.done():
            _retrieved(waiter)


class TolerantMemoryRecords:
    """aiokafka's `MemoryRecords`, whose batches fall back to `tolerant_records`."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._inner = MemoryRecords(data)
        self._pos = 0

    def size_in_bytes(self) -> int:
        """The size of the fetched record set."""
        return int(self._inner.size_in_bytes())

    def has_next(self) -> bool:
        """Whether another whole batch follows."""
        return bool(self._inner.has_next())

    def next_batch(self) -> TolerantBatch | None:
        """The next batch, which knows its own bytes."""
        batch = self._inner.next_batch()
        if batch is None:
            return None
        start = self._pos
        (length,) = _LENGTH.unpack_from(self._data, start + 8)
        self._pos = start + _BATCH_PREFIX + length
        return TolerantBatch(batch, self._data, start, self._pos)


class TolerantBatch:
    """One fetched batch: aiokafka's, read again tolerantly if its decoder fails."""

    def __init__(self, batch: Any, data: bytes, start: int, end: int) -> None:
        self._batch = batch
        self._data = data
        self._start = start
        self._end = end

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batch, name)

    def __next__(self) -> Any:
        return next(self._batch)

    def __iter__(self) -> Iterator[Any]:
        last = -1
        try:
            for record in self._batch:
                last = record.offset
                yield record
            return
        except UnicodeDecodeError:
            pass
        for record in tolerant_records(bytes(self._data[self._start : self._end])):
            if record.offset > last:
                yield record


def tolerant_records(batch: bytes) -> Iterator[_DefaultRecordPy]:
    """The records of one v2 batch, header names decoded with `surrogateescape`.

    aiokafka's pure-Python batch reads the batch header and decompresses; the records are
    read here, in the format of the Kafka protocol's `Record`.
    """
    parsed = _DefaultRecordBatchPy(batch)
    parsed._maybe_uncompress()
    buffer, pos = parsed._buffer, parsed._pos
    log_append = parsed.timestamp_type == parsed.LOG_APPEND_TIME
    for _ in range(parsed._num_records):
        _, pos = decode_varint(buffer, pos)  # length
        pos += 1  # attributes
        ts_delta, pos = decode_varint(buffer, pos)
        offset_delta, pos = decode_varint(buffer, pos)
        key, pos = _bytes(buffer, pos)
        value, pos = _bytes(buffer, pos)
        count, pos = decode_varint(buffer, pos)
        headers: list[tuple[str, bytes | None]] = []
        for _ in range(count):
            name_len, pos = decode_varint(buffer, pos)
            name = bytes(buffer[pos : pos + name_len]).decode("utf-8", "surrogateescape")
            pos += name_len
            header_value, pos = _bytes(buffer, pos)
            headers.append((name, header_value))
        timestamp = parsed.max_timestamp if log_append else parsed.first_timestamp + ts_delta
        yield _DefaultRecordPy(
            parsed.base_offset + offset_delta,
            timestamp,
            parsed.timestamp_type,
            key,
            value,
            headers,
        )


def _bytes(buffer: bytearray, pos: int) -> tuple[bytes | None, int]:
    length, pos = decode_varint(buffer, pos)
    if length < 0:
        return None, pos
    return bytes(buffer[pos : pos + length]), pos + length


# Fencing by the group's generation (KIP-447), for one transactional producer serving every
# partition of a worker. aiokafka 0.14 sends TxnOffsetCommit v0 (the group's name only) and
# fetches committed offsets without `require_stable`; the two versions below carry what the
# broker needs: the member's generation and ID in the offset commit, so a member that lost
# its partitions cannot commit them (ILLEGAL_GENERATION), and a fetch of committed offsets
# that waits while a transaction holding offsets for them is still open
# (UNSTABLE_OFFSET_COMMIT). Both need Kafka 2.5 or later.

_TAGS = ("tags", TaggedFields)
_NAME = CompactString("utf-8")
UNSTABLE_OFFSET_COMMIT = 88  # not among aiokafka's error codes
_MEMBER_FENCED = {
    Errors.IllegalGenerationError.errno,
    Errors.UnknownMemberIdError.errno,
    82,  # FENCED_INSTANCE_ID
}


NOT_A_MEMBER = "jobs-not-a-member"  # sent before the consumer ever joined: refused


_S = TypeVar("_S", bound=RequestStruct)


class _Exactly(Request[_S]):  # type: ignore[misc]
    """A request sent at the one version of its struct (the broker must support it), built
    from the struct's fields in order."""

    API_KEY = -1  # each request's own

    def __init__(self, *fields: Any) -> None:
        self._fields = fields

    def build(self, request_struct_class: type[_S]) -> _S:
        built: _S = request_struct_class(*self._fields)
        return built


class MemberFenced(KafkaError):  # type: ignore[misc]
    """The group no longer counts this member's generation: the offsets of its transaction
    were refused, and the partitions belong to the group's next assignment."""

    retriable = False


class _TxnOffsetCommitResponseV3(Response):  # type: ignore[misc]
    API_KEY = 28
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "errors",
            CompactArray(
                ("topic", _NAME),
                (
                    "partition_errors",
                    CompactArray(("partition", Int32), ("error_code", Int16), _TAGS),
                ),
                _TAGS,
            ),
        ),
        _TAGS,
    )


class _TxnOffsetCommitRequestV3(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 28
    API_VERSION = 3
    RESPONSE_TYPE = _TxnOffsetCommitResponseV3
    SCHEMA = Schema(
        ("transactional_id", _NAME),
        ("group_id", _NAME),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("generation_id", Int32),
        ("member_id", _NAME),
        ("group_instance_id", _NAME),
        (
            "topics",
            CompactArray(
                ("topic", _NAME),
                (
                    "partitions",
                    CompactArray(
                        ("partition", Int32),
                        ("offset", Int64),
                        ("leader_epoch", Int32),
                        ("metadata", _NAME),
                        _TAGS,
                    ),
                ),
                _TAGS,
            ),
        ),
        _TAGS,
    )


class _TxnOffsetCommitV3(_Exactly[_TxnOffsetCommitRequestV3]):
    API_KEY = 28


_MEMBER = "jobs_group_member"  # set on a TransactionManager: () -> (generation, member ID)
_TXN_CREATE_REQUEST = sender.TxnOffsetCommitHandler.create_request
_TXN_HANDLE_RESPONSE = sender.TxnOffsetCommitHandler.handle_response


def fence_by_group(producer: AIOKafkaProducer, consumer: AIOKafkaConsumer) -> None:
    """Have `producer`'s offset commits carry `consumer`'s generation and member ID (read
    when each commit is sent), so the group refuses them once the member is stale."""
    known = [(0, NOT_A_MEMBER)]  # the last generation and member ID the consumer had

    def member() -> tuple[int, str]:
        # Read when sent (the consumer may start after the producer). Never generation -1:
        # the broker skips its check for it (an admin's or a v0 producer's commit), and
        # aiokafka's consumer drops to -1 when its session expires, which is exactly when
        # the check must refuse. A member without a generation sends its last one.
        coordinator = consumer._coordinator
        if coordinator is not None and coordinator.generation >= 0 and coordinator.member_id:
            known[0] = (coordinator.generation, coordinator.member_id)
        return known[0]

    setattr(producer._txn_manager, _MEMBER, member)
    sender.TxnOffsetCommitHandler.create_request = _txn_create_request
    sender.TxnOffsetCommitHandler.handle_response = _txn_handle_response


def _txn_create_request(self: Any) -> Any:
    txn = self._sender._txn_manager
    member = getattr(txn, _MEMBER, None)
    if member is None:
        return _TXN_CREATE_REQUEST(self)
    generation, member_id = member()
    topics: dict[str, list[Any]] = {}
    for tp, offset in sorted(self._offsets.items()):
        topics.setdefault(tp.topic, []).append(
            (tp.partition, offset.offset, -1, offset.metadata or "", {})
        )
    return _TxnOffsetCommitV3(
        txn.transactional_id,
        self._group_id,
        txn.producer_id,
        txn.producer_epoch,
        generation,
        member_id,
        None,
        [(topic, partitions, {}) for topic, partitions in topics.items()],
        {},
    )


class _Errors:
    """A v3 response in the shape aiokafka's handler reads (topic, [(partition, code)])."""

    def __init__(self, errors: list[tuple[str, list[tuple[int, int]]]]) -> None:
        self.errors = errors


def _txn_handle_response(self: Any, response: Any) -> Any:
    if not isinstance(response, _TxnOffsetCommitResponseV3):
        return _TXN_HANDLE_RESPONSE(self, response)
    errors = [
        (topic, [(partition, code) for partition, code, _ in partitions])
        for topic, partitions, _ in response.errors
    ]
    for topic, partitions in errors:
        for partition, code in partitions:
            if code in _MEMBER_FENCED:
                # Abortable, as in Kafka's own producer: abort (a new producer, see
                # `SharedExactlyOnce`), rejoin, and go on.
                txn = self._sender._txn_manager
                txn.error_transaction(
                    MemberFenced(
                        f"the group refused the offsets of {topic}[{partition}]: this member's "
                        f"generation is over (error {code})"
                    )
                )
                # Its waiter for the transaction's end holds the error too; the producer is
                # replaced, so nothing awaits it: read here, not logged as never retrieved.
                txn.wait_for_transaction_end().add_done_callback(_retrieved)
                return None
    return _TXN_HANDLE_RESPONSE(self, _Errors(errors))


class _OffsetFetchResponseV7(Response):  # type: ignore[misc]
    API_KEY = 9
    API_VERSION = 7
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "topics",
            CompactArray(
                ("name", _NAME),
                (
                    "partitions",
                    CompactArray(
                        ("partition", Int32),
                        ("offset", Int64),
                        ("leader_epoch", Int32),
                        ("metadata", _NAME),
                        ("error_code", Int16),
                        _TAGS,
                    ),
                ),
                _TAGS,
            ),
        ),
        ("error_code", Int16),
        _TAGS,
    )


class _OffsetFetchRequestV7(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 9
    API_VERSION = 7
    RESPONSE_TYPE = _OffsetFetchResponseV7
    SCHEMA = Schema(
        ("group_id", _NAME),
        ("topics", CompactArray(("name", _NAME), ("partitions", CompactArray(Int32)), _TAGS)),
        ("require_stable", Boolean),
        _TAGS,
    )


class _OffsetFetchV7(_Exactly[_OffsetFetchRequestV7]):
    API_KEY = 9


_COORDINATOR_MOVED = {
    Errors.CoordinatorNotAvailableError.errno,
    Errors.NotCoordinatorError.errno,
    Errors.CoordinatorLoadInProgressError.errno,
}


async def stable_committed(
    consumer: AIOKafkaConsumer,
    group_id: str,
    tps: list[TopicPartition],
    within: float,
    retry_s: float = 0.1,
) -> dict[TopicPartition, int | None]:
    """The group's committed offsets of `tps` (None: none), once no open transaction holds
    offsets for them: asked again every `retry_s` while the broker answers
    UNSTABLE_OFFSET_COMMIT, for at most `within` seconds (then `KafkaTimeoutError`)."""
    coordinator = consumer._coordinator
    topics: dict[str, list[int]] = {}
    for tp in tps:
        topics.setdefault(tp.topic, []).append(tp.partition)
    request = _OffsetFetchV7(group_id, [(t, ps, {}) for t, ps in topics.items()], True, {})
    deadline = time.monotonic() + within
    while True:
        await coordinator.ensure_coordinator_known()
        response = await consumer._client.send(coordinator.coordinator_id, request)
        if response.error_code in _COORDINATOR_MOVED:
            coordinator.coordinator_dead()
            codes = {response.error_code}
        elif response.error_code:
            raise Errors.for_code(response.error_code)(f"fetching the offsets of {group_id}")
        else:
            offsets: dict[TopicPartition, int | None] = {}
            codes = set()
            for topic, partitions, _ in response.topics:
                for partition, offset, _epoch, _meta, code, _ in partitions:
                    if code:
                        codes.add(code)
                    offsets[TopicPartition(topic, partition)] = offset if offset >= 0 else None
            if not codes:
                return offsets
        unknown = codes - {UNSTABLE_OFFSET_COMMIT} - _COORDINATOR_MOVED
        if unknown:
            raise Errors.for_code(min(unknown))(f"fetching the offsets of {group_id}")
        if time.monotonic() >= deadline:
            raise Errors.KafkaTimeoutError(
                f"the offsets of {group_id} stayed unstable for {within:g} s: a transaction "
                "holding offsets for them is still open"
            )
        await asyncio.sleep(retry_s)


# Transactions left open by a process that is gone (KIP-664's ListTransactions and
# DescribeTransactions, Kafka 3.0 or later; aiokafka has neither).

ONGOING = "Ongoing"


class _ListTransactionsResponseV0(Response):  # type: ignore[misc]
    API_KEY = 66
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        ("unknown_state_filters", CompactArray(_NAME)),
        (
            "transaction_states",
            CompactArray(
                ("transactional_id", _NAME),
                ("producer_id", Int64),
                ("transaction_state", _NAME),
                _TAGS,
            ),
        ),
        _TAGS,
    )


class _ListTransactionsRequestV0(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 66
    API_VERSION = 0
    RESPONSE_TYPE = _ListTransactionsResponseV0
    SCHEMA = Schema(
        ("state_filters", CompactArray(_NAME)),
        ("producer_id_filters", CompactArray(Int64)),
        _TAGS,
    )


class _ListTransactionsV0(_Exactly[_ListTransactionsRequestV0]):
    API_KEY = 66


class _DescribeTransactionsResponseV0(Response):  # type: ignore[misc]
    API_KEY = 65
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "transaction_states",
            CompactArray(
                ("error_code", Int16),
                ("transactional_id", _NAME),
                ("transaction_state", _NAME),
                ("transaction_timeout_ms", Int32),
                ("transaction_start_time_ms", Int64),
                ("producer_id", Int64),
                ("producer_epoch", Int16),
                (
                    "topics",
                    CompactArray(("topic", _NAME), ("partitions", CompactArray(Int32)), _TAGS),
                ),
                _TAGS,
            ),
        ),
        _TAGS,
    )


class _DescribeTransactionsRequestV0(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 65
    API_VERSION = 0
    RESPONSE_TYPE = _DescribeTransactionsResponseV0
    SCHEMA = Schema(("transactional_ids", CompactArray(_NAME)), _TAGS)


class _DescribeTransactionsV0(_Exactly[_DescribeTransactionsRequestV0]):
    API_KEY = 65


async def open_transactions(
    consumer: AIOKafkaConsumer, prefix: str
) -> dict[str, frozenset[TopicPartition]]:
    """The cluster's ongoing transactions whose transactional ID starts with `prefix`, each
    with the partitions it has written records to or holds offsets in (as their coordinators
    see them now).

    Every broker is asked for the transactions it coordinates; one that stopped
    coordinating meanwhile answers NOT_COORDINATOR for it, and that transaction is left out
    (it is looked for again at the next call). Raises a `KafkaError` when a broker refuses
    (an older Kafka without these requests raises `IncompatibleBrokerVersion`)."""
    client: AIOKafkaClient = consumer._client
    await client.force_metadata_update()
    ids: set[str] = set()
    for broker in client.cluster.brokers():
        listed = await client.send(broker.nodeId, _ListTransactionsV0([ONGOING], [], {}))
        if listed.error_code:
            raise Errors.for_code(listed.error_code)("listing the cluster's transactions")
        ids.update(t for t, _, _, _ in listed.transaction_states if t.startswith(prefix))
    by_coordinator: dict[int, list[str]] = {}
    for transactional_id in sorted(ids):
        node = await client.coordinator_lookup(CoordinationType.TRANSACTION, transactional_id)
        by_coordinator.setdefault(node, []).append(transactional_id)
    found: dict[str, frozenset[TopicPartition]] = {}
    for node, named in by_coordinator.items():
        described = await client.send(node, _DescribeTransactionsV0(named, {}))
        for code, transactional_id, state, _, _, _, _, topics, _ in described.transaction_states:
            if code or state != ONGOING:
                continue
            found[transactional_id] = frozenset(
                TopicPartition(topic, p) for topic, partitions, _ in topics for p in partitions
            )
    return found
