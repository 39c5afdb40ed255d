"""The PostgreSQL store's listings: pages of runs and of pending approvals, and the approval index.

Every listing is one statement on an index (see :mod:`agentflow.stores.postgres_schema`)
and costs what it returns. The approvals a waiting run's ``pending`` holds are filed
as rows of ``agentflow_approvals`` (one per approval) and ``agentflow_approvers`` (one
per approver), in the transaction that writes the run, which holds the run's row
locked: two writers of one run file its approvals one after the other.
"""

from __future__ import annotations

from typing import Any

from ..errors import StoreError
from ..types import RunStatus
from . import sql_pages
from .codec import approval_rank, approvers_of, decode, encode
from .contract import RunRecord, indexed_approvals
from .postgres_rows import LIVE, SELECT_LIGHT, listed
from .postgres_schema import APPROVALS, APPROVERS, NOW, RUNS

__all__ = [
    "ApprovalRow",
    "approval_rows",
    "due_gates",
    "file_approvals",
    "list_approvals",
    "list_runs",
    "recoverable",
]

_SELECT_CURSOR = f"SELECT created_at, id FROM {RUNS} WHERE ns = %s AND run_id = %s"
_SELECT_RECOVERABLE = (
    f"SELECT run_id FROM {RUNS} WHERE ns = %s AND workflow = %s AND status = 'running' "
    f"AND lease_expires <= {NOW} AND {LIVE} ORDER BY lease_expires LIMIT %s"
)
_SELECT_DUE = (
    f"SELECT run_id FROM {RUNS} WHERE ns = %s AND workflow = %s AND status = 'waiting' "
    f"AND deadline IS NOT NULL AND deadline <= %s AND {LIVE} ORDER BY deadline"
)
# Where an approval sorts, pending or decided (a page may start after a decided one).
_SELECT_APPROVAL_CURSOR = f"SELECT created_at, id FROM {APPROVALS} WHERE ns = %s AND id = %s"
_DIALECT = sql_pages.Dialect("%s", "a.pending", APPROVALS, APPROVERS)
_RETIRE_APPROVALS = f"UPDATE {APPROVALS} SET pending = false WHERE ns = %s AND run_id = %s AND pending"
_DELETE_APPROVERS = f"DELETE FROM {APPROVERS} WHERE ns = %s AND run_id = %s"
# One statement files every approval of a run (arrays of the rows' columns).
_UPSERT_APPROVALS = (
    f"INSERT INTO {APPROVALS} (ns, id, run_id, workflow, kind, created_at, body, pending) "
    "SELECT %s, t.id, %s, %s, t.kind, t.at, t.body, true "
    "FROM unnest(%s::text[], %s::text[], %s::float8[], %s::text[]) AS t(id, kind, at, body) "
    "ON CONFLICT (ns, id) DO UPDATE SET run_id = excluded.run_id, workflow = excluded.workflow, "
    "kind = excluded.kind, created_at = excluded.created_at, body = excluded.body, pending = true"
)
_INSERT_APPROVERS = (
    f"INSERT INTO {APPROVERS} (ns, approver, created_at, id, run_id) "
    "SELECT %s, t.approver, t.at, t.id, %s FROM unnest(%s::text[], %s::float8[], %s::text[]) "
    "AS t(approver, at, id) ON CONFLICT DO NOTHING"
)

# -- runs ------------------------------------------------------------------------------


async def list_runs(
    conn: Any, ns: str, workflow: str | None, status: RunStatus | None, limit: int, after: str | None
) -> list[RunRecord]:
    """A page of light records of the live runs, newest first.

    Raises:
        StoreError: ``after`` names a run that is not stored (deleted since).
    """
    where, params = f"ns = %s AND {LIVE}", [ns]
    if workflow is not None:
        where, params = where + " AND workflow = %s", [*params, workflow]
    if status is not None:
        where, params = where + " AND status = %s", [*params, RunStatus(status).value]
    if after is not None:
        cursor = await (await conn.execute(_SELECT_CURSOR, (ns, after))).fetchone()
        if cursor is None:
            raise StoreError(
                f"list_runs(after={after!r}): run {after} is not stored (deleted since the previous "
                "page); list again from the first page"
            )
        where, params = where + " AND (created_at, id) < (%s, %s)", [*params, *cursor]
    query = f"{SELECT_LIGHT} WHERE {where} ORDER BY created_at DESC, id DESC LIMIT %s"
    rows = await (await conn.execute(query, [*params, limit])).fetchall()
    return [listed(row) for row in rows]


