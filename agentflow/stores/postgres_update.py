"""The PostgreSQL store's ``update``: a read-modify-write of a run with its row locked.

One transaction: ``SELECT ... FOR UPDATE`` of the run's row (with the database's clock),
``change(record, now)``, and the write of the fields it changed with the new events; a
run that was or becomes waiting has its approvals refiled when its ``pending`` or status
changed. Other writers of the run wait for the lock rather than conflict, so ``change``
runs once. The write leaves the call's nonce in ``written_by``: a retry after a lost
``COMMIT`` reply finds it and returns what the first attempt wrote instead of applying
the change twice. The commits' fence (``commit_token``, ``commit_seq``) is never
written here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

from ..types import RunStatus
from . import postgres_index as pgindex
from . import postgres_rows as pgrows
from .codec import check_record, column_value, deadline_of, encode_event
from .contract import ChangeFn, RunRecord
from .postgres_pool import Connections

__all__ = ["PgUpdate"]

Conn = psycopg.AsyncConnection[Any]
_N = len(pgrows.COLUMNS)


class PgUpdate:
    """The ``update`` method of :class:`~agentflow.stores.postgres.PostgresStore`."""

    key_prefix: str
    ttl: float | None
    _db: Connections

    _nonce: Callable[[], str]

    async def update(self, run_id: str, change: ChangeFn) -> RunRecord | None:
        """Read-modify-write the record with its row locked (``SELECT ... FOR UPDATE``).

        ``change(record, now)`` runs inside the transaction, with ``now`` from the
        database's clock; other writers wait for the lock instead of conflicting, so it
        is called once (again only when the connection failed before the write was
        committed). Only the fields it changes are written.

        Raises:
            CorruptRecordError: the stored record cannot be read; nothing was written.
        """
        ns, nonce = self.key_prefix, self._nonce()
        sent: list[RunRecord] = []  # what the last attempt wrote, for a retry after a lost reply

        async def job(conn: Conn) -> RunRecord | None:
            async with conn.transaction():
                row = await (await conn.execute(pgrows.SELECT_FOR_UPDATE, (ns, run_id))).fetchone()
                if row is None:
                    return None
                if sent and row[_N] == nonce:
                    return sent[-1]  # the last attempt was committed; its reply was lost
                now = float(row[_N + 1])
                old = pgrows.to_record(row[:_N])
                result = change(old, now)
                if result is None:
                    return old
                rec = result.written_over(old, now)
                check_record(rec)
                params = self._changed(run_id, old, rec)
                bodies = [encode_event(run_id, e).decode() for e in result.events]
                names = tuple(params)
                if "pending" in params or "status" in params:
                    params["deadline"] = deadline_of(rec.pending)
                if "status" in params and self.ttl is not None:
                    params["ttl"] = self.ttl
                params.update(written_by=nonce, ns=ns, run_id=run_id)
                await conn.execute(pgrows.update_statement(names, self.ttl is not None), params)
                if bodies:
                    await conn.execute(
                        pgrows.INSERT_EVENTS, (ns, run_id, old.event_count + 1, pgrows.texts(bodies))
                    )
                waiting = RunStatus.WAITING
                if (old.status == waiting or rec.status == waiting) and (
                    "pending" in names or "status" in names
                ):
                    rows = pgindex.approval_rows(run_id, rec.workflow, rec.status, rec.pending)
                    await pgindex.file_approvals(conn, ns, run_id, rec.workflow, rows, old.status == waiting)
                sent.append(rec)
            return rec

        return await self._db.run("update", run_id, job)

    @staticmethod
    def _changed(run_id: str, old: RunRecord, rec: RunRecord) -> dict[str, Any]:
        """The stored form of the fields ``rec`` changes (``updated_at`` and ``event_count`` always).

        A big field that is the same object is the same value: an unchanged state is not encoded.
        """
        out: dict[str, Any] = {}
        for name in pgrows.COLUMNS[1:]:
            value = getattr(rec, name)
            if name in pgrows.BIG:
                if value is getattr(old, name):
                    continue
            elif name not in ("updated_at", "event_count") and value == getattr(old, name):
                continue
            out[name] = column_value(run_id, name, value)
        return out
