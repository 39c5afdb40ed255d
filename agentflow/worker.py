"""Workers: processes that claim runs from the store's queues and advance them (§16).

```python
worker = Worker(steward, concurrency=100)     # or Worker([wf_a, wf_b]) / Worker(wf)
await worker.serve()                           # until SIGTERM or worker.close()
```

A client (``WorkflowRunner(wf, execute=False)``, or any process deciding on a run
parked there) hands a run over by letting go of it and putting it on the queue of its
workflow in the store. A worker claims entries of the queues of the workflows it serves
— never more than it has room for (``concurrency`` runs in flight) — takes each run's
lease and advances it; the lease, not the queue, makes the work happen once, so an
entry delivered twice, or for a run someone else took, is acknowledged and dropped. A
worker also looks for runs whose owner died (their lease ran out by the store's clock)
every half ``lease_ttl``, and fires the gate and timer deadlines of its workflows: no
``recover()`` call is needed anywhere.

Stopping (SIGTERM, SIGINT or :meth:`Worker.close`): nothing new is claimed; runs finish
the step they are in (within ``grace`` seconds), commit it, let go of their lease and
go back on the queue, so another worker takes them at once. A worker that dies without
stopping (SIGKILL, a lost machine) is recovered by the others after ``lease_ttl``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._runtime.supervisor import queue_of
from .definition.workflow import Workflow
from .errors import AgentflowError, RunNotFoundError, WorkflowDefinitionError
from .runner import WorkflowRunner
from .steward import Steward
from .stores.capabilities import REDELIVER_AFTER, Claim, QueueDepth, WorkQueue
from .stores.contract import Store
from .types import RunStatus

__all__ = ["Worker", "WorkerStatistics"]

log = logging.getLogger("agentflow.worker")

#: Seconds a claim waits on an empty queue before it looks again (it returns at once
#: when work arrives; the wait only bounds how soon a closing worker notices).
CLAIM_WAIT = 1.0


@dataclass(frozen=True, slots=True)
class WorkerStatistics:
    """What an operator watches on a worker.

    Attributes:
        runs: runs this worker advances now.
        concurrency: the most it advances at once.
        claimed: runs handed over to it (from the queue, or found without an owner).
        recovered: runs it took over from a dead owner.
        dropped: entries it acknowledged without a run (taken by another, gone, or done).
        steps_per_second: steps its runs went through per second, since the previous
            call (since it started, on the first).
        queues: per workflow served, what waits in its queue (count, oldest age);
            empty once the worker is closed.
    """

    runs: int
    concurrency: int
    claimed: int
    recovered: int
    dropped: int
    steps_per_second: float
    queues: dict[str, QueueDepth]


class Worker:
    """Claims and advances the runs of the workflows it serves (see the module docstring).

    Args:
        source: a :class:`Steward` (every workflow registered), a workflow, or several.
        concurrency: runs advanced at once, at most; the worker claims no more.
        grace: seconds a stopping worker lets steps in flight finish.
        lease_ttl: overrides each workflow's persistence setting.
        store: a store to use instead of each workflow's persistence setting.

    Raises:
        WorkflowDefinitionError: nothing to serve, a concurrency below 1, or a workflow
            whose store keeps no work queue.
    """

    def __init__(
        self,
        source: Steward | Workflow | Sequence[Workflow],
        concurrency: int = 100,
        grace: float = 30.0,
        lease_ttl: float | None = None,
        store: Store | None = None,
    ) -> None:
        if concurrency < 1:
            raise WorkflowDefinitionError(f"a worker's concurrency must be at least 1, got {concurrency}")
        workflows = _workflows(source)
        if not workflows:
            raise WorkflowDefinitionError("a worker needs at least one workflow to serve")
        self.concurrency = concurrency
        self.grace = grace
        self.runners = [WorkflowRunner(wf, store=store, lease_ttl=lease_ttl) for wf in workflows]
        for runner in self.runners:
            queue_of(runner.store)
        self._closing = asyncio.Event()
        self._closed = asyncio.Event()
        self._room = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._taking: set[asyncio.Task[None]] = set()  # runs claimed being taken (see _claiming)
        self._claimed = self._recovered = self._dropped = 0
        self._reserved = 0  # room a loop is claiming into right now
        self._visit_at: dict[str, int] = {}  # run id -> its visit count when taken here
        self._steps = 0  # steps of the runs that left
        self._sampled = (time.monotonic(), 0)  # when statistics() last looked, and the steps then

    @property
    def runs(self) -> int:
        """Runs this worker advances now (child runs included)."""
        return sum(len(r.supervisor.local) for r in self.runners)

    async def serve(self) -> None:
        """Claim and advance runs until :meth:`close` (or SIGTERM / SIGINT in the main thread)."""
        loop = asyncio.get_running_loop()
        signals = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.close()))
                signals.append(sig)
        try:
            for runner in self.runners:
                sup = runner.supervisor
                sup.on_leave.append(self._left)
                sup.watch_deadlines()
                for wsup in sup.family.values():
                    wsup.watch_deadlines()
                self._tasks.append(asyncio.create_task(self._claiming(runner), name="agentflow:claim"))
                self._tasks.append(asyncio.create_task(self._recovering(runner), name="agentflow:recover"))
            await self._closed.wait()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    async def close(self, grace: float | None = None) -> None:
        """Claim nothing more, let steps in flight finish (``grace`` s), hand their runs back."""
        if self._closing.is_set():
            await self._closed.wait()
            return
        self._closing.set()
        self._room.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Runs being taken are let in (not cancelled halfway, which would leave a lease
        # to run out): stopping, they go back on the queue with the others below.
        await asyncio.gather(*self._taking, return_exceptions=True)
        grace = self.grace if grace is None else grace
        left: dict[str, tuple[WorkflowRunner, str]] = {}
        for runner in self.runners:
            for run in runner.supervisor.local.values():
                left[run.run_id] = (runner, run.spec.name)
        await asyncio.gather(*(r.supervisor.close(grace) for r in self.runners))
        for run_id, (runner, workflow) in left.items():  # back on the queue: another worker takes it now
            rec = await runner.store.get(run_id)
            if rec is not None and rec.status is RunStatus.RUNNING and rec.lease_owner is None:
                await queue_of(runner.store).enqueue(workflow, run_id)
        for runner in self.runners:
            await runner.close()
        self._closed.set()

    async def statistics(self) -> WorkerStatistics:
        """Runs, claims, recoveries, steps per second and the queues' depth (read from the store)."""
        now = time.monotonic()
        steps = self._steps + sum(
            run.visit - self._visit_at.get(run.run_id, run.visit)
            for runner in self.runners
            for run in runner.supervisor.local.values()
        )
        since, before = self._sampled
        self._sampled = (now, steps)
        queues = {}
        if not self._closed.is_set():  # a closed worker's stores are closed
            for runner in self.runners:
                for name in runner._specs:
                    queues[name] = await queue_of(runner.store).queue_depth(name)
        return WorkerStatistics(
            self.runs,
            self.concurrency,
            self._claimed,
            self._recovered,
            self._dropped,
            (steps - before) / max(now - since, 1e-3),
            queues,
        )

    # -- internals ---------------------------------------------------------------

    def _left(self, run: Any) -> None:
        start = self._visit_at.pop(run.run_id, None)
        if start is not None:
            self._steps += run.visit - start
        self._room.set()

    async def _take(
        self, runner: WorkflowRunner, run_id: str, workflow: str, handed_after: float = 0.0
    ) -> bool:
        """Take the run claimed (or found ownerless) and start it here; False if it is not ours."""
        sup = runner.supervisor
        how = await sup.claim(run_id, workflow, handed_after)
        if how is None:
            return False
        if how == "recovered":
            self._recovered += 1
        else:
            self._claimed += 1
        run = sup.local.get(run_id)
        if run is not None:
            self._visit_at[run_id] = run.visit
        return True

    def _free(self) -> int:
        """Room for more runs: the concurrency less the runs here and those being taken."""
        return self.concurrency - self.runs - self._reserved

    async def _wait_for_room(self) -> int:
        """The room there is (at least one run's), waiting for it; 0 once closing."""
        while not self._closing.is_set():
            room = self._free()
            if room > 0:
                return room
            self._room.clear()
            await self._room.wait()
        return 0

    def _unreserve(self, n: int) -> None:
        self._reserved -= n
        self._room.set()

    async def _claiming(self, runner: WorkflowRunner) -> None:
        """Claim entries of the runner's workflows (and their children's) as room allows.

        The claim waits for work without holding the room, so the other loops (another
        workflow's, the recovery) are not starved meanwhile; what it brings back beyond
        the room left when it returns is queued again at once, so the worker never
        advances more than its concurrency. The runs claimed are taken in a task of
        their own: the loop claims again for the room left (or freed meanwhile) without
        waiting for them, so a slot that frees is filled after one read of the queue.
        """
        store = queue_of(runner.store)
        names = list(runner._specs)
        sup = runner.supervisor
        while not self._closing.is_set():
            room = await self._wait_for_room()
            if not room:
                return
            try:
                claims = await store.claim(names, sup.owner, room, CLAIM_WAIT)
            except AgentflowError as exc:  # the store is out of reach: try again soon
                log.warning("worker %s: claiming failed (%s); trying again", sup.owner, exc)
                await asyncio.sleep(0.5)
                continue
            keep = max(0, min(len(claims), self._free()))
            extra = claims[keep:]
            claims = claims[:keep]
            self._reserved += keep
            if claims:
                task = asyncio.create_task(self._take_all(runner, store, claims), name="agentflow:take")
                self._taking.add(task)
                task.add_done_callback(self._taking.discard)
            if extra:  # the room went to another loop meanwhile: back on the queue, for anyone
                try:
                    for c in extra:
                        await store.enqueue(c.workflow, c.run_id)
                    await store.ack(extra)
                except AgentflowError as exc:
                    log.warning("worker %s: handing claimed entries on failed (%s)", sup.owner, exc)

    async def _take_all(self, runner: WorkflowRunner, store: WorkQueue, claims: list[Claim]) -> None:
        """Take the runs of claimed entries (room reserved for each), then acknowledge the entries.

        Each run's room is given back as soon as it is taken (it counts among the runs
        here from then on) or turned out not to be ours.
        """
        sup = runner.supervisor

        async def one(claim: Claim) -> None:
            try:
                taken = await self._take(runner, claim.run_id, claim.workflow)
            except RunNotFoundError:
                log.warning("queue entry for run %s, which no longer exists: dropped", claim.run_id)
                taken = False
            except AgentflowError as exc:
                log.warning("queue entry for run %s could not be taken (%s): dropped", claim.run_id, exc)
                taken = False
            finally:
                self._unreserve(1)
            if not taken:
                self._dropped += 1

        await asyncio.gather(*(one(c) for c in claims))  # each run's lease and load at once
        try:
            await store.ack(claims)
        except AgentflowError as exc:  # redelivered later: the lease makes that harmless
            log.warning("worker %s: acknowledging failed (%s)", sup.owner, exc)

    async def _recovering(self, runner: WorkflowRunner) -> None:
        """Every half lease, take over runs of these workflows whose owner died."""
        sup = runner.supervisor
        every = max(0.2, sup.lease_ttl / 2)
        while not self._closing.is_set():
            for name in runner._specs:
                room = self.concurrency - self.runs - self._reserved
                if room <= 0:
                    break
                self._reserved += room
                try:
                    ids = await runner.store.recoverable(name, room)
                    for run_id in ids:
                        try:
                            # Runs just handed over are the queue's to deliver (in order);
                            # one whose entry was lost (its client died) is taken later.
                            await self._take(runner, run_id, name, REDELIVER_AFTER)
                        except AgentflowError:
                            continue  # gone, or someone else's now
                except AgentflowError as exc:
                    log.warning("worker %s: looking for runs to recover failed (%s)", sup.owner, exc)
                    break
                finally:
                    self._unreserve(room)
            await asyncio.sleep(every)


def _workflows(source: Steward | Workflow | Sequence[Workflow]) -> list[Workflow]:
    if isinstance(source, Steward):
        return [source.get(info.name) for info in source.workflows()]
    if isinstance(source, Workflow):
        return [source]
    out = list(source)
    for wf in out:
        if not isinstance(wf, Workflow):
            raise WorkflowDefinitionError(f"a worker serves Workflows, got {wf!r}")
    return out
