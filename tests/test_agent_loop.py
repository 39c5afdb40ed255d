"""The agent loop on its own (agents.loop): turns, concurrent tool calls, errors back to the
model, max_turns, structured answers, and the journal that keeps re-runs from calling a
model or running a tool twice. Through the scripted provider and through both real SDKs
against tests/llm_server.py."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from llm_server import LLMServer, Reply, ToolCall
from pydantic import BaseModel

from agentflow.agents import Agent, AgentPools, AgentsConfig
from agentflow.agents.loop import AgentRun
from agentflow.definition.tools import ToolContext, tool
from agentflow.errors import MaxTurnsExceeded
from agentflow.testing import ApprovalRequested, MemoryJournal, ScriptedCall, ScriptedProvider, call


class Calls:
    """What the tools saw, to count executions."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []


CALLS = Calls()


@tool
async def search(ctx: ToolContext, repo: str) -> list[str]:
    """Open issues of a repository."""
    CALLS.log.append(("search", (repo, ctx.idempotency_key)))
    await asyncio.sleep(0.05)
    return [f"{repo}#12 crash on start"]


@tool(timeout=5)
def read_file(path: str) -> str:
    """Read a file (sync with a timeout: runs in a worker thread)."""
    CALLS.log.append(("read_file", path))
    time.sleep(0.05)
    return f"contents of {path}"


@tool(idempotent=False)
async def deploy(ctx: ToolContext, version: str) -> dict[str, Any]:
    """Deploy a version."""
    CALLS.log.append(("deploy", (version, ctx.idempotency_key)))
    if version == "bad":
        raise PermissionError("deploys are frozen")
    return {"deployed": version}


@tool(idempotent=True)
async def status(version: str) -> str:
    """Deployment status."""
    CALLS.log.append(("status", version))
    return "live"


class Verdict(BaseModel):
    ship: bool
    why: str


TOOLS = (search, read_file, deploy, status)


@pytest.fixture(autouse=True)
def _clear() -> None:
    CALLS.log.clear()


async def loop(
    script: list[Any],
    prompt: str = "Ship 1.2 unless blocked",
    journal: MemoryJournal | None = None,
    **kwargs: Any,
) -> tuple[AgentRun, ScriptedProvider, MemoryJournal]:
    model = ScriptedProvider(script)
    journal = journal or MemoryJournal(scope="3:Ship:", run_id="r1", step_name="Ship")
    pools = AgentPools(AgentsConfig({"ops": Agent(provider=model, model="m", tools=TOOLS)}))
    try:
        async with pools.accessor(journal).ops as ops:
            result = await ops.run(prompt, **kwargs)
    finally:
        await pools.aclose()
    return result, model, journal


async def test_the_loop_runs_tools_until_the_model_answers() -> None:
    result, model, journal = await loop([call("search", repo="acme/app"), "Blocked by #12."])
    assert result.text == "Blocked by #12." and result.turns == 2 and result.output is None
    (c,) = result.tool_calls
    assert (c.name, c.arguments, c.result, c.error) == (
        "search",
        {"repo": "acme/app"},
        ["acme/app#12 crash on start"],
        None,
    )
    assert c.duration >= 0.05
    assert model.tool_results[1] == [("call_1", '["acme/app#12 crash on start"]', False)]
    second = model.requests[1]
    assert [m.role for m in second.messages] == ["user", "assistant", "tool"]
    assert [t.name for t in second.tools] == ["search", "read_file", "deploy", "status"]
    assert result.usage.total_tokens == journal.usage.total_tokens > 0
    kinds = [k for k, _ in journal.events]
    assert kinds == ["tool_started", "tool_completed"]


async def test_calls_of_one_turn_run_concurrently_and_answer_in_the_models_order() -> None:
    turn = [call("read_file", path="a"), call("search", repo="x/y"), call("read_file", path="b")]
    started = time.perf_counter()
    result, model, _ = await loop([turn, "done"])
    elapsed = time.perf_counter() - started
    assert elapsed < 0.14  # three 50 ms calls at once, not one after the other
    assert [c.call_id for c in result.tool_calls] == ["call_1", "call_2", "call_3"]
    assert [r[0] for r in model.tool_results[1]] == ["call_1", "call_2", "call_3"]
    assert model.tool_results[1][2][1] == "contents of b"


async def test_bad_calls_go_back_to_the_model_and_never_reach_a_tool() -> None:
    turn = [
        call("nope", x=1),
        call("deploy", version=3),  # not a str
        ScriptedCall("deploy", raw='{"version": "1.2"'),  # not JSON
        call("deploy", version="1.2", force=True),  # unknown argument
        call("deploy", version="bad"),  # the tool raises
    ]
    result, model, journal = await loop([turn, "I could not deploy."])
    assert result.text == "I could not deploy."
    errors = [c.error for c in result.tool_calls]
    assert errors[0] is not None and errors[0].startswith(
        "UnknownTool: no tool named 'nope'; tools: deploy, "
    )
    assert errors[1] is not None and "InvalidArguments" in errors[1] and "version" in errors[1]
    assert errors[2] is not None and "InvalidArguments" in errors[2]
    assert errors[3] is not None and "force" in errors[3] and "Extra inputs" in errors[3]
    assert errors[4] == "PermissionError: deploys are frozen"
    assert [name for name, _ in CALLS.log] == ["deploy"]  # only the valid call ran
    sent = model.tool_results[1]
    assert all(is_error for _, _, is_error in sent)
    assert sent[4][1] == "PermissionError: deploys are frozen"
    assert [k for k, _ in journal.events].count("tool_failed") == 5


