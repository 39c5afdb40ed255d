"""The agent pool: closable, journaled LLM agent handles, a fixed number per agent.

Modelled on trio's ``CapacityLimiter``: each agent has ``max_handles`` tokens; acquiring
a handle takes one, closing it gives it back. Waiters queue FIFO and a released token is
handed straight to the first of them, so a newcomer can never overtake someone already
waiting. The uncontended path is plain arithmetic (no task, no future), so
``await ctx.agents.writer`` + ``await writer.close()`` costs a few microseconds.

One :class:`AgentPools` lives per runner; the engine asks it for one
:class:`AgentAccessor` per step execution (that is ``ctx.agents``). Every agent call
goes through the step's :class:`~agentflow.agents.AgentJournal`: a call that finished
before a crash is answered from the journal, and a fresh reply is journaled before it
is returned, so no call is sent (or billed) twice.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass, replace
from importlib.metadata import entry_points
from types import TracebackType
from typing import Any, cast

from pydantic import BaseModel, ValidationError

from .agents import (
    Agent,
    AgentJournal,
    AgentReply,
    AgentsConfig,
    Message,
    Provider,
    ProviderReply,
    ProviderRequest,
)
from .errors import (
    AgentflowError,
    BudgetExceededError,
    OutputValidationError,
    PoolTimeoutError,
    ProviderError,
    WorkflowDefinitionError,
)
from .records import Usage

__all__ = [
    "PROVIDER_GROUP",
    "AgentAccessor",
    "AgentAcquirer",
    "AgentHandle",
    "AgentPools",
    "PoolStatistics",
    "load_provider",
]

#: Entry-point group under which provider distributions register their provider class.
PROVIDER_GROUP = "agentflow.providers"

_EXTRAS = {"openai": "agentflow[openai]", "anthropic": "agentflow[anthropic]"}

_REPAIR_PROMPT = (
    "Your previous reply did not match the required JSON schema. Validation errors:\n{errors}\n"
    "Reply again with only the corrected JSON object."
)


def load_provider(name: str) -> Provider:
    """Create the provider registered as ``name`` in the ``agentflow.providers`` group.

    Args:
        name: the entry point's name, e.g. ``"openai"``.

    Returns:
        A new provider instance (the entry point's class or factory called with no args).

    Raises:
        ProviderError: no such provider is installed, or it failed to load.
    """
    found = entry_points(group=PROVIDER_GROUP)
    for ep in found:
        if ep.name == name:
            try:
                factory = ep.load()
                return cast(Provider, factory())
            except Exception as exc:
                raise ProviderError(
                    f"agent provider {name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}",
                    provider=name,
                ) from exc
    installed = ", ".join(sorted({ep.name for ep in found})) or "none"
    extra = _EXTRAS.get(name, "agentflow[openai]' or 'agentflow[anthropic]")
    raise ProviderError(
        f"no agent provider named {name!r} is installed (installed: {installed}). "
        f"Install one with pip install '{extra}', or pass a Provider instance as Agent(provider=...).",
        provider=name,
    )


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of one agent's pool.

    Attributes:
        open: handles open now.
        waiting: acquirers queued for a handle.
        max_handles: the pool's size.
        total_calls: calls actually sent to the provider (journal replays excluded).
    """

    open: int
    waiting: int
    max_handles: int
    total_calls: int


class _Pool:
    """One agent's capacity limiter, its provider, and its call counter."""

    __slots__ = ("agent", "max_handles", "name", "open", "provider", "timeout", "total_calls", "waiters")

    def __init__(self, name: str, agent: Agent, max_handles: int, timeout: float | None) -> None:
        self.name = name
        self.agent = agent
        self.max_handles = max_handles
        self.timeout = timeout
        self.open = 0
        self.total_calls = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.provider: Provider | None = None if isinstance(agent.provider, str) else agent.provider

    async def wait(self) -> None:
        """Queue until a releaser hands this waiter a token (the contended path)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            if self.timeout is None:
                await fut
            else:
                async with asyncio.timeout(self.timeout):
                    await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                # The token was handed over just as we timed out or were cancelled: on a
                # timeout keep it (we got the handle after all); on a cancel pass it on.
                if isinstance(exc, TimeoutError):
                    return
                self.release()
                raise
            fut.cancel()
            try:
                self.waiters.remove(fut)
            except ValueError:
                pass
            if isinstance(exc, TimeoutError):
                raise PoolTimeoutError(
                    f"agent {self.name!r}: no handle became free within acquire_timeout={self.timeout}s "
                    f"(max_handles={self.max_handles}, all open). Close handles sooner, raise max_handles, "
                    "or raise acquire_timeout."
                ) from None
            raise

    def release(self) -> None:
        # Hand the token to the first live waiter instead of freeing it, so it cannot be
        # taken by a newcomer on the fast path before the waiter wakes up (FIFO fairness).
        waiters = self.waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.open -= 1


class AgentPools:
    """Every agent of a workflow, each with its own pool of ``max_handles`` handles.

    Providers are created lazily, one instance per provider name, and shared by all
    agents that name it, so their HTTP connection pools are reused across handles.

    Args:
        config: what ``Workflow.agents(...)`` recorded.

    Raises:
        WorkflowDefinitionError: ``max_handles`` is below 1.
    """

    def __init__(self, config: AgentsConfig) -> None:
        if config.max_handles < 1:
            raise WorkflowDefinitionError(f"agents: max_handles must be at least 1, got {config.max_handles}")
        self.config = config
        self._pools = {
            name: _Pool(name, agent, config.max_handles, config.acquire_timeout)
            for name, agent in config.agents.items()
        }
        self._providers: dict[str, Provider] = {}

    def accessor(self, journal: AgentJournal) -> AgentAccessor:
        """Make the ``ctx.agents`` of one step execution, journaling through ``journal``."""
        return AgentAccessor(self, journal)

    def statistics(self) -> dict[str, PoolStatistics]:
        """Per agent: open handles, queued acquirers, pool size, provider calls sent."""
        return {
            name: PoolStatistics(pool.open, len(pool.waiters), pool.max_handles, pool.total_calls)
            for name, pool in self._pools.items()
        }

    def _provider(self, pool: _Pool) -> Provider:
        spec = pool.agent.provider
        assert isinstance(spec, str)  # instances are set on the pool at construction
        provider = self._providers.get(spec)
        if provider is None:
            provider = self._providers[spec] = load_provider(spec)
        pool.provider = provider
        return provider

    async def aclose(self) -> None:
        """Close every provider this object created or was given (their HTTP clients)."""
        providers: dict[int, Provider] = {id(p): p for p in self._providers.values()}
        for pool in self._pools.values():
            if not isinstance(pool.agent.provider, str):
                providers[id(pool.agent.provider)] = pool.agent.provider
            elif pool.provider is not None:
                pool.provider = None  # created lazily again if the pools are used after closing
        self._providers.clear()
        first: BaseException | None = None
        for provider in providers.values():
            try:
                await provider.aclose()
            except Exception as exc:  # close the rest before reporting
                first = first or exc
        if first is not None:
            raise first


class AgentAccessor:
    """``ctx.agents``: ``await ctx.agents.writer`` or ``async with ctx.agents["writer"] as w``.

    One accessor serves one step execution; it numbers the handles it opens (for the
    journal keys) and remembers which are still open, so the engine can close leaks.
    """

    __slots__ = ("_journal", "_open", "_pools", "_seqs")

    def __init__(self, pools: AgentPools, journal: AgentJournal) -> None:
        self._pools = pools
        self._journal = journal
        self._open: dict[AgentHandle, None] = {}  # an ordered set
        self._seqs: dict[str, int] = {}

    def __getattr__(self, name: str) -> AgentAcquirer:
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]

    def __getitem__(self, name: str) -> AgentAcquirer:
        pool = self._pools._pools.get(name)
        if pool is None:
            known = ", ".join(sorted(self._pools._pools)) or "none (declare them with Workflow.agents(...))"
            raise AgentflowError(f"unknown agent {name!r}; known agents: {known}")
        return AgentAcquirer(self, pool)

    def __contains__(self, name: object) -> bool:
        return name in self._pools._pools

    def __dir__(self) -> list[str]:
        return [*super().__dir__(), *self._pools._pools]

    @property
    def names(self) -> list[str]:
        """The agents this workflow declares."""
        return list(self._pools._pools)

    async def _acquire(self, pool: _Pool) -> AgentHandle:
        # Number the handle when the acquire starts, not when it completes, so the journal
        # keys do not depend on how long other runs hold the pool.
        seq = self._seqs.get(pool.name, 0) + 1
        self._seqs[pool.name] = seq
        provider = pool.provider or self._pools._provider(pool)
        if pool.open < pool.max_handles and not pool.waiters:
            pool.open += 1
        else:
            await pool.wait()
        handle = AgentHandle(self, pool, provider, seq)
        self._open[handle] = None
        return handle

    async def close_all(self) -> list[str]:
        """Close the handles this accessor opened that are still open (leaks).

        Emits an ``agent_leak`` event on the journal for each one.

        Returns:
            The agent name of every handle it closed, in the order they were opened.
        """
        leaked: list[str] = []
        for handle in list(self._open):
            leaked.append(handle.agent_name)
            self._journal.emit("agent_leak", {"agent": handle.agent_name})
            await handle.close()
        return leaked


class AgentAcquirer:
    """What ``ctx.agents.<name>`` returns: await it for a handle, or use it in ``async with``."""

    __slots__ = ("_accessor", "_handle", "_pool")

    def __init__(self, accessor: AgentAccessor, pool: _Pool) -> None:
        self._accessor = accessor
        self._pool = pool
        self._handle: AgentHandle | None = None

    def __await__(self) -> Generator[Any, None, AgentHandle]:
        return self._accessor._acquire(self._pool).__await__()

    async def __aenter__(self) -> AgentHandle:
        self._handle = await self._accessor._acquire(self._pool)
        return self._handle

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._handle is not None:
            await self._handle.close()


class AgentHandle:
    """An open conversation with one agent, holding one slot of its pool until closed.

    Attributes:
        agent_name: the agent's name in ``Workflow.agents``.
        agent: the :class:`~agentflow.agents.Agent` it talks to.
        last_reply: the latest reply (set after ``send`` and after a finished ``stream``).
    """

    __slots__ = (
        "_accessor",
        "_busy",
        "_calls",
        "_closed",
        "_history",
        "_pool",
        "_provider",
        "_seq",
        "agent",
        "agent_name",
        "last_reply",
    )

    def __init__(self, accessor: AgentAccessor, pool: _Pool, provider: Provider, seq: int) -> None:
        self._accessor = accessor
        self._pool = pool
        self._provider = provider
        self._seq = seq
        self._calls = 0
        self._closed = False
        self._busy = False
        self._history: list[Message] = []
        self.agent_name = pool.name
        self.agent = pool.agent
        self.last_reply: AgentReply | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<AgentHandle {self.agent_name}#{self._seq} {state}, {len(self._history)} messages>"

    @property
    def history(self) -> list[Message]:
        """The conversation so far (a copy); still readable after the handle is closed."""
        return list(self._history)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    async def send(self, prompt: str, **options: Any) -> AgentReply:
        """Send ``prompt`` in this conversation and return the reply.

        Args:
            prompt: the user message.
            **options: ``temperature`` / ``max_tokens`` override the agent's for this
                call; anything else is passed to the provider as a request option.

        Returns:
            The reply; ``reply.output`` holds the validated model when the agent
            declares ``output``.

        Raises:
            BudgetExceededError: the call could pass the run's token budget (not sent).
            ProviderError: the provider refused the call for good.
            OutputValidationError: the structured output stayed invalid after one repair.
        """
        self._begin()
        try:
            request = self._request(prompt, options)
            key = self._next_key()
            raw = await self._complete(key, request)
            return await self._finish(key, request, raw)
        finally:
            self._busy = False

    async def stream(self, prompt: str, **options: Any) -> AsyncIterator[str]:
        """Send ``prompt`` and yield the reply's text deltas as they arrive.

        After the iteration ends, :attr:`last_reply` holds the whole
        :class:`~agentflow.agents.AgentReply`. A journaled (replayed) call yields its
        text as a single delta. Arguments and errors are those of :meth:`send`; for a
        structured-output agent the deltas are the JSON text, and a repair, if needed,
        is made without streaming.
        """
        self._begin()
        try:
            request = self._request(prompt, options)
            key = self._next_key()
            journaled = self._accessor._journal.lookup(key)
            if journaled is not None:
                raw = _reply_from_json(journaled)
                if raw.text:
                    yield raw.text
            else:
                self._check_budget(request)
                final: ProviderReply | None = None
                deltas = self._provider.stream(request)
                try:
                    async for item in deltas:
                        if isinstance(item, ProviderReply):
                            final = item
                        else:
                            yield item
                finally:
                    aclose = getattr(deltas, "aclose", None)
                    if aclose is not None:
                        await aclose()
                if final is None:
                    raise ProviderError(
                        f"agent {self.agent_name!r}: provider {self._provider.name!r} ended its stream "
                        "without a final reply",
                        provider=self._provider.name,
                    )
                raw = final
                await self._journal_reply(key, raw)
            await self._finish(key, request, raw)
        finally:
            self._busy = False

    async def close(self) -> None:
        """Give the handle's slot back to the pool. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        self._accessor._open.pop(self, None)
        self._pool.release()

    async def __aenter__(self) -> AgentHandle:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- internals ---------------------------------------------------------------------

    def _begin(self) -> None:
        if self._closed:
            raise AgentflowError(f"agent handle {self.agent_name!r} is closed; acquire a new one")
        if self._busy:
            raise AgentflowError(
                f"agent handle {self.agent_name!r} already has a call in flight: a handle holds one "
                "conversation, so await each call before the next, or acquire another handle"
            )
        self._busy = True

    def _next_key(self) -> str:
        self._calls += 1
        scope = self._accessor._journal.scope
        return f"agent:{scope}:{self.agent_name}:{self._seq}:{self._calls}"

    def _request(self, prompt: str, options: dict[str, Any]) -> ProviderRequest:
        agent = self.agent
        temperature = options.pop("temperature", agent.temperature)
        max_tokens = options.pop("max_tokens", agent.max_tokens)
        schema = name = None
        if agent.output is not None:
            schema = agent.output.model_json_schema()
            name = agent.output.__name__
        return ProviderRequest(
            model=agent.model,
            messages=(*self._history, Message("user", prompt)),
            instructions=agent.instructions,
            temperature=temperature,
            max_tokens=max_tokens,
            output_schema=schema,
            output_name=name,
            options={**agent.options, **options},
        )

    def _check_budget(self, request: ProviderRequest) -> None:
        budget = self._accessor._pools.config.budget
        if budget is None:
            return
        spent, cap = self._accessor._journal.spent(), request.max_tokens
        if spent >= budget.max_tokens or (cap is not None and spent + cap > budget.max_tokens):
            this_call = f" and this call may use up to {cap}" if cap is not None else ""
            raise BudgetExceededError(
                f"agent {self.agent_name!r}: the run has spent {spent} of its {budget.max_tokens}-token "
                f"budget{this_call}, so the call was not sent"
            )

    async def _complete(self, key: str, request: ProviderRequest) -> ProviderReply:
        journaled = self._accessor._journal.lookup(key)
        if journaled is not None:
            return _reply_from_json(journaled)
        self._check_budget(request)
        raw = await self._provider.complete(request)
        await self._journal_reply(key, raw)
        return raw

    async def _journal_reply(self, key: str, raw: ProviderReply) -> None:
        self._pool.total_calls += 1
        await self._accessor._journal.record(key, _reply_to_json(raw), raw.usage)

    async def _finish(self, key: str, request: ProviderRequest, raw: ProviderReply) -> AgentReply:
        prompt = request.messages[-1]
        self._history += (prompt, Message("assistant", raw.text))
        model = self.agent.output
        if model is None:
            reply = AgentReply(raw.text, None, raw.usage)
        else:
            try:
                output = _validate(model, raw)
                reply = AgentReply(raw.text, output, raw.usage)
            except ValidationError as exc:
                reply = await self._repair(key, request, raw, model, exc)
        self.last_reply = reply
        return reply

    async def _repair(
        self,
        key: str,
        request: ProviderRequest,
        raw: ProviderReply,
        model: type[BaseModel],
        exc: ValidationError,
    ) -> AgentReply:
        ask = Message("user", _REPAIR_PROMPT.format(errors=_errors(exc)))
        messages = (*request.messages, Message("assistant", raw.text), ask)
        fixed = await self._complete(f"{key}:repair", replace(request, messages=messages))
        self._history += (ask, Message("assistant", fixed.text))
        try:
            output = _validate(model, fixed)
        except ValidationError as again:
            raise OutputValidationError(
                f"agent {self.agent_name!r}: the reply does not fit {model.__name__} even after one repair "
                f"attempt: {_errors(again)}"
            ) from again
        return AgentReply(fixed.text, output, raw.usage + fixed.usage)


def _validate(model: type[BaseModel], raw: ProviderReply) -> BaseModel:
    if raw.data is not None:
        return model.model_validate(raw.data)
    return model.model_validate_json(raw.text)


def _errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _reply_to_json(raw: ProviderReply) -> dict[str, Any]:
    return {"text": raw.text, "data": raw.data, "usage": raw.usage.to_json()}


def _reply_from_json(value: Any) -> ProviderReply:
    if isinstance(value, str):  # a store that hands back the JSON text
        value = json.loads(value)
    return ProviderReply(
        text=value.get("text", ""), data=value.get("data"), usage=Usage.from_json(value.get("usage"))
    )
