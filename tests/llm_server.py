"""A local HTTP server that speaks the OpenAI Chat Completions and Anthropic Messages wire protocols.

The real ``openai`` and ``anthropic`` SDKs talk to it over loopback HTTP/1.1 (keep-alive,
chunked SSE streams), so provider tests exercise exactly what production does, minus
the network. It runs on its own asyncio loop in a background thread, so any number of
connections wait out their latency concurrently.

Scripting, per test::

    server.script("Hello!", {"title": "x"}, Reply(text="late", latency=0.2))
    server.fail(429, retry_after=1)        # the next request gets a 429, then the script
    server.fail(drop=True)                 # close the connection without answering
    assert len(server.requests) == 2

Every request takes the next scripted item (failures and replies share one queue, in
the order they were added); with the queue empty, it gets the default: an echo of the
last user message, or, when structured output is asked for, an instance made from the
schema.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Failure", "LLMServer", "RecordedRequest", "Reply", "ToolCall"]


@dataclass
class ToolCall:
    """A tool call the model "makes": OpenAI ``tool_calls`` / an Anthropic ``tool_use`` block."""

    name: str
    arguments: dict[str, Any]
    id: str = ""


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


@dataclass
class Failure:
    """A scripted failure: an HTTP error in the provider's error format, or a dropped connection.

    Attributes:
        status: HTTP status (429, 500, 400, ...).
        message: the error message in the body.
        retry_after: ``Retry-After`` header value (seconds), if any.
        retry_after_ms: ``retry-after-ms`` header value, if any.
        drop: close the connection without any response.
        mid_stream: answer a streaming request, send a first delta, then drop the connection.
        latency: seconds before failing.
    """

    status: int = 500
    message: str = "scripted failure"
    retry_after: float | None = None
    retry_after_ms: float | None = None
    drop: bool = False
    mid_stream: bool = False
    latency: float = 0.0


@dataclass
class RecordedRequest:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float

    @property
    def protocol(self) -> str:
        """``"openai"`` or ``"anthropic"`` (by path)."""
        return "anthropic" if self.path.endswith("/messages") else "openai"

    @property
    def stream(self) -> bool:
        """True when the request asked for an SSE stream."""
        return isinstance(self.body, dict) and bool(self.body.get("stream"))


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests"}
_PIECES = re.compile(r"\s*\S+\s*|\s+")


def _words(text: Any) -> int:
    return len(str(text).split()) if text else 0


def _sample(schema: Any, root: dict[str, Any]) -> Any:
    """A small instance of a JSON schema, for default structured replies."""
    if not isinstance(schema, dict):
        return None
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return _sample(target, root)
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return _sample(schema[key][0], root)
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        return {name: _sample(sub, root) for name, sub in schema.get("properties", {}).items()}
    return {"array": [], "string": "sample", "integer": 1, "number": 1.0, "boolean": True}.get(str(kind))


class LLMServer:
    """The fake LLM API. Start it with ``start()`` or ``with LLMServer() as server:``.

    Args:
        latency: seconds every request waits before its answer (unless scripted otherwise).
    """

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.port = 0
        self.connections = 0  # connections accepted (a reused client keeps this low)
        self._queue: deque[Reply | Failure] = deque()
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    # -- control (any thread) ----------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """What ``OPENAI_BASE_URL`` should be (ends in ``/v1``)."""
        return f"{self.base_url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """What ``ANTHROPIC_BASE_URL`` should be (the SDK adds ``/v1/messages``)."""
        return self.base_url

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request received so far."""
        with self._lock:
            return list(self._requests)

    def script(self, *replies: str | dict[str, Any] | Reply) -> None:
        """Queue replies: a ``str`` is text, a ``dict`` structured data, or a full :class:`Reply`."""
        items = [
            Reply(text=r) if isinstance(r, str) else Reply(data=r) if isinstance(r, dict) else r
            for r in replies
        ]
        with self._lock:
            self._queue.extend(items)

    def fail(
        self,
        status: int = 500,
        *,
        times: int = 1,
        message: str | None = None,
        retry_after: float | None = None,
        retry_after_ms: float | None = None,
        drop: bool = False,
        mid_stream: bool = False,
        latency: float = 0.0,
    ) -> None:
        """Queue ``times`` failures (see :class:`Failure`)."""
        failure = Failure(
            status=status,
            message=message or f"scripted {'drop' if drop or mid_stream else status}",
            retry_after=retry_after,
            retry_after_ms=retry_after_ms,
            drop=drop,
            mid_stream=mid_stream,
            latency=latency,
        )
        with self._lock:
            self._queue.extend([failure] * times)

    def reset(self) -> None:
        """Forget the script and the request log."""
        with self._lock:
            self._queue.clear()
            self._requests.clear()

    def start(self) -> LLMServer:
        """Bind a free loopback port and serve from a background thread."""
        started = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._connection, "127.0.0.1", 0, backlog=512)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # report to start(), then leave
                errors.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._shutdown())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="llm-server", daemon=True)
        self._thread.start()
        started.wait()
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        """Close every connection and the listening socket; join the thread."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- serving (the server's loop) ---------------------------------------------------

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        try:
            while await self._exchange(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(task)
            writer.transport.abort()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection should close."""
        line = await reader.readline()
        if not line.strip():
            return False
        method, path, _version = line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            raw = b""
            while size := int((await reader.readline()).split(b";")[0], 16):
                raw += await reader.readexactly(size + 2)
                raw = raw[:-2]
            await reader.readline()
        else:
            raw = await reader.readexactly(int(headers.get("content-length", "0")))
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        with self._lock:
            self._requests.append(RecordedRequest(method, path, headers, body, time.time()))
        keep_alive = headers.get("connection", "").lower() != "close"
        protocol = "anthropic" if path.rstrip("/").endswith("/messages") else "openai"
        if method != "POST" or not path.rstrip("/").endswith(("/chat/completions", "/messages")):
            await self._send_json(
                writer, 404, self._error_body(protocol, 404, f"no route {method} {path}"), {}
            )
            return keep_alive
        if not isinstance(body, dict):
            await self._send_json(
                writer, 400, self._error_body(protocol, 400, "body is not a JSON object"), {}
            )
            return keep_alive
        with self._lock:
            item = self._queue.popleft() if self._queue else None
        if isinstance(item, Failure):
            return await self._fail(writer, protocol, item, body) and keep_alive
        reply = item or Reply()
        await asyncio.sleep(self.latency if reply.latency is None else reply.latency)
        if protocol == "openai":
            await self._openai(writer, body, reply)
        else:
            await self._anthropic(writer, body, reply)
        return keep_alive

    async def _fail(self, writer: asyncio.StreamWriter, protocol: str, failure: Failure, body: Any) -> bool:
        await asyncio.sleep(failure.latency)
        if failure.drop or (failure.mid_stream and not body.get("stream")):
            writer.transport.abort()
            return False
        if failure.mid_stream:
            self._head(writer, 200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"})
            if protocol == "openai":
                chunk = {
                    "id": "chatcmpl-x",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": "m",
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": "partial "}}],
                }
                await self._event(writer, chunk)
            else:
                start = {
                    "id": "msg_x",
                    "type": "message",
                    "role": "assistant",
                    "model": "m",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": 1, "output_tokens": 1},
                }
                await self._event(writer, {"type": "message_start", "message": start}, "message_start")
                block = {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                }
                await self._event(writer, block, "content_block_start")
                delta = {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": "partial "},
                }
                await self._event(writer, delta, "content_block_delta")
            writer.transport.abort()
            return False
        extra = {}
        if failure.retry_after is not None:
            extra["retry-after"] = f"{failure.retry_after:g}"
        if failure.retry_after_ms is not None:
            extra["retry-after-ms"] = f"{failure.retry_after_ms:g}"
        await self._send_json(
            writer, failure.status, self._error_body(protocol, failure.status, failure.message), extra
        )
        return True

    def _error_body(self, protocol: str, status: int, message: str) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        if protocol == "anthropic":
            return {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_test"}
        openai_kind = "server_error" if status >= 500 else kind.replace("rate_limit_error", "requests")
        return {"error": {"message": message, "type": openai_kind, "param": None, "code": None}}

    # -- the two protocols -------------------------------------------------------------

    def _usage(self, body: dict[str, Any], reply: Reply, output: str) -> tuple[int, int]:
        prompt = sum(_words(m.get("content")) for m in body.get("messages", [])) + _words(body.get("system"))
        used_in = reply.input_tokens if reply.input_tokens is not None else prompt
        used_out = reply.output_tokens if reply.output_tokens is not None else max(_words(output), 1)
        return used_in, used_out

    def _default_text(self, body: dict[str, Any]) -> str:
        messages = body.get("messages") or [{}]
        content = messages[-1].get("content", "")
        if isinstance(content, list):  # content blocks
            content = " ".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
        return f"echo: {content}"

    async def _openai(self, writer: asyncio.StreamWriter, body: dict[str, Any], reply: Reply) -> None:
        fmt = body.get("response_format") or {}
        data = reply.data
        if data is None and reply.text is None and fmt.get("type") == "json_schema":
            schema = fmt["json_schema"]["schema"]
            data = _sample(schema, schema)
        calls = [
            {
                "id": c.id or f"call_{next(self._ids)}",
                "type": "function",
                "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
            }
            for c in reply.tool_calls
        ]
        content = None if calls else json.dumps(data) if data is not None else reply.text
        if content is None and not calls:
            content = self._default_text(body)
        used_in, used_out = self._usage(body, reply, content or json.dumps([c["function"] for c in calls]))
        usage = {"prompt_tokens": used_in, "completion_tokens": used_out, "total_tokens": used_in + used_out}
        finish = "tool_calls" if calls else "stop"
        base = {
            "id": f"chatcmpl-{next(self._ids)}",
            "created": int(time.time()),
            "model": body.get("model", ""),
        }
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
            if calls:
                message["tool_calls"] = calls
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            await self._send_json(
                writer, 200, {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            )
            return
        with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunk = {**base, "object": "chat.completion.chunk", "system_fingerprint": None}
        if with_usage:
            chunk["usage"] = None

        def delta(d: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {
                **chunk,
                "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish_reason}],
            }

        self._head(writer, 200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"})
        await self._event(writer, delta({"role": "assistant", "content": "", "refusal": None}))
        for piece in _PIECES.findall(content or ""):
            await self._event(writer, delta({"content": piece}))
        for i, call in enumerate(calls):
            head = {
                "index": i,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""},
            }
            await self._event(writer, delta({"tool_calls": [head]}))
            args = {"index": i, "function": {"arguments": call["function"]["arguments"]}}
            await self._event(writer, delta({"tool_calls": [args]}))
        await self._event(writer, delta({}, finish))
        if with_usage:
            await self._event(writer, {**chunk, "choices": [], "usage": usage})
        await self._raw(writer, b"data: [DONE]\n\n")
        await self._raw(writer, b"")

    async def _anthropic(self, writer: asyncio.StreamWriter, body: dict[str, Any], reply: Reply) -> None:
        forced = body.get("tool_choice") or {}
        tool_name = forced.get("name") if forced.get("type") == "tool" else None
        blocks: list[dict[str, Any]] = []
        data = reply.data
        if tool_name and data is None and reply.text is None and not reply.tool_calls:
            schema = next(
                (t["input_schema"] for t in body.get("tools", []) if t.get("name") == tool_name), {}
            )
            data = _sample(schema, schema)
        if tool_name and data is not None:
            blocks.append(
                {"type": "tool_use", "id": f"toolu_{next(self._ids)}", "name": tool_name, "input": data}
            )
        elif data is not None:
            blocks.append({"type": "text", "text": json.dumps(data)})
        for call in reply.tool_calls:
            blocks.append(
                {
                    "type": "tool_use",
                    "id": call.id or f"toolu_{next(self._ids)}",
                    "name": call.name,
                    "input": call.arguments,
                }
            )
        if not blocks:
            blocks.append(
                {"type": "text", "text": reply.text if reply.text is not None else self._default_text(body)}
            )
        said = " ".join(b["text"] if b["type"] == "text" else json.dumps(b["input"]) for b in blocks)
        used_in, used_out = self._usage(body, reply, said)
        stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
        message = {
            "id": f"msg_{next(self._ids)}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", ""),
            "stop_reason": stop,
            "stop_sequence": None,
        }
        if not body.get("stream"):
            usage = {"input_tokens": used_in, "output_tokens": used_out}
            await self._send_json(
                writer, 200, {**message, "content": blocks, "usage": usage}, {"request-id": "req_test"}
            )
            return
        self._head(writer, 200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"})
        start = {
            **message,
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": used_in, "output_tokens": 1},
        }
        await self._event(writer, {"type": "message_start", "message": start}, "message_start")
        await self._event(writer, {"type": "ping"}, "ping")
        for i, block in enumerate(blocks):
            if block["type"] == "text":
                empty, pieces = {"type": "text", "text": ""}, _PIECES.findall(block["text"])
                deltas = [{"type": "text_delta", "text": p} for p in pieces]
            else:
                empty = {**block, "input": {}}
                encoded = json.dumps(block["input"])
                half = len(encoded) // 2
                deltas = [
                    {"type": "input_json_delta", "partial_json": p} for p in (encoded[:half], encoded[half:])
                ]
            await self._event(
                writer,
                {"type": "content_block_start", "index": i, "content_block": empty},
                "content_block_start",
            )
            for d in deltas:
                await self._event(
                    writer, {"type": "content_block_delta", "index": i, "delta": d}, "content_block_delta"
                )
            await self._event(writer, {"type": "content_block_stop", "index": i}, "content_block_stop")
        end = {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": used_out},
        }
        await self._event(writer, end, "message_delta")
        await self._event(writer, {"type": "message_stop"}, "message_stop")
        await self._raw(writer, b"")

    # -- HTTP plumbing -----------------------------------------------------------------

    def _head(self, writer: asyncio.StreamWriter, status: int, headers: dict[str, str]) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "connection: keep-alive"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def _send_json(
        self, writer: asyncio.StreamWriter, status: int, body: Any, headers: dict[str, str] | None = None
    ) -> None:
        payload = json.dumps(body).encode()
        self._head(
            writer,
            status,
            {"content-type": "application/json", "content-length": str(len(payload)), **(headers or {})},
        )
        writer.write(payload)
        await writer.drain()

    async def _event(self, writer: asyncio.StreamWriter, data: Any, event: str | None = None) -> None:
        text = (f"event: {event}\n" if event else "") + f"data: {json.dumps(data)}\n\n"
        await self._raw(writer, text.encode())

    async def _raw(self, writer: asyncio.StreamWriter, payload: bytes) -> None:
        # One HTTP chunk per SSE event; an empty payload is the final zero-length chunk.
        writer.write(b"%x\r\n%s\r\n" % (len(payload), payload))
        await writer.drain()


if __name__ == "__main__":  # a standalone server: python tests/llm_server.py [latency-seconds]
    import sys

    with LLMServer(latency=float(sys.argv[1]) if len(sys.argv) > 1 else 0.0) as srv:
        print(f"OPENAI_BASE_URL={srv.openai_base_url}\nANTHROPIC_BASE_URL={srv.anthropic_base_url}", flush=True)
        try:
            sys.stdin.read()  # serve until stdin closes (the parent exits or closes the pipe)
        except KeyboardInterrupt:
            pass
