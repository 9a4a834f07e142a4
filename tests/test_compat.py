"""Every private aiokafka call of `worker.compat` works on the installed aiokafka.

An upgrade that renames or removes one fails here, loudly, instead of silently doing nothing
in production.
"""

from __future__ import annotations

import asyncio
import gc

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.consumer import fetcher
from aiokafka.errors import KafkaTimeoutError, ProducerFenced
from aiokafka.producer.transaction_manager import TransactionState
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from aiokafka.record.memory_records import MemoryRecords
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.hostile import _RawName
from worker import compat
from worker.compat import TolerantMemoryRecords
from worker.engine.records import _NO_HEADERS, RecordBatches
from worker.settings import Settings


def _batch(
    compression: int, records: list[tuple[bytes, list[tuple[bytes, bytes | None]]]]
) -> bytes:
    builder = _DefaultRecordBatchBuilderPy(
        magic=2,
        compression_type=compression,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1_000_000,
    )
    for offset, (value, headers) in enumerate(records):
        named = [(_RawName(n), v) for n, v in headers]
        builder.append(
            offset, timestamp=1_700_000_000_000 + offset, key=b"k", value=value, headers=named
        )
    return bytes(builder.build())


@pytest.mark.parametrize("compression", [0, 1], ids=["plain", "gzip"])
def test_a_header_name_that_is_not_utf8_does_not_hide_the_batch(compression: int) -> None:
    """Every record of the batch is read, the bad name's bytes kept as surrogates."""
    data = _batch(
        compression,
        [
            (b"first", []),
            (b"bad", [(b"\xff\xfeX", b"1"), (b"ok", None)]),
            (b"last", [(b"fine", b"2")]),
        ],
    )
    data += _batch(0, [(b"next batch", [])])  # the batch after it is read as usual
    records = TolerantMemoryRecords(data)
    seen = []
    while records.has_next():
        batch = records.next_batch()
        assert batch is not None
        assert not batch.is_control_batch
        seen.extend((r.value, list(r.headers), r.timestamp) for r in batch)
    assert [value for value, _, _ in seen] == [
        b"first",
        b"bad",
        b"last",
        b"next batch",
    ]
    bad_headers = seen[1][1]
    assert bad_headers[0][0].encode("utf-8", "surrogateescape") == b"\xff\xfeX"
    assert bad_headers[1] == ("ok", None)
    assert seen[2][1] == [("fine", b"2")]
    assert seen[1][2] == 1_700_000_000_001


