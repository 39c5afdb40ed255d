"""The real openai and anthropic SDKs, through the providers, against tests/llm_server.py."""

from __future__ import annotations

import email.utils
import os
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from agentflow_anthropic import AnthropicProvider
from agentflow_openai import OpenAIProvider
from agentflow_openai.provider import _strict_schema
from llm_server import LLMServer, Reply, ToolCall
from pydantic import BaseModel, Field

from agentflow.agents import (
    Agent,
    AgentPools,
    AgentsConfig,
    Message,
    Provider,
    ProviderReply,
    ProviderRequest,
    load_provider,
    reply_body,
)
from agentflow.agents.retrying import RetryPolicy, retry_after_seconds
from agentflow.errors import ProviderError, redact
from agentflow.testing import MemoryJournal
from agentflow.types import Usage

KINDS = ["openai", "anthropic"]


class Review(BaseModel):
    score: int
    summary: str
    tags: list[str] = []


@pytest.fixture
def env(llm_env: LLMServer) -> LLMServer:
    """Point both SDKs at the local server through their usual variables."""
    return llm_env


@pytest.fixture
async def provider_factory(env: LLMServer) -> AsyncIterator[Callable[..., Provider]]:
    """Make providers (fast backoff for retry tests) and close them all afterwards."""
    made: list[Provider] = []

    def make(kind: str, **options: Any) -> Provider:
        options.setdefault("backoff", 0.01)
        cls: Any = OpenAIProvider if kind == "openai" else AnthropicProvider
        provider: Provider = cls(**options)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


def ask(text: str = "Say hello", **fields: Any) -> ProviderRequest:
    return ProviderRequest(model="test-model", messages=(Message("user", text),), **fields)


async def collect(provider: Provider, request: ProviderRequest) -> tuple[list[str], ProviderReply]:
    deltas: list[str] = []
    final = None
    async for item in provider.stream(request):
        if isinstance(item, ProviderReply):
            final = item
        else:
            deltas.append(item)
    assert final is not None
    return deltas, final


@pytest.mark.parametrize("kind", KINDS)
async def test_plain_reply_with_usage(
    kind: str, provider_factory: Callable[..., Provider], env: LLMServer
) -> None:
    env.script(Reply(text="Hello there, friend.", input_tokens=11, output_tokens=4))
    provider = provider_factory(kind)
    reply = await provider.complete(ask(instructions="Be kind.", temperature=0.2, options={"top_k": 3}))
    assert reply == ProviderReply("Hello there, friend.", None, Usage(11, 4), model="test-model")
    (request,) = env.requests
    body = request.body
    assert request.protocol == kind and body["model"] == "test-model" and body["temperature"] == 0.2
    assert body["top_k"] == 3  # options the SDK does not name still reach the server
    if kind == "openai":
        assert body["messages"] == [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Say hello"},
        ]
        assert "max_completion_tokens" not in body
    else:
        assert body["system"] == "Be kind." and body["messages"] == [{"role": "user", "content": "Say hello"}]
        assert body["max_tokens"] == 1024  # Messages requires it


@pytest.mark.parametrize("kind", KINDS)
async def test_streaming_yields_deltas_then_the_reply_with_usage(
    kind: str, provider_factory: Callable[..., Provider], env: LLMServer
) -> None:
    env.script(Reply(text="one two three four", input_tokens=9, output_tokens=4))
    deltas, final = await collect(provider_factory(kind), ask(max_tokens=64))
    assert len(deltas) == 4 and "".join(deltas) == "one two three four"
    assert final == ProviderReply("one two three four", None, Usage(9, 4), model="test-model")
    body = env.requests[0].body
    assert body["stream"] is True
    if kind == "openai":
        assert body["stream_options"] == {"include_usage": True} and body["max_completion_tokens"] == 64
    else:
        assert body["max_tokens"] == 64


