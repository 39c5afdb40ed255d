"""``agent_delta``: the text of a streaming model reaches the run's watchers live, and is never stored."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from llm_server import LLMServer, Reply, ToolCall

from agentflow import END, START, Agent, Next, RunEvent, RunFailedError, Workflow, WorkflowRunner, tool
from agentflow.agents import ProviderReply, ToolUse
from agentflow.testing import ScriptedProvider


@tool(idempotent=True)
def status(version: str) -> str:
    """Deployment status of a version."""
    return "live"


def workflow(agent: Agent, body: Any, go: asyncio.Event, **persistence: Any) -> Workflow:
    """One step, ``Ship``, that waits for ``go`` (a watcher is there) and then runs ``body(ops)``."""

    async def ship(ctx: Any) -> Next:
        await go.wait()
        async with ctx.agents.ops as ops:
            text = await body(ops)
        return Next(END, output=text)

    return (
        Workflow("Deltas")
        .flow({START: lambda ctx: "Ship", "Ship": ship})
        .agents({"ops": agent})
        .persistence(**(persistence or {"store": "memory"}))
    )


async def streamed(ops: Any, **kwargs: Any) -> str:
    return "".join([d async for d in ops.stream("Ship 1.2?", **kwargs)])


async def watch(handle: Any, go: asyncio.Event) -> list[RunEvent]:
    """Every event of the run; its step goes on once the first was seen (the watcher is there)."""
    seen = []
    async for ev in handle.events():
        seen.append(ev)
        go.set()
    return seen


async def watched(runner: WorkflowRunner, go: asyncio.Event) -> tuple[Any, list[RunEvent]]:
    handle = await runner.run()
    return handle, await watch(handle, go)


def deltas(events: list[RunEvent]) -> list[RunEvent]:
    return [e for e in events if e.kind == "agent_delta"]


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_stream_deltas_reach_a_watcher_in_order_before_the_step_completes(store, tmp_path) -> None:
    model = ScriptedProvider(["Ship it: all checks pass."])
    persistence = {"store": store, "path": str(tmp_path / "af.db")} if store == "sqlite" else {}
    go = asyncio.Event()
    wf = workflow(Agent(provider=model, model="m"), streamed, go, **persistence)
    async with WorkflowRunner(wf) as runner:
        handle, seen = await watched(runner, go)
        result = await handle.result()
        stored = [e async for e in handle.events()]
        assert not runner.supervisor.notifier.watching  # both watchers left
    assert result.output == "Ship it: all checks pass."
    live = deltas(seen)
    assert [e.data["text"] for e in live] == ["Ship ", "it: ", "all ", "checks ", "pass."]
    assert {(e.step, e.data["agent"]) for e in live} == {("Ship", "ops")}
    assert len({e.data["call"] for e in live}) == 1
    kinds = [(e.kind, e.step) for e in seen]
    at = [i for i, k in enumerate(kinds) if k[0] == "agent_delta"]
    assert kinds.index(("step_started", "Ship")) < at[0]
    assert at == list(range(at[0], at[0] + len(at)))
    assert at[-1] < kinds.index(("step_completed", "Ship"))
    # Never stored, and the stored sequence has no gap where they were.
    assert not deltas(stored)
    assert [e.seq for e in stored] == list(range(1, len(stored) + 1))
    assert [e for e in seen if e.kind != "agent_delta"] == stored
    # A delta takes no number of its own: it carries the seq of the stored event it follows.
    last = 0
    for ev in seen:
        if ev.kind == "agent_delta":
            assert ev.seq == last
        else:
            last = ev.seq


async def test_a_streamed_loop_over_the_openai_sdk_sends_every_turns_text(llm_env: LLMServer) -> None:
    llm_env.script(
        Reply(text="Checking the status.", tool_calls=[ToolCall("status", {"version": "1.2"})]),
        "It is live, ship it.",
    )
    agent = Agent(provider="openai", model="gpt-4o-mini", tools=[status])
    go = asyncio.Event()
    async with WorkflowRunner(workflow(agent, streamed, go)) as runner:
        handle, seen = await watched(runner, go)
        result = await handle.result()
        stored = [e async for e in handle.events()]
    assert result.output == "Checking the status.It is live, ship it."
    assert all(r.stream for r in llm_env.requests)
    live = deltas(seen)
    calls = list(dict.fromkeys(e.data["call"] for e in live))
    assert len(calls) == 2  # one model call per turn
    by_call = {c: "".join(e.data["text"] for e in live if e.data["call"] == c) for c in calls}
    assert list(by_call.values()) == ["Checking the status.", "It is live, ship it."]
    kinds = [(e.kind, e.step) for e in seen]
    at = [i for i, k in enumerate(kinds) if k[0] == "agent_delta"]
    # The first turn's text, then the tool's events, then the second turn's text.
    names = [k for k, _ in kinds]
    assert at[0] < names.index("tool_started") < names.index("tool_completed") < at[-1]
    assert at[-1] < kinds.index(("step_completed", "Ship"))
    assert not deltas(stored)


async def test_run_streams_while_watched_and_does_not_when_nobody_watches(llm_env: LLMServer) -> None:
    async def run(ops: Any) -> str:
        return str((await ops.run("Ship 1.2?", max_turns=3)).text)

    agent = Agent(provider="openai", model="gpt-4o-mini", tools=[status])
    go = asyncio.Event()
    async with WorkflowRunner(workflow(agent, run, go)) as runner:
        llm_env.script(Reply(tool_calls=[ToolCall("status", {"version": "1.2"})]), "Ship it.")
        handle, seen = await watched(runner, go)
        assert (await handle.result()).output == "Ship it."
        assert [r.stream for r in llm_env.requests] == [True, True]
        assert [e.data["text"] for e in deltas(seen)] == ["Ship ", "it."]

        llm_env.reset()
        llm_env.script(Reply(tool_calls=[ToolCall("status", {"version": "1.3"})]), "Ship it too.")
        unwatched = await runner.run()
        assert (await unwatched.result()).output == "Ship it too."
        assert [r.stream for r in llm_env.requests] == [False, False]
        assert not deltas([e async for e in unwatched.events()])


async def test_a_replayed_turn_sends_its_journaled_text_as_one_delta() -> None:
    first = ProviderReply("Checking the status.", tool_calls=(ToolUse("c1", "status", '{"version": "1.2"}'),))
    model = ScriptedProvider([first, RuntimeError("provider down"), "Ship it."])
    go = asyncio.Event()
    async with WorkflowRunner(
        workflow(Agent(provider=model, model="m", tools=[status]), streamed, go)
    ) as runner:
        handle, seen = await watched(runner, go)
        assert [e.data["text"] for e in deltas(seen)] == ["Checking ", "the ", "status."]
        with pytest.raises(RunFailedError, match="provider down"):
            await handle.result()
        go.clear()
        retried = await handle.retry()
        again = await watch(retried, go)
        assert (await retried.result()).output == "Checking the status.Ship it."
    # The journaled first turn comes back whole, then the new turn streams.
    assert [e.data["text"] for e in deltas(again)] == ["Checking the status.", "Ship ", "it."]
    assert len(model.requests) == 3
