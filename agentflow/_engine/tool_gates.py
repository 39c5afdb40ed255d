"""Approvals of tool calls: a run parked inside a step, and what a decision tells the model.

An agent loop that meets a call it may not run yet (its tool has ``approval=``, or the
outcome of an earlier attempt is unknown) asks the journal to wait. The run parks as a
gate does — ``waiting``, no task, no memory held — with ``pending["kind"] == "tools"``,
its approvals listed, and the step it parked in as its target, at the same visit: a
decision re-runs that step, whose finished turns and calls come back from the journal,
and the loop reads the decision of each call (by approval id) to know what to do.

A decision on a tool approval never ends the run: a rejection, a timeout and a
response are all things the model is told. Once every approval of the park is
decided, the step runs again.

Approval ids are derived from the run, the step visit, the call's journal key and,
for a ``tool_call``, the digest of the arguments it showed: a decision applies to that
call with those arguments and to nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import pydantic_core

from ..errors import AgentflowError, InvalidInputError, InvalidStateError, NotAuthorizedError
from ..stores.contract import Commit, RunRecord, approval_id
from ..types import Decision, RunStatus
from .gates import Outcome, Transition, expired, short_of_quorum
from .signals import Stop, Suspend

if TYPE_CHECKING:
    from .run import LiveRun

__all__ = [
    "TOOL_KINDS",
    "check_respond",
    "decide_tool",
    "park_tools",
    "past_deadline",
    "refuse_in_branch",
    "tool_approval",
    "tool_expired",
]

#: The approval kinds a tool call parks on.
TOOL_KINDS = ("tool_call", "tool_outcome")

#: How a reviewer may decide a tool approval.
Action = str  # "approve" | "reject" | "respond"


def tool_approval(run: LiveRun, step: str, visit: int, key: str, ask: dict[str, Any]) -> dict[str, Any]:
    """The stored Approval JSON for ``ask`` (what the loop asks to wait for), complete.

    ``ask`` holds ``kind``, ``agent``, ``tool``, ``arguments``, ``call_id``, ``approvers``,
    ``quorum``, ``timeout``, ``prompt``, ``context`` and ``form`` (the tool's argument
    schema); ``key`` names the decision (see :func:`approval_id`).
    """
    now = time.time()
    timeout = ask.get("timeout")
    return {
        "id": approval_id(run.run_id, step, visit, key),
        "kind": ask["kind"],
        "run_id": run.run_id,
        "workflow": run.spec.name,
        "step": step,
        "visit": visit,
        "approvers": list(ask.get("approvers") or ()),
        "quorum": int(ask.get("quorum") or 1),
        "prompt": ask.get("prompt"),
        "context": ask.get("context"),
        "form": ask.get("form"),
        "deadline": now + timeout if timeout else None,
        "votes": [],
        "created_at": now,
        "agent": ask.get("agent"),
        "tool": ask.get("tool"),
        "arguments": ask.get("arguments"),
        "call_id": ask.get("call_id"),
        "digest": ask.get("digest"),
        "idempotency_key": ask.get("idempotency_key"),
    }


def _deadline(approvals: list[dict[str, Any]]) -> float | None:
    deadlines = [a["deadline"] for a in approvals if a.get("deadline") is not None]
    return min(deadlines) if deadlines else None


async def park_tools(run: LiveRun, step: str, visit: int, approvals: list[dict[str, Any]]) -> NoReturn:
    """Commit the run as ``waiting`` on ``approvals`` inside ``step`` and unwind it (``Suspend``).

    The run keeps its step and its state from before the step (the step runs again on
    the decision); in a flow the stored visit is one less, because a flow counts a visit
    each time it enters a step.
    """
    if run.stop_requested:
        raise Stop()
    now = time.time()
    pending = {
        "kind": "tools",
        "workflow": run.spec.name,
        "step": step,
        "visit": visit,
        "target": run.step,
        "on_reject": None,
        "on_timeout": None,
        "on_fail": None,
        "since": now,
        "deadline": _deadline(approvals),
        "approvals": approvals,
    }
    resume_visit = visit if run.spec.main is not None else visit - 1
    fields: dict[str, Any] = {"status": RunStatus.WAITING, "pending": pending, "visit": resume_visit}
    if run.pause_requested:
        fields["control"] = "pause"
    for a in approvals:
        keys = ("kind", "agent", "tool", "arguments", "call_id", "approvers", "quorum", "deadline")
        run.event("waiting", step, {**{k: a.get(k) for k in keys}, "approval": a["id"]})
    run.status = RunStatus.WAITING
    await run.commit(Commit(fields=fields, release=True))
    run.visit = resume_visit
    run.kernel.parked(run, pending)
    raise Suspend()


def decide_tool(
    run_id: str,
    pending: dict[str, Any],
    approval: dict[str, Any],
    action: Action,
    by: str,
    comment: str | None,
    data: Any,
    validate: Callable[[Any], Any] | None = None,
) -> Outcome:
    """One reviewer's decision on a tool approval (``approve``, ``reject`` or ``respond``).

    ``approve`` of a ``tool_call`` may carry ``data={"arguments": {...}}``, the reviewer's
    edit, checked by ``validate`` (the tool's argument check; it raises
    ``InvalidInputError`` naming the field). ``respond`` carries the call's ``result``
    in ``data``. An approval without approvers (a ``tool_outcome`` of a tool with no
    approvers, in a workflow without operators) may be decided by anyone.

    Raises:
        NotAuthorizedError: ``by`` is not one of the approval's approvers.
        InvalidInputError: edited arguments that do not fit, or data on an approval that
            takes none; nothing is recorded.
    """
    step, aid, kind = approval.get("step"), approval["id"], approval.get("kind")
    approvers = list(approval.get("approvers") or ())
    if approvers and by not in approvers:
        raise NotAuthorizedError(
            f"run {run_id}: {by!r} may not decide approval {aid} ({kind} of tool {approval.get('tool')!r} "
            f"at step {step!r}); approvers are {approvers}"
        )
    where = f"run {run_id}, step {step!r}: approval {aid} of tool {approval.get('tool')!r}"
    if action == "respond":
        try:
            result = pydantic_core.to_jsonable_python(data)
            pydantic_core.to_json(result)
        except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"{where}: the result is not JSON-able: {exc}") from None
        decision = Decision(True, by, comment, {"result": result}, approval=aid, responded=True)
        return _settled(pending, aid, decision)
    if action == "reject":
        return _settled(pending, aid, Decision(False, by, comment, None, approval=aid))
    if data is not None:
        data = _edit(where, kind, data, validate)
    decision = Decision(True, by, comment, data, approval=aid)
    return short_of_quorum(pending, approval, by, decision) or _settled(pending, aid, decision)


def _edit(where: str, kind: Any, data: Any, validate: Callable[[Any], Any] | None) -> dict[str, Any]:
    """A reviewer's edit of a tool call: ``{"arguments": {...}}``, validated."""
    if kind != "tool_call":
        raise InvalidInputError(
            f"{where}: approving a tool_outcome runs the call again and takes no data; "
            "to give the model what the call returned, use respond(result=...)"
        )
    if not isinstance(data, dict) or set(data) != {"arguments"}:
        raise InvalidInputError(
            f"{where}: data must be {{'arguments': {{...}}}}, the edited arguments; got {data!r}"
        )
    arguments = data["arguments"]
    if validate is not None:
        arguments = validate(arguments)  # InvalidInputError naming the field; nothing recorded
    return {"arguments": pydantic_core.to_jsonable_python(arguments)}


