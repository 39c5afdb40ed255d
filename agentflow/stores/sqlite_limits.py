"""The SQLite store's rate limits: the processes sharing a file share its limits.

Two tables in the store's file (created on first use; every row carries ``ns``, the
key prefix)::

    agentflow_limit_calls  (ns, key, ticket) -> at, tokens: the calls of the window
    agentflow_limit_slots  (ns, key, ticket) -> expires: concurrency slots held

A turn is one ``BEGIN IMMEDIATE`` transaction (the file's write lock: turns of all
processes queue for it): what left the window goes, the rest is read and judged by
:func:`agentflow.stores.limits.verdict`, and a granted call is inserted with its
slot. The clock is this machine's (``time.time()``), which every process sharing the
file shares, as for leases. What a limit leaves behind is bounded by one window's
calls, deleted by its next turn.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

from .capabilities import Quota
from .limits import verdict
from .sqlite_calls import TwoConnections
from .sqlite_rows import transaction

__all__ = ["Quota", "SqliteLimits", "acquire", "release", "renew"]

T = TypeVar("T")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS agentflow_limit_calls (ns TEXT NOT NULL, key TEXT NOT NULL, "
    "ticket TEXT NOT NULL, at REAL NOT NULL, tokens INTEGER NOT NULL, PRIMARY KEY (ns, key, ticket)) "
    "WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS agentflow_limit_calls_at ON agentflow_limit_calls (ns, key, at)",
    "CREATE TABLE IF NOT EXISTS agentflow_limit_slots (ns TEXT NOT NULL, key TEXT NOT NULL, "
    "ticket TEXT NOT NULL, expires REAL NOT NULL, PRIMARY KEY (ns, key, ticket)) WITHOUT ROWID",
)


def _ready(db: sqlite3.Connection, job: Callable[[], T]) -> T:
    """``job()``, the tables created first if it finds them missing."""
    try:
        return job()
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
    with transaction(db):
        for statement in _SCHEMA:
            db.execute(statement)
    return job()


def acquire(
    db: sqlite3.Connection, ns: str, key: str, ticket: str, quota: Quota, tokens: int
) -> tuple[float, str | None]:
    """:meth:`~agentflow.stores.capabilities.RateLimits.acquire_limit` in one transaction."""

    def job() -> tuple[float, str | None]:
        with transaction(db):
            now = time.time()
            where = (ns, key)
            db.execute(
                "DELETE FROM agentflow_limit_calls WHERE ns = ? AND key = ? AND at <= ?",
                (*where, now - quota.window),
            )
            db.execute(
                "DELETE FROM agentflow_limit_slots WHERE ns = ? AND key = ? AND expires <= ?", (*where, now)
            )
            calls = db.execute(
                "SELECT at, tokens, ticket FROM agentflow_limit_calls WHERE ns = ? AND key = ? ORDER BY at",
                where,
            ).fetchall()
            slots = [
                t
                for (t,) in db.execute(
                    "SELECT ticket FROM agentflow_limit_slots WHERE ns = ? AND key = ?", where
                )
            ]
            if ticket in slots or any(c[2] == ticket for c in calls):
                return 0.0, None  # granted by an attempt whose answer was lost
            wait = verdict(quota, now, [(at, n) for at, n, _ in calls], len(slots), max(0, tokens))
            if wait[0] > 0:
                return wait
            db.execute(
                "INSERT INTO agentflow_limit_calls (ns, key, ticket, at, tokens) VALUES (?, ?, ?, ?, ?)",
                (*where, ticket, now, max(0, tokens)),
            )
            if quota.concurrent is not None:
                db.execute(
                    "INSERT INTO agentflow_limit_slots (ns, key, ticket, expires) VALUES (?, ?, ?, ?)",
                    (*where, ticket, now + quota.hold),
                )
            return wait

    return _ready(db, job)


def renew(db: sqlite3.Connection, ns: str, key: str, ticket: str, quota: Quota) -> None:
    """:meth:`~agentflow.stores.capabilities.RateLimits.renew_limit`."""

    def job() -> None:
        with transaction(db):
            db.execute(
                "UPDATE agentflow_limit_slots SET expires = ? WHERE ns = ? AND key = ? AND ticket = ?",
                (time.time() + quota.hold, ns, key, ticket),
            )

    _ready(db, job)


def release(db: sqlite3.Connection, ns: str, key: str, ticket: str, tokens: int | None) -> None:
    """:meth:`~agentflow.stores.capabilities.RateLimits.release_limit`."""

    def job() -> None:
        with transaction(db):
            db.execute(
                "DELETE FROM agentflow_limit_slots WHERE ns = ? AND key = ? AND ticket = ?", (ns, key, ticket)
            )
            if tokens is not None:
                db.execute(
                    "UPDATE agentflow_limit_calls SET tokens = ? WHERE ns = ? AND key = ? AND ticket = ?",
                    (max(0, tokens), ns, key, ticket),
                )

    _ready(db, job)


class SqliteLimits(TwoConnections):
    """The ``RateLimits`` methods of :class:`~agentflow.stores.sqlite.SqliteStore`:
    each one transaction, shared by the file's processes."""

    key_prefix: str

    async def acquire_limit(
        self, key: str, ticket: str, quota: Quota, tokens: int
    ) -> tuple[float, str | None]:
        """A turn of rate limit ``key`` for ``ticket``: one transaction, shared by the file's processes."""
        return await self._call(
            f"a turn of rate limit {key!r}",
            None,
            lambda db: acquire(db, self.key_prefix, key, ticket, quota, tokens),
            write=True,
        )

    async def renew_limit(self, key: str, ticket: str, quota: Quota) -> None:
        """Keep ``ticket``'s concurrency slot of ``key`` for another ``quota.hold`` seconds."""
        await self._call(
            f"renewing a slot of rate limit {key!r}",
            None,
            lambda db: renew(db, self.key_prefix, key, ticket, quota),
            write=True,
        )

    async def release_limit(self, key: str, ticket: str, quota: Quota, tokens: int | None) -> None:
        """Give back ``ticket``'s slot of ``key`` and count its real ``tokens``."""
        await self._call(
            f"releasing a turn of rate limit {key!r}",
            None,
            lambda db: release(db, self.key_prefix, key, ticket, tokens),
            write=True,
        )
