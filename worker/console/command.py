"""`jobctl serve`: the console. Registered in `worker/cli.py` with `app.command()(serve)`.

Only typer is imported here; the rest comes inside the command, so `worker.cli` can
import this module at any point without a cycle.
"""

from __future__ import annotations

from pathlib import Path

import typer

# The same options as `worker.cli`'s BOOTSTRAP and PREFIX (defined here too: this module
# is imported by `worker.cli`, so it cannot import them from there at import time).
_BOOTSTRAP = typer.Option(
    None,
    "--bootstrap",
    "-b",
    help="Kafka bootstrap servers (default: JOBS_BOOTSTRAP_SERVERS or 127.0.0.1:9092).",
)
_PREFIX = typer.Option(None, "--prefix", help="Topic prefix (default: JOBS_TOPIC_PREFIX or jobs).")


def serve(
    port: int = typer.Option(
        8081, "--port", min=0, max=65535, help="HTTP port of the API and the page."
    ),
    db: Path = typer.Option(
        Path("console.db"),
        "--db",
        help="The console's own SQLite file (not a worker's): the whole fleet's run history.",
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Interface to listen on (0.0.0.0: all of them)."
    ),
    allowed_host: list[str] = typer.Option(
        [],
        "--allowed-host",
        help="A host name the console answers to, besides IP addresses, localhost and "
        "--host (repeat for more): a request naming any other host is refused (403), so a "
        "web page cannot reach the console through a DNS name of its own.",
    ),
    allow_cancel: bool = typer.Option(
        False,
        "--allow-cancel",
        help="Let the API and the page cancel running runs (POST /api/runs/{run_id}): the "
        "console then sends cancel requests to the requests topic, so it needs the producer "
        "role's Kafka rights. Without it, the console only reads and a cancel is refused (403).",
    ),
    bootstrap: str = _BOOTSTRAP,
    prefix: str = _PREFIX,
) -> None:
    """Serve the console: the fleet's run history as an HTTP API and a page.

    Follows the status topic into --db from where it left off.

    Writes nothing to Kafka, unless --allow-cancel: then the cancels its users ask for.

    Example: jobctl serve --port 8081 --db /var/lib/jobs/console.db
    Example: jobctl serve --allow-cancel    (the page shows cancel buttons)
    """
    import asyncio
    import signal
    import sqlite3

    from worker.cli import _create_command, _fail, _run, _settings, _sqlite_file, _store_failure
    from worker.client.answers import JobError
    from worker.console.db import ConsoleError
    from worker.console.service import Console
    from worker.logs import configure as configure_logs

    s = _settings(bootstrap_servers=bootstrap, topic_prefix=prefix)
    _sqlite_file(db, existing=False)
    configure_logs(s.log_level, s.log_format, service=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        console = await Console(
            s, db, host, port, allow_cancel=allow_cancel, allowed_hosts=allowed_host
        ).start()
        await console.run(stop)

    try:
        _run(main(), s)
    except ConsoleError as exc:
        raise _fail(str(exc)) from None
    except sqlite3.Error as exc:  # a StoreError names the file itself
        raise _store_failure(db, exc) from None
    except JobError as exc:  # the cancelling client's: Kafka's answer, not a usage error
        bare = _create_command(s).strip("`")
        said = str(exc).replace("(jobctl topics create)", f"({bare})")
        raise _fail(f"--allow-cancel: {said}") from None
    except LookupError as exc:
        raise _fail(f"{exc}; create the topics with {_create_command(s)}") from None
