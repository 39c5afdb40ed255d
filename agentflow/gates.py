"""Gates: a run stops at ``Wait(gate, target)`` until a decision moves it on.

A waiting run is only a stored record: the pending gate (approvers, quorum, prompt,
context, deadline, approvals so far, where to go next). Deciding is a pure function of
that record, applied through ``Store.update`` by whichever process decides.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol, runtime_checkable

import pydantic_core

from .errors import InvalidStateError, NotAuthorizedError, WorkflowDefinitionError
from .records import Decision

__all__ = ["Gate", "HumanApproval", "Wait", "pending_gate", "seconds"]


def seconds(value: float | timedelta | None, what: str) -> float | None:
    """A timeout given as seconds or a timedelta, as seconds."""
    if value is None:
        return None
    out = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if out <= 0:
        raise WorkflowDefinitionError(f"{what} must be positive, got {value!r}")
    return out


@runtime_checkable
class Gate(Protocol):
    """Something a run waits on. ``kind`` names it in the stored record."""

    kind: str

    def describe(self) -> dict[str, Any]:
        """The gate as JSON-able data, kept with the waiting run."""
        ...


@dataclass(frozen=True)
class HumanApproval:
    """Wait for named people to approve.

    Args:
        approvers: who may decide.
        quorum: how many distinct approvals move the run on.
        timeout: seconds or a timedelta; past it the gate times out.
        prompt: what the reviewer is asked.
        context: JSON-able data for review (an agent's draft, a diff).
    """

    approvers: list[str]
    quorum: int = 1
    timeout: float | timedelta | None = None
    prompt: str | None = None
    context: Any = None
    kind: str = field(default="human_approval", init=False)

    def __post_init__(self) -> None:
        if isinstance(self.approvers, str) or not self.approvers:
            raise WorkflowDefinitionError("HumanApproval needs a non-empty list of approvers")
        if not 1 <= self.quorum <= len(set(self.approvers)):
            raise WorkflowDefinitionError(
                f"HumanApproval quorum {self.quorum} cannot be met by approvers {self.approvers}"
            )
        seconds(self.timeout, "HumanApproval timeout")
        try:
            pydantic_core.to_json(self.context)
        except pydantic_core.PydanticSerializationError as exc:
            raise WorkflowDefinitionError(f"HumanApproval context must be JSON-able: {exc}") from exc

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "approvers": list(self.approvers),
            "quorum": self.quorum,
            "timeout": seconds(self.timeout, "timeout"),
            "prompt": self.prompt,
            "context": pydantic_core.to_jsonable_python(self.context),
        }


@dataclass(frozen=True, slots=True)
class Wait:
    """Stop the run at ``gate``; approved → ``target``, rejected → ``on_reject``, timed out → ``on_timeout``.

    Without ``on_reject`` a rejection ends the run as ``rejected``; without
    ``on_timeout`` a timeout ends it as ``expired``.
    """

    gate: Gate
    target: str
    on_reject: str | None = None
    on_timeout: str | None = None


def pending_gate(wait: Wait | None, gate: Gate, step: str, visit: int, workflow: str) -> dict[str, Any]:
    """The stored form of a gate a run now waits at (``workflow`` lets a store index it)."""
    data = gate.describe()
    timeout = data.get("timeout")
    data.update(
        workflow=workflow,
        step=step,
        visit=visit,
        target=wait.target if wait else None,
        on_reject=wait.on_reject if wait else None,
        on_timeout=wait.on_timeout if wait else None,
        since=time.time(),
        deadline=time.time() + timeout if timeout else None,
        approvals=[],
    )
    return data


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a decision does to a waiting run.

    Attributes:
        decision: the decision to record.
        pending: the updated gate when the quorum is not met yet, else None.
        resume_at: where the run continues (a step name, possibly END), or None when the
            run ends with ``final``.
        final: ``"rejected"`` or ``"expired"`` when the run ends here.
    """

    decision: Decision
    pending: dict[str, Any] | None
    resume_at: str | None
    final: str | None


def decide(
    run_id: str, pending: dict[str, Any] | None, approved: bool, by: str, comment: str | None, data: Any
) -> Outcome:
    """Apply one reviewer's decision to the pending gate."""
    if pending is None:
        raise InvalidStateError(f"run {run_id} is not waiting at a gate, so it cannot be decided")
    approvers = pending.get("approvers", [])
    if by not in approvers:
        raise NotAuthorizedError(
            f"run {run_id}: {by!r} may not decide the gate at step {pending.get('step')!r}; "
            f"approvers are {approvers}"
        )
    decision = Decision(
        approved=approved, by=by, comment=comment, data=pydantic_core.to_jsonable_python(data)
    )
    if not approved:
        target = pending.get("on_reject")
        return Outcome(decision, None, target, None if target else "rejected")
    approvals = list(pending.get("approvals", []))
    if by not in approvals:
        approvals.append(by)
    if len(approvals) < int(pending.get("quorum", 1)):
        return Outcome(decision, {**pending, "approvals": approvals}, None, None)
    return Outcome(decision, None, pending.get("target"), None)


def time_out(pending: dict[str, Any]) -> Outcome:
    """The outcome of a gate whose deadline passed with no quorum."""
    decision = Decision(approved=False, by=None, comment="timed out", timed_out=True)
    target = pending.get("on_timeout")
    return Outcome(decision, None, target, None if target else "expired")
