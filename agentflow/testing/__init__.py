"""Test helpers for users' own tests: a scripted provider and an in-memory journal.

```python
from agentflow import Agent
from agentflow.testing import ScriptedProvider

writer = ScriptedProvider(["First draft.", {"title": "Notes", "score": 7}, TimeoutError("boom")])
agents = {"writer": Agent(provider=writer, model="test")}
...
assert writer.prompts == ["Notes for acme/app", ...]
```
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, TypeAlias

from ..agents.spi import ProviderReply, ProviderRequest
from ..errors import ProviderError
from ..types import Usage

__all__ = ["MemoryJournal", "ScriptItem", "ScriptedProvider"]

#: One scripted answer: text, structured data (a dict), a full reply, an exception to
#: raise (instance or class), or a callable of the request returning any of these
#: (sync or async).
ScriptItem: TypeAlias = (
    str
    | dict[str, Any]
    | ProviderReply
    | BaseException
    | type[BaseException]
    | Callable[[ProviderRequest], Any]
)

_DELTA = re.compile(r"\s*\S+\s*|\s+")


def _words(text: str | None) -> int:
    return len(text.split()) if text else 0


class ScriptedProvider:
    """A :class:`~agentflow.agents.Provider` that answers from a script, in order.

    Use it as ``Agent(provider=ScriptedProvider([...]), model="test")``.

    Args:
        replies: the script. A ``str`` is the reply text; a ``dict`` is structured
            output (``data``, with its JSON as the text); a ``ProviderReply`` is used
            as is; an exception (or exception class) is raised; a callable gets the
            :class:`~agentflow.agents.ProviderRequest` and returns any of these.
        name: the provider's name (shows in errors).
        latency: seconds each call takes (``asyncio.sleep``), to hold handles open.

    Attributes:
        requests: every request received, in order, including ones that raised.
        closed: True after ``aclose``.
    """

    def __init__(self, replies: Iterable[ScriptItem] = (), *, name: str = "scripted", latency: float = 0.0):
        self.name = name
        self.latency = latency
        self.requests: list[ProviderRequest] = []
        self.closed = False
        self._script: deque[ScriptItem] = deque(replies)
        self._given = len(self._script)

    def __repr__(self) -> str:
        return (
            f"<ScriptedProvider {self.name!r}: {len(self.requests)} calls, {len(self._script)} replies left>"
        )

    def add(self, *replies: ScriptItem) -> None:
        """Append more replies to the script."""
        self._script.extend(replies)
        self._given += len(replies)

    @property
    def remaining(self) -> int:
        """Replies not used yet."""
        return len(self._script)

    @property
    def prompts(self) -> list[str]:
        """The last user message of every request, in order."""
        return [r.messages[-1].content if r.messages else "" for r in self.requests]

    async def complete(self, request: ProviderRequest) -> ProviderReply:
        """Answer ``request`` with the next scripted reply (or raise the scripted error)."""
        self.requests.append(request)
        if not self._script:
            prompt = request.messages[-1].content if request.messages else ""
            raise ProviderError(
                f"ScriptedProvider {self.name!r} ran out of replies: call {len(self.requests)} asked for "
                f"one but the script held {self._given}. Add replies to the script. Prompt: {prompt[:200]!r}",
                provider=self.name,
            )
        item = self._script.popleft()
        if self.latency:
            await asyncio.sleep(self.latency)
        if callable(item) and not _is_exception(item):
            item = item(request)
            if inspect.isawaitable(item):
                item = await item
        return self._reply(item, request)

    async def stream(self, request: ProviderRequest) -> AsyncIterator[str | ProviderReply]:
        """Yield the next scripted reply's text in word-sized deltas, then the reply."""
        reply = await self.complete(request)
        for delta in _DELTA.findall(reply.text):
            yield delta
        yield reply

    async def aclose(self) -> None:
        """Mark the provider closed (there is nothing to release)."""
        self.closed = True

    def _reply(self, item: Any, request: ProviderRequest) -> ProviderReply:
        if _is_exception(item):
            raise item
        if isinstance(item, ProviderReply):
            return item
        data = None
        if isinstance(item, dict):
            data, text = item, json.dumps(item)
        elif isinstance(item, str):
            text = item
        else:
            raise TypeError(
                f"ScriptedProvider {self.name!r}: a script item must be str, dict, ProviderReply, an "
                f"exception or a callable returning one of those, got {type(item).__name__}"
            )
        spent_in = _words(request.instructions) + sum(_words(m.content) for m in request.messages)
        return ProviderReply(text=text, data=data, usage=Usage(spent_in, _words(text)))


def _is_exception(item: object) -> bool:
    return isinstance(item, BaseException) or (isinstance(item, type) and issubclass(item, BaseException))


class MemoryJournal:
    """An :class:`~agentflow.agents.AgentJournal` kept in a dict, for using agent pools in tests.

    Values pass through JSON on the way in, as a durable store would make them.

    Args:
        scope: the journal-key prefix of the simulated step visit.
        entries: journaled replies to start with (e.g. another journal's, to replay).

    Attributes:
        entries: key → journaled reply (JSON).
        usage: tokens recorded so far.
        events: ``(kind, data)`` of every event emitted (``agent_leak``).
    """

    def __init__(self, scope: str = "run:step:1", entries: dict[str, Any] | None = None) -> None:
        self._scope = scope
        self.entries: dict[str, Any] = dict(entries or {})
        self.usage = Usage()
        self.events: list[tuple[str, Any]] = []

    @property
    def scope(self) -> str:
        """The key prefix of this step visit."""
        return self._scope

    def lookup(self, key: str) -> Any | None:
        """The reply journaled under ``key``, or None."""
        return self.entries.get(key)

    async def record(self, key: str, value: Any, usage: Usage) -> None:
        """Journal ``value`` under ``key`` and add ``usage``."""
        self.entries[key] = json.loads(json.dumps(value))
        self.usage = self.usage + usage

    def spent(self) -> int:
        """Tokens recorded so far."""
        return self.usage.total_tokens

    def emit(self, kind: str, data: Any = None) -> None:
        """Remember an event."""
        self.events.append((kind, data))
