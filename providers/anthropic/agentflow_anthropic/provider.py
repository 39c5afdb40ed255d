"""``AnthropicProvider``: agentflow agents over the Messages API with the official SDK."""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anthropic

from agentflow.agents import Message, ProviderReply, ProviderRequest, ToolUse, redacting, reply_body
from agentflow.agents.pricing import priced
from agentflow.agents.retrying import RetryPolicy
from agentflow.errors import ProviderError
from agentflow.types import Usage

__all__ = ["AnthropicProvider"]

_T = TypeVar("_T")
_NAME = re.compile(r"[^a-zA-Z0-9_-]")


def _transient(exc: BaseException) -> bool:
    """Rate limits, request timeouts, 5xx and 529 overloaded, timeouts, dropped connections."""
    if isinstance(exc, anthropic.APIStatusError):
        return exc.status_code in (408, 429) or exc.status_code >= 500
    return isinstance(exc, anthropic.APIConnectionError)  # includes APITimeoutError


_INPUT_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _input_tokens(usage: Any) -> int:
    """Input tokens of a usage object or JSON dict, cached prompt tokens included."""
    # Cached prompt tokens are billed input too, and the budget should see them.
    if isinstance(usage, dict):
        return sum(usage.get(f) or 0 for f in _INPUT_FIELDS)
    return sum(getattr(usage, f, None) or 0 for f in _INPUT_FIELDS)


