"""`jobctl`: run the orchestrator, manage its topics, start a local broker, play the demo."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import sqlite3
import stat
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import structlog
import typer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    GroupCoordinatorNotAvailableError,
    InvalidTransactionTimeout,
    KafkaConnectionError,
    KafkaError,
)
from pydantic import ValidationError
from pydantic_core import to_json
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from schemas import RunStatus, StatusEvent
from worker import compat, gctuning, logs
from worker.devtools import localkafka
from worker.engine import topics as topic_admin
from worker.kafkaio import connection, librdkafka_config
from worker.logs import configure as configure_logs
from worker.settings import LONGEST_S, Settings, settings_problems
from worker.shown import shown

if TYPE_CHECKING:
    from worker.engine.hooks import Hooks

app = typer.Typer(
    name="jobctl",
    help="Kafka-native job orchestration: run the worker and manage its topics.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion and --show-completion for bash, zsh, fish
    pretty_exceptions_enable=False,
)
topics_app = typer.Typer(help="Create and inspect the five topics.", no_args_is_help=True)
schemas_app = typer.Typer(help="JSON Schema files of the wire format.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
app.add_typer(schemas_app, name="schemas")

# Piped or redirected, output is for a file or a program, with no width to fit: rich's 80
# columns would cut table cells ("CANCEL…") and wrap lines in the middle of a value.
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 1_000)
err = Console(stderr=True)
T = TypeVar("T")


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"jobctl {version('job-orchestrator')}")
        except PackageNotFoundError:
            print("jobctl (not installed: run from a source tree)")
        raise typer.Exit()


@app.callback()
def _logging(
    show_version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Kafka-native job orchestration: run the worker and manage its topics."""
    # Every command logs through one set-up, to stderr (`run`, `bench` and `demo` set their
    # own); stdout stays the command's output, pure JSON with --json.
    configure_logs("warning", "auto", library_level="error", quiet_kafka=True)


EXIT_USAGE = 2  # an option or argument that cannot be right, whatever Kafka or the files hold


def _fail(message: str, code: int = 1) -> typer.Exit:
    """Say `message` in one line; the exit (with `code`) for the caller to raise."""
    if logs.json_lines():  # `run` and `serve` log JSON lines: one more, not plain text
        structlog.get_logger("jobctl").error(message)
        return typer.Exit(code)
    # One line, however long, and the message printed as it is (no markup read into it).
    err.print(
        Text.assemble(("error:", "red"), " ", shown(message, keep_newlines=True)),
        highlight=False,
        soft_wrap=True,
    )
    return typer.Exit(code)


# The settings the commands take as options, by the options' names.
_OPTIONS = {
    "bootstrap_servers": "--bootstrap",
    "topic_prefix": "--prefix",
    "db_path": "--db",
    "config": "--config",
}


def _settings(**overrides: Any) -> Settings:
    """The settings, with the options given over the environment's; settings that cannot
    work are one line naming the option (a usage error) or the JOBS_* variable."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        options = {k: _OPTIONS.get(k, f"--{k}") for k in given}
        wrong = {str(e["loc"][0]) for e in exc.errors(include_input=False) if e["loc"]}
        code = EXIT_USAGE if wrong & options.keys() else 1
        raise _fail(f"bad settings: {settings_problems(exc, options)}", code=code) from None


CREATE = "`jobctl topics create`"


def _create_command(s: Settings) -> str:
    """`jobctl topics create` as it would make the topics `s` names: with the --prefix
    and --bootstrap they need, when not those it would use without them."""
    import shlex

    def unsaid(field: str) -> str:  # what the command uses without the option
        default = Settings.model_fields[field].default
        return os.environ.get(f"JOBS_{field.upper()}") or str(default)

    words = ["jobctl", "topics", "create"]
    if s.topic_prefix != unsaid("topic_prefix"):
        words += ["--prefix", shlex.quote(s.topic_prefix)]
    if s.bootstrap_servers != unsaid("bootstrap_servers"):
        words += ["--bootstrap", shlex.quote(s.bootstrap_servers)]
    return f"`{' '.join(words)}`"


def _run(coro: Awaitable[T], s: Settings | None = None) -> T:
    """Run `coro`, turning connection and topic problems into one clear line (which, with
    the settings `s`, gives the command that creates the topics in full)."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except topic_admin.TopicError as exc:
        message = str(exc)
        if s is not None:
            message = message.replace(CREATE, _create_command(s))
        raise _fail(message) from None
    except KafkaConnectionError as exc:
        raise _fail(f"cannot connect to Kafka: {compat.connect_failure(exc)}") from None
    except KafkaError as exc:
        raise _fail(f"Kafka error: {exc}") from None


async def _with_admin(s: Settings, action: Callable[[AIOKafkaAdminClient], Awaitable[T]]) -> T:
    admin = AIOKafkaAdminClient(request_timeout_ms=10_000, **connection(s))
    await admin.start()
    try:
        return await action(admin)
    finally:
        await admin.close()


def _sqlite_file(path: Path, *, existing: bool, option: str = "--db") -> None:
    """Refuse, in one line, a path that cannot be a SQLite file: a directory, a device or a
    pipe (SQLite would hang on a FIFO), a path in no directory, or (with `existing`) none.

    Checked before SQLite opens it: where the open itself fails, aiosqlite reports it
    from its thread once the event loop has closed, as a traceback after our message.
    """
    try:
        mode: int | None = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:  # a parent that is a file, a name too long, no permission
        raise _fail(f"cannot use {path} as {option}: {exc.strerror}") from None
    if mode is None:
        if existing:
            raise _fail(f"{path} does not exist; point {option} at a worker's SQLite file")
        if not path.parent.is_dir():
            raise _fail(f"{path}: there is no directory {path.parent} for {option}")
    elif stat.S_ISDIR(mode):
        raise _fail(f"{path} is a directory; {option} names a SQLite file")
    elif not stat.S_ISREG(mode):
        raise _fail(f"{path} is not a regular file; {option} names a SQLite file")


def _store_failure(path: Path, exc: sqlite3.Error) -> typer.Exit:
    """One line for a SQLite file that cannot be used: a `StoreError` says why and names the
    file itself; SQLite's own errors are given the file's name."""
    from worker.engine.store import StoreError

    if isinstance(exc, StoreError):
        return _fail(str(exc))
    return _fail(f"cannot use the SQLite file {path}: {exc}")


BOOTSTRAP = typer.Option(
    None,
    "--bootstrap",
    "-b",
    help="Kafka bootstrap servers (default: JOBS_BOOTSTRAP_SERVERS or 127.0.0.1:9092).",
)
PREFIX = typer.Option(None, "--prefix", help="Topic prefix (default: JOBS_TOPIC_PREFIX or jobs).")


