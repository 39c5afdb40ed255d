"""The SQLite store's credentials: the ``agentflow_credentials`` table (see ``Credentials``).

A credential is a row ``(ns, key) -> value`` (JSON text), ``ns`` the key prefix. Each
call is one statement, so one transaction: a put-if-absent is an ``INSERT ... ON
CONFLICT DO NOTHING``, which two processes racing on one file cannot both win.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from .codec import credential_key, decode_credential, encode_credential
from .sqlite_calls import TwoConnections
from .sqlite_schema import CREDENTIALS

__all__ = ["SqliteCredentials"]

_INSERT = f"INSERT INTO {CREDENTIALS} (ns, key, value) VALUES (?, ?, ?)"
_PUT_NEW = f"{_INSERT} ON CONFLICT (ns, key) DO NOTHING"
_PUT = f"{_INSERT} ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value"
_GET = f"SELECT value FROM {CREDENTIALS} WHERE ns = ? AND key = ?"
_DELETE = f"DELETE FROM {CREDENTIALS} WHERE ns = ? AND key = ?"
# The range bound lets the primary key find the first one; substr keeps the rest exact.
_LIST = (
    f"SELECT key, value FROM {CREDENTIALS} WHERE ns = ? AND key >= ? AND substr(key, 1, ?) = ? ORDER BY key"
)


class SqliteCredentials(TwoConnections):
    """The ``Credentials`` methods of :class:`~agentflow.stores.sqlite.SqliteStore`."""

    key_prefix: str
    _writes_inline: bool

    async def put_credential(self, key: str, value: dict[str, Any], only_new: bool = False) -> bool:
        """Write ``value`` under ``key`` (with ``only_new``, only if nothing is there)."""
        raw = encode_credential(key, value).decode()
        args = (self.key_prefix, key, raw)

        def job(db: sqlite3.Connection) -> bool:
            return db.execute(_PUT_NEW if only_new else _PUT, args).rowcount > 0

        return await self._call(f"writing credential {key!r}", None, job, self._writes_inline, write=True)

    async def get_credential(self, key: str) -> dict[str, Any] | None:
        """The value under ``key``, or None."""
        args = (self.key_prefix, credential_key(key))

        def job(db: sqlite3.Connection) -> Any:
            return db.execute(_GET, args).fetchone()

        row = await self._call(f"reading credential {key!r}", None, job)
        return None if row is None else decode_credential(key, row[0])

    async def delete_credential(self, key: str) -> bool:
        """Remove ``key``; False when it held nothing."""
        args = (self.key_prefix, credential_key(key))

        def job(db: sqlite3.Connection) -> bool:
            return db.execute(_DELETE, args).rowcount > 0

        return await self._call(f"deleting credential {key!r}", None, job, self._writes_inline, write=True)

    async def list_credentials(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        """Every ``(key, value)`` whose key starts with ``prefix``, by key."""
        args = (self.key_prefix, prefix, len(prefix), prefix)

        def job(db: sqlite3.Connection) -> list[Any]:
            return db.execute(_LIST, args).fetchall()

        rows = await self._call(f"listing credentials {prefix!r}", None, job)
        return [(key, decode_credential(key, value)) for key, value in rows]
