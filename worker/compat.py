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
- `append_record`: a record appended to a producer's record batch without
  `BatchBuilder.append`'s wrapper (0.56 → 0.22 µs a record; a transition writes four).
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
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.consumer import fetcher
from aiokafka.errors import (
    AuthenticationFailedError,
    IllegalSaslStateError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.producer import sender
from aiokafka.producer.transaction_manager import TransactionManager, TransactionState
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
    if isinstance(cause, _AUTH_ERRORS):
        return (
            f"authentication failed ({cause}); check JOBS_SASL_USERNAME, JOBS_SASL_PASSWORD "
            "and JOBS_SASL_MECHANISM"
        )
    if isinstance(cause, ssl.SSLError):
        return f"TLS failed ({cause}); check JOBS_SSL_CAFILE and JOBS_SECURITY_PROTOCOL"
    if cause is not None:
        return f"{error} ({cause}); check JOBS_BOOTSTRAP_SERVERS and JOBS_SECURITY_PROTOCOL"
    return f"{error}; check JOBS_BOOTSTRAP_SERVERS and JOBS_SECURITY_PROTOCOL"


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


def append_record(
    builder: Any,
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes | None]],
) -> bool:
    """Append a record to `builder` (a producer's `create_batch()`, of a producer without
    serializers), stamped now, as its `append` does; False when the batch is full, which
    closes it. The record goes to the batch's compiled encoder directly, and the count the
    producer reads (`record_count`) moves with it."""
    if (
        builder._builder.append(
            builder._relative_offset, None, key=key, value=value, headers=headers
        )
        is None
    ):
        builder.close()
        return False
    builder._relative_offset += 1
    return True


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
