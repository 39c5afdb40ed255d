"""The memory store's reads of many runs: listings, recovery, approvals and due gates.

Each reads the store's indexes (:mod:`agentflow.stores.memory_index`), never every
run: ``list_runs`` costs the page it returns, ``recoverable`` and ``due_gates`` look at
the workflow's running and waiting runs only, ``approvals`` at the pending approvals
filed per workflow, kind and approver. ``list_runs``, ``recoverable`` and ``approvals``
first drop the finished runs whose ttl ran out.
"""

from __future__ import annotations

import heapq
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from ..types import RunStatus
from .contract import RunRecord
from .memory_index import ApprovalIndex, RunIndex
from .memory_records import Run, record_of

__all__ = ["MemoryListing"]


class MemoryListing:
    """The listing and polling reads of :class:`~agentflow.stores.memory.MemoryStore`."""

    ttl: float | None
    _runs: dict[str, Run]
    _index: RunIndex
    _approvals: ApprovalIndex

    _purge: Callable[[], None]

    async def list_runs(
        self,
        workflow: str | None = None,
        status: RunStatus | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[RunRecord]:
        """Light records, newest first (``created_at``, then ``run_id``, descending), at most ``limit``.

        ``after`` is the last ``run_id`` of the previous page; a run that is gone ends the listing.
        """
        if self.ttl is not None:
            self._purge()
        entries = self._index.get(workflow, None if status is None else RunStatus(status))
        if not entries or limit <= 0:
            return []
        end = len(entries)
        if after is not None:
            last = self._runs.get(after)
            if last is None:
                return []
            end = bisect_left(entries, last.sort_key)
        runs, page = self._runs, entries[max(end - limit, 0) : end]
        return [record_of(runs[run_id], light=True) for _, run_id in reversed(page)]

    async def recoverable(self, workflow: str, limit: int = 100) -> list[str]:
        """Ids of ``workflow``'s running runs whose lease ran out, oldest lease first."""
        if self.ttl is not None:
            self._purge()
        now = time.time()
        runs = self._runs
        expired = []
        for _, run_id in self._index.get(workflow, RunStatus.RUNNING):
            expires = runs[run_id].fields["lease_expires"]
            if expires <= now:
                expired.append((expires, run_id))
        return [run_id for _, run_id in heapq.nsmallest(limit, expired)]

    async def approvals(
        self,
        approver: str | None = None,
        workflow: str | None = None,
        kind: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[dict[str, Any]]:
        """Pending approvals, newest first (``created_at``, then ``id``, descending), at most ``limit``.

        Raises:
            StoreError: ``after`` is not an approval of a stored run.
        """
        if self.ttl is not None:
            self._purge()
        return self._approvals.page(approver, workflow, kind, limit, after)

    async def due_gates(self, workflow: str, now: float) -> list[str]:
        """Ids of ``workflow``'s waiting runs whose gate deadline is at or before ``now``."""
        runs = self._runs
        due = []
        for _, run_id in self._index.get(workflow, RunStatus.WAITING):
            run = runs[run_id]
            if run.deadline is not None and run.deadline <= now:
                due.append(run_id)
        return due
