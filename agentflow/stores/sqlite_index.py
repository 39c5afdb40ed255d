"""The SQLite store's listings: pages of runs and of pending approvals, and the approval index.

Every listing reads an index and costs what it returns (see
:mod:`agentflow.stores.sqlite_schema` for the indexes). The approvals a waiting run's
``pending`` holds are filed as rows of ``agentflow_approvals`` (one per approval) and
``agentflow_approvers`` (one per approver), in the transaction that writes the run.
Only a run stored as waiting has pending approvals, so a write that finds the run in
another status has none to retire, and parking a run costs its new rows only.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from ..errors import StoreError
from ..types import RunStatus
from . import sql_pages
from .codec import approval_rank, approvers_of, decode, encode
from .contract import RunRecord, indexed_approvals
from .sqlite_rows import LIVE, SELECT_LIGHT, listed
from .sqlite_schema import APPROVALS, APPROVERS, RUNS

__all__ = [
    "SELECT_RUN_STATUS",
    "ApprovalRow",
    "approval_rows",
    "due_gates",
    "file_approvals",
    "file_pending",
    "list_approvals",
    "list_runs",
    "page_of_approvals",
    "recoverable",
]

_SELECT_CURSOR = f"SELECT created_at, id FROM {RUNS} WHERE ns = ? AND run_id = ?"
_SELECT_RECOVERABLE = (
    f"SELECT run_id FROM {RUNS} WHERE ns = ? AND workflow = ? AND status = 'running' "
    f"AND lease_expires <= ? AND {LIVE} ORDER BY lease_expires LIMIT ?"
)
_SELECT_DUE = (
    f"SELECT run_id FROM {RUNS} WHERE ns = ? AND workflow = ? AND status = 'waiting' "
    f"AND deadline IS NOT NULL AND deadline <= ? AND {LIVE} ORDER BY deadline"
)
#: What a commit that sets a run's pending files its approvals with.
SELECT_RUN_STATUS = f"SELECT workflow, status FROM {RUNS} WHERE ns = ? AND run_id = ?"
# Where an approval sorts, pending or decided (a page may start after a decided one).
_SELECT_APPROVAL_CURSOR = f"SELECT created_at, id FROM {APPROVALS} WHERE ns = ? AND id = ?"
_DIALECT = sql_pages.Dialect("?", "a.pending = 1", APPROVALS, APPROVERS)
_RETIRE_APPROVALS = f"UPDATE {APPROVALS} SET pending = 0 WHERE ns = ? AND run_id = ? AND pending = 1"
_DELETE_APPROVERS = f"DELETE FROM {APPROVERS} WHERE ns = ? AND run_id = ?"
_UPSERT_APPROVAL = (
    f"INSERT INTO {APPROVALS} (ns, id, run_id, workflow, kind, created_at, body, pending) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, 1) ON CONFLICT (ns, id) DO UPDATE SET run_id = excluded.run_id, "
    "workflow = excluded.workflow, kind = excluded.kind, created_at = excluded.created_at, "
    "body = excluded.body, pending = 1"
)
_INSERT_APPROVER = (
    f"INSERT OR IGNORE INTO {APPROVERS} (ns, approver, created_at, id, run_id) VALUES (?, ?, ?, ?, ?)"
)

# -- runs ------------------------------------------------------------------------------


def list_runs(
    db: sqlite3.Connection,
    ns: str,
    now: float,
    workflow: str | None,
    status: RunStatus | None,
    limit: int,
    after: str | None,
) -> list[RunRecord]:
    """A page of light records of the runs live at ``now``, newest first.

    Raises:
        StoreError: ``after`` names a run that is not stored (deleted since).
    """
    where, params = f"ns = ? AND {LIVE}", [ns, now]
    if workflow is not None:
        where, params = where + " AND workflow = ?", [*params, workflow]
    if status is not None:
        where, params = where + " AND status = ?", [*params, RunStatus(status).value]
    if after is not None:
        cursor = db.execute(_SELECT_CURSOR, (ns, after)).fetchone()
        if cursor is None:
            raise StoreError(
                f"list_runs(after={after!r}): run {after} is not stored (deleted since the previous "
                "page); list again from the first page"
            )
        bound, page = " AND (created_at, id) < (?, ?)", [*params, *cursor, limit]
    else:
        bound, page = "", [*params, limit]
    order = "ORDER BY created_at DESC, id DESC LIMIT ?"
    rows = db.execute(f"{SELECT_LIGHT} WHERE {where}{bound} {order}", page).fetchall()
    return [listed(row) for row in rows]


def recoverable(db: sqlite3.Connection, ns: str, workflow: str, now: float, limit: int) -> list[str]:
    """Ids of ``workflow``'s running runs whose lease ran out by ``now``, oldest lease first."""
    rows = db.execute(_SELECT_RECOVERABLE, (ns, workflow, now, now, limit)).fetchall()
    return [str(run_id) for (run_id,) in rows]


