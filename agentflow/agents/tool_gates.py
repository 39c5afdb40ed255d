"""What the agent loop does with a tool call that has no journaled result: run it, park the
run on an approval, or give the model what a reviewer decided (see :mod:`agentflow.agents.loop`).

A call of a tool with ``approval=`` waits for a ``tool_call`` approval bound to the call
and the digest of its arguments; a call of a tool that is not idempotent whose attempt
started and left no result waits for a ``tool_outcome`` approval. What a reviewer sees
(the ``what`` of :class:`_Ask`) and the ``go`` markers that record an attempt started on
a decision are the loop's journal contract: their keys and shapes must not change.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ..errors import AgentflowError
from ..types import Decision
from .spi import ToolLike, ToolUse
from .turns import ToolCall, _idempotency_key, _Turn

if TYPE_CHECKING:
    from .handle import AgentHandle


@dataclass(frozen=True, slots=True)
class _Go:
    """A call to run: its arguments, and the decision that lets it (when one did).

    ``marker``: the journal key that records the attempt started, when the call's
    intent is not already journaled (a run on a decision of a tool that is not
    idempotent); ``edited``: a reviewer changed the arguments.
    """

    args: BaseModel
    decision: Decision | None = None
    approval: str | None = None
    marker: str | None = None
    edited: bool = False
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class _Ask:
    """An approval a call waits for: its name in the step visit, and what it shows."""

    key: str
    what: dict[str, Any]


def _plan(
    handle: AgentHandle, keys: _Turn, use: ToolUse, tool: ToolLike, args: BaseModel, text: str
) -> _Go | _Ask | ToolCall:
    """What to do with a call that has no journaled result: run it, wait for a decision, or
    give the model what a reviewer decided.

    Attempts of a tool that is not idempotent are counted: the first attempt of a call
    that needs no approval was journaled as its turn's reply; each attempt started on a
    decision journals a marker ``{call}:go{n}``. An attempt that started and left no
    result has an unknown outcome: a ``tool_outcome`` approval ``{call}:outcome:{n}``
    decides it.
    """
    journal = handle._accessor._journal
    call_key = keys.call(use.call_id)
    arguments = args.model_dump(mode="json")
    gate = getattr(tool, "approval", None)
    shown = _described(gate)
    go = _Go(args)
    if gate is not None:
        digest = _digest(arguments)
        key = f"{call_key}:call:{digest}"
        aid = journal.approval_id(key)
        stored = journal.decided(aid)
        if stored is None:
            return _Ask(key, _ask("tool_call", handle, use, tool, arguments, shown, text, digest=digest))
        decision = Decision.from_json(stored)
        answered = _answered(use, tool, arguments, decision, "call")
        if answered is not None:
            return answered
        edited = isinstance(decision.data, dict) and "arguments" in decision.data
        if edited:
            try:
                args = tool.validate(decision.data["arguments"])
            except AgentflowError as exc:
                error = f"InvalidArguments: the reviewer's edited arguments do not fit: {exc}"
                return ToolCall(use.call_id, use.name, decision.data["arguments"], None, error)
        go = _Go(args, decision, aid, edited=edited)
    if tool.idempotent:
        return go
    started = 1 if gate is None and keys.replayed else 0
    while journal.lookup(f"{call_key}:go{started + 1}") is not None:
        started += 1
    if started:  # attempt ``started`` began and left no result: its outcome is unknown
        key = f"{call_key}:outcome:{started}"
        aid = journal.approval_id(key)
        stored = journal.decided(aid)
        if stored is None:
            approvers = list(shown.get("approvers") or ()) or list(journal.operators)
            what = _ask("tool_outcome", handle, use, tool, arguments, shown, text, approvers=approvers)
            what["idempotency_key"] = _idempotency_key(journal.run_id, keys, use)
            what["context"] = {
                **what["context"],
                "attempt": started,
                "idempotency_key": what["idempotency_key"],
            }
            return _Ask(key, what)
        decision = Decision.from_json(stored)
        answered = _answered(use, tool, arguments, decision, "outcome")
        if answered is not None:
            return answered
        go = _Go(go.args, decision, aid, edited=go.edited)
    elif go.decision is None:
        return go  # a first attempt: its intent is its turn's journaled reply
    return _Go(go.args, go.decision, go.approval, f"{call_key}:go{started + 1}", go.edited, started + 1)


def _described(gate: Any) -> dict[str, Any]:
    """A tool's approval as JSON (approvers, quorum, timeout, prompt, context), {} without one."""
    if gate is None:
        return {}
    describe = getattr(gate, "describe", None)
    return dict(describe()) if describe is not None else {}


def _digest(arguments: Any) -> str:
    canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _ask(
    kind: str,
    handle: AgentHandle,
    use: ToolUse,
    tool: ToolLike,
    arguments: Any,
    shown: dict[str, Any],
    text: str,
    *,
    digest: str | None = None,
    approvers: list[str] | None = None,
) -> dict[str, Any]:
    """What an approval of ``kind`` on this call shows a reviewer."""
    if kind == "tool_call":
        prompt = shown.get("prompt") or f"Run {tool.name} with these arguments?"
        form = tool.spec().get("parameters")
    else:
        prompt = (
            f"The call of {tool.name} may have run before the process stopped, and its outcome is "
            "unknown. Approve to run it again, respond with what it returned, or reject to tell "
            "the model it failed."
        )
        form = None
    return {
        "kind": kind,
        "agent": handle.agent_name,
        "tool": tool.name,
        "arguments": arguments,
        "call_id": use.call_id,
        "digest": digest,
        "approvers": approvers if approvers is not None else list(shown.get("approvers") or ()),
        "quorum": shown.get("quorum", 1) if kind == "tool_call" else 1,
        "timeout": shown.get("timeout") if kind == "tool_call" else None,
        "prompt": prompt,
        "context": {"text": text, "context": shown.get("context")},
        "form": form,
    }


def _answered(use: ToolUse, tool: ToolLike, arguments: Any, d: Decision, what: str) -> ToolCall | None:
    """The call as a decision settled it without running the tool, or None when it may run."""
    if d.responded:
        result = d.data.get("result") if isinstance(d.data, dict) else None
        return ToolCall(use.call_id, tool.name, arguments, result)
    if d.approved:
        return None
    if d.timed_out:
        error = "Rejected: no reviewer decided on this call in time, so it was not run"
    elif what == "outcome":
        error = f"ToolFailed: {d.by} reported that the call failed" + (f": {d.comment}" if d.comment else "")
    else:
        error = f"Rejected: {d.by} rejected this call, so it was not run" + (
            f"; their reason: {d.comment}" if d.comment else ""
        )
    return ToolCall(use.call_id, tool.name, arguments, None, error)
