"""A real single-node Apache Kafka, started from Apache Kafka's own jars, without Docker.

The jars are fetched from Maven Central with Maven into a cache outside the repository
(``$JOBS_KAFKA_CACHE``, default ``~/.cache/job-orchestrator``). Each broker gets a fresh data
directory (or a given one, which it keeps) and free loopback ports, runs in KRaft mode (broker
and controller in one JVM), and is stopped cleanly; if the Python process that started it
dies, the JVM is told to die too.

For fault tests a broker can also be crashed (`kill`, SIGKILL) and started again on the same
log, ports and cluster ID, so connected clients find it at the same address, or hung
(`freeze`, SIGSTOP) and resumed (`thaw`, SIGCONT).

A secured broker (`secure=True`) takes SCRAM-SHA-512 logins only, on a SASL_PLAINTEXT port and
a SASL_SSL one, and authorizes with ACLs (none at first: only the super user `admin` may do
anything). Its users, one per role of `ROLES` with random passwords, and a CA and server
certificate are made at its first start and kept in its data dir, for its restarts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

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


def _check_port_free(port: int) -> None:
    """Fail clearly if another process listens on `port`.

    The JVM binds its listeners with SO_REUSEADDR (the JDK's default for server sockets on
    Linux), as this probe does: connections of a killed broker left in TIME_WAIT on the port
    do not stop a restart, only a live socket bound to it does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise LocalKafkaError(
                f"port {port} of the local broker is taken by another process; "
                "stop that process or use another port (`jobctl broker --port`)"
            ) from None


def _cluster_id() -> str:
    # Kafka's cluster IDs are 16 random bytes in URL-safe base64 without padding, exactly
    # what `kafka-storage random-uuid` prints; making it here saves a JVM start. Like Kafka's
    # own generator, never one starting with "-": `format -t -xyz` reads it as an option
    # (one format in 64 failed that way).
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _formatted_cluster_id(log_dir: Path) -> str | None:
    """The cluster ID a formatted log dir belongs to; None if it is not formatted."""
    meta = log_dir / "meta.properties"
    if not meta.exists():
        return None
    for line in meta.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "cluster.id":
            return value.strip()
    raise LocalKafkaError(f"{meta} names no cluster.id; remove {log_dir} to start afresh")


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM the broker when the process that started it dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _forget_spawner() -> None:
    global _spawner
    _spawner = None


os.register_at_fork(after_in_child=_forget_spawner)


def _spawn(cmd: list[str], out: IO[bytes]) -> subprocess.Popen[bytes]:
    """Start the broker from one thread that lives as long as this process.

    Linux sends the parent-death signal when the *thread* that forked the child ends: a broker
    started on a short-lived thread (`asyncio.to_thread`, a restart in a fault test) would be
    told to stop as soon as that thread finished.
    """
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="localkafka")
        spawner = _spawner
    return spawner.submit(
        subprocess.Popen,
        cmd,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        # Own process group: a Ctrl-C in the terminal reaches us, and we stop the broker in
        # order, instead of the JVM dying mid-write.
        start_new_session=True,
        preexec_fn=_die_with_parent,
    ).result()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Send `sig` to the broker's process group: the JVM (its leader) and anything it forked."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)


