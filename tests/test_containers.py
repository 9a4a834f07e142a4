"""Kafka in Docker (testcontainers) and the choice of the test session's broker.

Where a Docker engine answers, one test starts the project on Kafka in a container; where
none does, it is skipped with the reason. The rest runs anywhere: what the container gets,
what is said when Docker or testcontainers is missing, and how the session picks its broker.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas import EventType
from tests import conftest
from tests.conftest import (
    NEEDS_JAVA,
    SESSION_BROKER_CONFIG,
    RunningWorker,
    create_topics,
    session_broker,
)
from worker.client import JobClient
from worker.client.watch import StatusTail
from worker.devtools import containers
from worker.devtools.containers import (
    INSTALL_HINT,
    KafkaInDocker,
    broker_config,
    docker_unavailable,
    environment_name,
)
from worker.settings import Settings

ROOT = Path(__file__).parent.parent
JOBCTL = [sys.executable, "-m", "worker.cli"]


def test_the_container_gets_the_brokers_settings_the_project_needs() -> None:
    """Transactions and offsets on one node, no topics made by reading them, no rebalance
    delay; nothing of the local broker's own addresses or directories."""
    config = broker_config({"group.min.session.timeout.ms": "1000"})
    for key, value in {
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "offsets.topic.replication.factor": "1",
        "auto.create.topics.enable": "false",
        "group.initial.rebalance.delay.ms": "0",
        "group.min.session.timeout.ms": "1000",
    }.items():
        assert config[key] == value, key
    for key in ("listeners", "advertised.listeners", "log.dirs", "node.id", "process.roles"):
        assert key not in config


def test_property_names_become_the_images_environment_variables() -> None:
    """Confluent's images read `KAFKA_` variables: `.` is `_`, `_` is `__`, `-` is `___`."""
    assert environment_name("transaction.state.log.min.isr") == (
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"
    )
    assert environment_name("a_b-c.d") == "KAFKA_A__B___C_D"


def _pretend(monkeypatch: pytest.MonkeyPatch, modules: dict[str, types.ModuleType]) -> None:
    def fake_import(name: str) -> types.ModuleType:
        if name not in modules:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return modules[name]

    monkeypatch.setattr(containers, "_import", fake_import)


def test_without_testcontainers_the_reason_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _pretend(monkeypatch, {})
    reason = docker_unavailable()
    assert reason is not None
    assert INSTALL_HINT in reason
    assert "\n" not in reason


