"""`jobctl`: run the orchestrator, manage its topics, start a local broker, play the demo."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import typer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError, KafkaError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from worker import localkafka
from worker import topics as topic_admin
from worker.logs import configure as configure_logs
from worker.settings import Settings

app = typer.Typer(
    name="jobctl",
    help="Kafka-native job orchestration: run the worker and manage its topics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
topics_app = typer.Typer(help="Create and inspect the five topics.", no_args_is_help=True)
schemas_app = typer.Typer(help="JSON Schema files of the wire format.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
app.add_typer(schemas_app, name="schemas")

console = Console()
err = Console(stderr=True)
T = TypeVar("T")


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _run(coro: Awaitable[T]) -> T:
    """Run `coro`, turning connection and topic problems into one clear line."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except topic_admin.TopicError as exc:
        raise _fail(str(exc)) from None
    except KafkaConnectionError as exc:
        raise _fail(
            f"cannot reach Kafka ({exc}). Check JOBS_BOOTSTRAP_SERVERS or --bootstrap."
        ) from None
    except KafkaError as exc:
        raise _fail(f"Kafka error: {exc}") from None


async def _with_admin(bootstrap: str, action: Callable[[AIOKafkaAdminClient], Awaitable[T]]) -> T:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        return await action(admin)
    finally:
        await admin.close()


BOOTSTRAP = typer.Option(None, "--bootstrap", "-b", help="Kafka bootstrap servers.")
PREFIX = typer.Option(None, "--prefix", help="Topic prefix (default: JOBS_TOPIC_PREFIX or jobs).")


@app.command()
def broker(
    fetch_only: bool = typer.Option(
        False, "--fetch-only", help="Only download Kafka's jars into the cache, then exit."
    ),
    port: int = typer.Option(0, help="Client port (default: a free port)."),
) -> None:
    """Run a local single-node Kafka broker in the foreground until Ctrl-C.

    Example: jobctl broker --port 9092
    """
    try:
        if fetch_only:
            libs = localkafka.fetch_jars()
            console.print(f"Kafka {localkafka.KAFKA_VERSION} jars in {libs}")
            return
        started = time.monotonic()
        kafka = localkafka.LocalKafka(port=port)
        kafka.start()
    except localkafka.LocalKafkaError as exc:
        raise _fail(str(exc)) from None
    try:
        console.print(
            f"Kafka {kafka.version} ready in {time.monotonic() - started:.1f}s; bootstrap servers:"
        )
        print(kafka.bootstrap_servers, flush=True)
        console.print("Ctrl-C stops it.")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with contextlib.suppress(KeyboardInterrupt):
            while kafka.running:
                time.sleep(0.5)
        if not kafka.running:
            raise _fail("the broker exited unexpectedly")
    finally:
        kafka.stop()
        console.print("broker stopped")


@topics_app.command("create")
def topics_create(
    partitions: int = typer.Option(6, "--partitions", "-p", min=1, help="Partitions per topic."),
    replication_factor: int = typer.Option(
        None, "--replication-factor", help="Default: min(3, number of brokers)."
    ),
    bootstrap: str = BOOTSTRAP,
    prefix: str = PREFIX,
) -> None:
    """Create the five topics (idempotent); refuse when existing counts differ.

    Example: jobctl topics create --partitions 12
    """
    s = _settings(bootstrap_servers=bootstrap, topic_prefix=prefix)

    async def action(admin: AIOKafkaAdminClient) -> list[str]:
        return await topic_admin.create(admin, s.topics, partitions, replication_factor)

    created = _run(_with_admin(s.bootstrap_servers, action))
    for name in s.topics.all():
        console.print(f"{name}: {'created' if name in created else 'exists'}")


@topics_app.command("describe")
def topics_describe(bootstrap: str = BOOTSTRAP, prefix: str = PREFIX) -> None:
    """Show the five topics and their partition counts.

    Example: jobctl topics describe --prefix jobs
    """
    s = _settings(bootstrap_servers=bootstrap, topic_prefix=prefix)

    async def action(admin: AIOKafkaAdminClient) -> list[topic_admin.TopicInfo]:
        return await topic_admin.describe(admin, s.topics)

    infos = _run(_with_admin(s.bootstrap_servers, action))
    table = Table("topic", "partitions", "config")
    for info, role in zip(infos, topic_admin.TOPIC_CONFIGS, strict=True):
        config = ", ".join(f"{k}={v}" for k, v in topic_admin.TOPIC_CONFIGS[role].items())
        table.add_row(
            info.name, "missing" if info.partitions is None else str(info.partitions), config
        )
    console.print(table)
    try:
        topic_admin.check_counts(infos)
    except topic_admin.TopicError as exc:
        raise _fail(str(exc)) from None


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
    from worker.config import ConfigError
    from worker.runner import Worker

    s = _settings(bootstrap_servers=bootstrap, topic_prefix=prefix, db_path=db, config=config)
    configure_logs(s.log_level, s.log_format)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Worker(s).run(stop)

    try:
        _run(main())
    except ConfigError as exc:
        raise _fail(str(exc)) from None


