"""The live session with one MCP server (:class:`MCPConnection`), shared by every handle
of the agent pools, and the error a call of its tools raises (:class:`MCPToolError`).

The pools make one connection per :class:`~agentflow.agents.mcp.MCPServer`: it connects
on first use (within ``CONNECT_TIMEOUT`` seconds), lists the server's tools once, and is
connected again on the next use after the server went away. A caller relies on
``tools()``, ``call()`` and ``aclose()``; every failure names the server (a stdio
server's stderr included), and the ``mcp`` package (``pip install 'agentflow-core[mcp]'``)
is imported only when a connection starts.
"""

from __future__ import annotations

import asyncio
import contextvars
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO, cast

from ..errors import AgentflowError

if TYPE_CHECKING:
    from .mcp import MCPServer, MCPTool

__all__ = ["CONNECT_TIMEOUT", "MCPConnection", "MCPToolError"]

#: Seconds a server may take to start (or answer) and list its tools.
CONNECT_TIMEOUT = 30.0

_INSTALL = "pip install 'agentflow-core[mcp]'"


class MCPToolError(AgentflowError):
    """An MCP tool call failed: the server reported an error, or the connection was lost.

    The agent loop gives the model its message (which carries the server's text) as the
    tool's error.
    """


class MCPConnection:
    """A live session with one MCP server, shared by every handle of the agent pools.

    The session runs in a task of its own, which enters the ``mcp`` client (its task
    groups and the server process) and leaves it when the connection closes, so that
    calls from any step's task may share it. Connects on first use; a session that was
    lost is connected again on the next use.
    """

    def __init__(self, server: MCPServer) -> None:
        self.server = server
        self._client: Any = None
        self._tools: tuple[MCPTool, ...] = ()
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self._ready: asyncio.Future[Any] | None = None
        self._errlog: TextIO | None = None
        self._lost = False
        self._lock = asyncio.Lock()

    async def tools(self) -> tuple[MCPTool, ...]:
        """The server's tools, listed when it was connected (connecting it if need be).

        Raises:
            AgentflowError: the server could not be started or reached (names it).
            WorkflowDefinitionError: the server's ``approval``/``idempotent`` name a tool
                it does not have.
        """
        await self._session()
        return self._tools

    async def call(self, tool: str, arguments: dict[str, Any]) -> Any:
        """Call ``tool`` with ``arguments``; its structured result, else its text.

        Raises:
            MCPToolError: the server reported an error (its text), or the connection was
                lost during the call (the server is connected again on the next use).
        """
        from mcp import MCPError
        from mcp_types import CONNECTION_CLOSED

        client = await self._session()
        try:
            result = await client.call_tool(tool, arguments)
        except MCPError as exc:
            if exc.error.code != CONNECTION_CLOSED:
                raise MCPToolError(f"MCP server {self.server.name!r}, tool {tool!r}: {exc}") from None
            self._lost = True
            raise MCPToolError(
                f"MCP server {self.server.name!r} went away during the call of tool {tool!r}, which may "
                f"or may not have run; it is connected again on the next call{self._stderr()}"
            ) from None
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a transport failure: connect afresh next time
            self._lost = True
            raise MCPToolError(
                f"MCP server {self.server.name!r}, tool {tool!r}: the call failed: {_reason(exc)}"
            ) from exc
        if result.is_error:
            raise MCPToolError(f"MCP server {self.server.name!r}, tool {tool!r}: {_text(result.content)}")
        if result.structured_content is not None:
            return result.structured_content
        return _content(result.content)

    async def aclose(self) -> None:
        """End the session (and stop a stdio server's process). Closing twice is harmless."""
        async with self._lock:
            await self._disconnect()

    # -- internals ---------------------------------------------------------------------

    async def _session(self) -> Any:
        if self._client is not None and not self._lost:
            return self._client
        async with self._lock:
            if self._client is None or self._lost:
                await self._disconnect()
                await self._connect()
            return self._client

    async def _connect(self) -> None:
        try:
            from mcp import Client
        except ImportError as exc:
            raise AgentflowError(
                f"MCP server {self.server.name!r}: the mcp package is not installed ({_INSTALL})"
            ) from exc
        ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._ready = ready
        self._stop = asyncio.Event()
        self._lost = False
        if self.server.transport == "stdio":
            self._errlog = cast(TextIO, tempfile.TemporaryFile("a+", encoding="utf-8", errors="replace"))
        # A context of its own: the session outlives the step that happened to open it.
        self._task = asyncio.create_task(
            self._hold(Client, ready, self._stop),
            name=f"mcp {self.server.name}",
            context=contextvars.Context(),
        )
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                client = await ready
                listed = await _list_tools(client)
        except Exception as exc:
            detail = self._stderr()
            await self._disconnect()
            what = "did not answer in time" if isinstance(exc, TimeoutError) else _reason(exc)
            verb = "could not be started" if self.server.transport == "stdio" else "could not be reached"
            raise AgentflowError(f"MCP server {self.server.name!r} {verb}: {what}{detail}") from exc
        except BaseException:
            await self._disconnect()
            raise
        try:
            self._tools = self.server.tools_from(listed, self)
        except BaseException:
            await self._disconnect()
            raise
        self._client = client

    async def _hold(self, client_type: Any, ready: asyncio.Future[Any], stop: asyncio.Event) -> None:
        """Enter the client, hand it over, and keep it until ``stop`` (the session's own task)."""
        try:
            async with client_type(self._transport()) as client:
                if not ready.done():
                    ready.set_result(client)
                await stop.wait()
        except Exception as exc:
            if not ready.done():
                ready.set_exception(exc)
        finally:
            self._lost = True

    @asynccontextmanager
    async def _transport(self) -> AsyncIterator[tuple[Any, Any]]:
        async with AsyncExitStack() as stack:
            if self.server.transport == "stdio":
                from mcp.client.stdio import StdioServerParameters, stdio_client

                params = StdioServerParameters(
                    command=self.server.command,
                    args=list(self.server.args),
                    env=dict(self.server.env) if self.server.env is not None else None,
                )
                assert self._errlog is not None
                read, write = await stack.enter_async_context(stdio_client(params, errlog=self._errlog))
            else:
                from mcp.client.streamable_http import streamable_http_client
                from mcp.shared._httpx_utils import create_mcp_http_client

                headers = dict(self.server.headers) if self.server.headers is not None else None
                http = await stack.enter_async_context(create_mcp_http_client(headers=headers))
                read, write = await stack.enter_async_context(
                    streamable_http_client(self.server.url, http_client=http)
                )
            yield _Watched(read, self._ended), write

    def _ended(self) -> None:
        self._lost = True

    async def _disconnect(self) -> None:
        task, stop, ready, errlog = self._task, self._stop, self._ready, self._errlog
        self._task = self._stop = self._ready = self._errlog = self._client = None
        self._tools = ()
        if stop is not None:
            stop.set()
        if task is not None:
            handed_over = (
                ready is not None and ready.done() and not ready.cancelled() and not ready.exception()
            )
            if not handed_over:  # still starting (or failed to): nothing to close gracefully
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if errlog is not None:
            errlog.close()

    def _stderr(self) -> str:
        """The end of a stdio server's stderr, for an error message ('' when it wrote none)."""
        if self._errlog is None:
            return ""
        try:
            self._errlog.seek(0)
            text = self._errlog.read()[-1500:].strip()
        except (OSError, ValueError):
            return ""
        return f"; its stderr ends: {text}" if text else ""


