"""The local broker: its helpers, crashing and hanging it under connected clients, and its
secured mode (SCRAM users, TLS, ACLs)."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError
from aiokafka.helpers import create_ssl_context

from worker.devtools import localkafka
from worker.devtools.localkafka import LocalKafka, LocalKafkaError
from worker.kafkaio import connection
from worker.settings import Settings

TOPIC = "faults"


def test_local_cluster_ids_never_start_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kafka-storage format -t -xyz` would read the ID as an option: such IDs are redrawn."""
    drawn = iter([uuid.UUID(bytes=b"\xf8" + b"\x00" * 15), uuid.UUID(bytes=b"\x00" * 16)])
    monkeypatch.setattr(localkafka.uuid, "uuid4", lambda: next(drawn))
    assert localkafka._cluster_id() == "AAAAAAAAAAAAAAAAAAAAAA"


async def test_start_says_how_to_call_it_from_async_code() -> None:
    """start() blocks and runs its own event loop: inside one it refuses, saying what to do."""
    with pytest.raises(LocalKafkaError, match="to_thread"):
        LocalKafka().start()


def test_faults_need_a_running_broker() -> None:
    """Freezing a broker never started is an error; killing it is nothing to do."""
    kafka = LocalKafka()
    with pytest.raises(LocalKafkaError, match="not running"):
        kafka.freeze()
    with pytest.raises(LocalKafkaError, match="not running"):
        kafka.thaw()
    kafka.kill()
    assert not kafka.running


async def _create_topic(bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()


async def _produce(producer: AIOKafkaProducer, label: str, count: int) -> list[bytes]:
    """Send `count` records and wait for every acknowledgement (acks=all)."""
    values = [f"{label}-{i}".encode() for i in range(count)]
    sends = [await producer.send(TOPIC, value) for value in values]
    await asyncio.wait_for(asyncio.gather(*sends), 30)
    return values


async def _acknowledged(sends: list[asyncio.Future[object]], values: list[bytes]) -> list[bytes]:
    """The values whose send was acknowledged, once every send has succeeded or failed."""
    await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), 60)
    return [value for send, value in zip(sends, values, strict=True) if send.exception() is None]


