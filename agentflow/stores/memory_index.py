"""The memory store's indexes: runs by workflow and status, and pending approvals.

Runs are filed in sorted lists of ``(created_at, run_id)``, one per workflow and status
(and each alone, and all runs), so ``list_runs`` costs the page it returns and
``recoverable`` and ``due_gates`` look at running and waiting runs only. Pending
approvals are kept in sorted lists of ``(created_at, id)`` (all, per workflow, per
kind, per approver), filed again whenever a run's ``pending`` or status changes.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

from ..errors import StoreError
from ..types import RunStatus
from .codec import approval_rank, approvers_of, decode, encode
from .contract import RunRecord, indexed_approvals

__all__ = ["ApprovalIndex", "RunIndex", "SortKey"]

_IndexKey = tuple[str | None, RunStatus | None]
#: Where a run (``created_at``, ``run_id``) or an approval (``created_at``, ``id``) sorts.
SortKey = tuple[float, str]
# The approval lists: ("", "") all, ("wf", name), ("kind", kind), ("by", approver).
_ApprovalKey = tuple[str, str]
_GONE = 100_000  # decided approvals whose place a page may still start after

_INDEX_KEYS: dict[tuple[str, RunStatus], tuple[_IndexKey, ...]] = {}


def _index_keys(workflow: str, status: RunStatus) -> tuple[_IndexKey, ...]:
    keys = _INDEX_KEYS.get((workflow, status))
    if keys is None:
        keys = ((None, None), (workflow, None), (None, status), (workflow, status))
        if len(_INDEX_KEYS) < 10_000:  # workflows x statuses: small, unless names are made up
            _INDEX_KEYS[(workflow, status)] = keys
    return keys


_MOVES: dict[tuple[str, RunStatus, str, RunStatus], tuple[tuple[_IndexKey, ...], tuple[_IndexKey, ...]]] = {}


def _moves(
    old_workflow: str, old_status: RunStatus, workflow: str, status: RunStatus
) -> tuple[tuple[_IndexKey, ...], tuple[_IndexKey, ...]]:
    """The lists a run leaves and joins when its workflow or status changes (cached)."""
    plan_key = (old_workflow, old_status, workflow, status)
    plan = _MOVES.get(plan_key)
    if plan is None:
        old_keys, new_keys = _index_keys(old_workflow, old_status), _index_keys(workflow, status)
        plan = (
            tuple(k for k in old_keys if k not in new_keys),
            tuple(k for k in new_keys if k not in old_keys),
        )
        if len(_MOVES) < 10_000:
            _MOVES[plan_key] = plan
    return plan


class RunIndex:
    """Sorted lists of ``(created_at, run_id)`` per workflow, status, both, and neither."""

    __slots__ = ("lists",)

    def __init__(self) -> None:
        self.lists: dict[_IndexKey, list[SortKey]] = {}

    def get(self, workflow: str | None, status: RunStatus | None) -> list[SortKey]:
        """The sorted list of ``workflow`` and ``status`` (None: any), oldest first; empty if none."""
        return self.lists.get((workflow, status), [])

    def add(self, key: SortKey, workflow: str, status: RunStatus) -> None:
        """File a run under its workflow and status."""
        lists = self.lists
        for index_key in _index_keys(workflow, status):
            insort(lists.setdefault(index_key, []), key)

    def remove(self, key: SortKey, workflow: str, status: RunStatus) -> None:
        """Take a run out of the lists it was filed in."""
        self._unindex(key, _index_keys(workflow, status))

    def move(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        """Move a run between lists after its workflow, status or creation time changed.

        ``old`` and ``new`` hold the run's ``created_at``, ``run_id``, ``workflow`` and ``status``.
        """
        old_key, new_key = (old["created_at"], old["run_id"]), (new["created_at"], new["run_id"])
        if old_key == new_key:
            old_keys, new_keys = _moves(old["workflow"], old["status"], new["workflow"], new["status"])
        else:
            old_keys = _index_keys(old["workflow"], old["status"])
            new_keys = _index_keys(new["workflow"], new["status"])
        self._unindex(old_key, old_keys)
        lists = self.lists
        for index_key in new_keys:
            insort(lists.setdefault(index_key, []), new_key)

    def _unindex(self, key: SortKey, index_keys: Sequence[_IndexKey]) -> None:
        lists = self.lists
        for index_key in index_keys:
            entries = lists[index_key]
            del entries[bisect_left(entries, key)]
            if not entries:
                del lists[index_key]

    def clear(self) -> None:
        """Forget every run."""
        self.lists.clear()


class _Approval(NamedTuple):
    rank: SortKey
    body: bytes
    run_id: str
    workflow: str
    kind: str
    keys: tuple[_ApprovalKey, ...]


class ApprovalIndex:
    """The pending approvals of every run, in sorted lists of ``(created_at, id)``.

    Decided approvals are remembered (the last hundred thousand) by where they sorted,
    so a page may still start after one.
    """

    __slots__ = ("_approvals", "_gone", "_lists")

    def __init__(self) -> None:
        self._approvals: dict[str, _Approval] = {}
        self._lists: dict[_ApprovalKey, list[SortKey]] = {}
        self._gone: OrderedDict[str, SortKey] = OrderedDict()

    def file(
        self, run_id: str, workflow: str, status: RunStatus, pending: bytes, filed: tuple[str, ...]
    ) -> tuple[str, ...]:
        """File the approvals of a run with ``status`` and ``pending`` (JSON); returns their ids.

        ``filed`` holds the ids filed for the run before; those it no longer has are decided.

        Raises:
            StoreError: ``pending`` cannot be decoded.
        """
        found: list[dict[str, Any]] = []
        if status == RunStatus.WAITING:
            value = decode(run_id, "pending", pending)
            found = indexed_approvals(RunRecord(run_id, workflow, RunStatus.WAITING, None, pending=value))
        ids = tuple(a["id"] for a in found)
        for approval_id in filed:
            old = self._approvals.get(approval_id)
            if old is not None and self.unfile(approval_id) and approval_id not in ids:
                # Decided: a page may still start after it.
                self._gone[approval_id] = old.rank
                if len(self._gone) > _GONE:
                    self._gone.popitem(last=False)
        for a in found:
            rank = approval_rank(a)
            kind = str(a.get("kind") or "gate")
            keys: tuple[_ApprovalKey, ...] = (("", ""), ("wf", workflow), ("kind", kind))
            keys += tuple(("by", name) for name in approvers_of(a))
            body = encode(run_id, "pending", a)
            self._approvals[a["id"]] = _Approval(rank, body, run_id, workflow, kind, keys)
            self._gone.pop(a["id"], None)
            for key in keys:
                insort(self._lists.setdefault(key, []), rank)
        return ids

    def unfile(self, approval_id: str) -> bool:
        """Take an approval out of every list; False if it was not filed."""
        found = self._approvals.pop(approval_id, None)
        if found is None:
            return False
        for key in found.keys:
            entries = self._lists[key]
            del entries[bisect_left(entries, found.rank)]
            if not entries:
                del self._lists[key]
        return True

    def page(
        self, approver: str | None, workflow: str | None, kind: str | None, limit: int, after: str | None
    ) -> list[dict[str, Any]]:
        """Pending approvals, newest first, at most ``limit``, after the approval ``after``.

        Reads the list of the most selective filter (approver, then workflow, then
        kind) and checks the others on the way.

        Raises:
            StoreError: ``after`` is not an approval of a stored run.
        """
        if limit <= 0:
            return []
        if approver is not None:
            key: _ApprovalKey = ("by", approver)
        elif workflow is not None:
            key = ("wf", workflow)
        elif kind is not None:
            key = ("kind", kind)
        else:
            key = ("", "")
        entries = self._lists.get(key, [])
        end = len(entries)
        if after is not None:
            known = self._approvals.get(after)
            rank = known.rank if known is not None else self._gone.get(after)
            if rank is None:
                raise StoreError(
                    f"approvals(after={after!r}): approval {after} is not stored (its run was deleted "
                    "since the previous page); list again from the first page"
                )
            end = bisect_left(entries, rank)
        out: list[dict[str, Any]] = []
        for i in range(end - 1, -1, -1):
            found = self._approvals[entries[i][1]]
            if (workflow is None or found.workflow == workflow) and (kind is None or found.kind == kind):
                out.append(decode(found.run_id, "pending", found.body))
                if len(out) == limit:
                    break
        return out

    def clear(self) -> None:
        """Forget every approval."""
        self._approvals.clear()
        self._lists.clear()
        self._gone.clear()
