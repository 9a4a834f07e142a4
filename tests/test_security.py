"""Security settings, secrets kept out of sight, and the least ACLs of each role."""

from __future__ import annotations

import io
import json
import logging
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from hypothesis import given, strategies as st
from pydantic import ValidationError

from worker.acls import PrincipalError, rules
from worker.audit.replay import _job, _settings_of
from worker.client import JobClient
from worker.kafkaio import connection, librdkafka_config
from worker.logs import configure
from worker.settings import Settings, SettingsError, Topics

JOBCTL = [sys.executable, "-m", "worker.cli"]
SECRET = "correct-horse-battery-staple"


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `argv` with only `env`, its output captured as text."""
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def test_sasl_settings_need_a_user_and_a_password() -> None:
    """A SASL protocol without credentials is refused with the setting to give."""
    with pytest.raises(ValidationError, match="JOBS_SASL_USERNAME"):
        Settings(security_protocol="SASL_SSL")
    with pytest.raises(ValidationError, match="JOBS_SASL_PASSWORD"):
        Settings(security_protocol="SASL_PLAINTEXT", sasl_username="orchestrator")
    with pytest.raises(ValidationError, match="go together"):
        Settings(security_protocol="SSL", ssl_certfile=Path("client.pem"))


def test_the_password_never_shows_in_repr_or_errors(tmp_path: Path) -> None:
    """repr, str and validation errors of settings hide the password; a file can hold it."""
    s = Settings(security_protocol="SASL_PLAINTEXT", sasl_username="u", sasl_password=SECRET)
    assert SECRET not in repr(s)
    assert SECRET not in str(s)
    assert SECRET not in s.model_dump_json()
    with pytest.raises(ValidationError) as caught:
        Settings(sasl_password=SECRET, batch_max_records=0)
    assert SECRET not in str(caught.value)
    secret_file = tmp_path / "password"
    secret_file.write_text(SECRET + "\n")
    from_file = Settings(
        security_protocol="SASL_SSL", sasl_username="u", sasl_password_file=secret_file
    )
    assert from_file.password() == SECRET
    assert SECRET not in repr(from_file)


def test_one_connection_for_aiokafka_and_librdkafka() -> None:
    """Both client libraries get the same protocol, mechanism and credentials."""
    s = Settings(
        bootstrap_servers="kafka:9093",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="producer",
        sasl_password=SECRET,
    )
    kwargs = connection(s)
    assert (kwargs["security_protocol"], kwargs["sasl_mechanism"]) == (
        "SASL_PLAINTEXT",
        "SCRAM-SHA-256",
    )
    assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == ("producer", SECRET)
    conf = librdkafka_config(s)
    assert (conf["sasl.mechanisms"], conf["sasl.username"], conf["sasl.password"]) == (
        "SCRAM-SHA-256",
        "producer",
        SECRET,
    )
    assert "ssl_context" not in kwargs
    assert connection(Settings())["security_protocol"] == "PLAINTEXT"


def test_a_missing_password_file_is_one_clear_line(tmp_path: Path) -> None:
    """jobctl with an unreadable password file says which file, and nothing else."""
    env = {
        "JOBS_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "JOBS_SASL_USERNAME": "reader",
        "JOBS_SASL_PASSWORD_FILE": str(tmp_path / "absent"),
        "PATH": "/usr/bin:/bin",
    }
    done = _run([*JOBCTL, "status", "--bootstrap", "127.0.0.1:1"], env)
    assert done.returncode != 0
    assert "JOBS_SASL_PASSWORD_FILE" in done.stderr
    assert "Traceback" not in done.stderr


def test_each_role_gets_only_what_it_needs() -> None:
    """Only the orchestrator may write status, state and dead letters; producers and
    executors each write their one input topic; readers write nothing."""
    topics = Topics.for_prefix("jobs")
    got = rules(
        topics,
        "jobs.orchestrator",
        orchestrator="User:orchestrator",
        producer="User:producer",
        executor="User:executor",
        reader="User:reader",
    )
    writes = {(r.principal, r.name) for r in got if r.operation == "WRITE"}
    for topic in (topics.status, topics.state, topics.dlq):
        assert {p for p, name in writes if name == topic} == {"User:orchestrator"}
    assert {p for p, name in writes if name == topics.requests} == {
        "User:orchestrator",
        "User:producer",
    }
    assert {p for p, name in writes if name == topics.results} == {
        "User:orchestrator",
        "User:executor",
    }
    assert not [r for r in got if r.principal == "User:reader" and r.operation != "READ"]
    transactional = [r for r in got if r.resource == "TRANSACTIONAL_ID"]
    assert [(r.principal, r.pattern, r.name) for r in transactional] == [
        ("User:orchestrator", "PREFIXED", "jobs.orchestrator.")
    ]
    with pytest.raises(PrincipalError, match="User:<name>"):
        rules(topics, "g", orchestrator="alice", producer="User:p", executor="User:e")


def test_jobctl_acls_prints_them_as_json() -> None:
    """`jobctl acls --json` lists every rule, machine-readable and nothing else on stdout."""
    done = subprocess.run(
        [
            *JOBCTL,
            "acls",
            "--orchestrator",
            "User:o",
            "--producer",
            "User:p",
            "--executor",
            "User:e",
            "--prefix",
            "shop",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert {r["principal"] for r in listed} == {"User:o", "User:p", "User:e"}
    assert all(r["name"].startswith("shop.") for r in listed)


def _shows_the_secret(text: str) -> bool:
    # Any piece of it: pydantic shortens a long input to its two ends.
    return any(SECRET[i : i + 8] in text for i in range(len(SECRET) - 7))


def test_a_refused_setting_does_not_echo_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings refused as a whole (SASL without a user, a certificate without its key) or
    a password that is not text say what is wrong, and neither their text nor their repr
    shows the password given."""
    monkeypatch.delenv("JOBS_SASL_USERNAME", raising=False)
    monkeypatch.setenv("JOBS_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("JOBS_SASL_PASSWORD", SECRET)
    with pytest.raises(SettingsError, match="JOBS_SASL_USERNAME") as no_user:
        JobClient()
    monkeypatch.setenv("JOBS_SASL_USERNAME", "producer")
    with pytest.raises(ValidationError, match="go together") as half_tls:
        Settings(ssl_certfile=Path("client.pem"))
    with pytest.raises(ValidationError, match="sasl_password") as not_text:
        Settings(sasl_password=[SECRET])
    for caught in (no_user, half_tls, not_text):
        assert not _shows_the_secret(str(caught.value)), caught.value
        assert not _shows_the_secret(repr(caught.value)), caught.value


def test_a_refused_setting_in_a_traceback_shows_no_password() -> None:
    """A command building its settings from JOBS_* dies with a traceback that names the
    missing setting, not the password."""
    env = {
        "JOBS_SECURITY_PROTOCOL": "SASL_SSL",
        "JOBS_SASL_PASSWORD": SECRET,
        "PATH": "/usr/bin:/bin",
    }
    done = _run([sys.executable, "-m", "worker.devtools.floor"], env)
    assert done.returncode != 0
    assert "JOBS_SASL_USERNAME" in done.stderr
    assert not _shows_the_secret(done.stderr), done.stderr


def test_a_password_file_that_is_not_utf8_is_named_without_its_bytes(tmp_path: Path) -> None:
    """The error names the setting and the file, and shows no byte of what it holds."""
    secret_file = tmp_path / "password"
    secret_file.write_bytes(b"horse\xffbattery")
    with pytest.raises(ValidationError) as caught:
        Settings(security_protocol="SASL_SSL", sasl_username="u", sasl_password_file=secret_file)
    shown = str(caught.value)
    assert f"JOBS_SASL_PASSWORD_FILE {secret_file} is not UTF-8" in shown
    # What jobctl reads of it, too (`cli._settings`).
    listed = repr(caught.value.errors(include_url=False, include_input=False))
    for text in (shown, repr(caught.value), listed):
        assert "horse" not in text
        assert "battery" not in text
        assert "xff" not in text


async def test_a_clients_keywords_are_validated_as_the_environment_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`JobClient(sasl_password=...)` keeps the password secret and usable, over JOBS_*
    variables and over given settings; what the settings refuse, a keyword may not bring."""
    monkeypatch.setenv("JOBS_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("JOBS_SASL_USERNAME", "from-env")
    monkeypatch.setenv("JOBS_SASL_PASSWORD", "from-env-password")
    client = JobClient(
        bootstrap_servers="127.0.0.1:1", sasl_username="producer", sasl_password=SECRET
    )
    await client.close()
    assert (client.settings.sasl_username, client.settings.password()) == ("producer", SECRET)
    assert client.settings.security_protocol == "SASL_PLAINTEXT"  # from JOBS_*
    assert SECRET not in repr(client.settings)
    given = Settings(security_protocol="SASL_SSL", sasl_username="executor", sasl_password="old")
    client = JobClient(given, sasl_password=SECRET)
    await client.close()
    assert (client.settings.sasl_username, client.settings.password()) == ("executor", SECRET)
    assert client.settings.security_protocol == "SASL_SSL"  # from the given settings
    assert SECRET not in repr(client.settings)
    monkeypatch.delenv("JOBS_SASL_USERNAME")
    with pytest.raises(SettingsError, match="JOBS_SASL_USERNAME"):
        JobClient(Settings(security_protocol="PLAINTEXT"), security_protocol="SASL_SSL")


def test_a_replay_process_logs_in_as_its_parent(tmp_path: Path) -> None:
    """The job a replay process reads gives it the settings of the process that started it,
    the password itself (not its mask) among them."""
    settings = Settings(
        bootstrap_servers="kafka:9093",
        security_protocol="SASL_SSL",
        sasl_username="reader",
        sasl_password=SECRET,
        topic_prefix="shop",
    )
    job = _job(settings, tmp_path / "runs.db", tmp_path / ".lock", {0: (0, 10), 3: (5, 7)})
    child = _settings_of(json.loads(job))
    assert child.password() == SECRET
    assert child == settings


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The standard library's root logger as it was, after a test configures it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("root_logging")
def test_a_console_traceback_shows_no_local_values() -> None:
    """An exception logged in console format, by a library through the standard library
    or by us through structlog, shows its traceback but not the values of its frames'
    locals (a connection's frame holds the password)."""
    out = io.StringIO()
    configure("info", "console", stream=out)

    def connect(sasl_plain_password: str) -> None:
        raise ConnectionError("authentication failed")

    try:
        connect(SECRET)
    except ConnectionError:
        logging.getLogger("aiokafka.conn").error("cannot connect", exc_info=True)
        structlog.get_logger("worker").exception("cannot connect")
    shown = out.getvalue()
    assert SECRET not in shown
    assert shown.count("in connect") == 2, shown  # both tracebacks, down to the frame
    assert shown.count("ConnectionError: authentication failed") == 2, shown


@pytest.mark.parametrize(
    "servers",
    ["host:notaport", "", " , ,", "host:0", "host:70000", "a b:9092", "host:9092:1", "[::1:9092"],
)
def test_bootstrap_servers_that_are_not_addresses_are_one_clear_line(servers: str) -> None:
    """A server list aiokafka could only die on (a port that is not a number, nothing at
    all) stops every command at once with a line naming the setting, not a traceback."""
    done = _run([*JOBCTL, "status"], {"JOBS_BOOTSTRAP_SERVERS": servers, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: bad settings: JOBS_BOOTSTRAP_SERVERS: "), done.stderr
    assert "Traceback" not in done.stderr
    assert "Value error" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize(
    "servers", ["kafka:9092", " a:1 , b:65535 ", "kafka", "[::1]:9092", "10.0.0.1:9093,[fe80::1]"]
)
def test_bootstrap_servers_as_kafka_takes_them(servers: str) -> None:
    assert Settings(bootstrap_servers=servers).bootstrap_servers == servers


@given(st.text(max_size=60))
def test_any_bootstrap_text_is_taken_or_refused_with_a_reason(servers: str) -> None:
    """Hostile text (control characters, surrogates, separators) is refused as a setting."""
    refused: list[object] = []
    try:
        Settings(bootstrap_servers=servers)
    except ValidationError as exc:
        refused = [e["loc"] for e in exc.errors()]
    assert refused in ([], [("bootstrap_servers",)])


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed certificate with its plain key, the same key encrypted, and junk."""
    d = tmp_path_factory.mktemp("tls")
    cert, key, locked = d / "client.pem", d / "client.key", d / "locked.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
        str(cert), "-days", "2", "-subj", "/CN=client",
    )  # fmt: skip
    _openssl(
        "pkey", "-in", str(key), "-aes256", "-passout", f"pass:{SECRET}", "-out", str(locked)
    )  # fmt: skip
    junk = d / "junk.pem"
    junk.write_bytes(bytes(range(256)) * 4)
    return {"cert": cert, "key": key, "locked": locked, "junk": junk, "dir": d}


def test_tls_files_that_cannot_be_used_are_named(certificates: dict[str, Path]) -> None:
    """A missing, unreadable or non-certificate CA file, and a certificate whose key is
    missing or encrypted without its password, are refused as settings naming the file;
    an encrypted key never prompts on the terminal."""
    missing = certificates["dir"] / "absent.pem"
    cases = [
        ({"ssl_cafile": missing}, "cannot read JOBS_SSL_CAFILE"),
        ({"ssl_cafile": certificates["dir"]}, "JOBS_SSL_CAFILE"),
        ({"ssl_cafile": certificates["junk"]}, "no usable PEM certificate"),
        ({"ssl_certfile": certificates["cert"], "ssl_keyfile": missing}, "is not a file"),
        (
            {"ssl_certfile": certificates["cert"], "ssl_keyfile": certificates["locked"]},
            "give its password as JOBS_SSL_KEY_PASSWORD",
        ),
        (
            {
                "ssl_certfile": certificates["cert"],
                "ssl_keyfile": certificates["locked"],
                "ssl_key_password": "wrong",
            },
            "JOBS_SSL_KEYFILE .*check JOBS_SSL_KEY_PASSWORD",
        ),
        (  # not PEM at all: the password is not what to look at
            {
                "ssl_certfile": certificates["junk"],
                "ssl_keyfile": certificates["junk"],
                "ssl_key_password": "given",
            },
            "both must be PEM files",
        ),
    ]
    for files, says in cases:
        with pytest.raises(ValidationError, match=says) as refused:
            Settings(security_protocol="SSL", **files)  # type: ignore[arg-type]
        assert not _shows_the_secret(str(refused.value))


def test_an_encrypted_key_with_its_password_connects_both_libraries(
    certificates: dict[str, Path],
) -> None:
    """The key's password goes to aiokafka's TLS context and to librdkafka, and shows
    nowhere else."""
    s = Settings(
        security_protocol="SSL",
        ssl_certfile=certificates["cert"],
        ssl_keyfile=certificates["locked"],
        ssl_key_password=SECRET,
    )
    assert connection(s)["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    assert librdkafka_config(s)["ssl.key.password"] == SECRET
    assert not _shows_the_secret(repr(s))


def test_jobctl_with_a_missing_ca_file_says_which(certificates: dict[str, Path]) -> None:
    env = {
        "JOBS_SECURITY_PROTOCOL": "SSL",
        "JOBS_SSL_CAFILE": str(certificates["dir"] / "absent.pem"),
        "PATH": "/usr/bin:/bin",
    }
    done = _run([*JOBCTL, "status", "--bootstrap", "127.0.0.1:1"], env)
    assert done.returncode == 1
    assert "JOBS_SSL_CAFILE" in done.stderr
    assert "absent.pem" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_password_given_twice_or_empty_is_refused(tmp_path: Path) -> None:
    """Both a password and a password file (which would win?) or an empty password (which
    no broker takes) are refused, naming the settings and not the password."""
    secret_file = tmp_path / "password"
    secret_file.write_text(SECRET)
    with pytest.raises(ValidationError, match="not both") as twice:
        Settings(
            security_protocol="SASL_SSL",
            sasl_username="u",
            sasl_password=SECRET,
            sasl_password_file=secret_file,
        )
    assert not _shows_the_secret(str(twice.value))
    with pytest.raises(ValidationError, match="JOBS_SASL_PASSWORD is empty"):
        Settings(security_protocol="SASL_SSL", sasl_username="u", sasl_password="")


def test_a_heartbeat_no_shorter_than_the_session_is_refused() -> None:
    with pytest.raises(ValidationError, match="must be below JOBS_SESSION_TIMEOUT_MS"):
        Settings(heartbeat_interval_ms=20_000, session_timeout_ms=10_000)
    assert Settings(heartbeat_interval_ms=3_000, session_timeout_ms=10_000)


def test_a_password_sent_in_the_clear_is_warned_of() -> None:
    """PLAIN over SASL_PLAINTEXT sends the password as it is: the worker warns at start
    (aiokafka's own warning is silenced with its other lines); SCRAM, or TLS, does not."""
    from worker.kafkaio import cleartext_password

    def warned(protocol: str, mechanism: str) -> str | None:
        given = Settings(
            security_protocol=protocol,
            sasl_mechanism=mechanism,
            sasl_username="u",
            sasl_password=SECRET,
        )
        return cleartext_password(given)

    warning = warned("SASL_PLAINTEXT", "PLAIN")
    assert warning is not None
    assert "in the clear" in warning
    assert SECRET not in warning
    assert warned("SASL_PLAINTEXT", "SCRAM-SHA-512") is None
    assert warned("SASL_SSL", "PLAIN") is None
