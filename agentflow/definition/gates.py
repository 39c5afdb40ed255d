"""Gates, as declared: ``Wait(gate, target)`` and ``HumanApproval(...)``.

What happens at a gate (parking the run, deciding, timing out) is the engine's
(``agentflow._engine.gates``); this module only describes gates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol, runtime_checkable

import pydantic_core

from ..errors import WorkflowDefinitionError

__all__ = ["Gate", "HumanApproval", "Wait", "seconds"]


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