def _progress_bar(description: str) -> tuple[Progress, Callable[[int, int], None]]:
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
    )
    task = bar.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


@app.command()
def replay(
    db: Path = typer.Option(..., "--db", help="The SQLite file to (re)build."),
    from_offset: int = typer.Option(
        None, "--from-offset", min=0, help="Start at this offset of every status partition."
    ),
    from_timestamp: datetime = typer.Option(
        None,
        "--from-timestamp",
        formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"],
        help="Start at the first event at or after this time (UTC unless it has an offset).",
    ),
    bootstrap: str = BOOTSTRAP,
    prefix: str = PREFIX,
) -> None:
    """Rebuild a store's run history from the status topic (the decision log).

    Example: jobctl replay --db rebuilt.db --from-offset 0
    """
    from worker.replay import replay as run_replay

    if from_offset is not None and from_timestamp is not None:
        raise _fail("give --from-offset or --from-timestamp, not both")
    if from_timestamp is not None and from_timestamp.tzinfo is None:
        from_timestamp = from_timestamp.replace(tzinfo=UTC)
    s = _settings(bootstrap_servers=bootstrap, topic_prefix=prefix)
    bar, update = _progress_bar("replaying")
    with bar:
        report = _run(
            run_replay(
                s, db, from_offset=from_offset, from_timestamp=from_timestamp, progress=update
            )
        )
    console.print(
        f"applied {report.events} status events in {report.seconds:.2f}s "
        f"({report.rate:,.0f}/s); {report.runs} runs in {db}"
    )


@app.command()
def verify(
    bootstrap: str = BOOTSTRAP,
    prefix: str = PREFIX,
    config: Path = typer.Option(
        None, "--config", help="Job-type settings to verify against (default: JOBS_CONFIG)."
    ),
    show: int = typer.Option(10, "--show", min=0, help="How many divergences to print."),
) -> None:
    """Re-decide every logged input with the current code; exit 1 on any divergence.

    Example: jobctl verify --prefix jobs --config jobs.toml
    """
    from worker.config import ConfigError
    from worker.config import load as load_config
    from worker.replay import verify as run_verify

    s = _settings(bootstrap_servers=bootstrap, topic_prefix=prefix, config=config)
    try:
        jobs_config = load_config(s.config)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    bar, update = _progress_bar("verifying")
    with bar:
        report = _run(run_verify(s, jobs_config, progress=update))
    for divergence in report.divergences[:show]:
        console.print(f"[red]✗[/] partition {divergence.partition}, caused by {divergence.cause}")
        console.print("  logged:    ", divergence.logged or "no event")
        console.print("  recomputed:", divergence.recomputed or "no event")
    summary = (
        f"{report.inputs} inputs, {report.events} logged events, "
        f"{len(report.divergences)} divergences"
    )
    if report.foreign:
        summary += f", {report.foreign} records that are not status events"
    if report.divergences or report.foreign:
        raise _fail(summary)
    console.print(f"[green]✓[/] {summary}")


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
        console.print(f"wrote {path}")


@app.command()
def demo(
    bootstrap: str = typer.Option(
        None, "--bootstrap", "-b", help="Use this cluster instead of starting a local broker."
    ),
) -> None:
    """Start a local broker and a worker, play a scripted scenario, and check every outcome.

    Example: jobctl demo
    """
    from worker.demo import run_demo

    # The demo reports every outcome itself; the clients' transient retries are noise here.
    configure_logs("error", "console", library_level="critical")
    kafka: localkafka.LocalKafka | None = None
    try:
        if bootstrap is None:
            console.print("[bold]starting a local Kafka broker…[/]")
            started = time.monotonic()
            kafka = localkafka.LocalKafka().start()
            bootstrap = kafka.bootstrap_servers
            console.print(f"Kafka ready at {bootstrap} in {time.monotonic() - started:.1f}s")
        failures = _run(run_demo(bootstrap, console))
    except localkafka.LocalKafkaError as exc:
        raise _fail(str(exc)) from None
    finally:
        if kafka is not None:
            kafka.stop()
    if failures:
        for failure in failures:
            err.print(f"[red]✗[/] {failure}")
        raise _fail(f"the demo saw {len(failures)} unexpected outcome(s)")
    console.print("[bold green]✓ every outcome matched the scenario[/]")


if __name__ == "__main__":
    app()
