"""An agent handle: one open conversation, holding one slot of its agent's pool until closed.

Each model call of a handle is answered from the journal when it finished before, and
otherwise held to the run's budget and the agent's rate limit (:mod:`agentflow.agents.limits`),
sent, and journaled before it is returned (:mod:`agentflow.agents.replies`, which also fits
a structured reply to the agent's ``output``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from .. import tracing
from ..errors import AgentflowError, ProviderError
from . import limits, replies
from .config import AgentReply
from .loop import AgentRun, run_loop, tool_specs
from .spi import Message, Provider, ProviderReply, ProviderRequest, ToolLike, ToolSpec

if TYPE_CHECKING:
    from .pool import AgentAccessor, _Pool

__all__ = ["AgentHandle"]


class AgentHandle:
    """An open conversation with one agent, holding one slot of its pool until closed.

    Attributes:
        agent_name: the agent's name in ``Workflow.agents``.
        agent: the :class:`~agentflow.agents.Agent` it talks to.
        last_reply: the latest reply (set after ``send`` and after a finished ``stream``).
        last_run: the latest agent loop's :class:`AgentRun` (after ``run``, or ``stream`` with tools).
    """

    __slots__ = (
        "_accessor",
        "_busy",
        "_calls",
        "_carry",
        "_closed",
        "_history",
        "_pool",
        "_provider",
        "_seq",
        "agent",
        "agent_name",
        "last_reply",
        "last_run",
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
        # Journal entries that ride in the next reply's write (a loop's idempotent results).
        self._carry: dict[str, Any] = {}
        self.agent_name = pool.name
        self.agent = pool.agent
        self.last_reply: AgentReply | None = None
        self.last_run: AgentRun | None = None

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
            return await replies.finish(self, key, request, raw)
        finally:
            self._busy = False

    async def stream(self, prompt: str, **options: Any) -> AsyncIterator[str]:
        """Send ``prompt`` and yield the reply's text deltas as they arrive.

        After the iteration ends, :attr:`last_reply` holds the whole
        :class:`~agentflow.agents.AgentReply`. A journaled (replayed) call yields its
        text as a single delta. Arguments and errors are those of :meth:`send`; for a
        structured-output agent the deltas are the JSON text, and a repair, if needed,
        is made without streaming.
        With tools (``Agent(tools=...)``) it streams the agent loop of :meth:`run`: the
        text deltas of every model turn (``max_turns`` and ``output`` as for ``run``), and
        :attr:`last_run` holds the :class:`AgentRun` afterwards.
        """
        if self.agent.tools:
            async for delta in self._stream_loop(prompt, options):
                yield delta
            return
        self._begin()
        try:
            request = self._request(prompt, options)
            key = self._next_key()
            live = self._live(key)
            raw = replies.replayed(self, key, request)
            if raw is not None:
                if raw.text:
                    live(raw.text)
                    yield raw.text
            else:
                limits.check_budget(self, request)
                final = None
                # Not the current span: this generator yields to its caller inside it.
                with tracing.chat(self._provider.name, request.model, self.agent_name, current=False) as span:
                    async for item in self._provider_stream(request):
                        if isinstance(item, ProviderReply):
                            final = item
                        else:
                            live(item)
                            yield item
                    assert final is not None  # _provider_stream ends with the reply or raises
                    tracing.end_chat(span, final.usage, final.model)
                raw = final
                await replies.record(self, key, raw)
            await replies.finish(self, key, request, raw)
        finally:
            self._busy = False

    async def run(
        self, prompt: str, max_turns: int = 10, output: type[BaseModel] | None = None, **options: Any
    ) -> AgentRun:
        """Run the agent loop: the model calls the agent's tools until it answers (see ``agents.loop``).

        Args:
            prompt: the user message that starts the loop.
            max_turns: model calls allowed (a turn is one call, with the tool calls it asks for).
            output: a pydantic model the final answer must fit (default: the agent's ``output``).
            **options: as for :meth:`send`, for every model call of the loop.

        Raises:
            MaxTurnsExceeded: no final answer within ``max_turns`` calls (names run, step, agent).
            BudgetExceededError, ProviderError: as for :meth:`send`.

        A call that must wait for a reviewer (its tool has ``approval=``, or it may have
        run before a crash and its tool is not idempotent) parks the run; the step runs
        again once it is decided, and this call returns then.

        While someone in this process watches the run (``RunHandle.events()``), each model
        call is streamed and its text deltas reach the watchers as ``agent_delta`` events;
        with nobody watching, calls are not streamed.
        """
        self._begin()
        try:
            return await self._loop(prompt, max_turns, output, options, self._complete_watched)
        finally:
            self._busy = False

    async def _loop(
        self,
        prompt: str,
        max_turns: int,
        output: type[BaseModel] | None,
        options: dict[str, Any],
        complete: Callable[[str, ProviderRequest], Awaitable[ProviderReply]],
    ) -> AgentRun:
        tools = await self._tools()
        specs = tool_specs(tools)
        model = output if output is not None else self.agent.output

        def request(messages: Sequence[Message], out: type[BaseModel] | None) -> ProviderRequest:
            return self._build(messages, out, options, specs)

        result = await run_loop(self, prompt, max_turns, model, complete, request, tools)
        self.last_reply = AgentReply(result.text, result.output, result.usage)
        self.last_run = result
        return result

    async def _provider_stream(self, request: ProviderRequest) -> AsyncIterator[str | ProviderReply]:
        """The provider's stream of ``request``: text deltas, then the whole reply.

        The provider's stream is closed however the caller stops. One that ends without
        its reply raises :class:`ProviderError`. Under a rate limit it starts once its
        turn came, and gives the turn back when it ends.
        """
        permit = await limits.turn(self, request)
        stream = self._provider.stream(request)
        ended = False
        used: int | None = None
        try:
            async for item in stream:
                if isinstance(item, ProviderReply):
                    ended, used = True, item.usage.total_tokens
                yield item
        finally:
            try:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                if permit is not None:
                    await permit.release(used)
        if not ended:
            raise ProviderError(
                f"agent {self.agent_name!r}: provider {self._provider.name!r} ended its stream "
                "without a final reply",
                provider=self._provider.name,
            )

    async def _streamed(
        self, key: str, request: ProviderRequest, each: Callable[[str], None]
    ) -> ProviderReply:
        """A model call of a loop, streamed: ``each`` gets its text deltas (a replayed one's text whole)."""
        raw = replies.replayed(self, key, request)
        if raw is not None:
            if raw.text:
                each(raw.text)
            return raw
        limits.check_budget(self, request)
        final = None
        with tracing.chat(self._provider.name, request.model, self.agent_name) as span:
            async for item in self._provider_stream(request):
                if isinstance(item, ProviderReply):
                    final = item
                else:
                    each(item)
            assert final is not None  # _provider_stream ends with the reply or raises
            tracing.end_chat(span, final.usage, final.model)
        await replies.record(self, key, final)
        return final

    def _complete_watched(self, key: str, request: ProviderRequest) -> Awaitable[ProviderReply]:
        """A model call of ``run``: streamed while someone here watches the run, its deltas sent live.

        Nobody watching, it is not streamed: a stream costs the client more CPU than one
        reply, for deltas nobody would see.
        """
        if getattr(self._accessor._journal, "watched", False):
            return self._streamed(key, request, self._live(key))
        return self._complete(key, request)

    def _live(self, key: str) -> Callable[[str], None]:
        """What hands a text delta of the model call ``key`` to the run's live watchers.

        An ``agent_delta`` event: ``{"agent", "call": key, "text"}``, never stored; a
        journal without live events (``AgentJournal.live`` is optional) drops it.
        """
        live = getattr(self._accessor._journal, "live", None)
        if live is None:
            return _drop
        agent = self.agent_name

        def delta(text: str) -> None:
            live("agent_delta", {"agent": agent, "call": key, "text": text})

        return delta

    async def _stream_loop(self, prompt: str, options: dict[str, Any]) -> AsyncIterator[str]:
        """The agent loop, yielding the text deltas of each model turn as they arrive."""
        max_turns = int(options.pop("max_turns", 10))
        output = options.pop("output", None)
        deltas: asyncio.Queue[str | None] = asyncio.Queue()

        async def complete(key: str, request: ProviderRequest) -> ProviderReply:
            live = self._live(key)

            def each(text: str) -> None:
                deltas.put_nowait(text)
                live(text)

            return await self._streamed(key, request, each)

        self._begin()
        try:
            task = asyncio.ensure_future(self._loop(prompt, max_turns, output, options, complete))
            task.add_done_callback(lambda _: deltas.put_nowait(None))
            try:
                while (delta := await deltas.get()) is not None:
                    yield delta
                await task  # the loop's error, if it failed
            finally:
                if not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
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

    async def _tools(self) -> tuple[ToolLike, ...]:
        """The tools the model may call in a loop of this handle (MCP servers' tools listed in)."""
        return await self._accessor._pools.tools(self.agent_name)

    def _next_key(self) -> str:
        self._calls += 1
        scope = self._accessor._journal.scope
        return f"agent:{scope}:{self.agent_name}:{self._seq}:{self._calls}"

    def _request(self, prompt: str, options: dict[str, Any]) -> ProviderRequest:
        return self._build((*self._history, Message("user", prompt)), self.agent.output, options)

    def _build(
        self,
        messages: Sequence[Message],
        output: type[BaseModel] | None,
        options: dict[str, Any],
        tools: tuple[ToolSpec, ...] = (),
    ) -> ProviderRequest:
        agent = self.agent
        options = dict(options)
        temperature = options.pop("temperature", agent.temperature)
        max_tokens = options.pop("max_tokens", agent.max_tokens)
        schema = name = None
        if output is not None:
            schema = output.model_json_schema()
            name = output.__name__
        return ProviderRequest(
            model=agent.model,
            messages=tuple(messages),
            instructions=agent.instructions,
            temperature=temperature,
            max_tokens=max_tokens,
            output_schema=schema,
            output_name=name,
            options={**agent.options, **options},
            tools=tools,
        )

    async def _complete(self, key: str, request: ProviderRequest) -> ProviderReply:
        raw = replies.replayed(self, key, request)
        if raw is not None:
            return raw
        limits.check_budget(self, request)
        permit = await limits.turn(self, request)
        try:
            if tracing.current() is None:
                raw = await self._provider.complete(request)
            else:
                raw = await self._traced(request)
        except BaseException:
            if permit is not None:
                await permit.release(None)  # it may have been billed: its reservation stays
            raise
        if permit is not None:
            await permit.release(raw.usage.total_tokens)
        await replies.record(self, key, raw)
        return raw

    async def _traced(self, request: ProviderRequest) -> ProviderReply:
        """The provider's reply to ``request``, in a ``chat`` span (see :mod:`agentflow.tracing`)."""
        with tracing.chat(self._provider.name, request.model, self.agent_name) as span:
            raw = await self._provider.complete(request)
            tracing.end_chat(span, raw.usage, raw.model)
        return raw


def _drop(text: str) -> None:
    """A live delta nobody can receive."""
