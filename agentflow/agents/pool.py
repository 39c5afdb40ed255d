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

An agent with ``limit=RateLimit(...)`` asks the pools' :class:`~agentflow.agents.spi.Limiter`
(given by the runtime) for a turn before each model request; the waits are counted
in :class:`PoolStatistics`. Pools made without a limiter enforce no limit.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import TracebackType
from typing import Any, cast

from ..errors import (
    AgentflowError,
    PoolTimeoutError,
    ProviderError,
    WorkflowDefinitionError,
)
from .config import Agent, AgentsConfig
from .handle import AgentHandle
from .mcp import MCPConnection, MCPServer
from .spi import AgentJournal, Limiter, Provider, ToolLike

__all__ = [
    "PROVIDER_GROUP",
    "AgentAccessor",
    "AgentAcquirer",
    "AgentHandle",
    "AgentPools",
    "PoolStatistics",
    "limit_key",
    "load_provider",
]

#: Entry-point group under which provider distributions register their provider class.
PROVIDER_GROUP = "agentflow.providers"

_EXTRAS = {"openai": "agentflow[openai]", "anthropic": "agentflow[anthropic]"}


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


def limit_key(name: str, agent: Agent) -> str:
    """The name of agent ``name``'s rate limit in the store: its ``RateLimit.key``, else
    ``<provider>:<model>:<agent>`` (so each agent has its own)."""
    if agent.limit is not None and agent.limit.key is not None:
        return agent.limit.key
    provider = agent.provider if isinstance(agent.provider, str) else agent.provider.name
    return f"{provider}:{agent.model}:{name}"


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of one agent's pool.

    Attributes:
        open: handles open now.
        waiting: acquirers queued for a handle.
        max_handles: the pool's size.
        total_calls: calls actually sent to the provider (journal replays excluded).
        waited: calls that waited for a turn of the agent's ``RateLimit``.
        wait_seconds: the seconds they waited, in all.
        last_wait: the seconds the latest of them waited (0.0 before any).
    """

    open: int
    waiting: int
    max_handles: int
    total_calls: int
    waited: int = 0
    wait_seconds: float = 0.0
    last_wait: float = 0.0


class _Pool:
    """One agent's capacity limiter, its provider, and its call counter."""

    __slots__ = (
        "agent",
        "last_wait",
        "limit_key",
        "max_handles",
        "name",
        "open",
        "provider",
        "timeout",
        "total_calls",
        "wait_seconds",
        "waited",
        "waiters",
    )

    def __init__(self, name: str, agent: Agent, max_handles: int, timeout: float | None) -> None:
        self.name = name
        self.agent = agent
        self.max_handles = max_handles
        self.timeout = timeout
        self.open = 0
        self.total_calls = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.provider: Provider | None = None if isinstance(agent.provider, str) else agent.provider
        self.waited = 0
        self.wait_seconds = 0.0
        self.last_wait = 0.0
        self.limit_key = limit_key(name, agent)

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
    agents that name it, so their HTTP connection pools are reused across handles. So
    are MCP servers' sessions: one per :class:`MCPServer`, connected when a loop first
    needs its tools, and closed with the pools.

    Args:
        config: what ``Workflow.agents(...)`` recorded.
        limiter: what gives the calls of agents with a ``RateLimit`` their turns (the
            runtime's, over the store); None enforces no limit.

    Raises:
        WorkflowDefinitionError: ``max_handles`` is below 1.
    """

    def __init__(self, config: AgentsConfig, limiter: Limiter | None = None) -> None:
        if config.max_handles < 1:
            raise WorkflowDefinitionError(f"agents: max_handles must be at least 1, got {config.max_handles}")
        self.config = config
        self.limiter = limiter
        self._pools = {
            name: _Pool(name, agent, config.max_handles, config.acquire_timeout)
            for name, agent in config.agents.items()
        }
        self._providers: dict[str, Provider] = {}
        self._mcp: dict[MCPServer, MCPConnection] = {}

    def accessor(self, journal: AgentJournal) -> AgentAccessor:
        """Make the ``ctx.agents`` of one step execution, journaling through ``journal``."""
        return AgentAccessor(self, journal)

    def statistics(self) -> dict[str, PoolStatistics]:
        """Per agent: open handles, queued acquirers, pool size, provider calls sent, rate-limit waits."""
        return {
            name: PoolStatistics(
                pool.open,
                len(pool.waiters),
                pool.max_handles,
                pool.total_calls,
                pool.waited,
                pool.wait_seconds,
                pool.last_wait,
            )
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

    async def tools(self, name: str) -> tuple[ToolLike, ...]:
        """The tools agent ``name``'s loops may call: its own, and those its MCP servers list.

        A server is connected (and its tools listed) once, on the first call that needs it.

        Raises:
            WorkflowDefinitionError: two of the tools share a name (names both sources),
                or an MCP server's ``approval``/``idempotent`` name a tool it does not have.
            AgentflowError: an MCP server could not be started or reached (names it).
        """
        agent = self._pools[name].agent
        if not any(isinstance(t, MCPServer) for t in agent.tools):
            return cast(tuple[ToolLike, ...], agent.tools)  # no MCPServer among them
        tools: list[ToolLike] = []
        source: dict[str, str] = {}
        for entry in agent.tools:
            if isinstance(entry, MCPServer):
                connection = self._mcp.get(entry)
                if connection is None:
                    connection = self._mcp[entry] = MCPConnection(entry)
                found: tuple[ToolLike, ...] = await connection.tools()
                where = f"MCP server {entry.name!r}"
            else:
                found, where = (entry,), "the agent's own tools"
            for t in found:
                if t.name in source:
                    raise WorkflowDefinitionError(
                        f"agent {name!r}: tool {t.name!r} of {where} has the name of tool {t.name!r} of "
                        f"{source[t.name]}; the model could not tell them apart (rename one, or leave "
                        "one server out)"
                    )
                source[t.name] = where
                tools.append(t)
        return tuple(tools)

    async def aclose(self) -> None:
        """Close every provider this object created or was given (their HTTP clients), and MCP sessions."""
        connections = list(self._mcp.values())
        self._mcp.clear()
        providers: dict[int, Provider] = {id(p): p for p in self._providers.values()}
        for pool in self._pools.values():
            if not isinstance(pool.agent.provider, str):
                providers[id(pool.agent.provider)] = pool.agent.provider
            elif pool.provider is not None:
                pool.provider = None  # created lazily again if the pools are used after closing
        self._providers.clear()
        first: BaseException | None = None
        for connection in connections:
            try:
                await connection.aclose()
            except Exception as exc:  # close the rest before reporting
                first = first or exc
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