@pytest.mark.parametrize("kind", KINDS)
async def test_structured_output(
    kind: str, provider_factory: Callable[..., Provider], env: LLMServer
) -> None:
    data = {"score": 8, "summary": "good", "tags": ["a"]}
    env.script(data, data)
    provider = provider_factory(kind)
    request = ask(output_schema=Review.model_json_schema(), output_name="Review")
    reply = await provider.complete(request)
    assert reply.data == data and Review.model_validate_json(reply.text) == Review(**data)
    deltas, final = await collect(provider, request)
    assert final.data == data and "".join(deltas).replace(" ", "") == final.text.replace(" ", "")
    body = env.requests[0].body
    if kind == "openai":
        fmt = body["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Review"
        schema = fmt["json_schema"]["schema"]
        assert fmt["json_schema"]["strict"] is True and schema["additionalProperties"] is False
        assert schema["required"] == ["score", "summary", "tags"]  # strict: every field required
    else:
        assert body["tool_choice"] == {"type": "tool", "name": "Review"}
        assert body["tools"][0]["input_schema"] == Review.model_json_schema()


class Item(BaseModel):
    name: str


class Report(BaseModel):
    items: list[Item]
    main: Item = Field(description="the main item")
    note: str | None = None


def test_strict_schema_closes_every_object_and_requires_every_field() -> None:
    schema = Report.model_json_schema()
    strict = _strict_schema(schema)
    assert schema == Report.model_json_schema()  # the input is left alone
    assert strict["additionalProperties"] is False and strict["required"] == ["items", "main", "note"]
    assert strict["$defs"]["Item"] == {
        "properties": {"name": {"title": "Name", "type": "string"}},
        "required": ["name"],
        "title": "Item",
        "type": "object",
        "additionalProperties": False,
    }
    main = strict["properties"]["main"]
    assert "$ref" not in main and main["additionalProperties"] is False  # a $ref with siblings is inlined
    assert "default" not in strict["properties"]["note"]


@pytest.mark.parametrize("kind", KINDS)
async def test_rate_limit_waits_what_retry_after_says(
    kind: str, provider_factory: Callable[..., Provider], env: LLMServer
) -> None:
    env.fail(429, retry_after=1, message="slow down")
    env.script("made it")
    started = time.monotonic()
    reply = await provider_factory(kind).complete(ask())
    waited = time.monotonic() - started
    assert reply.text == "made it"
    assert 0.95 <= waited < 2.0  # Retry-After honoured, not the 10 ms backoff
    assert len(env.requests) == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_retry_after_ms_and_the_cap(
    kind: str, provider_factory: Callable[..., Provider], env: LLMServer
) -> None:
    env.fail(429, retry_after_ms=300)
    env.fail(429, retry_after=30)  # capped by max_retry_after
    started = time.monotonic()
    reply = await provider_factory(kind, max_retry_after=0.2).complete(ask("hi"))
    waited = time.monotonic() - started
    assert reply.text == "echo: hi"
    assert 0.35 <= waited < 1.5
    assert len(env.requests) == 3


@pytest.mark.parametrize("kind", KINDS)
async def test_server_errors_are_retried(
    kind: str, provider_factory: Callable[..., Provider], env: LLMServer
) -> None:
    env.fail(500, times=2)
    env.fail(529 if kind == "anthropic" else 503)
    env.script("finally")
    assert (await provider_factory(kind).complete(ask())).text == "finally"
    assert len(env.requests) == 4


@pytest.mark.parametrize("kind", KINDS)
async def test_retries_are_bounded(
    kind: str, provider_factory: Callable[..., Provider], env: LLMServer
) -> None:
    env.fail(500, times=5, message="still broken")
    with pytest.raises(ProviderError) as caught:
        await provider_factory(kind, max_attempts=3).complete(ask())
    err = caught.value
    assert err.status == 500 and err.provider == kind
    assert "still broken" in str(err) and "gave up after 3 attempts" in str(err)
    assert len(env.requests) == 3


@pytest.mark.parametrize("kind", KINDS)
async def test_bad_request_raises_provider_error_with_status_and_message(
    kind: str, provider_factory: Callable[..., Provider], env: LLMServer
) -> None:
    env.fail(400, message="max_tokens: must be positive")
    with pytest.raises(ProviderError) as caught:
        await provider_factory(kind).complete(ask())
    err = caught.value
    assert err.status == 400 and err.provider == kind
    assert str(err) == f"{kind}: HTTP 400: max_tokens: must be positive"
    assert len(env.requests) == 1  # not retried


@pytest.mark.parametrize("kind", KINDS)
async def test_dropped_connection_is_retried(
    kind: str, provider_factory: Callable[..., Provider], env: LLMServer
) -> None:
    env.fail(drop=True)
    env.script("after the drop")
    assert (await provider_factory(kind).complete(ask())).text == "after the drop"
    assert len(env.requests) == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_timeout_is_retried(
    kind: str, provider_factory: Callable[..., Provider], env: LLMServer
) -> None:
    env.script(Reply(text="too late", latency=1.0), "in time")
    assert (await provider_factory(kind, timeout=0.25).complete(ask())).text == "in time"
    assert len(env.requests) == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_stream_failures(kind: str, provider_factory: Callable[..., Provider], env: LLMServer) -> None:
    env.fail(429, retry_after_ms=10)  # before any delta: retried
    env.script("fine stream")
    _, final = await collect(provider_factory(kind), ask())
    assert final.text == "fine stream" and len(env.requests) == 2
    env.fail(mid_stream=True)  # after a delta went out: cannot be retried
    with pytest.raises(ProviderError, match="stream broke off"):
        await collect(provider_factory(kind), ask())


@pytest.mark.parametrize(
    ("kind", "variable"), [("openai", "OPENAI_API_KEY"), ("anthropic", "ANTHROPIC_API_KEY")]
)
async def test_missing_key_is_a_clear_error_at_the_first_call(
    kind: str,
    variable: str,
    provider_factory: Callable[..., Provider],
    env: LLMServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(variable)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    provider = provider_factory(kind)  # constructing is fine
    with pytest.raises(ProviderError, match=variable) as caught:
        await provider.complete(ask())
    assert caught.value.provider == kind
    assert env.requests == []


@pytest.mark.parametrize("kind", KINDS)
async def test_pool_loads_providers_by_name_and_reuses_one_client(kind: str, env: LLMServer) -> None:
    pools = AgentPools(
        AgentsConfig({"a": Agent(provider=kind, model="m"), "b": Agent(provider=kind, model="m")})
    )
    agents = pools.accessor(MemoryJournal())
    try:
        async with agents.a as first:
            await first.send("one")
            client = first._provider.client  # type: ignore[attr-defined]
        async with agents.b as second, agents.a as third:
            await second.send("two")
            await third.send("three")
            assert second._provider is third._provider  # type: ignore[attr-defined]
            assert third._provider.client is client  # type: ignore[attr-defined]
        assert len(env.requests) == 3
        assert env.connections <= 2  # keep-alive connections of one client, not one per handle
    finally:
        await pools.aclose()
    assert isinstance(load_provider(kind), OpenAIProvider if kind == "openai" else AnthropicProvider)


@pytest.mark.parametrize("kind", KINDS)
async def test_agent_structured_output_with_repair_over_the_wire(kind: str, env: LLMServer) -> None:
    env.script("Sure! Here it is: score eight", {"score": 8, "summary": "repaired"})
    pools = AgentPools(AgentsConfig({"critic": Agent(provider=kind, model="m", output=Review)}))
    journal = MemoryJournal()
    try:
        async with pools.accessor(journal).critic as critic:
            reply = await critic.send("Review the draft")
            deltas = [d async for d in critic.stream("And again")]  # echo: a sample from the schema
    finally:
        await pools.aclose()
    assert reply.output == Review(score=8, summary="repaired")
    assert critic.last_reply is not None and isinstance(critic.last_reply.output, Review) and deltas
    repair = env.requests[1].body["messages"]
    assert [m["role"] for m in repair] == ["user", "assistant", "user"]
    assert "did not match the required JSON schema" in repair[2]["content"]
    assert len(journal.entries) == 3 and journal.usage.total_tokens > 0


async def test_openai_tool_calls_over_the_wire(env: LLMServer) -> None:
    """The server also speaks tool calls, for tests that drive the SDK directly."""
    env.script(Reply(tool_calls=[ToolCall("lookup", {"q": "agentflow"})]))
    async with openai.AsyncOpenAI(max_retries=0) as client:
        completion = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "find it"}],
            tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        )
    (call,) = completion.choices[0].message.tool_calls or []
    assert (
        call.type == "function"
        and call.function.name == "lookup"
        and call.function.arguments == '{"q": "agentflow"}'
    )


