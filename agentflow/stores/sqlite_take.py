"""The SQLite store's ``take``: a run handed over leased and loaded in one transaction.

What ``update`` (giving the run an owner) and ``load`` do one after the other, in one
write transaction (see :class:`~agentflow.stores.capabilities.TakesRuns`): an ``UPDATE``
gives a running run of the workflow without an owner the next lease token, and only
when it matched are the record, its outputs and its journal read, under the same lock.
The file is on this machine, so there is no reply to lose: the transaction committed
when the call returns, or it raised and wrote nothing.
"""

from __future__ import annotations

import sqlite3
import time

from ..types import RunStatus
from . import sqlite_rows as sqlrows
from . import sqlite_schema as sql
from .codec import decode, make_output
from .contract import Lease, LoadedRun
from .sqlite_calls import TwoConnections

__all__ = ["TAKE", "SqliteTake"]

#: Parameters: owner, lease_expires, updated_at, ns, run_id, workflow, now (liveness).
TAKE = (
    f"UPDATE {sql.RUNS} SET lease_owner = ?, lease_token = lease_token + 1, lease_expires = ?, "
    f"updated_at = ? WHERE ns = ? AND run_id = ? AND workflow = ? "
    f"AND status = '{RunStatus.RUNNING.value}' AND lease_owner IS NULL AND {sqlrows.LIVE}"
)


class SqliteTake(TwoConnections):
    """The ``TakesRuns`` method of :class:`~agentflow.stores.sqlite.SqliteStore`."""

    key_prefix: str
    _writes_inline: bool

    async def take(
        self, run_id: str, workflow: str, owner: str, ttl: float
    ) -> tuple[Lease, LoadedRun] | None:
        """Take the lease of a run handed over and load it, in one transaction (``TakesRuns``).

        Returns None, changing nothing, unless the run is running, of ``workflow`` and
        without an owner.

        Raises:
            CorruptRecordError: part of the run cannot be read (names the run and key).
        """
        key = (self.key_prefix, run_id)

        def job(db: sqlite3.Connection) -> tuple[Lease, LoadedRun] | None:
            with sqlrows.transaction(db):
                now = time.time()
                if db.execute(TAKE, (owner, now + ttl, now, *key, workflow, now)).rowcount != 1:
                    return None
                row = db.execute(sqlrows.SELECT_FULL, (*key, now)).fetchone()
                outputs = db.execute(sqlrows.SELECT_OUTPUTS, key).fetchall()
                journal = db.execute(sqlrows.SELECT_JOURNAL, key).fetchall()
            record = sqlrows.to_record(row, light=False)
            loaded = LoadedRun(
                record,
                [make_output(run_id, f"{sql.OUTPUTS}[{i}]", body) for i, (body,) in enumerate(outputs)],
                {k: decode(run_id, f"{sql.JOURNAL}[{k}]", value) for k, value in journal},
            )
            return Lease(owner, record.lease_token), loaded

        return await self._call("take", run_id, job, self._writes_inline, write=True)
