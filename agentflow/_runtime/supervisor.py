"""The supervisor: the runs of one workflow this process owns, and the machinery they share.

It implements the engine's :class:`~agentflow._engine.kernel.Kernel`: the store,
notifications to watchers, agent pools, gate timers, and the lease keeper. Every
run's task is tracked here; :meth:`Supervisor.close` cancels and awaits them all, so
a closed runner leaves no task behind (and its runs recoverable, their leases
released).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .._engine.drive import drive
from .._engine.flow import advance_flow
from .._engine.gates import Transition, apply, expired
from .._engine.imperative import advance_imperative
from .._engine.run import LiveRun
from ..agents.pool import AgentPools
from ..agents.spi import AgentJournal
from ..definition.workflow import WorkflowSpec
from ..errors import CorruptRecordError, LeaseLostError, RunNotFoundError, StoreError
from ..stores.contract import Commit, Lease, RunRecord, Store
from ..types import RunEvent, RunStatus
from .leases import LeaseKeeper
from .notify import Notifier
from .timers import GateTimers

__all__ = ["Supervisor"]

log = logging.getLogger("agentflow")

#: A store update that raised StoreError is tried this many times in all, the first
#: retry after this many seconds (doubling): about 0.75 s before giving up.
_UPDATE_TRIES, _UPDATE_FIRST = 5, 0.05


class Supervisor:
    """Per-runner machinery: the store, the runs this process owns, leases, deadlines."""

    def __init__(self, spec: WorkflowSpec, store: Store, lease_ttl: float, owner: str) -> None:
        self.spec = spec
        self.store = store
        self.lease_ttl = lease_ttl
        self.owner = owner
        self.local: dict[str, LiveRun] = {}
        self.notifier = Notifier()
        self.stopping = False
        self.waiters: dict[str, Any] = self.notifier.waiters
        self.pools = AgentPools(spec.agents) if spec.agents is not None else None
        self.leases = LeaseKeeper(self)
        self.timers = GateTimers(self)
        self.advance: Callable[[LiveRun], Awaitable[None]] = (
            advance_imperative if spec.imperative else advance_flow
        )

    # -- the Kernel ---------------------------------------------------------

    def notify(self, run_id: str) -> None:
        """Wake whoever waits on ``run_id`` here."""
        self.notifier.notify(run_id)

    def agents(self, journal: AgentJournal) -> Any:
        """``ctx.agents`` for one step execution."""
        assert self.pools is not None
        return self.pools.accessor(journal)

    def watch_deadlines(self) -> None:
        """Enforce gate deadlines of this workflow while this runner lives."""
        self.timers.ensure()

    def forget(self, run: LiveRun) -> None:
        """``run`` left this process."""
        if self.local.get(run.run_id) is run:
            del self.local[run.run_id]
        self.notify(run.run_id)

    # -- owning runs ----------------------------------------------------------

    def start(self, run: LiveRun) -> None:
        """Advance ``run`` in a task of its own (tracked; cancelled and awaited by :meth:`close`)."""
        self.local[run.run_id] = run
        run.task = asyncio.get_running_loop().create_task(
            drive(run, self.advance), name=f"agentflow:{run.run_id}"
        )
        self.leases.ensure()

    async def adopt(self, run_id: str, lease: Lease) -> LiveRun:
        """Load a run this process just took the lease of, and start advancing it.

        Raises:
            CorruptRecordError: the run cannot be loaded; it is failed (alone) with that error.
        """
        loaded = await self.store.load(run_id)
        if loaded is None:
            raise RunNotFoundError(f"run {run_id} vanished from the store of workflow {self.spec.name!r}")
        try:
            run = LiveRun.restore(self, loaded, lease)
        except CorruptRecordError as exc:
            # Nothing can advance it: fail the run (so it is not retried for ever) and say why.
            rec, message = loaded.record, str(exc)
            error = {"step": rec.step, "type": type(exc).__name__, "message": message, "traceback": ""}
            data = {"type": error["type"], "message": message}
            event = RunEvent("failed", run_id, rec.step, data, time.time(), rec.event_count + 1)
            fields = {"status": RunStatus.FAILED, "error": error, "control": None}
            commit = Commit(fields=fields, events=[event], release=True, seq=rec.commit_seq + 1)
            await self.store.commit(run_id, lease, commit)
            self.notify(run_id)
            raise
        self.start(run)
        return run

    async def transition(self, run_id: str, fn: Callable[[RunRecord, float], Transition | None]) -> RunRecord:
        """Apply a decision-like change through the store; adopt the run when it resumes here.

        Raises:
            RunNotFoundError: there is no such run.
        """
        # Every lease token an attempt took: after a lost reply the retry finds the change
        # made (``fn`` returns None) and the lease is known from the record.
        taken: set[int] = set()

        def change(rec: RunRecord, now: float) -> Any:
            t = fn(rec, now)
            if t is None:
                return None
            out, lease = apply(rec, now, t, self.owner, self.lease_ttl)
            if lease is not None:
                taken.add(lease.token)
            return out

        rec = await self.update(run_id, change)
        if rec is None:
            raise RunNotFoundError(f"no run {run_id!r} in the store of workflow {self.spec.name!r}")
        self.notify(run_id)
        if rec.lease_owner == self.owner and rec.lease_token in taken and run_id not in self.local:
            await self.adopt(run_id, Lease(self.owner, rec.lease_token))
        return rec

    async def update(self, run_id: str, change: Callable[[RunRecord, float], Any]) -> RunRecord | None:
        """``store.update``, retried a few times through a :class:`StoreError`.

        The change may have been applied by an attempt whose reply was lost: every change
        made through here is idempotent (a decision carries its id, a control flag or a
        transition checks the status first), so the retry makes it once.

        Raises:
            StoreError: the store did not answer after the retries.
        """
        delay = _UPDATE_FIRST
        for _ in range(_UPDATE_TRIES - 1):
            try:
                return await self.store.update(run_id, change)
            except (CorruptRecordError, LeaseLostError):
                raise
            except StoreError as exc:
                log.warning("run %s: an update got no answer (%s); retried in %.2f s", run_id, exc, delay)
            await asyncio.sleep(delay)
            delay *= 2
        return await self.store.update(run_id, change)

    async def expire(self, run_id: str) -> None:
        """Time out the gate of ``run_id`` if its deadline passed."""
        await self.transition(run_id, lambda rec, now: expired(rec))

    async def close(self) -> None:
        """Stop advancing runs (they stay recoverable) and stop background tasks."""
        self.stopping = True
        tasks = [r.task for r in self.local.values() if r.task is not None]
        for r in list(self.local.values()):
            r.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.leases.close()
        await self.timers.close()
        if self.pools is not None:
            await self.pools.aclose()
