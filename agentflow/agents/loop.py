"""The agent loop: ask the model, run the tools it calls, give it the results, until it answers.

Every model turn and every tool call is journaled, so a step that runs again (a retry,
a recovery after a crash) replays what finished instead of doing it twice:

* a turn's reply is journaled the moment it arrives (as ``send`` journals its reply);
* the reply that asks for tool calls is their *intent*: it is journaled before any of
  them runs;
* the result of a call of a tool that is not ``idempotent`` is journaled the moment it
  finishes; the other results of a turn are journaled together, and all of them before
  the next model request.

A re-run finds a finished call's result and does not run the tool. A call whose intent
was journaled but whose result was not (the process died while it ran) is run again
only if its tool is idempotent; otherwise its outcome is unknown and the step fails with
:class:`~agentflow.errors.ToolOutcomeUnknownError` rather than risk a second payment,
deploy or e-mail.

The model never reaches a tool with bad arguments: a call of an unknown tool, arguments
that are not JSON or fail validation, and a tool's exception go back to the model as a
tool error (its type and message), and count against ``max_turns`` like any turn.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pydantic_core
from pydantic import BaseModel, ValidationError

from ..errors import AgentflowError, MaxTurnsExceeded, ToolOutcomeUnknownError, redact
from ..types import Usage
from .spi import Message, ProviderReply, ProviderRequest, ToolContext, ToolLike, ToolSpec, ToolUse

if TYPE_CHECKING:
    from .handle import AgentHandle

__all__ = ["AgentRun", "ToolCall", "run_loop"]


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
    """

    call_id: str
    name: str
    arguments: Any
    result: Any = None
    error: str | None = None
    duration: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The journaled form."""
        return {
            "id": self.call_id,
            "name": self.name,
            "arguments": self.arguments,
            "result": self.result,
            "error": self.error,
            "duration": self.duration,
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


_REPAIR = (
    "Your final answer does not match the required schema: {errors}. "
    "Answer again with JSON that matches it exactly."
)


def _error_text(exc: BaseException) -> str:
    return redact(f"{type(exc).__name__}: {exc}")


def _as_content(call: ToolCall) -> tuple[str, bool]:
    """The text the model gets for a call: the result (JSON unless a str), or the error."""
    if call.error is not None:
        return call.error, True
    return (call.result if isinstance(call.result, str) else json.dumps(call.result)), False


def _jsonable(tool: ToolLike, value: Any) -> Any:
    """``value`` as JSON data, or a ``TypeError`` naming the tool."""
    try:
        data = pydantic_core.to_jsonable_python(value)
        pydantic_core.to_json(data)
    except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
        raise TypeError(f"tool {tool.name!r} returned a value JSON cannot carry: {exc}") from None
    return data


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


async def run_loop(
    handle: AgentHandle,
    prompt: str,
    max_turns: int,
    output: type[BaseModel] | None,
    complete: Callable[[str, ProviderRequest], Awaitable[ProviderReply]],
    request: Callable[[Sequence[Message], type[BaseModel] | None], ProviderRequest],
    tools: Sequence[ToolLike],
) -> AgentRun:
    """Run the loop for ``handle`` (see the module docstring).

    ``complete(key, request)`` makes (or replays) one model call under a journal key;
    ``request(messages, output)`` builds the provider request for a conversation;
    ``tools`` are the tools the model may call.
    """
    if max_turns < 1:
        raise AgentflowError(f"agent {handle.agent_name!r}: max_turns must be at least 1, got {max_turns}")
    journal = handle._accessor._journal
    by_name: dict[str, ToolLike] = {t.name: t for t in tools}
    base = handle._next_key()
    messages: list[Message] = [*handle._history, Message("user", prompt)]
    calls: list[ToolCall] = []
    usage = Usage()
    turn = 0
    while True:
        if turn >= max_turns:
            raise MaxTurnsExceeded(
                f"run {journal.run_id}, step {journal.step_name!r}: agent {handle.agent_name!r} made "
                f"{turn} model calls (max_turns={max_turns}) without a final answer",
            )
        turn += 1
        keys = _Turn(f"{base}:t{turn}")
        keys.replayed = journal.lookup(keys.reply) is not None
        reply = await complete(keys.reply, request(messages, output))
        usage = usage + reply.usage
        if not reply.tool_calls:
            messages.append(Message("assistant", reply.text))
            if output is None:
                handle._history = messages
                return AgentRun(reply.text, None, usage, tuple(calls), turn)
            try:
                value = output.model_validate(reply.data) if reply.data is not None else None
                if value is None:
                    value = output.model_validate_json(reply.text)
            except ValidationError as exc:
                details = "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or '(answer)'}: {e['msg']}" for e in exc.errors()
                )
                messages.append(Message("user", _REPAIR.format(errors=details)))
                continue
            handle._history = messages
            return AgentRun(reply.text, value, usage, tuple(calls), turn)
        messages.append(Message("assistant", reply.text, tool_calls=reply.tool_calls))
        if turn >= max_turns:
            raise MaxTurnsExceeded(
                f"run {journal.run_id}, step {journal.step_name!r}: agent {handle.agent_name!r} still "
                f"called tools at its last allowed model call (max_turns={max_turns})"
            )
        done = await _run_calls(handle, keys, reply.tool_calls, by_name)
        calls += done
        for use, call in zip(reply.tool_calls, done, strict=True):
            content, is_error = _as_content(call)
            messages.append(Message("tool", content, call_id=use.call_id, is_error=is_error))


async def _run_calls(
    handle: AgentHandle, keys: _Turn, uses: Sequence[ToolUse], tools: Mapping[str, ToolLike]
) -> list[ToolCall]:
    """Run (or replay) one turn's calls concurrently, journaling their results (see the module doc)."""
    journal = handle._accessor._journal
    results: list[ToolCall | None] = [None] * len(uses)
    unjournaled: dict[str, Any] = {}  # results that ride in the turn's last write
    runs: list[tuple[int, ToolUse, ToolLike, BaseModel]] = []
    for i, use in enumerate(uses):
        found = journal.lookup(keys.call(use.call_id))
        if found is not None:
            results[i] = ToolCall.from_json(found)
            continue
        tool = tools.get(use.name)
        error = None
        if tool is None:
            known = ", ".join(sorted(tools)) or "none"
            error = f"UnknownTool: no tool named {use.name!r}; tools: {known}"
        else:
            try:
                args = tool.validate(use.arguments)
            except AgentflowError as exc:  # InvalidInputError: the model is told, the tool is not run
                error = f"InvalidArguments: {exc}"
        if error is not None or tool is None:
            call = ToolCall(use.call_id, use.name, use.arguments, None, error)
            journal.emit("tool_failed", {"call_id": use.call_id, "tool": use.name, "error": error})
            results[i] = call
            unjournaled[keys.call(use.call_id)] = call.to_json()
            continue
        if getattr(tool, "approval", None) is not None:
            # Never run a call that must be approved without its approval.
            raise AgentflowError(
                f"run {journal.run_id}, step {journal.step_name!r}: tool {tool.name!r} needs an approval "
                "for each call, and parking a run on a tool call's approval is not available yet; "
                "nothing was run"
            )
        if not tool.idempotent and keys.replayed:
            # The reply that asked for this call was journaled before it could run (it is
            # the call's intent); no result was: it may have run, or not.
            raise ToolOutcomeUnknownError(
                f"run {journal.run_id}, step {journal.step_name!r}: agent {handle.agent_name!r}'s call "
                f"{use.call_id} of tool {tool.name!r} may have run before the process stopped, and "
                "its outcome is unknown; it is not idempotent, so it is not run again "
                f"(idempotency key {_idempotency_key(journal.run_id, keys, use)})",
                tool=tool.name,
                call_id=use.call_id,
            )
        runs.append((i, use, tool, args))

    async def one(i: int, use: ToolUse, tool: ToolLike, args: BaseModel) -> None:
        call = await _execute(handle, keys, use, tool, args)
        results[i] = call
        if tool.idempotent:
            unjournaled[keys.call(use.call_id)] = call.to_json()
        else:  # at once: a sibling still running when the process dies must not hide it
            await journal.record(keys.call(use.call_id), call.to_json(), Usage())

    async with asyncio.TaskGroup() as tg:
        for i, use, tool, args in runs:
            tg.create_task(one(i, use, tool, args))
    if unjournaled:
        await journal.record_many(unjournaled, Usage())
    return [r for r in results if r is not None]


