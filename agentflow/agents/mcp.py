"""Model Context Protocol servers as tools: ``MCPServer.stdio(...)`` and ``MCPServer.http(...)``.

An :class:`MCPServer` in ``Agent(tools=[...])`` gives the model that server's tools,
beside the agent's ``@tool`` functions. Each becomes an :class:`MCPTool`: its name,
description and argument schema are the server's; the model's arguments are checked
against that JSON schema before anything is sent (a call that fails it never reaches the
server); a call goes to the server over the session, and a result the server marks as an
error raises :class:`MCPToolError` with the server's text, so the model hears of it as a
tool error. Journaling, approvals and replays are the agent loop's, as for any tool.

A declaration does no I/O. The agent pools (one per runner) keep one
:class:`MCPConnection` per server: it connects on the first loop that needs the server,
lists its tools once, and is closed with the pools. A server that went away (its process
died, its endpoint closed the session) is connected again on the next use.

The ``mcp`` package (``pip install 'agentflow-core[mcp]'``) is imported only when a
connection starts, so importing agentflow loads neither it nor the HTTP client it uses.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, TextIO, cast

from pydantic import BaseModel, ConfigDict

from ..errors import AgentflowError, InvalidInputError, WorkflowDefinitionError

__all__ = ["MCPConnection", "MCPServer", "MCPTool", "MCPToolError"]

#: Seconds a server may take to start (or answer) and list its tools.
CONNECT_TIMEOUT = 30.0

_INSTALL = "pip install 'agentflow-core[mcp]'"


class MCPToolError(AgentflowError):
    """An MCP tool call failed: the server reported an error, or the connection was lost.

    The agent loop gives the model its message (which carries the server's text) as the
    tool's error.
    """


@dataclass(frozen=True, eq=False)
class MCPServer:
    """A Model Context Protocol server whose tools an agent may call.

    Build it with :meth:`stdio` or :meth:`http` and put it in ``Agent(tools=[...])``.

    Attributes:
        name: what errors call the server (default: the command line or the URL).
        transport: ``"stdio"`` or ``"http"`` (streamable HTTP).
        command, args, env: how a stdio server is started.
        url, headers: where a streamable HTTP server is, and headers for every request.
        approval: per tool name (the server's own), the approval each call of it needs
            (a ``HumanApproval``).
        idempotent: per tool name, whether it is safe to run again after a crash during
            the call (default False).
    """

    name: str
    transport: Literal["stdio", "http"]
    command: str = ""
    args: tuple[str, ...] = ()
    env: Mapping[str, str] | None = None
    url: str = ""
    headers: Mapping[str, str] | None = None
    approval: Mapping[str, Any] = field(default_factory=dict)
    idempotent: Mapping[str, bool] = field(default_factory=dict)

    @classmethod
    def stdio(
        cls,
        command: str,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        *,
        approval: Mapping[str, Any] | None = None,
        idempotent: Mapping[str, bool] | None = None,
        name: str | None = None,
    ) -> MCPServer:
        """A server started as a subprocess, spoken to over its stdin and stdout.

        Args:
            command: the executable (``"npx"``, ``sys.executable``, a path).
            args: its arguments.
            env: variables set for it, over a minimal inherited environment (``PATH``,
                ``HOME``, ``USER``...): pass what the server needs, such as its token.
            approval: ``{"tool_name": HumanApproval(...)}`` for tools each call of which
                must be approved first.
            idempotent: ``{"tool_name": True}`` for tools safe to run twice.
            name: what errors call it (default: the command line).

        Raises:
            WorkflowDefinitionError: an argument of the wrong type.
        """
        if not isinstance(command, str) or not command:
            raise WorkflowDefinitionError(
                f"MCPServer.stdio: command must be a non-empty str, got {command!r}"
            )
        if isinstance(args, str) or not all(isinstance(a, str) for a in args):
            raise WorkflowDefinitionError(f"MCPServer.stdio: args must be a sequence of str, got {args!r}")
        label = name if name is not None else " ".join([os.path.basename(command), *args])
        return cls._make(
            label, "stdio", approval, idempotent, command=command, args=tuple(args), env=_strings(env, "env")
        )

    @classmethod
    def http(
        cls,
        url: str,
        headers: Mapping[str, str] | None = None,
        *,
        approval: Mapping[str, Any] | None = None,
        idempotent: Mapping[str, bool] | None = None,
        name: str | None = None,
    ) -> MCPServer:
        """A server reached over streamable HTTP at ``url`` (such as ``http://localhost:8000/mcp``).

        Args:
            url: the server's MCP endpoint.
            headers: sent with every request (``{"Authorization": "Bearer ..."}``).
            approval, idempotent, name: as for :meth:`stdio` (``name`` defaults to the URL).

        Raises:
            WorkflowDefinitionError: an argument of the wrong type, or a URL that is not http(s).
        """
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise WorkflowDefinitionError(
                f"MCPServer.http: url must be an http:// or https:// URL, got {url!r}"
            )
        label = name if name is not None else url
        return cls._make(label, "http", approval, idempotent, url=url, headers=_strings(headers, "headers"))

    @classmethod
    def _make(
        cls,
        name: str,
        transport: Literal["stdio", "http"],
        approval: Mapping[str, Any] | None,
        idempotent: Mapping[str, bool] | None,
        **where: Any,
    ) -> MCPServer:
        if not isinstance(name, str) or not name:
            raise WorkflowDefinitionError(f"MCPServer: name must be a non-empty str, got {name!r}")
        if approval is not None and not isinstance(approval, Mapping):
            raise WorkflowDefinitionError(
                f"MCP server {name!r}: approval must map tool names to a HumanApproval, got {approval!r}"
            )
        if idempotent is not None and not isinstance(idempotent, Mapping):
            raise WorkflowDefinitionError(
                f"MCP server {name!r}: idempotent must map tool names to True or False, got {idempotent!r}"
            )
        for tool_name, value in (idempotent or {}).items():
            if not isinstance(value, bool):
                raise WorkflowDefinitionError(
                    f"MCP server {name!r}: idempotent[{tool_name!r}] must be True or False, got {value!r}"
                )
        for tool_name, value in (approval or {}).items():
            if value is None:
                raise WorkflowDefinitionError(
                    f"MCP server {name!r}: approval[{tool_name!r}] must be a HumanApproval, got None"
                )
        return cls(name, transport, approval=dict(approval or {}), idempotent=dict(idempotent or {}), **where)

    def __repr__(self) -> str:
        return f"MCPServer.{self.transport}({self.name!r})"

    def tools_from(self, listed: Sequence[Any], connection: MCPConnection) -> tuple[MCPTool, ...]:
        """The tools of a listing (the server's ``Tool`` entries), calling through ``connection``.

        Raises:
            WorkflowDefinitionError: ``approval`` or ``idempotent`` names a tool the
                server does not have (names it and the server's tools), or a tool's
                argument schema is not a valid JSON schema.
        """
        names = [t.name for t in listed]
        for option, keys in (("approval", self.approval), ("idempotent", self.idempotent)):
            unknown = sorted(set(keys) - set(names))
            if unknown:
                raise WorkflowDefinitionError(
                    f"MCP server {self.name!r}: {option}= names {', '.join(map(repr, unknown))}, which the "
                    f"server does not have; its tools: {', '.join(sorted(names)) or 'none'}"
                )
        return tuple(
            MCPTool(
                t.name,
                t.description or "",
                dict(t.input_schema),
                connection,
                approval=self.approval.get(t.name),
                idempotent=self.idempotent.get(t.name, False),
            )
            for t in listed
        )


def _strings(value: Mapping[str, str] | None, what: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise WorkflowDefinitionError(f"MCPServer: {what} must map str to str, got {value!r}")
    return dict(value)


class _Arguments(BaseModel):
    """A call's arguments once they passed the tool's JSON schema (as they were, every key kept)."""

    model_config = ConfigDict(extra="allow")


class MCPTool:
    """One tool of an MCP server, as the agent loop sees a tool (see ``ToolLike``).

    Attributes:
        name, description, parameters: as the server lists them (``parameters`` is its
            ``inputSchema``).
        server: the :class:`MCPServer` it belongs to.
        approval: the approval each call needs (from ``MCPServer(approval=...)``), or None.
        idempotent: from ``MCPServer(idempotent=...)`` (default False).
    """

    takes_context = False
    is_async = True
    timeout: float | None = None

    def __init__(
        self,
        name: str,
        description: str,
        parameters: dict[str, Any],
        connection: MCPConnection,
        approval: Any = None,
        idempotent: bool = False,
    ) -> None:
        import jsonschema

        self.name = name
        self.description = description
        self.parameters = parameters
        self.server = connection.server
        self.approval = approval
        self.idempotent = idempotent
        self._connection = connection
        cls = jsonschema.validators.validator_for(parameters, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(parameters)
        except jsonschema.SchemaError as exc:
            raise WorkflowDefinitionError(
                f"MCP server {self.server.name!r}: tool {name!r} has an argument schema that is not "
                f"valid JSON schema: {exc.message}"
            ) from None
        self._validator = cls(parameters)

        async def fn(**arguments: Any) -> Any:
            return await connection.call(name, arguments)

        self.fn: Callable[..., Any] = fn

    def __repr__(self) -> str:
        return f"<MCPTool {self.name!r} of {self.server!r}>"

    @property
    def retry(self) -> None:
        """No retries: a failed call goes back to the model, which may call again."""
        return None

    def spec(self) -> dict[str, Any]:
        """What a provider shows the model: ``{"name", "description", "parameters"}``."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def validate(self, arguments: Any, where: str = "") -> BaseModel:
        """The model's (or a reviewer's) arguments, checked against the tool's JSON schema.

        Args:
            arguments: JSON text or a mapping.
            where: which run and step, for the message.

        Raises:
            InvalidInputError: not JSON, not an object, or the schema refuses them; the
                message names the tool and each field at fault.
        """
        subject = f"{where}: " if where else ""
        data: Any = arguments
        if isinstance(arguments, str | bytes):
            try:
                data = json.loads(arguments or "{}")
            except ValueError as exc:
                raise InvalidInputError(
                    f"{subject}tool {self.name!r}: arguments are not JSON: {exc}"
                ) from None
        elif arguments is None:
            data = {}
        elif isinstance(arguments, Mapping):
            data = dict(arguments)
        if not isinstance(data, dict):
            raise InvalidInputError(
                f"{subject}tool {self.name!r}: arguments must be a JSON object, got {type(data).__name__}"
            )
        errors = sorted(self._validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
        if errors:
            found = [
                {"loc": tuple(e.absolute_path), "msg": e.message, "type": str(e.validator)} for e in errors
            ]
            detail = "; ".join(f"{'.'.join(map(str, f['loc'])) or '(arguments)'}: {f['msg']}" for f in found)
            raise InvalidInputError(f"{subject}tool {self.name!r}: invalid arguments: {detail}", found)
        return _Arguments.model_validate(data)

    def keywords(self, arguments: BaseModel) -> dict[str, Any]:
        """Validated arguments as the keyword arguments of ``fn`` (the call's arguments as sent)."""
        return dict(arguments.model_extra or {})


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