@pytest.mark.parametrize("kind", KINDS)
async def test_calls_share_one_keep_alive_connection_and_aclose_closes_it(
    kind: str, provider_factory: Callable[..., Provider], env: LLMServer
) -> None:
    provider = provider_factory(kind)
    before = env.connections
    assert (await provider.complete(ask("one"))).text == "echo: one"
    assert (await provider.complete(ask("two"))).text == "echo: two"
    assert env.connections == before + 1  # the second call reused the first one's connection
    sdk: Any = openai if kind == "openai" else anthropic
    http = provider.client._client  # type: ignore[attr-defined]  # the SDK's HTTP client
    assert isinstance(http, sdk.DefaultAsyncHttpxClient) and not http.is_closed  # the SDK's default
    await provider.aclose()
    assert http.is_closed
    assert (await provider.complete(ask("three"))).text == "echo: three"  # a new client on next use
    assert provider.client._client is not http  # type: ignore[attr-defined]
    assert env.connections == before + 2  # ... with a connection of its own


@pytest.mark.parametrize("kind", KINDS)
async def test_a_given_http_client_is_used(
    kind: str, provider_factory: Callable[..., Provider], env: LLMServer
) -> None:
    sdk: Any = openai if kind == "openai" else anthropic
    http = sdk.DefaultAsyncHttpxClient()
    provider = provider_factory(kind, client_options={"http_client": http})
    assert (await provider.complete(ask("hi"))).text == "echo: hi"
    assert provider.client._client is http  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_that_carries_no_events_is_a_provider_error(
    kind: str, provider_factory: Callable[..., Provider], env: LLMServer
) -> None:
    env.fail(empty=True)
    what = "carried no events" if kind == "anthropic" else "ended before its first chunk"
    with pytest.raises(ProviderError, match=f"^{kind}: the stream for model 'test-model' {what}$") as caught:
        await collect(provider_factory(kind), ask())
    assert caught.value.provider == kind and len(env.requests) == 1  # not retried: it may have been billed
    env.fail(empty=True)  # the same empty 200 to a call that is not streamed
    with pytest.raises(ProviderError, match="is not JSON: b''"):
        await provider_factory(kind).complete(ask())


