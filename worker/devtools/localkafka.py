"""A real single-node Apache Kafka, started from Apache Kafka's own jars, without Docker.

The jars are fetched from Maven Central with Maven into a cache outside the repository
(``$JOBS_KAFKA_CACHE``, default ``~/.cache/job-orchestrator``). Each broker gets a fresh data
directory and free loopback ports, runs in KRaft mode (broker and controller in one JVM), and
is stopped cleanly; if the Python process that started it dies, the JVM is told to die too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

KAFKA_VERSION = "4.1.1"
SCALA_VERSION = "2.13"
LOG4J_VERSION = "2.24.3"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.job-orchestrator</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{scala}</artifactId>
      <version>{kafka}</version>
    </dependency>
    <!-- Kafka's POM brings no logging backend; Kafka 4 logs through slf4j 1.x to log4j2. -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-api</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """status = error
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = file
"""


class LocalKafkaError(RuntimeError):
    """The local broker could not be fetched, started or reached; the message says what to do."""


def cache_dir() -> Path:
    """Where the Kafka jars are cached (outside the repository)."""
    configured = os.environ.get("JOBS_KAFKA_CACHE")
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "job-orchestrator"


def _require(tool: str, what: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise LocalKafkaError(
            f"`{tool}` was not found on PATH. Install {what} to run a local Kafka broker, "
            "or point JOBS_BOOTSTRAP_SERVERS at an existing cluster."
        )
    return path


def fetch_jars(version: str = KAFKA_VERSION, *, quiet: bool = True) -> Path:
    """Download Kafka's runtime jars with Maven once; return the directory holding them."""
    root = cache_dir() / f"kafka_{SCALA_VERSION}-{version}"
    libs = root / "libs"
    done = root / ".complete"
    if done.exists():
        return libs
    mvn = _require("mvn", "Apache Maven (e.g. `apt-get install maven`)")
    _require("java", "a Java runtime, 17 or newer (e.g. `apt-get install openjdk-17-jre-headless`)")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="libs.", dir=root))
    (root / "pom.xml").write_text(
        _POM.format(scala=SCALA_VERSION, kafka=version, log4j=LOG4J_VERSION)
    )
    cmd = [
        mvn,
        "-B",
        "-f",
        str(root / "pom.xml"),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={staging}",
    ]
    if quiet:
        cmd.insert(1, "-q")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise LocalKafkaError(
            f"Maven could not download Apache Kafka {version} from Maven Central "
            f"(exit {proc.returncode}). Check network access to Maven Central and "
            f"~/.m2/settings.xml. Maven said:\n{tail}"
        )
    if not any(staging.glob(f"kafka_{SCALA_VERSION}-{version}.jar")):
        shutil.rmtree(staging, ignore_errors=True)
        raise LocalKafkaError(f"Maven finished but kafka_{SCALA_VERSION}-{version}.jar is missing")
    if libs.exists():
        shutil.rmtree(libs)
    staging.rename(libs)
    done.write_text(version + "\n")
    return libs


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cluster_id() -> str:
    # Kafka's cluster IDs are 16 random bytes in URL-safe base64 without padding, exactly
    # what `kafka-storage random-uuid` prints; making it here saves a JVM start. Like Kafka's
    # own generator, never one starting with "-": `format -t -xyz` reads it as an option
    # (one format in 64 failed that way).
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM the broker when the process that started it dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class LocalKafka:
    """One KRaft broker+controller on loopback; use as a context manager or start()/stop()."""

    version: str = KAFKA_VERSION
    heap: str = "512m"
    extra_config: dict[str, str] = field(default_factory=dict)
    log_level: str = "WARN"
    port: int = 0
    data_dir: Path | None = None
    startup_timeout: float = 90.0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _own_dir: bool = field(default=False, init=False, repr=False)

    @property
    def bootstrap_servers(self) -> str:
        """The address clients connect to, `127.0.0.1:PORT`."""
        return f"127.0.0.1:{self.port}"

    def _config(self, controller_port: int, log_dir: Path) -> dict[str, str]:
        config = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(log_dir),
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # The cleaner's default 128 MiB buffer is wasted on a test broker.
            "log.cleaner.dedupe.buffer.size": str(8 * 1024 * 1024),
            "log.cleaner.threads": "1",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
        }
        config.update(self.extra_config)
        return config

    def start(self) -> LocalKafka:
        """Fetch the jars if needed, format a fresh data directory, start, wait until ready."""
        java = _require(
            "java", "a Java runtime, 17 or newer (e.g. `apt-get install openjdk-17-jre-headless`)"
        )
        libs = fetch_jars(self.version)
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="jobs-kafka-"))
            self._own_dir = True
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_dir = self.data_dir / "data"
        if self.port == 0:
            self.port = _free_port()
        controller_port = _free_port()
        while controller_port == self.port:
            controller_port = _free_port()

        props = self.data_dir / "server.properties"
        props.write_text(
            "".join(f"{k}={v}\n" for k, v in self._config(controller_port, log_dir).items())
        )
        log4j = self.data_dir / "log4j2.properties"
        log4j.write_text(_LOG4J2.format(log=self.data_dir / "server.log", level=self.log_level))
        classpath = f"{libs}/*"
        jvm = [
            java,
            f"-Xms{self.heap}",
            f"-Xmx{self.heap}",
            "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp",
            classpath,
        ]
        fmt = subprocess.run(
            [
                *jvm,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                _cluster_id(),
                "-c",
                str(props),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if fmt.returncode != 0:
            raise LocalKafkaError(
                f"formatting the Kafka data directory failed:\n{fmt.stdout}{fmt.stderr}"
            )
        out = (self.data_dir / "stdout.log").open("wb")
        self._proc = subprocess.Popen(
            [*jvm, "kafka.Kafka", str(props)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Own process group: a Ctrl-C in the terminal reaches us, and we stop the broker
            # in order, instead of the JVM dying mid-write.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        out.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _log_tail(self, lines: int = 30) -> str:
        assert self.data_dir is not None
        chunks = []
        for name in ("stdout.log", "server.log"):
            path = self.data_dir / name
            if path.exists():
                chunks.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(chunks)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise LocalKafkaError(
                    f"the Kafka broker exited with code {self._proc.returncode} during start-up:\n"
                    + self._log_tail()
                )
            if _port_open(self.port) and asyncio.run(_answers_metadata(self.bootstrap_servers)):
                return
            if time.monotonic() > deadline:
                raise LocalKafkaError(
                    f"the Kafka broker did not answer within {self.startup_timeout:.0f}s:\n"
                    + self._log_tail()
                )
            time.sleep(0.2)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after `timeout`) and remove its data."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def _answers_metadata(bootstrap: str) -> bool:
    """True once the broker answers a metadata request and has a controller."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    try:
        await asyncio.wait_for(admin.start(), 3)
        cluster = await asyncio.wait_for(admin.describe_cluster(), 3)
        return bool(cluster.get("controller_id", -1) >= 0)
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
