"""Parents parked on child runs: noticing that their children ended, and resuming them once.

When a child run ends in this process (it finished here, or a decision, a timeout or a
stop ended it here), its parent is checked: if every child of the parent's wait has
ended, the parent is moved back to running through one atomic update judged on its
record (:func:`agentflow._engine.compose.ended`), so of two processes that both see the
last child end only one resumes it. A process that does not serve the parent's workflow
(a worker of the child's workflow alone) makes the parent's check-back due now instead,
so the processes that serve it resume it at their next timer sweep. A parent whose
last child ended in a process that died before it could do this is found by its
check-back deadline (the timer sweep calls :meth:`ChildWatch.check` with ``rearm``)
or by ``recover()``.

A check is cheap in the common case (the children run here): it walks the parent's
children from where the last check stopped, and stops at the first that is still
running here, reading the store only for children it knows nothing about.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from .._engine.compose import CHECK_BACK, CHECK_BACK_MAX, ChildOutcome, ended
from ..errors import AgentflowError
from ..stores.contract import Change, RunRecord
from ..types import FINAL, RunStatus
from .leases import take_over

if TYPE_CHECKING:
    from .supervisor import Supervisor

__all__ = ["ChildWatch"]

log = logging.getLogger("agentflow")

#: Parents whose ended children (and their outputs) are kept at most, waiting to be read.
_KEPT = 10_000


def _waiting_on_children(rec: RunRecord | None) -> dict[str, Any] | None:
    if rec is None or rec.status != RunStatus.WAITING:
        return None
    pending = rec.pending
    if isinstance(pending, dict) and pending.get("kind") == "children":
        return pending
    return None


class ChildWatch:
    """The parents this process checks on (shared by the supervisors of one runner)."""

    __slots__ = ("_cursor", "_ended", "_root", "_scheduled", "_tasks")

    def __init__(self, root: Supervisor) -> None:
        self._root = root
        # parent id → its children that ended here: id → the outcome when it completed
        # (else None: read it from the store). Kept until the parent reads them.
        self._ended: dict[str, dict[str, ChildOutcome | None]] = {}
        # parent id → (its pending, its workflow, how many of its children are known ended)
        self._cursor: dict[str, tuple[dict[str, Any], str, int]] = {}
        self._scheduled: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def child_ended(self, parent: Any, child_id: str, outcome: ChildOutcome | None = None) -> None:
        """The child ``child_id`` of ``parent`` (its ``RunRecord.parent``) ended here."""
        if not isinstance(parent, dict) or "run_id" not in parent:
            return
        pid = str(parent["run_id"])
        ended = self._ended.get(pid)
        if ended is None:
            if len(self._ended) >= _KEPT:
                # Parents that never came back for their children's results (they went on
                # in another process): forget the oldest.
                del self._ended[next(iter(self._ended))]
            ended = self._ended[pid] = {}
        ended[child_id] = outcome
        live = self._root.local.get(pid)
        if live is not None and not live.finished and live.status is RunStatus.RUNNING:
            return  # the parent runs here and has not parked: it looks at its children itself
        self.schedule(pid)

    def ended(self, parent_id: str) -> dict[str, ChildOutcome | None]:
        """The children of ``parent_id`` that ended here (see ``Kernel.ended_children``)."""
        return self._ended.get(parent_id) or {}

    def forget_ended(self, parent_id: str) -> None:
        """``parent_id`` read its children's results."""
        self._ended.pop(parent_id, None)

    def parked(self, parent_id: str) -> None:
        """``parent_id`` just parked on children (here): check on them from the start."""
        self._cursor.pop(parent_id, None)
        self.schedule(parent_id)

    def schedule(self, parent_id: str) -> None:
        """Check on ``parent_id`` soon (checks asked for meanwhile are one)."""
        if parent_id in self._scheduled or self._root.stopping:
            return
        self._scheduled.add(parent_id)
        task = asyncio.get_running_loop().create_task(self._scheduled_check(parent_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _scheduled_check(self, parent_id: str) -> None:
        self._scheduled.discard(parent_id)
        try:
            await self.check(parent_id)
        except AgentflowError as exc:
            # The check-back deadline comes back to it.
            log.warning("run %s: could not check on its child runs: %s", parent_id, exc)

    async def check(self, parent_id: str, rearm: bool = False) -> bool:
        """Resume ``parent_id`` if every child of its wait ended; True when this call did.

        With ``rearm`` (a check-back) the parent is read afresh and, when a child is
        still going, its next check-back deadline is set.
        """
        root = self._root
        store = root.store
        cached = None if rearm else self._cursor.get(parent_id)
        if cached is None:
            rec = await store.get(parent_id)
            pending = _waiting_on_children(rec)
            if pending is None or rec is None:
                self._forget(parent_id)
                if rec is None or rec.status in FINAL:
                    self._ended.pop(parent_id, None)
                return False
            cached = (pending, rec.workflow, 0)
        pending, workflow, pos = cached
        refs = pending.get("children") or ()
        seen = self._ended.get(parent_id, ())
        local = root.local
        while pos < len(refs):
            cid = str(refs[pos]["run_id"])
            if cid not in seen:
                live = local.get(cid)
                if live is not None and not live.finished:
                    break  # still going here: its end checks again
                child = await store.get(cid)
                if child is not None and child.status not in FINAL:
                    if rearm and child.status == RunStatus.RUNNING:
                        await self._recover(child)  # its owner may have died since it started
                    break
            pos += 1
        if pos < len(refs):
            self._cursor[parent_id] = (pending, workflow, pos)
            if rearm:
                await self._rearm(parent_id, pending)
            return False
        self._forget(parent_id)
        try:
            sup = root.of(workflow)
        except KeyError:
            # Not served here: bring its check-back forward, so the sweepers of the
            # processes that serve it resume it now.
            await self._rearm(parent_id, pending, at_once=True)
            return False
        step, visit = pending["step"], pending["visit"]
        rec = await sup.transition(parent_id, lambda r, now: ended(r, step, visit))
        again = _waiting_on_children(rec)
        if again is not None and (again.get("step"), again.get("visit")) != (step, visit):
            return await self.check(parent_id)  # it moved on and waits on other children now
        return rec.status != RunStatus.WAITING

    async def _recover(self, child: RunRecord) -> None:
        """Take over a running child whose lease ran out (by the store's clock), if it is served here.

        A parent's check-back is where a child orphaned by a dead process is noticed
        even when no one calls ``recover()`` again: a parent recovered a moment before its
        children's leases ran out would otherwise wait on them for good.
        """
        try:
            sup = self._root.of(child.workflow)
        except KeyError:
            return  # another workflow's processes recover it
        if child.run_id in sup.local:
            return
        try:
            await sup.transition(child.run_id, take_over(child.workflow))
        except AgentflowError as exc:
            log.warning("run %s: could not recover its child run %s: %s", child.parent, child.run_id, exc)

    async def _rearm(self, parent_id: str, pending: dict[str, Any], at_once: bool = False) -> None:
        """Set the parent's next check-back deadline (backing off), or make it due now."""
        step, visit = pending["step"], pending["visit"]

        def later(r: RunRecord, now: float) -> Change | None:
            p = _waiting_on_children(r)
            if p is None or (p.get("step"), p.get("visit")) != (step, visit):
                return None
            if at_once:
                wait = 0.0
            else:
                wait = min(CHECK_BACK_MAX, max(CHECK_BACK, (now - float(p.get("since") or now)) / 2))
            return Change(dataclasses.replace(r, pending={**p, "deadline": now + wait}))

        await self._root.update(parent_id, later)

    def _forget(self, parent_id: str) -> None:
        self._cursor.pop(parent_id, None)

    async def close(self) -> None:
        """Cancel checks in flight (the check-back deadlines stay in the store)."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._scheduled.clear()
