"""Settings from the environment (prefix ``JOBS_``) or keyword arguments."""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:  # the client reads these settings too, and must not load the engine
    from worker.core.lifecycle import Limits
    from worker.core.limits import InputLimits


# The longest any seconds setting may be (100 years): each becomes a `timedelta` added to
# times, which infinity, NaN or 1e300 would overflow when the worker starts, not here.
LONGEST_S = 100 * 365 * 86_400


# JOBS_TRANSACTION_TIMEOUT_MS's default with JOBS_TRANSACTIONS=worker (Kafka Streams' with
# exactly-once).
WORKER_TRANSACTION_TIMEOUT_MS = 10_000
PARTITION_TRANSACTION_TIMEOUT_MS = 60_000  # with JOBS_TRANSACTIONS=partition

# The smallest start request the worker takes, and what a run it starts costs against
# JOBS_MAX_RUN_BYTES (worker.core.lifecycle.run_size: the request's bytes, twice its client
# ID's, and 512): a smaller budget can never admit a run. Not imported from the core, which
# a client of these settings must not load.
SMALLEST_START = b'{"job_type":"a"}'
MIN_RUN_BYTES = len(SMALLEST_START) + 512


def _addresses(value: str) -> str:
    """`value` if it is a comma-separated list of host:port (or host); else ValueError."""
    servers = [server.strip() for server in value.split(",")]
    if not any(servers):
        raise ValueError("no server given; expected host:port, comma-separated")
    for server in servers:
        try:
            server.encode()
        except UnicodeEncodeError:  # an argument's bytes that are not UTF-8
            raise ValueError(f"{server!r} is not UTF-8 text, so no host name") from None
        match = _SERVER.fullmatch(server)
        if match is None:
            raise ValueError(f"{server!r} is not host:port (or host, for port 9092)")
        port = match.group("port")
        if port is not None and not 0 < int(port) <= 65535:
            raise ValueError(f"{server!r} has a port outside 1-65535")
    return value


# host:port, host alone, or [IPv6]:port
_SERVER = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:\[\]/,]+)(?::(?P<port>\d{1,5}))?")


def _a_run_fits(value: int) -> int:
    """`JOBS_MAX_RUN_BYTES` admits at least one run of the smallest start request."""
    if value < MIN_RUN_BYTES:
        raise ValueError(
            f"at least {MIN_RUN_BYTES}, what one run of the smallest start request costs "
            f"({len(SMALLEST_START)} bytes, plus 512); a smaller value admits no run"
        )
    return value


def _security_complete(s: Settings) -> None:
    """The security settings of `s` are complete and agree, and their files can be used."""
    if s.security_protocol.startswith("SASL_"):
        if not s.sasl_username:
            raise ValueError(f"{s.security_protocol} needs JOBS_SASL_USERNAME")
        if s.sasl_password is None and s.sasl_password_file is None:
            raise ValueError(
                f"{s.security_protocol} needs JOBS_SASL_PASSWORD or JOBS_SASL_PASSWORD_FILE"
            )
    _settings_agree(s)
    if (s.ssl_certfile is None) != (s.ssl_keyfile is None):
        raise ValueError("JOBS_SSL_CERTFILE and JOBS_SSL_KEYFILE go together")
    s.password()  # an unreadable password file fails here, with its name
    if s.security_protocol in ("SSL", "SASL_SSL") and (s.ssl_cafile or s.ssl_certfile):
        tls_context(s)  # a file that cannot be used fails here, with its name