@app.command()
def broker(
    fetch_only: bool = typer.Option(
        False, "--fetch-only", help="Only download Kafka's jars into the cache, then exit."
    ),
    port: int = typer.Option(
        None, help="Client port (default: 9092, JOBS_BOOTSTRAP_SERVERS' default, when free)."
    ),
    secure: bool = typer.Option(
        False,
        "--secure",
        help="SCRAM-SHA-512 logins on the client port and over TLS on another, ACLs, and a "
        "user per role with a random password; prints how to connect as each.",
    ),
    data_dir: Path = typer.Option(
        None,
        "--data-dir",
        help="Keep the broker's log (topics, records, users) in this directory, so that a "
        "broker started again on it has them (default: a temporary one, removed on stop).",
    ),
) -> None:
    """Run a local single-node Kafka broker in the foreground until Ctrl-C.

    With --secure, clients log in (SCRAM-SHA-512, also over TLS) as one of the users it
    prints, with its password; only `admin` is authorized until ACLs say otherwise.

    Example: jobctl broker --port 9092
    """
    try:
        if fetch_only:
            libs = localkafka.fetch_jars()
            console.print(Text.assemble(f"Kafka {localkafka.KAFKA_VERSION} jars in ", shown(libs)))
            return
        started = time.monotonic()
        if port is None:
            port = 9092 if _port_is_free(9092) else 0
        if data_dir is not None and data_dir.exists() and not data_dir.is_dir():
            raise _fail(f"--data-dir: {data_dir} is not a directory")
        kafka = localkafka.LocalKafka(port=port, secure=secure, data_dir=data_dir)
        kafka.start()
    except localkafka.LocalKafkaError as exc:
        raise _fail(str(exc)) from None
    try:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        # From the moment the address is out a Ctrl-C may come: it stops the broker cleanly.
        with contextlib.suppress(KeyboardInterrupt):
            console.print(
                f"Kafka {kafka.version} ready in {time.monotonic() - started:.1f}s; "
                "bootstrap servers:"
            )
            print(kafka.bootstrap_servers, flush=True)
            default = os.environ.get("JOBS_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
            if not secure and kafka.bootstrap_servers != default:
                console.print(
                    f"for jobctl in another shell: export "
                    f"JOBS_BOOTSTRAP_SERVERS={kafka.bootstrap_servers}",
                    highlight=False,
                    soft_wrap=True,
                )
            if secure:
                _print_logins(kafka)
            console.print("Ctrl-C stops it.")
            while kafka.running:
                time.sleep(0.5)
            raise _fail("the broker exited unexpectedly")
    finally:
        kafka.stop()
        console.print("broker stopped")


def _print_logins(kafka: localkafka.LocalKafka) -> None:
    """How to connect to a `--secure` broker as each role, as `export` lines."""
    import shlex

    console.print(
        f"SCRAM-SHA-512 on {kafka.bootstrap_servers} (SASL_PLAINTEXT) and "
        f"{kafka.ssl_bootstrap_servers} (SASL_SSL). No ACLs yet: only admin, a "
        "super user, may do anything. To connect as a role, in another shell:",
        highlight=False,
    )
    for role in localkafka.ROLES:
        for tls in (False, True):
            settings = kafka.connection_settings(role, tls=tls)
            # Plain print: a console would wrap the long line. Printing passwords is the
            # point: so they reach the user of this throwaway broker.
            line = (f"JOBS_{k.upper()}={shlex.quote(v)}" for k, v in settings.items())
            print("export", " ".join(line), flush=True)


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@topics_app.command("create")
def topics_create(
    partitions: int = typer.Option(6, "--partitions", "-p", min=1, help="Partitions per topic."),
    replication_factor: int = typer.Option(
        None, "--replication-factor", help="Default: min(3, number of brokers)."
    ),
    bootstrap: str = BOOTSTRAP,
    prefix: str = PREFIX,
) -> None:
    """Create the five topics (idempotent); refuse when existing counts differ, and exit 1
    when existing topics have settings the worker does not work with (naming the fix).

    Example: jobctl topics create --partitions 12
    """
    s = _settings(bootstrap_servers=bootstrap, topic_prefix=prefix)

    async def action(admin: AIOKafkaAdminClient) -> tuple[list[str], str | None]:
        created = await topic_admin.create(admin, s.topics, partitions, replication_factor)
        try:
            await topic_admin.check_configs(admin, s.topics, s.bootstrap_servers)
        except topic_admin.TopicError as exc:
            return created, str(exc)
        return created, None

    created, wrong = _run(_with_admin(s, action))
    for name in s.topics.all():
        console.print(f"{name}: {'created' if name in created else 'exists'}")
    if wrong is not None:
        raise _fail(wrong)


@topics_app.command("describe")
def topics_describe(bootstrap: str = BOOTSTRAP, prefix: str = PREFIX) -> None:
    """Show the five topics, their partition counts and the settings the worker needs, as
    the broker has them; exit 1 if any is not what the worker needs.

    Example: jobctl topics describe --prefix jobs
    """
    s = _settings(bootstrap_servers=bootstrap, topic_prefix=prefix)

    async def action(
        admin: AIOKafkaAdminClient,
    ) -> tuple[list[topic_admin.TopicInfo], dict[str, dict[str, str | None]]]:
        infos = await topic_admin.describe(admin, s.topics)
        present = [i.name for i in infos if i.partitions is not None]
        return infos, await topic_admin.topic_configs(admin, present)

    infos, configs = _run(_with_admin(s, action), s)
    wrong = topic_admin.config_mismatches(s.topics, configs)
    needs = {(m.topic, m.key): m.wanted for m in wrong}
    table = Table("topic", "partitions", "config")
    for info in infos:
        found = configs.get(info.name, {})
        config = ", ".join(
            f"{key}={found.get(key) or 'unknown'}"
            + (f" (needs {needs[info.name, key]})" if (info.name, key) in needs else "")
            for key in topic_admin.SHOWN_CONFIGS
        )
        table.add_row(
            info.name,
            "missing" if info.partitions is None else str(info.partitions),
            escape(config) if info.name in configs else "",
        )
    console.print(table)
    try:
        topic_admin.check_counts(infos)
    except topic_admin.TopicError as exc:
        raise _fail(str(exc).replace(CREATE, _create_command(s))) from None
    if wrong:
        raise _fail(
            f"{'; '.join(str(m) for m in wrong)}. Set them with "
            f"{topic_admin.fix_command(wrong, s.bootstrap_servers)}"
        )


# What `run` adds to its hooks: None in `jobctl`; set only by `python -m
# worker.devtools.faults`, the crash tests' way to run a worker with fault points.
RUN_HOOKS: Callable[[Hooks], Hooks] | None = None


@app.command()
def run(
    bootstrap: str = BOOTSTRAP,
    prefix: str = PREFIX,
    db: Path = typer.Option(None, "--db", help="SQLite file (default: JOBS_DB_PATH or jobs.db)."),
    config: Path = typer.Option(
        None, "--config", help="Per-job-type settings, TOML (default: JOBS_CONFIG)."
    ),
) -> None:
    """Run the orchestrator worker until SIGTERM or Ctrl-C.

    Example: JOBS_BOOTSTRAP_SERVERS=kafka:9092 jobctl run --db /var/lib/jobs/jobs.db
    """
    from worker.core.config import ConfigError
    from worker.engine.hooks import Hooks
    from worker.engine.loop import StopTimedOut, Worker
    from worker.watchdog import StopWatchdog

    s = _settings(bootstrap_servers=bootstrap, topic_prefix=prefix, db_path=db, config=config)
    _sqlite_file(s.db_path, existing=False, option="--db (or JOBS_DB_PATH)")
    configure_logs(s.log_level, s.log_format, service=True)
    gctuning.tune()

    hooks = Hooks(on_stop=StopWatchdog().arm)
    if RUN_HOOKS is not None:  # the crash tests' entry point (`worker.devtools.faults`)
        hooks = RUN_HOOKS(hooks)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        collecting = asyncio.create_task(gctuning.collecting())
        try:
            await Worker(s, hooks).run(stop)
        except InvalidTransactionTimeout:  # known only once a transactional producer starts
            raise _fail(
                f"JOBS_TRANSACTION_TIMEOUT_MS={s.transaction_timeout_ms} is above the broker's "
                "maximum transaction timeout (its transaction.max.timeout.ms, 900000 by "
                "default): lower JOBS_TRANSACTION_TIMEOUT_MS, or raise the broker's "
                "transaction.max.timeout.ms"
            ) from None
        except StopTimedOut as exc:
            # Exiting without what did not answer: asyncio.run's clean-up would wait on those
            # very clients and on SQLite's thread.
            _fail(str(exc))
            sys.stderr.flush()
            os._exit(1)
        finally:
            collecting.cancel()

    try:
        _run(main(), s)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    except sqlite3.Error as exc:  # a StoreError among them
        raise _store_failure(s.db_path, exc) from None


def _progress_bar(
    description: str,
) -> tuple[contextlib.AbstractContextManager[None], Callable[[int, int], None]]:
    """A progress bar on stderr, shown from the first progress reported (so a command that
    fails to connect prints its error alone), and its update function. What it counts is
    the status topic's offsets read, transaction markers among them, not events: labelled
    so, as the summary after it counts events."""
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("offsets read"),
        TimeElapsedColumn(),
        console=err,
    )
    task = bar.add_task(description, total=None)
    shown = False

    def update(done: int, total: int) -> None:
        nonlocal shown
        if not shown:
            bar.start()
            shown = True
        bar.update(task, completed=done, total=total)

    @contextlib.contextmanager
    def showing() -> Iterator[None]:
        try:
            yield
        finally:
            if shown:
                bar.stop()

    return showing(), update


