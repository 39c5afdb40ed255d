"""What calls cost (Usage.cost from the genai-prices data) and budgets in money."""

from __future__ import annotations

from decimal import Decimal

import pytest
from agentflow_openai import OpenAIProvider
from llm_server import LLMServer, Reply

from agentflow import TokenBudget, Usage
from agentflow.agents import Agent, AgentPools, AgentsConfig, Message, ProviderReply, ProviderRequest
from agentflow.agents.pricing import priced
from agentflow.errors import BudgetExceededError, WorkflowDefinitionError
from agentflow.testing import MemoryJournal, ScriptedProvider


def test_a_known_model_is_priced_and_an_unknown_one_is_not() -> None:
    usage = Usage(1_000_000, 1_000_000)
    gpt = priced(usage, "openai", "gpt-4o")
    assert gpt.cost is not None and gpt.cost > 0 and isinstance(gpt.cost, Decimal)
    assert (gpt.input_tokens, gpt.output_tokens) == (1_000_000, 1_000_000)
    assert priced(usage, "anthropic", "claude-sonnet-4-5").cost is not None
    assert priced(usage, "openai", "no-such-model").cost is None
    # A self-hosted server is priced by its URL, never as the hosted model of that name.
    assert priced(usage, "openai", "gpt-4o", "http://127.0.0.1:8000/v1").cost is None
    assert priced(usage, "openai", "gpt-4o", "https://api.openai.com/v1").cost == gpt.cost


def test_costs_add_up_over_the_calls_whose_price_is_known() -> None:
    a, b, unknown = Usage(1, 2, Decimal("0.10")), Usage(3, 4, Decimal("0.25")), Usage(5, 6)
    assert (a + b).cost == Decimal("0.35") and (a + unknown).cost == Decimal("0.10")
    assert (unknown + unknown).cost is None and (unknown + a + b).total_tokens == 21
    stored = (a + b).to_json()
    assert stored == {"input_tokens": 4, "output_tokens": 6, "cost": "0.35"}  # exact: a string
    assert Usage.from_json(stored) == a + b
    assert Usage.from_json({"input_tokens": 1, "output_tokens": 2}).cost is None


async def test_a_providers_reply_carries_its_cost(
    monkeypatch: pytest.MonkeyPatch, llm_server: LLMServer
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    llm_server.script(Reply(text="hi", input_tokens=1000, output_tokens=500))
    request = ProviderRequest(model="gpt-4o", messages=(Message("user", "hello"),))
    # Pointed at the local server by URL: a self-hosted model has no known price.
    local = OpenAIProvider(base_url=llm_server.openai_base_url)
    try:
        reply = await local.complete(request)
    finally:
        await local.aclose()
    assert reply.usage == Usage(1000, 500) and reply.usage.cost is None


def test_a_budget_needs_a_limit() -> None:
    with pytest.raises(WorkflowDefinitionError, match="max_tokens, max_cost or both"):
        TokenBudget()
    assert TokenBudget(max_cost=0.5).max_cost == Decimal("0.5")


async def test_a_call_past_the_money_budget_is_not_sent() -> None:
    priced_reply = ProviderReply(text="draft", usage=Usage(10, 10, Decimal("0.30")))
    model = ScriptedProvider([priced_reply, priced_reply, "never"])
    config = AgentsConfig(
        {"w": Agent(provider=model, model="m")}, budget=TokenBudget(max_cost=Decimal("0.50"))
    )
    pools = AgentPools(config)
    journal = MemoryJournal()
    try:
        async with pools.accessor(journal).w as w:
            await w.send("one")
            await w.send("two")  # 0.30 spent: below 0.50, sent
            with pytest.raises(BudgetExceededError, match=r"spent \$0.60 of its \$0.50 budget"):
                await w.send("three")
    finally:
        await pools.aclose()
    assert len(model.requests) == 2 and journal.usage.cost == Decimal("0.60")
