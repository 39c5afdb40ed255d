"""MCP servers as an agent's tools: a real server (tests/mcp_server.py, written with the
``mcp`` package) over stdio and over streamable HTTP, driven by workflows whose agent is
scripted. The server writes each call it receives to a file, so the tests see what
reached it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentflow import (
    END,
    START,
    Agent,
    HumanApproval,
    MCPServer,
    Next,
    RunFailedError,
    RunStatus,
    Workflow,
    WorkflowDefinitionError,
    WorkflowRunner,
    step,
    tool,
)
from agentflow.agents import AgentPools, AgentsConfig
from agentflow.testing import ApprovalRequested, MemoryJournal, ScriptedCall, ScriptedProvider, call

SERVER = str(Path(__file__).with_name("mcp_server.py"))


class Calls:
    """The calls a server received, read from the file it appends them to."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> list[tuple[str, dict[str, Any]]]:
        """The tool calls, in order."""
        return [(name, args) for name, args in self._lines() if name != "started"]

    def starts(self) -> int:
        """How many times a server process started."""
        return sum(name == "started" for name, _ in self._lines())

    def _lines(self) -> list[tuple[str, dict[str, Any]]]:
        if not self.path.exists():
            return []
        return [tuple(json.loads(line)) for line in self.path.read_text().splitlines()]  # type: ignore[misc]

    def clear(self) -> None:
        self.path.write_text("")


