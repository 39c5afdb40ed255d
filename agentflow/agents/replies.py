"""A model reply in a handle's journal, and a structured reply fitted to the agent's output.

A reply is journaled (``record``) under the call's key before the handle returns it, in
the form ``_reply_to_json`` writes (text, data, usage, tool calls); ``replayed`` reads it
back on a step that runs again, its usage counted toward the step once more. ``finish``
validates a reply into the agent's ``output`` model and, when it does not fit, asks the
model once to repair it (a call journaled under ``{key}:repair``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from .. import tracing
from ..errors import OutputValidationError
from ..types import Usage
from .config import AgentReply
from .spi import Message, ProviderReply, ProviderRequest, ToolUse

if TYPE_CHECKING:
    from .handle import AgentHandle

__all__ = ["finish", "record", "repair", "replayed"]

_REPAIR_PROMPT = (
    "Your previous reply did not match the required JSON schema. Validation errors:\n{errors}\n"
    "Reply again with only the corrected JSON object."
)


def replayed(handle: AgentHandle, key: str, request: ProviderRequest) -> ProviderReply | None:
    """The reply journaled under ``key`` (its usage counted toward the step again), or None."""
    journal = handle._accessor._journal
    journaled = journal.lookup(key)
    if journaled is None:
        return None
    raw = _reply_from_json(journaled)
    journal.replayed(raw.usage)
    if tracing.current() is not None:
        tracing.replayed_chat(handle._provider.name, request.model, handle.agent_name)
    return raw


async def record(handle: AgentHandle, key: str, raw: ProviderReply) -> None:
    """Journal ``raw`` under ``key``, with the results that ride in its write (``handle._carry``)."""
    handle._pool.total_calls += 1
    journal = handle._accessor._journal
    if handle._carry:  # one write: the reply, and the results that came before it
        entries, handle._carry = {**handle._carry, key: _reply_to_json(raw)}, {}
        await journal.record_many(entries, raw.usage)
    else:
        await journal.record(key, _reply_to_json(raw), raw.usage)


async def finish(handle: AgentHandle, key: str, request: ProviderRequest, raw: ProviderReply) -> AgentReply:
    """The reply to ``request``: its output validated (repaired once if need be), in the history."""
    prompt = request.messages[-1]
    handle._history += (prompt, Message("assistant", raw.text))
    model = handle.agent.output
    if model is None:
        reply = AgentReply(raw.text, None, raw.usage)
    else:
        try:
            output = _validate(model, raw)
            reply = AgentReply(raw.text, output, raw.usage)
        except ValidationError as exc:
            reply = await repair(handle, key, request, raw, model, exc)
    handle.last_reply = reply
    return reply


async def repair(
    handle: AgentHandle,
    key: str,
    request: ProviderRequest,
    raw: ProviderReply,
    model: type[BaseModel],
    exc: ValidationError,
) -> AgentReply:
    """Ask once for a reply that fits ``model``; the repaired reply, or OutputValidationError."""
    ask = Message("user", _REPAIR_PROMPT.format(errors=_errors(exc)))
    messages = (*request.messages, Message("assistant", raw.text), ask)
    fixed = await handle._complete(f"{key}:repair", replace(request, messages=messages))
    handle._history += (ask, Message("assistant", fixed.text))
    try:
        output = _validate(model, fixed)
    except ValidationError as again:
        raise OutputValidationError(
            f"agent {handle.agent_name!r}: the reply does not fit {model.__name__} even after one repair "
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