async def test_max_turns_counts_model_calls_and_names_run_step_and_agent() -> None:
    with pytest.raises(MaxTurnsExceeded, match=r"run r1, step 'Ship': agent 'ops' still called tools"):
        await loop([call("status", version="1"), call("status", version="2")], max_turns=2)
    assert [v for _, v in CALLS.log] == ["1"]  # the second call's tools are not run
    result, _, _ = await loop([call("status", version="1"), "live"], max_turns=2)
    assert result.turns == 2


async def test_a_structured_answer_is_validated_and_repaired_within_the_turns() -> None:
    result, model, _ = await loop(
        [call("status", version="1"), {"ship": "maybe"}, {"ship": True, "why": "live"}], output=Verdict
    )
    assert result.output == Verdict(ship=True, why="live") and result.turns == 3
    assert "does not match the required schema" in model.requests[2].messages[-1].content
    assert model.requests[0].output_schema == Verdict.model_json_schema()


async def test_a_rerun_replays_turns_and_calls_without_calling_anything_twice() -> None:
    script = [
        call("search", repo="a/b"),
        [call("deploy", version="1.2"), call("status", version="1.2")],
        "Shipped.",
    ]
    first, model, journal = await loop(script)
    assert first.text == "Shipped." and len(model.requests) == 3
    keys = [c[1][1] for c in CALLS.log if c[0] in ("search", "deploy")]
    CALLS.log.clear()
    # The same step runs again (a retry, a recovery): same journal, a model with no script.
    again, idle, _ = await loop([], journal=journal)
    assert again == first.__class__(first.text, None, again.usage, again.tool_calls, 3)
    assert [c.to_json() for c in again.tool_calls] == [c.to_json() for c in first.tool_calls]
    assert idle.requests == [] and CALLS.log == []
    assert len(set(keys)) == 2 and all(k.startswith("r1/") for k in keys)


async def test_journal_writes_one_per_turn_plus_one_per_non_idempotent_call() -> None:
    script = [[call("deploy", version="1"), call("deploy", version="2"), call("status", version="1")], "ok"]
    _, _, journal = await loop(script)
    # 2 replies, 2 deploy results at once; the idempotent status result rides with the 2nd reply
    assert journal.writes == 4
    assert sum(1 for k in journal.entries if ":call:" in k) == 3


async def test_a_non_idempotent_call_whose_outcome_is_unknown_is_not_run_again() -> None:
    # The process died while deploy ran: its reply (the intent) is journaled, no result.
    journal = MemoryJournal(scope="3:Ship:", run_id="r1", step_name="Ship")
    crashed = ScriptedProvider([call("deploy", version="1.2")])
    pools = AgentPools(AgentsConfig({"ops": Agent(provider=crashed, model="m", tools=TOOLS)}))
    async with pools.accessor(journal).ops as ops:
        await ops._complete("agent:3:Ship::ops:1:1:t1", ops._build([], None, {}))
    await pools.aclose()
    with pytest.raises(ApprovalRequested, match=r"waits for tool_outcome of deploy") as err:
        await loop([], journal=journal)
    ((key, asked),) = err.value.approvals
    assert asked["kind"] == "tool_outcome" and asked["tool"] == "deploy" and CALLS.log == []
    assert asked["idempotency_key"] == "r1/agent:3:Ship::ops:1:1:t1/call_1" and key.endswith(":outcome:1")
    # An idempotent call in the same spot simply runs again.
    journal2 = MemoryJournal(scope="3:Ship:", run_id="r1", step_name="Ship")
    crashed2 = ScriptedProvider([call("status", version="1.2")])
    pools = AgentPools(AgentsConfig({"ops": Agent(provider=crashed2, model="m", tools=TOOLS)}))
    async with pools.accessor(journal2).ops as ops:
        await ops._complete("agent:3:Ship::ops:1:1:t1", ops._build([], None, {}))
    await pools.aclose()
    result, _, _ = await loop(["live"], journal=journal2)
    assert CALLS.log == [("status", "1.2")] and result.text == "live"


