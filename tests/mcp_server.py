"""A Model Context Protocol server for the tests, written with the ``mcp`` package's server side.

``python tests/mcp_server.py stdio`` serves it over stdin/stdout;
``python tests/mcp_server.py http PORT`` over streamable HTTP on 127.0.0.1:PORT (path ``/mcp``).

Every tool call appends one JSON line ``[tool, arguments]`` to the file named by the
``MCP_CALLS`` variable (when set), so a test can count the calls that reached it; a
start appends ``["started", {"pid": ...}]``. The HTTP server also records the ``X-Team``
header of each call, to show headers arrive.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("ops", log_level="WARNING")


def _record(tool: str, arguments: dict[str, Any]) -> None:
    path = os.environ.get("MCP_CALLS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps([tool, arguments]) + "\n")


def _header(ctx: Context) -> str | None:
    request = getattr(ctx.request_context, "request", None)
    headers = getattr(request, "headers", None)
    return None if headers is None else headers.get("x-team")


@server.tool()
def search(ctx: Context, repo: str, limit: int = 10) -> list[str]:
    """Search the repository's open issues."""
    _record("search", {"repo": repo, "limit": limit, "team": _header(ctx)})
    return [f"{repo}#12 crash on start"][:limit]


@server.tool()
def deploy(version: str) -> dict[str, str]:
    """Deploy a version."""
    _record("deploy", {"version": version})
    if version == "frozen":
        raise ToolError("deploys are frozen until Monday")
    return {"deployed": version}


@server.tool(structured_output=False)
def status(version: str) -> str:
    """The deployment status of a version."""
    _record("status", {"version": version})
    return f"{version} is live"


@server.tool()
def crash() -> str:
    """Stop the server process at once (to test a server that died)."""
    _record("crash", {})
    os._exit(3)


if __name__ == "__main__":
    _record("started", {"pid": os.getpid()})
    if sys.argv[1] == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
