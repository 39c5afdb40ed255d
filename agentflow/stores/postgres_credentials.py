"""The PostgreSQL store's credentials: the ``agentflow_credentials`` table (see ``Credentials``).

A credential is a row ``(ns, key) -> value`` (JSON text), ``ns`` the key prefix. Each
call is one statement: a put-if-absent is an ``INSERT ... ON CONFLICT DO NOTHING``,
which two processes racing cannot both win. Listings are sorted here, by code point,
whatever collation the database compares text with.
"""

from __future__ import annotations

from typing import Any

import psycopg

from .codec import credential_key, decode_credential, encode_credential
from .postgres_pool import Connections
from .postgres_schema import CREDENTIALS

__all__ = ["PgCredentials"]

Conn = psycopg.AsyncConnection[Any]

_INSERT = f"INSERT INTO {CREDENTIALS} (ns, key, value) VALUES (%s, %s, %s)"
_PUT_NEW = f"{_INSERT} ON CONFLICT (ns, key) DO NOTHING"
_PUT = f"{_INSERT} ON CONFLICT (ns, key) DO UPDATE SET value = EXCLUDED.value"
_GET = f"SELECT value FROM {CREDENTIALS} WHERE ns = %s AND key = %s"
_DELETE = f"DELETE FROM {CREDENTIALS} WHERE ns = %s AND key = %s"
_LIST = f"SELECT key, value FROM {CREDENTIALS} WHERE ns = %s AND starts_with(key, %s)"


class PgCredentials:
    """The ``Credentials`` methods of :class:`~agentflow.stores.postgres.PostgresStore`."""

    key_prefix: str
    _db: Connections

    async def put_credential(self, key: str, value: dict[str, Any], only_new: bool = False) -> bool:
        """Write ``value`` under ``key`` (with ``only_new``, only if nothing is there)."""
        args = (self.key_prefix, key, encode_credential(key, value).decode())

        async def job(conn: Conn) -> bool:
            return (await conn.execute(_PUT_NEW if only_new else _PUT, args)).rowcount > 0

        return await self._db.run(f"writing credential {key!r}", None, job)

    async def get_credential(self, key: str) -> dict[str, Any] | None:
        """The value under ``key``, or None."""
        args = (self.key_prefix, credential_key(key))

        async def job(conn: Conn) -> Any:
            return await (await conn.execute(_GET, args)).fetchone()

        row = await self._db.run(f"reading credential {key!r}", None, job)
        return None if row is None else decode_credential(key, row[0])

    async def delete_credential(self, key: str) -> bool:
        """Remove ``key``; False when it held nothing."""
        args = (self.key_prefix, credential_key(key))

        async def job(conn: Conn) -> bool:
            return (await conn.execute(_DELETE, args)).rowcount > 0

        return await self._db.run(f"deleting credential {key!r}", None, job)

    async def list_credentials(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        """Every ``(key, value)`` whose key starts with ``prefix``, by key."""

        async def job(conn: Conn) -> list[Any]:
            return await (await conn.execute(_LIST, (self.key_prefix, prefix))).fetchall()

        rows = sorted(await self._db.run(f"listing credentials {prefix!r}", None, job))
        return [(key, decode_credential(key, value)) for key, value in rows]
