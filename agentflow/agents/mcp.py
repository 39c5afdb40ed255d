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
died, its endpoint closed the session) is connected again on the next use. The
connection, and :class:`MCPToolError`, are in :mod:`agentflow.agents.mcp_session`;
both are importable from here.

The ``mcp`` package (``pip install 'agentflow-core[mcp]'``) is imported only when a
connection starts, so importing agentflow loads neither it nor the HTTP client it uses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ..errors import InvalidInputError, WorkflowDefinitionError

# The session's timeout, error and connection import from here as they always did.
from .mcp_session import CONNECT_TIMEOUT as CONNECT_TIMEOUT
from .mcp_session import MCPConnection, MCPToolError

__all__ = ["MCPConnection", "MCPServer", "MCPTool", "MCPToolError"]


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
