"""The PostgreSQL store's ``take``: a run handed over leased and loaded in one statement.

One round trip (see :class:`~agentflow.stores.capabilities.TakesRuns`): an ``UPDATE ...
RETURNING`` gives a running run of the workflow without an owner the next lease token,
and the same statement reads the run's outputs and journal (one snapshot, one
transaction). The update leaves the call's nonce in ``written_by``; the statement sent
again after a lost reply matches no row to update (the run has an owner now) but finds
its own nonce there, and returns the run as the first attempt leased it, without taking
it a second time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

from ..types import RunStatus
from .codec import decode, make_output
from .contract import Lease, LoadedRun
from .postgres_pool import Connections
from .postgres_rows import COLUMNS, LIVE, to_record
from .postgres_schema import JOURNAL, NOW, OUTPUTS, RUNS

__all__ = ["TAKE", "PgTake"]

Conn = psycopg.AsyncConnection[Any]
_COLS = ", ".join(COLUMNS)
_KEY = "ns = %(ns)s AND run_id = %(run_id)s"

#: Parameters by name: ns, run_id, workflow, owner, ttl (seconds), nonce. At most one row:
#: the record as this call leased it, its outputs (in order) and journal (key, value pairs).
#: The workflow and status are compared with ``IS NOT DISTINCT FROM`` (the same, for these
#: NOT NULL columns), which no index serves: with ``=`` the planner took the index by
#: (ns, workflow, status) for the row and read every running run of the workflow (900
#: rows a take in the fleet), where the primary key finds the one row.
TAKE = (
    f"WITH t AS (UPDATE {RUNS} SET lease_owner = %(owner)s, lease_token = lease_token + 1, "
    f"lease_expires = {NOW} + %(ttl)s, updated_at = {NOW}, written_by = %(nonce)s "
    f"WHERE {_KEY} AND {LIVE} AND status IS NOT DISTINCT FROM '{RunStatus.RUNNING.value}' "
    "AND workflow IS NOT DISTINCT FROM %(workflow)s "
    f"AND lease_owner IS NULL RETURNING {_COLS}), "
    # A retry after a lost reply: the first attempt's write (the snapshot predates this
    # statement's own, so a first attempt never finds itself here).
    f"r AS (SELECT {_COLS} FROM t UNION ALL SELECT {_COLS} FROM {RUNS} "
    f"WHERE {_KEY} AND {LIVE} AND written_by = %(nonce)s AND lease_owner = %(owner)s) "
    f"SELECT r.*, "
    f"(SELECT array_agg(o.body ORDER BY o.id) FROM {OUTPUTS} o "
    "WHERE o.ns = %(ns)s AND o.run_id = %(run_id)s), "
    f"(SELECT array_agg(ARRAY[j.key, j.value]) FROM {JOURNAL} j "
    "WHERE j.ns = %(ns)s AND j.run_id = %(run_id)s) "
    "FROM r"
)
_N = len(COLUMNS)


class PgTake:
    """The ``TakesRuns`` method of :class:`~agentflow.stores.postgres.PostgresStore`."""

    key_prefix: str
    _db: Connections

    _nonce: Callable[[], str]

    async def take(
        self, run_id: str, workflow: str, owner: str, ttl: float
    ) -> tuple[Lease, LoadedRun] | None:
        """Take the lease of a run handed over and load it, in one statement (``TakesRuns``).

        Returns None, changing nothing, unless the run is running, of ``workflow`` and
        without an owner. Sent again after a lost reply, it returns what the first
        attempt took.

        Raises:
            CorruptRecordError: part of the run cannot be read (names the run and key).
        """
        return await self._take(run_id, workflow, owner, ttl, self._nonce())

    async def _take(
        self, run_id: str, workflow: str, owner: str, ttl: float, nonce: str
    ) -> tuple[Lease, LoadedRun] | None:
        params = {
            "ns": self.key_prefix,
            "run_id": run_id,
            "workflow": workflow,
            "owner": owner,
            "ttl": float(ttl),
            "nonce": nonce,
        }

        async def job(conn: Conn) -> Any:
            return await (await conn.execute(TAKE, params)).fetchone()

        row = await self._db.run("take", run_id, job)
        if row is None:
            return None
        record = to_record(row[:_N])
        outputs, journal = row[_N] or [], row[_N + 1] or []
        loaded = LoadedRun(
            record,
            [make_output(run_id, f"{OUTPUTS}[{i}]", body) for i, body in enumerate(outputs)],
            {k: decode(run_id, f"{JOURNAL}[{k}]", v) for k, v in journal},
        )
        return Lease(owner, record.lease_token), loaded
