"""Timers: every deadline of a parked run, enforced while a process serving the workflow lives.

One sweeper per workflow and process looks at the store's index of due deadlines
(``Store.due_gates``) every :data:`SWEEP_INTERVAL` seconds and acts on each due run by
the kind of what it waits on (``pending["kind"]``):

* a gate (``"gate"``, or ``"human_approval"`` in older records): it times out;
* a timer (``"sleep"``): the run goes on at its target, here;
* children (``"children"``): the supervisor checks on them
  (:meth:`Supervisor.check_children`), which resumes the parent if they ended.

Each action is an atomic transition judged on the record as the store holds it, so a
timer swept by two processes at once (or by a sweeper and ``recover()``) fires once.
Nothing is held per parked run: a run is in this process only from the moment its
timer fires. The sweeper starts when the workflow's supervisor is first used, so a
timer that came due while no process was alive fires as soon as one starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from .._engine.gates import Transition, wake
from .._engine.tool_gates import past_deadline
from ..errors import AgentflowError, IncompatibleRunError, StoreError
from ..stores.contract import RunRecord
from ..types import RunStatus

if TYPE_CHECKING:
    from .supervisor import Supervisor

__all__ = ["GateTimers"]

log = logging.getLogger("agentflow")

#: Seconds between looks at the store's index of due deadlines: a due timer fires on
#: average half of this late (plus the time to move the runs due with it on).
SWEEP_INTERVAL = 0.2

#: Due runs acted on at once in one sweep (each is one store update).
_SWEEP_BATCH = 64


class GateTimers:
    """Acts on parked runs whose deadline passed (through the store's due-deadlines index)."""

    __slots__ = ("_stuck", "_sup", "_task")

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup
        self._task: asyncio.Task[None] | None = None
        # Due runs this definition cannot load (IncompatibleRunError, kept on their record):
        # not tried again by this process, which runs the same code.
        self._stuck: set[str] = set()

    def ensure(self) -> None:
        """Start sweeping if not already (outside a running event loop: at the next call inside one)."""
        if self._task is None or self._task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._task = loop.create_task(self._loop(), name=f"agentflow:timers:{self._sup.spec.name}")

    async def close(self) -> None:
        """Stop sweeping."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def sweep(self) -> None:
        """Act on every run due now: time out gates, wake timers, check on children."""
        sup = self._sup
        due = [r for r in await sup.store.due_gates(sup.spec.name, time.time()) if r not in self._stuck]
        for i in range(0, len(due), _SWEEP_BATCH):
            await asyncio.gather(*(self.fire(run_id) for run_id in due[i : i + _SWEEP_BATCH]))

    async def fire(self, run_id: str) -> None:
        """Act on ``run_id`` if its deadline passed, by the kind of what it waits on.

        Errors are the run's own (it vanished, it cannot be loaded: it is failed alone)
        and do not stop the sweep.
        """
        sup = self._sup
        children: list[bool] = []

        def due(rec: RunRecord, now: float) -> Transition | None:
            pending = rec.pending
            if rec.status != RunStatus.WAITING or not isinstance(pending, dict):
                return None
            kind = pending.get("kind")
            if kind == "sleep":
                return wake(rec)
            if kind == "children":
                deadline = pending.get("deadline")
                children.append(deadline is not None and deadline <= time.time())
                return None
            return past_deadline(rec)

        try:
            await sup.transition(run_id, due)
            if children and children[-1]:
                await sup.check_children(run_id)
        except IncompatibleRunError:
            self._stuck.add(run_id)
        except AgentflowError:
            pass

    async def _loop(self) -> None:
        while not self._sup.stopping:
            try:
                await self.sweep()
            except StoreError:
                pass  # the store is out of reach: the next sweep tries again
            except Exception:
                # A sweeper that died would leave every timer of the workflow unfired.
                log.exception("workflow %s: a timer sweep failed; the next one goes on", self._sup.spec.name)
            await asyncio.sleep(SWEEP_INTERVAL)