@pytest.mark.kafka
async def test_the_consumer_can_be_asked_to_rejoin(kafka_bootstrap: str, prefix: str) -> None:
    """`request_rejoin` reaches a started group consumer's coordinator."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=f"{prefix}.g")
    await consumer.start()
    try:
        consumer.subscribe([f"{prefix}.none"])
        compat.request_rejoin(consumer)
        assert consumer._coordinator.need_rejoin(consumer._subscription.subscription)
    finally:
        await consumer.stop()


@pytest.mark.kafka
async def test_metadata_is_fetched_for_a_consumer_without_subscription(
    topics: Settings,
) -> None:
    """`fetch_all_metadata` lists a topic the consumer never subscribed to."""
    consumer = AIOKafkaConsumer(bootstrap_servers=topics.bootstrap_servers)
    await consumer.start()
    try:
        cluster = await compat.fetch_all_metadata(consumer)
        assert cluster.partitions_for_topic(topics.topics.requests) == {0, 1}
    finally:
        await consumer.stop()


@pytest.mark.kafka
async def test_an_open_transaction_is_aborted_and_a_closed_one_left_alone(
    topics: Settings,
) -> None:
    """`abort_if_open` reads the transaction state and aborts only an open transaction."""
    producer = AIOKafkaProducer(
        bootstrap_servers=topics.bootstrap_servers, transactional_id=f"{topics.topic_prefix}.t"
    )
    await producer.start()
    try:
        await compat.abort_if_open(producer)  # none open: nothing to do, no error
        await producer.begin_transaction()
        await producer.send_and_wait(topics.topics.dlq, b"never visible", partition=0)
        await compat.abort_if_open(producer)
        assert producer._txn_manager.state is TransactionState.READY
        await producer.begin_transaction()  # a new one can begin: the old one is gone
        await producer.abort_transaction()
    finally:
        await producer.stop()


async def _committed(settings: Settings, group: str, tp: TopicPartition) -> int | None:
    # Stable offsets: the coordinator writes a committed transaction's offsets marker after
    # EndTxn has returned, and a plain OffsetFetch may answer before that.
    async with AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, group_id=group
    ) as consumer:
        return (await compat.stable_committed(consumer, group, [tp], within=10))[tp]


@pytest.mark.kafka
async def test_offsets_go_into_the_transaction_beside_its_records_and_commit_after_them(
    topics: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`send_with_offsets` adds the group while the records are produced and sends the
    offset commit only once they are acknowledged (here they are acknowledged after the
    group is added, so an offset commit not held back would go first); the transaction
    commits both. A failure while producing leaves the offsets uncommitted and the
    transaction abortable."""
    from aiokafka.producer import sender

    order: list[str] = []
    sending_offsets = sender.TxnOffsetCommitHandler.create_request

    def offset_commit(handler: object) -> object:
        order.append("offset commit")
        return sending_offsets(handler)

    monkeypatch.setattr(sender.TxnOffsetCommitHandler, "create_request", offset_commit)
    group_added = asyncio.Event()
    adding_group = sender.AddOffsetsToTxnHandler.handle_response

    def added(handler: object, response: object) -> object:
        group_added.set()
        return adding_group(handler, response)

    monkeypatch.setattr(sender.AddOffsetsToTxnHandler, "handle_response", added)
    group, tp = f"{topics.topic_prefix}.g", TopicPartition(topics.topics.requests, 0)
    producer = AIOKafkaProducer(
        bootstrap_servers=topics.bootstrap_servers, transactional_id=f"{topics.topic_prefix}.t"
    )

    async def produce(value: bytes, fail: bool = False) -> int:
        # Slower than the group's adding, so an offset commit not held back goes first.
        await asyncio.wait_for(group_added.wait(), 30)
        group_added.clear()
        delivered = await (await producer.send(topics.topics.dlq, value, partition=0))
        order.append(f"acknowledged {value.decode()}")
        if fail:
            raise RuntimeError("the batch failed")
        return delivered.offset

    await producer.start()
    try:
        await producer.begin_transaction()
        sent = await compat.send_with_offsets(producer, produce(b"one"), {tp: 7}, group)
        await producer.commit_transaction()
        assert sent == 0
        assert order == ["acknowledged one", "offset commit"]
        assert await _committed(topics, group, tp) == 7

        await producer.begin_transaction()
        with pytest.raises(RuntimeError, match="the batch failed"):
            await compat.send_with_offsets(producer, produce(b"two", fail=True), {tp: 9}, group)
        await compat.abort_if_open(producer)
        assert producer._txn_manager.state is TransactionState.READY
        assert await _committed(topics, group, tp) == 7  # the aborted offsets did not count
    finally:
        await producer.stop()


