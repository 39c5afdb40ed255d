"""Timers: gate deadlines enforced while a process serving the workflow lives."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from ..errors import AgentflowError, StoreError

if TYPE_CHECKING:
    from .supervisor import Supervisor

__all__ = ["GateTimers"]

#: Seconds between looks at the store's index of due gates.
SWEEP_INTERVAL = 0.2


class GateTimers:
    """Times out gates whose deadline passed (through the store's due-gates index)."""

    __slots__ = ("_sup", "_task")

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup
        self._task: asyncio.Task[None] | None = None

    def ensure(self) -> None:
        """Start sweeping if not already."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="agentflow:gates")

    async def close(self) -> None:
        """Stop sweeping."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def sweep(self) -> None:
        """Time out every gate due now."""
        sup = self._sup
        for run_id in await sup.store.due_gates(sup.spec.name, time.time()):
            try:
                await sup.expire(run_id)
            except AgentflowError:
                pass

    async def _loop(self) -> None:
        while not self._sup.stopping:
            try:
                await self.sweep()
            except StoreError:
                pass
            await asyncio.sleep(SWEEP_INTERVAL)