FROM_OFFSET = typer.Option(
    None, "--from-offset", min=0, help="Start at this offset of every status partition."
)
# What `_moment` reads, for the options' help and its message.
TIME_FORMS = (
    "an ISO 8601 date or date and time, such as 2026-11-01, 2026-11-01T09:30:00Z, "
    "2026-11-01 09:30:00.5 or 2026-11-01T09:30:00+01:00; a time without a zone is UTC"
)


def _moment(text: str, option: str) -> datetime:
    """The time `text` names, for `option`: an ISO 8601 date, or a date and time with `T` or
    a space between them, a fraction of a second and `Z` or an offset, each optional (the
    forms the commands print); UTC when it names no zone. Anything else is a usage error
    saying what is read."""
    try:
        moment = datetime.fromisoformat(text.strip()) if len(text) <= 64 else None
    except ValueError:  # not ISO 8601, a day or hour that does not exist, bad UTF-8
        moment = None
    if moment is None:
        given = text if len(text) <= 40 else text[:40] + "…"
        raise _fail(f"{option} {given!r} is not a time; give {TIME_FORMS}", code=EXIT_USAGE)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


FROM_TIMESTAMP = typer.Option(
    None,
    "--from-timestamp",
    help="Start at the first event at or after this time: an ISO 8601 date or date and "
    "time (2026-11-01T09:30:00Z, T or a space, a fraction, an offset); UTC without a zone.",
)


def _window_start(
    from_offset: int | None, from_timestamp: str | None
) -> tuple[int | None, datetime | None]:
    if from_offset is not None and from_timestamp is not None:
        raise _fail("give --from-offset or --from-timestamp, not both", code=EXIT_USAGE)
    if from_timestamp is None:
        return from_offset, None
    return from_offset, _moment(from_timestamp, "--from-timestamp")


@app.command()
def replay(
    db: Path = typer.Option(..., "--db", help="The SQLite file to (re)build."),
    from_offset: int = FROM_OFFSET,
    from_timestamp: str = FROM_TIMESTAMP,
    processes: int = typer.Option(
        None,
        "--processes",
        min=1,
        help="Replay the status partitions in this many processes (default: one per CPU).",
    ),
    bootstrap: str = BOOTSTRAP,
    prefix: str = PREFIX,
) -> None:
    """Rebuild a store's run history from the status topic (the decision log).

    Example: jobctl replay --db rebuilt.db --from-offset 0
    """
    from worker.audit.replay import ReplayError, replay as run_replay
    from worker.engine.store import DamagedFile

    start_offset, start_time = _window_start(from_offset, from_timestamp)
    s = _settings(bootstrap_servers=bootstrap, topic_prefix=prefix)
    _sqlite_file(db, existing=False)
    bar, update = _progress_bar("replaying")
    try:
        with bar:
            report = _run(
                run_replay(
                    s,
                    db,
                    from_offset=start_offset,
                    from_timestamp=start_time,
                    progress=update,
                    processes=processes,
                )
            )
    except ReplayError as exc:
        raise _fail(str(exc)) from None
    except DamagedFile as exc:
        raise _fail(exc.rebuilt("replay builds a new file from the status topic")) from None
    except sqlite3.Error as exc:  # one of a newer schema (StoreError), or SQLite's own
        raise _store_failure(db, exc) from None
    console.print(
        Text.assemble(
            f"applied {report.events} status events in {report.seconds:.2f}s "
            f"({report.rate:,.0f}/s, {report.processes} "
            f"process{'es' if report.processes > 1 else ''}); {report.runs} runs in ",
            shown(db),
        )
    )


@app.command()
def verify(
    bootstrap: str = BOOTSTRAP,
    prefix: str = PREFIX,
    config: Path = typer.Option(
        None,
        "--config",
        help="Re-decide every input with these job-type settings instead of the ones in force "
        "when it was decided: what would they have decided?",
    ),
    from_offset: int = FROM_OFFSET,
    from_timestamp: str = FROM_TIMESTAMP,
    show: int = typer.Option(20, "--show", min=0, help="How many divergences to print."),
    as_json: bool = typer.Option(False, "--json", help="The whole report as one JSON object."),
) -> None:
    """Re-decide every logged input with the settings in force then; exit 1 on any divergence.

    Events before the window (--from-offset/--from-timestamp) and events whose input the
    retention deleted are taken as logged; verification starts after them.

    Example: jobctl verify --prefix jobs --from-timestamp 2026-12-01
    """
    from worker.audit.verify import Window, verify as run_verify
    from worker.core.config import ConfigError, load as load_config

    window = Window(*_window_start(from_offset, from_timestamp))
    s = _settings(bootstrap_servers=bootstrap, topic_prefix=prefix, config=config)
    try:
        jobs_config = load_config(s.config)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    bar, update = _progress_bar("verifying")
    with bar:
        report = _run(run_verify(s, jobs_config, update, window, fixed=config is not None))
    if as_json:
        print(json.dumps(report.as_json()))
        raise typer.Exit(0 if report.ok else 1)
    for divergence in report.divergences[:show]:
        # The line quotes logged events (anyone's text): `shown`, control characters escaped.
        console.print(Text.assemble(("✗ ", "red"), shown(divergence.line())), soft_wrap=True)
    if len(report.divergences) > show:
        console.print(f"… and {len(report.divergences) - show} more (--show N, or --json)")
    print_verify_summary(report)
    if not report.ok:
        raise typer.Exit(1)


def print_verify_summary(report: Any) -> None:
    """What `verify` read, adopted and found, in a few lines."""
    console.print(
        f"{report.inputs} inputs re-decided, {report.events} logged events compared, "
        f"{len(report.divergences)} divergences"
    )
    if report.adopted:
        gone = (
            f"; {report.unretained} of their inputs are no longer retained"
            if report.unretained
            else ""
        )
        console.print(f"{report.adopted} earlier events taken as logged{gone}")
    if report.unrecorded:
        console.print(
            f"{report.unrecorded} events name no settings (logged before settings were "
            "recorded): re-decided with the current ones"
        )
    if report.missing:
        console.print(
            Text.assemble(
                ("✗ ", "red"),
                "settings named by events but missing from the changelog: ",
                shown(", ".join(sorted(report.missing))),
            )
        )
    if report.foreign:
        console.print(
            Text.assemble(("✗ ", "red"), f"{report.foreign} records are not status events")
        )
    if report.ok:
        console.print(Text.assemble(("✓ ", "green"), "every decision re-decided the same"))


JSON_OUT = typer.Option(False, "--json", help="Machine-readable output.")


def _run_status(given: str) -> RunStatus:
    """`--status`: a run status, in any case; anything else stops the command, naming them."""
    try:
        return RunStatus(given.upper())
    except ValueError:
        names = ", ".join(m.value for m in RunStatus)
        raise _fail(f"unknown status {given!r}; one of {names}", code=EXIT_USAGE) from None


def _wait_seconds(value: float) -> float:
    """`--timeout`: a finite number of seconds above 0 (a request waited for no time, or
    forever, is never answered)."""
    if not (math.isfinite(value) and 0 < value <= LONGEST_S):
        raise typer.BadParameter(f"{value} is not a number of seconds above 0 (up to 100 years)")
    return value