@pytest.mark.kafka
async def test_offsets_carry_the_generation_and_a_stale_member_cannot_commit_them(
    topics: Settings,
) -> None:
    """With `fence_by_group`, a transaction's offsets carry the member's generation: the
    current one commits; one the group has moved past, or a member it does not know, is
    refused (`MemberFenced`) and nothing of that transaction becomes visible once the
    producer is replaced. A consumer that dropped its generation (an expired session) still
    sends its last one, never -1 (which the broker does not check)."""
    group, tp = f"{topics.topic_prefix}.g", TopicPartition(topics.topics.requests, 0)
    out = TopicPartition(topics.topics.dlq, 0)
    consumer = AIOKafkaConsumer(
        topics.topics.requests, bootstrap_servers=topics.bootstrap_servers, group_id=group
    )
    await consumer.start()

    async def started() -> AIOKafkaProducer:
        made = AIOKafkaProducer(
            bootstrap_servers=topics.bootstrap_servers,
            transactional_id=f"{topics.topic_prefix}.t",
        )
        await made.start()
        compat.fence_by_group(made, consumer)
        return made

    producer = await started()
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=200)  # joins the group

        async def transaction(offset: int) -> None:
            await producer.begin_transaction()
            value = str(offset).encode()
            sending = producer.send_and_wait(out.topic, value, partition=0)
            await compat.send_with_offsets(producer, sending, {tp: offset}, group)
            await producer.commit_transaction()

        await transaction(5)
        assert await compat.stable_committed(consumer, group, [tp], within=10) == {tp: 5}
        coordinator = consumer._coordinator
        generation, member = coordinator.generation, coordinator.member_id
        unread: list[dict[str, object]] = []
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: unread.append(context))
        for stale in ((generation - 1, member), (generation, "someone-else")):
            setattr(producer._txn_manager, compat._MEMBER, lambda stale=stale: stale)
            with pytest.raises(compat.MemberFenced, match="generation is over"):
                await transaction(9)
            await producer.stop()  # its InitProducerId aborts what the refused one left
            producer = await started()
        gc.collect()  # the replaced producers' futures: none holds an error nobody read
        loop.set_exception_handler(None)
        assert [c["message"] for c in unread] == []
        await transaction(11)
        assert await compat.stable_committed(consumer, group, [tp], within=10) == {tp: 11}
        async with AIOKafkaConsumer(
            bootstrap_servers=topics.bootstrap_servers, isolation_level="read_committed"
        ) as reader:
            reader.assign([out])
            await reader.seek_to_beginning(out)
            end = (await reader.end_offsets([out]))[out]
            values = []
            while await reader.position(out) < end:
                fetched = await reader.getmany(out, timeout_ms=1000)
                values += [r.value for r in fetched.get(out, [])]
        assert values == [b"5", b"11"]
        member_of = getattr(producer._txn_manager, compat._MEMBER)
        assert member_of() == (generation, member)
        coordinator.reset_generation()  # what aiokafka does when the session expires
        assert coordinator.generation == -1
        assert member_of() == (generation, member)
    finally:
        await producer.stop()
        await consumer.stop()


@pytest.mark.kafka
async def test_stable_offsets_wait_for_the_transaction_that_holds_them(topics: Settings) -> None:
    """While a transaction holds offsets for a partition, a plain fetch returns the old
    ones and `stable_committed` waits (here: gives up after its bound); once the
    transaction commits, it returns the new ones. A partition nothing was committed for
    reads None."""
    group = f"{topics.topic_prefix}.g"
    tp, other = (TopicPartition(topics.topics.requests, n) for n in (0, 1))
    consumer = AIOKafkaConsumer(bootstrap_servers=topics.bootstrap_servers, group_id=group)
    producer = AIOKafkaProducer(
        bootstrap_servers=topics.bootstrap_servers, transactional_id=f"{topics.topic_prefix}.t"
    )
    await consumer.start()
    await producer.start()
    try:
        await producer.begin_transaction()
        await producer.send_offsets_to_transaction({tp: 3}, group)
        await producer.commit_transaction()
        await producer.begin_transaction()
        await producer.send_offsets_to_transaction({tp: 8}, group)
        assert await consumer.committed(tp) == 3  # not stable: the open transaction's 8 waits
        with pytest.raises(KafkaTimeoutError, match="still open"):
            await compat.stable_committed(consumer, group, [tp], within=0.5)
        waiting = asyncio.ensure_future(compat.stable_committed(consumer, group, [tp, other], 30))
        await producer.commit_transaction()
        assert await waiting == {tp: 8, other: None}
    finally:
        await producer.stop()
        await consumer.stop()


