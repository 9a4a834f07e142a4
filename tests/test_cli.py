"""`jobctl` as a user runs it: output, exit codes, and the errors that say what to fix."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from rich.console import Console
from rich.text import Text
from typer.testing import CliRunner

from schemas import EventType, RunStatus, StatusEvent
from tests.conftest import publish_status
from worker import cli
from worker.cli import app
from worker.client.answers import RunInfo
from worker.client.watch import StatusTail
from worker.core.runs import RunRow
from worker.engine.sqlfile import UPSERT_RUN, run_params
from worker.engine.store import Store
from worker.engine.topics import wait_for_leaders
from worker.kafkaio import connection
from worker.settings import Settings, Topics

pytestmark = pytest.mark.kafka
runner = CliRunner()
JOBCTL = [sys.executable, "-m", "worker.cli"]
ACL_ROLES = ["--orchestrator", "User:o", "--producer", "User:p", "--executor", "User:e"]


def _fails_in_one_line(*args: str) -> str:
    """Run `jobctl *args`, which must exit 1 without a traceback; its stderr."""
    result = subprocess.run(
        [*JOBCTL, *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_topics_create_is_idempotent_and_describe_lists_them(
    kafka_bootstrap: str, prefix: str
) -> None:
    """Creating topics twice succeeds; describe shows all five with their partition count."""
    args = ["topics", "create", "--partitions", "3", "-b", kafka_bootstrap, "--prefix", prefix]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.output.count("created") == 5
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert second.output.count("exists") == 5
    described = runner.invoke(
        app, ["topics", "describe", "-b", kafka_bootstrap, "--prefix", prefix]
    )
    assert described.exit_code == 0, described.output
    for role in ("requests", "results", "status", "state", "dlq"):
        assert re.search(rf"{re.escape(prefix)}\.{role}\s.*\b3\b", described.output)
    assert "LogAppendTime" in described.output
    assert "compact" in described.output


def test_topics_create_refuses_another_partition_count(kafka_bootstrap: str, prefix: str) -> None:
    """Asking for another count than the existing topics have fails and names each topic."""
    base = ["topics", "create", "-b", kafka_bootstrap, "--prefix", prefix]
    assert runner.invoke(app, [*base, "--partitions", "2"]).exit_code == 0
    clash = runner.invoke(app, [*base, "--partitions", "4"])
    assert clash.exit_code == 1
    assert f"{prefix}.requests has 2" in clash.output
    assert "same count" in clash.output


def test_topics_describe_reports_missing_topics(kafka_bootstrap: str, prefix: str) -> None:
    """Describing topics that do not exist says so and how to create them."""
    result = runner.invoke(app, ["topics", "describe", "-b", kafka_bootstrap, "--prefix", prefix])
    assert result.exit_code == 1
    assert "jobctl topics create" in result.output


def test_unreachable_broker_is_one_clear_line() -> None:
    """A bootstrap address where nothing listens gives one error line and exit code 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stderr = _fails_in_one_line("topics", "describe", "-b", f"127.0.0.1:{port}")
    assert "cannot connect to Kafka" in stderr
    assert "JOBS_BOOTSTRAP_SERVERS" in stderr


def test_schemas_on_disk_are_current() -> None:
    """`jobctl schemas export --check` passes on the committed schema files."""
    result = runner.invoke(app, ["schemas", "export", "--check"])
    assert result.exit_code == 0, result.output


def test_schemas_check_fails_on_stale_files(tmp_path: Path) -> None:
    """`--check` fails and names the stale file when a schema on disk differs."""
    assert runner.invoke(app, ["schemas", "export", "--dir", str(tmp_path)]).exit_code == 0
    (tmp_path / "status_event.schema.json").write_text("{}")
    result = runner.invoke(app, ["schemas", "export", "--dir", str(tmp_path), "--check"])
    assert result.exit_code == 1
    assert "status_event.schema.json" in result.output