def _timeout_option(waits_for: str) -> Any:
    return typer.Option(
        30, "--timeout", callback=_wait_seconds, help=f"Seconds to wait for {waits_for}."
    )


class _NotJson(ValueError):
    """JSON that `json.loads` takes but the worker refuses; the message says why."""


def _json_int(digits: str) -> int:
    try:
        return int(digits)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits())
        raise _NotJson(f"a number of {len(digits.lstrip('-'))} digits is too long") from None


def _json_float(digits: str) -> float:
    value = float(digits)
    if not math.isfinite(value):  # 1e400: sent on as Infinity, which is not JSON
        raise _NotJson(f"the number {digits[:20]}{'…' if len(digits) > 20 else ''} is too large")
    return value


def _json_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON number")


def _json_data(text: str | None, what: str, s: Settings) -> dict[str, Any]:
    """The JSON object of option `what` (--data, --metrics), or a one-line error when the
    worker would refuse it: the limits are the worker's, as `s` has them (JOBS_MAX_*)."""
    if text is None:
        return {}
    from worker.engine.codec import nesting_depth_over

    limits = s.input_limits
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:  # an argument's bytes that are not UTF-8
        raise _fail(f"{what} is not UTF-8 text", code=EXIT_USAGE) from None
    # Counted before parsing, as the worker does: json.loads recurses once per level, and
    # `[` * 100000 would exhaust the stack. The request around the object is one level.
    depth = limits.nesting_depth - 1
    if nesting_depth_over(raw, depth):
        raise _fail(
            f"{what} is not a JSON object the worker takes: nested too deeply (arrays and "
            f"objects at most {depth} deep, JOBS_MAX_NESTING_DEPTH={limits.nesting_depth} "
            "counting the request around it)",
            code=EXIT_USAGE,
        )
    try:
        data = json.loads(
            text, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant
        )
    except json.JSONDecodeError as exc:
        raise _fail(
            f"{what} is not valid JSON: {exc.msg} at position {exc.pos}", code=EXIT_USAGE
        ) from None
    except _NotJson as exc:
        raise _fail(
            f"{what} is not a JSON object the worker takes: {exc}", code=EXIT_USAGE
        ) from None
    except RecursionError:  # a JOBS_MAX_NESTING_DEPTH above what Python can parse
        raise _fail(
            f"{what} is not a JSON object the worker takes: nested too deeply", code=EXIT_USAGE
        ) from None
    if not isinstance(data, dict):
        raise _fail(f"{what} must be a JSON object, like '{{\"rows\": 10}}'", code=EXIT_USAGE)
    try:
        size = len(to_json(data))
    except ValueError:  # pydantic-core refuses a lone surrogate, as the worker then does
        raise _fail(
            f"{what} is not a JSON object the worker takes: it escapes a lone UTF-16 surrogate "
            "(\\ud800-\\udfff without its pair)",
            code=EXIT_USAGE,
        ) from None
    if size > limits.data_bytes:
        raise _fail(
            f"{what} is {size} bytes as JSON; the limit is {limits.data_bytes} "
            "(JOBS_MAX_DATA_BYTES)",
            code=EXIT_USAGE,
        )
    return data


EXIT_TIMEOUT = 4  # no answer in time (1: an error, 2: a usage error, 3: refused)


# What no worker in the orchestrator's group means for a command, the end of its warning.
WAITS = "the request waits for one"
DECIDED_LATER = "the request is decided when one runs"
AS_LEFT = "what is shown is as the last worker recorded it, and stays so until one runs"


# How much longer than its --timeout a command may wait for the broker before it gives up
# itself: the call's own time-out, with what it knows (the broker did not acknowledge the
# request, or no worker answered), comes first.
_TIMEOUT_GRACE_S = 1.0


@dataclasses.dataclass
class _Request:
    """The request a client command sends: its ID, chosen here and not by the client so
    that a time-out or a Ctrl-C can name it, whether it may have gone out, and the command's
    --timeout, over all it does (connecting, the call)."""

    request_id: str
    job_type: str
    seconds: float
    began: float = dataclasses.field(default_factory=time.monotonic)
    sending: bool = False

    def left(self) -> float:
        """Seconds left of --timeout, for the call (never none: a call needs some)."""
        return max(self.seconds - (time.monotonic() - self.began), 0.001)


async def _with_client(
    s: Settings,
    action: Callable[[Any], Awaitable[T]],
    without_worker: str | None,
    request: _Request | None = None,
) -> T:
    from worker.client import JobTimeoutError
    from worker.client.jobclient import JobClient

    async def call() -> T:
        async with JobClient(s) as client:
            if without_worker is not None:
                await _warn_without_worker(
                    s, without_worker, answer_awaited=without_worker == WAITS
                )
            return await action(client)

    if request is None:
        return await call()
    timer = asyncio.timeout(request.seconds + _TIMEOUT_GRACE_S)
    try:
        async with timer:
            return await call()
    except TimeoutError:
        if not timer.expired():
            raise
    within = f"within {request.seconds:g}s (--timeout)"
    if not request.sending:
        raise JobTimeoutError(
            f"the broker at {s.bootstrap_servers} did not answer {within}; nothing was sent"
        )
    raise JobTimeoutError(
        f"no answer {within}: request {request.request_id} ({request.job_type}) may have gone out.",
        request.request_id,
        retry_safe=True,
    )


async def _warn_without_worker(s: Settings, meaning: str, *, answer_awaited: bool) -> None:
    """Say at once when no worker is in the orchestrator's group, and what that `meaning`s
    for the command. When the principal may not describe the group (the ACLs give that to
    the orchestrator), say that it could not be checked, where an answer is awaited."""
    admin = AIOKafkaAdminClient(request_timeout_ms=3_000, **connection(s))
    refused = False
    members = None
    try:
        async with asyncio.timeout(3):
            await admin.start()
            while True:
                try:
                    described = await admin.describe_consumer_groups([s.group_id])
                    break
                except GroupCoordinatorNotAvailableError:
                    # A cluster where no group was ever made has no coordinator until the
                    # asking makes its topic: asked again, it answers within a second.
                    await asyncio.sleep(0.2)
        group = described[0].groups[0] if described and described[0].groups else None
        if group is not None and group[0] == GroupAuthorizationFailedError.errno:
            refused = True
        elif group is not None and group[0] == 0:
            members = group[5]
        else:
            return  # the group could not be described: nothing sure to say
    except GroupAuthorizationFailedError:
        refused = True
    except (KafkaError, TimeoutError, IndexError):
        return  # no answer, or one not understood: nothing sure to say
    finally:
        await admin.close()
    if refused:
        if answer_awaited:
            err.print(
                f"warning: whether a worker is running for prefix {s.topic_prefix!r} could "
                f"not be checked: not authorized to describe the consumer group {s.group_id}",
                highlight=False,
                soft_wrap=True,
            )
        return
    if not members:
        err.print(
            f"warning: no worker is running for prefix {s.topic_prefix!r} (the consumer group "
            f"{s.group_id} has no members); {meaning}",
            highlight=False,
            soft_wrap=True,
        )