@pytest.mark.kafka
async def test_open_transactions_name_their_partitions_and_a_new_producer_aborts_one(
    topics: Settings,
) -> None:
    """`open_transactions` lists the ongoing transactions under a prefix with the partitions
    they wrote (not those of other prefixes, not committed ones); a producer started with
    the transactional ID of one aborts it: it is no longer listed, its record is never
    read, and its own producer is fenced."""
    status = topics.topics.status
    ours, foreign = f"{topics.topic_prefix}.gone", f"{topics.topic_prefix}-other.gone"
    kafka = {"bootstrap_servers": topics.bootstrap_servers}
    left = AIOKafkaProducer(**kafka, transactional_id=ours)
    other = AIOKafkaProducer(**kafka, transactional_id=foreign)
    reader = AIOKafkaConsumer(**kafka, isolation_level="read_committed")
    for client in (left, other, reader):
        await client.start()
    try:
        for producer, partition in ((left, 1), (other, 0)):
            await producer.begin_transaction()
            await producer.send_and_wait(status, b"left open", partition=partition)
        found = await compat.open_transactions(reader, f"{topics.topic_prefix}.")
        assert found == {ours: frozenset({TopicPartition(status, 1)})}

        heir = AIOKafkaProducer(**kafka, transactional_id=ours)
        await heir.start()  # InitProducerId aborts the open transaction
        await heir.stop()
        assert await compat.open_transactions(reader, f"{topics.topic_prefix}.") == {}
        with pytest.raises(ProducerFenced):
            await left.commit_transaction()
        tp = TopicPartition(status, 1)
        reader.assign([tp])
        await reader.seek_to_beginning(tp)
        assert not await reader.getmany(tp, timeout_ms=500)  # the abort marker, no record
        assert await reader.position(tp) == 2  # read past the record and its abort marker
    finally:
        await other.abort_transaction()
        for client in (left, other, reader):
            await client.stop()


async def test_records_appended_directly_read_back_as_appended_and_counted_as_by_the_producer() -> (
    None
):
    """`RecordBatches.append` writes what `BatchBuilder.append` writes, a full batch is
    closed and the next opened, and each batch taken counts its records (`record_count`)
    as the producer would have counted them: the count it sends and sequences by."""
    producer = AIOKafkaProducer(bootstrap_servers="localhost:9", max_batch_size=600)
    try:
        out = RecordBatches(producer.create_batch)
        sent = [
            (b"job-%d" % i, b"v" * 100, [("ce_id", b"%d" % i), ("empty", None)]) for i in range(9)
        ]
        for record in sent:
            out.append(out.to("jobs.status", 3), *record)
        (where, builders), *others = out.take().items()
        assert where == ("jobs.status", 3)
        assert not others
        assert len(builders) > 1
        assert all(builder.closed() for builder in builders[:-1])
        assert not builders[-1].closed()
        read = []
        for builder in builders:
            batch = list(MemoryRecords(bytes(builder._build())).next_batch())
            assert builder.record_count() == len(batch) > 0
            assert [r.offset for r in batch] == list(range(len(batch)))
            read += [(r.key, r.value, list(r.headers)) for r in batch]
        assert read == sent
        assert out.take() == {}  # taken: the next record opens new batches
    finally:
        await producer.stop()


def test_the_fetcher_builds_record_sets_through_the_tolerant_reader() -> None:
    """`install` replaces the record-set class aiokafka's fetcher uses."""
    compat.install()
    assert fetcher.MemoryRecords is TolerantMemoryRecords