class _Watched:
    """The session's read stream, telling the connection when the server's side has ended."""

    def __init__(self, inner: Any, ended: Callable[[], None]) -> None:
        self._inner = inner
        self._ended = ended

    def __getattr__(self, name: str) -> Any:  # ``last_context`` and the like
        return getattr(self._inner, name)

    async def receive(self) -> Any:
        try:
            return await self._inner.receive()
        except Exception:
            self._ended()
            raise

    def __aiter__(self) -> _Watched:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._inner.__anext__()
        except StopAsyncIteration:
            self._ended()
            raise
        except Exception:
            self._ended()
            raise

    async def aclose(self) -> None:
        self._ended()
        await self._inner.aclose()

    async def __aenter__(self) -> _Watched:
        await self._inner.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self._ended()
        result: bool | None = await self._inner.__aexit__(exc_type, exc, tb)
        return result


async def _list_tools(client: Any) -> list[Any]:
    tools: list[Any] = []
    cursor = None
    for _ in range(100):  # a server whose pages never end cannot hang the connection
        page = await client.list_tools(cursor=cursor)
        tools += page.tools
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


def _reason(exc: BaseException) -> str:
    """The innermost messages of ``exc`` (anyio wraps transport failures in exception groups)."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_reason(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def _text(content: Sequence[Any]) -> str:
    texts = [c.text for c in content if getattr(c, "type", None) == "text"]
    return "\n".join(texts) or "the tool failed and gave no message"


def _content(content: Sequence[Any]) -> Any:
    """A result without structured content as JSON: its text, or its blocks when not all text."""
    if all(getattr(c, "type", None) == "text" for c in content):
        texts = [c.text for c in content]
        return texts[0] if len(texts) == 1 else texts
    return [
        c.text if c.type == "text" else c.model_dump(mode="json", by_alias=True, exclude_none=True)
        for c in content
    ]
