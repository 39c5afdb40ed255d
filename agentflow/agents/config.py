"""Agent declarations: ``Agent``, ``AgentReply``, ``TokenBudget``, ``RateLimit`` and the agents config."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from pydantic import BaseModel

from ..errors import WorkflowDefinitionError
from ..types import Usage
from .mcp import MCPServer
from .spi import Provider, ToolLike

__all__ = ["Agent", "AgentReply", "AgentsConfig", "RateLimit", "TokenBudget"]


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A provider limit an agent's calls keep to, across every process sharing the store.

    A call waits for its turn (never refused): before a request is sent, the limiter
    checks every limit set here at once, and the call goes when all allow it. The wait
    shows in ``runner.agent_statistics()`` and as an ``agent_throttled`` event on the run.

    Enforced by the store: on Redis (one script per turn, the Redis server's clock) and
    on Postgres (a row per limit locked ``FOR UPDATE``, the database's clock) across the
    fleet; on SQLite across the processes sharing the file (the machine's clock); on the
    memory store within the process (every runner of it).

    Args:
        requests_per_minute: requests sent at most in any ``window`` seconds, as a rate
            per minute (a sliding window: ``requests_per_minute * window / 60`` requests).
        tokens_per_minute: tokens (input plus output) at most in any ``window`` seconds,
            as a rate per minute. A call reserves its estimate before it is sent (its
            ``max_tokens``, plus its prompt's characters / 4) and its real usage replaces
            the estimate once the reply is in; so calls in flight count, and the window
            can pass the limit only by what calls used beyond their estimate. A call
            bigger than the whole allowance still goes, alone, in an empty window.
        concurrent: calls in flight at most (a slot is held for a call's duration, and
            given back by a process that died holding it within 30 seconds).
        window: the sliding window in seconds (default a minute). A shorter one spreads
            a minute's allowance evenly; ``RateLimit(requests_per_minute=300, window=1)``
            is 5 requests in any second.
        key: the limit's name in the store. By default every agent has its own limit,
            named ``<provider>:<model>:<agent>``; agents (and workflows) that give the same
            ``key`` share one (give them the same numbers).

    Raises:
        WorkflowDefinitionError: no limit set, a limit that is not positive, or a window
            that leaves less than one request (or token) in it.
    """

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    concurrent: int | None = None
    window: float = 60.0
    key: str | None = None

    def __post_init__(self) -> None:
        named = {
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
            "concurrent": self.concurrent,
        }
        if all(v is None for v in named.values()):
            raise WorkflowDefinitionError(
                "RateLimit needs requests_per_minute, tokens_per_minute or concurrent (or several)"
            )
        for name, value in named.items():
            if value is not None and (isinstance(value, bool) or not value > 0):
                raise WorkflowDefinitionError(f"RateLimit {name} must be a positive number, got {value!r}")
        if self.concurrent is not None:
            if self.concurrent != int(self.concurrent):
                raise WorkflowDefinitionError(
                    f"RateLimit concurrent must be a whole number, got {self.concurrent}"
                )
            object.__setattr__(self, "concurrent", int(self.concurrent))
        if not self.window > 0:
            raise WorkflowDefinitionError(f"RateLimit window must be positive seconds, got {self.window!r}")
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = named[name]
            if value is not None and value * self.window / 60 < 1:
                raise WorkflowDefinitionError(
                    f"RateLimit {name}={value:g} leaves less than one in a window of {self.window:g} s; "
                    "widen the window"
                )
        if self.key is not None and not self.key:
            raise WorkflowDefinitionError("RateLimit key must not be empty (leave it None for the default)")

    @property
    def requests(self) -> int | None:
        """Requests allowed in one window."""
        rpm = self.requests_per_minute
        return None if rpm is None else int(rpm * self.window / 60 + 1e-9)

    @property
    def tokens(self) -> int | None:
        """Tokens allowed in one window."""
        tpm = self.tokens_per_minute
        return None if tpm is None else int(tpm * self.window / 60 + 1e-9)


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
        limit: a :class:`RateLimit` its calls keep to, across the fleet sharing the store.

    Raises:
        WorkflowDefinitionError: a tool that is not one, two tools of one name, or one
            MCP server listed twice; a ``limit`` that is not a :class:`RateLimit`.
    """

    provider: str | Provider
    model: str
    instructions: str | None = None
    output: type[BaseModel] | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    tools: tuple[ToolLike | MCPServer, ...] = ()
    limit: RateLimit | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and not isinstance(self.limit, RateLimit):
            raise WorkflowDefinitionError(
                f"agent on model {self.model!r}: limit= takes a RateLimit(...), "
                f"got {type(self.limit).__name__}"
            )
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
