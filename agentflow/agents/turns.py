"""An agent loop's records: each tool call (:class:`ToolCall`), the loop's result
(:class:`AgentRun`), and the journal keys of a turn and of its calls.

``ToolCall.to_json`` is the form a call's result is journaled in, and ``from_json`` reads
it back on a replay; a turn's keys (and the idempotency key a tool is given) are derived
from the handle's journal key for the loop, so a step that runs again finds the same
entries. Both public types are importable from ``agentflow`` and ``agentflow.agents.loop``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..types import Usage
from .spi import ToolUse

__all__ = ["AgentRun", "ToolCall"]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool call of an agent loop, in the order the model asked for them.

    Attributes:
        call_id: the model's id for the call.
        name: the tool called.
        arguments: the arguments as validated (JSON), or as the model wrote them when
            they were not valid.
        result: what the tool returned (JSON), None when it failed.
        error: ``"Type: message"`` when the call failed (bad arguments, unknown tool,
            the tool's exception), else None.
        duration: seconds the tool ran (0 for a call that did not run, or was replayed).
        edited: a reviewer changed the arguments before the call ran (``arguments`` are
            the edited ones; the model was told).
    """

    call_id: str
    name: str
    arguments: Any
    result: Any = None
    error: str | None = None
    duration: float = 0.0
    edited: bool = False

    def to_json(self) -> dict[str, Any]:
        """The journaled form."""
        return {
            "id": self.call_id,
            "name": self.name,
            "arguments": self.arguments,
            "result": self.result,
            "error": self.error,
            "duration": self.duration,
            "edited": self.edited,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ToolCall:
        """Read the journaled form back."""
        return cls(
            str(data["id"]),
            str(data["name"]),
            data.get("arguments"),
            data.get("result"),
            data.get("error"),
            float(data.get("duration") or 0.0),
            bool(data.get("edited", False)),
        )


@dataclass(frozen=True, slots=True)
class AgentRun:
    """What ``handle.run`` returns.

    Attributes:
        text: the final answer's text.
        output: the final answer validated into the output model, when there is one.
        usage: tokens every turn of the loop consumed.
        tool_calls: every tool call, in order.
        turns: model calls made (replayed ones included).
    """

    text: str
    output: Any = None
    usage: Usage = field(default_factory=Usage)
    tool_calls: tuple[ToolCall, ...] = ()
    turns: int = 0


class _Turn:
    """The journal keys of one turn and its calls; ``replayed``: its reply came from the journal."""

    __slots__ = ("base", "replayed")

    def __init__(self, base: str) -> None:
        self.base = base
        self.replayed = False

    @property
    def reply(self) -> str:
        return self.base

    def call(self, call_id: str) -> str:
        return f"{self.base}:call:{call_id}"


def _idempotency_key(run_id: str, keys: _Turn, use: ToolUse) -> str:
    return f"{run_id}/{keys.base}/{use.call_id}"