class HTTPServer:
    def __init__(self, url: str, calls: Calls) -> None:
        self.url = url
        self.calls = calls


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HTTPServer]:
    """The test server over streamable HTTP on a free loopback port, started once per module."""
    tmp = tmp_path_factory.mktemp("mcp_http")
    port = _free_port()
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, SERVER, "http", str(port)],
        env={**os.environ, "MCP_CALLS": str(tmp / "calls.jsonl")},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:  # until it answers
            assert proc.poll() is None, (tmp / "server.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the MCP server did not start listening"
                time.sleep(0.05)
        yield HTTPServer(f"http://127.0.0.1:{port}/mcp", Calls(tmp / "calls.jsonl"))
    finally:
        proc.kill()
        proc.wait()
        log.close()


@pytest.fixture
def http(http_server: HTTPServer) -> HTTPServer:
    http_server.calls.clear()
    return http_server


def _stdio(tmp_path: Path, **options: Any) -> tuple[MCPServer, Calls]:
    calls = Calls(tmp_path / "calls.jsonl")
    server = MCPServer.stdio(sys.executable, [SERVER, "stdio"], {"MCP_CALLS": str(calls.path)}, **options)
    return server, calls


def _workflow(model: ScriptedProvider, *tools: Any, **step_options: Any) -> Workflow:
    async def ship(ctx: Any) -> Next:
        async with ctx.agents.ops as ops:
            run = await ops.run("Ship 1.2 unless blocked")
        if ctx.attempt == 1 and step_options:
            raise ConnectionError("flaky after the tool calls")
        calls = [[c.name, c.arguments, c.result, c.error] for c in run.tool_calls]
        return Next(END, output={"text": run.text, "calls": calls})

    return (
        Workflow("Ship")
        .flow({START: step(ship, **step_options)})
        .agents({"ops": Agent(provider=model, model="m", tools=list(tools))})
    )


async def _result(wf: Workflow) -> Any:
    async with WorkflowRunner(wf) as runner:
        return (await (await runner.run()).result(timeout=20)).output


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_the_model_calls_the_servers_tools_and_gets_results_and_errors(
    transport: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if transport == "stdio":
        server, calls = _stdio(tmp_path)
    else:
        http: HTTPServer = request.getfixturevalue("http")
        server, calls = MCPServer.http(http.url, {"X-Team": "ops"}), http.calls
    model = ScriptedProvider(
        [
            [call("search", repo="acme/app"), call("deploy", version=3)],  # the second: a bad argument
            call("deploy", version="frozen"),  # the server reports an error
            call("status", version="1.2"),  # a text result
            "Shipped 1.2.",
        ]
    )
    output = await _result(_workflow(model, server))
    search, bad, frozen, status = output["calls"]
    assert search == ["search", {"repo": "acme/app"}, {"result": ["acme/app#12 crash on start"]}, None]
    assert bad[:3] == ["deploy", '{"version": 3}', None]
    assert bad[3].startswith("InvalidArguments: tool 'deploy': invalid arguments: version: 3 is not of type")
    assert frozen[2] is None and frozen[3].startswith("MCPToolError: MCP server ")
    assert frozen[3].endswith("tool 'deploy': Error executing tool deploy: deploys are frozen until Monday")
    assert status == ["status", {"version": "1.2"}, "1.2 is live", None]
    assert output["text"] == "Shipped 1.2."
    # What reached the server: every call but the one with a bad argument.
    team = "ops" if transport == "http" else None
    assert calls() == [
        ("search", {"repo": "acme/app", "limit": 10, "team": team}),
        ("deploy", {"version": "frozen"}),
        ("status", {"version": "1.2"}),
    ]
    assert transport == "http" or calls.starts() == 1  # connected once, not once per call
    # The model saw the server's tools and schemas, and the error as a tool error.
    shown = {t.name: t for t in model.requests[0].tools}
    assert set(shown) == {"search", "deploy", "status", "crash"}
    assert shown["search"].description == "Search the repository's open issues."
    assert shown["search"].parameters["required"] == ["repo"]
    assert model.tool_results[1][1][2] is True  # the bad argument
    assert model.tool_results[2][0][2] is True and "frozen until Monday" in model.tool_results[2][0][1]


async def test_a_retried_step_gets_the_tools_results_from_the_journal(http: HTTPServer) -> None:
    model = ScriptedProvider([call("deploy", version="1.2"), "Shipped."])
    server = MCPServer.http(http.url)
    output = await _result(_workflow(model, server, retry=2))
    assert output["calls"] == [["deploy", {"version": "1.2"}, {"deployed": "1.2"}, None]]
    assert http.calls() == [("deploy", {"version": "1.2"})]  # attempt 2 did not call it again
    assert len(model.requests) == 2


async def test_one_server_process_serves_every_run_and_one_that_died_is_started_again(
    tmp_path: Path,
) -> None:
    server, calls = _stdio(tmp_path)
    model = ScriptedProvider(
        [call("status", version="1"), "ok", call("crash"), call("status", version="2"), "ok again"]
    )
    wf = _workflow(model, server)
    async with WorkflowRunner(wf) as runner:
        first = (await (await runner.run()).result(timeout=20)).output
        second = (await (await runner.run()).result(timeout=20)).output
    assert first["calls"] == [["status", {"version": "1"}, "1 is live", None]]
    crashed, again = second["calls"]
    assert crashed[3].startswith("MCPToolError: MCP server 'python")
    assert "went away during the call of tool 'crash', which may or may not have run" in crashed[3]
    assert again == ["status", {"version": "2"}, "2 is live", None]
    assert [name for name, _ in calls()] == ["status", "crash", "status"]
    assert calls.starts() == 2  # one process for both runs, until it died; then one more


async def test_a_server_that_cannot_start_fails_the_step_naming_it(tmp_path: Path) -> None:
    failing = MCPServer.stdio(
        sys.executable, ["-c", "import sys; sys.exit('GITHUB_TOKEN is not set')"], name="github"
    )
    missing = MCPServer.stdio(str(tmp_path / "no-such-server"), name="nowhere")
    for server, says in ((failing, "GITHUB_TOKEN is not set"), (missing, "no-such-server")):
        model = ScriptedProvider(["never asked"])
        with pytest.raises(RunFailedError) as err:
            await _result(_workflow(model, server))
        message = str(err.value)
        assert f"MCP server {server.name!r} could not be started" in message and says in message
        assert model.requests == []


async def test_idempotent_and_approval_are_set_by_the_servers_tool_names(http: HTTPServer) -> None:
    gate = HumanApproval(approvers=["ops"])
    server = MCPServer.http(http.url, approval={"deploy": gate}, idempotent={"status": True})
    pools = AgentPools(AgentsConfig({"ops": Agent(provider=ScriptedProvider([]), model="m", tools=[server])}))
    try:
        tools = {t.name: t for t in await pools.tools("ops")}
        assert tools["deploy"].approval is gate  # type: ignore[attr-defined]
        assert tools["search"].approval is None  # type: ignore[attr-defined]
        assert tools["status"].idempotent and not tools["deploy"].idempotent
        assert await pools.tools("ops") == tuple(tools.values())  # listed once, kept
    finally:
        await pools.aclose()


async def test_a_call_cut_off_by_a_crash_runs_again_only_if_idempotent(http: HTTPServer) -> None:
    server = MCPServer.http(http.url, idempotent={"status": True})

    async def rerun(cut_off: ScriptedCall, answer: str) -> Any:
        # The process died while the call ran: the reply that asked for it (its intent) is
        # journaled, its result is not. Then the step runs again on that journal.
        journal = MemoryJournal(scope="3:Ship:", run_id="r1", step_name="Ship")
        crashed = AgentPools(AgentsConfig({"ops": Agent(provider=ScriptedProvider([cut_off]), model="m")}))
        async with crashed.accessor(journal).ops as ops:
            await ops._complete("agent:3:Ship::ops:1:1:t1", ops._build([], None, {}))
        await crashed.aclose()
        model = ScriptedProvider([answer])
        pools = AgentPools(AgentsConfig({"ops": Agent(provider=model, model="m", tools=[server])}))
        try:
            async with pools.accessor(journal).ops as ops:
                return await ops.run("Ship 1.2")
        finally:
            await pools.aclose()

    with pytest.raises(ApprovalRequested, match="waits for tool_outcome of deploy"):
        await rerun(call("deploy", version="1.2"), "never asked")
    assert http.calls() == []  # not idempotent: it is asked about, not sent again
    result = await rerun(call("status", version="1.2"), "live")
    assert http.calls() == [("status", {"version": "1.2"})]
    assert result.tool_calls[0].result == "1.2 is live" and result.text == "live"


async def test_a_call_of_an_mcp_tool_that_needs_approval_parks_the_run(http: HTTPServer) -> None:
    gate = HumanApproval(approvers=["ops"], prompt="Deploy this version?")
    server = MCPServer.http(http.url, approval={"deploy": gate})
    model = ScriptedProvider([call("deploy", version="1.2"), "Shipped."])
    async with WorkflowRunner(_workflow(model, server)) as runner:
        handle = await runner.run()
        info = await handle.wait_for(RunStatus.WAITING, timeout=10)
        (approval,) = info.approvals
        assert (approval.kind, approval.tool) == ("tool_call", "deploy")
        assert approval.arguments == {"version": "1.2"}
        assert approval.approvers == ("ops",) and approval.form is not None
        assert http.calls() == []  # nothing reached the server before the approval
        await runner.approve(handle.run_id, by="ops")
        result = await (await runner.attach(handle.run_id)).result(timeout=10)
    assert result.output["calls"] == [["deploy", {"version": "1.2"}, {"deployed": "1.2"}, None]]
    assert http.calls() == [("deploy", {"version": "1.2"})]


async def test_options_naming_no_tool_of_the_server_are_errors_naming_them(http: HTTPServer) -> None:
    server = MCPServer.http(http.url, idempotent={"stauts": True}, name="ops-server")
    with pytest.raises(RunFailedError) as err:
        await _result(_workflow(ScriptedProvider(["never asked"]), server))
    assert "MCP server 'ops-server': idempotent= names 'stauts', which the server does not have" in str(
        err.value
    )
    assert "its tools: crash, deploy, search, status" in str(err.value)


async def test_a_tool_name_two_sources_share_is_an_error_naming_both(http: HTTPServer) -> None:
    @tool
    def search(repo: str) -> list[str]:
        """Search somewhere else."""
        return []

    server = MCPServer.http(http.url, name="ops-server")
    pools = AgentPools(
        AgentsConfig({"ops": Agent(provider=ScriptedProvider([]), model="m", tools=[search, server])})
    )
    try:
        with pytest.raises(WorkflowDefinitionError) as err:
            await pools.tools("ops")
    finally:
        await pools.aclose()
    assert "tool 'search' of MCP server 'ops-server' has the name of tool 'search' of the agent's own" in str(
        err.value
    )


def test_declaration_mistakes_are_definition_errors() -> None:
    server = MCPServer.http("http://127.0.0.1:1/mcp")
    with pytest.raises(WorkflowDefinitionError, match="listed twice"):
        Agent(provider="openai", model="m", tools=[server, server])
    with pytest.raises(WorkflowDefinitionError, match="command must be a non-empty str"):
        MCPServer.stdio("")
    with pytest.raises(WorkflowDefinitionError, match="url must be an http"):
        MCPServer.http("localhost:8000")
    with pytest.raises(WorkflowDefinitionError, match=r"idempotent\['deploy'\] must be True or False"):
        MCPServer.stdio("npx", idempotent={"deploy": "yes"})  # type: ignore[dict-item]
    assert repr(MCPServer.stdio("npx", ["-y", "server-github"])) == "MCPServer.stdio('npx -y server-github')"