class AnthropicProvider:
    """The Messages API through ``anthropic.AsyncAnthropic``.

    The SDK client is made on first use and reused by every handle (one HTTP connection
    pool), with the SDK's default HTTP client; ``client_options={"http_client": ...}``
    brings another (any ``httpx`` client the SDK accepts). Structured output is a forced
    tool whose ``input_schema`` is the output model's schema. Rate limits (honouring
    ``Retry-After``), 5xx / overloaded, timeouts and dropped connections are retried with
    exponential backoff (:class:`agentflow.agents.retrying.RetryPolicy`); any other failure
    raises :class:`~agentflow.errors.ProviderError` with the status and the server's
    message, with the API key and any other key or bearer token in it redacted.

    Args:
        api_key: defaults to ``ANTHROPIC_API_KEY`` (or ``ANTHROPIC_AUTH_TOKEN``).
        base_url: defaults to ``ANTHROPIC_BASE_URL``, else Anthropic's API.
        timeout: seconds per HTTP attempt (the SDK's default when None).
        max_attempts: attempts per call, the first included.
        backoff: first retry wait in seconds when the server names none (doubles each time).
        max_backoff: longest computed wait.
        max_retry_after: longest ``Retry-After`` honoured.
        default_max_tokens: ``max_tokens`` when the agent sets none (Messages requires it).
        client_options: extra ``AsyncAnthropic(...)`` arguments (``default_headers``, ...).
    """

    name = "anthropic"

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float | None = None,
        max_attempts: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        max_retry_after: float = 60.0,
        default_max_tokens: int = 1024,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._api_key = api_key
        self._base_url = base_url
        self._timeout = timeout
        self._retry = RetryPolicy(
            _transient,
            max_attempts=max_attempts,
            backoff=backoff,
            max_backoff=max_backoff,
            max_retry_after=max_retry_after,
        )
        self._default_max_tokens = default_max_tokens
        self._client_options = dict(client_options or {})
        self._accepted: frozenset[str] = frozenset()
        self._client: anthropic.AsyncAnthropic | None = None
        self._key: str | None = None

    def __repr__(self) -> str:
        url = self._base_url or os.environ.get("ANTHROPIC_BASE_URL") or "default"
        return f"<AnthropicProvider base_url={url}>"

    @property
    def client(self) -> anthropic.AsyncAnthropic:
        """The SDK client, created on first use.

        Raises:
            ProviderError: no API key was given and ``ANTHROPIC_API_KEY`` is not set.
        """
        if self._client is None:
            options: dict[str, Any] = {**self._client_options, "max_retries": 0}
            key = self._api_key or os.environ.get("ANTHROPIC_API_KEY")
            token = os.environ.get("ANTHROPIC_AUTH_TOKEN")
            if key:
                options["api_key"] = self._key = key
            elif token:
                options["auth_token"] = self._key = token
            else:
                raise ProviderError(
                    "anthropic: no API key. Set the ANTHROPIC_API_KEY environment variable or pass "
                    "AnthropicProvider(api_key=...).",
                    provider=self.name,
                )
            base_url = self._base_url or os.environ.get("ANTHROPIC_BASE_URL")
            if base_url:
                options["base_url"] = base_url
            if self._timeout is not None:
                options["timeout"] = self._timeout
            self._client = anthropic.AsyncAnthropic(**options)
            # Fields this SDK version's create() does not name travel in extra_body instead.
            self._accepted = frozenset(inspect.signature(self._client.messages.create).parameters)
        return self._client

    async def complete(self, request: ProviderRequest) -> ProviderReply:
        """Send one Messages request and return the whole reply."""
        client = self.client  # resolves the API key that redacting() hides
        with redacting(self._key):
            params = self._params(request)
            # The raw response skips building the SDK's Message model (~0.1 ms of CPU per
            # call): the blocks and usage needed are read from the JSON directly. Not being
            # streamed, its body has been read already.
            raw = await self._retrying(lambda: client.messages.with_raw_response.create(**params))
            message = reply_body(self.name, request, raw.http_response.content)
        answer = _output_tool(request)
        texts: list[str] = []
        calls: list[ToolUse] = []
        data: Any = None
        for block in message.get("content") or ():
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(block.get("text") or "")
            elif kind == "tool_use" and block.get("name") == answer:
                data = block.get("input")
            elif kind == "tool_use":
                calls.append(_tool_use(block.get("id"), block.get("name"), block.get("input")))
        text = json.dumps(data) if data is not None else "".join(texts)
        usage = message.get("usage")
        spent = (
            Usage(_input_tokens(usage), usage.get("output_tokens") or 0)
            if isinstance(usage, dict)
            else Usage()
        )
        model = message.get("model") if isinstance(message.get("model"), str) else None
        return ProviderReply(
            text=text, data=data, usage=self._priced(spent, request), tool_calls=tuple(calls), model=model
        )

    async def stream(self, request: ProviderRequest) -> AsyncIterator[str | ProviderReply]:
        """Yield text (or, for structured output, its JSON) deltas, then the whole reply.

        Tool calls arrive whole in the final reply; their argument deltas are not yielded.

        Raises:
            ProviderError: the call failed, the stream broke off, or it ended before
                ``message_stop`` (one that carried no event at all included).
        """
        client = self.client  # resolves the API key that redacting() hides
        answer = _output_tool(request)
        with redacting(self._key):
            params = self._params(request)
            events = await self._retrying(lambda: client.messages.create(stream=True, **params))
            parts: list[str] = []
            blocks: dict[int, list[Any]] = {}  # index of a tool_use block -> [id, name, json parts...]
            started = stopped = False
            input_tokens = output_tokens = 0
            model: str | None = None
            try:
                async with events:
                    async for event in events:
                        if event.type == "message_start":
                            started = True
                            model = event.message.model or None
                            input_tokens = _input_tokens(event.message.usage)
                            output_tokens = event.message.usage.output_tokens
                        elif event.type == "content_block_start" and event.content_block.type == "tool_use":
                            blocks[event.index] = [event.content_block.id, event.content_block.name]
                        elif event.type == "content_block_delta":
                            if event.delta.type == "text_delta":
                                parts.append(event.delta.text)
                                yield event.delta.text
                            elif event.delta.type == "input_json_delta" and event.delta.partial_json:
                                block = blocks.get(event.index)
                                if block is not None:
                                    block.append(event.delta.partial_json)
                                    if block[1] == answer:
                                        yield event.delta.partial_json
                        elif event.type == "message_delta":
                            # message_delta carries cumulative counts; input only when it changed.
                            output_tokens = event.usage.output_tokens
                            if event.usage.input_tokens is not None:
                                input_tokens = _input_tokens(event.usage)
                        elif event.type == "message_stop":
                            stopped = True
            except Exception as exc:
                # Deltas were already handed out, so a broken stream cannot be retried here.
                # Not every SDK wraps transport errors raised mid-stream, hence the broad except.
                raise self._error(exc, "the stream broke off") from exc
            if not stopped:
                # A reply cut short must not pass for a whole one (and be journaled as such).
                what = "ended before message_stop" if started else "carried no events"
                raise ProviderError(
                    f"anthropic: the stream for model {request.model!r} {what}", provider=self.name
                )
        data: Any = None
        calls: list[ToolUse] = []
        for _, (call_id, name, *pieces) in sorted(blocks.items()):
            raw = "".join(pieces)
            if name == answer:
                try:
                    data = json.loads(raw) if raw else {}
                except ValueError:
                    data = None
            else:
                calls.append(ToolUse(str(call_id), str(name), raw or "{}"))
        text = json.dumps(data) if data is not None else "".join(parts)
        spent = self._priced(Usage(input_tokens, output_tokens), request)
        yield ProviderReply(text=text, data=data, usage=spent, tool_calls=tuple(calls), model=model)

    def _priced(self, usage: Usage, request: ProviderRequest) -> Usage:
        """``usage`` with the call's cost (genai-prices; None for a model it does not know)."""
        return priced(usage, self.name, request.model, self._base_url or os.environ.get("ANTHROPIC_BASE_URL"))

    async def aclose(self) -> None:
        """Close the SDK client and its connections (a later call makes a new one)."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def _params(self, request: ProviderRequest) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens or self._default_max_tokens,
            "messages": _messages(request.messages),
        }
        if request.instructions:
            params["system"] = request.instructions
        if request.temperature is not None:
            params["temperature"] = request.temperature
        tools = [
            {"name": t.name, "description": t.description, "input_schema": t.parameters}
            for t in request.tools
        ]
        answer = _output_tool(request)
        if answer is not None:
            # Structured output is a tool the model must call: alone, it is forced; beside
            # the real tools, the model must call one of them all ("any").
            tools.append(
                {
                    "name": answer,
                    "description": f"Give the final answer as a {answer} object.",
                    "input_schema": request.output_schema or {},
                }
            )
            params["tool_choice"] = {"type": "any"} if request.tools else {"type": "tool", "name": answer}
        if tools:
            params["tools"] = tools
        params.update(request.options)
        extra = {key: params.pop(key) for key in list(params) if key not in self._accepted}
        if extra:
            params["extra_body"] = {**params.get("extra_body", {}), **extra}
        return params

    async def _retrying(self, call: Callable[[], Awaitable[_T]]) -> _T:
        try:
            return await self._retry.call(call)
        except anthropic.AnthropicError as exc:
            gave_up = f"gave up after {self._retry.max_attempts} attempts" if _transient(exc) else ""
            raise self._error(exc, gave_up) from exc

    def _error(self, exc: Exception, context: str = "") -> ProviderError:
        status = exc.status_code if isinstance(exc, anthropic.APIStatusError) else None
        detail = exc.message if isinstance(exc, anthropic.APIError) else str(exc)
        body = getattr(exc, "body", None)
        if isinstance(body, Mapping):
            error = body.get("error", body)
            if isinstance(error, Mapping) and isinstance(error.get("message"), str):
                detail = error["message"]
        what = f"HTTP {status}" if status is not None else type(exc).__name__
        suffix = f" ({context})" if context else ""
        return ProviderError(f"anthropic: {what}: {detail}{suffix}", status=status, provider=self.name)


def _output_tool(request: ProviderRequest) -> str | None:
    """The name of the tool that carries a structured answer, when one is asked for."""
    if request.output_schema is None:
        return None
    name = _NAME.sub("_", request.output_name or "output")[:64]
    taken = {t.name for t in request.tools}
    while name in taken:  # never shadow a real tool
        name = f"{name[:60]}_out"
    return name


def _tool_use(call_id: Any, name: Any, arguments: Any) -> ToolUse:
    return ToolUse(
        str(call_id or ""), str(name or ""), json.dumps(arguments if arguments is not None else {})
    )


def _messages(messages: tuple[Message, ...]) -> list[dict[str, Any]]:
    """The conversation in Messages form: tool calls as ``tool_use`` blocks, results as ``tool_result``.

    Tool results go in a user turn; consecutive user-side turns (results, then a prompt)
    are merged into one, since the API wants user and assistant turns to alternate.
    """
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            content: list[dict[str, Any]] = [{"type": "text", "text": m.content}] if m.content else []
            for c in m.tool_calls:
                try:
                    arguments = json.loads(c.arguments) if c.arguments else {}
                except ValueError:
                    arguments = {}
                if not isinstance(arguments, dict):
                    arguments = {}
                content.append({"type": "tool_use", "id": c.call_id, "name": c.name, "input": arguments})
            out.append({"role": "assistant", "content": content})
            continue
        if m.role == "tool":
            block: dict[str, Any] = {"type": "tool_result", "tool_use_id": m.call_id, "content": m.content}
            if m.is_error:
                block["is_error"] = True
        elif m.role == "user":
            block = {"type": "text", "text": m.content}
        else:
            out.append({"role": m.role, "content": m.content})
            continue
        last = out[-1] if out else None
        if (
            last is not None
            and last["role"] == "user"
            and (m.role == "tool" or isinstance(last["content"], list))
        ):
            if isinstance(last["content"], str):
                last["content"] = [{"type": "text", "text": last["content"]}]
            last["content"].append(block)
        elif m.role == "tool":
            out.append({"role": "user", "content": [block]})
        else:
            out.append({"role": "user", "content": m.content})
    return out