async def test_a_tool_result_json_cannot_carry_is_a_tool_error() -> None:
    @tool
    def opaque() -> object:
        """Return something odd."""
        return object()

    model = ScriptedProvider([call("opaque"), "sorry"])
    pools = AgentPools(AgentsConfig({"ops": Agent(provider=model, model="m", tools=[opaque])}))
    async with pools.accessor(MemoryJournal()).ops as ops:
        result = await ops.run("go")
    await pools.aclose()
    (c,) = result.tool_calls
    assert c.error is not None and c.error.startswith(
        "TypeError: tool 'opaque' returned a value JSON cannot carry"
    )


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_the_loop_over_the_real_sdks(kind: str, llm_env: LLMServer) -> None:
    llm_env.script(
        Reply(
            text="Looking.",
            tool_calls=[
                ToolCall("search", {"repo": "a/b"}, id="c1"),
                ToolCall("status", {"version": "1"}, id="c2"),
            ],
        ),
        "Blocked by #12.",
    )
    pools = AgentPools(AgentsConfig({"ops": Agent(provider=kind, model="m", tools=TOOLS)}))
    try:
        async with pools.accessor(MemoryJournal()).ops as ops:
            result = await ops.run("ship?")
    finally:
        await pools.aclose()
    assert result.text == "Blocked by #12." and [c.name for c in result.tool_calls] == ["search", "status"]
    second = llm_env.requests[1].body["messages"]
    if kind == "openai":
        assert [m["role"] for m in second] == ["user", "assistant", "tool", "tool"]
        assert json.loads(second[2]["content"]) == ["a/b#12 crash on start"]
    else:
        assert [m["role"] for m in second] == ["user", "assistant", "user"]
        assert [b["tool_use_id"] for b in second[2]["content"]] == ["c1", "c2"]


async def test_a_tool_that_needs_approval_is_never_run_without_it() -> None:
    from agentflow import HumanApproval

    @tool(approval=HumanApproval(approvers=["ops-lead"]))
    async def guarded(version: str) -> str:
        """Deploy for real."""
        CALLS.log.append(("guarded", version))
        return "done"

    model = ScriptedProvider([call("guarded", version="1"), "ok"])
    pools = AgentPools(AgentsConfig({"ops": Agent(provider=model, model="m", tools=[guarded])}))
    async with pools.accessor(MemoryJournal()).ops as ops:
        with pytest.raises(ApprovalRequested) as err:
            await ops.run("go")
    await pools.aclose()
    ((_, asked),) = err.value.approvals
    assert (asked["kind"], asked["tool"], asked["arguments"], asked["approvers"]) == (
        "tool_call",
        "guarded",
        {"version": "1"},
        ["ops-lead"],
    )
    assert CALLS.log == []


async def test_a_sync_tool_without_a_timeout_runs_inline_and_one_with_a_timeout_in_a_thread() -> None:
    import threading

    seen: list[str] = []

    @tool
    def inline() -> str:
        """On the loop's thread."""
        seen.append(threading.current_thread().name)
        return "ok"

    @tool(timeout=1)
    def threaded() -> str:
        """In a worker thread."""
        seen.append(threading.current_thread().name)
        return "ok"

    model = ScriptedProvider([[call("inline"), call("threaded")], "done"])
    pools = AgentPools(AgentsConfig({"ops": Agent(provider=model, model="m", tools=[inline, threaded])}))
    async with pools.accessor(MemoryJournal()).ops as ops:
        await ops.run("go")
    await pools.aclose()
    assert seen[0] == threading.current_thread().name and seen[1] != seen[0]


@pytest.mark.parametrize("kind", ["scripted", "openai", "anthropic"])
async def test_stream_streams_the_loop_and_replays_it_as_one_delta(kind: str, llm_env: LLMServer) -> None:
    if kind == "scripted":
        provider: Any = ScriptedProvider([call("status", version="1"), "It is live, ship it."])
    else:
        llm_env.script(
            Reply(tool_calls=[ToolCall("status", {"version": "1"}, id="c1")]), "It is live, ship it."
        )
        provider = kind
    journal = MemoryJournal(scope="1:Ship:", run_id="r1", step_name="Ship")
    pools = AgentPools(AgentsConfig({"ops": Agent(provider=provider, model="m", tools=TOOLS)}))
    try:
        async with pools.accessor(journal).ops as ops:
            deltas = [d async for d in ops.stream("ship?", max_turns=3)]
        assert len(deltas) > 1 and "".join(deltas) == "It is live, ship it."
        assert ops.last_run is not None and [c.name for c in ops.last_run.tool_calls] == ["status"]
        assert ops.last_run.turns == 2 and CALLS.log == [("status", "1")]
        async with pools.accessor(journal).ops as again:  # the step runs again: all from the journal
            replayed = [d async for d in again.stream("ship?", max_turns=3)]
        assert replayed == ["It is live, ship it."] and CALLS.log == [("status", "1")]
    finally:
        await pools.aclose()


async def test_a_streamed_loop_past_max_turns_raises() -> None:
    model = ScriptedProvider([call("status", version="1"), call("status", version="2")])
    pools = AgentPools(AgentsConfig({"ops": Agent(provider=model, model="m", tools=TOOLS)}))
    try:
        async with pools.accessor(MemoryJournal()).ops as ops:
            with pytest.raises(MaxTurnsExceeded):
                async for _ in ops.stream("go", max_turns=2):
                    pass
            assert ops.last_run is None
    finally:
        await pools.aclose()
