"""The PostgreSQL store's rate limits: a row per limit, locked while a turn is judged.

Tables (created on first use, beside the store's others; every row carries ``ns``,
the key prefix)::

    agentflow_limits       (ns, key): one row per limit, the lock a turn takes
    agentflow_limit_calls  (ns, key, ticket) -> at, tokens: the calls of the window
    agentflow_limit_slots  (ns, key, ticket) -> expires: concurrency slots held

A turn is one transaction of three statements: an upsert of the limit's row takes
its lock, as ``SELECT ... FOR UPDATE`` would (turns of one limit queue for it, those
of other limits do not), and reads the database's clock (``clock_timestamp()``,
after the lock); the calls that left the window and the expired slots are deleted
and the rest is read, to be judged by :func:`agentflow.stores.limits.verdict`; a
granted call is inserted, with its slot. Times are seconds of the database's clock,
so machines whose clocks disagree share one window. What a limit leaves behind is
bounded by one window's calls, deleted by its next turn.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors

from .capabilities import Quota
from .limits import verdict
from .postgres_pool import Connections

__all__ = ["SCHEMA", "PgLimits", "Quota", "acquire", "ensure", "release", "renew"]

Conn = psycopg.AsyncConnection[Any]
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS agentflow_limits (
    ns text NOT NULL, key text NOT NULL, PRIMARY KEY (ns, key));
CREATE TABLE IF NOT EXISTS agentflow_limit_calls (
    ns text NOT NULL, key text NOT NULL, ticket text NOT NULL,
    at double precision NOT NULL, tokens bigint NOT NULL,
    PRIMARY KEY (ns, key, ticket));
CREATE INDEX IF NOT EXISTS agentflow_limit_calls_at ON agentflow_limit_calls (ns, key, at);
CREATE TABLE IF NOT EXISTS agentflow_limit_slots (
    ns text NOT NULL, key text NOT NULL, ticket text NOT NULL,
    expires double precision NOT NULL, PRIMARY KEY (ns, key, ticket));
"""

_NOW = "extract(epoch FROM clock_timestamp())::double precision"

_LOCK = (
    "INSERT INTO agentflow_limits (ns, key) VALUES (%s, %s) "
    "ON CONFLICT (ns, key) DO UPDATE SET key = EXCLUDED.key RETURNING " + _NOW
)
# What left the window goes, and what is left is read, in one statement (the main query
# sees the rows as they were before the deletes, hence its own bounds).
_READ = """
WITH gone AS (
    DELETE FROM agentflow_limit_calls WHERE ns = %(ns)s AND key = %(key)s AND at <= %(start)s
), freed AS (
    DELETE FROM agentflow_limit_slots WHERE ns = %(ns)s AND key = %(key)s AND expires <= %(now)s
)
SELECT 'c', ticket, at, tokens FROM agentflow_limit_calls
    WHERE ns = %(ns)s AND key = %(key)s AND at > %(start)s
UNION ALL
SELECT 's', ticket, expires, 0 FROM agentflow_limit_slots
    WHERE ns = %(ns)s AND key = %(key)s AND expires > %(now)s
"""
_GRANT = """
WITH slot AS (
    INSERT INTO agentflow_limit_slots (ns, key, ticket, expires)
    SELECT %(ns)s, %(key)s, %(ticket)s, %(expires)s WHERE %(slot)s
)
INSERT INTO agentflow_limit_calls (ns, key, ticket, at, tokens)
    VALUES (%(ns)s, %(key)s, %(ticket)s, %(now)s, %(tokens)s)
"""
_RENEW = (
    "UPDATE agentflow_limit_slots SET expires = " + _NOW + " + %s WHERE ns = %s AND key = %s AND ticket = %s"
)
_FREE = "DELETE FROM agentflow_limit_slots WHERE ns = %s AND key = %s AND ticket = %s"
_CORRECT = "UPDATE agentflow_limit_calls SET tokens = %s WHERE ns = %s AND key = %s AND ticket = %s"