async def test_an_anthropic_stream_cut_short_before_message_stop_is_a_provider_error(
    provider_factory: Callable[..., Provider], env: LLMServer
) -> None:
    env.fail(cut_short=True)
    journaled: list[str] = []
    with pytest.raises(
        ProviderError, match=r"^anthropic: the stream for model 'test-model' ended before message_stop$"
    ):
        async for item in provider_factory("anthropic").stream(ask()):
            journaled.append(str(item))
    assert journaled == ["partial "]  # the deltas that arrived, but no reply to journal


WRONG_KEYS = {
    "openai": ["sk-proj-Wr0ngKeyAbCdEfGhIjKlMnOpQrStUvWxYz012345", "local-key-that-is-wrong"],
    "anthropic": ["sk-ant-api03-Wr0ngKeyAbCdEfGhIjKlMnOpQrStUvWx-yz0123AA", "local-key-that-is-wrong"],
}


@pytest.mark.parametrize(("kind", "key"), [(k, key) for k, keys in WRONG_KEYS.items() for key in keys])
async def test_an_error_that_quotes_the_api_key_is_raised_with_the_key_redacted(
    kind: str, key: str, provider_factory: Callable[..., Provider], env: LLMServer
) -> None:
    env.api_key = "the-right-key"
    provider = provider_factory(kind, api_key=key)
    for call in (provider.complete, lambda request: collect(provider, request)):
        with pytest.raises(ProviderError) as caught:
            await call(ask())
        err = caught.value
        quoted = "Incorrect API key provided: [redacted]. You can find your API key in your account."
        assert str(err) == f"{kind}: HTTP 401: {quoted}"
        assert err.status == 401 and err.provider == kind
        printed = "".join(traceback.format_exception(err))
        assert key not in printed and err.__cause__ is None  # the SDK's error quotes the key too
    sent = [
        r.headers.get("x-api-key") or r.headers["authorization"].removeprefix("Bearer ") for r in env.requests
    ]
    assert sent == [key, key]  # the key did reach the server; neither call was retried


