"""A path that is no worker's SQLite file, or a file another process holds: every command
says the same of it, and leaves nothing behind. No broker: each is refused before one."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from worker.cli import app
from worker.console.db import ConsoleDb, ConsoleError
from worker.engine.store import Store, StoreError

runner = CliRunner()
NOWHERE = ["-b", "127.0.0.1:1"]
TEXTS = {
    "toml": b'[etl]\nscope = "job_type"\n',
    "bad utf-8 in a text": b"a = 1\n\xff\xfe\n",  # not UTF-8: binary, as damage is
    "huge line": b"x" * (1 << 17),
}


def _error(result: Any) -> str:
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return " ".join(result.output.split())


@pytest.mark.parametrize("command", ["runs", "replay"])
def test_read_only_commands_say_of_a_text_file_what_the_worker_says(
    tmp_path: Path, command: str
) -> None:
    """`runs` and `replay` on a text file say it is not a worker's SQLite file and is left
    as it is, as `jobctl run` does; they used to call it damaged, to be moved aside."""
    path = tmp_path / "t.toml"
    path.write_bytes(TEXTS["toml"])
    more = ["--from-offset", "0", *NOWHERE] if command == "replay" else []
    said = _error(runner.invoke(app, [command, "--db", str(path), *more]))
    assert f"{path} is a text file, not a worker's SQLite file; it is left as it is" in said
    assert "damaged" not in said
    assert path.read_bytes() == TEXTS["toml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.toml"]


@pytest.mark.parametrize("kind", ["random bytes", "bad utf-8 in a text"])
def test_binary_files_are_still_damaged_to_every_command(tmp_path: Path, kind: str) -> None:
    """A file of bytes that are no text is what a damaged worker's file looks like: the
    worker moves it aside, and `runs` says so."""
    path = tmp_path / "x.db"
    data = random.Random(5).randbytes(8192) if kind == "random bytes" else TEXTS[kind]
    path.write_bytes(data)
    said = _error(runner.invoke(app, ["runs", "--db", str(path)]))
    assert "is damaged" in said
    assert "moves it aside" in said
    assert path.read_bytes() == data


@pytest.mark.parametrize("kind", ["toml", "huge line"])
def test_a_worker_refusing_a_path_leaves_no_lock_file(tmp_path: Path, kind: str) -> None:
    """The worker's open of a text file is refused, and `<path>.lock`, which it made to
    hold the file, is gone with it; a lock file that was there before stays."""
    path = tmp_path / "t.toml"
    path.write_bytes(TEXTS[kind])
    with pytest.raises(StoreError, match="is a text file"):
        asyncio.run(Store.open(path, exclusive=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.toml"]
    Path(f"{path}.lock").write_bytes(b"")
    with pytest.raises(StoreError, match="is a text file"):
        asyncio.run(Store.open(path, exclusive=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.toml", "t.toml.lock"]


def test_after_a_refusal_removed_its_lock_file_a_worker_holds_a_new_one(tmp_path: Path) -> None:
    """After a refusal removed the lock file it made, the next worker makes and holds a
    new one, and a second is refused while it runs."""
    path = tmp_path / "jobs.db"
    path.write_bytes(TEXTS["toml"])
    with pytest.raises(StoreError, match="is a text file"):
        asyncio.run(Store.open(path, exclusive=True))
    path.unlink()
    lock = Path(f"{path}.lock")

    async def scenario() -> None:
        store = await Store.open(path, exclusive=True)
        try:
            assert lock.is_file()  # noqa: ASYNC240
            with pytest.raises(StoreError, match="in use by another worker"):
                await Store.open(path, exclusive=True)
        finally:
            await store.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("holder", ["worker", "console"])
def test_replay_refuses_a_file_a_worker_or_console_holds(tmp_path: Path, holder: str) -> None:
    """`replay --db F` while a worker or a console runs on F is refused in one line, as
    `serve` is, and writes nothing: the runs it would write are not the holder's."""
    path = tmp_path / "jobs.db"

    async def hold() -> Any:
        if holder == "worker":
            return await Store.open(path, exclusive=True)
        return await ConsoleDb.open(path, "jobs.status")

    loop = asyncio.new_event_loop()
    try:
        held = loop.run_until_complete(hold())
        try:
            before = path.read_bytes()
            result = runner.invoke(
                app, ["replay", "--db", str(path), "--from-offset", "0", *NOWHERE]
            )
            said = _error(result)
            assert f"{path} is in use by another process: {path}.lock is locked" in said
            assert "give replay another --db" in said
            assert path.read_bytes() == before
            # and a console is refused by the holder as before
            with pytest.raises(ConsoleError, match="in use by another process"):
                loop.run_until_complete(ConsoleDb.open(path, "jobs.status"))
        finally:
            loop.run_until_complete(held.close())
    finally:
        loop.close()
    # once the holder stops, replay gets past the file (to the broker, which is not there)
    result = runner.invoke(app, ["replay", "--db", str(path), "--from-offset", "0", *NOWHERE])
    said = _error(result)
    assert "in use" not in said
    assert "cannot connect to Kafka" in said


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_a_link_to_a_file_in_use_is_refused_too(tmp_path: Path, link: str) -> None:
    """A worker's lock file goes by the path: a second worker given a symbolic or hard link
    to a file in use took a lock file of its own, and the two wrote one file at once until
    it was damaged. The file itself is locked too, so the link is refused in one line; once
    the first worker stops, a worker on the link gets the file."""
    path = tmp_path / "jobs.db"
    other = tmp_path / "elsewhere"
    other.mkdir()
    alias = other / "alias.db"

    async def scenario() -> None:
        store = await Store.open(path, exclusive=True)
        try:
            if link == "symbolic":
                alias.symlink_to(path)
            else:
                alias.hardlink_to(path)
            with pytest.raises(StoreError, match="through another path") as refused:
                await Store.open(alias, exclusive=True)
            assert str(alias) in str(refused.value)
            assert "a SQLite file of its own" in str(refused.value)
            # and the console, and replay's lock, the same
            with pytest.raises(ConsoleError, match="through another path"):
                await ConsoleDb.open(alias, "jobs.status")
        finally:
            await store.close()
        again = await Store.open(alias, exclusive=True)
        await again.close()

    asyncio.run(scenario())