def test_without_an_engine_the_reason_is_the_failed_ping(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python packages alone prove nothing: the engine must answer a ping."""

    class Client:
        closed = False

        def ping(self) -> bool:
            raise ConnectionError("Error while fetching server API version\nmore detail")

        def close(self) -> None:
            Client.closed = True

    docker = types.ModuleType("docker")
    docker.from_env = lambda timeout: Client()  # type: ignore[attr-defined]
    kafka = types.ModuleType("testcontainers.community.kafka")
    _pretend(monkeypatch, {"docker": docker, "testcontainers.community.kafka": kafka})
    assert docker_unavailable() == (
        "no Docker engine answers (Error while fetching server API version)"
    )
    assert Client.closed
    docker.from_env = lambda timeout: types.SimpleNamespace(  # type: ignore[attr-defined]
        ping=lambda: True, close=lambda: None
    )
    assert docker_unavailable() is None


def _no_engine(tmp_path: Path, **env: str) -> dict[str, str]:
    """The environment with a Docker host that cannot answer, without JOBS_ settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("JOBS_")}
    return {**base, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock", **env}


def _one_line_why(stderr: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert INSTALL_HINT in lines[0] or "no Docker engine answers" in lines[0], stderr


def test_demo_docker_without_an_engine_says_why_in_one_line(tmp_path: Path) -> None:
    """`jobctl demo --docker` wins over JOBS_BOOTSTRAP_SERVERS, and without an engine (or
    testcontainers) exits 1 with one line saying so."""
    env = _no_engine(tmp_path, JOBS_BOOTSTRAP_SERVERS="127.0.0.1:1")
    result = subprocess.run(
        [*JOBCTL, "demo", "--docker"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 1, result.stdout + result.stderr
    _one_line_why(result.stderr)
    both = subprocess.run(
        [*JOBCTL, "demo", "--docker", "--bootstrap", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert both.returncode == 2  # a usage error
    assert "not both" in both.stderr


def _collect(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """pytest collecting one small test file under `env`: runs the session's set-up only."""
    collect = ["--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_codec.py"]
    return subprocess.run(
        [sys.executable, "-m", "pytest", *collect],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def test_the_session_asked_for_docker_without_an_engine_stops_at_once(tmp_path: Path) -> None:
    """JOBS_TEST_BROKER=docker without an engine: pytest stops before any test, one line."""
    docker = _collect(_no_engine(tmp_path, JOBS_TEST_BROKER="docker"))
    assert docker.returncode == pytest.ExitCode.USAGE_ERROR, docker.stdout + docker.stderr
    assert "JOBS_TEST_BROKER=docker, but " in docker.stderr
    _one_line_why(docker.stderr.split("JOBS_TEST_BROKER=docker, but ", 1)[1])


def test_the_sessions_broker_is_chosen_by_the_environment(
    monkeypatch: pytest.MonkeyPatch, pytestconfig: pytest.Config
) -> None:
    """JOBS_BOOTSTRAP_SERVERS wins (no Docker asked for); else JOBS_TEST_BROKER, `jars` by
    default; another value is a usage error."""
    _pretend(monkeypatch, {})  # no testcontainers: asking for Docker fails
    monkeypatch.setenv("JOBS_TEST_BROKER", "docker")
    monkeypatch.setenv("JOBS_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    assert session_broker() == "external"
    conftest.pytest_configure(pytestconfig)
    monkeypatch.delenv("JOBS_BOOTSTRAP_SERVERS")
    assert session_broker() == "docker"
    with pytest.raises(pytest.UsageError, match=r"JOBS_TEST_BROKER=docker, but testcontainers"):
        conftest.pytest_configure(pytestconfig)
    monkeypatch.setenv("JOBS_TEST_BROKER", "podman")
    with pytest.raises(pytest.UsageError, match="'podman': use one of jars, docker"):
        session_broker()
    monkeypatch.delenv("JOBS_TEST_BROKER")
    assert session_broker() == "jars"


_OWN_BROKER_TESTS = """
import asyncio

from worker.devtools.localkafka import LocalKafka


def test_own_broker_in_a_fixture():
    LocalKafka().start().stop()


async def test_own_broker_from_async_code():
    broker = LocalKafka()
    await asyncio.to_thread(broker.start)
    broker.stop()
"""


def _without_java(tmp_path: Path, args: list[str], **env: str) -> str:
    """Run pytest on `args` with a PATH holding neither java nor mvn; its output."""
    empty = tmp_path / "bin"
    empty.mkdir(exist_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("JOBS_")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args],
        capture_output=True,
        text=True,
        env={**base, "PATH": str(empty), **env},
        cwd=ROOT,
        timeout=120,
    )
    return result.stdout + result.stderr


def test_tests_with_a_broker_of_their_own_skip_without_java_on_a_given_broker(
    tmp_path: Path,
) -> None:
    """With JOBS_BOOTSTRAP_SERVERS set the session needs no Java: a test that starts a
    LocalKafka (in a fixture, or from async code in a thread) is skipped, saying why.
    With the session's broker from the jars, the same tests fail."""
    tests = tmp_path / "test_own_broker.py"
    tests.write_text(_OWN_BROKER_TESTS)
    # The project's conftest as a plugin, for a test file outside tests/.
    own = ["-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT), "-p", "tests.conftest"]
    given = _without_java(tmp_path, [*own, str(tests)], JOBS_BOOTSTRAP_SERVERS="127.0.0.1:1")
    assert "2 skipped" in given, given
    assert "`java` is not on PATH" in given, given
    jars = _without_java(tmp_path, [*own, str(tests)])
    assert "2 failed" in jars, jars
    assert "`java` was not found" in jars, jars


def test_the_tests_that_run_java_themselves_are_named_right() -> None:
    """NEEDS_JAVA (skipped like the above) names tests that exist."""
    for nodeid in NEEDS_JAVA:
        path, name = nodeid.split("::")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert callable(getattr(module, name, None)), nodeid


@pytest.fixture(scope="module")
def docker_kafka() -> Iterator[str]:
    """Kafka in a container: the session's, when it is one, else one for this module."""
    reason = docker_unavailable()
    if reason is not None:
        pytest.skip(reason)
    if session_broker() == "docker":
        yield ""  # the test takes the session's broker
        return
    with KafkaInDocker(extra_config=SESSION_BROKER_CONFIG) as kafka:
        yield kafka.bootstrap_servers


@pytest.mark.kafka
async def test_the_project_runs_on_kafka_in_docker(
    docker_kafka: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """On the container's broker the topics are made (LogAppendTime checked), the worker
    commits transactions, and a start is decided and seen read_committed."""
    bootstrap = docker_kafka or request.getfixturevalue("kafka_bootstrap")
    settings = Settings(
        bootstrap_servers=bootstrap,
        topic_prefix="docker",
        db_path=tmp_path / "worker.db",
        poll_timeout_ms=100,
        http_port=0,
    )
    await create_topics(settings, 2)
    running = await RunningWorker(settings).start()
    tail = StatusTail(bootstrap, settings.topics)
    await tail.start()
    try:
        async with JobClient(settings) as jobs:
            decision = await jobs.start_job("report.daily")
        assert decision.started
        event = await tail.wait_event(run_id=decision.run_id, type=EventType.STARTED)
        assert event.job_type == "report.daily"
    finally:
        await tail.stop()
        await running.stop()