def _client_call(
    s: Settings,
    action: Callable[[Any], Awaitable[T]],
    without_worker: str | None = WAITS,
    request: _Request | None = None,
) -> T:
    """`action` with a client; `without_worker`, what no worker means for it (warned of
    first), or None to check nothing; `request`, the request it sends, whose --timeout
    bounds connecting too."""
    from worker.client import JobError, JobInvalidError, JobRejectedError, JobTimeoutError

    try:
        return _run(_with_client(s, action, without_worker, request), s)
    except JobInvalidError as exc:  # what to fix in the command's arguments
        raise _fail(str(exc), code=2) from None
    except JobTimeoutError as exc:
        if exc.retry_safe and exc.request_id is not None:  # said as the option, not Python
            retry = f"Retrying with --request-id {_quoted(exc.request_id)} is safe"
            raise _fail(f"{exc.unanswered} {retry}", code=EXIT_TIMEOUT) from None
        raise _fail(str(exc), code=EXIT_TIMEOUT) from None
    except JobRejectedError as exc:
        raise _fail(f"rejected: {exc}") from None
    except JobError as exc:  # a topic missing among them: the command that makes them
        bare = _create_command(s).strip("`")
        raise _fail(str(exc).replace("(jobctl topics create)", f"({bare})")) from None
    except LookupError as exc:
        raise _fail(f"{exc}; create the topics with {_create_command(s)}") from None


def _quoted(request_id: str) -> str:
    """`request_id` as a shell takes it back: quoted when it needs it."""
    import shlex

    return shlex.quote(request_id)


def _print_event(event: StatusEvent | str, as_json: bool) -> None:
    if isinstance(event, str):  # sent without waiting: the request ID
        if as_json:
            print(json.dumps({"sent": True, "request_id": event}))
        else:
            console.print(Text.assemble("sent request ", shown(event)))
        return
    if as_json:
        print(event.model_dump_json())
        return
    # Every field but the type is anyone's text (the status topic takes any JSON that
    # validates): `shown`, never markup.
    parts = [Text(str(event.type), style="bold"), shown(event.job_type)]
    if event.run_id:
        parts.append(Text.assemble("run ", shown(event.run_id)))
    if event.status:
        parts.append(Text.assemble("status ", shown(event.status)))
    if event.metrics:
        parts.append(Text.assemble("metrics ", shown(json.dumps(event.metrics))))
    if event.reason:
        parts.append(Text.assemble("— ", shown(event.reason)))
    console.print(Text(" ").join(parts))


