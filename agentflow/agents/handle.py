"""An agent handle: one open conversation, holding one slot of its agent's pool until closed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from .. import tracing
from ..errors import (
    AgentflowError,
    BudgetExceededError,
    OutputValidationError,
    ProviderError,
)
from ..types import Usage
from .config import AgentReply
from .loop import AgentRun, run_loop, tool_specs
from .spi import Message, Permit, Provider, ProviderReply, ProviderRequest, ToolLike, ToolSpec, ToolUse

if TYPE_CHECKING:
    from .pool import AgentAccessor, _Pool

__all__ = ["AgentHandle"]

_REPAIR_PROMPT = (
    "Your previous reply did not match the required JSON schema. Validation errors:\n{errors}\n"
    "Reply again with only the corrected JSON object."
)


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
            raw = self._replayed(key, request)
            if raw is not None:
                if raw.text:
                    live(raw.text)
                    yield raw.text
            else:
                self._check_budget(request)
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
                await self._journal_reply(key, raw)
            await self._finish(key, request, raw)
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
        permit = await self._turn(request)
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
        raw = self._replayed(key, request)
        if raw is not None:
            if raw.text:
                each(raw.text)
            return raw
        self._check_budget(request)
        final = None
        with tracing.chat(self._provider.name, request.model, self.agent_name) as span:
            async for item in self._provider_stream(request):
                if isinstance(item, ProviderReply):
                    final = item
                else:
                    each(item)
            assert final is not None  # _provider_stream ends with the reply or raises
            tracing.end_chat(span, final.usage, final.model)
        await self._journal_reply(key, final)
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

    def _check_budget(self, request: ProviderRequest) -> None:
        budget = self._accessor._pools.config.budget
        if budget is None:
            return
        journal = self._accessor._journal
        cap = budget.max_tokens
        if cap is not None:
            spent, most = journal.spent(), request.max_tokens
            if spent >= cap or (most is not None and spent + most > cap):
                this_call = f" and this call may use up to {most}" if most is not None else ""
                raise BudgetExceededError(
                    f"agent {self.agent_name!r}: the run has spent {spent} of its {cap}-token "
                    f"budget{this_call}, so the call was not sent"
                )
        if budget.max_cost is not None:
            cost = journal.cost()
            if cost is not None and cost >= budget.max_cost:
                raise BudgetExceededError(
                    f"agent {self.agent_name!r}: the run has spent ${cost} of its ${budget.max_cost} "
                    "budget, so the call was not sent"
                )

    def _replayed(self, key: str, request: ProviderRequest) -> ProviderReply | None:
        """The reply journaled under ``key`` (its usage counted toward the step again), or None."""
        journal = self._accessor._journal
        journaled = journal.lookup(key)
        if journaled is None:
            return None
        raw = _reply_from_json(journaled)
        journal.replayed(raw.usage)
        if tracing.current() is not None:
            tracing.replayed_chat(self._provider.name, request.model, self.agent_name)
        return raw

    async def _complete(self, key: str, request: ProviderRequest) -> ProviderReply:
        raw = self._replayed(key, request)
        if raw is not None:
            return raw
        self._check_budget(request)
        permit = await self._turn(request)
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
        await self._journal_reply(key, raw)
        return raw

    async def _traced(self, request: ProviderRequest) -> ProviderReply:
        """The provider's reply to ``request``, in a ``chat`` span (see :mod:`agentflow.tracing`)."""
        with tracing.chat(self._provider.name, request.model, self.agent_name) as span:
            raw = await self._provider.complete(request)
            tracing.end_chat(span, raw.usage, raw.model)
        return raw

    async def _turn(self, request: ProviderRequest) -> Permit | None:
        """Wait for this request's turn under the agent's ``RateLimit`` (None: no limit).

        A wait is counted in the pool's statistics and recorded on the run as an
        ``agent_throttled`` event: ``{"agent", "seconds", "limit", "key"}``, ``limit``
        being the one waited for longest.
        """
        limit = self.agent.limit
        limiter = self._accessor._pools.limiter
        if limit is None or limiter is None:
            return None
        pool = self._pool
        tokens = _estimate(request) if limit.tokens_per_minute is not None else 0
        permit = await limiter.acquire(pool.limit_key, limit, tokens)
        if permit.waited > 0:
            pool.waited += 1
            pool.wait_seconds += permit.waited
            pool.last_wait = permit.waited
            data = {
                "agent": self.agent_name,
                "seconds": round(permit.waited, 3),
                "limit": permit.reason,
                "key": pool.limit_key,
            }
            self._accessor._journal.emit("agent_throttled", data)
        return permit

    async def _journal_reply(self, key: str, raw: ProviderReply) -> None:
        self._pool.total_calls += 1
        journal = self._accessor._journal
        if self._carry:  # one write: the reply, and the results that came before it
            entries, self._carry = {**self._carry, key: _reply_to_json(raw)}, {}
            await journal.record_many(entries, raw.usage)
        else:
            await journal.record(key, _reply_to_json(raw), raw.usage)

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


def _drop(text: str) -> None:
    """A live delta nobody can receive."""


def _estimate(request: ProviderRequest) -> int:
    """Tokens a request may use, reserved under a ``tokens_per_minute`` limit until its reply
    says: its ``max_tokens``, plus a token per four characters of what it sends."""
    chars = len(request.instructions or "")
    for m in request.messages:
        chars += len(m.content) + sum(len(c.name) + len(c.arguments) for c in m.tool_calls)
    for t in request.tools:
        chars += len(t.name) + len(t.description) + len(json.dumps(t.parameters))
    if request.output_schema is not None:
        chars += len(json.dumps(request.output_schema))
    return chars // 4 + (request.max_tokens or 0)


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
    out: dict[str, Any] = {"text": raw.text, "data": raw.data, "usage": raw.usage.to_json()}
    if raw.tool_calls:
        calls = raw.tool_calls
        out["tool_calls"] = [{"id": c.call_id, "name": c.name, "arguments": c.arguments} for c in calls]
    return out


def _reply_from_json(value: Any) -> ProviderReply:
    if isinstance(value, str):  # a store that hands back the JSON text
        value = json.loads(value)
    calls = tuple(ToolUse(c["id"], c["name"], c["arguments"]) for c in value.get("tool_calls") or ())
    return ProviderReply(
        text=value.get("text", ""),
        data=value.get("data"),
        usage=Usage.from_json(value.get("usage")),
        tool_calls=calls,
    )
