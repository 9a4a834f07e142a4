"""The console process: the follower folding the status topic and the HTTP API, together.

    console = await Console(settings, Path("console.db"), port=8081).start()
    await console.run(stop)          # until `stop` is set, or the follower fails

It never writes to Kafka: the follower's consumer reads, commits nothing and joins no group;
unless started with `allow_cancel`, when a `JobClient` sends the cancel requests the API is
asked for (and nothing else).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

import structlog
from aiohttp import web

from worker.client import JobClient
from worker.console.api import make_app
from worker.console.db import ConsoleDb, ConsoleError
from worker.console.follow import Follower, Hub
from worker.console.guard import Guard
from worker.console.queries import Queries
from worker.kafkaio import stop_task
from worker.settings import Settings

log = structlog.get_logger("worker")


class Console:
    """One console: `await start()`, then `run(stop)` or `stop()`."""

    def __init__(
        self,
        settings: Settings,
        db_path: Path,
        host: str = "127.0.0.1",
        port: int = 8081,
        *,
        allow_cancel: bool = False,
        allowed_hosts: Sequence[str] = (),
    ):
        self._settings = settings
        self._db_path = Path(db_path)
        self._host = host
        self._guard = Guard(host, allowed_hosts)
        self._port = port
        self.allow_cancel = allow_cancel
        self._client: JobClient | None = None
        self.hub = Hub()
        self._db: ConsoleDb | None = None
        self._queries: Queries | None = None
        self.follower: Follower | None = None
        self._following: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Where the API listens (the port chosen when started on port 0)."""
        assert self._runner is not None, "the console is not started"
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}"

    @property
    def app(self) -> web.Application:
        """The HTTP application (once started)."""
        assert self._runner is not None, "the console is not started"
        app = self._runner.app
        assert isinstance(app, web.Application)
        return app

    async def start(self) -> Console:
        """Open the file, connect to Kafka, start folding and listening.

        Raises `ConsoleError` (the file), `LookupError` (no status topic), a Kafka error,
        `JobConnectionError` (the cancelling client), or `OSError` (the port)."""
        topic = self._settings.topics.status
        try:
            self._db = await ConsoleDb.open(self._db_path, topic)
            self._queries = await Queries.open(self._db_path, topic)
            self.follower = Follower(self._settings, self._db, self.hub)
            await self.follower.start()
            self._following = asyncio.create_task(self.follower.run(), name="console-follower")
            if self.allow_cancel:
                self._client = await JobClient(self._settings).open()
            app = make_app(self._queries, self.hub, self.follower, self._client, self._guard)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await self._listen(self._runner)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "console listening",
            url=self.url,
            topic=topic,
            db=str(self._db_path),
            allow_cancel=self.allow_cancel,
        )
        return self

    async def _listen(self, runner: web.AppRunner) -> None:
        try:
            await web.TCPSite(runner, self._host, self._port).start()
        except OSError as exc:
            where = f"{self._host}:{self._port}"
            raise ConsoleError(f"cannot listen on {where}: {exc.strerror or exc}") from None

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; raise the follower's error if it fails first."""
        assert self._following is not None, "the console is not started"
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({stopping, self._following}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            failure = None
            if self._following.done() and not self._following.cancelled():
                failure = self._following.exception()
            await self.stop()
        if failure is not None:
            raise failure

    async def stop(self) -> None:
        """Stop listening (ending every event stream), folding, and close the file."""
        self.hub.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        following, self._following = self._following, None
        if following is not None and not following.done():
            await stop_task(following)
        elif following is not None and not following.cancelled():
            following.exception()  # retrieved: `run` raises it
        if self.follower is not None:
            with contextlib.suppress(Exception):
                await self.follower.stop()
            self.follower = None
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
        if self._queries is not None:
            await self._queries.close()
            self._queries = None
        if self._db is not None:
            await self._db.close()
            self._db = None