@app.command()
def submit(
    job_type: str = typer.Argument(..., help="The job type to start."),
    client_id: str = typer.Option(None, "--client-id", help="The requesting client."),
    data: str = typer.Option(None, "--data", help="Initial data, a JSON object."),
    request_id: str = typer.Option(None, "--request-id", help="Retry a request safely."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Send and exit; don't wait."),
    timeout: float = _timeout_option("the decision"),
    as_json: bool = JSON_OUT,
    bootstrap: str = BOOTSTRAP,
    prefix: str = PREFIX,
) -> None:
    """Ask the orchestrator to start a job; print its decision.

    Example: jobctl submit report.daily --data '{"day": "2026-11-28"}'
    """
    s = _settings(bootstrap_servers=bootstrap, topic_prefix=prefix)
    initial = _json_data(data, "--data", s)
    # Chosen here, not by the client: a Ctrl-C after the request went out can name it.
    request = _Request(request_id or str(uuid.uuid4()), job_type, timeout)
    request_id = request.request_id

    async def action(client: Any) -> Any:
        request.sending = True
        return await client.start_job(
            job_type, client_id, initial, not no_wait, request.left(), request_id=request_id
        )

    try:
        decision = _client_call(s, action, DECIDED_LATER if no_wait else WAITS, request)
    except KeyboardInterrupt:
        if not request.sending:
            raise _fail("interrupted before the request was sent", code=130) from None
        raise _fail(
            f"interrupted; request {request_id} may have been sent, and a run may start from "
            f"it: retrying with --request-id {_quoted(request_id)} is safe (it is answered "
            "with that request's decision)",
            code=130,
        ) from None
    _print_event(decision if isinstance(decision, str) else decision.event, as_json)
    if not isinstance(decision, str) and decision.already_running:
        raise typer.Exit(3)


def _result_command(status: str) -> Callable[..., None]:
    def command(
        job_type: str = typer.Argument(..., help="The run's job type."),
        run_id: str = typer.Argument(..., help="The run to report on."),
        metrics: str = typer.Option(None, "--metrics", help="Final metrics, a JSON object."),
        timeout: float = _timeout_option("the answer"),
        request_id: str = typer.Option(None, "--request-id", help="Retry a report safely."),
        as_json: bool = JSON_OUT,
        bootstrap: str = BOOTSTRAP,
        prefix: str = PREFIX,
    ) -> None:
        s = _settings(bootstrap_servers=bootstrap, topic_prefix=prefix)
        final = _json_data(metrics, "--metrics", s)
        request = _Request(request_id or str(uuid.uuid4()), job_type, timeout)

        async def action(client: Any) -> Any:
            from worker.client import JobError, JobRejectedError

            request.sending = True
            try:
                return await client.complete_job(
                    job_type, run_id, final, status, request.left(), request.request_id
                )
            except JobRejectedError as exc:
                # The orchestrator holds no run of the job type at all: the type is the
                # likelier typo, not the run ID.
                if (exc.event.reason or "").endswith(" not among its last 0 ended runs"):
                    raise JobError(
                        f"rejected: the orchestrator knows no job type {job_type!r} (no run "
                        "of it is active, queued or ended within the retention); a typo?",
                        exc.request_id,
                    ) from None
                raise

        _print_event(_client_call(s, action, request=request), as_json)

    verb = "complete" if status == "COMPLETED" else "fail"
    command.__doc__ = (
        f"Report a run as {status} (as an executor would).\n\n"
        f"Example: jobctl {verb} report.daily 261128-093000-4.1187 --metrics '{{\"rows\": 12}}'"
    )
    return command


app.command("complete")(_result_command("COMPLETED"))
app.command("fail")(_result_command("FAILED"))


@app.command()
def cancel(
    run_id: str = typer.Argument(None, help="The run to cancel (or give --job-type)."),
    job_type: str = typer.Option(None, "--job-type", help="Cancel this job type's run."),
    client_id: str = typer.Option(None, "--client-id", help="With --job-type: this client's."),
    reason: str = typer.Option(None, "--reason", help="Why; recorded in the event."),
    timeout: float = _timeout_option("the answer"),
    request_id: str = typer.Option(None, "--request-id", help="Retry a cancel safely."),
    as_json: bool = JSON_OUT,
    bootstrap: str = BOOTSTRAP,
    prefix: str = PREFIX,
) -> None:
    """Cancel a run by ID (running or queued), or the running run of a job type.

    Example: jobctl cancel --job-type report.daily --reason "wrong input"
    """
    s = _settings(bootstrap_servers=bootstrap, topic_prefix=prefix)
    if job_type is None:
        if run_id is None:
            raise _fail("give a RUN_ID or --job-type", code=EXIT_USAGE)
        job_type = _job_type_of(s, run_id)

    request = _Request(request_id or str(uuid.uuid4()), job_type, timeout)

    async def action(client: Any) -> Any:
        request.sending = True
        return await client.cancel_job(
            job_type, run_id, client_id, reason, request.left(), request.request_id
        )

    _print_event(_client_call(s, action, request=request), as_json)


def _job_type_of(s: Settings, run_id: str) -> str:
    """A run's job type: from the running view, else from the start request the run ID
    names (`<time>-<partition>.<offset>`), so a queued run is found too."""
    from worker.core.runid import RUN_ID_RE

    if RUN_ID_RE.match(run_id.strip().lower()) is None:
        raise _fail(
            f"{run_id[:80]!r} is not a run ID (like 261128-093000-4.1187); give one, or --job-type",
            code=EXIT_USAGE,
        )

    async def action(client: Any) -> list[Any]:
        return list(await client.running_jobs())

    for info in _client_call(s, action, without_worker=None):  # the cancel itself warns
        if info.run_id == run_id.strip().lower():
            return str(info.job_type)
    found = _run(_requested_job_type(s, run_id))
    if isinstance(found, _NoRequest):
        raise _fail(f"no run {run_id} is running, and {found.why}")
    return found


@dataclasses.dataclass(frozen=True)
class _NoRequest:
    """Why a run ID's start request cannot be read: `why` ends the sentence."""

    why: str


async def _requested_job_type(s: Settings, run_id: str) -> str | _NoRequest:
    """The key (job type) of the start request at the coordinates in `run_id`, or why it
    cannot be had: never written (past the partition's end, or no such partition), deleted
    by the retention, or no request with a job type there."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from worker.core.runid import RUN_ID_RE
    from worker.kafkaio import partitions_of, start_client

    m = RUN_ID_RE.match(run_id.strip().lower())
    assert m is not None  # checked by the caller
    tp, offset = TopicPartition(s.topics.requests, int(m.group(3))), int(m.group(4))
    never = "no such run was ever started; check the run ID"
    consumer = AIOKafkaConsumer(**connection(s), enable_auto_commit=False)
    await start_client(consumer)
    try:
        if tp not in await partitions_of(consumer, tp.topic):
            return _NoRequest(f"{tp.topic} has no partition {tp.partition}: {never}")
        start, end = (
            (await consumer.beginning_offsets([tp]))[tp],
            (await consumer.end_offsets([tp]))[tp],
        )
        if offset >= end:
            return _NoRequest(
                f"{tp.topic} partition {tp.partition} has no offset {offset} (its next is "
                f"{end}): {never}"
            )
        if offset < start:
            return _NoRequest(
                f"its start request is not in {tp.topic} any more (the retention deleted "
                f"partition {tp.partition} up to offset {start}); give its --job-type too"
            )
        consumer.assign([tp])
        consumer.seek(tp, offset)
        record = await asyncio.wait_for(consumer.getone(tp), 10)
    finally:
        await consumer.stop()
    unreadable = _NoRequest(
        f"{tp.topic} partition {tp.partition} holds no request at offset {offset}: {never}"
    )
    if record.offset != offset or not record.key:
        return unreadable
    try:
        return str(record.key.decode())
    except UnicodeDecodeError:
        return unreadable


@app.command()
def status(
    as_json: bool = JSON_OUT,
    bootstrap: str = BOOTSTRAP,
    prefix: str = PREFIX,
) -> None:
    """Show the running and the queued jobs (from the orchestrator's state topic).

    A queued run waits for the active run of its scope to end; its time is when it was
    queued. Example: jobctl status --json
    """
    s = _settings(bootstrap_servers=bootstrap, topic_prefix=prefix)

    async def action(client: Any) -> list[tuple[str, Any]]:
        running = await client.running_jobs()
        return [("RUNNING", i) for i in running] + [
            ("QUEUED", i) for i in await client.queued_jobs()
        ]

    infos = _client_call(s, action, AS_LEFT)
    if as_json:
        rows = [
            {
                "job_type": i.job_type,
                "run_id": i.run_id,
                "status": status,
                "client_id": i.client_id,
                "started_at": i.started_at.isoformat(),  # for a queued run: when it was queued
                "initial_data": dict(i.initial_data),
            }
            for status, i in infos
        ]
        print(json.dumps(rows))
        return
    console.print(_jobs_table(infos) if infos else "no job is running or queued")


def _jobs_table(infos: list[tuple[str, Any]]) -> Table:
    """`status`'s table: a row per (status, `RunInfo`)."""
    table = Table("job type", title="running and queued jobs")
    table.add_column("run ID", no_wrap=True)  # people copy it into complete, fail, cancel
    table.add_column("status")
    table.add_column("client")
    table.add_column("since")
    for status, i in infos:
        # The state topic's text, anyone's: `shown`, never markup.
        table.add_row(
            shown(i.job_type),
            shown(i.run_id),
            status,
            shown(i.client_id),
            i.started_at.isoformat(),
        )
    return table


@app.command()
def runs(
    db: Path = typer.Option(
        None, "--db", help="The worker's SQLite file (default: JOBS_DB_PATH or jobs.db)."
    ),
    job_type: str = typer.Option(None, "--job-type", help="Only this job type's runs."),
    client_id: str = typer.Option(None, "--client-id", help="Only this client's runs."),
    status_filter: str = typer.Option(None, "--status", help="RUNNING, COMPLETED, FAILED..."),
    since: str = typer.Option(
        None,
        "--since",
        help="Started at or after this time: an ISO 8601 date or date and time "
        "(2026-11-01T09:30:00Z, T or a space, a fraction, an offset); UTC without a zone.",
    ),
    limit: int = typer.Option(50, "--limit", min=1, max=1_000_000_000),
    as_json: bool = JSON_OUT,
) -> None:
    """List run history from the worker's SQLite file, newest first.

    Example: jobctl runs --job-type report.daily --status FAILED --since 2026-11-01
    """
    from worker.engine.store import Store

    wanted = None if status_filter is None else _run_status(status_filter)
    start = None if since is None else _moment(since, "--since")
    s = _settings(db_path=db)
    _sqlite_file(s.db_path, existing=True, option="--db (or JOBS_DB_PATH)")

    async def load() -> list[Any]:
        store = await Store.open(s.db_path)
        try:
            return await store.runs(
                job_type=job_type, client_id=client_id, status=wanted, since=start, limit=limit
            )
        finally:
            await store.close()

    try:
        rows = _run(load())
    except sqlite3.Error as exc:  # not a database, damaged, a newer schema (StoreError)
        raise _store_failure(s.db_path, exc) from None
    except (ValueError, TypeError, RecursionError) as exc:
        # A row the worker did not write: a status, time or JSON column it cannot read.
        raise _fail(f"{s.db_path} holds a run that is not as the worker writes it: {exc}") from None
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "run_id": r.run_id,
                        "job_type": r.job_type,
                        "client_id": r.client_id,
                        "status": r.status,
                        "started_at": r.started_at.isoformat(),
                        "ended_at": r.ended_at.isoformat() if r.ended_at else None,
                        "metrics": r.metrics,
                        "reason": r.reason,
                    }
                    for r in rows
                ]
            )
        )
        return
    table = Table()
    table.add_column("run ID", no_wrap=True)  # people copy it into complete, fail, cancel
    for column in ("job type", "client", "status", "started", "ended", "metrics"):
        table.add_column(column)
    for r in rows:
        # What the status topic said, through the file: `shown`, never markup.
        table.add_row(
            shown(r.run_id),
            shown(r.job_type),
            shown(r.client_id),
            shown(r.status),
            r.started_at.isoformat(timespec="seconds"),
            r.ended_at.isoformat(timespec="seconds") if r.ended_at else "",
            shown(json.dumps(r.metrics)) if r.metrics else "",
        )
    console.print(table if rows else "no runs match")


@app.command()
def watch(
    job_type: str = typer.Option(None, "--job-type", help="Only this job type's events."),
    client_id: str = typer.Option(None, "--client-id", help="Only this client's events."),
    status_filter: str = typer.Option(
        None,
        "--status",
        help="Only events after which their run has this status (RUNNING, COMPLETED, FAILED, "
        "CANCELLED, TIMED_OUT, QUEUED).",
    ),
    from_beginning: bool = typer.Option(False, "--from-beginning", help="Replay history first."),
    count: int = typer.Option(None, "--count", min=1, help="Stop after this many events."),
    as_json: bool = JSON_OUT,
    bootstrap: str = BOOTSTRAP,
    prefix: str = PREFIX,
) -> None:
    """Follow status events as the orchestrator publishes them (Ctrl-C stops).

    Example: jobctl watch --job-type report.daily --json
    """
    from worker.client.watch import StatusTail

    s = _settings(bootstrap_servers=bootstrap, topic_prefix=prefix)
    wanted = _run_status(status_filter).value if status_filter else None
    seen = 0
    done = asyncio.Event()

    # As the worker compares them: job types trimmed, client IDs trimmed and in any case.
    wanted_type = job_type.strip() if job_type else None
    wanted_client = client_id.strip().lower() if client_id else None

    def show(item: Any) -> None:
        nonlocal seen
        if not isinstance(item, StatusEvent) or done.is_set():
            return
        if wanted_type and item.job_type != wanted_type:
            return
        if wanted_client and (item.client_id or "").lower() != wanted_client:
            return
        if wanted and item.status != wanted:
            return
        _print_event(item, as_json)
        seen += 1
        if count is not None and seen >= count:
            done.set()

    async def follow() -> None:
        # Each event is printed and let go: a watch left running, or replaying a long
        # history, holds no more than a fetch.
        tail = StatusTail(
            connection(s), s.topics, from_beginning=from_beginning, on_item=show, keep=False
        )
        async with tail:
            # Not `done.wait()` alone: should printing raise, the tail stops reading and
            # `done` would never be set; this raises that exception instead.
            await tail.wait_until(done)

    with contextlib.suppress(KeyboardInterrupt):
        try:
            _run(follow(), s)
        except LookupError as exc:
            raise _fail(f"{exc}; create the topics with {_create_command(s)}") from None
        except BrokenPipeError:
            # The reader of the output has gone (`jobctl watch | head -3`): stop quietly, as
            # commands writing into a closed pipe do. Python flushes stdout at exit, which
            # would raise again: from now on it writes to /dev/null.
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(1) from None


