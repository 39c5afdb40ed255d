"""The reviewer's desk: the runners of the served workflows, an approval read with its
run, and a decision made as the signed-in reviewer.

Pages and the JSON API both decide through :meth:`Desk.decide`, so both record the
same thing and fail the same way: ``NotAuthorizedError`` (not an approver: nothing
recorded), ``InvalidStateError`` (decided already, or not pending),
``InvalidInputError`` (the edit does not fit; ``errors`` by field path).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..definition.workflow import Workflow
from ..errors import RunNotFoundError
from ..runner import WorkflowRunner
from ..steward import Steward
from ..stores.contract import Store
from ..types import Approval, RunEvent, RunInfo

__all__ = ["Desk", "Opened", "can_decide"]


def can_decide(approval: Approval, reviewer: str) -> bool:
    """True when ``reviewer`` may decide ``approval`` (an approver, or it has none)."""
    return not approval.approvers or reviewer in approval.approvers


def _where(workflow: Workflow) -> tuple[Any, ...] | None:
    """Where ``workflow`` keeps its runs, when a runner opens the store from its settings."""
    p = workflow.compile().persistence
    if p is None or not p.enabled or not isinstance(p.store, str) or p.store == "memory":
        return None  # in memory (a store of its own), or a Store given as it is (shared already)
    path = os.path.abspath(p.path or "agentflow.db") if p.store == "sqlite" else None
    return (p.store, p.key_prefix, p.url, path, p.ttl, p.durability)


@dataclass(frozen=True, slots=True)
class Opened:
    """An approval and the run that waits for it, as its page shows them.

    ``approval`` is None when the run no longer waits for it (``decided`` says whether
    it was decided on this run).
    """

    info: RunInfo
    approval: Approval | None
    events: list[RunEvent]
    decided: bool


class Desk:
    """The served workflows' runners, by workflow name (a child workflow by its parent's).

    Args:
        steward: the workflows to serve.
        execute: False hands decided runs to the workers (``WorkflowRunner(...,
            execute=False)``); True advances them in this process.
    """

    def __init__(self, steward: Steward, execute: bool = True) -> None:
        self.execute = execute
        self.runners: list[WorkflowRunner] = []
        opened: dict[tuple[Any, ...], Store] = {}  # workflows kept in one place share one store client
        for info in steward.workflows():
            wf = steward.get(info.name)
            where = _where(wf)
            runner = WorkflowRunner(wf, store=opened.get(where) if where else None, execute=execute)
            if where is not None:
                opened.setdefault(where, runner.store)
            self.runners.append(runner)
        self._by_name: dict[str, WorkflowRunner] = {}
        for runner in self.runners:  # a workflow's own runner first, then its parents'
            self._by_name[runner.spec.name] = runner
        for runner in self.runners:
            for name in runner._specs:
                self._by_name.setdefault(name, runner)

    @property
    def workflows(self) -> list[str]:
        """Every served workflow's name (children included), sorted."""
        return sorted(self._by_name)

    @property
    def store(self) -> Store:
        """The first served workflow's store: where reviewers and their tokens live."""
        return self.runners[0].store

    @property
    def stores(self) -> list[Store]:
        """The served workflows' stores, each once."""
        return list({id(r.store): r.store for r in self.runners}.values())

    async def start(self) -> None:
        """Serve the workflows' timers from this process when it runs the runs itself."""
        if self.execute:
            for runner in self.runners:
                await runner.__aenter__()

    async def close(self) -> None:
        """Close every runner (runs in flight stay recoverable), the store's opener last."""
        for runner in reversed(self.runners):
            await runner.close()

    def runner(self, workflow: str) -> WorkflowRunner:
        """The runner serving ``workflow``.

        Raises:
            RunNotFoundError: ``workflow`` is not served here.
        """
        try:
            return self._by_name[workflow]
        except KeyError:
            raise RunNotFoundError(
                f"workflow {workflow!r} is not served here; served: {self.workflows}"
            ) from None

    async def info(self, run_id: str) -> RunInfo:
        """The run's info (decisions, usage, pending approvals).

        Raises:
            RunNotFoundError: no served workflow has such a run.
        """
        rec = None
        for store in self.stores:  # served workflows may keep their runs in different stores
            rec = await store.get(run_id)
            if rec is not None:
                break
        if rec is None or rec.workflow not in self._by_name:
            raise RunNotFoundError(f"no run {run_id!r} among the served workflows {self.workflows}")
        return await self.runner(rec.workflow)._info(run_id)

    async def open(self, run_id: str, approval_id: str, events: bool = True) -> Opened:
        """The approval ``approval_id`` of run ``run_id``, with the run's info and (``events``) its events.

        Raises:
            RunNotFoundError: no such run, or the run never had this approval.
        """
        info = await self.info(run_id)
        approval = next((a for a in info.approvals if a.id == approval_id and a.run_id == run_id), None)
        decided = any(d.approval == approval_id for d in info.decisions)
        if approval is None and not decided:
            raise RunNotFoundError(f"run {run_id} has no approval {approval_id!r}")
        found = await self.runner(info.workflow).store.events(run_id) if events else []
        return Opened(info, approval, found, decided)

    async def decide(
        self,
        run_id: str,
        approval_id: str,
        action: str,
        reviewer: str,
        comment: str | None = None,
        data: Any = None,
        result: Any = None,
    ) -> RunInfo:
        """``approve``, ``reject`` or ``respond`` as ``reviewer``; the run's info after it.

        Raises:
            NotAuthorizedError: ``reviewer`` may not decide it; nothing recorded.
            InvalidStateError: it is decided already, or is not pending.
            InvalidInputError: ``data`` (or ``result``) does not fit; nothing recorded.
            RunNotFoundError: no such run among the served workflows.
            ValueError: an unknown ``action``.
        """
        info = await self.info(run_id)
        runner = self.runner(info.workflow)
        if action == "approve":
            handle = await runner.approve(
                run_id, by=reviewer, approval=approval_id, comment=comment, data=data
            )
        elif action == "reject":
            handle = await runner.reject(run_id, by=reviewer, approval=approval_id, reason=comment)
        elif action == "respond":
            handle = await runner.respond(
                run_id, by=reviewer, approval=approval_id, result=result, comment=comment
            )
        else:
            raise ValueError(f"unknown action {action!r}; use approve, reject or respond")
        return await handle.info()
