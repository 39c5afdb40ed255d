"""Deciding approvals: which run holds one (the run itself, or a child run it waits on), and the decision.

A decision is one atomic transition of the holder's record, idempotent by a decision
id, so a retry after a lost reply counts it once. A parent waiting on child runs lists
their pending approvals after its own (:func:`run_info`), and an approval of a child is
decided on that child.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import tracing
from ._engine.gates import Transition, choose, decide, form_of
from ._engine.tool_gates import TOOL_KINDS, check_respond, decide_tool, past_deadline
from .errors import InvalidStateError
from .handle import RunHandle
from .stores.contract import RunRecord
from .types import FINAL, Approval, RunInfo, RunStatus

if TYPE_CHECKING:
    from .definition.workflow import WorkflowSpec
    from .runner import WorkflowRunner

__all__ = ["child_approvals", "decide_approval", "run_info"]

#: Child runs whose approvals are read at once.
_FAN = 64


async def decide_approval(
    runner: WorkflowRunner,
    run_id: str,
    action: str,
    by: str,
    approval: str | None,
    comment: str | None,
    data: Any,
) -> RunHandle:
    """``approve``, ``reject`` or ``respond`` (``action``) to an approval ``run_id`` holds."""
    run_id = await _holder(runner, run_id, approval)  # a child's approval is decided on the child
    decision_id = os.urandom(8).hex()

    def fn(rec: RunRecord, now: float) -> Transition | None:
        runner._check_workflow(rec)
        if any(d.get("id") == decision_id for d in rec.decisions):
            return None  # a retry after a lost reply: the decision is already counted
        if rec.status != RunStatus.WAITING:
            if approval is not None:
                done = any(d.get("approval") == approval for d in rec.decisions)
                why = "was decided already" if done else "is not an approval of this run"
                raise InvalidStateError(
                    f"run {run_id}: approval {approval!r} {why}; the run is {rec.status.value}"
                )
            raise InvalidStateError(
                f"run {run_id} is {rec.status.value}, not waiting at a gate; nothing to decide"
            )
        chosen = choose(run_id, rec.pending, approval, rec.decisions)
        if past_deadline(rec) is not None and _past(chosen):
            raise InvalidStateError(
                f"run {run_id}: approval {chosen['id']} at step {chosen.get('step')!r} timed out"
            )
        spec = runner._specs.get(rec.workflow, runner.spec)
        if chosen.get("kind") in TOOL_KINDS:
            validate = _argument_check(spec, chosen)
            out = decide_tool(run_id, rec.pending or {}, chosen, action, by, comment, data, validate)
            return Transition.of(rec, out, decision_id)
        if action == "respond":
            check_respond(chosen.get("kind"), run_id, chosen["id"])
        form = form_of(spec, chosen.get("step")) if chosen.get("form") is not None else None
        out = decide(run_id, rec.pending, chosen, action == "approve", by, comment, data, form)
        return Transition.of(rec, out, decision_id)

    try:
        rec = await runner.supervisor.transition(run_id, fn)
    except InvalidStateError:
        await runner.supervisor.expire(run_id)  # a gate past its deadline expires now
        raise
    if rec.status in FINAL and tracing.tracer() is not None:
        # Ended by the decision (a rejection, or a gate whose target is END): no segment
        # of work follows to carry the decision, so its own span does.
        loaded = await runner.store.load(run_id)
        spec = runner._specs.get(rec.workflow, runner.spec)
        journal = loaded.journal if loaded is not None else {}
        tracing.ended_by_decision(run_id, spec, journal, rec.decisions, rec.status.value)
    return RunHandle(runner, run_id, runner.supervisor.local.get(run_id), status=rec.status)


def _past(approval: dict[str, Any]) -> bool:
    deadline = approval.get("deadline")
    return deadline is not None and deadline <= time.time()


def _argument_check(spec: WorkflowSpec, approval: dict[str, Any]) -> Callable[[Any], Any] | None:
    """The argument check of the tool a ``tool_call`` approval is for, as this code declares it.

    None when the tool is not known here (a tool listed from an MCP server): the loop
    checks the edited arguments when the call runs, and tells the model if they fail.
    """
    agents = spec.agents
    agent = agents.agents.get(str(approval.get("agent"))) if agents is not None else None
    for t in agent.tools if agent is not None else ():
        if getattr(t, "name", None) == approval.get("tool") and hasattr(t, "validate"):
            where = f"run {approval.get('run_id')}, step {approval.get('step')!r}, approval {approval['id']}"
            return lambda arguments: t.validate(arguments, where).model_dump(mode="json")
    return None


async def _holder(runner: WorkflowRunner, run_id: str, approval: str | None) -> str:
    """The run that holds ``approval``: ``run_id`` itself, or one of the child runs it waits on.

    Without ``approval``, a run that waits only on its children, of which exactly
    one approval is pending, hands that one's run. Otherwise ``run_id`` (whose own
    decision then says what is wrong).
    """
    rec = await runner.store.get(run_id)
    if rec is None or not isinstance(rec.pending, dict) or rec.pending.get("kind") != "children":
        return run_id
    found = await child_approvals(runner, rec)
    if approval is None:
        return found[0].run_id if len(found) == 1 else run_id
    return next((a.run_id for a in found if a.id == approval), run_id)


async def child_approvals(runner: WorkflowRunner, rec: RunRecord) -> list[Approval]:
    """Pending approvals of the child runs ``rec`` waits on (their children's too), in child order."""
    pending = rec.pending
    if not isinstance(pending, dict) or pending.get("kind") != "children" or rec.status != RunStatus.WAITING:
        return []
    ids = [str(c["run_id"]) for c in pending.get("children") or ()]
    out: list[Approval] = []
    for i in range(0, len(ids), _FAN):
        for child in await asyncio.gather(*(runner.store.get(c) for c in ids[i : i + _FAN])):
            if child is None or child.status != RunStatus.WAITING:
                continue
            out += child.info().approvals
            out += await child_approvals(runner, child)
    return out


async def run_info(runner: WorkflowRunner, run_id: str) -> RunInfo:
    """``RunInfo`` of ``run_id``, its children's pending approvals listed after its own."""
    rec = await runner._record(run_id)
    info = rec.info()
    children = await child_approvals(runner, rec)
    if not children:
        return info
    approvals = (*info.approvals, *children)
    return dataclasses.replace(info, approvals=approvals, pending=approvals[0])