def _settled(pending: dict[str, Any], aid: str, decision: Decision) -> Outcome:
    """``aid`` is decided: the run waits on for the others, or goes back into its step."""
    others = [a for a in pending["approvals"] if a["id"] != aid]
    if others:
        return Outcome(decision, {**pending, "approvals": others, "deadline": _deadline(others)}, None, None)
    return Outcome(decision, None, pending.get("target"), None)


def tool_expired(rec: RunRecord, now: float | None = None) -> Transition | None:
    """The timeout of the first of ``rec``'s tool approvals past its deadline, or None.

    A timeout counts as a rejection: the model is told no decision came in time.
    """
    pending = rec.pending
    if rec.status != RunStatus.WAITING or not pending or pending.get("kind") != "tools":
        return None
    now = time.time() if now is None else now
    due = [
        a for a in pending.get("approvals") or () if a.get("deadline") is not None and a["deadline"] <= now
    ]
    if not due:
        return None
    first = min(due, key=lambda a: a["deadline"])
    decision = Decision(False, None, "timed out", timed_out=True, approval=first["id"])
    return Transition.of(rec, _settled(pending, first["id"], decision))


def past_deadline(rec: RunRecord) -> Transition | None:
    """The timeout of ``rec``'s gate or of one of its tool approvals, once past its deadline."""
    pending = rec.pending
    if isinstance(pending, dict) and pending.get("kind") == "tools":
        return tool_expired(rec)
    return expired(rec)


def refuse_in_branch(run_id: str, step: str, tool: str) -> AgentflowError:
    """The error for a tool approval asked for in a parallel branch."""
    return AgentflowError(
        f"run {run_id}, step {step!r}: tool {tool!r} needs an approval, and a run cannot park on it "
        "inside a parallel branch; call the agent from a step of its own (nothing was run)"
    )


def check_respond(kind: Any, run_id: str, aid: str) -> None:
    """``respond`` is for tool approvals only."""
    if kind not in TOOL_KINDS:
        raise InvalidStateError(
            f"run {run_id}: approval {aid} is a {kind}; respond answers tool calls only "
            "(approve or reject it)"
        )
