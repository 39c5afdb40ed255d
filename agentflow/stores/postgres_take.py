"""The PostgreSQL store's ``take``: a run handed over leased and loaded in one statement.

One round trip (see :class:`~agentflow.stores.capabilities.TakesRuns`), shared by the
runs taken at one moment (:data:`TAKES`, :mod:`~agentflow.stores.postgres_batches`): an
``UPDATE ... RETURNING`` gives a running run of the workflow without an owner the next lease token,
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
from .postgres_batches import ALONE, Batches
from .postgres_pool import Connections
from .postgres_rows import BATCH_KEYS, COLUMNS, LIVE, LIVE_R, attached, to_record
from .postgres_schema import JOURNAL, NOW, OUTPUTS, RUNS

__all__ = ["TAKE", "TAKES", "PgTake"]

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
    f"SELECT r.*, {attached('%(ns)s', '%(run_id)s')} FROM r"
)
_N = len(COLUMNS)
_R_COLS = ", ".join(f"r.{name}" for name in COLUMNS)

#: :data:`TAKE` for many runs, one statement (see :mod:`~agentflow.stores.postgres_batches`):
#: parameters ns and batch, a JSON array of one object per run (run_id, workflow, owner,
#: ttl, nonce); a row as TAKE's for each run taken (its run id first), none for the others.
TAKES = (
    "WITH i AS (SELECT * FROM json_to_recordset(%(batch)s::json) "
    "AS i(run_id text, workflow text, owner text, ttl float8, nonce text)), "
    f"t AS (UPDATE {RUNS} r SET lease_owner = i.owner, lease_token = r.lease_token + 1, "
    f"lease_expires = {NOW} + i.ttl, updated_at = {NOW}, written_by = i.nonce FROM i "
    f"WHERE {BATCH_KEYS} AND {LIVE_R} "
    f"AND r.status IS NOT DISTINCT FROM '{RunStatus.RUNNING.value}' "
    f"AND r.workflow IS NOT DISTINCT FROM i.workflow AND r.lease_owner IS NULL RETURNING {_R_COLS}), "
    f"x AS (SELECT {_COLS} FROM t UNION ALL SELECT {_R_COLS} FROM {RUNS} r JOIN i ON i.run_id = r.run_id "
    f"WHERE {BATCH_KEYS} AND {LIVE_R} "
    "AND r.written_by = i.nonce AND r.lease_owner = i.owner) "
    f"SELECT x.*, {attached('%(ns)s', 'x.run_id')} FROM x"
)


class PgTake:
    """The ``TakesRuns`` method of :class:`~agentflow.stores.postgres.PostgresStore`."""

    key_prefix: str
    _db: Connections
    _takes: Batches

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
        params = {"run_id": run_id, "workflow": workflow, "owner": owner, "ttl": float(ttl), "nonce": nonce}
        # With the other runs taken at this moment (a claim's): one statement for them all.
        row = await self._takes.write(run_id, None, params)
        if row is ALONE:  # the batch was refused: alone, for this run's own answer

            async def job(conn: Conn) -> Any:
                return await (await conn.execute(TAKE, {**params, "ns": self.key_prefix})).fetchone()

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