class Settings(BaseSettings):
    """Worker and client settings; every field reads `JOBS_<NAME>` from the environment."""

    # A validation error's text would otherwise show the input it refused: for an error of
    # the whole model (the checks of `_security_is_complete`) that is every setting given,
    # the SASL password among them, and these errors are printed (tracebacks, `JobClient()`).
    # Hidden from str() and repr() for every field, so no secret field can be forgotten;
    # `errors()` still holds the input, for code that asks for it.
    model_config = SettingsConfigDict(env_prefix="JOBS_", frozen=True, hide_input_in_errors=True)

    bootstrap_servers: Annotated[str, AfterValidator(_addresses)] = Field(
        default="127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated."
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="How every Kafka client of this process connects."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        default="SCRAM-SHA-512", description="With SASL_PLAINTEXT or SASL_SSL."
    )
    sasl_username: str | None = Field(default=None, description="The SASL principal's name.")
    sasl_password: SecretStr | None = Field(
        default=None, description="The SASL password (or give sasl_password_file)."
    )
    sasl_password_file: Path | None = Field(
        default=None, description="A file holding the SASL password (trailing newline ignored)."
    )
    ssl_cafile: Path | None = Field(
        default=None, description="CA certificates to trust (PEM); the system's by default."
    )
    ssl_certfile: Path | None = Field(default=None, description="Client certificate (PEM).")
    ssl_keyfile: Path | None = Field(default=None, description="Client certificate's key (PEM).")
    ssl_key_password: SecretStr | None = Field(
        default=None, description="The password of an encrypted JOBS_SSL_KEYFILE."
    )
    topic_prefix: str = Field(default="jobs", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    db_path: Path = Field(default=Path("jobs.db"), description="The worker's SQLite file.")
    config: Path | None = Field(default=None, description="Per-job-type TOML settings.")
    max_record_bytes: int = Field(
        default=1_048_576, gt=0, description="Larger input records are dead-lettered."
    )
    max_nesting_depth: int = Field(
        default=32,
        gt=0,
        description="Input records whose arrays and objects nest deeper are dead-lettered.",
    )
    max_data_bytes: int = Field(
        default=65_536,
        gt=0,
        description="Largest initial_data, final_metrics or metrics (as JSON) of an input "
        "record; larger ones are dead-lettered and the sender gets a `rejected` event.",
    )
    batch_max_records: int = Field(
        default=2000,
        gt=0,
        description="Most records a poll hands to the partitions' batches. Under a backlog, "
        "larger batches spread each transaction's fixed cost (its requests to the broker, "
        "the SQLite commit) over more decisions; a partition's batch is decided in one go "
        "on the event loop (40-50 µs a record), so this also bounds how long one holds it.",
    )
    poll_timeout_ms: int = Field(default=200, gt=0)
    fetch_max_wait_ms: int = Field(
        default=50,
        gt=0,
        description="Longest a fetch waits at the broker for data. A partition resumed after "
        "its batch waits for the fetch in flight, so this bounds the latency it adds.",
    )
    batch_interval_ms: int = Field(
        default=0,
        ge=0,
        le=60_000,
        description="Shortest time from the start of a partition's batch to the start of its "
        "next: the partition's records wait meanwhile and share one transaction. 0 starts the "
        "next batch as soon as one commits (the lowest latency); under a steady load each "
        "transaction then carries a few records, and its client work is most of the CPU.",
    )
    session_timeout_ms: int = Field(default=10_000, gt=0)
    heartbeat_interval_ms: int = Field(default=3_000, gt=0)
    processing_guarantee: Literal["exactly_once", "at_least_once"] = Field(
        default="exactly_once",
        description="exactly_once: each batch's events, changelog rows and input offsets in "
        "one Kafka transaction (JOBS_TRANSACTIONS says whose); at_least_once: no "
        "transactions, a crash may republish a batch's events.",
    )
    transactions: Literal["partition", "worker"] = Field(
        default="worker",
        description="With exactly_once, whose transactions: worker, one producer and one "
        "transaction at a time for all the worker's partitions (ID <group>.worker.<ID kept in "
        "its SQLite file>), fenced by the group's generation (Kafka 2.5 or later; 3.0 or "
        "later for a new owner to abort what a crashed worker left open at once): fewer "
        "transactions under a steady load and a lower latency; partition, a transactional "
        "producer per partition (ID <group>.<N>; a new owner fences the old one at once), "
        "for Kafka before 2.5.",
    )
    linger_ms: int = Field(
        default=0,
        ge=0,
        description="Producer linger. The worker hands each batch's records to the producer at "
        "once, so waiting for more only adds latency.",
    )
    producer_batch_bytes: int = Field(
        default=1_000_000,
        gt=0,
        description="Largest record batch per partition. aiokafka sends one batch per "
        "partition per request, so a batch's output should fit in one; keep it below the "
        "topics' max.message.bytes (1 MiB by default).",
    )
    transaction_timeout_ms: int = Field(
        default=WORKER_TRANSACTION_TIMEOUT_MS,
        gt=0,
        description="How long a transaction may stay open before the broker aborts it: the "
        "longest a crashed worker's open transaction can hold back readers of what it wrote "
        "(and, with JOBS_TRANSACTIONS=worker, its partitions' next owner when it cannot abort "
        "it). 10000 by default, 60000 with JOBS_TRANSACTIONS=partition.",
    )
    request_timeout_ms: int = Field(
        default=40_000,
        ge=100,
        le=2_147_483_647,
        description="A client's (JobClient, jobctl's client commands) Kafka request timeout: "
        "how long its producer waits for the broker to acknowledge a request or result before "
        "that attempt fails. A call that waits sends it again, with the same request ID, "
        "until its own timeout; one that does not wait raises JobTimeoutError.",
    )
    run_retention_s: float = Field(
        allow_inf_nan=False,
        le=LONGEST_S,
        default=86_400,
        gt=0,
        description="Ended runs stay in the changelog this long (broker time), then are "
        "tombstoned; SQLite keeps the history.",
    )
    max_run_bytes: Annotated[int, AfterValidator(_a_run_fits)] = Field(
        default=393_216,
        description="What the active and queued runs of one job type may hold together "
        "(each about its start request's size plus 512 bytes); a start beyond is rejected. "
        "The job type's state, with its idempotency and ended windows, must fit one Kafka "
        "record of the state topic (1 MiB by default).",
    )
    idempotency_window: int = Field(
        default=1000, ge=0, description="Request IDs remembered per job type for duplicates."
    )
    ended_window: int = Field(
        default=256, ge=0, description="Ended runs remembered per job type for late results."
    )
    idle_state_entries: int = Field(
        default=16_384,
        ge=0,
        description="What the idle job states each partition keeps parsed may hold, in window "
        "entries (a state counts 4 more; 90-250 bytes an entry), so a job type started again "
        "soon is not read back from SQLite; 0 keeps none.",
    )
    tick_s: float = Field(
        allow_inf_nan=False,
        le=LONGEST_S,
        default=1.0,
        gt=0,
        description="How often idle partitions check for timed-out runs.",
    )
    shutdown_timeout_s: float = Field(
        allow_inf_nan=False,
        le=LONGEST_S,
        default=25.0,
        gt=0,
        description="Longest a stop may take to commit the batches in flight, leave the group "
        "and close SQLite; past it the worker exits without them (the next owner reads again "
        "what was not committed), and 5 s later `jobctl run` exits hard whatever holds it.",
    )
    time_hold_s: float = Field(
        allow_inf_nan=False,
        le=LONGEST_S,
        default=5.0,
        ge=0,
        description="Longest a partition's time is held back while one of its inputs has "
        "unread records (so no run times out ahead of its unread report); then it goes on, "
        "with a warning.",
    )
    log_summary_s: float = Field(
        allow_inf_nan=False,
        le=LONGEST_S,
        default=60.0,
        ge=0,
        description="How often the worker logs, at info level, what it decided since the last "
        "summary (events by type, dead letters by reason, batches); 0 switches it off.",
    )
    view_refresh_s: float = Field(
        allow_inf_nan=False,
        le=LONGEST_S,
        default=60.0,
        ge=0,
        description="How often each partition re-publishes the rows of its running and queued "
        "runs with a view mark in the state topic, so clients read only its recent part; 0 "
        "switches it off (clients then read the state topic from its start).",
    )
    max_clock_skew_s: float = Field(
        allow_inf_nan=False,
        le=LONGEST_S,
        default=60.0,
        ge=0,
        description="How far ahead of the worker's clock a record's broker time may move a "
        "partition's time: a broker clock stepping forward cannot time runs out en masse.",
    )
    http_port: int = Field(
        default=8080,
        ge=0,
        le=65535,
        description="Port of the worker's /healthz, /readyz and /metrics; 0 switches them off.",
    )
    http_host: str = Field(
        default="", max_length=255, description="Address they listen on; empty: every interface."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    @model_validator(mode="after")
    def _security_is_complete(self) -> Settings:
        _security_complete(self)
        return self

    @model_validator(mode="before")
    @classmethod
    def _partition_transactions_time_out_later(cls, data: Any) -> Any:
        # With worker-wide transactions (the default) a crashed worker's open transaction
        # holds its partitions' next owner this long when the owner cannot abort it (a
        # tick's, an older Kafka): 10 s. A producer per partition is fenced by the next
        # owner at once, and keeps Kafka's longer default.
        if (
            isinstance(data, dict)
            and data.get("transactions", "worker") == "partition"
            and data.get("transaction_timeout_ms") is None
        ):
            return {**data, "transaction_timeout_ms": PARTITION_TRANSACTION_TIMEOUT_MS}
        return data

    def password(self) -> str | None:
        """The SASL password, from `sasl_password` or read from `sasl_password_file`."""
        if self.sasl_password is not None:
            return self.sasl_password.get_secret_value()
        if self.sasl_password_file is not None:
            try:
                content = self.sasl_password_file.read_bytes()
            except OSError as exc:
                raise ValueError(
                    f"cannot read JOBS_SASL_PASSWORD_FILE {self.sasl_password_file}: {exc.strerror}"
                ) from None
            try:
                return content.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                # Its message shows a byte of the password and it holds them all: raised
                # outside this block, ours does not carry it along as its context.
                pass
            raise ValueError(f"JOBS_SASL_PASSWORD_FILE {self.sasl_password_file} is not UTF-8 text")
        return None

    @property
    def input_limits(self) -> InputLimits:
        """What an input record may be before it is dead-lettered."""
        from worker.core.limits import InputLimits

        return InputLimits(
            record_bytes=self.max_record_bytes,
            nesting_depth=self.max_nesting_depth,
            data_bytes=self.max_data_bytes,
        )

    @property
    def limits(self) -> Limits:
        """Bounds on the state the core keeps per job type."""
        from worker.core.lifecycle import Limits

        return Limits(
            ended_window=self.ended_window,
            idempotency_window=self.idempotency_window,
            run_bytes=self.max_run_bytes,
        )

    @property
    def topics(self) -> Topics:
        """The five topic names under this prefix."""
        return Topics.for_prefix(self.topic_prefix)

    @property
    def group_id(self) -> str:
        """The orchestrator's consumer group."""
        return f"{self.topic_prefix}.orchestrator"

    @property
    def worker_transactions(self) -> bool:
        """Whether one transactional producer serves all of a worker's partitions (exactly
        once, `JOBS_TRANSACTIONS=worker`)."""
        return self.processing_guarantee == "exactly_once" and self.transactions == "worker"


def settings_problems(exc: ValidationError, options: Mapping[str, str] | None = None) -> str:
    """What a refused `Settings` was refused for, naming each `JOBS_*` variable (or, for a
    setting given as a command-line option, the option: `options` maps settings to them)
    and none of the values given (a password among them)."""
    options = options or {}

    def named(field: str) -> str:
        return options.get(field) or f"JOBS_{field.upper()}"

    return "; ".join(
        f"{named(str(e['loc'][0])) + ': ' if e['loc'] else ''}"
        f"{e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors(include_url=False, include_input=False)
    )


class SettingsError(ValueError):
    """Settings given as keywords that cannot work (`JobClient(...)`): the message names
    each setting refused and why, without the values; nothing of them is kept."""


@dataclass(frozen=True, slots=True)
class Topics:
    """The five topic names under one prefix."""

    requests: str
    results: str
    status: str
    state: str
    dlq: str

    @classmethod
    def for_prefix(cls, prefix: str) -> Topics:
        """Names for `prefix`: `<prefix>.requests`, `<prefix>.results`, ..."""
        return cls(
            requests=f"{prefix}.requests",
            results=f"{prefix}.results",
            status=f"{prefix}.status",
            state=f"{prefix}.state",
            dlq=f"{prefix}.dlq",
        )

    def all(self) -> tuple[str, ...]:
        """All five names, inputs first."""
        return (self.requests, self.results, self.status, self.state, self.dlq)


def tls_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of `JOBS_SSL_CAFILE`, `JOBS_SSL_CERTFILE` and `JOBS_SSL_KEYFILE`:
    the system's CA certificates by default, a client certificate when given. Raises
    ValueError naming the setting whose file cannot be used. An encrypted key never
    asks for its password on the terminal: it is `JOBS_SSL_KEY_PASSWORD`."""
    cafile = settings.ssl_cafile
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=None if cafile is None else str(cafile)
        )
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(_file_problem("JOBS_SSL_CAFILE", cafile, exc)) from None
    if settings.ssl_certfile is not None and settings.ssl_keyfile is not None:
        key_password = settings.ssl_key_password
        asked: list[bool] = []

        def password() -> str:
            # Called only for an encrypted key: without one, OpenSSL would prompt.
            asked.append(True)
            return "" if key_password is None else key_password.get_secret_value()

        for name, path in (
            ("JOBS_SSL_CERTFILE", settings.ssl_certfile),
            ("JOBS_SSL_KEYFILE", settings.ssl_keyfile),
        ):
            if not path.is_file():
                raise ValueError(f"{name} {path} is not a file")
        try:
            context.load_cert_chain(
                str(settings.ssl_certfile), str(settings.ssl_keyfile), password=password
            )
        except (OSError, ssl.SSLError) as exc:
            if not asked:
                hint = "both must be PEM files, the key the certificate's"
            elif key_password is None:
                hint = "the key is encrypted: give its password as JOBS_SSL_KEY_PASSWORD"
            else:
                hint = "the key is encrypted: check JOBS_SSL_KEY_PASSWORD"
            raise ValueError(
                f"cannot use the client certificate JOBS_SSL_CERTFILE {settings.ssl_certfile} "
                f"with its key JOBS_SSL_KEYFILE {settings.ssl_keyfile}: "
                f"{getattr(exc, 'reason', None) or exc.strerror or type(exc).__name__}; {hint}"
            ) from None
    return context


def _settings_agree(s: Settings) -> None:
    """ValueError for settings that each pass but cannot work together."""
    if s.sasl_password is not None and s.sasl_password_file is not None:
        raise ValueError("give JOBS_SASL_PASSWORD or JOBS_SASL_PASSWORD_FILE, not both")
    if s.sasl_password is not None and not s.sasl_password.get_secret_value():
        raise ValueError("JOBS_SASL_PASSWORD is empty")
    if s.heartbeat_interval_ms >= s.session_timeout_ms:
        raise ValueError(
            f"JOBS_HEARTBEAT_INTERVAL_MS ({s.heartbeat_interval_ms}) must be below "
            f"JOBS_SESSION_TIMEOUT_MS ({s.session_timeout_ms}); a third of it is usual"
        )


def _file_problem(name: str, path: Path | None, exc: OSError | ssl.SSLError) -> str:
    """Why the file of setting `name` cannot be used, in one line."""
    if isinstance(exc, ssl.SSLError):
        return f"{name} {path} holds no usable PEM certificate ({exc.reason or exc})"
    return f"cannot read {name} {path}: {exc.strerror or exc}"