_BATCH = Settings.model_fields["batch_max_records"].default  # the bench runs the default


# Two of `bench`'s options, out of its signature to keep it readable.
_HISTORY_IN_FLIGHT = typer.Option(
    1_000,
    "--history-in-flight",
    min=1,
    help="Requests outstanding at most while the peak-RSS history is made.",
)
_TRANSACTIONS = typer.Option(
    "worker",
    "--transactions",
    help="The workers' JOBS_TRANSACTIONS: worker (one producer per worker) or partition.",
)


@app.command()
def bench(
    bootstrap: str = typer.Option(
        None, "--bootstrap", "-b", help="Use this cluster instead of starting a local broker."
    ),
    lifecycles: int = typer.Option(20_000, "--lifecycles", min=1, help="Starts + completions."),
    partitions: int = typer.Option(4, "--partitions", min=1),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Rounds per figure (median, min, max)."),
    batch: int = typer.Option(_BATCH, "--batch-max-records", min=1, help="As the worker's."),
    rate: float = typer.Option(1000.0, "--latency-rate", help="Offered requests/s for latency."),
    latency_seconds: float = typer.Option(10.0, "--latency-seconds"),
    latency_warmup: float = typer.Option(
        3.0, "--latency-warmup-seconds", help="Unmeasured load at the same rate first."
    ),
    restore_runs: int = typer.Option(10_000, "--restore-runs", min=1),
    history_runs: int = typer.Option(100_000, "--history-runs", min=1),
    history_in_flight: int = _HISTORY_IN_FLIGHT,
    client_calls: int = typer.Option(100, "--client-calls", min=1, help="Client calls per kind."),
    joined_seconds: float = typer.Option(
        10.0,
        "--joined-seconds",
        min=0.5,
        help="Seconds of latency measured after a new or restarted worker takes its partitions.",
    ),
    growth: str = typer.Option(
        "10,1000,10000,100000,1000000",
        "--growth",
        help="Job-type counts of the growth table, comma-separated; 'none' to skip it.",
    ),
    growth_only: bool = typer.Option(
        False, "--growth-only", help="Measure the growth table alone (its sizes: --growth)."
    ),
    quick: bool = typer.Option(False, "--quick", help="Small sizes, one round: a smoke run."),
    quix: bool = typer.Option(False, "--quix", help="Also time a Quix Streams job lock."),
    transactions: str = _TRANSACTIONS,
    json_path: Path = typer.Option(None, "--json", help="Also write the report as JSON here."),
    soak: float = typer.Option(
        None, "--soak", min=0.1, help="Instead: a soak of this many minutes (exit 1 past a bound)."
    ),
    soak_rate: float = typer.Option(100.0, "--soak-rate", help="Starts/s during the soak."),
    soak_interval: float = typer.Option(60.0, "--soak-interval", help="Seconds per sample."),
    soak_retention: int = typer.Option(
        60, "--soak-retention", help="The soak worker's JOBS_RUN_RETENTION_S."
    ),
) -> None:
    """Measure throughput, latency, restore, memory and replay, side by side with raw aiokafka.

    Example: jobctl bench --lifecycles 20000 --rounds 3 --json bench.json
    """
    from worker.devtools.bench import BenchOptions

    configure_logs("error", "console", library_level="critical")
    options = BenchOptions(
        bootstrap=bootstrap,
        lifecycles=lifecycles,
        partitions=partitions,
        rounds=rounds,
        batch_max_records=batch,
        latency_rate=rate,
        latency_seconds=latency_seconds,
        latency_warmup_seconds=latency_warmup,
        restore_runs=restore_runs,
        history_runs=history_runs,
        history_in_flight=history_in_flight,
        client_calls=client_calls,
        joined_seconds=joined_seconds,
        growth_job_types=_growth_sizes(growth),
        quick=quick,
        quix=quix,
        transactions=_transactions(transactions),
    )
    if soak is not None:
        _soak(options, soak, soak_rate, soak_interval, soak_retention)
    elif growth_only:
        _growth(options, json_path)
    else:
        _full_bench(options, json_path)


def _full_bench(options: Any, json_path: Path | None) -> None:
    from worker.devtools.bench import BenchError, growth_table, run_bench

    try:
        report = _run(run_bench(options, console))
    except (localkafka.LocalKafkaError, BenchError) as exc:
        raise _fail(str(exc)) from None
    console.print(report.table())
    if report.growth:
        console.print(growth_table(report.growth))
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        console.print(Text.assemble("wrote ", shown(json_path)))


def _transactions(text: str) -> Literal["partition", "worker"]:
    """`--transactions`: partition or worker."""
    if text == "partition":
        return "partition"
    if text == "worker":
        return "worker"
    raise _fail(f"--transactions {text!a}: use partition or worker", code=EXIT_USAGE)