def test_redact_hides_keys_and_bearer_tokens() -> None:
    assert (
        redact("Incorrect API key provided: sk-proj-abc123XYZ_-9.")
        == "Incorrect API key provided: [redacted]."
    )
    assert redact("key sk-ant-api03-AAAA-bbbb_CCCC rejected") == "key [redacted] rejected"
    assert (
        redact("Incorrect API key provided: sk-proj-********abcd.")
        == "Incorrect API key provided: [redacted]."
    )
    assert redact("got authorization: Bearer eyJhbGci.eyJzdWIi.c2ln== from you") == (
        "got authorization: Bearer [redacted] from you"
    )
    assert redact("got bearer abc/def+ghi") == "got bearer [redacted]"
    assert redact("invalid x-api-key: my-local-key-42 (and my-local-key-42)", "my-local-key-42") == (
        "invalid x-api-key: [redacted] (and [redacted])"
    )
    # No key here, and secrets under 8 characters are not sought.
    plain = "a task-force of sk- and risk-averse users"
    assert redact(plain, "short", None) == plain
    # Every ProviderError is redacted where it is made.
    assert str(ProviderError("HTTP 401: Incorrect API key provided: sk-proj-abc123XYZ")) == (
        "HTTP 401: Incorrect API key provided: [redacted]"
    )
    once = redact("Bearer sk-abcdef sk-abcdef")
    assert once == "Bearer [redacted] [redacted]" and redact(once) == once


