"""A page of pending approvals, as both SQL stores (SQLite and PostgreSQL) read it.

The statement differs between them only in its parameter mark and in how a pending
approval is told (an integer flag on SQLite, a boolean on PostgreSQL); the parameters
and the error for a cursor whose approval is gone are the same.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

from ..errors import StoreError

__all__ = ["Dialect", "approval_params", "cursor_gone", "page_of_approvals"]


class Dialect(NamedTuple):
    """How a SQL store writes the statement: its parameter mark, its condition of a pending
    approval ``a``, and its tables of approvals and of their approvers."""

    mark: str
    pending: str
    approvals: str
    approvers: str


def approval_params(ns: str, approver: str | None, workflow: str | None, kind: str | None) -> list[Any]:
    """The parameters of :func:`page_of_approvals` up to its cursor and limit."""
    params: list[Any] = [ns]
    if approver is not None:
        params.append(approver)
    params += [v for v in (workflow, kind) if v is not None]
    return params


def cursor_gone(after: str) -> StoreError:
    """The error for a page asked for after an approval that is not stored any more."""
    return StoreError(
        f"approvals(after={after!r}): approval {after} is not stored (its run was deleted "
        "since the previous page); list again from the first page"
    )


@functools.lru_cache(maxsize=64)
def page_of_approvals(dialect: Dialect, by_approver: bool, workflow: bool, kind: bool, after: bool) -> str:
    """The statement reading a page of pending approvals, newest first, in ``dialect``.

    Its parameters: ns; the approver (``by_approver``); the workflow; the kind; the
    cursor's created_at and id (``after``); the limit. By approver it walks the
    approver's rows and joins each approval; else the index of the first filter given.
    """
    mark, approvals, approvers = dialect.mark, dialect.approvals, dialect.approvers
    where = [dialect.pending]
    if by_approver:
        head = (
            f"SELECT a.body FROM {approvers} p JOIN {approvals} a ON a.ns = p.ns AND a.id = p.id "
            f"WHERE p.ns = {mark} AND p.approver = {mark}"
        )
        order, rank = "p.created_at DESC, p.id DESC", "(p.created_at, p.id)"
    else:
        head = f"SELECT a.body FROM {approvals} a WHERE a.ns = {mark}"
        order, rank = "a.created_at DESC, a.id DESC", "(a.created_at, a.id)"
    if workflow:
        where.append(f"a.workflow = {mark}")
    if kind:
        where.append(f"a.kind = {mark}")
    if after:
        where.append(f"{rank} < ({mark}, {mark})")
    return f"{head} AND {' AND '.join(where)} ORDER BY {order} LIMIT {mark}"