_BATCHES = st.none() | st.binary(max_size=64) | st.binary(max_size=64).map(bytearray)
_TOPICS = st.lists(
    st.tuples(
        st.text(max_size=12),
        st.lists(st.tuples(st.integers(0, 2**31 - 1), _BATCHES), max_size=4),
    ),
    max_size=3,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    request=st.sampled_from(compat.PRODUCE_REQUESTS),
    transactional_id=st.none() | st.text(max_size=20),
    acks=st.sampled_from([-1, 0, 1]),
    timeout=st.integers(0, 2**31 - 1),
    topics=_TOPICS,
)
def test_a_produce_request_is_written_as_aiokafkas_encoder_writes_it(
    request: type, transactional_id: str | None, acks: int, timeout: int, topics: list
) -> None:
    """Every produce request `install` gives the one-piece encoder is written byte for
    byte as aiokafka's schema writes it: any transactional ID (or none), topics and
    partitions of any number, record batches as bytes, bytearrays or none."""
    compat.install()
    struct = request(transactional_id, acks, timeout, topics)
    assert struct.encode() == struct.SCHEMA.encode([transactional_id, acks, timeout, topics])


def test_the_produce_request_every_broker_is_sent_is_written_in_one_piece() -> None:
    """The newest produce request aiokafka sends, the one a broker of today negotiates, is
    among those written in one piece, and a batch of a megabyte is copied into it whole."""
    compat.install()
    newest = ProduceRequest._CLASSES[-1]
    assert newest in compat.PRODUCE_REQUESTS
    batch = bytes(range(256)) * 4096
    body = newest("jobs-worker", -1, 30_000, [("jobs.status", [(3, batch)])]).encode()
    assert body.endswith(batch)
    assert len(body) == 2 + 11 + 2 + 4 + 4 + 2 + 11 + 4 + 4 + 4 + len(batch)


async def test_a_busy_transaction_coordinator_is_asked_again_after_the_short_backoff() -> None:
    """After `install`, a partition refused with CONCURRENT_TRANSACTIONS at the start of a
    transaction (the coordinator still completing the previous one) is asked for again
    after `TXN_BUSY_BACKOFF_S`, not aiokafka's 20 ms; later in a transaction the producer's
    own backoff still applies."""
    from types import SimpleNamespace

    from aiokafka.errors import ConcurrentTransactions
    from aiokafka.producer.sender import AddPartitionsToTxnHandler
    from aiokafka.producer.transaction_manager import TransactionManager
    from aiokafka.structs import TopicPartition

    compat.install()
    txn = TransactionManager("jobs.orchestrator.0", 60_000)
    txn.set_pid_and_epoch(1, 0)
    sender = SimpleNamespace(_retry_backoff=0.1, _txn_manager=txn)
    handler = AddPartitionsToTxnHandler(sender, [TopicPartition("jobs.status", 0)])
    busy = SimpleNamespace(errors=[("jobs.status", [(0, ConcurrentTransactions.errno)])])
    assert handler.handle_response(busy) == compat.TXN_BUSY_BACKOFF_S < 0.02
    txn.txn_partitions.add(TopicPartition("jobs.state", 0))  # one already added
    assert handler.handle_response(busy) == 0.1


async def test_the_cause_of_a_failed_connection_is_kept() -> None:
    """aiokafka raises "Unable to bootstrap" and logs why; connect_failure says why."""
    import socket

    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaConnectionError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
    with pytest.raises(KafkaConnectionError) as caught:
        await admin.start()
    await admin.close()
    said = compat.connect_failure(caught.value)
    assert said.startswith("no bootstrap server answered (")
    assert "AddressFamily" not in said  # aiokafka's tuples of addresses
    assert "Connect call failed" in said or "refused" in said.lower()  # the logged cause
    assert "JOBS_BOOTSTRAP_SERVERS" in said
    again = compat.connect_failure(caught.value)  # consumed: a stale cause is not reused
    assert "Connect call failed" not in again