def _thread_states(pid: int) -> list[str]:
    """The scheduler state letter of each thread of `pid` (R, S, D, T…), from /proc."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        with contextlib.suppress(OSError, IndexError):
            states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
    return states


def _wait_until(done: Callable[[], bool], timeout: float, failure: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise LocalKafkaError(failure)
        time.sleep(0.01)


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _base_config(port: int, controller_port: int, log_dir: Path) -> dict[str, str]:
    """The broker's configuration on PLAINTEXT, before security and `extra_config`."""
    return {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
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


ROLES = ("admin", "orchestrator", "producer", "executor", "reader")
"""The SCRAM users of a secured broker, one per role, named after it; `admin` is a super user."""
SCRAM_MECHANISM = "SCRAM-SHA-512"
_SCRAM_LOGIN = "org.apache.kafka.common.security.scram.ScramLoginModule required"
_KEYSTORE_ENV = "LOCALKAFKA_KEYSTORE_PASSWORD"


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable and writable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _keytool(java: str) -> str:
    """keytool of the JDK whose `java` runs the broker, else the one on PATH."""
    beside = Path(java).resolve().parent / "keytool"
    if beside.exists():
        return str(beside)
    return _require(
        "keytool", "a Java runtime with keytool (e.g. `apt-get install openjdk-17-jre`)"
    )


@dataclass
class BrokerSecurity:
    """The SCRAM users and the TLS material of a secured broker, in `directory`.

    Made by the first start on a data dir and read back by every later one: a restart, or a
    new LocalKafka on a kept data dir, has the same users, passwords and certificates. The
    passwords are random per broker; files holding secrets are readable by their owner only.
    """

    directory: Path
    credentials: dict[str, str] = field(default_factory=dict, repr=False)
    keystore_password: str = field(default="", repr=False)

    @property
    def cafile(self) -> Path:
        """The CA certificate (PEM) that signed the broker's: what clients trust."""
        return self.directory / "ca.pem"

    @property
    def keystore(self) -> Path:
        """The broker's key and certificate chain (PKCS12)."""
        return self.directory / "server.p12"

    @property
    def _saved(self) -> Path:
        return self.directory / "credentials.json"

    @classmethod
    def open(cls, data_dir: Path) -> BrokerSecurity:
        """The users and certificates saved in `data_dir`, or new ones for a new log there."""
        security = cls(data_dir / "security")
        if not security.load():
            if _formatted_cluster_id(data_dir / "data") is not None:
                raise LocalKafkaError(
                    f"{data_dir} holds a log formatted without secure=True, which has no users; "
                    "remove it to start afresh"
                )
            security.create()
        return security

    def settings(self, role: str, bootstrap: str, *, tls: bool) -> dict[str, str]:
        """The project's settings that connect as `role`, over SASL_SSL if `tls`."""
        if role not in self.credentials:
            raise LocalKafkaError(f"no user {role!r}; the users are {', '.join(ROLES)}")
        settings = {
            "bootstrap_servers": bootstrap,
            "security_protocol": "SASL_SSL" if tls else "SASL_PLAINTEXT",
            "sasl_mechanism": SCRAM_MECHANISM,
            "sasl_username": role,
            "sasl_password": self.credentials[role],
        }
        if tls:
            settings["ssl_cafile"] = str(self.cafile)
        return settings

    def load(self) -> bool:
        """Read the saved passwords; False if none were made in `directory` yet."""
        if not self._saved.exists():
            return False
        saved = json.loads(self._saved.read_text())
        self.credentials = dict(saved["users"])
        self.keystore_password = saved["keystore_password"]
        return True

    def create(self) -> None:
        """Draw a random password for each role and for the keystore, and save them."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.credentials = {role: secrets.token_urlsafe(18) for role in ROLES}
        self.keystore_password = secrets.token_urlsafe(18)
        saved = {"users": self.credentials, "keystore_password": self.keystore_password}
        _write_private(self._saved, json.dumps(saved, indent=2) + "\n")

    def make_certificates(self, keytool: str) -> None:
        """Make a CA and a server certificate for 127.0.0.1 and localhost signed by it (EC
        P-256, ten years), unless made already; the CA's key is dropped once it has signed."""
        if self.keystore.exists() and self.cafile.exists():
            return
        making = self.directory / "making.p12"
        making.unlink(missing_ok=True)
        store = ["-keystore", str(making), "-storetype", "PKCS12", "-storepass:env", _KEYSTORE_ENV]
        key = ["-genkeypair", "-keyalg", "EC", "-groupname", "secp256r1", "-validity", "3650"]
        ca = ["-alias", "ca", "-dname", "CN=job-orchestrator local CA", "-ext", "bc:c"]
        server = ["-alias", "server", "-dname", "CN=localhost", "-ext", "EKU=serverAuth"]
        server += ["-ext", "SAN=ip:127.0.0.1,dns:localhost", "-ext", "KU:c=digitalSignature"]
        steps = [
            [*key, *ca, "-ext", "KU:c=keyCertSign,cRLSign"],
            [*key, *server, "-signer", "ca", "-signerkeypass:env", _KEYSTORE_ENV],
            ["-exportcert", "-alias", "ca", "-rfc", "-file", str(self.cafile)],
            ["-delete", "-alias", "ca"],
        ]
        # Passwords go through the environment: a command line is visible to every user.
        env = {**os.environ, _KEYSTORE_ENV: self.keystore_password}
        for step in steps:
            run = subprocess.run(
                [keytool, *step, *store], capture_output=True, text=True, env=env, check=False
            )
            if run.returncode != 0:
                raise LocalKafkaError(f"keytool {step[0]} failed:\n{run.stdout}{run.stderr}")
        making.chmod(0o600)  # it holds the broker's private key
        making.rename(self.keystore)

    def format_arguments(self) -> list[str]:
        """`kafka-storage format` arguments that create the users with the log."""
        return [
            arg
            for name, password in self.credentials.items()
            for arg in ("--add-scram", f"{SCRAM_MECHANISM}=[name={name},password={password}]")
        ]

    def config(self, port: int, ssl_port: int, controller_port: int) -> dict[str, str]:
        """What secures the broker: SCRAM on `port`, SCRAM over TLS on `ssl_port`, ACLs."""
        admin_login = f'{_SCRAM_LOGIN} username="admin" password="{self.credentials["admin"]}";'
        scram = SCRAM_MECHANISM.lower()
        return {
            "listeners": f"SASL_PLAINTEXT://127.0.0.1:{port},SASL_SSL://127.0.0.1:{ssl_port},"
            f"CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"SASL_PLAINTEXT://127.0.0.1:{port},"
            f"SASL_SSL://127.0.0.1:{ssl_port}",
            "listener.security.protocol.map": "SASL_PLAINTEXT:SASL_PLAINTEXT,SASL_SSL:SASL_SSL,"
            "CONTROLLER:PLAINTEXT",
            "sasl.enabled.mechanisms": SCRAM_MECHANISM,
            # The broker's connections to itself (transaction markers...) log in as admin.
            "inter.broker.listener.name": "SASL_PLAINTEXT",
            "sasl.mechanism.inter.broker.protocol": SCRAM_MECHANISM,
            f"listener.name.sasl_plaintext.{scram}.sasl.jaas.config": admin_login,
            f"listener.name.sasl_ssl.{scram}.sasl.jaas.config": f"{_SCRAM_LOGIN};",
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(self.keystore),
            "ssl.keystore.password": self.keystore_password,
            "ssl.key.password": self.keystore_password,
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found": "false",
            # The controller listener stays PLAINTEXT on loopback (SCRAM cannot guard it: its
            # users live in the metadata log the controller serves). The broker half of this
            # JVM reaches the controller half on it as User:ANONYMOUS, which must therefore be
            # a super user; so is then any local process that connects to the controller port
            # itself (admin clients may, KIP-919): it can change ACLs and configurations. The
            # client listeners never see ANONYMOUS: every connection to them authenticates.
            "super.users": "User:admin;User:ANONYMOUS",
        }


def _jvm(java: str, heap: str, log4j: Path, libs: Path) -> list[str]:
    """The command that runs a class of Kafka's jars."""
    return [
        java,
        f"-Xms{heap}",
        f"-Xmx{heap}",
        "-XX:+UseSerialGC",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j}",
        "-cp",
        f"{libs}/*",
    ]


