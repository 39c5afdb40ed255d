"""A local HTTP server that speaks the OpenAI Chat Completions and Anthropic Messages wire protocols.

The real ``openai`` and ``anthropic`` SDKs talk to it over loopback HTTP/1.1 (keep-alive,
chunked SSE streams), so provider tests exercise exactly what production does, minus
the network. It runs on its own asyncio loop in a background thread, so any number of
connections wait out their latency concurrently.

Scripting, per test::

    server.script("Hello!", {"title": "x"}, Reply(text="late", latency=0.2))
    server.fail(429, retry_after=1)        # the next request gets a 429, then the script
    server.fail(drop=True)                 # close the connection without answering
    server.fail(empty=True)                # a 200 whose body (or event stream) is empty
    assert len(server.requests) == 2

Every request takes the next scripted item (failures and replies share one queue, in
the order they were added); with the queue empty, it gets the default: an echo of the
last user message, or, when structured output is asked for, an instance made from the
schema. A server made with ``api_key=`` answers any request that does not carry that key
with a 401 that quotes the key it was given, as some servers and proxies do.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from llm_wire import Exchange, Reply, StreamEnded, ToolCall, anthropic_reply, error_body, openai_reply

__all__ = ["Failure", "LLMServer", "RecordedRequest", "Reply", "ToolCall"]


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
        empty: answer 200 with an empty body: an event stream that carries no events, or
            no JSON at all.
        cut_short: answer a streaming request, send a first delta, then end the stream
            cleanly, without the events that close it.
        latency: seconds before failing.
    """

    status: int = 500
    message: str = "scripted failure"
    retry_after: float | None = None
    retry_after_ms: float | None = None
    drop: bool = False
    mid_stream: bool = False
    empty: bool = False
    cut_short: bool = False
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


class LLMServer:
    """The fake LLM API. Start it with ``start()`` or ``with LLMServer() as server:``.

    Args:
        latency: seconds every request waits before its answer (unless scripted otherwise).
        api_key: the key every request must carry (``Authorization: Bearer`` for OpenAI,
            ``x-api-key`` for Anthropic); None accepts any.
    """

    def __init__(self, latency: float = 0.0, api_key: str | None = None) -> None:
        self.latency = latency
        self.api_key = api_key
        self.port = 0
        self.connections = 0  # connections accepted (a reused client keeps this low)
        self._queue: deque[Reply | Failure] = deque()
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
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
        empty: bool = False,
        cut_short: bool = False,
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
            empty=empty,
            cut_short=cut_short,
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
        http = Exchange(writer)
        if method != "POST" or not path.rstrip("/").endswith(("/chat/completions", "/messages")):
            await http.json(404, error_body(protocol, 404, f"no route {method} {path}"))
            return keep_alive
        if not isinstance(body, dict):
            await http.json(400, error_body(protocol, 400, "body is not a JSON object"))
            return keep_alive
        if self.api_key is not None:
            given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
            if given != self.api_key:
                message = f"Incorrect API key provided: {given}. You can find your API key in your account."
                await http.json(401, error_body(protocol, 401, message))
                return keep_alive
        with self._lock:
            item = self._queue.popleft() if self._queue else None
        if isinstance(item, Failure):
            await asyncio.sleep(item.latency)
            partial = item.mid_stream or item.cut_short
            if item.drop or (partial and not body.get("stream")):
                return False  # the caller closes the connection unanswered
            if item.empty:
                await http.empty(stream=bool(body.get("stream")))
                return keep_alive
            if not partial:
                extra = {"retry-after": item.retry_after, "retry-after-ms": item.retry_after_ms}
                headers = {k: f"{v:g}" for k, v in extra.items() if v is not None}
                await http.json(item.status, error_body(protocol, item.status, item.message), headers)
                return keep_alive
            # Stop once the first text delta is out: OpenAI sends a role chunk first,
            # Anthropic message_start, ping and content_block_start.
            first_delta = 2 if protocol == "openai" else 4
            if item.mid_stream:
                http.abort_after = first_delta
            else:
                http.end_after = first_delta
            item = Reply(text="partial reply that never ends")
        reply = item or Reply()
        await asyncio.sleep(self.latency if reply.latency is None else reply.latency)
        try:
            await (openai_reply if protocol == "openai" else anthropic_reply)(http, body, reply)
        except StreamEnded:
            pass
        return keep_alive


if __name__ == "__main__":  # a standalone server: python tests/llm_server.py [latency-seconds]
    import sys

    with LLMServer(latency=float(sys.argv[1]) if len(sys.argv) > 1 else 0.0) as srv:
        print(
            f"OPENAI_BASE_URL={srv.openai_base_url}\nANTHROPIC_BASE_URL={srv.anthropic_base_url}", flush=True
        )
        try:
            sys.stdin.read()  # serve until stdin closes (the parent exits or closes the pipe)
        except KeyboardInterrupt:
            pass
