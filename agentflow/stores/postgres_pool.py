"""The PostgreSQL store's connections: a pool opened on first use, and calls retried through outages.

A call takes a connection from a ``psycopg_pool.AsyncConnectionPool`` (autocommit
connections: a statement is its own transaction unless the call opens one), runs, and
gives it back. When the server cannot be reached — it is restarting, the network
dropped — the call is run again on another connection, with backoff, for ``retry_for``
seconds, and then raises :class:`StoreError`. Waiting for a connection of the pool while
all are in use is not an outage: as long as other calls of the store are completing
(one did within the last ``retry_for`` seconds), a caller waits its turn however long
the line is; only a pool that gives out no connection and completes no call for
``retry_for`` seconds counts as unreachable. Every write is
one transaction that is safe to send again after a lost reply (the store's writes
recognise their own earlier attempt), so retrying never applies a write twice. A
connection that broke is discarded by the pool, which opens new ones as the server
comes back. Serialization failures and deadlocks are retried the same way.

The pool is opened by the first call, in that call's event loop, and the schema is
made ready then (:func:`agentflow.stores.postgres_schema.ensure_schema`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ..errors import StoreError
from .postgres_schema import ensure_schema

__all__ = ["Connections", "describe"]

T = TypeVar("T")
Job = Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]


def describe(url: str) -> str:
    """Where ``url`` points, without its password: ``host:port/dbname``."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(an unreadable URL)"
    host = info.get("host") or info.get("hostaddr") or "localhost"
    return f"{host}:{info.get('port') or 5432}/{info.get('dbname') or info.get('user') or ''}"


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    """Every statement the store prepares runs its generic plan, planned once per connection.

    A custom plan is made for each execution with its values, and for a key prefix the
    statistics have not seen the planner guesses that ``ns = %s`` matches a row or two: it
    then looks a run up by ``(ns, run_id)`` through an index of ``ns`` and something else
    (the running runs', the newest-first one), reading every run of the prefix. Measured
    in the fleet: a take read 1,291 rows a call, and planning was 0.3 ms of a 0.4 ms
    statement. The generic plan takes ``ns`` as the average prefix and uses the keys.
    """
    await conn.execute("SET plan_cache_mode = force_generic_plan")


class Connections:
    """The pool of one store, and the retrying of its calls.

    Args:
        url: a libpq connection string or ``postgresql://`` URL.
        retry_for: seconds to keep retrying while the server is unreachable.
        max_connections: connections the pool opens at most; past that, calls wait.
        connect_timeout: seconds one connection attempt may take.
    """

    def __init__(self, url: str, retry_for: float, max_connections: int, connect_timeout: float) -> None:
        self.url = url
        self.where = describe(url)
        self.retry_for = retry_for
        self._max = max_connections
        self._connect_timeout = connect_timeout
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        self._ready = False  # the schema was checked (once per store)
        self._preparing = asyncio.Lock()
        self._closed = False
        self._progress = -float("inf")  # when a call last completed (monotonic)

    async def run(self, what: str, run_id: str | None, job: Job[T]) -> T:
        """``job(connection)``, retried on another connection while the server is out of reach.

        Raises:
            StoreError: the server stayed unreachable for ``retry_for`` seconds, refused
                the statement, or the store is closed.
        """
        subject = f"run {run_id}: " if run_id else ""
        if self._closed:
            raise StoreError(f"{subject}{what} refused: the PostgreSQL store on {self.where} is closed")
        give_up = time.monotonic() + self.retry_for
        delay = 0.01
        while True:
            left = give_up - time.monotonic()
            try:
                pool = await self._open()
                async with pool.connection(timeout=max(left, 0.05)) as conn:
                    if not self._ready:
                        await self._prepare(conn)
                    out = await job(conn)
                self._progress = time.monotonic()
                return out
            except PoolTimeout:
                if self._closed or time.monotonic() - self._progress >= self.retry_for:
                    raise self._unreachable(subject, what, "no connection came free") from None
                # Every connection is in use and calls are completing: a queue, not an outage.
                give_up = time.monotonic() + self.retry_for
            except psycopg.OperationalError as exc:  # the connection, the server, a conflict
                left = give_up - time.monotonic()
                if left <= 0 or self._closed:
                    raise self._unreachable(subject, what, str(exc)) from exc
                await asyncio.sleep(min(delay * (0.5 + random.random()), left))
                delay = min(delay * 2, 0.5)
            except psycopg.Error as exc:
                raise StoreError(f"{subject}PostgreSQL at {self.where} refused {what}: {exc}") from exc

    def _unreachable(self, subject: str, what: str, why: str) -> StoreError:
        return StoreError(
            f"{subject}PostgreSQL at {self.where} unreachable for {self.retry_for:g} s during "
            f"{what} ({why}); a write is one transaction, so it was applied entirely or not "
            "at all, and sending it again is safe"
        )

    async def _open(self) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
        if self._pool is None:
            pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
                self.url,
                min_size=1,
                max_size=self._max,
                open=False,
                kwargs={"autocommit": True, "connect_timeout": max(1, round(self._connect_timeout))},
                configure=_configure,
                name="agentflow",
            )
            self._pool = pool
            await pool.open(wait=False)
        return self._pool

    async def _prepare(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Make the schema ready; concurrent first calls wait for the one that does it."""
        async with self._preparing:
            if not self._ready:
                await ensure_schema(conn, self.where)
                self._ready = True

    async def close(self) -> None:
        """Close the pool; calls made from now on fail."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