def _storage_format(jvm: list[str], props: Path, arguments: list[str]) -> None:
    """Run `kafka-storage format` on the configuration `props` with `arguments`."""
    # Given in an argument file (`java @file`), the users' passwords stay off the command
    # line, which any local user can read.
    argfile = props.parent / "format.args"
    command = ["kafka.tools.StorageTool", "format", "-c", str(props), *arguments]
    quoted = (arg.replace("\\", "\\\\").replace('"', '\\"') for arg in command)
    _write_private(argfile, "".join(f'"{arg}"\n' for arg in quoted))
    try:
        fmt = subprocess.run([*jvm, f"@{argfile}"], capture_output=True, text=True, check=False)
    finally:
        argfile.unlink(missing_ok=True)
    if fmt.returncode != 0:
        raise LocalKafkaError(
            f"formatting the Kafka data directory failed:\n{fmt.stdout}{fmt.stderr}"
        )


def _aiokafka_arguments(settings: dict[str, str]) -> dict[str, str]:
    """aiokafka's arguments for SASL_PLAINTEXT `settings` of connection_settings()."""
    arguments = {"bootstrap_servers": settings["bootstrap_servers"]}
    if "sasl_username" in settings:
        arguments["security_protocol"] = settings["security_protocol"]
        arguments["sasl_mechanism"] = settings["sasl_mechanism"]
        arguments["sasl_plain_username"] = settings["sasl_username"]
        arguments["sasl_plain_password"] = settings["sasl_password"]
    return arguments


