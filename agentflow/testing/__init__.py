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
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NoReturn, TypeAlias

from ..agents.spi import ProviderReply, ProviderRequest, ToolUse
from ..errors import AgentflowError, ProviderError
from ..stores.contract import approval_id
from ..types import Decision, Usage

__all__ = ["ApprovalRequested", "MemoryJournal", "ScriptItem", "ScriptedCall", "ScriptedProvider", "call"]


class ApprovalRequested(AgentflowError):
    """Raised by :class:`MemoryJournal` where a run would park on tool approvals.

    Attributes:
        approvals: ``(key, what)`` of each approval asked for (see ``MemoryJournal.decide``).
    """

    def __init__(self, message: str, approvals: list[tuple[str, dict[str, Any]]]) -> None:
        super().__init__(message)
        self.approvals = approvals


@dataclass(frozen=True, slots=True)
class ScriptedCall:
    """A tool call in a script: the model calls ``name`` with ``arguments``.

    Attributes:
        call_id: the call's id (default: ``call_1``, ``call_2``, ... per provider).
        raw: the arguments as text, sent instead of ``arguments`` (to script a model
            that writes arguments that are not JSON).
    """

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    call_id: str | None = None
    raw: str | None = None


def call(name: str, /, **arguments: Any) -> ScriptedCall:
    """A scripted turn in which the model calls tool ``name`` (a list of them: parallel calls)."""
    return ScriptedCall(name, arguments)


#: One scripted answer: text, structured data (a dict), a full reply, a tool call
#: (``call(...)``) or a list of them (one turn, parallel calls), an exception to raise
#: (instance or class), or a callable of the request returning any of these (sync or async).
ScriptItem: TypeAlias = (
    str
    | dict[str, Any]
    | ProviderReply
    | ScriptedCall
    | list[ScriptedCall]
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
        self._calls = 0

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
        return [
            next((m.content for m in reversed(r.messages) if m.role == "user"), "") for r in self.requests
        ]

    @property
    def tool_results(self) -> list[list[tuple[str, str, bool]]]:
        """Per request, the tool results after its last model turn: ``(call_id, content, is_error)``."""
        out = []
        for r in self.requests:
            tail: list[tuple[str, str, bool]] = []
            for m in reversed(r.messages):
                if m.role != "tool":
                    break
                tail.append((m.call_id or "", m.content, m.is_error))
            out.append(tail[::-1])
        return out

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
        spent_in = _words(request.instructions) + sum(_words(m.content) for m in request.messages)
        if isinstance(item, ScriptedCall) or (
            isinstance(item, list) and item and all(isinstance(c, ScriptedCall) for c in item)
        ):
            uses = tuple(self._use(c) for c in ([item] if isinstance(item, ScriptedCall) else item))
            said = sum(_words(u.arguments) for u in uses)
            return ProviderReply(text="", usage=Usage(spent_in, said), tool_calls=uses)
        data = None
        if isinstance(item, dict):
            data, text = item, json.dumps(item)
        elif isinstance(item, str):
            text = item
        else:
            raise TypeError(
                f"ScriptedProvider {self.name!r}: a script item must be str, dict, ProviderReply, call(...), "
                f"a list of call(...), an exception or a callable returning one of those, "
                f"got {type(item).__name__}"
            )
        return ProviderReply(text=text, data=data, usage=Usage(spent_in, _words(text)))

    def _use(self, c: ScriptedCall) -> ToolUse:
        self._calls += 1
        arguments = c.raw if c.raw is not None else json.dumps(c.arguments)
        return ToolUse(c.call_id or f"call_{self._calls}", c.name, arguments)


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

    def __init__(
        self,
        scope: str = "run:step:1",
        entries: dict[str, Any] | None = None,
        run_id: str = "run",
        step_name: str = "step",
    ) -> None:
        self._scope = scope
        self.entries: dict[str, Any] = dict(entries or {})
        self.usage = Usage()
        self.events: list[tuple[str, Any]] = []
        self.writes = 0
        self.decisions: dict[str, dict[str, Any]] = {}
        self.asked: list[list[tuple[str, dict[str, Any]]]] = []
        self.operators_: tuple[str, ...] = ()
        self._run_id = run_id
        self._step_name = step_name

    @property
    def scope(self) -> str:
        """The key prefix of this step visit."""
        return self._scope

    @property
    def run_id(self) -> str:
        """The simulated run's id."""
        return self._run_id

    @property
    def step_name(self) -> str:
        """The simulated step's name."""
        return self._step_name

    def lookup(self, key: str) -> Any | None:
        """The reply journaled under ``key``, or None."""
        return self.entries.get(key)

    async def record(self, key: str, value: Any, usage: Usage) -> None:
        """Journal ``value`` under ``key`` and add ``usage``."""
        self.entries[key] = json.loads(json.dumps(value))
        self.usage = self.usage + usage
        self.writes += 1

    async def record_many(self, entries: Mapping[str, Any], usage: Usage) -> None:
        """Journal several entries as one write and add ``usage``."""
        self.entries.update(json.loads(json.dumps(dict(entries))))
        self.usage = self.usage + usage
        self.writes += 1

    def replayed(self, usage: Usage) -> None:
        """A journaled reply was used again (nothing to count here: ``usage`` has it)."""

    def spent(self) -> int:
        """Tokens recorded so far."""
        return self.usage.total_tokens

    def cost(self) -> Decimal | None:
        """The cost recorded so far (USD), None when no call had a known price."""
        return self.usage.cost

    def emit(self, kind: str, data: Any = None) -> None:
        """Remember an event."""
        self.events.append((kind, data))

    @property
    def operators(self) -> tuple[str, ...]:
        """Who decides unknown outcomes of tools without approvers (set ``.operators_``)."""
        return self.operators_

    def approval_id(self, key: str) -> str:
        """The approval id of ``key`` in this simulated step visit."""
        return approval_id(self._run_id, self._step_name, 0, key)

    def decided(self, approval: str) -> dict[str, Any] | None:
        """A decision given with :meth:`decide`, or None."""
        return self.decisions.get(approval)

    def decide(self, key: str, decision: Decision) -> None:
        """Decide the approval asked for under ``key`` (what a reviewer would do)."""
        aid = self.approval_id(key)
        self.decisions[aid] = {**decision.to_json(), "approval": aid}

    async def wait_for(self, asks: Any) -> NoReturn:
        """A run would park here: raise :class:`ApprovalRequested` with what it asks for."""
        asks = list(asks)
        self.asked.append(asks)
        names = ", ".join(f"{a['kind']} of {a['tool']}" for _, a in asks)
        raise ApprovalRequested(f"run {self._run_id}, step {self._step_name!r} waits for {names}", asks)
