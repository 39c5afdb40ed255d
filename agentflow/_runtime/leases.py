"""Leases: renewing the leases of the runs this process owns, and acting on control flags.

A renewal returns the run's control flag, so a pause or stop asked for by another
process reaches the owner within a renewal interval even while a step runs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..errors import LeaseLostError, StoreError

if TYPE_CHECKING:
    from .supervisor import Supervisor

__all__ = ["LeaseKeeper"]

log = logging.getLogger("agentflow")


class LeaseKeeper:
    """Renews every owned run's lease each ``lease_ttl / 3`` seconds (at most 1 s)."""

    __slots__ = ("_sup", "_task")

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup
        self._task: asyncio.Task[None] | None = None

    def ensure(self) -> None:
        """Start renewing if not already (the loop ends by itself when no run is left)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="agentflow:leases")

    async def close(self) -> None:
        """Stop renewing."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        sup = self._sup
        interval = min(sup.lease_ttl / 3, 1.0)
        idle = 0
        while idle < 2:  # ends after two idle ticks, so no task outlives the runs it served
            await asyncio.sleep(interval)
            idle = 0 if sup.local else idle + 1
            for run in list(sup.local.values()):
                if run.task is None or run.task.done():
                    continue
                try:
                    control = await sup.store.renew(run.run_id, run.lease, sup.lease_ttl)
                except LeaseLostError:
                    log.warning("run %s: its lease was taken over; this process stops advancing it", run.run_id)
                    run.task.cancel()
                    continue
                except StoreError:
                    continue  # retried at the next tick; the lease has slack for it
                if control == "stop":
                    run.stop_requested = True
                    run.cancel()
                elif control == "pause":
                    run.pause_requested = True
