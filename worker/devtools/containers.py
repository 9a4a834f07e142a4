"""A single-node Kafka in a Docker container, with testcontainers, where a Docker engine answers.

The alternative to `localkafka` for machines with Docker and without Java: the test session
(`JOBS_TEST_BROKER=docker`) and `jobctl demo --docker` start it. It runs KRaft (broker and
controller in one node) from a pinned image, with the broker settings the project needs on
one node, taken from `localkafka`'s own: transactions and consumer offsets on replication
factor 1, no automatic topic creation, no initial rebalance delay. The topics' own settings
(LogAppendTime on the inputs, compaction...) are set when the project creates them.

testcontainers is an optional extra (`pip install -e '.[docker]'`), imported only here and
only when asked for; `docker_unavailable()` says in one line why this path cannot run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from worker.devtools.localkafka import (
    LocalKafkaError,
    _answers_metadata,
    _base_config,
    _in_event_loop,
)

KAFKA_IMAGE = "confluentinc/cp-kafka:7.9.0"
"""The image: Confluent's build of Apache Kafka 3.9, the line testcontainers' Kafka module
(written for Confluent's images) starts in KRaft mode."""

INSTALL_HINT = "pip install -e '.[docker]'"

# What of localkafka's configuration is about its own process (addresses, identity, log
# directory, features of Kafka 4 the image's Kafka 3.9 lacks); the rest is carried over.
_NOT_CARRIED = frozenset(
    {
        "process.roles",
        "node.id",
        "controller.quorum.voters",
        "listeners",
        "advertised.listeners",
        "controller.listener.names",
        "inter.broker.listener.name",
        "listener.security.protocol.map",
        "log.dirs",
        "share.coordinator.state.topic.replication.factor",
        "share.coordinator.state.topic.min.isr",
    }
)


def broker_config(extra_config: dict[str, str] | None = None) -> dict[str, str]:
    """The broker settings a container gets: localkafka's, less its own process's, plus
    `extra_config`."""
    config = {
        key: value for key, value in _base_config(0, 0, Path()).items() if key not in _NOT_CARRIED
    }
    config.update(extra_config or {})
    return config


def environment_name(key: str) -> str:
    """The environment variable by which Confluent's images set broker property `key`:
    `KAFKA_` and the name upper-cased, `.` as `_`, `_` as `__`, `-` as `___`."""
    return "KAFKA_" + key.replace("_", "__").replace("-", "___").replace(".", "_").upper()


def _import(name: str) -> ModuleType:
    """A module of the `docker` extra; a separate function so tests can pretend it is absent."""
    return importlib.import_module(name)


def _kafka_module() -> ModuleType:
    # testcontainers 4.x moved the module to `community` and left a deprecated alias.
    try:
        return _import("testcontainers.community.kafka")
    except ImportError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return _import("testcontainers.kafka")


def docker_unavailable(timeout: float = 3.0) -> str | None:
    """None when testcontainers is installed and a Docker engine answers a ping within
    `timeout` seconds; otherwise the reason, in one line."""
    try:
        _kafka_module()
        docker = _import("docker")
    except ImportError as exc:
        return f"testcontainers is not installed ({exc}): {INSTALL_HINT}"
    reason: str | None = None
    # docker-py leaves the socket of a failed connection to the garbage collector.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=timeout)
            try:
                client.ping()
            finally:
                client.close()
        except Exception as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            reason = f"no Docker engine answers ({first})"
        gc.collect()
    return reason


@dataclass
class KafkaInDocker:
    """One KRaft Kafka node in a container; use as a context manager or start()/stop().

    Its bootstrap address is on the Docker host (`127.0.0.1:PORT` for a local engine). The
    container is removed on stop(), and by testcontainers' reaper if this process dies.
    """

    image: str = KAFKA_IMAGE
    extra_config: dict[str, str] = field(default_factory=dict)
    heap: str = "512m"
    startup_timeout: float = 180.0
    _container: Any = field(default=None, init=False, repr=False)
    _bootstrap: str = field(default="", init=False, repr=False)

    @property
    def bootstrap_servers(self) -> str:
        """The address clients connect to."""
        if not self._bootstrap:
            raise LocalKafkaError("the Kafka container is not running: start() it first")
        return self._bootstrap

    def start(self) -> KafkaInDocker:
        """Start the container and wait until the broker serves metadata; return self.

        Raises LocalKafkaError, saying why, when there is no testcontainers or no Docker
        engine. Blocks: from async code, call it in a thread."""
        if _in_event_loop():
            raise LocalKafkaError(
                "KafkaInDocker.start() blocks: from async code use `await asyncio.to_thread(...)`"
            )
        reason = docker_unavailable()
        if reason is not None:
            raise LocalKafkaError(f"cannot start Kafka in Docker: {reason}")
        container = _kafka_module().KafkaContainer(self.image).with_kraft()
        for key, value in broker_config(self.extra_config).items():
            container.with_env(environment_name(key), value)
        container.with_env("KAFKA_HEAP_OPTS", f"-Xms{self.heap} -Xmx{self.heap}")
        self._container = container
        try:
            # The image is pulled within start(): a first start takes that much longer.
            container.start(timeout=int(self.startup_timeout))
            self._bootstrap = str(container.get_bootstrap_server())
            self._wait_ready()
        except BaseException as exc:
            with contextlib.suppress(Exception):  # the first error is the one to see
                self.stop()
            if isinstance(exc, Exception) and not isinstance(exc, LocalKafkaError):
                raise LocalKafkaError(f"the Kafka container did not start: {exc}") from exc
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        connection = {"bootstrap_servers": self._bootstrap}
        while not asyncio.run(_answers_metadata(connection)):
            if time.monotonic() > deadline:
                raise LocalKafkaError(
                    f"the Kafka container at {self._bootstrap} did not answer within "
                    f"{self.startup_timeout:.0f}s"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop and remove the container (nothing to do when it is not running)."""
        container, self._container = self._container, None
        self._bootstrap = ""
        if container is not None:
            container.stop()

    def __enter__(self) -> KafkaInDocker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
