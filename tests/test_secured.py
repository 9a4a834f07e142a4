"""The worker, its clients and the CLI on a secured broker (SCRAM, ACLs, TLS).

One broker with SASL_PLAINTEXT and SASL_SSL listeners, KRaft's StandardAuthorizer and a user
per role; the ACLs are those `jobctl acls --apply` creates. What the broker refuses is the
point: only the orchestrator's principal can write the status and state topics.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import ProducerFenced, TopicAuthorizationFailedError
from pydantic import SecretStr

from schemas import EventType, StatusEvent
from tests.chaos import WorkerProcess
from tests.conftest import RunningWorker, create_topics
from worker import compat
from worker.client import Executor, JobClient, JobConnectionError, RunContext
from worker.client.watch import StatusTail
from worker.devtools.localkafka import LocalKafka
from worker.kafkaio import connection
from worker.settings import Settings

pytestmark = pytest.mark.kafka

JOBCTL = [sys.executable, "-m", "worker.cli"]
ROLES = ["--orchestrator", "User:o", "--producer", "User:p", "--executor", "User:e"]


@pytest.fixture(scope="module")
def broker() -> Iterator[LocalKafka]:
    """A secured broker for this module's tests."""
    kafka = LocalKafka(secure=True).start()
    yield kafka
    kafka.stop()


def as_role(broker: LocalKafka, role: str, prefix: str, tmp: Path, **extra: Any) -> Settings:
    """Settings that connect as `role` (SASL_PLAINTEXT, SCRAM-SHA-512)."""
    return Settings(
        **broker.connection_settings(role),
        topic_prefix=prefix,
        db_path=tmp / f"{role}.db",
        http_port=0,
        poll_timeout_ms=100,
        **extra,
    )


def env_of(settings: Settings) -> dict[str, str]:
    """`settings`' connection as JOBS_* environment variables."""
    password = settings.password()
    assert password is not None
    return {
        **os.environ,
        "JOBS_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "JOBS_TOPIC_PREFIX": settings.topic_prefix,
        "JOBS_SECURITY_PROTOCOL": settings.security_protocol,
        "JOBS_SASL_MECHANISM": settings.sasl_mechanism,
        "JOBS_SASL_USERNAME": settings.sasl_username or "",
        "JOBS_SASL_PASSWORD": password,
    }


