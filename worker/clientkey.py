"""Client IDs as the worker compares them, for every filter by client.

The worker counts a request against its client's scope by `client_key` (trimmed, lower
case, as `worker.core.lifecycle.scope_key` and the run ID's suffix spell it): `Acme` and
`acme` are one client. History, the console's API and the command line filter the same way.

SQLite's `lower()` folds ASCII letters only. A wanted ID in ASCII is compared as
`lower(client_id)`, which the console's indexes are built on; any other is compared by
Python's own folding, registered as `KEY_FUNCTION` on the reading connection (no index
serves it: such IDs are rare, and a filter that misses runs would be worse).
"""

from __future__ import annotations

import sqlite3
from typing import Any

KEY_FUNCTION = "jobs_client_key"


def client_key(client_id: str) -> str:
    """`client_id` as the worker compares client IDs: trimmed, in lower case."""
    return client_id.strip().lower()


def _key(value: object) -> str | None:
    return client_key(value) if isinstance(value, str) else None


def client_clause(client_id: str) -> tuple[str, str]:
    """The SQL condition on column `client_id` that keeps the runs of `client_id`, and its
    one parameter."""
    key = client_key(client_id)
    if key.isascii():
        return "lower(client_id) = ?", key
    return f"{KEY_FUNCTION}(client_id) = ?", key


def register_key(db: sqlite3.Connection) -> None:
    """Make `KEY_FUNCTION` known to the connection `db` (for `client_clause`)."""
    db.create_function(KEY_FUNCTION, 1, _key, deterministic=True)


async def register_key_async(db: Any) -> None:
    """`register_key` for an aiosqlite connection."""
    await db.create_function(KEY_FUNCTION, 1, _key, deterministic=True)
