"""Agents inside flows: real SDKs against the local server, the journal, leaks, stop, budgets."""

from __future__ import annotations

import asyncio
import collections

import pytest
from pydantic import BaseModel
from test_crash import _finish, _kill, _lines, _spawn, _target, _wait_for

from agentflow import (
    END,
    START,
    Agent,
    Next,
    RunFailedError,
    RunStatus,
    TokenBudget,
    Workflow,
    WorkflowRunner,
    step,
)
from agentflow.testing import ScriptedProvider


class Review(BaseModel):
    score: int
    issues: list[str]


@pytest.fixture
def providers_env(llm_env):
    return llm_env


async def test_openai_and_anthropic_agents_in_one_flow(providers_env):
    server = providers_env
    server.script("Faster builds and fewer bugs.", {"score": 8, "issues": ["say which bugs"]})

    async def draft(ctx):
        async with ctx.agents.writer as w:
            reply = await w.send("notes please")
        return Next("Critique", output=reply.text)

    async def critique(ctx):
        critic = await ctx.agents["critic"]
        try:
            reply = await critic.send(ctx.step_results["Draft"])
        finally:
            await critic.close()
        assert isinstance(reply.output, Review)
        return Next(END, output={"score": reply.output.score, "tokens": reply.usage.total_tokens})

    wf = (
        Workflow("Notes")
        .flow({START: lambda ctx: "Draft", "Draft": draft, "Critique": critique})
        .agents(
            {
                "writer": Agent(provider="openai", model="gpt-4o-mini"),
                "critic": Agent(provider="anthropic", model="claude-sonnet-5-5", output=Review),
            }
        )
    )
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run()
        result = await handle.result(timeout=20)
        info = await handle.info()
        stats = runner.agent_statistics()
        steps = [
            e async for e in handle.events() if e.kind == "step_completed" and e.data and "usage" in e.data
        ]
    assert result.output["score"] == 8
    assert [r.protocol for r in server.requests] == ["openai", "anthropic"]
    assert info.usage.input_tokens > 0 and info.usage.output_tokens > 0
    assert {e.step for e in steps} == {"Draft", "Critique"}
    total = sum(e.data["usage"]["input_tokens"] + e.data["usage"]["output_tokens"] for e in steps)
    assert total == info.usage.total_tokens
    assert stats["writer"].open == 0 and stats["writer"].total_calls == 1
    assert stats["critic"].total_calls == 1


async def test_a_retried_step_gets_its_finished_agent_call_from_the_journal(providers_env):
    server = providers_env
    server.script("the one reply")
    attempts = []

    @step(retry=2)
    async def ask(ctx):
        attempts.append(ctx.attempt)
        async with ctx.agents.writer as w:
            reply = await w.send("hello")
        if ctx.attempt == 1:
            raise ConnectionError("flaky after the call")
        return Next(END, output=reply.text)

    wf = Workflow("Retry").flow({START: ask}).agents({"writer": Agent(provider="openai", model="m")})
    async with WorkflowRunner(wf) as runner:
        result = await (await runner.run()).result(timeout=20)
    assert attempts == [1, 2]
    assert result.output == "the one reply"
    assert len(server.requests) == 1  # the second attempt did not call (or pay) again


async def test_leaked_handles_are_closed_with_an_event_and_stop_closes_handles():
    provider = ScriptedProvider(["hi"] * 5)
    started = asyncio.Event()

    async def leaky(ctx):
        writer = await ctx.agents.writer
        await writer.send("x")  # never closed
        return "Hang"

    async def hang(ctx):
        await ctx.agents.writer
        started.set()
        await asyncio.sleep(60)
        return END

    wf = (
        Workflow("Leak")
        .flow({START: leaky, "Hang": hang})
        .agents({"writer": Agent(provider=provider, model="m")}, max_handles=1)
    )
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run()
        await asyncio.wait_for(started.wait(), 5)
        # max_handles=1: "Hang" could only acquire because the engine closed the leaked handle.
        assert runner.agent_statistics()["writer"].open == 1
        await handle.stop()
        assert runner.agent_statistics()["writer"].open == 0
        assert (await handle.info()).status == RunStatus.STOPPED
        leaks = [e async for e in handle.events() if e.kind == "agent_leak"]
    assert leaks and leaks[0].data["agent"] == "writer"


async def test_budget_refuses_the_call_before_it_is_sent(providers_env):
    server = providers_env
    server.script("a long answer " * 20)

    async def ask(ctx):
        async with ctx.agents.writer as w:
            await w.send("first")
            await w.send("second")  # the budget is spent by now
        return END

    wf = (
        Workflow("Budget")
        .flow({START: ask})
        .agents({"writer": Agent(provider="openai", model="m")}, budget=TokenBudget(max_tokens=10))
    )
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run()
        with pytest.raises(RunFailedError) as info:
            await handle.result(timeout=20)
    assert info.value.error_type == "BudgetExceededError"
    assert len(server.requests) == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_sigkill_right_after_an_agent_call_replays_the_journaled_reply(
    kind, tmp_path, request, llm_server, monkeypatch
):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", llm_server.openai_base_url)
    llm_server.script("journaled reply", "a second, different reply")
    target = _target(kind, tmp_path, request)
    log = tmp_path / "agent.log"
    first = _spawn("start", "agent", kind, target, log, "agent-1", block=True)
    _wait_for(log, lambda ls: any(w == "replied" for w, _, _ in ls), first)
    _kill(first)
    second = _spawn("recover", "agent", kind, target, log, "agent-1", block=False)
    out = _finish(second)
    assert "journaled reply" in out
    assert len(llm_server.requests) == 1  # the recovered step did not call the provider again
    lines = collections.Counter((w, n) for w, n, _ in _lines(log))
    assert lines[("start", "Ask")] == 2 and lines[("replied", "journaled_reply")] == 2