def test_broker_without_java_says_what_to_install(tmp_path: Path) -> None:
    """Without `java` on PATH, `jobctl broker` names what to install and exits non-zero."""
    env = {**os.environ, "PATH": str(tmp_path)}
    result = subprocess.run(
        [*JOBCTL, "broker"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert result.returncode == 1
    assert "`java` was not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_failed_download_is_reported(tmp_path: Path) -> None:
    """When Maven cannot fetch the jars, the error says so and shows Maven's own words."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mvn = bin_dir / "mvn"
    mvn.write_text("#!/bin/sh\necho 'Could not resolve org.apache.kafka:kafka_2.13' >&2\nexit 1\n")
    mvn.chmod(0o755)
    java = subprocess.run(["which", "java"], capture_output=True, text=True, check=True)
    (bin_dir / "java").symlink_to(java.stdout.strip())
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "JOBS_KAFKA_CACHE": str(tmp_path / "cache"),
    }
    result = subprocess.run(
        [*JOBCTL, "broker", "--fetch-only"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "Maven could not download Apache Kafka" in result.stderr
    assert "Could not resolve" in result.stderr
    assert not (tmp_path / "cache" / "kafka_2.13-4.1.1" / ".complete").exists()


@contextlib.contextmanager
def _broker(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`jobctl broker *args` running, and the address it printed; killed if still running."""
    with subprocess.Popen(
        [*JOBCTL, "broker", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a shell without job control starts background commands (such
        # as a test run under `nohup ... &`) with SIGINT ignored, and the child inherits it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    ) as proc:
        try:
            assert proc.stdout is not None
            address = None
            for line in proc.stdout:
                if re.fullmatch(r"127\.0\.0\.1:\d+", line.strip()):
                    address = line.strip()
                    break
            assert address is not None, proc.stderr.read() if proc.stderr else ""
            yield proc, address
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _ctrl_c(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    # communicate() drains both pipes, so a chatty shutdown cannot block on them.
    out, errors = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"{out}\n{errors}"


def test_broker_prints_its_address_and_stops_on_ctrl_c() -> None:
    """`jobctl broker` prints 127.0.0.1:PORT, serves it, and on Ctrl-C stops the JVM."""
    with _broker() as (proc, address):
        port = int(address.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        _ctrl_c(proc)
        with (
            pytest.raises(ConnectionRefusedError),
            socket.create_connection(("127.0.0.1", port), timeout=2),
        ):
            pass


def test_broker_keeps_its_topics_in_a_data_dir_across_restarts(tmp_path: Path) -> None:
    """`jobctl broker --data-dir D`: topics made on it are there when a broker starts again
    on D (to try a worker through a broker's restart); a file as D is one line."""
    data = tmp_path / "kafka"

    def topics(command: str, address: str) -> str:
        result = subprocess.run(
            [*JOBCTL, "topics", command, "--bootstrap", address, "--prefix", "kept"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    with _broker("--data-dir", str(data)) as (proc, address):
        assert "kept.requests: created" in topics("create", address)
        _ctrl_c(proc)
    with _broker("--data-dir", str(data)) as (proc, address):
        assert "kept.requests: exists" in topics("create", address)
        _ctrl_c(proc)
    file = tmp_path / "kafka" / "server.properties"
    assert "is not a directory" in _fails_in_one_line("broker", "--data-dir", str(file))


def test_demo_plays_its_scenario(kafka_bootstrap: str) -> None:
    """The demo runs its scenario on a broker, prints events and runs, and exits 0."""
    result = subprocess.run(
        [*JOBCTL, "demo", "--bootstrap", kafka_bootstrap],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for text in ("refused", "failed", "malformed_json", "rejected", "every outcome matched"):
        assert text in result.stdout


def test_run_refuses_mismatched_partition_counts(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    """`jobctl run` on topics with differing partition counts exits 1 naming each count."""
    topics = Topics.for_prefix(prefix)

    async def make() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(n, 3 if n == topics.dlq else 2, 1) for n in topics.all()]
            )
            await wait_for_leaders(admin, list(topics.all()))
        finally:
            await admin.close()

    asyncio.run(make())
    stderr = _fails_in_one_line(
        "run", "-b", kafka_bootstrap, "--prefix", prefix, "--db", str(tmp_path / "j.db")
    )
    assert f"{prefix}.dlq=3" in stderr
    assert f"{prefix}.requests=2" in stderr


def test_run_refuses_an_invalid_settings_file(tmp_path: Path) -> None:
    """`jobctl run` with an invalid TOML file exits 1 naming the file, the line and the field."""
    bad = tmp_path / "jobs.toml"
    bad.write_text('[defaults]\npolicy = "reject"\n\n[job_types.etl]\npolicy = "sometimes"\n')
    stderr = _fails_in_one_line("run", "--config", str(bad), "--db", str(tmp_path / "j.db"))
    assert f"{bad}:5:" in stderr
    assert "job_types.etl.policy" in stderr


def test_version_and_shell_completion_are_offered() -> None:
    """`jobctl --version` prints the installed version; --help offers shell completion."""
    from importlib.metadata import version

    shown = subprocess.run(
        [*JOBCTL, "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert shown.returncode == 0
    assert shown.stdout.strip() == f"jobctl {version('job-orchestrator')}"
    helped = subprocess.run(
        [*JOBCTL, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert "--install-completion" in helped.stdout


@pytest.mark.parametrize(
    "sizes",
    ["abc", "-5", "1,,2", "0", "1000,x", "\udcff\udcfe", "9" * 5000, "1" + "0" * 9, "1e6", "[[[["],
)
def test_bench_refuses_growth_sizes_it_cannot_run(sizes: str) -> None:
    """`--growth` takes counts from 1 to 10,000,000: anything else is one line naming the
    option, before a broker is started."""
    result = runner.invoke(app, ["bench", "--growth", sizes])
    assert result.exit_code == 2
    assert "--growth takes counts from 1 to 10,000,000" in result.output
    assert "starting a local Kafka broker" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bench_growth_only_needs_sizes() -> None:
    """`--growth-only` with `--growth none` has nothing to measure: one line, no broker."""
    result = runner.invoke(app, ["bench", "--growth-only", "--growth", "none"])
    assert result.exit_code == 2
    assert "--growth-only needs sizes" in result.output
    assert "starting a local Kafka broker" not in result.output


# --- text from outside is printed as it is, never as rich markup ----------------------------

HOSTILE_JOB_TYPE = "etl[/]"  # valid on the wire; as markup, a closing tag with nothing open
HOSTILE_REASON = "[red]x[/red] \x1b[2J"  # markup to spoof a style, and a clear-screen escape


def _captured(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """What `jobctl` prints to stdout from now on, without colour, in lines wide enough."""
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=400, color_system=None))
    return out


def _hostile_event() -> StatusEvent:
    return StatusEvent(
        event_id="e-1",
        type=EventType.CANCELLED,
        status=RunStatus.CANCELLED,
        job_type=HOSTILE_JOB_TYPE,
        client_id="[bold]c[/]",
        run_id="[link=http://x]r[/link]",
        reason=HOSTILE_REASON,
        metrics={"[i]k": "[/i]"},
        occurred_at=datetime.now(UTC),
    )


def test_an_event_prints_its_text_literally(monkeypatch: pytest.MonkeyPatch) -> None:
    """`watch`, `submit`, `cancel` print an event's job type, run ID, metrics and reason as
    written: `etl[/]` raises no MarkupError, `[red]x[/red]` is not shown red, and an escape
    sequence is shown, not sent to the terminal."""
    out = _captured(monkeypatch)
    cli._print_event(_hostile_event(), as_json=False)
    printed = out.getvalue()
    assert printed.startswith("cancelled etl[/] run [link=http://x]r[/link] status CANCELLED")
    assert '{"[i]k": "[/i]"}' in printed
    assert "— [red]x[/red] \\x1b[2J" in printed
    assert "\x1b" not in printed
    assert len(printed.splitlines()) == 1


def test_a_sent_request_id_prints_literally(monkeypatch: pytest.MonkeyPatch) -> None:
    """`submit --no-wait --request-id '[/]'` prints the ID it sent as given."""
    out = _captured(monkeypatch)
    cli._print_event("[/]", as_json=False)
    assert out.getvalue() == "sent request [/]\n"


def test_the_status_table_prints_its_text_literally(monkeypatch: pytest.MonkeyPatch) -> None:
    """`status` shows job types, run IDs and client IDs from the state topic as written."""
    out = _captured(monkeypatch)
    info = RunInfo(HOSTILE_JOB_TYPE, "[red]r[/red]", "[b]c", "q", datetime.now(UTC), {})
    cli.console.print(cli._jobs_table([("RUNNING", info)]))
    printed = out.getvalue()
    for text in (HOSTILE_JOB_TYPE, "[red]r[/red]", "[b]c"):
        assert text in printed


def _store_with(path: Path, row: RunRow) -> None:
    """A worker's SQLite file at `path` holding `row`."""

    async def create() -> None:
        await (await Store.open(path)).close()

    asyncio.run(create())
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(UPSERT_RUN, run_params(row, retained=True))


def _run_row(**changes: Any) -> RunRow:
    at = datetime(2026, 11, 28, 9, 30, tzinfo=UTC)
    row = RunRow(
        run_id="261128-093000-0.1",
        job_type="etl",
        client_id=None,
        request_id="q",
        status=RunStatus.COMPLETED,
        partition=0,
        started_at=at,
        ended_at=at,
        initial_data={},
        metrics=None,
        reason=None,
    )
    return row.replace(**changes)


def test_runs_prints_the_file_s_text_literally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`runs` shows what the status topic said (through the file) as written."""
    path = tmp_path / "jobs.db"
    _store_with(
        path, _run_row(job_type=HOSTILE_JOB_TYPE, client_id="[red]c[/red]", metrics={"[/]": 1})
    )
    out = _captured(monkeypatch)
    result = runner.invoke(app, ["runs", "--db", str(path)])
    assert result.exit_code == 0, result.output
    for text in (HOSTILE_JOB_TYPE, "[red]c[/red]", '{"[/]": 1}'):
        assert text in out.getvalue()


def test_runs_client_filter_compares_as_the_worker_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`runs --client-id acme` lists the runs of `Acme`: the worker counts `Acme` and `acme`
    as one client (trimmed, any case), and so does the filter, beyond ASCII too."""
    path = tmp_path / "jobs.db"
    _store_with(path, _run_row(run_id="261128-093000-0.1", client_id="Acme"))
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        for n, client in enumerate(["ACME", "acme2", "ÉMILE"], start=2):
            row = _run_row(run_id=f"261128-093000-0.{n}", client_id=client)
            db.execute(UPSERT_RUN, run_params(row, retained=True))
    for asked, found, left in (
        ("acme", ["Acme", "ACME"], ["acme2", "ÉMILE"]),
        (" aCmE ", ["Acme", "ACME"], ["acme2", "ÉMILE"]),
        ("émile", ["ÉMILE"], ["Acme", "acme2"]),
    ):
        out = _captured(monkeypatch)
        result = runner.invoke(app, ["runs", "--db", str(path), "--client-id", asked])
        assert result.exit_code == 0, result.output
        for client in found:
            assert f" {client} " in out.getvalue(), (asked, out.getvalue())
        for client in left:
            assert f" {client} " not in out.getvalue(), (asked, out.getvalue())


def test_paths_given_print_literally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A path the user gives (`--dir`, `--db`, `--json`) is printed as given."""
    target = tmp_path / "a[/]b"
    out = _captured(monkeypatch)
    result = runner.invoke(app, ["schemas", "export", "--dir", str(target)])
    assert result.exit_code == 0, result.output
    assert f"wrote {target}/" in out.getvalue()


async def test_watch_prints_a_hostile_event_and_goes_on(topics: Settings) -> None:
    """`jobctl watch` prints an event whose job type is `etl[/]` literally and keeps going;
    it used to lose its reader task to the MarkupError and then wait forever."""
    hostile = _hostile_event()
    plain = hostile.model_copy(update={"event_id": "e-2", "job_type": "etl", "reason": "ok"})
    await publish_status(topics, [hostile, plain], partitions=2)
    base = ["-b", topics.bootstrap_servers, "--prefix", topics.topic_prefix]
    result = await asyncio.to_thread(
        subprocess.run,
        [*JOBCTL, "watch", "--from-beginning", "--count", "2", *base],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cancelled etl[/] run" in result.stdout
    assert "[red]x[/red]" in result.stdout
    assert "— ok" in result.stdout
    assert "Traceback" not in result.stderr


async def test_a_failing_on_item_ends_the_wait_with_its_error(topics: Settings) -> None:
    """An exception of `on_item` stops the tail's reading: `wait_until` (keep=False) and
    `wait_for` (keep=True) raise it at once, instead of waiting for what cannot come."""

    def explode(item: Any) -> None:
        raise RuntimeError(f"on_item failed on {item.event_id}")

    await publish_status(topics, [_hostile_event()], partitions=2)
    never = asyncio.Event()
    kafka = connection(topics)
    async with StatusTail(kafka, topics.topics, on_item=explode, keep=False) as tail:
        with pytest.raises(RuntimeError, match="on_item failed on e-1"):
            await asyncio.wait_for(tail.wait_until(never), 30)
    async with StatusTail(kafka, topics.topics, on_item=explode) as kept:
        with pytest.raises(RuntimeError, match="on_item failed on e-1"):
            # The event is kept before on_item sees it; the one asked for never comes.
            await kept.wait_event(timeout=30, event_id="e-2")


# --- --data and --metrics: what the worker would refuse, refused here in one line ------------


def _one_line_error(result: Any, *, after: str | None = None, code: int = 1) -> str:
    """The error line of a command that must fail with exit `code` (1, an error; 2, a usage
    error) and without a traceback (after a line starting with `after`, such as a progress
    bar, if given)."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    if after is not None and len(lines) == 2 and lines[0].startswith(after):
        lines = lines[1:]
    assert len(lines) == 1, result.output
    if lines[0].startswith("{"):  # `serve` off a terminal logs JSON lines: its last one
        logged = json.loads(lines[0])
        assert logged["level"] == "error", result.output
        return f"error: {logged['event']}"
    assert lines[0].startswith("error: "), result.output
    return lines[0]


NOWHERE = ["-b", "127.0.0.1:1", "--timeout", "1"]  # sent nowhere, should it get that far


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        pytest.param("[" * 100_000, "nested too deeply", id="deep-arrays"),
        pytest.param('{"a":' * 32 + "1" + "}" * 32, "nested too deeply", id="one-too-deep"),
        pytest.param('{"rows": ' + "9" * 5000 + "}", "5000 digits is too long", id="long-int"),
        pytest.param('{"rows": -' + "9" * 5000 + "}", "5000 digits is too long", id="long-neg"),
        pytest.param('{"rows": 1e400}', "the number 1e400 is too large", id="huge-float"),
        pytest.param('{"rows": NaN}', "NaN is not a JSON number", id="nan"),
        pytest.param('{"a": "\\ud800"}', "lone UTF-16 surrogate", id="lone-surrogate"),
        pytest.param('{"a": "\udcff"}', "not UTF-8 text", id="argument-not-utf8"),
        pytest.param(
            '{"a": "' + "x" * 70_000 + '"}',
            "--data is 70008 bytes as JSON; the limit is 65536 (JOBS_MAX_DATA_BYTES)",
            id="too-large",
        ),
        pytest.param("[1]", "must be a JSON object", id="not-an-object"),
        pytest.param("{", "not valid JSON", id="not-json"),
    ],
)
def test_data_the_worker_would_refuse_is_one_line(value: str, fragment: str) -> None:
    """`--data` JSON that the worker would refuse (or json.loads could not take) is a line
    naming the option and the problem, before anything is sent: a usage error, exit 2."""
    result = runner.invoke(app, ["submit", "etl", "--data", value, *NOWHERE])
    line = _one_line_error(result, code=2)
    assert "--data" in line
    assert fragment in line
    assert "cannot connect" not in line


def test_metrics_the_worker_would_refuse_is_one_line() -> None:
    """`complete` and `fail` check `--metrics` as `submit` checks `--data`: exit 2."""
    for command in ("complete", "fail"):
        for metrics, why in (("[" * 100_000, "nested too deeply"), ('{"a":NaN}', "NaN")):
            args = [command, "etl", "261128-093000-0.1", "--metrics", metrics, *NOWHERE]
            line = _one_line_error(runner.invoke(app, args), code=2)
            assert "--metrics" in line
            assert why in line


def test_data_as_deep_as_the_worker_takes_is_sent() -> None:
    """An object 31 deep (the request around it makes 32, JOBS_MAX_NESTING_DEPTH) and at
    the size limit passes the checks: here it then finds no broker."""
    for value in ('{"a":' * 31 + "1" + "}" * 31, '{"a": "' + "x" * (65_536 - 8) + '"}'):
        line = _one_line_error(runner.invoke(app, ["submit", "etl", "--data", value, *NOWHERE]))
        assert "cannot connect to Kafka" in line


# --- --db: a file that cannot be one is a line naming it ---------------------------------------


def _random_file(path: Path) -> Path:
    path.write_bytes(random.Random(7).randbytes(8192))
    return path


def test_runs_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    """`runs --db <random bytes>` says the file is damaged, in one line naming it."""
    path = _random_file(tmp_path / "noise.db")
    line = _one_line_error(runner.invoke(app, ["runs", "--db", str(path)]))
    assert str(path) in line
    assert "not a database" in line


def test_runs_refuses_another_programs_sqlite_file_and_leaves_it_as_it_is(
    tmp_path: Path,
) -> None:
    """`runs`, `serve` and `replay --db` on a SQLite file of another program's (tables, none
    of the worker's) is a line naming the file and its tables, escaped; nothing is added to
    the file (the worker's tables used to be)."""
    path = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE notes (body TEXT)")
        db.execute('CREATE TABLE "red\x1b[31m" (x)')
        db.execute("INSERT INTO notes VALUES ('keep me')")
    for command, *more in (["runs"], ["serve", *NOWHERE[:2]], ["replay", *NOWHERE[:2]]):
        result = runner.invoke(app, [command, "--db", str(path), *more])
        line = _one_line_error(result, after="replaying" if command == "replay" else None)
        assert f"{path} is not a worker's SQLite file" in line, command
        assert "'notes'" in line
        assert "\\x1b" in line
        assert "\x1b" not in line
    with contextlib.closing(sqlite3.connect(path)) as db:
        tables = sorted(name for (name,) in db.execute("SELECT name FROM sqlite_master"))
        assert tables == ["notes", "red\x1b[31m"]
        assert db.execute("SELECT body FROM notes").fetchall() == [("keep me",)]
        assert db.execute("PRAGMA user_version").fetchone() == (0,)


def test_runs_refuses_a_directory(tmp_path: Path) -> None:
    """`runs --db <directory>` says it is a directory."""
    line = _one_line_error(runner.invoke(app, ["runs", "--db", str(tmp_path)]))
    assert f"{tmp_path} is a directory" in line


def test_runs_refuses_a_pipe(tmp_path: Path) -> None:
    """`runs --db <fifo>` says it is no regular file, instead of waiting on the pipe."""
    fifo = tmp_path / "pipe.db"
    os.mkfifo(fifo)
    line = _one_line_error(runner.invoke(app, ["runs", "--db", str(fifo)]))
    assert f"{fifo} is not a regular file" in line


def test_runs_refuses_a_row_it_cannot_read(tmp_path: Path) -> None:
    """A run row that is not as the worker writes it is a line naming the file."""
    path = tmp_path / "jobs.db"
    _store_with(path, _run_row())
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE runs SET status = 'SOMETIMES', metrics = '{'")
    line = _one_line_error(runner.invoke(app, ["runs", "--db", str(path)]))
    assert f"{path} holds a run that is not as the worker writes it" in line


def test_replay_refuses_a_directory_before_reading(tmp_path: Path) -> None:
    """`replay --db <directory>` says so before it connects to Kafka."""
    line = _one_line_error(runner.invoke(app, ["replay", "--db", str(tmp_path), *NOWHERE[:2]]))
    assert f"{tmp_path} is a directory" in line


def test_replay_refuses_a_path_in_no_directory(tmp_path: Path) -> None:
    """`replay --db missing/dir/x.db` names the directory that is not there."""
    path = tmp_path / "missing" / "x.db"
    line = _one_line_error(runner.invoke(app, ["replay", "--db", str(path), *NOWHERE[:2]]))
    assert f"there is no directory {path.parent}" in line


def test_replay_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    """`replay --db <random bytes>` says the file is damaged and what to do, before it
    connects to Kafka (the broker here answers nothing)."""
    path = _random_file(tmp_path / "noise.db")
    result = runner.invoke(app, ["replay", "--db", str(path), "-b", "127.0.0.1:1"])
    line = _one_line_error(result, after="replaying")
    assert str(path) in line
    assert "not a database" in line
    assert "move it away or give another --db" in line


def test_run_refuses_a_directory(tmp_path: Path) -> None:
    """`jobctl run --db <directory>` exits 1 with one line, before it connects."""
    result = subprocess.run(
        [*JOBCTL, "run", "--db", str(tmp_path), "-b", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    expected = f"error: {tmp_path} is a directory; --db (or JOBS_DB_PATH) names a SQLite file"
    assert result.stderr.strip() == expected


def test_run_logging_json_says_its_last_word_as_a_json_line_too(tmp_path: Path) -> None:
    """With JSON logs, the line saying why `jobctl run` stopped is one more JSON line (a log
    pipeline parses every line), not plain text after them; on a terminal, plain text."""
    result = subprocess.run(
        [*JOBCTL, "run", "--db", str(tmp_path / "j.db"), "-b", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "JOBS_LOG_FORMAT": "json", "JOBS_HTTP_PORT": "0"},
    )
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert lines[-1]["level"] == "error"
    assert lines[-1]["event"].startswith("cannot connect to Kafka")
    assert "JOBS_BOOTSTRAP_SERVERS" in lines[-1]["event"]


def test_verify_refuses_a_settings_file_nested_too_deeply(tmp_path: Path) -> None:
    """`verify --config` with arrays nested past Python's stack: one line naming the file."""
    bad = tmp_path / "jobs.toml"
    bad.write_text("[defaults]\ntimeout = " + "[" * 100_000 + "]" * 100_000 + "\n")
    line = _one_line_error(runner.invoke(app, ["verify", "--config", str(bad), *NOWHERE[:2]]))
    assert line == f"error: {bad}: arrays or inline tables nest too deeply"


def test_the_demo_prints_events_and_dead_letters_literally() -> None:
    """The demo's printer shows an event's text and a dead letter's reason as written (its
    scenario sends bad inputs on purpose): no markup read, no escape sent, one line each."""
    from schemas import DeadLetter, DeadLetterReason, Source
    from worker.devtools.demo import _print_item

    out = io.StringIO()
    show = _print_item(Console(file=out, force_terminal=True, width=400))
    show(_hostile_event())
    show(
        DeadLetter(
            reason=DeadLetterReason(code="schema_invalid", message=f"job_type {HOSTILE_REASON}"),
            source=Source(topic="jobs.requests", partition=0, offset=7),
            key=None,
            value=None,
            dead_lettered_at=datetime.now(UTC),
        )
    )
    lines = Text.from_ansi(out.getvalue()).plain.splitlines()
    assert len(lines) == 2, lines
    assert "etl[/]" in lines[0]
    assert "[red]x[/red] \\x1b[2J" in lines[0]
    assert "schema_invalid: job_type [red]x[/red] \\x1b[2J (from jobs.requests[0]@7)" in lines[1]
    assert "\x1b[2J" not in out.getvalue()  # styles are sent, the event's escape is not


def test_shown_escapes_what_would_act_on_the_terminal() -> None:
    """Control characters, bidirectional overrides and lone surrogates are written as
    escapes; markup and ordinary text (accents, emoji) are kept as they are."""
    from worker.shown import shown

    assert shown("a\x1b[2Jb\x9b\u202ec\u2066d").plain == "a\\x1b[2Jb\\x9b\\u202ec\\u2066d"
    assert shown("x\ud800y").plain == "x\\ud800y"
    assert shown("[red]é 😀[/red]").plain == "[red]é 😀[/red]"
    assert shown("one\ntwo").plain == "one\\x0atwo"
    assert shown("one\ntwo", keep_newlines=True).plain == "one\ntwo"


@pytest.mark.parametrize("seconds", ["-5", "0", "nan", "inf", "1e400"])
@pytest.mark.parametrize(
    "command",
    [
        ["submit", "report"],
        ["complete", "report", "r1"],
        ["fail", "report", "r1"],
        ["cancel", "r1"],
    ],
    ids=["submit", "complete", "fail", "cancel"],
)
def test_a_timeout_that_cannot_be_waited_is_a_usage_error(command: list[str], seconds: str) -> None:
    """`--timeout` of no time, negative or not finite is refused before anything is sent
    (the request would otherwise be reported unanswered, or waited for forever)."""
    result = runner.invoke(app, [*command, "--timeout", seconds, "-b", "127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    assert "--timeout" in result.output
    assert "not a number of seconds above 0" in result.output


def test_watch_refuses_an_unknown_status_at_once() -> None:
    """`jobctl watch --status` names the statuses, as `jobctl runs` does, rather than
    waiting for events that can never match: a usage error."""
    result = runner.invoke(app, ["watch", "--status", "FAILD", "-b", "127.0.0.1:1"])
    assert result.exit_code == 2
    assert "unknown status 'FAILD'; one of QUEUED, RUNNING" in result.stderr


@pytest.mark.parametrize("status", ["DONE", "\udcff", "x" * 10_000, "RUNNING\x00"])
def test_runs_refuses_an_unknown_status_before_opening_the_file(
    tmp_path: Path, status: str
) -> None:
    """`jobctl runs --status DONE` is a usage error (exit 2) naming the statuses, said
    before the file is looked at (a missing file would otherwise hide it)."""
    result = runner.invoke(app, ["runs", "--status", status, "--db", str(tmp_path / "no.db")])
    line = _one_line_error(result, code=2)
    assert "unknown status" in line
    assert "one of QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED, TIMED_OUT" in line


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["cancel", *NOWHERE], "give a RUN_ID or --job-type"),
        (["bench", "--transactions", "both"], "--transactions 'both': use partition or worker"),
        (["acls", "--orchestrator", "x", "--producer", "User:p", "--executor", "User:e"], "x"),
        (
            ["replay", "--db", "x.db", "--from-offset", "1", "--from-timestamp", "2026-01-01"],
            "not both",
        ),
    ],
    ids=["cancel-without-run", "bench-transactions", "acls-principal", "replay-window"],
)
def test_what_cannot_be_right_is_a_usage_error(args: list[str], fragment: str) -> None:
    """Arguments wrong on their face exit 2 with one line, before anything is asked of
    Kafka, as the README's exit codes say."""
    line = _one_line_error(runner.invoke(app, args), code=2)
    assert fragment in line
    assert "cannot connect" not in line


@pytest.mark.parametrize(
    "servers", ["127.0.0.1:notaport", "", "host:70000", "\udcff\udcfe:1", "h:" + "9" * 5000]
)
def test_a_bootstrap_option_that_is_no_address_names_the_option(servers: str) -> None:
    """`-b 127.0.0.1:notaport` is a usage error naming --bootstrap, the option given, not
    the environment variable it stands in for; the same in JOBS_BOOTSTRAP_SERVERS names
    that, an error of the environment (exit 1)."""
    line = _one_line_error(runner.invoke(app, ["status", "-b", servers]), code=2)
    assert line.startswith("error: bad settings: --bootstrap: "), line
    assert "JOBS_BOOTSTRAP_SERVERS" not in line
    from_env = runner.invoke(app, ["status"], env={"JOBS_BOOTSTRAP_SERVERS": "h:notaport"})
    line = _one_line_error(from_env, code=1)
    assert line.startswith("error: bad settings: JOBS_BOOTSTRAP_SERVERS: "), line


def test_runs_piped_to_a_file_keeps_every_value_whole(tmp_path: Path) -> None:
    """Redirected, `jobctl runs` prints each cell whole (no 80-column terminal to fit): a
    script reading it gets the status and times as stored."""
    path = tmp_path / "jobs.db"
    reason = "the operator cancelled it because the upstream export was late again"
    _store_with(
        path,
        _run_row(
            status=RunStatus.CANCELLED,
            client_id="a-client-with-a-long-name",
            reason=reason,
            metrics={"rows": 1200, "note": "x" * 60},
        ),
    )
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run(
        [*JOBCTL, "runs", "--db", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for whole in ("CANCELLED", "2026-11-28T09:30:00+00:00", "a-client-with-a-long-name"):
        assert whole in done.stdout
    assert "…" not in done.stdout


@pytest.mark.parametrize(
    "command",
    [["watch"], ["replay", "--db", "{db}"], ["verify"], ["acls", *ACL_ROLES, "--apply"]],
    ids=["watch", "replay", "verify", "acls"],
)
def test_a_broker_that_does_not_answer_is_one_line_and_nothing_else(
    command: list[str], tmp_path: Path
) -> None:
    """No progress bar before it, no unclosed client logged after it, no Python tuples;
    `acls --apply` (librdkafka's client) logs none of its connection attempts and gives up
    at once when every broker is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [a.format(db=tmp_path / "replayed.db") for a in command]
    done = subprocess.run(
        [*JOBCTL, *argv, "-b", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    why = "" if command[0] == "acls" else "no bootstrap server answered ("
    assert line.startswith(f"error: cannot connect to Kafka: {why}"), line
    assert "check JOBS_BOOTSTRAP_SERVERS" in line


def test_runs_limit_beyond_what_sqlite_takes_is_a_usage_error(tmp_path: Path) -> None:
    """`runs --limit` past a billion: a usage error naming the option, not a file error."""
    result = runner.invoke(app, ["runs", "--db", str(tmp_path / "x.db"), "--limit", str(2**63)])
    assert result.exit_code == 2
    assert "--limit" in result.output


def test_a_db_that_links_into_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    """`serve --db` a symbolic link into a directory that does not exist: one line naming the
    directory, without aiosqlite's thread error after it."""
    link = tmp_path / "jobs.db"
    link.symlink_to(tmp_path / "gone" / "jobs.db")
    stderr = _fails_in_one_line("serve", "--db", str(link), *NOWHERE[:2])
    assert f"there is no directory {tmp_path / 'gone'}" in stderr
    assert "Exception in thread" not in stderr


# --- times: --since and --from-timestamp read what the commands print ---------------------------


@pytest.mark.parametrize(
    ("since", "shown"),
    [
        ("2026-11-28", ["261128-100000-0.2", "261128-093000-0.1"]),
        ("2026-11-28T09:30:00Z", ["261128-100000-0.2", "261128-093000-0.1"]),
        ("2026-11-28T09:30:00+00:00", ["261128-100000-0.2", "261128-093000-0.1"]),
        ("2026-11-28 09:30:00.5", ["261128-100000-0.2"]),
        ("2026-11-28T10:30:00+01:00", ["261128-100000-0.2", "261128-093000-0.1"]),
        ("2026-11-28T09:30:01", ["261128-100000-0.2"]),
        ("  2026-11-28T10:00:00.000001Z ", []),
    ],
)
def test_runs_since_takes_the_times_the_tools_print(
    tmp_path: Path, since: str, shown: list[str]
) -> None:
    """`runs --since` takes ISO 8601 as `runs --json` and `status` print it (a `Z` or an
    offset, `T` or a space, a fraction), a time without a zone in UTC."""
    path = tmp_path / "jobs.db"
    _store_with(path, _run_row())
    later = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    _store_with(path, _run_row(run_id="261128-100000-0.2", started_at=later, ended_at=later))
    result = runner.invoke(app, ["runs", "--db", str(path), "--since", since, "--json"])
    assert result.exit_code == 0, result.output
    assert [r["run_id"] for r in json.loads(result.stdout)] == shown


@pytest.mark.parametrize(
    "since",
    [
        "yesterday",
        "2026-02-30",
        "2026-11-28T25:00",
        "",
        "\udcff\udcfe",
        "2026-11-28\x00",
        "9" * 100_000,
        "2026-11-28T09:30:00+99:00",
        "[red]x[/red]\x1b[2J",
    ],
)
def test_a_time_that_is_none_is_one_line_saying_what_is_read(tmp_path: Path, since: str) -> None:
    """A time that cannot be read is a usage error (exit 2) in one line naming the option
    and the forms it takes, without pydantic's or click's wording, before the file or Kafka
    is looked at; hostile text is shown escaped, long text cut."""
    for args in (
        ["runs", "--db", str(tmp_path / "none.db"), "--since", since],
        ["replay", "--db", str(tmp_path / "r.db"), "--from-timestamp", since, *NOWHERE[:2]],
        ["verify", "--from-timestamp", since, *NOWHERE[:2]],
    ):
        line = _one_line_error(runner.invoke(app, args), code=2)
        option = "--since" if args[0] == "runs" else "--from-timestamp"
        assert line.startswith(f"error: {option} "), line
        assert "is not a time; give an ISO 8601 date or date and time" in line
        assert "a time without a zone is UTC" in line
        assert "Value error" not in line
        assert "\x1b" not in line
        assert len(line) < 400


def test_a_from_timestamp_with_a_space_and_a_fraction_is_read() -> None:
    """`replay --from-timestamp '2026-12-06 11:43:35.5'` gets past the option (here to find
    no broker), as `verify`'s does."""
    for command in (["replay", "--db", "r.db"], ["verify"]):
        args = [*command, "--from-timestamp", "2026-12-06 11:43:35.5", *NOWHERE[:2]]
        line = _one_line_error(runner.invoke(app, args), after="replaying")
        assert "cannot connect to Kafka" in line


# --- a request sent and not answered: its ID, to retry it with --------------------------------


async def _first_request(settings: Settings) -> dict[str, Any]:
    """The first request in the requests topic, once there is one (waits for it)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        settings.topics.requests,
        **connection(settings),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), 60)
    finally:
        await consumer.stop()
    body: dict[str, Any] = json.loads(record.value or b"")
    return body


async def test_ctrl_c_while_submit_waits_names_the_request_sent(topics: Settings) -> None:
    """Ctrl-C once `submit` has sent its request (no worker answers it here) exits 130 with
    a line naming the request and how to retry it, as the time-out does: a run may start
    from it later."""
    base = ["-b", topics.bootstrap_servers, "--prefix", topics.topic_prefix]
    proc = await asyncio.create_subprocess_exec(
        *JOBCTL,
        "submit",
        "etl",
        "--timeout",
        "300",
        *base,
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        # As from a terminal: a shell without job control starts background commands with
        # SIGINT ignored, and the child would inherit it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        sent = await _first_request(topics)
        proc.send_signal(signal.SIGINT)
        _out, errors = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130, errors
    last = errors.decode().strip().splitlines()[-1]
    request_id = sent["request_id"]
    assert last == (
        f"error: interrupted; request {request_id} may have been sent, and a run may start "
        f"from it: retrying with --request-id {request_id} is safe (it is answered with that "
        "request's decision)"
    )
    assert "Traceback" not in errors.decode()


async def test_a_submit_not_answered_says_to_retry_with_the_option(topics: Settings) -> None:
    """The time-out's line names `--request-id`, the option, quoted for the shell, not the
    client's keyword `request_id=`."""
    base = ["-b", topics.bootstrap_servers, "--prefix", topics.topic_prefix]
    args = ["submit", "etl", "--request-id", "retry me", "--timeout", "1", *base]
    result = await asyncio.to_thread(runner.invoke, app, args)
    assert result.exit_code == 4, result.output
    assert "Retrying with --request-id 'retry me' is safe" in result.stderr
    assert "request_id=" not in result.stderr


def test_status_without_a_worker_says_what_that_means_for_it(topics: Settings) -> None:
    """`status` sends no request: with no worker running its warning says that what it
    shows is as the last worker recorded it, not that a request waits."""
    base = ["-b", topics.bootstrap_servers, "--prefix", topics.topic_prefix]
    result = runner.invoke(app, ["status", *base])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == (
        f"warning: no worker is running for prefix {topics.topic_prefix!r} (the consumer "
        f"group {topics.group_id} has no members); what is shown is as the last worker "
        "recorded it, and stays so until one runs"
    )
    assert result.stdout.strip() == "no job is running or queued"


# --- cancel by run ID: why its start request cannot be read ---------------------------------


async def test_cancel_by_a_run_id_says_whether_its_request_never_was_or_was_deleted(
    topics: Settings,
) -> None:
    """A run ID names its start request's place in the requests topic: `cancel` without
    --job-type reads the job type there, and when it cannot, says whether the place was
    never written (past the partition's end, no such partition: a wrong run ID) or the
    retention deleted it (then --job-type helps); a run ID that is none is a usage error."""
    from aiokafka import AIOKafkaProducer, TopicPartition
    from aiokafka.admin import RecordsToDelete

    producer = AIOKafkaProducer(**connection(topics))
    await producer.start()
    try:
        for _ in range(3):
            await producer.send_and_wait(topics.topics.requests, b"{}", key=b"etl", partition=0)
    finally:
        await producer.stop()
    admin = AIOKafkaAdminClient(**connection(topics))
    await admin.start()
    try:
        tp = TopicPartition(topics.topics.requests, 0)
        await admin.delete_records({tp: RecordsToDelete(before_offset=2)})
    finally:
        await admin.close()
    base = ["--timeout", "1", "-b", topics.bootstrap_servers, "--prefix", topics.topic_prefix]
    requests = topics.topics.requests

    async def cancel(run_id: str, code: int = 1) -> str:
        result = await asyncio.to_thread(runner.invoke, app, ["cancel", run_id, *base])
        return _one_line_error(result, code=code)

    never = "no such run was ever started; check the run ID"
    assert await cancel("261206-120257-0.169") == (
        f"error: no run 261206-120257-0.169 is running, and {requests} partition 0 has no "
        f"offset 169 (its next is 3): {never}"
    )
    assert await cancel("261206-120257-9.1") == (
        f"error: no run 261206-120257-9.1 is running, and {requests} has no partition 9: {never}"
    )
    assert await cancel("261206-120257-0.0") == (
        f"error: no run 261206-120257-0.0 is running, and its start request is not in "
        f"{requests} any more (the retention deleted partition 0 up to offset 2); give its "
        "--job-type too"
    )
    # The request that is there names its job type: the cancel goes out, unanswered here.
    late = await asyncio.to_thread(runner.invoke, app, ["cancel", "261206-120257-0.2", *base])
    assert late.exit_code == 4, late.output
    assert "(etl)" in late.stderr
    for hostile in ("\udcff", "x" * 100_000, "[red]x[/red]\x1b[2J", ""):
        line = await cancel(hostile, code=2)
        assert "is not a run ID (like 261128-093000-4.1187); give one, or --job-type" in line
        assert "\x1b" not in line
        assert len(line) < 300
    huge = "261206-120257-0." + "9" * 30
    assert f"partition 0 has no offset {'9' * 30} (its next is " in await cancel(huge)


def test_missing_topics_are_created_by_the_command_given_in_full(
    kafka_bootstrap: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`jobctl run --prefix nosuch` (and `topics describe`, `status`) on topics that do not
    exist names the command that makes them with the prefix and broker given, so that
    running it as printed makes the very topics missing."""
    monkeypatch.delenv("JOBS_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.delenv("JOBS_TOPIC_PREFIX", raising=False)
    base = ["-b", kafka_bootstrap, "--prefix", prefix]
    wanted = f"`jobctl topics create --prefix {prefix} --bootstrap {kafka_bootstrap}`"
    stderr = _fails_in_one_line("run", *base, "--db", str(tmp_path / "j.db"))
    assert f"Create them with {wanted}." in stderr
    described = runner.invoke(app, ["topics", "describe", *base])
    assert described.exit_code == 1
    assert f"Create them with {wanted}." in described.stderr
    status = runner.invoke(app, ["status", *base])
    assert status.exit_code == 1
    assert f"were the topics created ({wanted.strip('`')})?" in status.stderr
    done = runner.invoke(app, ["topics", "create", *base])
    assert done.exit_code == 0, done.output
    assert runner.invoke(app, ["status", *base]).exit_code == 0


async def test_complete_for_a_job_type_the_orchestrator_never_saw_says_so(
    worker: Any, topics: Settings
) -> None:
    """`complete report.dialy <run>`: the orchestrator holds nothing of that job type, so
    the line says the job type is unknown (a typo?) rather than that the run is not among
    its last 0 ended runs; a run unknown of a known job type keeps the worker's words."""
    from worker.client import JobClient

    base = ["--timeout", "30", "-b", topics.bootstrap_servers, "--prefix", topics.topic_prefix]
    typo = await asyncio.to_thread(
        runner.invoke, app, ["complete", "report.dialy", "261206-120257-0.169", *base]
    )
    line = _one_line_error(typo)
    assert line == (
        "error: rejected: the orchestrator knows no job type 'report.dialy' (no run of it is "
        "active, queued or ended within the retention); a typo?"
    )
    async with JobClient(topics) as jobs:
        decision = await jobs.start_job("report.daily")
        assert decision.run_id is not None
        await jobs.complete_job("report.daily", decision.run_id)
    known = await asyncio.to_thread(
        runner.invoke, app, ["fail", "report.daily", "261206-120257-0.169", *base]
    )
    line = _one_line_error(known)
    assert "unknown run 261206-120257-0.169 of job type 'report.daily'" in line
    assert "not among its last 1 ended runs" in line
