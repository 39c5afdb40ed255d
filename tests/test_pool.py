"""The agent pool: limits, fairness, timeouts, leaks, journal replay, budget, structured output."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import BaseModel

from agentflow.agents import Agent, AgentsConfig, ProviderReply, ProviderRequest, TokenBudget
from agentflow.agents import pool as pool_module
from agentflow.agents.pool import AgentPools, PoolStatistics, load_provider
from agentflow.errors import (
    AgentflowError,
    BudgetExceededError,
    OutputValidationError,
    PoolTimeoutError,
    ProviderError,
    WorkflowDefinitionError,
)
from agentflow.testing import MemoryJournal, ScriptedProvider
from agentflow.types import Usage


class Review(BaseModel):
    score: int
    summary: str


def make(
    replies: list[Any] | None = None,
    *,
    max_handles: int = 2,
    timeout: float | None = None,
    budget: int | None = None,
    latency: float = 0.0,
    **agent: Any,
) -> tuple[AgentPools, ScriptedProvider]:
    provider = ScriptedProvider(replies or [], latency=latency)
    config = AgentsConfig(
        {
            "writer": Agent(provider=provider, model="test", **agent),
            "critic": Agent(provider=provider, model="t"),
        },
        max_handles=max_handles,
        acquire_timeout=timeout,
        budget=TokenBudget(budget) if budget is not None else None,
    )
    return AgentPools(config), provider


async def test_acquire_send_close_three_ways() -> None:
    pools, provider = make(["one", "two", "three"])
    agents = pools.accessor(MemoryJournal())
    writer = await agents.writer
    assert (await writer.send("hello")).text == "one"
    await writer.close()
    handle = await agents["writer"]
    assert (await handle.send("again")).text == "two"
    await handle.close()
    async with agents.critic as critic:
        reply = await critic.send("review")
        assert pools.statistics()["critic"].open == 1
    assert reply.text == "three"
    assert reply.usage == Usage(1, 1)
    assert critic.closed and pools.statistics()["critic"] == PoolStatistics(0, 0, 2, 1)
    assert provider.prompts == ["hello", "again", "review"]


async def test_conversation_is_kept_per_handle() -> None:
    pools, provider = make(["a", "b"], instructions="Be brief.", temperature=0.3)
    agents = pools.accessor(MemoryJournal())
    async with agents.writer as writer:
        await writer.send("first")
        await writer.send("second", max_tokens=50, top_p=0.9)
        assert [(m.role, m.content) for m in writer.history] == [
            ("user", "first"),
            ("assistant", "a"),
            ("user", "second"),
            ("assistant", "b"),
        ]
    last = provider.requests[-1]
    assert [m.content for m in last.messages] == ["first", "a", "second"]
    assert (last.instructions, last.temperature, last.max_tokens) == ("Be brief.", 0.3, 50)
    assert last.options == {"top_p": 0.9}
    assert writer.history[-1].content == "b"  # still readable after close


async def test_unknown_agent_lists_known_ones() -> None:
    pools, _ = make()
    agents = pools.accessor(MemoryJournal())
    with pytest.raises(AgentflowError, match=r"unknown agent 'wrtier'; known agents: critic, writer"):
        agents.wrtier  # noqa: B018
    with pytest.raises(AgentflowError, match="wrtier"):
        agents["wrtier"]
    assert "writer" in agents and agents.names == ["writer", "critic"]


async def test_max_handles_respected_under_50_concurrent_acquirers() -> None:
    pools, _ = make(max_handles=4)
    agents = pools.accessor(MemoryJournal())
    holding = peak = 0
    seen_waiting = 0

    async def worker() -> None:
        nonlocal holding, peak, seen_waiting
        async with agents.writer:
            holding += 1
            peak = max(peak, holding)
            seen_waiting = max(seen_waiting, pools.statistics()["writer"].waiting)
            await asyncio.sleep(0.002)
            holding -= 1

    async with asyncio.TaskGroup() as tg:
        for _ in range(50):
            tg.create_task(worker())
    assert peak == 4
    assert seen_waiting >= 40
    assert pools.statistics()["writer"] == PoolStatistics(open=0, waiting=0, max_handles=4, total_calls=0)


async def test_waiters_are_served_first_come_first_served() -> None:
    pools, _ = make(max_handles=1)
    agents = pools.accessor(MemoryJournal())
    first = await agents.writer
    order: list[int] = []

    async def waiter(i: int) -> None:
        handle = await agents.writer
        order.append(i)
        await asyncio.sleep(0)
        await handle.close()

    tasks = []
    for i in range(10):
        tasks.append(asyncio.create_task(waiter(i)))
        await asyncio.sleep(0)  # queue them in this order
    assert pools.statistics()["writer"].waiting == 10
    await first.close()
    # A newcomer arriving right after the release must queue behind the ten waiters.
    late = await agents.writer
    order.append(99)
    await late.close()
    await asyncio.gather(*tasks)
    assert order == [*range(10), 99]


async def test_acquire_timeout_raises_pool_timeout_error_and_leaves_no_waiter() -> None:
    pools, _ = make(max_handles=1, timeout=0.05)
    agents = pools.accessor(MemoryJournal())
    held = await agents.writer
    with pytest.raises(PoolTimeoutError) as caught:
        await agents.writer
    message = str(caught.value)
    assert "'writer'" in message and "max_handles=1" in message and "0.05" in message
    assert pools.statistics()["writer"].waiting == 0
    await held.close()
    assert pools.statistics()["writer"].open == 0
    async with agents.writer:  # the pool still works
        pass


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    pools, _ = make(max_handles=1)
    agents = pools.accessor(MemoryJournal())
    held = await agents.writer
    blocked = asyncio.create_task(agents.writer.__aenter__())
    await asyncio.sleep(0)
    await held.close()  # hands the slot to the waiter...
    blocked.cancel()  # ...which is cancelled before it wakes: it must pass the slot on
    with pytest.raises(asyncio.CancelledError):
        await blocked
    assert pools.statistics()["writer"] == PoolStatistics(0, 0, 1, 0)


async def test_uncontended_acquire_never_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    pools, _ = make(max_handles=1)
    agents = pools.accessor(MemoryJournal())

    async def must_not_wait(self: Any) -> None:
        raise AssertionError("the uncontended path must not create a future")

    monkeypatch.setattr(pool_module._Pool, "wait", must_not_wait)
    for _ in range(3):
        handle = await agents.writer
        await handle.close()


async def test_close_is_idempotent_and_closed_handles_refuse_calls() -> None:
    pools, _ = make(["x"])
    agents = pools.accessor(MemoryJournal())
    handle = await agents.writer
    await handle.close()
    await handle.close()
    assert pools.statistics()["writer"].open == 0
    with pytest.raises(AgentflowError, match="closed"):
        await handle.send("hi")


async def test_one_call_at_a_time_per_handle() -> None:
    pools, _ = make(["a", "b"], latency=0.01)
    agents = pools.accessor(MemoryJournal())
    async with agents.writer as writer:
        first = asyncio.create_task(writer.send("one"))
        await asyncio.sleep(0)
        with pytest.raises(AgentflowError, match="in flight"):
            await writer.send("two")
        assert (await first).text == "a"


async def test_close_all_closes_leaks_and_emits_agent_leak() -> None:
    pools, _ = make(max_handles=3)
    journal = MemoryJournal()
    agents = pools.accessor(journal)
    closed = await agents.writer
    leaked_writer = await agents.writer
    leaked_critic = await agents.critic
    await closed.close()
    assert await agents.close_all() == ["writer", "critic"]
    assert journal.events == [("agent_leak", {"agent": "writer"}), ("agent_leak", {"agent": "critic"})]
    assert leaked_writer.closed and leaked_critic.closed
    assert all(s.open == 0 for s in pools.statistics().values())
    assert await agents.close_all() == []


async def test_finished_calls_replay_from_the_journal_without_calling_the_provider() -> None:
    pools, provider = make(["draft one", "draft two", "streamed reply"])
    first = MemoryJournal(scope="run1:3:draft")
    agents = pools.accessor(first)
    async with agents.writer as writer:
        await writer.send("a")
        await writer.send("b")
    async with agents.writer as writer:
        assert "".join([d async for d in writer.stream("c")]) == "streamed reply"
    assert list(first.entries) == [
        "agent:run1:3:draft:writer:1:1",
        "agent:run1:3:draft:writer:1:2",
        "agent:run1:3:draft:writer:2:1",
    ]
    spent = first.usage

    # The step runs again after a crash: same scope, a fresh pool, an empty script.
    again_pools, again_provider = make([])
    again = MemoryJournal(scope="run1:3:draft", entries=first.entries)
    agents = again_pools.accessor(again)
    async with agents.writer as writer:
        replies = [await writer.send("a"), await writer.send("b")]
        assert [r.text for r in replies] == ["draft one", "draft two"]
        assert [m.content for m in writer.history] == ["a", "draft one", "b", "draft two"]
    async with agents.writer as writer:
        assert [d async for d in writer.stream("c")] == ["streamed reply"]
        assert writer.last_reply is not None and writer.last_reply.text == "streamed reply"
    assert again_provider.requests == []
    assert again.usage == Usage()  # nothing counted twice
    assert again_pools.statistics()["writer"].total_calls == 0
    assert spent.total_tokens > 0 and provider.remaining == 0


async def test_journal_keys_number_handles_and_calls() -> None:
    pools, _ = make(["1", "2", "3", "4"])
    journal = MemoryJournal(scope="S")
    agents = pools.accessor(journal)
    async with agents.writer as w1, agents.writer as w2:
        await w1.send("x")
        await w2.send("y")
        await w1.send("z")
    async with agents.critic as c:
        await c.send("w")
    assert list(journal.entries) == [
        "agent:S:writer:1:1",
        "agent:S:writer:2:1",
        "agent:S:writer:1:2",
        "agent:S:critic:1:1",
    ]
    assert journal.entries["agent:S:writer:1:2"] == {
        "text": "3",
        "data": None,
        "usage": {"input_tokens": 3, "output_tokens": 1},
    }


async def test_budget_refuses_a_call_without_sending_it() -> None:
    pools, provider = make(["fine"], budget=10)
    journal = MemoryJournal()
    await journal.record("earlier", {}, Usage(6, 4))
    async with pools.accessor(journal).writer as writer:
        with pytest.raises(BudgetExceededError, match=r"'writer'.*spent 10 of its 10-token budget"):
            await writer.send("more")
    assert provider.requests == [] and writer.history == []

    pools, provider = make(["fine"], budget=12, max_tokens=5)
    journal = MemoryJournal()
    await journal.record("earlier", {}, Usage(5, 3))
    async with pools.accessor(journal).writer as writer:
        with pytest.raises(BudgetExceededError, match="up to 5"):
            await writer.send("more")
        assert (await writer.send("less", max_tokens=4)).text == "fine"
    assert len(provider.requests) == 1


async def test_structured_output_is_requested_and_validated() -> None:
    pools, provider = make([{"score": 4, "summary": "solid"}], output=Review)
    async with pools.accessor(MemoryJournal()).writer as writer:
        reply = await writer.send("review this")
    assert reply.output == Review(score=4, summary="solid")
    assert provider.requests[0].output_schema == Review.model_json_schema()
    assert provider.requests[0].output_name == "Review"


async def test_structured_output_gets_one_repair_attempt() -> None:
    pools, provider = make(['{"score": "high"}', {"score": 5, "summary": "fixed"}], output=Review)
    journal = MemoryJournal(scope="s")
    async with pools.accessor(journal).writer as writer:
        reply = await writer.send("review this")
        assert len(writer.history) == 4
    assert reply.output == Review(score=5, summary="fixed")
    assert reply.usage == journal.usage  # both calls count
    repair = provider.requests[1].messages
    assert [m.role for m in repair] == ["user", "assistant", "user"]
    assert repair[1].content == '{"score": "high"}'
    assert (
        "score: Input should be a valid integer" in repair[2].content
        and "summary: Field required" in repair[2].content
    )
    assert set(journal.entries) == {"agent:s:writer:1:1", "agent:s:writer:1:1:repair"}

    replay_pools, replay_provider = make([], output=Review)
    async with replay_pools.accessor(MemoryJournal("s", journal.entries)).writer as writer:
        assert (await writer.send("review this")).output == Review(score=5, summary="fixed")
    assert replay_provider.requests == []


async def test_structured_output_still_invalid_raises_output_validation_error() -> None:
    pools, provider = make(["not json", "still not json"], output=Review)
    async with pools.accessor(MemoryJournal()).writer as writer:
        with pytest.raises(OutputValidationError, match=r"'writer'.*Review.*after one repair"):
            await writer.send("review this")
    assert len(provider.requests) == 2


async def test_streaming_yields_deltas_and_sets_last_reply() -> None:
    pools, _ = make(["Once upon a time"])
    journal = MemoryJournal()
    async with pools.accessor(journal).writer as writer:
        deltas = [d async for d in writer.stream("story")]
    assert len(deltas) == 4 and "".join(deltas) == "Once upon a time"
    assert writer.last_reply is not None and writer.last_reply.text == "Once upon a time"
    assert journal.usage == Usage(1, 4)


async def test_stream_abandoned_midway_is_not_journaled() -> None:
    pools, _ = make(["one two three"])
    journal = MemoryJournal()
    async with pools.accessor(journal).writer as writer:
        stream = writer.stream("go")
        async for _delta in stream:
            break
        await stream.aclose()  # type: ignore[attr-defined]
        assert journal.entries == {} and writer.history == []


async def test_provider_errors_propagate_and_leave_the_conversation_alone() -> None:
    pools, _ = make([ProviderError("nope", status=400, provider="scripted"), "ok"])
    async with pools.accessor(MemoryJournal()).writer as writer:
        with pytest.raises(ProviderError, match="nope"):
            await writer.send("first")
        assert writer.history == []
        assert (await writer.send("second")).text == "ok"


async def test_scripted_provider_callables_and_exhaustion() -> None:
    def answer(request: ProviderRequest) -> ProviderReply:
        return ProviderReply(f"you said {request.messages[-1].content}", usage=Usage(7, 3))

    async def later(request: ProviderRequest) -> str:
        return "async"

    provider = ScriptedProvider([answer, later, TimeoutError])
    pools = AgentPools(AgentsConfig({"a": Agent(provider=provider, model="m")}))
    async with pools.accessor(MemoryJournal()).a as a:
        assert (await a.send("hi")).usage == Usage(7, 3)
        assert (await a.send("x")).text == "async"
        with pytest.raises(TimeoutError):
            await a.send("y")
        with pytest.raises(ProviderError, match=r"ran out of replies: call 4 .* held 3"):
            await a.send("z")
    await pools.aclose()
    assert provider.closed


async def test_unknown_provider_name_names_installed_ones_and_the_extra() -> None:
    with pytest.raises(
        ProviderError, match=r"no agent provider named 'nope'.*installed: .*openai.*agentflow\[openai\]"
    ):
        load_provider("nope")
    pools = AgentPools(AgentsConfig({"a": Agent(provider="nope", model="m")}))
    with pytest.raises(ProviderError, match="nope"):
        await pools.accessor(MemoryJournal()).a
    assert pools.statistics()["a"].open == 0


def test_max_handles_must_be_positive() -> None:
    with pytest.raises(WorkflowDefinitionError, match="max_handles"):
        AgentPools(AgentsConfig({}, max_handles=0))
