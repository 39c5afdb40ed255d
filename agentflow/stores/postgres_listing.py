"""The PostgreSQL store's reads of many runs: listings, recovery, approvals and due gates.

Each is one indexed statement (see :mod:`agentflow.stores.postgres_index`) on a pooled
connection, and costs what it returns. Leases are judged by the database's clock
(``recoverable``), gate deadlines by the caller's ``now`` (``due_gates``); runs whose
ttl ran out read as absent, as everywhere.
"""

from __future__ import annotations

from typing import Any

import psycopg

from ..types import RunStatus
from . import postgres_index as pgindex
from .contract import RunRecord
from .postgres_pool import Connections

__all__ = ["PgListing"]

Conn = psycopg.AsyncConnection[Any]


class PgListing:
    """The listing and polling reads of :class:`~agentflow.stores.postgres.PostgresStore`."""

    key_prefix: str
    _db: Connections

    async def list_runs(
        self,
        workflow: str | None = None,
        status: RunStatus | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[RunRecord]:
        """Light records (no input, state, output), newest first, at most ``limit``.

        ``after`` is the ``run_id`` of the last record of the previous page. A row that
        cannot be decoded is listed with ``corrupt`` set.

        Raises:
            StoreError: ``after`` names a run that is not stored (deleted since).
        """
        status = None if status is None else RunStatus(status)

        async def job(conn: Conn) -> list[RunRecord]:
            return await pgindex.list_runs(conn, self.key_prefix, workflow, status, limit, after)

        return await self._db.run("list_runs", after, job)

    async def recoverable(self, workflow: str, limit: int = 100) -> list[str]:
        """Ids of ``workflow``'s running runs whose lease ran out by the database's clock."""

        async def job(conn: Conn) -> list[str]:
            return await pgindex.recoverable(conn, self.key_prefix, workflow, limit)

        return await self._db.run("recoverable", None, job)

    async def approvals(
        self,
        approver: str | None = None,
        workflow: str | None = None,
        kind: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[dict[str, Any]]:
        """Pending approvals, newest first, at most ``limit`` (one indexed statement).

        Raises:
            StoreError: ``after`` is not an approval of a stored run.
        """
        if limit <= 0:
            return []

        async def job(conn: Conn) -> list[dict[str, Any]]:
            return await pgindex.list_approvals(conn, self.key_prefix, approver, workflow, kind, limit, after)

        return await self._db.run("approvals", after, job)

    async def due_gates(self, workflow: str, now: float) -> list[str]:
        """Ids of runs of ``workflow`` waiting at a gate whose deadline is at or before ``now``."""

        async def job(conn: Conn) -> list[str]:
            return await pgindex.due_gates(conn, self.key_prefix, workflow, now)

        return await self._db.run("due_gates", None, job)