@dataclass
class LocalKafka:
    """One KRaft broker+controller on loopback; use as a context manager or start()/stop().

    The first start() picks free ports (unless `port` / `controller_port` are given) and a
    cluster ID and formats the log; later ones, after kill() or stop(), reuse all of them, so
    clients find the broker at the same address with its records. A temporary data directory
    is made and removed on stop(); a given `data_dir` is kept, and a formatted log in it is
    started as it is. kill() crashes the broker, freeze() / thaw() hang and resume it.
    `secure=True` adds a SASL_SSL port (`ssl_port`), users and ACLs: see connection_settings().
    """

    version: str = KAFKA_VERSION
    heap: str = "512m"
    extra_config: dict[str, str] = field(default_factory=dict)
    log_level: str = "WARN"
    port: int = 0
    data_dir: Path | None = None
    startup_timeout: float = 90.0
    controller_port: int = 0
    secure: bool = False
    ssl_port: int = 0
    cluster_id: str = field(default="", init=False)
    _security: BrokerSecurity | None = field(default=None, init=False, repr=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _own_dir: bool = field(default=False, init=False, repr=False)
    _frozen: bool = field(default=False, init=False, repr=False)

    @property
    def bootstrap_servers(self) -> str:
        """The address clients connect to, `127.0.0.1:PORT`."""
        return f"127.0.0.1:{self.port}"

    @property
    def log_dir(self) -> Path | None:
        """The broker's log (its records and metadata), inside `data_dir`."""
        return None if self.data_dir is None else self.data_dir / "data"

    @property
    def ssl_bootstrap_servers(self) -> str:
        """A secured broker's SASL_SSL address, `127.0.0.1:SSL_PORT`."""
        self._secured()
        return f"127.0.0.1:{self.ssl_port}"

    @property
    def cafile(self) -> Path:
        """The CA certificate (PEM) of a secured broker's TLS listener, for its clients."""
        return self._secured().cafile

    @property
    def credentials(self) -> dict[str, str]:
        """A secured broker's SCRAM users (named after the roles of ROLES) and passwords."""
        return dict(self._secured().credentials)

    def _secured(self) -> BrokerSecurity:
        if not self.secure:
            raise LocalKafkaError("this broker is not secured: make it with secure=True")
        if self._security is None:
            raise LocalKafkaError("a secured broker's users and certificates are made by start()")
        return self._security

    def connection_settings(self, role: str = "admin", *, tls: bool = False) -> dict[str, str]:
        """The project's settings (`Settings` fields, `JOBS_<FIELD>` in the environment) that
        connect to this broker as `role`: over SASL_PLAINTEXT, or SASL_SSL if `tls`. For a
        broker that is not secured, only its bootstrap servers."""
        if not self.secure:
            return {"bootstrap_servers": self.bootstrap_servers}
        address = self.ssl_bootstrap_servers if tls else self.bootstrap_servers
        return self._secured().settings(role, address, tls=tls)

    def start(self) -> LocalKafka:
        """Start the broker and wait until it serves metadata; return self.

        The first start fetches the jars if needed, picks the ports and formats the log; a
        later one (after kill() or stop()) reuses the ports, the log and the cluster ID. It
        blocks and runs an event loop of its own: from async code, call it in a thread.
        """
        if _in_event_loop():
            raise LocalKafkaError(
                "LocalKafka.start() blocks: from async code use `await asyncio.to_thread(...)`"
            )
        if self.running:
            raise LocalKafkaError(f"the broker at {self.bootstrap_servers} is already running")
        java = _require(
            "java", "a Java runtime, 17 or newer (e.g. `apt-get install openjdk-17-jre-headless`)"
        )
        libs = fetch_jars(self.version)
        fresh = self.data_dir is None
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="jobs-kafka-"))
            self._own_dir = True
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._pick_ports()
        try:
            jvm, props = self._write_config(java, libs)
            self._format(jvm, props, java)
            for port in self._ports():
                _check_port_free(port)
            self._launch([*jvm, "kafka.Kafka", str(props)])
            self._wait_ready()
        except BaseException:
            # A first start leaves nothing behind; a restart keeps the log to try again.
            if fresh:
                self.stop()
            else:
                self._terminate(15.0)
            raise
        return self

    def _pick_ports(self) -> None:
        if self.port == 0:
            self.port = _free_port()
        while self.controller_port in (0, self.port):
            self.controller_port = _free_port()
        while self.secure and self.ssl_port in (0, self.port, self.controller_port):
            self.ssl_port = _free_port()

    def _ports(self) -> tuple[int, ...]:
        secured = (self.ssl_port,) if self.secure else ()
        return (self.port, *secured, self.controller_port)

    def _write_config(self, java: str, libs: Path) -> tuple[list[str], Path]:
        """Write server.properties and the log4j2 file; return the JVM command and the first."""
        assert self.data_dir is not None
        props = self.data_dir / "server.properties"
        config = _base_config(self.port, self.controller_port, self.data_dir / "data")
        if self.secure:
            self._security = security = BrokerSecurity.open(self.data_dir)
            config.update(security.config(self.port, self.ssl_port, self.controller_port))
        config.update(self.extra_config)
        _write_private(props, "".join(f"{k}={v}\n" for k, v in config.items()))
        log4j = self.data_dir / "log4j2.properties"
        log4j.write_text(_LOG4J2.format(log=self.data_dir / "server.log", level=self.log_level))
        return _jvm(java, self.heap, log4j, libs), props

    def _format(self, jvm: list[str], props: Path, java: str) -> None:
        """Format the log with this broker's cluster ID and users, unless it is formatted
        already; make a secured broker's certificates meanwhile, unless made already."""
        assert self.log_dir is not None
        with ThreadPoolExecutor(max_workers=1) as pool:
            security = self._security if self.secure else None
            # keytool's JVMs run beside the formatting one, not after it.
            made = pool.submit(security.make_certificates, _keytool(java)) if security else None
            formatted = _formatted_cluster_id(self.log_dir)
            self.cluster_id = formatted or self.cluster_id or _cluster_id()
            if formatted is None:
                users = security.format_arguments() if security else []
                _storage_format(jvm, props, [*users, "-t", self.cluster_id])
            if made is not None:
                made.result()

    def _launch(self, cmd: list[str]) -> None:
        assert self.data_dir is not None
        # Appended to, so that a restart's tail follows the crash it restarts from.
        with (self.data_dir / "stdout.log").open("ab") as out:
            out.write(f"--- starting the broker, {time.strftime('%H:%M:%S')} ---\n".encode())
            out.flush()
            self._proc = _spawn(cmd, out)
        self._frozen = False

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
            if all(map(_port_open, self._ports())) and asyncio.run(
                _answers_metadata(_aiokafka_arguments(self.connection_settings()))
            ):
                return
            if time.monotonic() > deadline:
                raise LocalKafkaError(
                    f"the Kafka broker did not answer within {self.startup_timeout:.0f}s:\n"
                    + self._log_tail()
                )
            time.sleep(0.2)

    def _terminate(self, timeout: float) -> None:
        """Stop the JVM (SIGTERM, then SIGKILL after `timeout`), frozen or not; keep the data."""
        proc, self._proc = self._proc, None
        self._frozen = False
        if proc is not None and proc.poll() is None:
            proc.terminate()
            _signal_group(proc, signal.SIGCONT)  # a frozen JVM acts on SIGTERM once resumed
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after `timeout`); remove a temporary data dir.

        A given `data_dir` is kept, and a later start() resumes its log.
        """
        self._terminate(timeout)
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.cluster_id = ""  # the next start formats a new, empty log
            self._security = None  # with new users and certificates

    def kill(self, timeout: float = 15.0) -> None:
        """Crash the broker: SIGKILL the JVM (frozen or not) and wait until it is gone.

        No clean shutdown: what the JVM had not written is lost, as in a crash; records the
        broker acknowledged are in the OS's page cache and survive. The log, ports and cluster
        ID are kept, and start() (or restart()) brings the broker back on them. That start takes
        `broker.session.timeout.ms` (9 s by default) longer than a first one: the restarted
        controller holds the dead broker's registration until its session expires.
        """
        proc, self._proc = self._proc, None
        self._frozen = False
        if proc is None or proc.poll() is not None:
            return
        _signal_group(proc, signal.SIGKILL)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise LocalKafkaError(
                f"the Kafka broker (pid {proc.pid}) was still alive {timeout:.0f}s after SIGKILL"
            ) from None

    def restart(self, *, clean: bool = True, timeout: float = 15.0) -> LocalKafka:
        """Stop the broker (cleanly, or with kill() if not `clean`) and start() it again.

        Same ports, log and cluster ID; waits until it serves metadata, as start() does.
        """
        if clean:
            self._terminate(timeout)
        else:
            self.kill(timeout)
        return self.start()

    def freeze(self, timeout: float = 10.0) -> None:
        """Hang the broker: SIGSTOP the JVM and wait until every thread of it is stopped.

        Its sockets stay open: the kernel still accepts connections and buffers requests, but
        nothing answers until thaw(). Clients see timeouts, not errors.
        """
        proc = self._alive("freeze")
        _signal_group(proc, signal.SIGSTOP)
        self._frozen = True
        _wait_until(
            lambda: all(state in "TtZX" for state in _thread_states(proc.pid)),  # Z, X: exiting
            timeout,
            f"the Kafka broker (pid {proc.pid}) did not stop within {timeout:.0f}s of SIGSTOP",
        )

    def thaw(self, timeout: float = 10.0) -> None:
        """Resume a frozen broker (SIGCONT) and wait until none of its threads is stopped.

        It then answers the requests buffered meanwhile, unless their clients gave up.
        """
        proc = self._alive("thaw")
        _signal_group(proc, signal.SIGCONT)
        self._frozen = False
        _wait_until(
            lambda: "T" not in _thread_states(proc.pid),
            timeout,
            f"the Kafka broker (pid {proc.pid}) did not resume within {timeout:.0f}s of SIGCONT",
        )

    def _alive(self, action: str) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            raise LocalKafkaError(f"cannot {action} the Kafka broker: it is not running")
        return self._proc

    @property
    def running(self) -> bool:
        """Whether the broker process is alive (frozen or not)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def frozen(self) -> bool:
        """Whether the broker is alive and frozen by freeze()."""
        return self._frozen and self.running

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


async def _answers_metadata(connection: dict[str, str]) -> bool:
    """True once the broker answers a metadata request and has a controller."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(**connection, request_timeout_ms=2000)
    try:
        await asyncio.wait_for(admin.start(), 3)
        cluster = await asyncio.wait_for(admin.describe_cluster(), 3)
        return bool(cluster.get("controller_id", -1) >= 0)
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