@pytest.fixture
async def secured(broker: LocalKafka, tmp_path: Path) -> dict[str, Settings]:
    """Fresh topics and the role ACLs (applied with `jobctl acls --apply` as admin)."""
    prefix = f"sec-{uuid.uuid4().hex[:8]}"
    roles = {
        role: as_role(broker, role, prefix, tmp_path)
        for role in ("admin", "orchestrator", "producer", "executor", "reader")
    }
    await create_topics(roles["admin"], 2)
    principals = [f"--{r}=User:{r}" for r in ("orchestrator", "producer", "executor", "reader")]
    applied = await asyncio.to_thread(
        subprocess.run,
        [*JOBCTL, "acls", *principals, "--apply"],
        env=env_of(roles["admin"]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert applied.returncode == 0, applied.stderr
    assert roles["admin"].password() not in applied.stdout + applied.stderr
    return roles


async def test_the_worker_runs_end_to_end_under_its_acls(
    secured: dict[str, Settings], tmp_path: Path
) -> None:
    """Exactly-once worker as `orchestrator`, a producer's client, an executor, a reader's
    tail: a run starts, is executed and completes; the reader sees every event."""
    worker = await RunningWorker(secured["orchestrator"]).start()
    try:
        async with (
            JobClient(secured["producer"]) as producer,
            JobClient(secured["executor"]) as executor_client,
            StatusTail(
                connection(secured["reader"]), secured["reader"].topics, dead_letters=False
            ) as tail,
        ):
            executor = Executor(executor_client)

            @executor.job("report")
            async def report(run: RunContext) -> dict[str, int]:
                return {"rows": 7}

            stop = asyncio.Event()
            running = asyncio.create_task(executor.run(stop))
            try:
                await asyncio.wait_for(executor.ready.wait(), 60)
                decision = await producer.start_job("report")
                assert decision.started
                done = await tail.wait_event(run_id=decision.run_id, type=EventType.COMPLETED)
                assert done.metrics == {"rows": 7}
                assert not await producer.is_job_running("report")
            finally:
                stop.set()
                await asyncio.wait_for(running, 60)
    finally:
        await worker.stop()
    # The audit tools under the same rules: verify as admin (it reads the inputs too),
    # replay as the reader, whose rights cover the decision log only.
    verified = await _jobctl(secured["admin"], "verify")
    assert verified.returncode == 0, verified.stderr
    assert "0 divergences" in verified.stdout
    replayed = await _jobctl(secured["reader"], "replay", "--db", str(tmp_path / "replayed.db"))
    assert replayed.returncode == 0, replayed.stderr


async def _jobctl(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [*JOBCTL, *args],
        env=env_of(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_only_the_orchestrator_can_write_runs(secured: dict[str, Settings]) -> None:
    """A producer writing status or state, an executor writing requests: the broker refuses;
    a reader sees nothing of the attempts."""
    topics = secured["admin"].topics
    forged = b'{"event_id":"forged","type":"started","job_type":"x","run_id":"x"}'
    attempts = [
        ("producer", topics.status),
        ("producer", topics.state),
        ("executor", topics.requests),
        ("executor", topics.status),
        ("reader", topics.status),
    ]
    refused = []
    for role, topic in attempts:
        producer = AIOKafkaProducer(**connection(secured[role]))
        await producer.start()
        try:
            with pytest.raises(TopicAuthorizationFailedError):
                await producer.send_and_wait(topic, forged, key=b"x")
            refused.append((role, topic))
        finally:
            await producer.stop()
    assert refused == attempts
    marker = StatusEvent(
        event_id="marker", type=EventType.PROGRESS, job_type="x", occurred_at=datetime.now(UTC)
    )
    admin_producer = AIOKafkaProducer(**connection(secured["admin"]))
    await admin_producer.start()
    try:  # written after the attempts: once the reader has it, it has read past them
        await admin_producer.send_and_wait(topics.status, marker.model_dump_json().encode())
    finally:
        await admin_producer.stop()
    async with StatusTail(connection(secured["reader"]), topics, dead_letters=False) as tail:
        await tail.wait_event(event_id="marker")
        assert [e.event_id for e in tail.events] == ["marker"]


async def test_the_orchestrator_can_abort_what_a_gone_worker_left_open(
    secured: dict[str, Settings],
) -> None:
    """Under its ACLs, the orchestrator sees a transaction another of its group's producers
    left open on a partition, with the partition, and aborts it by starting a producer with
    its ID (what a worker taking the partition does); the producer side is fenced. The
    reader, whose rights cover no transactional ID, sees none."""
    orchestrator = secured["orchestrator"]
    kafka = connection(orchestrator)
    status = TopicPartition(orchestrator.topics.status, 0)
    gone = f"{orchestrator.group_id}.worker.gone"
    left = AIOKafkaProducer(**kafka, transactional_id=gone)
    looker = AIOKafkaConsumer(**kafka)
    outsider = AIOKafkaConsumer(**connection(secured["reader"]))
    for client in (left, looker, outsider):
        await client.start()
    try:
        await left.begin_transaction()
        await left.send_and_wait(status.topic, b"left open", key=b"x", partition=0)
        prefix = f"{orchestrator.group_id}."
        assert await compat.open_transactions(looker, prefix) == {gone: frozenset({status})}
        assert await compat.open_transactions(outsider, prefix) == {}
        heir = AIOKafkaProducer(**kafka, transactional_id=gone)
        await heir.start()
        await heir.stop()
        assert await compat.open_transactions(looker, prefix) == {}
        with pytest.raises(ProducerFenced):
            await left.commit_transaction()
    finally:
        for client in (left, looker, outsider):
            await client.stop()


async def test_a_wrong_password_is_one_clear_error(
    broker: LocalKafka, secured: dict[str, Settings], tmp_path: Path
) -> None:
    """The client says authentication failed, within seconds; the worker exits with one line
    that does not contain the password."""
    wrong = secured["producer"].model_copy(update={"sasl_password": SecretStr("not-the-password")})
    began = time.monotonic()
    with pytest.raises(JobConnectionError, match="authentication failed"):
        async with JobClient(wrong):
            pass
    assert time.monotonic() - began < 10
    env = {**env_of(wrong), "JOBS_DB_PATH": str(tmp_path / "w.db"), "JOBS_HTTP_PORT": "0"}
    done = await asyncio.to_thread(
        subprocess.run, [*JOBCTL, "run"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "authentication failed" in last
    assert "not-the-password" not in done.stderr + done.stdout


async def test_a_principal_that_may_not_see_the_group_is_told_so(
    secured: dict[str, Settings],
) -> None:
    """The producer's principal may not describe the orchestrator's group (the ACLs give
    that to the orchestrator): `submit` says in one line that whether a worker runs could
    not be checked, and why, instead of nothing; `status` says nothing of it."""
    producer = secured["producer"]
    env = env_of(producer)
    submitted = await asyncio.to_thread(
        subprocess.run,
        [*JOBCTL, "submit", "acl.job", "--timeout", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submitted.returncode == 4, submitted.stderr
    first, *_ = submitted.stderr.splitlines()
    assert first == (
        f"warning: whether a worker is running for prefix {producer.topic_prefix!r} could "
        f"not be checked: not authorized to describe the consumer group {producer.group_id}"
    )
    assert "no worker is running" not in submitted.stderr
    assert producer.password() not in submitted.stderr + submitted.stdout
    reader = secured["reader"]
    status = await asyncio.to_thread(
        subprocess.run,
        [*JOBCTL, "status"],
        env=env_of(reader),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert status.stderr == ""


async def test_a_client_over_sasl_ssl(broker: LocalKafka, secured: dict[str, Settings]) -> None:
    """The producer role over TLS (the broker's CA from JOBS_SSL_CAFILE) starts a run."""
    worker = await RunningWorker(secured["orchestrator"]).start()
    try:
        tls = Settings(
            **broker.connection_settings("producer", tls=True),
            topic_prefix=secured["producer"].topic_prefix,
        )
        assert tls.security_protocol == "SASL_SSL"
        async with JobClient(tls) as jobs:
            decision = await jobs.start_job("tls.job")
            assert decision.started
            assert await jobs.is_job_running("tls.job")
    finally:
        await worker.stop()


async def test_the_password_never_reaches_the_worker_s_log(
    secured: dict[str, Settings], tmp_path: Path
) -> None:
    """`jobctl run` as the orchestrator at debug level: started, stopped, and its whole
    output does not contain the password."""
    settings = secured["orchestrator"]
    password = settings.password()
    assert password is not None
    worker = WorkerProcess(
        settings,
        "worker",
        tmp_path,
        log_level="debug",
        security_protocol=settings.security_protocol,
        sasl_mechanism=settings.sasl_mechanism,
        sasl_username=settings.sasl_username or "",
        sasl_password=password,
    )
    log_path = worker.log_path
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while "partitions assigned" not in worker.log_text():
            assert worker.alive(), worker.log_text()[-3000:]
            assert time.monotonic() < deadline, "the worker did not take its partitions"
            await asyncio.sleep(0.1)  # polls another process's log: nothing to await
        assert await worker.terminate() == 0
    finally:
        worker.ensure_dead()
    assert password not in log_path.read_text(errors="replace")


async def test_an_untrusted_tls_endpoint_is_one_line(broker: LocalKafka) -> None:
    """SASL_SSL without the broker's CA: the command stops at once, naming TLS."""
    settings = broker.connection_settings("reader", tls=True)
    settings.pop("ssl_cafile", None)
    env = {**os.environ, **{f"JOBS_{k.upper()}": str(v) for k, v in settings.items()}}
    began = time.monotonic()
    done = await asyncio.to_thread(
        subprocess.run, [*JOBCTL, "status"], env=env, capture_output=True, text=True, timeout=60
    )
    assert time.monotonic() - began < 30
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "TLS failed" in lines[0]


def test_acls_apply_with_a_wrong_password_is_one_line(broker: LocalKafka, tmp_path: Path) -> None:
    """`jobctl acls --apply` (librdkafka's admin client) refused a login as every other
    command is: one line that says what to check, none of librdkafka's own log lines, and
    not the password."""
    admin = as_role(broker, "admin", "acl-pw", tmp_path)
    env = {**env_of(admin), "JOBS_SASL_PASSWORD": "not-the-password-of-admin"}
    done = subprocess.run(
        [*JOBCTL, "acls", *ROLES, "--apply"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith("error: cannot connect to Kafka: authentication failed ("), line
    assert "check JOBS_SASL_USERNAME, JOBS_SASL_PASSWORD and JOBS_SASL_MECHANISM" in line
    assert "not-the-password-of-admin" not in done.stdout + done.stderr