async def _read_back(bootstrap: str, wanted: set[bytes]) -> set[bytes]:
    """Every value of the topic from the start, read until `wanted` is seen or 30 s pass."""
    consumer = AIOKafkaConsumer(
        TOPIC, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    seen: set[bytes] = set()
    deadline = time.monotonic() + 30
    try:
        while not wanted <= seen and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            seen.update(r.value for records in batches.values() for r in records)
    finally:
        await consumer.stop()
    return seen


def _idle_connection(port: int) -> socket.socket:
    """A connection the broker has accepted and read to the end: one ApiVersions v0 answered."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        request = struct.pack(">hhih", 18, 0, 1, -1)  # ApiVersions v0, correlation 1, no client
        conn.sendall(struct.pack(">i", len(request)) + request)
        header = conn.recv(4, socket.MSG_WAITALL)
        (size,) = struct.unpack(">i", header)
        assert len(conn.recv(size, socket.MSG_WAITALL)) == size
    except BaseException:
        conn.close()
        raise
    return conn


def _time_wait_on(port: int) -> bool:
    """Whether a TCP connection with local port `port` is in TIME_WAIT (the JVM uses tcp6)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "06":
                return True
    return False


async def _until(condition: Callable[[], bool], timeout: float, failure: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        await asyncio.sleep(0.05)


async def _in_a_passing_thread(call: Callable[[], object]) -> None:
    """Run `call` on a thread that ends right after: a broker it starts must outlive it."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        await asyncio.get_running_loop().run_in_executor(pool, call)


@contextlib.contextmanager
def _log_tail_on_failure(kafka: LocalKafka) -> Iterator[None]:
    """Print the broker's log tail if the test fails: pytest shows it with the failure."""
    try:
        yield
    except BaseException:
        if kafka.data_dir is not None and kafka.data_dir.exists():
            print(kafka._log_tail(60))
        raise


async def _with_producer(
    bootstrap: str, body: Callable[[AIOKafkaProducer], Awaitable[None]]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await body(producer)
    finally:
        await producer.stop()


@pytest.mark.kafka
async def test_a_killed_broker_restarts_with_every_acknowledged_record(tmp_path: Path) -> None:
    """SIGKILL under a connected producer with records in flight, then start() again: the
    same address and cluster, and every record acknowledged (acks=all) is read back."""
    kafka = LocalKafka(data_dir=tmp_path / "kafka")
    await asyncio.to_thread(kafka.start)
    acked: list[bytes] = []

    async def crash_and_restart(producer: AIOKafkaProducer) -> None:
        address = (kafka.bootstrap_servers, kafka.controller_port, kafka.cluster_id)
        acked.extend(await _produce(producer, "before", 50))
        in_flight = [f"during-{i}".encode() for i in range(50)]
        with await asyncio.to_thread(_idle_connection, kafka.port) as idle:
            sends = [await producer.send(TOPIC, value) for value in in_flight]
            await asyncio.to_thread(kafka.kill)
            assert not kafka.running
            assert not localkafka._port_open(kafka.port)
            # The dead broker closed first; closing our end after leaves the broker's end in
            # TIME_WAIT on its port, which the restart must bind all the same. (Connections
            # with requests unread, like the producer's, are reset instead: no TIME_WAIT.)
            assert await asyncio.to_thread(idle.recv, 1) == b""
        await _until(lambda: _time_wait_on(kafka.port), 5, "no TIME_WAIT on the broker port")
        with socket.socket() as naive, pytest.raises(OSError, match="in use"):  # no SO_REUSEADDR
            naive.bind(("127.0.0.1", kafka.port))
        await _in_a_passing_thread(kafka.start)
        assert (kafka.bootstrap_servers, kafka.controller_port, kafka.cluster_id) == address
        acked.extend(await _produce(producer, "after", 50))
        acked.extend(await _acknowledged(sends, in_flight))

    try:
        with _log_tail_on_failure(kafka):
            await _create_topic(kafka.bootstrap_servers)
            await _with_producer(kafka.bootstrap_servers, crash_and_restart)
            assert set(acked) - await _read_back(kafka.bootstrap_servers, set(acked)) == set()
            assert kafka.running, "the broker died with the thread that restarted it"
    finally:
        await asyncio.to_thread(kafka.stop)
    assert (tmp_path / "kafka" / "data" / "meta.properties").exists()  # a given dir is kept


@pytest.mark.kafka
async def test_a_frozen_broker_answers_nothing_until_thawed() -> None:
    """SIGSTOP: connections are still accepted but a produce times out; after SIGCONT the
    held produce and new ones are acknowledged. restart() then keeps the address."""
    kafka = LocalKafka()
    await asyncio.to_thread(kafka.start)
    data_dir = kafka.data_dir

    async def freeze_and_thaw(producer: AIOKafkaProducer) -> None:
        await producer.send_and_wait(TOPIC, b"warm")
        await asyncio.to_thread(kafka.freeze)
        assert kafka.frozen
        assert kafka.running
        assert localkafka._port_open(kafka.port)  # the kernel still accepts connections
        held = await producer.send(TOPIC, b"held")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(held), 3)
        await asyncio.to_thread(kafka.thaw)
        assert not kafka.frozen
        await asyncio.wait_for(producer.send_and_wait(TOPIC, b"thawed"), 30)
        await asyncio.wait_for(held, 30)

    try:
        with _log_tail_on_failure(kafka):
            await _create_topic(kafka.bootstrap_servers)
            await _with_producer(kafka.bootstrap_servers, freeze_and_thaw)
            address = kafka.bootstrap_servers
            await asyncio.to_thread(kafka.restart)
            assert kafka.bootstrap_servers == address
            wanted = {b"warm", b"held", b"thawed"}
            assert await _read_back(kafka.bootstrap_servers, wanted) == wanted
    finally:
        await asyncio.to_thread(kafka.stop)
    assert data_dir is not None
    assert not data_dir.exists()  # a temporary dir is removed on stop


# A secured broker: SCRAM-SHA-512 users, TLS, ACLs.


def _client(
    kafka: LocalKafka, role: str = "admin", *, tls: bool = False, **changes: str
) -> dict[str, Any]:
    """aiokafka's arguments to connect as `role`, built as the project builds them."""
    return connection(Settings(**{**kafka.connection_settings(role, tls=tls), **changes}))


async def _create(client: dict[str, Any], topic: str) -> None:
    admin = AIOKafkaAdminClient(**client)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()


async def _visible_topics(client: dict[str, Any]) -> list[str]:
    admin = AIOKafkaAdminClient(**client)
    await admin.start()
    try:
        return list(await admin.list_topics())
    finally:
        await admin.close()


async def _read(client: dict[str, Any], topic: str, count: int) -> list[bytes]:
    """The first `count` committed values of `topic`, within 30 s."""
    consumer = AIOKafkaConsumer(
        topic,
        auto_offset_reset="earliest",
        group_id=None,
        isolation_level="read_committed",
        **client,
    )
    await consumer.start()
    values: list[bytes] = []
    deadline = time.monotonic() + 30
    try:
        while len(values) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            values.extend(r.value for records in batches.values() for r in records)
    finally:
        await consumer.stop()
    return values


@pytest.fixture(scope="module")
def secured() -> Iterator[LocalKafka]:
    """One secured broker for the tests that do not crash it."""
    with LocalKafka(secure=True) as kafka:
        yield kafka


def test_security_needs_a_secured_started_broker(tmp_path: Path) -> None:
    """A plain broker has no users, CA or TLS port; a secured one has them once started. A
    log formatted without security has no users: a secured start on it is refused."""
    plain = LocalKafka()
    with pytest.raises(LocalKafkaError, match="secure=True"):
        _ = plain.cafile
    assert plain.connection_settings() == {"bootstrap_servers": plain.bootstrap_servers}
    with pytest.raises(LocalKafkaError, match="start"):
        _ = LocalKafka(secure=True).credentials
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.properties").write_text("cluster.id=abc\n")
    with pytest.raises(LocalKafkaError, match="without secure=True"):
        localkafka.BrokerSecurity.open(tmp_path)


@pytest.mark.kafka
async def test_the_secured_admin_creates_topics_and_commits_transactions(
    secured: LocalKafka,
) -> None:
    """`admin` (a super user) creates a topic and commits a transaction on it: the broker's
    own connections for transaction markers log in with SCRAM too."""
    topic = f"admin-{uuid.uuid4().hex[:8]}"
    with _log_tail_on_failure(secured):
        assert set(secured.credentials) == set(localkafka.ROLES)
        assert len(set(secured.credentials.values())) == len(localkafka.ROLES)  # random each
        await _create(_client(secured), topic)
        producer = AIOKafkaProducer(transactional_id=f"tx-{topic}", **_client(secured))
        await producer.start()
        try:
            async with producer.transaction():
                await producer.send(topic, b"committed")
        finally:
            await producer.stop()
        assert await _read(_client(secured), topic, 1) == [b"committed"]


@pytest.mark.kafka
async def test_a_user_without_acls_sees_and_writes_nothing(secured: LocalKafka) -> None:
    """With no ACL for it, a logged-in user sees no topic and may not produce to one."""
    topic = f"guarded-{uuid.uuid4().hex[:8]}"
    with _log_tail_on_failure(secured):
        await _create(_client(secured), topic)
        assert topic in await _visible_topics(_client(secured))
        assert await _visible_topics(_client(secured, "producer")) == []
        producer = AIOKafkaProducer(**_client(secured, "producer"))
        await producer.start()
        try:
            with pytest.raises(TopicAuthorizationFailedError):
                await asyncio.wait_for(producer.send_and_wait(topic, b"refused"), 20)
        finally:
            await producer.stop()


@pytest.mark.kafka
async def test_a_wrong_password_fails_start_at_once(
    secured: LocalKafka, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong password fails start() within a second, as KafkaConnectionError ("Unable to
    bootstrap"): aiokafka only logs the broker's SaslAuthenticationFailed."""
    producer = AIOKafkaProducer(**_client(secured, "reader", sasl_password="wrong"))
    began = time.monotonic()
    try:
        with pytest.raises(KafkaConnectionError, match="Unable to bootstrap"):
            await producer.start()
    finally:
        await producer.stop()
    assert time.monotonic() - began < 5
    assert "SaslAuthenticationFailed" in caplog.text
    assert "invalid credentials" in caplog.text
    # The right one gets in.
    assert await _visible_topics(_client(secured, "reader")) == []


@pytest.mark.kafka
async def test_sasl_ssl_is_verified_with_the_brokers_ca(
    secured: LocalKafka, caplog: pytest.LogCaptureFixture
) -> None:
    """Over SASL_SSL, a client trusting the broker's CA file (and checking that the
    certificate names 127.0.0.1) produces and reads; one trusting only the system's CAs
    is refused."""
    topic = f"tls-{uuid.uuid4().hex[:8]}"
    tls = _client(secured, tls=True)
    assert tls["bootstrap_servers"] == secured.ssl_bootstrap_servers != secured.bootstrap_servers
    assert secured.cafile.read_text().startswith("-----BEGIN CERTIFICATE-----")
    with _log_tail_on_failure(secured):
        await _create(tls, topic)
        producer = AIOKafkaProducer(**tls)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"over tls")
        finally:
            await producer.stop()
        assert await _read(tls, topic, 1) == [b"over tls"]
        untrusting = AIOKafkaProducer(**{**tls, "ssl_context": create_ssl_context()})
        try:
            with pytest.raises(KafkaConnectionError):
                await untrusting.start()
        finally:
            await untrusting.stop()
        assert "CERTIFICATE_VERIFY_FAILED" in caplog.text


@pytest.mark.kafka
async def test_a_killed_secured_broker_restarts_with_its_users(tmp_path: Path) -> None:
    """kill() then start(): the same ports, users, passwords and CA, and the records."""
    kafka = LocalKafka(secure=True, data_dir=tmp_path / "kafka")
    await asyncio.to_thread(kafka.start)
    topic = "kept"
    try:
        with _log_tail_on_failure(kafka):
            await _create(_client(kafka), topic)
            producer = AIOKafkaProducer(acks="all", **_client(kafka))
            await producer.start()
            try:
                await producer.send_and_wait(topic, b"before the crash")
            finally:
                await producer.stop()
            before = (kafka.port, kafka.ssl_port, kafka.credentials, kafka.cafile.read_bytes())
            await asyncio.to_thread(kafka.kill)
            assert not localkafka._port_open(kafka.ssl_port)
            await _in_a_passing_thread(kafka.start)
            after = (kafka.port, kafka.ssl_port, kafka.credentials, kafka.cafile.read_bytes())
            assert after == before
            assert await _read(_client(kafka, tls=True), topic, 1) == [b"before the crash"]
            assert await _visible_topics(_client(kafka, "executor")) == []
    finally:
        await asyncio.to_thread(kafka.stop)
    # Kept with the data dir, for a later LocalKafka on it.
    saved = localkafka.BrokerSecurity.open(tmp_path / "kafka")
    assert saved.credentials == before[2]
    assert (tmp_path / "kafka" / "security" / "credentials.json").stat().st_mode & 0o077 == 0


@pytest.mark.kafka
def test_jobctl_broker_secure_prints_a_login_per_role(monkeypatch: pytest.MonkeyPatch) -> None:
    """`jobctl broker --secure` prints its address first, then for each role the `export`
    line of the settings that log in as it, over SASL_PLAINTEXT and over SASL_SSL; as
    printed, they connect."""
    with subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "broker", "--secure"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal
    ) as proc:
        try:
            assert proc.stdout is not None
            lines = _lines_until(proc.stdout, "Ctrl-C stops it.")
            address = next(line for line in lines if line.startswith("127.0.0.1:"))
            exports = [shlex.split(x) for x in lines if x.startswith("export JOBS_")]
            logins = [dict(w.split("=", 1) for w in words[1:]) for words in exports]
            assert [(e["JOBS_SASL_USERNAME"], e["JOBS_SECURITY_PROTOCOL"]) for e in logins] == [
                (role, protocol)
                for role in localkafka.ROLES
                for protocol in ("SASL_PLAINTEXT", "SASL_SSL")
            ]
            assert logins[0]["JOBS_BOOTSTRAP_SERVERS"] == address
            for name, value in logins[1].items():  # admin over SASL_SSL
                monkeypatch.setenv(name, value)
            assert Path(logins[1]["JOBS_SSL_CAFILE"]).exists()
            asyncio.run(_create(connection(Settings()), "printed"))
            assert "printed" in asyncio.run(_visible_topics(connection(Settings())))
            proc.send_signal(signal.SIGINT)
            out, errors = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"{out}\n{errors}"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _lines_until(stream: IO[str], last: str) -> list[str]:
    """The lines of `stream` up to the one that is `last`; fails if it ends before."""
    lines = []
    for line in stream:
        lines.append(line.strip())
        if line.strip() == last:
            return lines
    raise AssertionError("the output ended early:\n" + "\n".join(lines))
