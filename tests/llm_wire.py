"""Wire formats of the fake LLM server: OpenAI Chat Completions and Anthropic Messages.

Bodies, SSE events and error envelopes are shaped exactly as the official SDKs parse
them: ``chat.completion`` / ``chat.completion.chunk`` objects ending in ``data: [DONE]``,
and Anthropic's ``message_start`` … ``message_stop`` named events.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Exchange", "Reply", "StreamEnded", "ToolCall", "anthropic_reply", "error_body", "openai_reply"]

_IDS = itertools.count(1)
_PIECES = re.compile(r"\s*\S+\s*|\s+")
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests"}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}


@dataclass
class ToolCall:
    """A tool call the model "makes": OpenAI ``tool_calls`` / an Anthropic ``tool_use`` block."""

    name: str
    arguments: dict[str, Any]
    id: str = ""
    raw: str | None = None  # OpenAI only: the arguments text as sent, JSON or not (a model's mistake)


@dataclass
class Reply:
    """A scripted answer.

    Attributes:
        text: the reply text (OpenAI content / an Anthropic text block).
        data: structured output: JSON content for OpenAI; for Anthropic the input of
            the forced tool's ``tool_use`` block (or JSON text when no tool was forced).
        tool_calls: tool calls to return instead of text.
        input_tokens / output_tokens: usage to report (default: word counts).
        latency: seconds before answering (default: the server's ``latency``).
    """

    text: str | None = None
    data: Any = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    input_tokens: int | None = None
    output_tokens: int | None = None
    latency: float | None = None


class StreamEnded(Exception):
    """Raised by :meth:`Exchange.event` once a stream cut short has been ended cleanly."""


class Exchange:
    """Writes one HTTP/1.1 response: a JSON body, or chunked SSE (one chunk per event).

    Args:
        writer: the connection.
        abort_after: drop the connection after this many SSE events (a broken stream).
        end_after: end the response cleanly after this many SSE events (a stream cut
            short); the event after them raises :class:`StreamEnded`.
    """

    def __init__(
        self, writer: asyncio.StreamWriter, abort_after: int | None = None, end_after: int | None = None
    ) -> None:
        self.writer = writer
        self.abort_after = abort_after
        self.end_after = end_after

    def head(self, status: int, headers: dict[str, str]) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "connection: keep-alive"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(body).encode()
        self.head(
            status,
            {"content-type": "application/json", "content-length": str(len(payload)), **(headers or {})},
        )
        self.writer.write(payload)
        await self.writer.drain()

    def start_events(self) -> None:
        self.head(200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"})

    async def empty(self, stream: bool) -> None:
        """A 200 with nothing in it: an event stream that ends at once, or an empty JSON body."""
        if stream:
            self.start_events()
            await self.chunk(b"")
        else:
            self.head(200, {"content-type": "application/json", "content-length": "0"})
            await self.writer.drain()

    async def event(self, data: Any, name: str | None = None) -> None:
        if self.abort_after is not None:
            if self.abort_after == 0:
                self.writer.transport.abort()
                raise ConnectionResetError("scripted drop in the middle of a stream")
            self.abort_after -= 1
        if self.end_after is not None:
            if self.end_after == 0:
                await self.chunk(b"")
                raise StreamEnded
            self.end_after -= 1
        await self.chunk(((f"event: {name}\n" if name else "") + f"data: {json.dumps(data)}\n\n").encode())

    async def chunk(self, payload: bytes) -> None:
        """Write one HTTP chunk; an empty payload is the final zero-length chunk."""
        self.writer.write(b"%x\r\n%s\r\n" % (len(payload), payload))
        await self.writer.drain()


def error_body(protocol: str, status: int, message: str) -> dict[str, Any]:
    """The provider's error envelope for ``status``."""
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    if protocol == "anthropic":
        return {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_test"}
    openai_kind = "server_error" if status >= 500 else kind.replace("rate_limit_error", "requests")
    return {"error": {"message": message, "type": openai_kind, "param": None, "code": None}}


def _words(text: Any) -> int:
    return len(str(text).split()) if text else 0


def _usage(body: dict[str, Any], reply: Reply, output: str) -> tuple[int, int]:
    prompt = sum(_words(m.get("content")) for m in body.get("messages", [])) + _words(body.get("system"))
    used_in = reply.input_tokens if reply.input_tokens is not None else prompt
    used_out = reply.output_tokens if reply.output_tokens is not None else max(_words(output), 1)
    return used_in, used_out


def _echo(body: dict[str, Any]) -> str:
    content = (body.get("messages") or [{}])[-1].get("content", "")
    if isinstance(content, list):  # content blocks
        content = " ".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return f"echo: {content}"


def sample(schema: Any, root: dict[str, Any]) -> Any:
    """A small instance of a JSON schema, for default structured replies."""
    if not isinstance(schema, dict):
        return None
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return sample(target, root)
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return sample(schema[key][0], root)
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        return {name: sample(sub, root) for name, sub in schema.get("properties", {}).items()}
    return {"array": [], "string": "sample", "integer": 1, "number": 1.0, "boolean": True}.get(str(kind))


async def openai_reply(http: Exchange, body: dict[str, Any], reply: Reply) -> None:
    """Answer a Chat Completions request, whole or as SSE chunks (with usage when asked)."""
    fmt = body.get("response_format") or {}
    data = reply.data
    if data is None and reply.text is None and fmt.get("type") == "json_schema":
        data = sample(fmt["json_schema"]["schema"], fmt["json_schema"]["schema"])
    calls = [
        {
            "id": c.id or f"call_{next(_IDS)}",
            "type": "function",
            "function": {"name": c.name, "arguments": json.dumps(c.arguments) if c.raw is None else c.raw},
        }
        for c in reply.tool_calls
    ]
    content = (reply.text or None) if calls else json.dumps(data) if data is not None else reply.text
    if content is None and not calls:
        content = _echo(body)
    used_in, used_out = _usage(body, reply, content or json.dumps([c["function"] for c in calls]))
    usage = {"prompt_tokens": used_in, "completion_tokens": used_out, "total_tokens": used_in + used_out}
    finish = "tool_calls" if calls else "stop"
    base = {"id": f"chatcmpl-{next(_IDS)}", "created": int(time.time()), "model": body.get("model", "")}
    if not body.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        await http.json(200, {**base, "object": "chat.completion", "choices": [choice], "usage": usage})
        return
    with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    chunk: dict[str, Any] = {**base, "object": "chat.completion.chunk", "system_fingerprint": None}
    if with_usage:
        chunk["usage"] = None  # as the API does: null on every chunk but the last

    def delta(d: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            **chunk,
            "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish_reason}],
        }

    http.start_events()
    await http.event(delta({"role": "assistant", "content": "", "refusal": None}))
    for piece in _PIECES.findall(content or ""):
        await http.event(delta({"content": piece}))
    for i, call in enumerate(calls):
        fn = call["function"]
        head = {
            "index": i,
            "id": call["id"],
            "type": "function",
            "function": {"name": fn["name"], "arguments": ""},
        }
        await http.event(delta({"tool_calls": [head]}))
        await http.event(delta({"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"]}}]}))
    await http.event(delta({}, finish))
    if with_usage:
        await http.event({**chunk, "choices": [], "usage": usage})
    await http.chunk(b"data: [DONE]\n\n")
    await http.chunk(b"")


