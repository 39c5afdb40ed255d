"""The journal of a run: what re-runs of a step find instead of doing the work again.

Keys are built from the step visit (``"{visit}:{step}:{scope}"`` for agent calls,
``"p:{visit}:..."`` for finished branches, ``"x:{n}"`` for imperative positions), so a
retry, a recovery and a replay of the same step find the same entries.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from ..stores.contract import Commit
from ..types import Usage

if TYPE_CHECKING:
    from .run import LiveRun

__all__ = ["StepJournal"]


class StepJournal:
    """The engine's side of agent calls for one step execution (an ``AgentJournal``)."""

    __slots__ = ("_run", "_scope", "_step")

    def __init__(self, run: LiveRun, scope: str, step: str = "") -> None:
        self._run = run
        self._scope = scope
        self._step = step

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

    def spent(self) -> int:
        """Tokens the run has consumed so far."""
        return self._run.usage.total_tokens

    def cost(self) -> Decimal | None:
        """What the run's calls of known price have cost so far (USD)."""
        return self._run.usage.cost

    def emit(self, kind: str, data: Any = None) -> None:
        """Record an event on the run (``agent_leak``)."""
        self._run.emit(kind, None, data)
