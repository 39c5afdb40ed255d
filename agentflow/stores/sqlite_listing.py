"""The SQLite store's reads of many runs: listings, recovery, approvals, due gates, and
the versions of the runs a process waits on (``ReadsVersions``).

Each is one indexed statement (see :mod:`agentflow.stores.sqlite_index`), run on the
loop's connection: reads never wait for the writer in WAL mode.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from ..types import RunStatus
from . import sqlite_index as sqlindex
from . import sqlite_rows as sqlrows
from .contract import RunRecord
from .sqlite_calls import TwoConnections

__all__ = ["SqliteListing"]

#: Run ids one read of ``versions`` asks about (SQLite allows 32,766 parameters).
_VERSIONS_AT_ONCE = 500


class SqliteListing(TwoConnections):
    """The listing and polling reads of :class:`~agentflow.stores.sqlite.SqliteStore`."""

    key_prefix: str

    async def versions(self, run_ids: Sequence[str]) -> dict[str, Any]:
        """``((status, control flag), (event count, updated_at))`` of each run there is, in
        one read (``ReadsVersions``)."""
        ids = list(run_ids)

        def job(db: sqlite3.Connection) -> dict[str, Any]:
            out: dict[str, Any] = {}
            now = time.time()
            for i in range(0, len(ids), _VERSIONS_AT_ONCE):
                chunk = ids[i : i + _VERSIONS_AT_ONCE]
                marks = ", ".join("?" for _ in chunk)
                rows = db.execute(sqlrows.SELECT_VERSIONS.format(marks=marks), (self.key_prefix, *chunk, now))
                out.update((row[0], (row[1:3], row[3:5])) for row in rows)
            return out

        return await self._call("versions", None, job) if ids else {}

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

        def job(db: sqlite3.Connection) -> list[RunRecord]:
            return sqlindex.list_runs(db, self.key_prefix, time.time(), workflow, status, limit, after)

        return await self._call("list_runs", after, job)

    async def recoverable(self, workflow: str, limit: int = 100) -> list[str]:
        """Ids of ``workflow``'s running runs whose lease ran out by this machine's clock."""

        def job(db: sqlite3.Connection) -> list[str]:
            return sqlindex.recoverable(db, self.key_prefix, workflow, time.time(), limit)

        return await self._call("recoverable", None, job)

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

        def job(db: sqlite3.Connection) -> list[dict[str, Any]]:
            return sqlindex.list_approvals(db, self.key_prefix, approver, workflow, kind, limit, after)

        return await self._call("approvals", after, job)

    async def due_gates(self, workflow: str, now: float) -> list[str]:
        """Ids of runs of ``workflow`` waiting at a gate whose deadline is at or before ``now``."""

        def job(db: sqlite3.Connection) -> list[str]:
            return sqlindex.due_gates(db, self.key_prefix, workflow, now, time.time())

        return await self._call("due_gates", None, job)