def due_gates(db: sqlite3.Connection, ns: str, workflow: str, due: float, now: float) -> list[str]:
    """Ids of ``workflow``'s runs live at ``now`` waiting at a gate due at or before ``due``."""
    rows = db.execute(_SELECT_DUE, (ns, workflow, due, now)).fetchall()
    return [str(run_id) for (run_id,) in rows]


# -- approvals -------------------------------------------------------------------------

#: An approval as its rows hold it: id, run, workflow, kind, created_at, JSON, approvers.
ApprovalRow = tuple[str, str, str, str, float, str, tuple[str, ...]]


def approval_rows(run_id: str, workflow: str, status: str, pending: Any) -> list[ApprovalRow]:
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
        out.append((aid, run_id, workflow, str(a.get("kind") or "gate"), at, body, tuple(approvers_of(a))))
    return out


def file_approvals(
    db: sqlite3.Connection, ns: str, run_id: str, rows: Sequence[ApprovalRow], retire: bool = True
) -> None:
    """Make ``rows`` the run's pending approvals: the others are decided (kept, not listed).

    ``retire=False`` when the run has no pending approvals yet (it was not waiting).
    """
    if retire:
        db.execute(_RETIRE_APPROVALS, (ns, run_id))
        db.execute(_DELETE_APPROVERS, (ns, run_id))
    for aid, rid, workflow, kind, at, body, approvers in rows:
        db.execute(_UPSERT_APPROVAL, (ns, aid, rid, workflow, kind, at, body))
        if len(approvers) == 1:
            db.execute(_INSERT_APPROVER, (ns, approvers[0], at, aid, rid))
        elif approvers:
            db.executemany(_INSERT_APPROVER, [(ns, name, at, aid, rid) for name in approvers])


def file_pending(
    db: sqlite3.Connection, ns: str, run_id: str, workflow: str, status: str, pending: Any, retire: bool
) -> None:
    """File the approvals of a run now ``status`` with ``pending``, in place of those filed before.

    ``retire=False`` when the run was not waiting before the write: it has none filed.

    Raises:
        StoreError: an approval is not JSON-able (names the run).
    """
    rows = approval_rows(run_id, workflow, status, pending)
    if rows or retire:
        file_approvals(db, ns, run_id, rows, retire)


def list_approvals(
    db: sqlite3.Connection,
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
        cursor = db.execute(_SELECT_APPROVAL_CURSOR, (ns, after)).fetchone()
        if cursor is None:
            raise sql_pages.cursor_gone(after)
        params += cursor
    query = page_of_approvals(approver is not None, workflow is not None, kind is not None, after is not None)
    rows = db.execute(query, [*params, limit]).fetchall()
    return [decode("", f"{APPROVALS}.body", body) for (body,) in rows]


def page_of_approvals(by_approver: bool, workflow: bool, kind: bool, after: bool) -> str:
    """The statement reading a page of pending approvals (see :func:`.sql_pages.page_of_approvals`)."""
    return sql_pages.page_of_approvals(_DIALECT, by_approver, workflow, kind, after)