def _idempotency_key(run_id: str, keys: _Turn, use: ToolUse) -> str:
    return f"{run_id}/{keys.base}/{use.call_id}"


async def _execute(
    handle: AgentHandle, keys: _Turn, use: ToolUse, tool: ToolLike, args: BaseModel
) -> ToolCall:
    """Run one tool call (with its timeout and retries); its failure becomes the call's error."""
    journal = handle._accessor._journal
    arguments = args.model_dump(mode="json")
    ctx = ToolContext(
        journal.run_id,
        journal.step_name,
        handle.agent_name,
        use.call_id,
        _idempotency_key(journal.run_id, keys, use),
        emit=lambda kind, data: journal.emit(kind, data),
    )
    kwargs = tool.keywords(args)
    journal.emit("tool_started", {"call_id": use.call_id, "tool": tool.name, "arguments": arguments})
    started = time.perf_counter()

    async def attempt() -> Any:
        fn = tool.fn
        if tool.is_async:
            coro = fn(ctx, **kwargs) if tool.takes_context else fn(**kwargs)
        elif tool.timeout is None:
            # A sync tool is called inline, as a sync step is: cheap code needs no thread.
            return fn(ctx, **kwargs) if tool.takes_context else fn(**kwargs)
        else:  # with a timeout it runs in a worker thread, so the timeout can be kept
            coro = asyncio.to_thread(lambda: fn(ctx, **kwargs) if tool.takes_context else fn(**kwargs))
        async with asyncio.timeout(tool.timeout):
            return await coro

    try:
        if tool.retry is None:
            value = await attempt()
        else:
            value = None
            async for trying in tool.retry.retrying():
                with trying:
                    ctx.attempt = trying.retry_state.attempt_number
                    value = await attempt()
        result = _jsonable(tool, value)
    except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        error = _error_text(exc)
        duration = time.perf_counter() - started
        journal.emit(
            "tool_failed", {"call_id": use.call_id, "tool": tool.name, "error": error, "duration": duration}
        )
        return ToolCall(use.call_id, tool.name, arguments, None, error, duration)
    duration = time.perf_counter() - started
    journal.emit("tool_completed", {"call_id": use.call_id, "tool": tool.name, "duration": duration})
    return ToolCall(use.call_id, tool.name, arguments, result, None, duration)


def tool_specs(tools: Sequence[ToolLike]) -> tuple[ToolSpec, ...]:
    """The specs a provider shows the model."""
    return tuple(ToolSpec(**t.spec()) for t in tools)