async def ensure(conn: Conn) -> None:
    """Create the tables if they are missing (under a lock, so processes starting together agree)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('agentflow_limits'))")
        await conn.execute(SCHEMA)


async def _ready(conn: Conn, job: Callable[[], Awaitable[T]]) -> T:
    """``job()``, the tables created first if it finds them missing."""
    try:
        return await job()
    except pg_errors.UndefinedTable:
        await ensure(conn)
        return await job()


async def acquire(
    conn: Conn, ns: str, key: str, ticket: str, quota: Quota, tokens: int
) -> tuple[float, str | None]:
    """:meth:`~agentflow.stores.capabilities.RateLimits.acquire_limit` in one transaction."""
    return await _ready(conn, lambda: _acquire(conn, ns, key, ticket, quota, tokens))


async def _acquire(
    conn: Conn, ns: str, key: str, ticket: str, quota: Quota, tokens: int
) -> tuple[float, str | None]:
    async with conn.transaction():
        row = await (await conn.execute(_LOCK, (ns, key))).fetchone()
        assert row is not None
        now = float(row[0])
        where = {"ns": ns, "key": key, "now": now, "start": now - quota.window}
        rows = await (await conn.execute(_READ, where)).fetchall()
        calls = sorted((float(at), int(n)) for kind, _, at, n in rows if kind == "c")
        tickets = {t for _, t, _, _ in rows}
        if ticket in tickets:
            return 0.0, None  # granted by an attempt whose answer was lost
        slots = sum(1 for kind, *_ in rows if kind == "s")
        wait = verdict(quota, now, calls, slots, max(0, tokens))
        if wait[0] > 0:
            return wait
        grant = {
            **where,
            "ticket": ticket,
            "tokens": max(0, tokens),
            "expires": now + quota.hold,
            "slot": quota.concurrent is not None,
        }
        await conn.execute(_GRANT, grant)
        return wait


async def renew(conn: Conn, ns: str, key: str, ticket: str, quota: Quota) -> None:
    """:meth:`~agentflow.stores.capabilities.RateLimits.renew_limit`."""

    async def job() -> None:
        await conn.execute(_RENEW, (quota.hold, ns, key, ticket))

    await _ready(conn, job)


async def release(conn: Conn, ns: str, key: str, ticket: str, tokens: int | None) -> None:
    """:meth:`~agentflow.stores.capabilities.RateLimits.release_limit`."""

    async def job() -> None:
        async with conn.transaction():
            await conn.execute(_FREE, (ns, key, ticket))
            if tokens is not None:
                await conn.execute(_CORRECT, (max(0, tokens), ns, key, ticket))

    await _ready(conn, job)


class PgLimits:
    """The ``RateLimits`` methods of :class:`~agentflow.stores.postgres.PostgresStore`:
    each one transaction on a pooled connection, on the database's clock."""

    key_prefix: str
    _db: Connections

    async def acquire_limit(
        self, key: str, ticket: str, quota: Quota, tokens: int
    ) -> tuple[float, str | None]:
        """A turn of rate limit ``key`` for ``ticket``: one transaction, on the database's clock."""

        async def job(conn: Conn) -> tuple[float, str | None]:
            return await acquire(conn, self.key_prefix, key, ticket, quota, tokens)

        return await self._db.run(f"a turn of rate limit {key!r}", None, job)

    async def renew_limit(self, key: str, ticket: str, quota: Quota) -> None:
        """Keep ``ticket``'s concurrency slot of ``key`` for another ``quota.hold`` seconds."""

        async def job(conn: Conn) -> None:
            await renew(conn, self.key_prefix, key, ticket, quota)

        await self._db.run(f"renewing a slot of rate limit {key!r}", None, job)

    async def release_limit(self, key: str, ticket: str, quota: Quota, tokens: int | None) -> None:
        """Give back ``ticket``'s slot of ``key`` and count its real ``tokens``."""

        async def job(conn: Conn) -> None:
            await release(conn, self.key_prefix, key, ticket, tokens)

        await self._db.run(f"releasing a turn of rate limit {key!r}", None, job)