async def recoverable(conn: Any, ns: str, workflow: str, limit: int) -> list[str]:
    """Ids of ``workflow``'s running runs whose lease ran out by the database's clock, oldest first."""
    rows = await (await conn.execute(_SELECT_RECOVERABLE, (ns, workflow, limit))).fetchall()
    return [str(run_id) for (run_id,) in rows]


async def due_gates(conn: Any, ns: str, workflow: str, due: float) -> list[str]:
    """Ids of ``workflow``'s live runs waiting at a gate due at or before ``due``."""
    rows = await (await conn.execute(_SELECT_DUE, (ns, workflow, due))).fetchall()
    return [str(run_id) for (run_id,) in rows]


# -- approvals -------------------------------------------------------------------------

#: An approval as its rows hold it: id, kind, created_at, JSON, approvers.
ApprovalRow = tuple[str, str, float, str, tuple[str, ...]]


def approval_rows(run_id: str, workflow: str, status: Any, pending: Any) -> list[ApprovalRow]:
    """The approvals a run with ``status`` and ``pending`` files (none unless it is waiting).

    Raises:
        StoreError: an approval is not JSON-able (names the run).
    """
    if status != RunStatus.WAITING:
        return []
    rec = RunRecord(run_id, workflow, RunStatus.WAITING, None, pending=pending)
    out: list[ApprovalRow] = []
    for a in indexed_approvals(rec):
        at, aid = approval_rank(a)
        body = encode(run_id, "pending", a).decode()
        out.append((aid, str(a.get("kind") or "gate"), at, body, tuple(approvers_of(a))))
    return out


async def file_approvals(
    conn: Any, ns: str, run_id: str, workflow: str, rows: list[ApprovalRow], retire: bool
) -> None:
    """Make ``rows`` the run's pending approvals: the others are decided (kept, not listed).

    ``retire=False`` when the run has none filed (it was not waiting).
    """
    if retire:
        await conn.execute(_RETIRE_APPROVALS, (ns, run_id))
        await conn.execute(_DELETE_APPROVERS, (ns, run_id))
    if not rows:
        return
    ids, kinds, ats, bodies = ([row[i] for row in rows] for i in range(4))
    await conn.execute(_UPSERT_APPROVALS, (ns, run_id, workflow, ids, kinds, ats, bodies))
    names = [(name, at, aid) for aid, _, at, _, approvers in rows for name in approvers]
    if names:
        by, at, of = ([n[i] for n in names] for i in range(3))
        await conn.execute(_INSERT_APPROVERS, (ns, run_id, by, at, of))


async def list_approvals(
    conn: Any,
    ns: str,
    approver: str | None,
    workflow: str | None,
    kind: str | None,
    limit: int,
    after: str | None,
) -> list[dict[str, Any]]:
    """A page of pending approvals, newest first (one indexed statement).

    Raises:
        StoreError: ``after`` is not an approval of a stored run.
    """
    params = sql_pages.approval_params(ns, approver, workflow, kind)
    if after is not None:
        cursor = await (await conn.execute(_SELECT_APPROVAL_CURSOR, (ns, after))).fetchone()
        if cursor is None:
            raise sql_pages.cursor_gone(after)
        params += cursor
    query = _page_of_approvals(
        approver is not None, workflow is not None, kind is not None, after is not None
    )
    rows = await (await conn.execute(query, [*params, limit])).fetchall()
    return [decode("", f"{APPROVALS}.body", body) for (body,) in rows]


def _page_of_approvals(by_approver: bool, workflow: bool, kind: bool, after: bool) -> str:
    """The statement reading a page of pending approvals (see :func:`.sql_pages.page_of_approvals`)."""
    return sql_pages.page_of_approvals(_DIALECT, by_approver, workflow, kind, after)