async def test_record_batches_keep_each_partitions_order_across_full_batches() -> None:
    """`RecordBatches.add` opens a new record batch when one is full, per topic-partition,
    so every record is kept once and in order; records without headers share one empty list,
    which aiokafka's encoder only reads."""
    producer = AIOKafkaProducer(bootstrap_servers="localhost:9", max_batch_size=600)
    try:
        out = RecordBatches(producer.create_batch)
        for i in range(30):
            headers = [("n", b"%d" % i)] if i % 2 else ()
            out.add("jobs.state", i % 2, b"k%d" % i, b"v" * 100, headers)
        assert out.records == 30
        taken = out.take()
        assert sorted(taken) == [("jobs.state", 0), ("jobs.state", 1)]
        for (_, partition), builders in taken.items():
            assert len(builders) > 1
            read = [
                (r.key, list(r.headers))
                for builder in builders
                for r in MemoryRecords(bytes(builder._build())).next_batch()
            ]
            expected = range(partition, 30, 2)
            assert read == [(b"k%d" % i, [("n", b"%d" % i)] if i % 2 else []) for i in expected]
        assert _NO_HEADERS == []
    finally:
        await producer.stop()


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SSL"])
async def test_a_protocol_the_listener_does_not_speak_is_named(
    kafka_bootstrap: str, protocol: str
) -> None:
    """SASL or TLS against the plaintext listener: the sentence points at the protocol, not
    at the password, and is never empty where the cause is."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaConnectionError

    from worker.kafkaio import connection
    from worker.settings import Settings

    credentials = {"sasl_username": "u", "sasl_password": "p"} if "SASL" in protocol else {}
    s = Settings(bootstrap_servers=kafka_bootstrap, security_protocol=protocol, **credentials)
    admin = AIOKafkaAdminClient(**connection(s), request_timeout_ms=10_000)
    with pytest.raises(KafkaConnectionError) as caught:
        await admin.start()
    await admin.close()
    said = compat.connect_failure(caught.value)
    assert "()" not in said
    assert "JOBS_SECURITY_PROTOCOL" in said
    if protocol == "SASL_PLAINTEXT":
        assert said.startswith("the broker's listener does not speak SASL ("), said
        assert "JOBS_SASL_PASSWORD" not in said
    else:  # cut off (here, a reset with no text) or refused by TLS, by the platform
        assert said.startswith(("no bootstrap server answered (", "TLS failed (")), said


def test_a_fenced_producers_own_future_is_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """A future aiokafka set with a fencing error that nobody awaits (its transaction
    manager's, out of any caller's reach) is not logged at error level once collected; a
    never-retrieved future holding any other error still is."""
    loop = asyncio.new_event_loop()
    try:
        compat.quiet_fenced_futures(loop)
        with caplog.at_level("DEBUG", logger="asyncio"):
            for error in (ProducerFenced(), KafkaTimeoutError()):
                future = loop.create_future()
                future.set_exception(error)
                del future
                gc.collect()
        never = [r for r in caplog.records if "never retrieved" in r.getMessage()]
        assert [(r.levelname, r.exc_info[1].__class__ if r.exc_info else None) for r in never] == [
            ("ERROR", KafkaTimeoutError)
        ]
    finally:
        loop.close()


class Sender:
    """Stands for aiokafka's `Sender`: its produce tasks are named as aiokafka's are."""

    async def _send_produce_req(self) -> None:
        raise KeyError("a record batch the fence already failed")


async def _another_task() -> None:
    raise KeyError("anything else")


def test_a_produce_request_that_outlived_its_sender_is_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A produce task of aiokafka's sender that failed with nobody reading it (its routine,
    which reads them all while it runs, ended with a fence) is not logged at error level
    once collected; any other task failing unread still is."""
    loop = asyncio.new_event_loop()
    try:
        compat.quiet_fenced_futures(loop)
        with caplog.at_level("DEBUG", logger="asyncio"):
            for coro in (Sender()._send_produce_req(), _another_task()):
                task = loop.create_task(coro)
                loop.run_until_complete(asyncio.wait([task]))
                del task
                gc.collect()
        never = [r for r in caplog.records if "never retrieved" in r.getMessage()]
        assert [(r.levelname, "_another_task" in r.getMessage()) for r in never] == [
            ("ERROR", True)
        ]
    finally:
        loop.close()
