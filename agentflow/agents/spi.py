"""The provider SPI: what a provider implements, and the journal Protocol the engine implements.

Providers live in their own distributions and are found by name through the
``agentflow.providers`` entry-point group; the core imports no LLM SDK.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, runtime_checkable

from ..errors import ProviderError, redact
from ..types import Usage

if TYPE_CHECKING:
    from .config import RateLimit

__all__ = [
    "AgentJournal",
    "Limiter",
    "Message",
    "Permit",
    "Provider",
    "ProviderReply",
    "ProviderRequest",
    "ToolContext",
    "ToolLike",
    "ToolSpec",
    "ToolUse",
    "redacting",
    "reply_body",
]


@runtime_checkable
class Provider(Protocol):
    """An LLM API. ``agentflow-openai`` and ``agentflow-anthropic`` implement it.

    A provider owns its SDK client (and so its HTTP connection pool); the runner makes
    one provider per name and closes it when the runner closes.
    """

    name: str

    async def complete(self, request: ProviderRequest) -> ProviderReply:
        """Send one request and return the whole reply (retrying transient failures)."""
        ...

    def stream(self, request: ProviderRequest) -> AsyncIterator[str | ProviderReply]:
        """Yield text deltas, then one final :class:`ProviderReply` with the full text and usage."""
        ...

    async def aclose(self) -> None:
        """Close the SDK client and its connections."""
        ...


class Permit(Protocol):
    """A call's turn under a :class:`~agentflow.agents.RateLimit`, from :meth:`Limiter.acquire`.

    Attributes:
        waited: seconds the call waited for it (0.0 when it went at once).
        reason: the limit it waited for longest (``"requests_per_minute"``,
            ``"tokens_per_minute"`` or ``"concurrent"``), or None.
    """

    waited: float
    reason: str | None

    async def release(self, tokens: int | None) -> None:
        """The call ended: give back its concurrency slot, and count ``tokens`` (its real
        usage) in place of its estimate; None keeps the estimate (a call that failed)."""
        ...


class Limiter(Protocol):
    """What the agents layer asks before each model request of an agent with a ``limit``.

    The runtime implements it over the store (fleet-wide on Redis and Postgres) or
    within the process; the pools are given one.
    """

    async def acquire(self, key: str, limit: RateLimit, tokens: int) -> Permit:
        """Wait until ``limit`` (named ``key``) lets one more call go, reserving ``tokens``.

        Never refuses: a call that may not go yet waits for its turn.
        """
        ...


@dataclass(frozen=True, slots=True)
class ToolUse:
    """A tool call the model asked for, as it asked.

    Attributes:
        call_id: the model's id for the call (OpenAI ``tool_calls[].id``, Anthropic
            ``tool_use.id``); a tool result answers it by this id.
        name: the tool's name.
        arguments: the arguments as the JSON text the model wrote; not parsed here,
            since a model may write text that is not JSON (the loop tells it so).
    """

    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool as a provider shows it to the model: name, description, JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Message:
    """One turn of a conversation.

    Attributes:
        role: ``"user"``, ``"assistant"``, or ``"tool"`` (the result of one tool call).
        content: the text (for ``"tool"``, the result as text; JSON for structured results).
        tool_calls: for ``"assistant"``: the tool calls the model made in that turn.
        call_id: for ``"tool"``: the call this is the result of.
        is_error: for ``"tool"``: the call failed and ``content`` says how.
    """

    role: str
    content: str
    tool_calls: tuple[ToolUse, ...] = ()
    call_id: str | None = None
    is_error: bool = False


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """Everything a provider needs for one call.

    Attributes:
        output_schema: JSON schema the reply must follow (structured output), or None.
            With ``tools``, it is the shape of the final answer, the one without a tool call.
        output_name: a name for that schema (the model's class name).
        tools: the tools the model may call in this turn.
    """

    model: str
    messages: tuple[Message, ...]
    instructions: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    output_schema: dict[str, Any] | None = None
    output_name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    tools: tuple[ToolSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class ProviderReply:
    """A provider's answer: the text, the structured data (parsed JSON) if asked for, usage.

    ``tool_calls``: the tools the model calls in this turn, in its order (empty for a
    final answer); ``text`` is then whatever it said alongside them. ``model``: the model
    that answered, as the provider names it (a dated version of the one asked for, say),
    when the provider says.
    """

    text: str
    data: Any = None
    usage: Usage = field(default_factory=Usage)
    tool_calls: tuple[ToolUse, ...] = ()
    model: str | None = None


@contextmanager
def redacting(*secrets: str | None) -> Iterator[None]:
    """Raise a :class:`ProviderError` from the block with ``secrets`` (an API key) redacted.

    A redacted error is raised without its cause: the SDK's exception quotes the same
    message, and a traceback would print it. An error with nothing secret in it, nor in
    the SDK error it came from, passes unchanged.
    """
    try:
        yield
    except ProviderError as exc:
        message = str(exc)
        clean = redact(message, *secrets)
        cause = str(exc.__cause__ or "")
        if clean == message and redact(cause, *secrets) == cause:
            raise
        raise ProviderError(clean, status=exc.status, provider=exc.provider) from None


def reply_body(provider: str, request: ProviderRequest, content: bytes) -> dict[str, Any]:
    """The JSON object of a provider's raw reply body, for providers that read it directly.

    A body that is not JSON raises :class:`~agentflow.errors.ProviderError`; JSON that is
    not an object comes back as an empty dict, for the provider's own checks to judge.
    """
    try:
        body = json.loads(content)
    except ValueError as exc:
        raise ProviderError(
            f"{provider}: the reply for model {request.model!r} is not JSON: {content[:200]!r}",
            provider=provider,
        ) from exc
    return body if isinstance(body, dict) else {}


class ToolContext:
    """The calling run's context, for a tool whose first parameter is annotated ``ToolContext``.

    Attributes:
        run_id: the run whose agent called the tool.
        step_name: the step the agent runs in.
        agent: the agent's name.
        call_id: the model's id for this call (as in ``ToolCall.call_id``).
        attempt: 1 on the first execution of this call, 2 on the next, ...
        idempotency_key: the same across retries, replays and recoveries of this call,
            different for every other call: pass it to the API the tool calls.
        decision: the reviewer's decision, when the call needed an approval.
    """

    __slots__ = ("_emit", "agent", "attempt", "call_id", "decision", "idempotency_key", "run_id", "step_name")

    def __init__(
        self,
        run_id: str,
        step_name: str,
        agent: str,
        call_id: str,
        idempotency_key: str,
        attempt: int = 1,
        decision: Any = None,
        emit: Callable[[str, Any], None] | None = None,
    ) -> None:
        self.run_id = run_id
        self.step_name = step_name
        self.agent = agent
        self.call_id = call_id
        self.idempotency_key = idempotency_key
        self.attempt = attempt
        self.decision = decision
        self._emit = emit

    def emit(self, name: str, data: Any = None) -> None:
        """Record a custom event ``name`` on the run (as ``ctx.emit`` does in a step)."""
        if self._emit is not None:
            self._emit(name, data)

    def __repr__(self) -> str:
        return (
            f"ToolContext(run_id={self.run_id!r}, step_name={self.step_name!r}, agent={self.agent!r}, "
            f"call_id={self.call_id!r}, attempt={self.attempt})"
        )


@runtime_checkable
class ToolLike(Protocol):
    """What the agent loop needs of a tool (:class:`agentflow.definition.tools.Tool` is one)."""

    # Read-only (properties), so a frozen dataclass such as ``Tool`` fits the protocol.
    @property
    def fn(self) -> Callable[..., Any]: ...
    @property
    def name(self) -> str: ...
    @property
    def idempotent(self) -> bool: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def takes_context(self) -> bool: ...
    @property
    def is_async(self) -> bool: ...

    @property
    def retry(self) -> Any:
        """A policy with ``retrying()`` (a tenacity controller), or None."""
        ...

    def spec(self) -> dict[str, Any]:
        """``{"name", "description", "parameters"}``."""
        ...

    def validate(self, arguments: Any, where: str = "") -> Any:
        """The arguments as a pydantic model; raises ``InvalidInputError``."""
        ...

    def keywords(self, arguments: Any) -> dict[str, Any]:
        """Validated arguments as keyword arguments of ``fn``."""
        ...


class AgentJournal(Protocol):
    """The engine's side of agent calls, one per step execution.

    The pool uses it to replay finished calls, to persist each reply the moment it
    arrives, to account usage, and to report leaks.
    """

    @property
    def scope(self) -> str:
        """A key prefix unique to this step visit (same across retries and crash re-runs)."""
        ...

    @property
    def run_id(self) -> str:
        """The run the calls belong to."""
        ...

    @property
    def step_name(self) -> str:
        """The step the calls are made in."""
        ...

    def lookup(self, key: str) -> Any | None:
        """A journaled reply (JSON) stored under ``key``, or None."""
        ...

    async def record(self, key: str, value: Any, usage: Usage) -> None:
        """Persist ``value`` under ``key`` durably and add ``usage`` to the step and run."""
        ...

    async def record_many(self, entries: Mapping[str, Any], usage: Usage) -> None:
        """Persist several entries in one durable write (one round trip) and add ``usage``."""
        ...

    def replayed(self, usage: Usage) -> None:
        """A journaled reply was used again: its ``usage`` counts toward this step's
        (the run's has it already)."""
        ...

    def spent(self) -> int:
        """Tokens the run has consumed so far (for the budget)."""
        ...

    def cost(self) -> Decimal | None:
        """What the run's calls of known price have cost so far, in USD (for the budget)."""
        ...

    def emit(self, kind: str, data: Any = None) -> None:
        """Record an event on the run (``agent_leak``)."""
        ...

    # Optional: a journal without these two delivers no live events (the handle checks).

    @property
    def watched(self) -> bool:
        """True while someone in this process watches the run's events."""
        ...

    def live(self, kind: str, data: Any = None) -> None:
        """Deliver a live-only event (``agent_delta``) to the run's watchers here; never stored."""
        ...

    @property
    def operators(self) -> tuple[str, ...]:
        """Who decides a tool call's unknown outcome when its tool names no approvers."""
        ...

    def approval_id(self, key: str) -> str:
        """The id of the approval named ``key`` (a call's journal key and what it decides)."""
        ...

    def decided(self, approval: str) -> dict[str, Any] | None:
        """The stored decision (``Decision`` JSON) of ``approval``, or None while undecided."""
        ...

    async def wait_for(self, asks: Sequence[tuple[str, dict[str, Any]]]) -> NoReturn:
        """Park the run on approvals (``(key, what)`` pairs: see ``tool_approval``); never returns.

        The step runs again once they are decided; its journal brings back what finished.
        """
        ...
