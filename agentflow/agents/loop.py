"""The agent loop: ask the model, run the tools it calls, give it the results, until it answers.

Every model turn and every tool call is journaled, so a step that runs again (a retry,
a recovery after a crash) replays what finished instead of doing it twice:

* a turn's reply is journaled the moment it arrives (as ``send`` journals its reply);
* the reply that asks for tool calls is their *intent*: it is journaled before any of
  them runs;
* the result of a call of a tool that is not ``idempotent`` is journaled the moment it
  finishes; the other results of a turn ride in the write of the next model reply (a
  crash before it runs those idempotent tools again, and calls the model again, as it
  would have anyway): a turn costs one write, plus one per call that is not idempotent.

A re-run finds a finished call's result and does not run the tool. A call whose intent
was journaled but whose result was not (the process died while it ran) is run again
only if its tool is idempotent; otherwise its outcome is unknown, and rather than risk a
second payment, deploy or e-mail the run parks on a ``tool_outcome`` approval (approve:
run it again; respond: here is what it returned; reject: the model is told it failed).

A call of a tool with ``approval=`` parks the run on a ``tool_call`` approval, bound to
the call and the digest of its arguments; the turn's other calls run and are journaled
first. The step runs again on the decision: the approved call runs (with a reviewer's
edited arguments, which the model is told of), a rejection's reason or a reviewer's
response goes to the model instead. A decision started on is journaled (``go`` markers)
before a call that is not idempotent runs, so a crash during it is an unknown outcome
again, never a second blind run.

The model never reaches a tool with bad arguments: a call of an unknown tool, arguments
that are not JSON or fail validation, and a tool's exception go back to the model as a
tool error (its type and message), and count against ``max_turns`` like any turn.

The loop's records (:class:`ToolCall`, :class:`AgentRun`, the journal keys of a turn) are
in :mod:`agentflow.agents.turns`; what becomes of a call that has no journaled result
(it runs, waits for an approval, or takes a reviewer's answer) is decided in
:mod:`agentflow.agents.tool_gates`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pydantic_core
from pydantic import BaseModel, ValidationError

from .. import tracing
from ..errors import AgentflowError, MaxTurnsExceeded, redact
from ..types import Usage
from .spi import Message, ProviderReply, ProviderRequest, ToolContext, ToolLike, ToolSpec, ToolUse
from .tool_gates import _Ask, _Go, _plan
from .turns import AgentRun, ToolCall, _idempotency_key, _Turn

if TYPE_CHECKING:
    from .handle import AgentHandle

__all__ = ["AgentRun", "ToolCall", "run_loop"]


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
    content = call.result if isinstance(call.result, str) else json.dumps(call.result)
    if call.edited:
        edit = json.dumps(call.arguments)
        content = f"(A reviewer edited this call's arguments before it ran; it ran with {edit}.)\n{content}"
    return content, False


def _jsonable(tool: ToolLike, value: Any) -> Any:
    """``value`` as JSON data, or a ``TypeError`` naming the tool."""
    try:
        data = pydantic_core.to_jsonable_python(value)
        pydantic_core.to_json(data)
    except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
        raise TypeError(f"tool {tool.name!r} returned a value JSON cannot carry: {exc}") from None
    return data


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
    said: list[str] = []  # the model's text so far, shown to a reviewer of a call
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
        if reply.text:
            said.append(reply.text)
        if turn >= max_turns:
            raise MaxTurnsExceeded(
                f"run {journal.run_id}, step {journal.step_name!r}: agent {handle.agent_name!r} still "
                f"called tools at its last allowed model call (max_turns={max_turns})"
            )
        done = await _run_calls(handle, keys, reply.tool_calls, by_name, "\n\n".join(said))
        calls += done
        for use, call in zip(reply.tool_calls, done, strict=True):
            content, is_error = _as_content(call)
            messages.append(Message("tool", content, call_id=use.call_id, is_error=is_error))


async def _run_calls(
    handle: AgentHandle, keys: _Turn, uses: Sequence[ToolUse], tools: Mapping[str, ToolLike], text: str
) -> list[ToolCall]:
    """Run (or replay) one turn's calls concurrently, journaling their results (see the module doc).

    Calls that wait for a decision (an approval, or an unknown outcome's) are asked for
    once the others have run and been journaled: the run parks and the step runs again
    when they are decided (``text`` is the model's text so far, shown to the reviewer).
    """
    journal = handle._accessor._journal
    results: list[ToolCall | None] = [None] * len(uses)
    unjournaled: dict[str, Any] = {}  # results that ride in the turn's last write
    markers: dict[str, Any] = {}  # attempts started on a decision: journaled before they run
    runs: list[tuple[int, ToolUse, ToolLike, _Go]] = []
    asks: list[tuple[str, dict[str, Any]]] = []
    for i, use in enumerate(uses):
        found = journal.lookup(keys.call(use.call_id))
        tool = tools.get(use.name)
        if found is not None:
            results[i] = ToolCall.from_json(found)
            if tracing.current() is not None:
                tracing.replayed_tool(use.name, use.call_id, tool is not None and tool.idempotent)
            continue
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
        plan = _plan(handle, keys, use, tool, args, text)
        if isinstance(plan, ToolCall):  # decided without running: rejected, answered, timed out
            results[i] = plan
            unjournaled[keys.call(use.call_id)] = plan.to_json()
        elif isinstance(plan, _Ask):
            asks.append((plan.key, plan.what))
        else:
            if plan.marker is not None:
                markers[plan.marker] = {"approval": plan.approval}
            runs.append((i, use, tool, plan))

    if markers:
        await journal.record_many(markers, Usage())

    async def one(i: int, use: ToolUse, tool: ToolLike, go: _Go) -> None:
        call = await _execute(handle, keys, use, tool, go)
        results[i] = call
        if tool.idempotent:
            unjournaled[keys.call(use.call_id)] = call.to_json()
        else:  # at once: a sibling still running when the process dies must not hide it
            await journal.record(keys.call(use.call_id), call.to_json(), Usage())

    async with asyncio.TaskGroup() as tg:
        for i, use, tool, go in runs:
            tg.create_task(one(i, use, tool, go))
    # These results need no write of their own: they ride in the write of the next reply
    # (a crash before it re-runs only idempotent tools and calls settled by a decision,
    # which give the same answer again), or of the park.
    handle._carry.update(unjournaled)
    if asks:
        carried, handle._carry = handle._carry, {}
        if carried:
            await journal.record_many(carried, Usage())
        await journal.wait_for(asks)  # parks the run: the step runs again once decided
    return [r for r in results if r is not None]


async def _execute(handle: AgentHandle, keys: _Turn, use: ToolUse, tool: ToolLike, go: _Go) -> ToolCall:
    """Run one tool call (with its timeout and retries); its failure becomes the call's error."""
    journal = handle._accessor._journal
    args = go.args
    arguments = args.model_dump(mode="json")
    ctx = ToolContext(
        journal.run_id,
        journal.step_name,
        handle.agent_name,
        use.call_id,
        _idempotency_key(journal.run_id, keys, use),
        attempt=go.attempt,
        decision=go.decision,
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

    span = tracing.tool(tool.name, use.call_id, tool.idempotent) if tracing.current() is not None else None
    try:
        if tool.retry is None:
            value = await attempt()
        else:
            value = None
            async for trying in tool.retry.retrying():
                with trying:
                    ctx.attempt = go.attempt + trying.retry_state.attempt_number - 1
                    value = await attempt()
        result = _jsonable(tool, value)
    except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        if span is not None:
            span.end("Cancelled: the call was cut off")
        raise
    except Exception as exc:
        error = _error_text(exc)
        if span is not None:
            span.end(error)
        duration = time.perf_counter() - started
        journal.emit(
            "tool_failed", {"call_id": use.call_id, "tool": tool.name, "error": error, "duration": duration}
        )
        return ToolCall(use.call_id, tool.name, arguments, None, error, duration, go.edited)
    if span is not None:
        span.end()
    duration = time.perf_counter() - started
    journal.emit("tool_completed", {"call_id": use.call_id, "tool": tool.name, "duration": duration})
    return ToolCall(use.call_id, tool.name, arguments, result, None, duration, go.edited)


def tool_specs(tools: Sequence[ToolLike]) -> tuple[ToolSpec, ...]:
    """The specs a provider shows the model."""
    return tuple(ToolSpec(**t.spec()) for t in tools)