def test_the_release_notes_example_shows_the_providers_error_for_a_wrong_key(tmp_path: Path) -> None:
    key = WRONG_KEYS["openai"][0]
    example = Path(__file__).resolve().parents[1] / "examples" / "review_release_notes.py"
    with LLMServer(api_key="the-right-key") as server:
        env = {**os.environ, "OPENAI_API_KEY": key, "OPENAI_BASE_URL": server.openai_base_url}
        env.pop("ANTHROPIC_API_KEY", None)
        env.pop("ANTHROPIC_BASE_URL", None)
        proc = subprocess.run(
            [sys.executable, str(example)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert proc.stderr.startswith("error: run ") and " failed at step " in proc.stderr
    assert "ProviderError: openai: HTTP 401: Incorrect API key provided: [redacted]." in proc.stderr
    assert "Traceback" not in output and key not in output


# -- agentflow.agents.retrying: the retry policy both providers share ----------------------


class Flaky(Exception):
    """A failure carrying response headers, as the SDKs' status errors do."""

    def __init__(self, transient: bool = True, headers: dict[str, str] | None = None) -> None:
        super().__init__("flaky")
        self.transient = transient
        self.response = type("Response", (), {"headers": headers or {}})()


def policy(**options: Any) -> RetryPolicy:
    options.setdefault("backoff", 0.001)
    return RetryPolicy(lambda exc: isinstance(exc, Flaky) and exc.transient, **options)


def script(*outcomes: Any) -> tuple[Callable[[], Any], list[float]]:
    """A call that raises or returns ``outcomes`` in turn, and the times it was made."""
    calls: list[float] = []
    pending = list(outcomes)

    async def call() -> Any:
        calls.append(time.monotonic())
        outcome = pending.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return call, calls


async def test_retry_policy_success_at_once_sets_up_no_retry_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loop(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tenacity's loop was set up for a call that succeeded at once")

    monkeypatch.setattr("agentflow.agents.retrying.AsyncRetrying", no_loop)
    call, calls = script("ok")
    assert await policy().call(call) == "ok" and len(calls) == 1


async def test_retry_policy_retries_transient_failures_up_to_max_attempts() -> None:
    call, calls = script(Flaky(), Flaky(), "ok")
    assert await policy(max_attempts=3).call(call) == "ok" and len(calls) == 3
    last = Flaky()
    call, calls = script(Flaky(), Flaky(), last, "never")
    with pytest.raises(Flaky) as caught:
        await policy(max_attempts=3).call(call)
    assert caught.value is last and len(calls) == 3  # the last failure, as it was
    call, calls = script(Flaky(), "never")
    with pytest.raises(Flaky):
        await policy(max_attempts=1).call(call)
    assert len(calls) == 1


async def test_retry_policy_raises_other_failures_at_once() -> None:
    for first in (Flaky(transient=False), ValueError("bug")):
        call, calls = script(first, "never")
        with pytest.raises(type(first)):
            await policy().call(call)
        assert len(calls) == 1
    call, calls = script(Flaky(), Flaky(transient=False), "never")  # not transient on a retry either
    with pytest.raises(Flaky):
        await policy().call(call)
    assert len(calls) == 2


async def test_retry_policy_waits_what_the_failure_asks_capped_else_backs_off() -> None:
    call, calls = script(Flaky(headers={"retry-after-ms": "150"}), Flaky(headers={"retry-after": "30"}), "ok")
    assert await policy(max_retry_after=0.2).call(call) == "ok"
    assert 0.14 <= calls[1] - calls[0] < 0.5  # the first attempt's Retry-After, though made outside the loop
    assert 0.19 <= calls[2] - calls[1] < 0.6  # 30 s capped at max_retry_after
    call, calls = script(Flaky(), Flaky(), "ok")
    assert await policy(backoff=0.05).call(call) == "ok"
    assert 0.05 <= calls[1] - calls[0] < 0.5 and 0.1 <= calls[2] - calls[1] < 0.6  # doubling from backoff


def test_retry_after_seconds_reads_milliseconds_seconds_and_dates() -> None:
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after": "-3"}) == 0.0
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < (retry_after_seconds({"retry-after": soon}) or 0) <= 30
    assert retry_after_seconds({"retry-after": "whenever"}) is None
    assert retry_after_seconds({}) is None and retry_after_seconds(None) is None
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(lambda exc: True, max_attempts=0)


def test_a_raw_reply_body_that_is_not_json_is_a_provider_error() -> None:
    with pytest.raises(
        ProviderError, match=r"openai: the reply for model 'test-model' is not JSON: b'<html>"
    ) as err:
        reply_body("openai", ask(), b"<html>bad gateway</html>")
    assert err.value.provider == "openai"
    assert reply_body("anthropic", ask(), b"[1, 2]") == {}  # JSON, but no object: the provider judges
    assert reply_body("anthropic", ask(), b'{"content": []}') == {"content": []}