def _growth_sizes(text: str) -> tuple[int, ...]:
    """`--growth`: positive counts, comma-separated, or 'none'."""
    if text.strip().lower() in {"", "none"}:
        return ()
    try:
        sizes = tuple(int(part.replace("_", "")) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1 or max(sizes) > _GROWTH_MAX:
        raise _fail(
            f"--growth takes counts from 1 to {_GROWTH_MAX:,}, comma-separated (or 'none'), "
            f"not {text[:80]!r}",
            code=EXIT_USAGE,
        )
    return sizes


_GROWTH_MAX = 10_000_000  # a history of this many lifecycles takes about an hour here


@app.command()
def acls(
    orchestrator: str = typer.Option(..., "--orchestrator", help="The worker's principal."),
    producer: str = typer.Option(..., "--producer", help="Producers' principal."),
    executor: str = typer.Option(..., "--executor", help="Executors' principal."),
    reader: str = typer.Option(None, "--reader", help="Read-only principal (status, view)."),
    apply: bool = typer.Option(False, "--apply", help="Create them on the cluster too."),
    as_json: bool = JSON_OUT,
    bootstrap: str = BOOTSTRAP,
    prefix: str = PREFIX,
) -> None:
    """Print the least ACLs of each role; with --apply, create them (as an admin principal).

    Example: jobctl acls --orchestrator User:orchestrator --producer User:producer
    --executor User:executor --reader User:reader --apply
    """
    from worker.acls import PrincipalError, rules

    s = _settings(bootstrap_servers=bootstrap, topic_prefix=prefix)
    try:
        wanted = rules(
            s.topics,
            s.group_id,
            orchestrator=orchestrator,
            producer=producer,
            executor=executor,
            reader=reader,
        )
    except PrincipalError as exc:
        raise _fail(str(exc), code=EXIT_USAGE) from None
    if as_json:
        print(json.dumps([dataclasses.asdict(r) for r in wanted], indent=2))
    else:
        width = max(len(r.principal) for r in wanted)
        for r in wanted:
            resource = f"{r.resource}:{r.pattern}:{r.name}"
            print(f"ALLOW {r.principal:<{width}}  {r.operation:<16}  {resource:<44}  # {r.why}")
    if apply:
        _apply_acls(s, wanted)
        print(f"created {len(wanted)} ACLs", file=sys.stderr)


def _apply_acls(s: Settings, wanted: list[Any]) -> None:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import (  # type: ignore[attr-defined]  # documented path
        AclBinding,
        AclOperation,
        AclPermissionType,
        AdminClient,
        ResourcePatternType,
        ResourceType,
    )

    # librdkafka would log every failed connection attempt to stderr: its errors are kept
    # instead, and the first one that says why (a refused login) ends the command.
    errors: list[Any] = []
    conf: dict[str, Any] = {**librdkafka_config(s), "log_level": 0, "error_cb": errors.append}
    admin = AdminClient(conf)
    deadline = time.monotonic() + 15
    while True:
        try:
            admin.list_topics(timeout=1)  # connected and logged in
            break
        except KafkaException as exc:
            admin.poll(0)  # serves `error_cb`: a refused login, every broker down
            if _rdkafka_gave_up(errors) or time.monotonic() > deadline:
                raise _fail(f"cannot connect to Kafka: {_rdkafka_failure(exc, errors)}") from None
    bindings = [
        AclBinding(
            ResourceType[r.resource],
            r.name,
            ResourcePatternType[r.pattern],
            r.principal,
            "*",
            AclOperation[r.operation],
            AclPermissionType.ALLOW,
        )
        for r in wanted
    ]
    try:
        for future in admin.create_acls(bindings, request_timeout=15).values():
            future.result()
    except KafkaException as exc:
        raise _fail(f"could not create the ACLs: {exc.args[0].str()}") from None


def _rdkafka_gave_up(errors: list[Any]) -> bool:
    """Whether librdkafka reported a failure that retrying does not mend."""
    from confluent_kafka import KafkaError as RdKafkaError

    final = (RdKafkaError._AUTHENTICATION, RdKafkaError._ALL_BROKERS_DOWN)
    return any(e.code() in final for e in errors)


def _rdkafka_failure(exc: Any, errors: list[Any]) -> str:
    """Why a librdkafka client could not connect, as `compat.connect_failure` says it for
    aiokafka: what to check, and no secret (librdkafka's messages name none)."""
    from confluent_kafka import KafkaError as RdKafkaError

    reasons = [e for e in errors if e.code() == RdKafkaError._AUTHENTICATION]
    if reasons:
        return (
            f"authentication failed ({reasons[-1].str()}); check JOBS_SASL_USERNAME, "
            "JOBS_SASL_PASSWORD and JOBS_SASL_MECHANISM"
        )
    cause = errors[-1].str() if errors else exc.args[0].str()
    return f"{cause}; check JOBS_BOOTSTRAP_SERVERS and JOBS_SECURITY_PROTOCOL"


def _growth(options: Any, json_path: Path | None) -> None:
    from worker.devtools.bench import BenchError, growth_json, growth_rows, growth_table, with_bench

    if not options.growth_job_types:
        raise _fail("--growth-only needs sizes: --growth 1000,100000", code=EXIT_USAGE)
    try:
        rows = _run(with_bench(options, console, growth_rows))
    except (localkafka.LocalKafkaError, BenchError) as exc:
        raise _fail(str(exc)) from None
    console.print(growth_table(rows))
    if json_path is not None:
        json_path.write_text(json.dumps(growth_json(rows), indent=2) + "\n")
        console.print(Text.assemble("wrote ", shown(json_path)))


def _soak(options: Any, minutes: float, rate: float, interval: float, retention: int) -> None:
    from worker.devtools.bench import BenchError, with_bench
    from worker.devtools.soak import run_soak

    async def body(bench: Any, environment: dict[str, str]) -> Any:
        return await run_soak(bench, minutes, rate, interval, retention)

    try:
        report = _run(with_bench(options, console, body))
    except (localkafka.LocalKafkaError, BenchError) as exc:
        raise _fail(str(exc)) from None
    console.print(report.table())
    if report.failures:
        raise _fail("soak past its bounds: " + "; ".join(report.failures))
    console.print("soak within its bounds")


@schemas_app.command("export")
def schemas_export(
    directory: Path = typer.Option(None, "--dir", help="Where to write (default: schemas/)."),
    check: bool = typer.Option(False, "--check", help="Exit 1 if the files on disk differ."),
) -> None:
    """Write the JSON Schema files generated from the wire models.

    Example: jobctl schemas export --check
    """
    import schemas

    target = directory or schemas.SCHEMA_DIR
    if check:
        stale = [
            name
            for name, text in schemas.json_schema_documents().items()
            if not (target / name).exists() or (target / name).read_text() != text
        ]
        if stale:
            raise _fail(f"out of date: {', '.join(stale)}; run `jobctl schemas export`")
        console.print("schemas up to date")
        return
    for path in schemas.export_json_schemas(target):
        console.print(Text.assemble("wrote ", shown(path)))


@app.command()
def demo(
    ctx: typer.Context,
    bootstrap: str | None = typer.Option(
        None,
        "--bootstrap",
        "-b",
        envvar="JOBS_BOOTSTRAP_SERVERS",
        help="Use this cluster instead of starting a broker (default: JOBS_BOOTSTRAP_SERVERS).",
        show_envvar=False,
    ),
    docker: bool = typer.Option(
        False,
        "--docker",
        help="Start the broker in a Docker container instead of from Kafka's jars (needs a "
        "Docker engine and testcontainers, the package's `docker` extra).",
    ),
) -> None:
    """Start a local broker and a worker, play a scripted scenario, and check every outcome.

    On the broker --bootstrap or JOBS_BOOTSTRAP_SERVERS names, if any.

    With --docker, a broker in a container; else one from Kafka's jars (needs Java).

    Example: jobctl demo
    """
    from worker.devtools.containers import KAFKA_IMAGE, KafkaInDocker
    from worker.devtools.demo import run_demo

    if docker and bootstrap is not None:
        source = ctx.get_parameter_source("bootstrap")
        if source is None or source.name != "ENVIRONMENT":
            raise _fail(
                "--docker starts a broker of its own: give it or --bootstrap, not both",
                code=EXIT_USAGE,
            )
        bootstrap = None  # the option given wins over the environment
    # The demo reports every outcome itself; the clients' transient retries are noise here.
    configure_logs("error", "console", library_level="critical")
    kafka: localkafka.LocalKafka | KafkaInDocker | None = None
    try:
        if docker or bootstrap is None:
            started = time.monotonic()
            if docker:
                console.print(f"[bold]starting Kafka in Docker ({KAFKA_IMAGE})…[/]")
                kafka = KafkaInDocker().start()
            else:
                console.print("[bold]starting a local Kafka broker…[/]")
                kafka = localkafka.LocalKafka().start()
            bootstrap = kafka.bootstrap_servers
            console.print(
                f"Kafka ready at {escape(bootstrap)} in {time.monotonic() - started:.1f}s"
            )
        else:
            console.print(f"[bold]using the broker at {escape(bootstrap)}[/]", highlight=False)
        failures = _run(run_demo(bootstrap, console))
    except localkafka.LocalKafkaError as exc:
        raise _fail(str(exc)) from None
    finally:
        if kafka is not None:
            kafka.stop()
    if failures:
        for failure in failures:
            err.print(Text.assemble(("✗", "red"), " ", shown(failure)))
        raise _fail(f"the demo saw {len(failures)} unexpected outcome(s)")
    console.print("[bold green]✓ every outcome matched the scenario[/]")


from worker.console.command import serve  # noqa: E402  (it imports helpers from here)

app.command()(serve)

if __name__ == "__main__":
    app()
