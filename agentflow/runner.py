"""``WorkflowRunner``: start the runs of a workflow, find them again, and control them.

The runner is the front; each kind of call has its module beneath it:
:mod:`agentflow.runner_control` (pause, resume, stop, delete),
:mod:`agentflow.runner_decisions` (approve, reject, child runs' approvals),
:mod:`agentflow.runner_recover` (taking over runs whose owner died),
:mod:`agentflow.runner_rerun` (retry, fork) and :mod:`agentflow.runner_follow`
(waiting for a run, its result, its events). ``RunHandle`` (:mod:`agentflow.handle`)
calls them through the runner.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from . import runner_control, runner_decisions, runner_follow, runner_recover, runner_rerun, runner_sync
from ._engine.run import new_run
from ._engine.values import validate_input
from ._runtime.supervisor import Supervisor, queue_of
from .definition.workflow import Workflow, WorkflowSpec
from .errors import AgentflowError, RunNotFoundError, WorkflowDefinitionError
from .handle import RunHandle, status_of
from .stores import open_store
from .stores.capabilities import Connects, CreatesQueued, create_then_enqueue
from .stores.contract import RunRecord, Store
from .stores.memory import MemoryStore
from .types import Approval, RunEvent, RunInfo, RunResult, RunStatus

if TYPE_CHECKING:
    from .webhooks import WebhookSender

__all__ = ["RunHandle", "WorkflowRunner", "run_sync"]  # RunHandle lives in agentflow.handle

log = logging.getLogger("agentflow")

#: Seconds ``async with WorkflowRunner(...)`` waits for its store's connections to open.
_CONNECT_FOR = 2.0


def _open_store(spec: WorkflowSpec) -> tuple[Store, bool]:
    p = spec.persistence
    if p is None or not p.enabled:
        return MemoryStore(), True
    if not isinstance(p.store, str):
        return p.store, False
    options: dict[str, Any] = {"key_prefix": p.key_prefix, "url": p.url, "path": p.path, "ttl": p.ttl}
    if p.durability is not None:
        options["durability"] = p.durability
    return open_store(p.store, **options), True


def _served(workflow: Workflow) -> dict[str, WorkflowSpec]:
    """``workflow`` and every workflow it may run as a child (theirs too), compiled, by name.

    Raises:
        WorkflowDefinitionError: a child's definition is wrong, or two different
            workflows of the family share a name.
    """
    objs = {workflow.name: workflow}
    specs = {workflow.name: workflow.compile()}
    todo = [specs[workflow.name]]
    while todo:
        for name, wf in todo.pop().children.items():
            if name in objs:
                if objs[name] is not wf:
                    raise WorkflowDefinitionError(
                        f"workflow {workflow.name!r}: two different workflows of its children are "
                        f"named {name!r}; give each a name of its own"
                    )
                continue
            objs[name] = wf
            specs[name] = wf.compile()
            todo.append(specs[name])
    return specs


class WorkflowRunner:
    """Starts and controls the runs of one workflow (and of the workflows it runs as children).

    The store comes from the workflow's ``.persistence(...)`` (memory without it), or
    from ``store=`` here. Use it as an async context manager, or call ``close()``.
    With ``.persistence(webhooks=[...])`` the runner sends ``approval_pending`` /
    ``approval_decided`` of what it parks and decides (:mod:`agentflow.webhooks`).

    Args:
        workflow: the workflow to run.
        store: a Store to use instead of the workflow's persistence setting.
        lease_ttl: overrides the persistence setting's ``lease_ttl``.
        execute: False makes a client: ``run``, decisions, ``resume``, ``retry``,
            ``fork``, ``recover`` and due timers hand the run to the workers serving
            the workflow through the store's queue (``agentflow worker``), and
            ``result()`` / ``events()`` follow it there. True (the default) advances
            runs in this process.
    """

    def __init__(
        self,
        workflow: Workflow,
        store: Store | None = None,
        lease_ttl: float | None = None,
        execute: bool = True,
    ) -> None:
        if not isinstance(workflow, Workflow):
            raise WorkflowDefinitionError(f"WorkflowRunner takes a Workflow, got {workflow!r}")
        self.workflow = workflow
        self.spec = workflow.compile()
        self._specs = _served(workflow)
        self._owns_store = False
        if store is None:
            store, self._owns_store = _open_store(self.spec)
        ttl = lease_ttl or (self.spec.persistence.lease_ttl if self.spec.persistence else 15.0)
        self.store = store
        self.owner = f"{uuid.uuid4().hex[:12]}"
        self._sup: Supervisor | None = None
        self._sender: WebhookSender | None = None  # the persistence's webhooks, sent from here
        self._lease_ttl = ttl
        self.execute = execute
        # Looked at once: a Protocol's isinstance walks its members on every call.
        self._creates_queued = store if isinstance(store, CreatesQueued) else None
        # The event loop the runs advance in (set with the supervisor), and the thread
        # that runs one for run_sync(): see agentflow.runner_sync.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: runner_sync.LoopThread | None = None
        if not execute:
            queue_of(store)  # a client hands runs over through the store's queue: it must have one

    @property
    def supervisor(self) -> Supervisor:
        """The per-process machinery (created on first use, inside the running event loop).

        Raises:
            EventLoopError: called from an event loop other than the one it was made in.
        """
        if self._sup is not None:
            runner_sync.check_loop(self)
        else:
            self._loop = runner_sync.running_loop()
            self._sup = Supervisor(
                self.spec, self.store, self._lease_ttl, self.owner, self._specs, execute=self.execute
            )
            hooks = self.spec.persistence.webhooks if self.spec.persistence else ()
            if hooks:
                if self._sender is None:
                    from .webhooks import WebhookSender  # httpx only when there are webhooks

                    self._sender = WebhookSender(hooks)
                self._sender.attach(self)
        return self._sup

    async def __aenter__(self) -> WorkflowRunner:
        store = self.store
        if isinstance(store, Connects):  # its connections open now, not in the first burst of calls
            try:
                async with asyncio.timeout(_CONNECT_FOR):
                    await store.connect()
            except (AgentflowError, TimeoutError) as exc:  # the calls will retry as they always do
                log.info("the store did not answer when the runner started (%s); carrying on", exc)
        self.supervisor.watch_deadlines()  # serve the workflow's timers from now on
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop advancing this process's runs (they stay recoverable); close agents and the store.

        Webhook deliveries still queued are sent first (for at most 10 s). Works from any
        event loop: a runner driven by ``run_sync`` is closed in its own thread's loop.
        """
        await runner_sync.close(self)

    async def _close(self) -> None:
        loop, self._loop = self._loop, None
        if self._sup is not None:
            if loop is None or not loop.is_closed():
                await self._sup.close()
            self._sup = None  # a closed loop took the runs' tasks with it: nothing left to close
        if self._sender is not None:
            sender, self._sender = self._sender, None
            await sender.close()
        if self._owns_store:
            await self.store.close()

    # -- starting ------------------------------------------------------------

    async def run(self, input: Any = None, run_id: str | None = None) -> RunHandle:
        """Start a run and return its handle at once; the run goes on in this process.

        With a ``run_id`` that already exists, returns that run's handle and starts nothing.

        Raises:
            InvalidInputError: the input does not fit the input model (or cannot be
                stored); no run is created.
        """
        spec = self.spec
        inp = validate_input(spec, input)
        sup = self.supervisor
        run_id = run_id or os.urandom(16).hex()
        rec, run, events = new_run(sup, run_id, inp, {"workflow": spec.name}, owned=self.execute)
        if not self.execute:  # a client: the run is queued for a worker, unowned
            if not await self._create_queued(rec, events):
                return await self.attach(run_id)
            return RunHandle(self, run_id, status=RunStatus.RUNNING)
        if not await self.store.create(rec, events):
            return await self.attach(run_id)  # the run exists: start nothing (and check it is ours)
        sup.start(run)
        return RunHandle(self, run_id, run)

    async def _create_queued(self, rec: RunRecord, events: Sequence[RunEvent]) -> bool:
        """Create a client's run and queue it for the workers: in one operation where the
        store can (so a worker may start it while the client creates the next ones)."""
        if self._creates_queued is not None:
            return await self._creates_queued.create_queued(rec, events)
        return await create_then_enqueue(self.store.create, queue_of(self.store).enqueue, rec, events)

    async def attach(self, run_id: str) -> RunHandle:
        """A handle for an existing run.

        Raises:
            RunNotFoundError: there is no such run.
        """
        rec = await self._record(run_id)
        if rec.status == RunStatus.WAITING and rec.pending and rec.pending.get("deadline"):
            self.supervisor.watch_deadlines()
        return RunHandle(self, run_id, status=rec.status)

    async def list_runs(
        self,
        status: RunStatus | str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[RunInfo]:
        """This workflow's runs (or ``workflow``'s), newest first, a page of at most ``limit``.

        ``after`` is the ``run_id`` of the last run of the previous page. Light: no
        input, state or output is read. A run whose record is damaged is listed with an
        ``error`` of type ``CorruptRecordError``.
        """
        runner_sync.check_loop(self)
        st = status_of(status) if status is not None else None
        recs = await self.store.list_runs(workflow or self.spec.name, st, limit, after)
        return [r.info() for r in recs]

    async def approvals(
        self,
        approver: str | None = None,
        workflow: str | None = None,
        kind: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[Approval]:
        """Pending approvals across the store (every workflow's, unless ``workflow``), newest first.

        A page of at most ``limit``, read from the store's approval index (not a scan of
        runs). ``approver``: those this person may decide; ``kind``: ``"gate"``,
        ``"tool_call"`` or ``"tool_outcome"``; ``after``: the id of the last approval of
        the previous page (it may have been decided since).

        Raises:
            StoreError: ``after`` is an approval the store does not know (its run was
                deleted since); list again from the first page.
        """
        runner_sync.check_loop(self)
        found = await self.store.approvals(approver, workflow, kind, limit, after)
        return [Approval.from_json(a) for a in found]

    async def recover(self) -> list[RunHandle]:
        """Resume every run of this workflow whose owner died (running, lease run out by the store's clock).

        A pause or stop asked for while the owner was dead is honoured. A run that cannot
        be loaded fails alone with ``CorruptRecordError``; the others go on.
        """
        return await runner_recover.recover(self)

    async def delete(self, run_id: str) -> bool:
        """Remove a run and everything stored with it, its child runs too; False when there was no such run.

        The child runs it started (and theirs) are deleted with it, children first, so
        nothing of the run is left behind. Nothing is deleted when any of them is running.

        Raises:
            InvalidStateError: the run, or one of its child runs, is running; stop it
                first (stopping a parent stops its children).
        """
        return await runner_control.delete(self, run_id)

    def run_sync(
        self, input: Any = None, run_id: str | None = None, timeout: float | None = None
    ) -> RunResult | RunInfo:
        """Start a run from code that is not async and block until it ends or parks.

        Returns the ``RunResult`` of a completed run, or the ``RunInfo`` of one that waits
        (at a gate, a timer, child runs) or is paused. The runner's runs advance in an
        event loop of its own in a daemon thread, between calls too, so it works the same
        in a script and in a notebook cell with a running loop; once used this way, the
        runner is used through ``run_sync`` only (``await runner.close()`` works from any
        loop).

        Raises:
            EventLoopError: the runner already runs in an event loop (one made with
                ``await``: use ``await runner.run(...)`` there).
            RunFailedError, RunStoppedError, RunRejectedError: as ``handle.result()``.
            TimeoutError: ``timeout`` seconds passed first (the run goes on).
            InvalidInputError: as :meth:`run`.
        """
        return runner_sync.run_sync(self, input, run_id, timeout)

    # -- retry and fork --------------------------------------------------------

    async def retry(self, run_id: str) -> RunHandle:
        """Continue a failed run at its failing step; the run goes on in this process.

        The step runs again with the state and step results the run had before it (a
        failed step commits nothing), ``ctx.attempt`` counting on from its earlier
        attempts, and agent calls it had finished coming back from the journal. Works in
        any process that reaches the store. A ``resumed`` event with
        ``data["retried"]`` (and the error retried) marks it in the history.

        A step that failed because child runs it started failed or were stopped (or an
        imperative ``ctx.run`` whose child's failure failed the run) does not run
        again: its failed children are retried (each at its own failing step,
        with its own state), a new run of the child workflow (same input, id
        ``"{child}~2"``) takes the place of each stopped one, and the run waits on them
        again, going on once they ended. Children that completed, or ended rejected or
        expired, are left as they are.

        Raises:
            InvalidStateError: the run is not failed.
            RunNotFoundError: there is no such run.
        """
        return await runner_rerun.retry(self, run_id)

    async def fork(
        self,
        source: str,
        /,
        at: str,
        state: Mapping[str, Any] | BaseModel | None = None,
        run_id: str | None = None,
    ) -> RunHandle:
        """Start a new run from the point where run ``source`` last reached step ``at``.

        The new run (id ``run_id``, or a fresh one) has the original's input, its step
        results and decisions from before that point, and the state the original had
        when it reached ``at`` with ``state`` merged in (shallowly, as ``set_state``
        does); it starts at ``at`` in this process. The original is untouched. With a
        ``run_id`` that already exists, returns that run's handle and starts nothing.

        Raises:
            UnknownStepError: ``at`` is not a step of the workflow.
            InvalidStateError: run ``source`` never reached step ``at``.
            StateValidationError: ``state`` does not fit the state model (naming the field).
            RunNotFoundError: there is no run ``source``.
        """
        return await runner_rerun.fork(self, source, at=at, state=state, run_id=run_id)

    def agent_statistics(self) -> dict[str, Any]:
        """Per agent (:class:`~agentflow.agents.PoolStatistics`): handles open, acquirers waiting,
        pool size, calls sent, and the calls that waited for the agent's ``RateLimit`` (how
        many, how long in all, the latest's wait)."""
        pools = self.supervisor.pools
        return dict(pools.statistics()) if pools is not None else {}

    # -- decisions -----------------------------------------------------------

    async def approve(
        self,
        run_id: str,
        by: str,
        approval: str | None = None,
        comment: str | None = None,
        data: Any = None,
    ) -> RunHandle:
        """Approve an approval ``run_id`` waits for; once its quorum is met the run continues here.

        Args:
            run_id: the waiting run.
            by: who approves (one of the approval's approvers).
            approval: the approval's id; may be left out while the run waits for one.
            comment: the approver's comment.
            data: the reviewer's edit of the reviewed content; validated into the gate's
                ``form`` model when it has one. For a ``tool_call``,
                ``{"arguments": {...}}``: the call runs with these arguments instead,
                validated against the tool's schema (the model is told of the edit).

        Raises:
            NotAuthorizedError: ``by`` is not an approver; nothing changes.
            InvalidInputError: ``data`` does not fit the gate's form (names the field);
                nothing changes.
            InvalidStateError: the run is not waiting; ``approval`` is not pending (unknown
                or decided already); or it is left out while several are pending (the ids
                are listed). Nothing changes.
            RunNotFoundError: there is no such run.
        """
        return await runner_decisions.decide_approval(self, run_id, "approve", by, approval, comment, data)

    async def reject(
        self, run_id: str, by: str, approval: str | None = None, reason: str | None = None
    ) -> RunHandle:
        """Reject an approval ``run_id`` waits for: on_reject if given, else the run ends ``rejected``.

        A tool call's approval rejected does not end the run: the model is told ``reason``
        (of a ``tool_outcome``: that the call failed), and the agent goes on.
        ``approval`` as for :meth:`approve`; raises what it raises.
        """
        return await runner_decisions.decide_approval(self, run_id, "reject", by, approval, reason, None)

    async def respond(
        self,
        run_id: str,
        by: str,
        approval: str | None = None,
        result: Any = None,
        comment: str | None = None,
    ) -> RunHandle:
        """Answer a tool call for its tool: the model gets ``result`` and the tool does not run.

        For a ``tool_call`` approval the call is not made; for a ``tool_outcome`` (the
        call may have run before a crash) ``result`` is what it returned.

        Raises:
            InvalidStateError: the approval is a gate's (approve or reject it), or as for
                :meth:`approve`.
            InvalidInputError: ``result`` is not JSON-able; nothing changes.
            NotAuthorizedError, RunNotFoundError: as for :meth:`approve`.
        """
        return await runner_decisions.decide_approval(self, run_id, "respond", by, approval, comment, result)

    def _check_workflow(self, rec: RunRecord) -> None:
        if rec.workflow not in self._specs:
            raise AgentflowError(
                f"run {rec.run_id} belongs to workflow {rec.workflow!r}, not {self.spec.name!r}; "
                "use that workflow's runner"
            )

    # -- what RunHandle calls -------------------------------------------------

    async def _record(self, run_id: str) -> RunRecord:
        runner_sync.check_loop(self)
        rec = await self.store.get(run_id)
        if rec is None:
            raise RunNotFoundError(f"no run {run_id!r} in the store of workflow {self.spec.name!r}")
        self._check_workflow(rec)
        return rec

    async def _info(self, run_id: str) -> RunInfo:
        return await runner_decisions.run_info(self, run_id)

    async def _until(
        self, run_id: str, done: Callable[[RunRecord], bool], timeout: float | None
    ) -> RunRecord:
        return await runner_follow.until(self, run_id, done, timeout)

    async def _result(self, run_id: str, timeout: float | None) -> RunResult:
        return await runner_follow.result(self, run_id, timeout)

    def _events(self, run_id: str) -> AsyncIterator[RunEvent]:
        return runner_follow.events(self, run_id)

    async def _pause(self, run_id: str) -> None:
        await runner_control.pause(self, run_id)

    async def _resume(self, run_id: str) -> None:
        await runner_control.resume(self, run_id)

    async def _stop(self, run_id: str) -> None:
        await runner_control.stop(self, run_id)


def run_sync(
    target: Workflow | WorkflowRunner,
    input: Any = None,
    run_id: str | None = None,
    timeout: float | None = None,
) -> RunResult | RunInfo:
    """Run ``target`` from code that is not async: to its end (``RunResult``) or its park (``RunInfo``).

    With a :class:`WorkflowRunner`, the same as ``runner.run_sync``. With a
    :class:`~agentflow.Workflow`, a runner is made for the one run and closed after it:
    a run parked at a gate stays in the workflow's store (its ``.persistence(...)``;
    without one, in memory, it is gone with the runner), to be decided from another
    runner. Raises what ``runner.run_sync`` raises.
    """
    if isinstance(target, WorkflowRunner):
        return target.run_sync(input, run_id, timeout)
    runner = WorkflowRunner(target)
    try:
        return runner.run_sync(input, run_id, timeout)
    finally:
        runner_sync.close_sync(runner)
