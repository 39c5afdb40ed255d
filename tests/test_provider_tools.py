"""Tool calling through both providers: the real SDKs over HTTP against tests/llm_server.py.

What goes on the wire (tools, tool calls, tool results) in each protocol's own shape,
and what comes back (parallel calls in order, the model's text beside them, arguments
kept as the model wrote them), plain and streamed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from agentflow_anthropic import AnthropicProvider
from agentflow_openai import OpenAIProvider
from llm_server import LLMServer, Reply, ToolCall
from pydantic import BaseModel

from agentflow.agents import Message, Provider, ProviderReply, ProviderRequest, ToolSpec, ToolUse
from agentflow.definition.tools import tool

KINDS = ["openai", "anthropic"]


@tool
def lookup(repo: str, limit: int = 5) -> list[str]:
    """Find open issues.

    Args:
        repo: owner/name.
    """
    return []


LOOKUP = ToolSpec(**lookup.spec())
DEPLOY = ToolSpec(
    "deploy", "Deploy a version.", {"type": "object", "properties": {"version": {"type": "string"}}}
)


class Verdict(BaseModel):
    ship: bool
    why: str


@pytest.fixture
async def make(llm_env: LLMServer) -> AsyncIterator[Callable[[str], Provider]]:
    made: list[Provider] = []

    def factory(kind: str) -> Provider:
        provider: Provider = OpenAIProvider() if kind == "openai" else AnthropicProvider()
        made.append(provider)
        return provider

    yield factory
    for provider in made:
        await provider.aclose()


async def call(
    provider: Provider, request: ProviderRequest, streamed: bool
) -> tuple[list[str], ProviderReply]:
    if not streamed:
        return [], await provider.complete(request)
    deltas: list[str] = []
    final: ProviderReply | None = None
    async for item in provider.stream(request):
        if isinstance(item, ProviderReply):
            final = item
        else:
            deltas.append(item)
    assert final is not None
    return deltas, final


def ask(*messages: Message, **fields: Any) -> ProviderRequest:
    return ProviderRequest(model="m", messages=messages or (Message("user", "ship 1.2"),), **fields)


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("kind", KINDS)
async def test_parallel_tool_calls_come_back_in_order_with_the_text_beside_them(
    kind: str, streamed: bool, make: Callable[[str], Provider], llm_env: LLMServer
) -> None:
    llm_env.script(
        Reply(
            text="Checking first.",
            tool_calls=[
                ToolCall("lookup", {"repo": "acme/app"}, id="c1"),
                ToolCall("deploy", {"version": "1.2"}, id="c2"),
            ],
        )
    )
    deltas, reply = await call(make(kind), ask(tools=(LOOKUP, DEPLOY)), streamed)
    assert reply.tool_calls == (
        ToolUse("c1", "lookup", '{"repo": "acme/app"}'),
        ToolUse("c2", "deploy", '{"version": "1.2"}'),
    )
    assert reply.text == "Checking first." and reply.data is None
    assert reply.usage.output_tokens > 0
    if streamed:
        assert "".join(deltas) == "Checking first."  # text only: no argument fragments
    (sent,) = llm_env.requests
    if kind == "openai":
        assert sent.body["tools"] == [
            {"type": "function", "function": lookup.spec()},
            {
                "type": "function",
                "function": {
                    "name": "deploy",
                    "description": "Deploy a version.",
                    "parameters": DEPLOY.parameters,
                },
            },
        ]
    else:
        assert sent.body["tools"] == [
            {"name": "lookup", "description": lookup.description, "input_schema": lookup.parameters},
            {"name": "deploy", "description": "Deploy a version.", "input_schema": DEPLOY.parameters},
        ]
        assert "tool_choice" not in sent.body


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
async def test_openai_arguments_that_are_not_json_are_kept_as_written(
    streamed: bool, make: Callable[[str], Provider], llm_env: LLMServer
) -> None:
    llm_env.script(Reply(tool_calls=[ToolCall("lookup", {}, id="c9", raw='{"repo": "acme/app"')]))
    _, reply = await call(make("openai"), ask(tools=(LOOKUP,)), streamed)
    assert reply.tool_calls == (ToolUse("c9", "lookup", '{"repo": "acme/app"'),)


CONVERSATION = (
    Message("user", "ship 1.2"),
    Message(
        "assistant",
        "Let me look.",
        tool_calls=(
            ToolUse("c1", "lookup", '{"repo": "acme/app"}'),
            ToolUse("c2", "deploy", '{"version": "1.2"}'),
        ),
    ),
    Message("tool", '["#12 crash on start"]', call_id="c1"),
    Message("tool", "PermissionError: not allowed", call_id="c2", is_error=True),
    Message("user", "and now?"),
)


@pytest.mark.parametrize("kind", KINDS)
async def test_tool_calls_and_results_go_back_in_each_protocols_shape(
    kind: str, make: Callable[[str], Provider], llm_env: LLMServer
) -> None:
    llm_env.script("Blocked by #12.")
    reply = await make(kind).complete(ask(*CONVERSATION, tools=(LOOKUP, DEPLOY)))
    assert reply.text == "Blocked by #12." and reply.tool_calls == ()
    (sent,) = llm_env.requests
    if kind == "openai":
        assert sent.body["messages"] == [
            {"role": "user", "content": "ship 1.2"},
            {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"repo": "acme/app"}'},
                    },
                    {
                        "id": "c2",
                        "type": "function",
                        "function": {"name": "deploy", "arguments": '{"version": "1.2"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": '["#12 crash on start"]'},
            {"role": "tool", "tool_call_id": "c2", "content": "PermissionError: not allowed"},
            {"role": "user", "content": "and now?"},
        ]
    else:
        assert sent.body["messages"] == [
            {"role": "user", "content": "ship 1.2"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "c1", "name": "lookup", "input": {"repo": "acme/app"}},
                    {"type": "tool_use", "id": "c2", "name": "deploy", "input": {"version": "1.2"}},
                ],
            },
            {  # results and the next prompt in one user turn: the API wants turns to alternate
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "c1", "content": '["#12 crash on start"]'},
                    {
                        "type": "tool_result",
                        "tool_use_id": "c2",
                        "content": "PermissionError: not allowed",
                        "is_error": True,
                    },
                    {"type": "text", "text": "and now?"},
                ],
            },
        ]


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("kind", KINDS)
async def test_a_structured_final_answer_beside_tools(
    kind: str, streamed: bool, make: Callable[[str], Provider], llm_env: LLMServer
) -> None:
    schema = Verdict.model_json_schema()
    if kind == "openai":
        llm_env.script(Reply(data={"ship": False, "why": "#12"}))
    else:  # the answer is a call of the answer tool, which the model must choose among all
        llm_env.script(Reply(tool_calls=[ToolCall("Verdict", {"ship": False, "why": "#12"})]))
    request = ask(tools=(LOOKUP,), output_schema=schema, output_name="Verdict")
    _, reply = await call(make(kind), request, streamed)
    assert reply.data == {"ship": False, "why": "#12"} and reply.tool_calls == ()
    assert json.loads(reply.text) == reply.data
    (sent,) = llm_env.requests
    if kind == "openai":
        assert sent.body["response_format"]["type"] == "json_schema"
        assert [t["function"]["name"] for t in sent.body["tools"]] == ["lookup"]
    else:
        assert [t["name"] for t in sent.body["tools"]] == ["lookup", "Verdict"]
        assert sent.body["tool_choice"] == {"type": "any"}


@pytest.mark.parametrize("kind", KINDS)
async def test_a_real_tool_call_beside_the_answer_tool_is_a_tool_call(
    kind: str, make: Callable[[str], Provider], llm_env: LLMServer
) -> None:
    llm_env.script(Reply(tool_calls=[ToolCall("lookup", {"repo": "a/b"}, id="c1")]))
    request = ask(tools=(LOOKUP,), output_schema=Verdict.model_json_schema(), output_name="Verdict")
    reply = await make(kind).complete(request)
    assert reply.tool_calls == (ToolUse("c1", "lookup", '{"repo": "a/b"}'),) and reply.data is None


async def test_the_answer_tool_never_shadows_a_real_tool(
    make: Callable[[str], Provider], llm_env: LLMServer
) -> None:
    llm_env.script(Reply(tool_calls=[ToolCall("lookup", {"repo": "a/b"}, id="c1")]))
    request = ask(tools=(LOOKUP,), output_schema=Verdict.model_json_schema(), output_name="lookup")
    reply = await make("anthropic").complete(request)
    assert reply.tool_calls == (ToolUse("c1", "lookup", '{"repo": "a/b"}'),) and reply.data is None
    (sent,) = llm_env.requests
    assert [t["name"] for t in sent.body["tools"]] == ["lookup", "lookup_out"]


async def test_the_scripted_provider_scripts_tool_calls_and_records_their_results() -> None:
    from agentflow.testing import ScriptedCall, ScriptedProvider, call

    model = ScriptedProvider(
        [
            call("lookup", repo="acme/app"),
            [call("deploy", version="1.2"), ScriptedCall("lookup", raw="{oops")],
            "Done.",
        ]
    )
    first = await model.complete(ask(tools=(LOOKUP, DEPLOY)))
    assert first.tool_calls == (ToolUse("call_1", "lookup", '{"repo": "acme/app"}'),) and first.text == ""
    second = await model.complete(
        ask(
            Message("user", "ship 1.2"),
            Message("assistant", "", tool_calls=first.tool_calls),
            Message("tool", "[]", call_id="call_1"),
        )
    )
    assert second.tool_calls == (
        ToolUse("call_2", "deploy", '{"version": "1.2"}'),
        ToolUse("call_3", "lookup", "{oops"),
    )
    third = await model.complete(
        ask(
            Message("user", "ship 1.2"),
            Message("assistant", "", tool_calls=second.tool_calls),
            Message("tool", "ok", call_id="call_2"),
            Message("tool", "invalid arguments", call_id="call_3", is_error=True),
        )
    )
    assert third.text == "Done." and third.tool_calls == ()
    assert model.prompts == ["ship 1.2"] * 3
    assert model.tool_results == [
        [],
        [("call_1", "[]", False)],
        [("call_2", "ok", False), ("call_3", "invalid arguments", True)],
    ]
    deltas = [d async for d in ScriptedProvider([call("lookup", repo="x")]).stream(ask())]
    assert isinstance(deltas[-1], ProviderReply) and deltas[-1].tool_calls[0].name == "lookup"
