"""``OpenAIProvider``: agentflow agents over Chat Completions with the official SDK."""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import openai

from agentflow.agents import Message, ProviderReply, ProviderRequest, ToolUse, redacting, reply_body
from agentflow.agents.pricing import priced
from agentflow.agents.retrying import RetryPolicy
from agentflow.errors import ProviderError
from agentflow.types import Usage

__all__ = ["OpenAIProvider"]

_T = TypeVar("_T")
_NAME = re.compile(r"[^a-zA-Z0-9_-]")


def _transient(exc: BaseException) -> bool:
    """Rate limits, request timeouts, 5xx, client timeouts and dropped connections."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 429) or exc.status_code >= 500
    return isinstance(exc, openai.APIConnectionError)  # includes APITimeoutError


def _strict_schema(schema: Any, root: dict[str, Any] | None = None) -> Any:
    """Make a pydantic JSON schema acceptable to ``strict`` structured outputs.

    Strict mode wants every object closed (``additionalProperties: false``) with all its
    properties required, and no ``$ref`` carrying sibling keys. Returns a new schema;
    the one given is not modified.
    """
    if not isinstance(schema, dict):
        return schema
    root = schema if root is None else root
    if "$ref" in schema and len(schema) > 1:
        target: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        merged = {**target, **schema}
        merged.pop("$ref")
        schema = merged
    out = {key: value for key, value in schema.items() if not (key == "default" and value is None)}
    for key in ("$defs", "definitions", "properties"):
        if isinstance(out.get(key), dict):
            out[key] = {name: _strict_schema(sub, root) for name, sub in out[key].items()}
    for key in ("anyOf", "allOf", "oneOf", "prefixItems"):
        if isinstance(out.get(key), list):
            out[key] = [_strict_schema(sub, root) for sub in out[key]]
    if isinstance(out.get("items"), dict):
        out["items"] = _strict_schema(out["items"], root)
    if out.get("type") == "object":
        out.setdefault("additionalProperties", False)
        out["required"] = list(out.get("properties", {}))
    return out


class OpenAIProvider:
    """Chat Completions through ``openai.AsyncOpenAI``, for OpenAI and compatible servers.

    The SDK client is made on first use and reused by every handle (one HTTP connection
    pool), with the SDK's default HTTP client; ``client_options={"http_client": ...}``
    brings another (any ``httpx`` client the SDK accepts). Rate limits (honouring
    ``Retry-After`` / ``retry-after-ms``), 5xx, timeouts and dropped connections are
    retried with exponential backoff (:class:`agentflow.agents.retrying.RetryPolicy`); any
    other failure raises :class:`~agentflow.errors.ProviderError` with the status and the
    server's message, with the API key and any other key or bearer token in it redacted.

    Args:
        api_key: defaults to ``OPENAI_API_KEY`` (any value works for a local server).
        base_url: defaults to ``OPENAI_BASE_URL``, else OpenAI's API.
        timeout: seconds per HTTP attempt (the SDK's default when None).
        max_attempts: attempts per call, the first included.
        backoff: first retry wait in seconds when the server names none (doubles each time).
        max_backoff: longest computed wait.
        max_retry_after: longest ``Retry-After`` honoured.
        max_tokens_param: request field for the output cap; OpenAI's current
            ``max_completion_tokens``, or ``max_tokens`` for older compatible servers.
        client_options: extra ``AsyncOpenAI(...)`` arguments (``default_headers``, ...).
    """

    name = "openai"

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
        max_tokens_param: str = "max_completion_tokens",
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
        self._max_tokens_param = max_tokens_param
        self._client_options = dict(client_options or {})
        self._accepted: frozenset[str] = frozenset()
        self._client: openai.AsyncOpenAI | None = None
        self._key: str | None = None

    def __repr__(self) -> str:
        return f"<OpenAIProvider base_url={self._base_url or os.environ.get('OPENAI_BASE_URL') or 'default'}>"

    @property
    def client(self) -> openai.AsyncOpenAI:
        """The SDK client, created on first use.

        Raises:
            ProviderError: no API key was given and ``OPENAI_API_KEY`` is not set.
        """
        if self._client is None:
            key = self._api_key or os.environ.get("OPENAI_API_KEY")
            if not key:
                raise ProviderError(
                    "openai: no API key. Set the OPENAI_API_KEY environment variable (any value for a "
                    "local OpenAI-compatible server) or pass OpenAIProvider(api_key=...).",
                    provider=self.name,
                )
            options: dict[str, Any] = {**self._client_options, "api_key": key, "max_retries": 0}
            base_url = self._base_url or os.environ.get("OPENAI_BASE_URL")
            if base_url:
                options["base_url"] = base_url
            if self._timeout is not None:
                options["timeout"] = self._timeout
            self._key = key
            self._client = openai.AsyncOpenAI(**options)
            # Fields this SDK version's create() does not name travel in extra_body instead.
            self._accepted = frozenset(inspect.signature(self._client.chat.completions.create).parameters)
        return self._client

    async def complete(self, request: ProviderRequest) -> ProviderReply:
        """Send one Chat Completions request and return the whole reply."""
        client = self.client  # resolves the API key that redacting() hides
        with redacting(self._key):
            params = self._params(request)
            # The raw response skips building the SDK's ChatCompletion model (~0.1 ms of CPU
            # per call): the fields needed are read from the JSON directly. Not being
            # streamed, its body has been read already.
            raw = await self._retrying(lambda: client.chat.completions.with_raw_response.create(**params))
            body = reply_body(self.name, request, raw.http_response.content)
            text, spent, calls = self._reply(request, body)
        data = None if calls else _data(request, text)
        model = body.get("model") if isinstance(body.get("model"), str) else None
        return ProviderReply(
            text=text, data=data, usage=self._priced(spent, request), tool_calls=calls, model=model
        )

    def _reply(
        self, request: ProviderRequest, body: dict[str, Any]
    ) -> tuple[str, Usage, tuple[ToolUse, ...]]:
        """Text (content, else refusal), usage and tool calls of a ``chat.completion`` body."""
        choices = body.get("choices")
        if not choices or not isinstance(choices[0], dict):
            raise ProviderError(
                f"openai: the reply for model {request.model!r} has no choices", provider=self.name
            )
        message = choices[0].get("message")
        if not isinstance(message, dict):
            message = {}
        text = message.get("content") or message.get("refusal") or ""
        calls = tuple(_tool_use(c) for c in message.get("tool_calls") or () if isinstance(c, dict))
        usage = body.get("usage")
        if not isinstance(usage, dict):
            return text, Usage(), calls
        return text, Usage(usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0), calls

    async def stream(self, request: ProviderRequest) -> AsyncIterator[str | ProviderReply]:
        """Yield content deltas as they arrive, then the whole reply with its usage.

        Raises:
            ProviderError: the call failed, the stream broke off, or it carried no chunk.
        """
        client = self.client  # resolves the API key that redacting() hides
        with redacting(self._key):
            params = self._params(request)
            params["stream_options"] = {"include_usage": True}
            chunks = await self._retrying(lambda: client.chat.completions.create(stream=True, **params))
            parts: list[str] = []
            calls: dict[int, list[str]] = {}  # index -> [id, name, argument fragments...]
            spent = Usage()
            received = False
            model: str | None = None
            try:
                async with chunks:
                    async for chunk in chunks:
                        received = True
                        model = chunk.model or model
                        if chunk.usage is not None:
                            spent = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                        for choice in chunk.choices:
                            if choice.index != 0:
                                continue
                            delta = choice.delta
                            for tc in delta.tool_calls or ():
                                call = calls.setdefault(tc.index, ["", ""])
                                if tc.id:
                                    call[0] = tc.id
                                if tc.function is not None:
                                    if tc.function.name:
                                        call[1] += tc.function.name
                                    if tc.function.arguments:
                                        call.append(tc.function.arguments)
                            if delta.content:
                                parts.append(delta.content)
                                yield delta.content
            except Exception as exc:
                # Deltas were already handed out, so a broken stream cannot be retried here.
                # Not every SDK wraps transport errors raised mid-stream, hence the broad except.
                raise self._error(exc, "the stream broke off") from exc
            if not received:
                raise ProviderError(
                    f"openai: the stream for model {request.model!r} ended before its first chunk",
                    provider=self.name,
                )
        text = "".join(parts)
        uses = tuple(ToolUse(c[0], c[1], "".join(c[2:])) for _, c in sorted(calls.items()))
        data = None if uses else _data(request, text)
        yield ProviderReply(
            text=text, data=data, usage=self._priced(spent, request), tool_calls=uses, model=model
        )

    def _priced(self, usage: Usage, request: ProviderRequest) -> Usage:
        """``usage`` with the call's cost (genai-prices; None for a model it does not know)."""
        return priced(usage, self.name, request.model, self._base_url or os.environ.get("OPENAI_BASE_URL"))

    async def aclose(self) -> None:
        """Close the SDK client and its connections (a later call makes a new one)."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def _params(self, request: ProviderRequest) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        if request.instructions:
            messages.append({"role": "system", "content": request.instructions})
        messages += map(_message, request.messages)
        params: dict[str, Any] = {"model": request.model, "messages": messages}
        if request.tools:
            params["tools"] = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
                }
                for t in request.tools
            ]
        if request.temperature is not None:
            params["temperature"] = request.temperature
        if request.max_tokens is not None:
            params[self._max_tokens_param] = request.max_tokens
        if request.output_schema is not None:
            params["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": _NAME.sub("_", request.output_name or "output")[:64],
                    "schema": _strict_schema(request.output_schema),
                    "strict": True,
                },
            }
        params.update(request.options)
        extra = {key: params.pop(key) for key in list(params) if key not in self._accepted}
        if extra:
            params["extra_body"] = {**params.get("extra_body", {}), **extra}
        return params

    async def _retrying(self, call: Callable[[], Awaitable[_T]]) -> _T:
        try:
            return await self._retry.call(call)
        except openai.OpenAIError as exc:
            gave_up = f"gave up after {self._retry.max_attempts} attempts" if _transient(exc) else ""
            raise self._error(exc, gave_up) from exc

    def _error(self, exc: Exception, context: str = "") -> ProviderError:
        status = exc.status_code if isinstance(exc, openai.APIStatusError) else None
        detail = exc.message if isinstance(exc, openai.APIError) else str(exc)
        body = getattr(exc, "body", None)
        if isinstance(body, Mapping):
            error = body.get("error", body)
            if isinstance(error, Mapping) and isinstance(error.get("message"), str):
                detail = error["message"]
        what = f"HTTP {status}" if status is not None else type(exc).__name__
        suffix = f" ({context})" if context else ""
        return ProviderError(f"openai: {what}: {detail}{suffix}", status=status, provider=self.name)


def _message(m: Message) -> dict[str, Any]:
    """A conversation turn in Chat Completions form (tool calls and tool results included)."""
    if m.role == "tool":
        return {"role": "tool", "tool_call_id": m.call_id, "content": m.content}
    if m.tool_calls:
        calls = [
            {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
        return {"role": "assistant", "content": m.content or None, "tool_calls": calls}
    return {"role": m.role, "content": m.content}


def _tool_use(call: dict[str, Any]) -> ToolUse:
    """One ``tool_calls`` item of a reply (arguments kept as the text the model wrote)."""
    fn = call.get("function")
    fn = fn if isinstance(fn, dict) else {}
    arguments = fn.get("arguments")
    return ToolUse(
        str(call.get("id") or ""),
        str(fn.get("name") or ""),
        arguments if isinstance(arguments, str) else "" if arguments is None else json.dumps(arguments),
    )


def _data(request: ProviderRequest, text: str) -> Any:
    """The parsed JSON of a structured reply (None when it is not JSON: the pool repairs it)."""
    if request.output_schema is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None
