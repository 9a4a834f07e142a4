"""Security settings, secrets kept out of sight, and the least ACLs of each role."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.acls import PrincipalError, rules
from worker.kafkaio import connection, librdkafka_config
from worker.settings import Settings, Topics

JOBCTL = [sys.executable, "-m", "worker.cli"]
SECRET = "correct-horse-battery-staple"


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
    done = subprocess.run(
        [*JOBCTL, "status", "--bootstrap", "127.0.0.1:1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
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