async def anthropic_reply(http: Exchange, body: dict[str, Any], reply: Reply) -> None:
    """Answer a Messages request, whole or as named SSE events (usage in start and delta)."""
    forced = body.get("tool_choice") or {}
    tool_name = forced.get("name") if forced.get("type") == "tool" else None
    data = reply.data
    if tool_name and data is None and reply.text is None and not reply.tool_calls:
        schema = next((t["input_schema"] for t in body.get("tools", []) if t.get("name") == tool_name), {})
        data = sample(schema, schema)
    blocks: list[dict[str, Any]] = []
    if tool_name and data is not None:
        blocks.append({"type": "tool_use", "id": f"toolu_{next(_IDS)}", "name": tool_name, "input": data})
    elif data is not None:
        blocks.append({"type": "text", "text": json.dumps(data)})
    elif reply.text and reply.tool_calls:
        blocks.append({"type": "text", "text": reply.text})  # what the model says beside its calls
    for call in reply.tool_calls:
        blocks.append(
            {
                "type": "tool_use",
                "id": call.id or f"toolu_{next(_IDS)}",
                "name": call.name,
                "input": call.arguments,
            }
        )
    if not blocks:
        blocks.append({"type": "text", "text": reply.text if reply.text is not None else _echo(body)})
    said = " ".join(b["text"] if b["type"] == "text" else json.dumps(b["input"]) for b in blocks)
    used_in, used_out = _usage(body, reply, said)
    stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
    message = {
        "id": f"msg_{next(_IDS)}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", ""),
    }
    if not body.get("stream"):
        usage = {"input_tokens": used_in, "output_tokens": used_out}
        whole = {**message, "content": blocks, "stop_reason": stop, "stop_sequence": None, "usage": usage}
        await http.json(200, whole, {"request-id": "req_test"})
        return
    http.start_events()
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    start["usage"] = {"input_tokens": used_in, "output_tokens": 1}
    await http.event({"type": "message_start", "message": start}, "message_start")
    await http.event({"type": "ping"}, "ping")
    for i, block in enumerate(blocks):
        if block["type"] == "text":
            empty: dict[str, Any] = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": p} for p in _PIECES.findall(block["text"])]
        else:
            empty = {**block, "input": {}}
            encoded = json.dumps(block["input"])
            halves = (encoded[: len(encoded) // 2], encoded[len(encoded) // 2 :])
            deltas = [{"type": "input_json_delta", "partial_json": p} for p in halves]
        await http.event(
            {"type": "content_block_start", "index": i, "content_block": empty}, "content_block_start"
        )
        for d in deltas:
            await http.event({"type": "content_block_delta", "index": i, "delta": d}, "content_block_delta")
        await http.event({"type": "content_block_stop", "index": i}, "content_block_stop")
    end = {"stop_reason": stop, "stop_sequence": None}
    await http.event(
        {"type": "message_delta", "delta": end, "usage": {"output_tokens": used_out}}, "message_delta"
    )
    await http.event({"type": "message_stop"}, "message_stop")
    await http.chunk(b"")
