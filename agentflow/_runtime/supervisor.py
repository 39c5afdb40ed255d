"""The supervisor: the runs of one workflow this process owns, and the machinery they share.

It implements the engine's :class:`~agentflow._engine.kernel.Kernel`: the store,
notifications to watchers, agent pools, gate timers, and the lease keeper. Every
run's task is tracked here; :meth:`Supervisor.close` cancels and awaits them all, so
a closed runner leaves no task behind (and its runs recoverable, their leases
released).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .._engine.compose import ChildOutcome
from .._engine.drive import drive
from .._engine.flow import advance_flow
from .._engine.gates import Transition, apply
from .._engine.imperative import advance_imperative
from .._engine.run import LiveRun
from .._engine.tool_gates import past_deadline
from ..agents.pool import AgentPools
from ..agents.spi import AgentJournal
from ..definition.steps import END
from ..definition.workflow import WorkflowSpec
from ..errors import (
    CorruptRecordError,
    IncompatibleRunError,
    LeaseLostError,
    RunNotFoundError,
    StoreError,
)
from ..stores.capabilities import ChangeFeed, ReadsVersions, TakesRuns
from ..stores.contract import Change, Commit, Lease, LoadedRun, RunRecord, Store
from ..types import FINAL, RunEvent, RunStatus
from . import handover, polling
from .children import ChildWatch
from .handover import queue_of
from .leases import LeaseKeeper
from .limits import limiter_for
from .listeners import ApprovalListener, announce_decided, announce_pending
from .notify import Notifier
from .timers import GateTimers
from .versions import Resuming, incompatible_error, mark, migrate

__all__ = ["Supervisor", "queue_of", "stop_change"]

#: Seconds between two looks at the store for a run another process advances (no feed).
_POLL = 0.1
#: The same, as a backstop, while a store's change feed wakes watchers: the first look
#: after a read, and every look while the feed is cut.
_POLL_PUSHED = 1.0
#: The backstop's longest interval: it doubles from ``_POLL_PUSHED`` with each look in a
#: row that no push preceded, while the feed is up (a lost push is seen within this).
_POLL_QUIET = 4.0

log = logging.getLogger("agentflow")

#: A store update that raised StoreError is tried this many times in all, the first
#: retry after this many seconds (doubling): about 0.75 s before giving up.
_UPDATE_TRIES, _UPDATE_FIRST = 5, 0.05

#: Runs a stop reaches at once.
_FAN = 64


def stop_change(rec: RunRecord, now: float) -> Change | None:
    """The store change that stops ``rec``; None when it has ended or a stop is asked for already.

    A run its owner is advancing (lease alive) gets the ``stop`` control flag, seen at
    its next commit or lease renewal; any other (parked, paused, its owner dead) ends
    ``stopped`` here.
    """
    if rec.status in FINAL:
        return None
    if rec.status == RunStatus.RUNNING and rec.lease_expires > now and rec.lease_owner:
        return None if rec.control == "stop" else Change(dataclasses.replace(rec, control="stop"))
    ev = RunEvent("stopped", rec.run_id, rec.step, None, time.time(), rec.event_count + 1)
    return Change(
        dataclasses.replace(rec, status=RunStatus.STOPPED, pending=None, lease_owner=None, control=None),
        [ev],
    )


class Supervisor:
    """Per-runner machinery: the store, the runs this process owns, leases, deadlines."""

    def __init__(
        self,
        spec: WorkflowSpec,
        store: Store,
        lease_ttl: float,
        owner: str,
        specs: dict[str, WorkflowSpec] | None = None,
        root: Supervisor | None = None,
        execute: bool = True,
    ) -> None:
        self.spec = spec
        self.store = store
        # Checked once: a Protocol's isinstance walks its members on every call.
        self.takes: TakesRuns | None = store if isinstance(store, TakesRuns) else None
        self.feed: ChangeFeed | None = store if isinstance(store, ChangeFeed) else None
        self.versions: ReadsVersions | None = store if isinstance(store, ReadsVersions) else None
        self.lease_ttl = lease_ttl
        self.owner = owner
        self.stopping = False
        self.pools = AgentPools(spec.agents, limiter_for(store)) if spec.agents is not None else None
        if root is None:
            # The first workflow's supervisor: the runs, watchers, leases and the
            # workflows served (the runner's and its children's) are kept here, shared.
            self.root: Supervisor = self
            self.local: dict[str, LiveRun] = {}
            self.notifier = Notifier()
            self.leases = LeaseKeeper(self)
            self.specs = dict(specs or {spec.name: spec})
            self.family: dict[str, Supervisor] = {spec.name: self}
            self.watch = ChildWatch(self)
            # False: a client (``WorkflowRunner(execute=False)``): runs that would go on
            # here are handed to the workers through the store's queue instead.
            self.execute = execute
            #: Called with each run that leaves this process (a worker counts its room).
            self.on_leave: list[Callable[[LiveRun], None]] = []
            #: Told of approvals parked and decided here (see :mod:`.listeners`), by every
            #: supervisor of the family: a webhook sender registers once, on the first.
            self.listeners: list[ApprovalListener] = []
            self._feed: asyncio.Task[None] | None = None
            self._feed_up = False  # the feed is subscribed or subscribing (not cut)
            self._claiming: dict[str, asyncio.Event] = {}  # runs a claim here is taking now
        else:
            self.execute = root.execute
            self.on_leave = root.on_leave
            self.listeners = root.listeners
            self.root = root
            self.local = root.local
            self.notifier = root.notifier
            self.leases = root.leases
            self.specs = root.specs
            self.family = root.family
            self.watch = root.watch
        self.waiters: dict[str, Any] = self.notifier.waiters
        self.watching: dict[str, Any] = self.notifier.watching
        self.timers = GateTimers(self)
        # Timers that came due while no process served the workflow fire once one does.
        self.timers.ensure()
        self.advance: Callable[[LiveRun], Awaitable[None]] = (
            advance_imperative if spec.imperative else advance_flow
        )

    # -- the Kernel ---------------------------------------------------------

    def notify(self, run_id: str) -> None:
        """Wake whoever waits on ``run_id`` here."""
        self.notifier.notify(run_id)

    def publish(self, run_id: str, event: RunEvent) -> None:
        """Deliver a live-only event to the watchers of ``run_id`` here (never stored)."""
        self.notifier.publish(run_id, event)

    def agents(self, journal: AgentJournal) -> Any:
        """``ctx.agents`` for one step execution."""
        assert self.pools is not None
        return self.pools.accessor(journal)

    def poll_interval(self, every_step: bool = False, quiet: int = 0) -> float:
        """Seconds between two looks at the store for a run another process advances.

        On a store that pushes changes (``ChangeFeed``: Redis, Postgres) the feed wakes
        watchers at once and the store is looked at only as a backstop, for a push that
        was lost: 1 s after a read, doubling with each of the ``quiet`` looks in a row that
        no push preceded, up to 4 s; every second while the feed is cut. A store that
        tells which of many runs changed (``ReadsVersions``: SQLite) is looked at by one
        task for all the runs waited on, every 100 ms (:mod:`.polling`); a change cannot
        be missed between two such looks, so the backstop looks every 4 s while they
        succeed (every second while they fail). Otherwise every 100 ms. A watcher of
        ``every_step`` (a run's events) looks every 100 ms in any case: a store may push
        only status changes (Postgres does).
        """
        root = self.root
        if self.feed is not None:
            follow = functools.partial(root._feeding, self.feed)
        elif self.versions is not None:
            follow = functools.partial(polling.follow, root, self.versions)
        else:
            return _POLL
        if root._feed is None or root._feed.done():  # one task tells this process's watchers
            root._feed = asyncio.get_running_loop().create_task(follow(), name="agentflow:feed")
        if every_step:
            return _POLL
        if not root._feed_up:
            return _POLL_PUSHED
        if self.feed is None:  # the look at versions compares every run each time: none is lost
            return _POLL_QUIET
        if quiet <= 0:
            return _POLL_PUSHED
        return min(_POLL_QUIET, _POLL_PUSHED * (1 << min(quiet, 8)))

    async def _feeding(self, store: ChangeFeed) -> None:
        """Wake this process's watchers on every change the store pushes, reconnecting when cut."""
        while not self.stopping:
            self._feed_up = True
            try:
                await store.changes(self.notifier.notify)
            except StoreError as exc:
                log.warning("the store's change feed was cut (%s); watchers poll until it is back", exc)
                self.notifier.wake_all()  # what changed meanwhile is read from the store
                await asyncio.sleep(_POLL_PUSHED)
            finally:
                self._feed_up = False

    def watch_deadlines(self) -> None:
        """Enforce gate deadlines of this workflow while this runner lives."""
        self.timers.ensure()

    def parked(self, run: LiveRun, pending: dict[str, Any]) -> None:
        """``run``'s commit as waiting on ``pending`` is stored: watch its deadline, tell the listeners."""
        if pending["deadline"] is not None:
            self.timers.ensure()
        if self.listeners:
            announce_pending(self.listeners, self.spec.name, run.run_id, pending)

    def forget(self, run: LiveRun) -> None:
        """``run`` left this process."""
        if self.local.get(run.run_id) is run:
            del self.local[run.run_id]
        self.notify(run.run_id)
        for fn in self.on_leave:
            fn(run)
        if run.parent is not None and run.status in FINAL:
            outcome = None
            if run.status is RunStatus.COMPLETED:
                # What the parent's step reads: known here, so it needs no read of the store.
                spec = self.spec
                outcome = ChildOutcome(
                    run.run_id, spec.name, run.status, run.output, run.usage, step=run.step
                )
            self.watch.child_ended(run.parent, run.run_id, outcome)

    # -- several workflows (a runner's and its children's) -----------------------

    def of(self, workflow: str) -> Supervisor:
        """The supervisor of ``workflow``'s runs here (made on first use; one per workflow).

        Raises:
            KeyError: this runner does not serve ``workflow``.
        """
        sup = self.family.get(workflow)
        if sup is None:
            root = self.root
            sup = Supervisor(self.specs[workflow], self.store, self.lease_ttl, self.owner, root=root)
            sup.stopping = root.stopping
            self.family[workflow] = sup
        return sup

    def child_kernel(self, workflow: str) -> Supervisor:
        """The kernel of a child workflow's runs (see :meth:`of`)."""
        return self.of(workflow)

    def watch_children(self, run_id: str) -> None:
        """``run_id`` parked on child runs: resume it once they all ended."""
        self.watch.parked(run_id)

    def ended_children(self, run_id: str) -> dict[str, Any]:
        """Children of ``run_id`` that ended here (id → ``ChildOutcome`` when completed, else None)."""
        return self.watch.ended(run_id)

    def forget_children(self, run_id: str) -> None:
        """``run_id`` read its children's results."""
        self.watch.forget_ended(run_id)

    async def stop_runs(self, run_ids: list[str]) -> set[str]:
        """Stop these runs and their children (see ``Kernel.stop_runs``); the ids stopped or stopping."""
        stopped: set[str] = set()
        for i in range(0, len(run_ids), _FAN):
            chunk = run_ids[i : i + _FAN]
            for run_id, rec in zip(chunk, await asyncio.gather(*(self._stop(c) for c in chunk)), strict=True):
                if rec is not None and (rec.status == RunStatus.STOPPED or rec.control == "stop"):
                    stopped.add(run_id)
        return stopped

    async def _stop(self, run_id: str) -> RunRecord | None:
        live = self.local.get(run_id)
        if live is not None and not live.finished:
            live.stop_requested = True
            live.cancel()
            await live.wait_finished()
        try:
            rec = await self.update(run_id, stop_change)
        except (StoreError, CorruptRecordError) as exc:
            log.warning("run %s: could not stop it: %s", run_id, exc)
            return None
        if rec is None:
            return None
        self.notify(run_id)
        self.settled(rec)
        if rec.status == RunStatus.STOPPED and rec.children:
            await self.stop_runs(list(rec.children))
        return rec

    def settled(self, rec: RunRecord) -> None:
        """A change made here left ``rec`` as written: a child run that ended checks on its parent."""
        if rec.parent is not None and rec.status in FINAL:
            self.watch.child_ended(rec.parent, rec.run_id)

    # -- owning runs ----------------------------------------------------------

    def start(self, run: LiveRun) -> None:
        """Advance ``run`` in a task of its own (tracked; cancelled and awaited by :meth:`close`)."""
        self.local[run.run_id] = run
        run.task = asyncio.get_running_loop().create_task(
            drive(run, self.advance), name=f"agentflow:{run.run_id}"
        )
        self.leases.ensure()

    async def adopt(self, run_id: str, lease: Lease, loaded: LoadedRun | None = None) -> LiveRun | None:
        """Load a run this process just took the lease of (unless ``loaded`` with it), and
        start advancing it.

        A client (``execute=False``) hands it to the workers instead (and returns None).

        A run of another version is migrated first (:meth:`migrate`).

        Raises:
            CorruptRecordError: the run cannot be loaded (an :class:`IncompatibleRunError`
                when the definition cannot load it); it is failed (alone) with that error.
        """
        if not self.execute:
            await self.hand_over(run_id, lease)
            return None
        here = self.local.get(run_id)
        if here is not None and not here.finished:
            return here  # never two live copies of one run in a process
        if loaded is None:
            loaded = await self.store.load(run_id)
        if loaded is None:
            raise RunNotFoundError(f"run {run_id} vanished from the store of workflow {self.spec.name!r}")
        try:
            if loaded.record.version != self.spec.version:
                loaded = await migrate(self, loaded, lease)
            run = LiveRun.restore(self, loaded, lease)
        except CorruptRecordError as exc:
            # Nothing can advance it: fail the run (so it is not retried for ever) and say why.
            rec, message = loaded.record, str(exc)
            error = {"step": rec.step, "type": type(exc).__name__, "message": message, "traceback": ""}
            if isinstance(exc, IncompatibleRunError):
                error = incompatible_error(exc)
            data = {"type": error["type"], "message": message}
            event = RunEvent("failed", run_id, rec.step, data, time.time(), rec.event_count + 1)
            fields = {"status": RunStatus.FAILED, "error": error, "control": None}
            commit = Commit(fields=fields, events=[event], release=True, seq=rec.commit_seq + 1)
            await self.store.commit(run_id, lease, commit)
            self.notify(run_id)
            raise
        self.start(run)
        return run

    async def hand_over(self, run_id: str, lease: Lease) -> None:
        """Let go of a run this process just took, and queue it for the workers of its workflow."""
        await handover.hand_over(self, run_id, lease)

    async def claim(self, run_id: str, workflow: str, handed_after: float = 0.0) -> str | None:
        """Take a run a worker claimed from the queue, and advance it here (see :func:`handover.claim`)."""
        return await handover.claim(self, run_id, workflow, handed_after)

    async def transition(self, run_id: str, fn: Callable[[RunRecord, float], Transition | None]) -> RunRecord:
        """Apply a decision-like change through the store; adopt the run when it resumes here.

        Raises:
            RunNotFoundError: there is no such run.
        """
        # Every lease token an attempt took: after a lost reply the retry finds the change
        # made (``fn`` returns None) and the lease is known from the record.
        taken: set[int] = set()
        handed: list[bool] = []  # a client's transition left the run for a worker
        listeners = self.listeners
        made: list[tuple[RunRecord, list[RunEvent]]] = []  # the last attempt that changed the record
        resuming = Resuming(self.spec_of)

        def change(rec: RunRecord, now: float) -> Any:
            t = fn(rec, now)
            if t is None:
                return None
            migrated = None
            if t.resume_at is not None and t.resume_at != END:
                # The run goes on: it must load (else nothing is written), and one of
                # another version is migrated in the same write (see .versions).
                resumed = resuming(rec, t, fn, now)
                if isinstance(resumed, Change):
                    return resumed
                rec, t, migrated = resumed
            out, lease = apply(rec, now, t, self.owner if self.execute else None, self.lease_ttl)
            if migrated is not None:
                out.events = resuming.events(migrated, rec, out.events)
            if listeners:
                made[:] = [(rec, out.events)]
            if lease is not None:
                taken.add(lease.token)
            elif not self.execute and out.record.status == RunStatus.RUNNING:
                handed.append(True)
            return out

        try:
            rec = await self.update(run_id, change)
        except IncompatibleRunError as exc:
            await mark(self, run_id, exc)
            raise
        if rec is None:
            raise RunNotFoundError(f"no run {run_id!r} in the store of workflow {self.spec.name!r}")
        self.notify(run_id)
        if made:
            announce_decided(listeners, *made[0], rec)
        if handed and rec.status == RunStatus.RUNNING and rec.lease_owner is None:
            await queue_of(self.store).enqueue(rec.workflow, run_id)
        if rec.lease_owner == self.owner and rec.lease_token in taken and run_id not in self.local:
            # The run may be of a child workflow: the supervisor of its own workflow adopts it.
            owner = self.of(rec.workflow) if rec.workflow in self.specs else self
            await owner.adopt(run_id, Lease(self.owner, rec.lease_token))
        self.settled(rec)
        return rec

    def spec_of(self, rec: RunRecord) -> WorkflowSpec:
        """The definition that serves ``rec`` here (its workflow's, a child's included)."""
        return self.specs.get(rec.workflow, self.spec)

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

    async def check_children(self, run_id: str) -> None:
        """The check-back deadline of ``run_id``, parked on child runs (pending kind ``"children"``), passed.

        Called by the timer sweeper (and so by ``recover()``), possibly in several
        processes at once for the same run: whatever it does must be an atomic,
        idempotent transition of the parent (resume it if its children ended, else set
        the next check-back deadline).
        """
        await self.watch.check(run_id, rearm=True)

    async def expire(self, run_id: str) -> None:
        """Time out the gate of ``run_id`` if its deadline passed."""
        await self.transition(run_id, lambda rec, now: past_deadline(rec))

    async def close(self, grace: float = 0.0) -> None:
        """Stop advancing runs (they stay recoverable) and stop background tasks.

        With a ``grace`` period, runs go on to the end of the step they are in (at most
        ``grace`` seconds), commit it and let go of their lease there; those still in
        a step then are cancelled, and let go of theirs too. Closing the first
        supervisor closes those of the child workflows with it.
        """
        family = list(self.family.values()) if self.root is self else [self]
        for sup in family:
            sup.stopping = True
        if self.root is self:
            await self.watch.close()
            if self._feed is not None:
                self._feed.cancel()
                await asyncio.gather(self._feed, return_exceptions=True)
            tasks = [r.task for r in self.local.values() if r.task is not None]
            if grace > 0 and tasks:
                await asyncio.wait(tasks, timeout=grace)
            for r in list(self.local.values()):
                r.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.leases.close()
        for sup in family:
            await sup.timers.close()
            if sup.pools is not None:
                await sup.pools.aclose()
