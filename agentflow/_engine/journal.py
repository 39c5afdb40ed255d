"""The journal of a run: what re-runs of a step find instead of doing the work again.

Keys are built from the step visit (``"{visit}:{step}:{scope}"`` for agent calls,
``"p:{visit}:..."`` for finished branches, ``"x:{n}"`` for imperative positions), so a
retry, a recovery and a replay of the same step find the same entries.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NoReturn

from ..stores.contract import Commit, approval_id
from ..types import RunEvent, Usage
from .tool_gates import park_tools, refuse_in_branch, tool_approval

if TYPE_CHECKING:
    from .run import LiveRun

__all__ = ["StepJournal"]


class StepJournal:
    """The engine's side of agent calls for one step execution (an ``AgentJournal``)."""

    __slots__ = ("_branch", "_run", "_scope", "_step", "_visit")

    def __init__(
        self, run: LiveRun, scope: str, step: str = "", visit: int = 0, branch: bool = False
    ) -> None:
        self._run = run
        self._scope = scope
        self._step = step
        self._visit = visit
        self._branch = branch

    @property
    def scope(self) -> str:
        """A key prefix unique to this step visit (same across retries and crash re-runs)."""
        return self._scope

    @property
    def run_id(self) -> str:
        """The run the calls belong to."""
        return self._run.run_id

    @property
    def step_name(self) -> str:
        """The step the calls are made in."""
        return self._step

    def lookup(self, key: str) -> Any | None:
        """A journaled reply stored under ``key``, or None."""
        return self._run.journal.get(key)

    async def record(self, key: str, value: Any, usage: Usage) -> None:
        """Commit ``value`` under ``key`` with the run's usage, before the reply is used."""
        run = self._run
        run.journal[key] = value
        run.usage = run.usage + usage
        run.step_usage = run.step_usage + usage
        await run.commit(Commit(fields={"usage": run.usage.to_json()}, journal={key: value}))

    async def record_many(self, entries: Mapping[str, Any], usage: Usage) -> None:
        """Commit several entries (and the run's usage) in one write."""
        run = self._run
        run.journal.update(entries)
        run.usage = run.usage + usage
        run.step_usage = run.step_usage + usage
        await run.commit(Commit(fields={"usage": run.usage.to_json()}, journal=dict(entries)))

    def replayed(self, usage: Usage) -> None:
        """A journaled reply was used again by a re-run of the step: the step reports its usage.

        (Not in a parallel branch: the branches of a step share its count, and one
        branch's retry cannot start it again.)
        """
        if not self._branch:
            self._run.step_usage = self._run.step_usage + usage

    def spent(self) -> int:
        """Tokens the run has consumed so far."""
        return self._run.usage.total_tokens

    def cost(self) -> Decimal | None:
        """What the run's calls of known price have cost so far (USD)."""
        return self._run.usage.cost

    def emit(self, kind: str, data: Any = None) -> None:
        """Record an event on the run (``agent_leak``)."""
        self._run.emit(kind, None, data)

    @property
    def watched(self) -> bool:
        """True while someone in this process watches the run's events (live events reach them)."""
        return self._run.run_id in self._run.kernel.watching

    def live(self, kind: str, data: Any = None) -> None:
        """Deliver a live-only event to this process's watchers of the run; never stored.

        Its ``seq`` is that of the run's latest event, which it follows (it takes no
        number of its own); with nobody watching it is dropped before it is made.
        """
        run = self._run
        if run.run_id in run.kernel.watching:
            event = RunEvent(kind, run.run_id, self._step, data, time.time(), run.event_seq)
            run.kernel.publish(run.run_id, event)

    # -- approvals of tool calls (see ``tool_gates``) ---------------------------------

    @property
    def operators(self) -> tuple[str, ...]:
        """Who decides a tool call's unknown outcome when its tool names no approvers."""
        return self._run.spec.operators

    def approval_id(self, key: str) -> str:
        """The id of the approval named ``key`` in this step visit."""
        return approval_id(self._run.run_id, self._step, self._visit, key)

    def decided(self, approval: str) -> dict[str, Any] | None:
        """The stored decision (JSON) of ``approval``, or None while it is undecided."""
        for d in reversed(self._run.decisions):
            if isinstance(d, dict) and d.get("approval") == approval:
                return d
        return None

    async def wait_for(self, asks: Sequence[tuple[str, dict[str, Any]]]) -> NoReturn:
        """Park the run on these approvals (``(key, what)`` pairs) and unwind the step.

        Raises:
            AgentflowError: in a parallel branch, where a run cannot park on a call.
        """
        if self._branch:
            raise refuse_in_branch(self._run.run_id, self._step, str(asks[0][1].get("tool")))
        run, step, visit = self._run, self._step, self._visit
        await park_tools(run, step, visit, [tool_approval(run, step, visit, k, a) for k, a in asks])
