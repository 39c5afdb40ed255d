"""Agent declarations: ``Agent``, ``AgentReply``, ``TokenBudget`` and what ``.agents()`` records."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from pydantic import BaseModel

from ..errors import WorkflowDefinitionError
from ..types import Usage
from .mcp import MCPServer
from .spi import Provider, ToolLike

__all__ = ["Agent", "AgentReply", "AgentsConfig", "TokenBudget"]


@dataclass(frozen=True, slots=True)
class Agent:
    """An LLM agent a step can talk to through ``ctx.agents``.

    Args:
        provider: a provider name registered under ``agentflow.providers``
            (``"openai"``, ``"anthropic"``) or a :class:`Provider` instance.
        model: the provider's model name.
        instructions: the system prompt.
        output: a pydantic model; replies are asked for and validated as this model.
        temperature: sampling temperature.
        max_tokens: cap on output tokens per call.
        options: extra provider-specific request options.
        tools: the tools ``handle.run`` lets the model call: ``@tool`` functions, and
            :class:`MCPServer` entries for all the tools of a Model Context Protocol
            server (listed when a loop first needs them; a name two of them share is
            an error then).

    Raises:
        WorkflowDefinitionError: a tool that is not one, two tools of one name, or one
            MCP server listed twice.
    """

    provider: str | Provider
    model: str
    instructions: str | None = None
    output: type[BaseModel] | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    tools: tuple[ToolLike | MCPServer, ...] = ()

    def __post_init__(self) -> None:
        seen: set[str] = set()
        servers: set[int] = set()
        for t in self.tools:
            if isinstance(t, MCPServer):
                if id(t) in servers:
                    raise WorkflowDefinitionError(
                        f"agent on model {self.model!r}: {t!r} is listed twice in tools"
                    )
                servers.add(id(t))
                continue
            if not isinstance(t, ToolLike):
                what = getattr(t, "__name__", repr(t))
                raise WorkflowDefinitionError(
                    f"agent on model {self.model!r}: {what} is not a tool; declare it with @tool or "
                    "tool(fn), or give an MCP server as MCPServer.stdio(...) or MCPServer.http(...)"
                )
            if t.name in seen:
                raise WorkflowDefinitionError(
                    f"agent on model {self.model!r}: two tools are named {t.name!r}; give one another name="
                )
            seen.add(t.name)
        object.__setattr__(self, "tools", tuple(self.tools))


@dataclass(frozen=True, slots=True)
class AgentReply:
    """What ``handle.send`` returns.

    Attributes:
        text: the reply's text.
        output: the validated output model instance when the agent declares ``output``.
        usage: tokens this call consumed.
    """

    text: str
    output: Any = None
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True, slots=True)
class TokenBudget:
    """A run's allowance of tokens and of money (USD): a call past it raises ``BudgetExceededError``.

    ``max_cost`` counts the calls whose price is known (see ``Usage.cost``); a call is
    refused once the run's cost has reached it (a call's cost is known only after it).
    """

    max_tokens: int | None = None
    max_cost: Decimal | float | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is None and self.max_cost is None:
            raise WorkflowDefinitionError("TokenBudget needs max_tokens, max_cost or both")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise WorkflowDefinitionError(
                f"TokenBudget max_tokens must not be negative, got {self.max_tokens}"
            )
        if self.max_cost is not None:
            object.__setattr__(self, "max_cost", Decimal(str(self.max_cost)))


@dataclass(frozen=True, slots=True)
class AgentsConfig:
    """What ``Workflow.agents(...)`` recorded."""

    agents: dict[str, Agent]
    max_handles: int = 8
    acquire_timeout: float | None = None
    budget: TokenBudget | None = None
