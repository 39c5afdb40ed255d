"""``WorkflowRunner`` and ``RunHandle``: start runs and control them.

Control calls return within a bound and are honoured wherever the run is: advanced
here (flags on the live run), advanced by another process (the record's ``control``
flag, seen at its next commit or lease renewal), parked (applied to the record, and
kept through a decision), or owned by a process that died (applied when the lease ran
out by the store's clock).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from pydantic import BaseModel

from ._engine.context import validate_state
from ._engine.gates import Transition, choose, decide, expired, form_of
from ._engine.history import reached
from ._engine.run import LiveRun
from ._engine.values import decode_output, run_output, validate_input
from ._runtime.leases import take_over
from ._runtime.supervisor import Supervisor, stop_change
from .definition.steps import START
from .definition.workflow import Workflow, WorkflowSpec
from .errors import (
    AgentflowError,
    InvalidStateError,
    RunFailedError,
    RunNotFoundError,
    RunRejectedError,
    RunStoppedError,
    StateValidationError,
    UnknownStepError,
    WorkflowDefinitionError,
)
from .handle import RunHandle, status_of
from .stores import open_store
from .stores.contract import Change, Commit, Lease, RunRecord, Store
from .stores.memory import MemoryStore
from .types import FINAL, Approval, RunEvent, RunInfo, RunResult, RunStatus

__all__ = ["RunHandle", "WorkflowRunner"]  # RunHandle lives in agentflow.handle

_FINAL_KINDS = frozenset(s.value for s in FINAL)
_POLL = 0.1  # seconds between store polls for runs another process advances


def _fields_of(state: Mapping[str, Any] | BaseModel) -> Mapping[str, Any]:
    """State updates given as a mapping or a model (its set fields)."""
    if isinstance(state, BaseModel):
        return {k: getattr(state, k) for k in state.model_fields_set}
    return state


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


#: Child runs a pause, a resume, a stop, a retry or a delete reaches at once.
_FAN = 64


def _child_ids(rec: RunRecord) -> list[str]:
    """Every child run ``rec`` started: those it lists, and those of its wait it has not listed yet."""
    ids = list(rec.children)
    if isinstance(rec.pending, dict) and rec.pending.get("kind") == "children":
        ids += [str(c["run_id"]) for c in rec.pending.get("children") or () if c["run_id"] not in ids]
    return ids


def _failed_wait(rec: RunRecord) -> dict[str, Any] | None:
    """The wait on child runs whose ending failed ``rec``, if that is how it failed.

    A failed run holds a wait on children only when their ending failed it: a step that
    completes after a wait clears it.
    """
    pending = rec.pending
    if rec.status != RunStatus.FAILED or not isinstance(pending, dict) or pending.get("kind") != "children":
        return None
    return pending


class WorkflowRunner:
    """Starts and controls the runs of one workflow (and of the workflows it runs as children).

    The store comes from the workflow's ``.persistence(...)`` (memory without it), or
    from ``store=`` here. Use it as an async context manager, or call ``close()``.

    Args:
        workflow: the workflow to run.
        store: a Store to use instead of the workflow's persistence setting.
        lease_ttl: overrides the persistence setting's ``lease_ttl``.
    """

    def __init__(
        self, workflow: Workflow, store: Store | None = None, lease_ttl: float | None = None
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
        self._lease_ttl = ttl

    @property
    def supervisor(self) -> Supervisor:
        """The per-process machinery (created on first use, inside the running event loop)."""
        if self._sup is None:
            self._sup = Supervisor(self.spec, self.store, self._lease_ttl, self.owner, self._specs)
        return self._sup

    async def __aenter__(self) -> WorkflowRunner:
        self.supervisor.watch_deadlines()  # serve the workflow's timers from now on
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop advancing this process's runs (they stay recoverable); close agents and the store."""
        if self._sup is not None:
            await self._sup.close()
            self._sup = None
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
        state = spec.state_model.model_validate(spec.initial_state) if spec.state_model else None
        lease = Lease(sup.owner, 1)
        first = spec.main.name if spec.main is not None else START
        now = time.time()
        rec = RunRecord(
            run_id=run_id,
            workflow=spec.name,
            status=RunStatus.RUNNING,
            input=inp,
            state=state,
            step=first,
            created_at=now,
            updated_at=now,
            lease_owner=lease.owner,
            lease_token=lease.token,
            lease_expires=now + sup.lease_ttl,
        )
        run = LiveRun(sup, run_id, lease, inp, state)
        run.step = first
        events = [run.event("run_started", None, {"workflow": spec.name}), run.event("step_started", first)]
        run.outbox.clear()
        if not await self.store.create(rec, events):
            return await self.attach(run_id)  # the run exists: start nothing (and check it is ours)
        sup.start(run)
        return RunHandle(self, run_id, run)

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
        found = await self.store.approvals(approver, workflow, kind, limit, after)
        return [Approval.from_json(a) for a in found]

    async def recover(self) -> list[RunHandle]:
        """Resume every run of this workflow whose owner died (running, lease run out by the store's clock).

        A pause or stop asked for while the owner was dead is honoured. A run that cannot
        be loaded fails alone with ``CorruptRecordError``; the others go on.
        """
        sup = self.supervisor
        handles = []
        for name in self._specs:  # the workflow's runs, and those of its children
            handles += await self._recover(sup.of(name))
        for name in self._specs:
            wsup = sup.of(name)
            await wsup.timers.sweep()
            wsup.watch_deadlines()
            if wsup.spec.children:  # only a workflow that runs children has runs waiting on them
                await self._check_parents(wsup)
        return handles

    async def _recover(self, sup: Supervisor) -> list[RunHandle]:
        name = sup.spec.name
        handles = []
        while True:
            ids = [i for i in await self.store.recoverable(name, 100) if i not in sup.local]
            taken = 0
            for run_id in ids:
                try:
                    await sup.transition(run_id, take_over(name))
                except (AgentflowError, RunNotFoundError):
                    continue
                taken += 1
                if run_id in sup.local:
                    handles.append(RunHandle(self, run_id, sup.local[run_id]))
            if len(ids) < 100 or not taken:
                break
        return handles

    async def _check_parents(self, sup: Supervisor) -> None:
        """Resume the waiting runs of ``sup``'s workflow whose child runs all ended.

        A process that finished a run's last child and died before it resumed the
        parent leaves it waiting: its check-back deadline finds it later, this at once.
        """
        after = None
        while True:
            page = await self.store.list_runs(sup.spec.name, RunStatus.WAITING, 100, after)
            for r in page:
                if isinstance(r.pending, dict) and r.pending.get("kind") == "children":
                    try:
                        await sup.watch.check(r.run_id, rearm=True)
                    except AgentflowError:
                        continue
            if len(page) < 100:
                return
            after = page[-1].run_id

    async def delete(self, run_id: str) -> bool:
        """Remove a run and everything stored with it, its child runs too; False when there was no such run.

        The child runs it started (and theirs) are deleted with it, children first, so
        nothing of the run is left behind. Nothing is deleted when any of them is running.

        Raises:
            InvalidStateError: the run, or one of its child runs, is running; stop it
                first (stopping a parent stops its children).
        """
        rec = await self.store.get(run_id)
        if rec is None:
            return False
        self._check_workflow(rec)
        tree = [rec]
        seen = {run_id}
        for r in tree:  # grows while it is walked: every child run, breadth first
            if r.status == RunStatus.RUNNING:
                what = f"run {run_id}" if r is rec else f"run {run_id}: its child run {r.run_id}"
                raise InvalidStateError(f"{what} is running; stop it before deleting it")
            ids = [c for c in _child_ids(r) if c not in seen]
            seen.update(ids)
            for i in range(0, len(ids), _FAN):
                found = await asyncio.gather(*(self.store.get(c) for c in ids[i : i + _FAN]))
                tree += [c for c in found if c is not None]
        for r in reversed(tree[1:]):
            await self.store.delete(r.run_id)
        return await self.store.delete(run_id)

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
        sup = self.supervisor
        here = run_id in sup.local
        await self._retry_children(run_id)

        def fn(rec: RunRecord, now: float) -> Transition | None:
            self._check_workflow(rec)
            if rec.status == RunStatus.RUNNING and rec.lease_owner == sup.owner and not here:
                return None  # a retry after a lost reply: it took the run for this process
            if rec.status != RunStatus.FAILED:
                raise InvalidStateError(
                    f"run {run_id} is {rec.status.value}, not failed; only a failed run can be retried"
                )
            err = rec.error or {}
            data: dict[str, Any] = {
                "retried": True,
                "error": {"type": err.get("type"), "message": err.get("message")},
            }
            fields: dict[str, Any] = {"error": None}
            wait = _failed_wait(rec)
            if wait is not None:
                # The step finishes from its children (retried or replaced), not from the top.
                fields["pending"] = {**wait, "retried": True}
                data["children"] = [str(c["run_id"]) for c in wait.get("children") or ()][:20]
            return Transition(fields, [("resumed", rec.step, data)], rec.step or START)

        rec = await sup.transition(run_id, fn)
        return RunHandle(self, run_id, sup.local.get(run_id), status=rec.status)

    async def _retry_children(self, run_id: str) -> None:
        """Retry the failed child runs whose ending failed ``run_id`` (theirs first, recursively)."""
        rec = await self.store.get(run_id)
        wait = _failed_wait(rec) if rec is not None else None
        if wait is None:
            return
        ids = [str(c["run_id"]) for c in wait.get("children") or ()]

        async def one(child: RunRecord | None) -> None:
            if child is None or child.status != RunStatus.FAILED:
                return
            try:
                await self.retry(child.run_id)
            except (InvalidStateError, RunNotFoundError):
                pass  # retried meanwhile (by another process): the parent waits on it all the same

        for i in range(0, len(ids), _FAN):
            children = await asyncio.gather(*(self.store.get(c) for c in ids[i : i + _FAN]))
            await asyncio.gather(*(one(c) for c in children))

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
        spec = self.spec
        if spec.imperative:
            raise AgentflowError(
                f"cannot fork run {source}: {spec.name!r} is an .execute(fn) workflow, which has no "
                "steps to start at; fork works on .flow({...}) workflows"
            )
        if at not in spec.steps:
            known = sorted(s for s in spec.steps if s != START)
            raise UnknownStepError(
                f"cannot fork run {source} at step {at!r}: {spec.name!r} has no such step; steps are {known}"
            )
        loaded = await self.store.load(source)
        if loaded is None:
            raise RunNotFoundError(f"no run {source!r} in the store of workflow {spec.name!r}")
        rec = loaded.record
        self._check_workflow(rec)
        where = reached(await self.store.events(source), at)
        if where is None:
            raise InvalidStateError(f"cannot fork run {source} at step {at!r}: the run never reached it")
        label = f"fork of run {source} at step {at!r}"
        model = spec.state_model
        new_state: BaseModel | None = None
        if model is not None:
            then = validate_state(model, None, {**spec.initial_state, **where.changes}, label)
            new_state = then if state is None else validate_state(model, then, _fields_of(state), label)
        elif state:
            raise StateValidationError(
                f"{label}: the workflow declares no state model, so no state can be merged in"
            )
        sup = self.supervisor
        new_id = run_id or os.urandom(16).hex()
        lease = Lease(sup.owner, 1)
        now = time.time()
        record = RunRecord(
            run_id=new_id,
            workflow=spec.name,
            status=RunStatus.RUNNING,
            input=rec.input,
            state=new_state,
            step=at,
            visit=where.visit - 1,
            decisions=tuple(d for d in rec.decisions if int(d.get("visit") or 0) < where.visit),
            created_at=now,
            updated_at=now,
            lease_owner=lease.owner,
            lease_token=lease.token,
            lease_expires=now + sup.lease_ttl,
        )
        origin = {"workflow": spec.name, "forked_from": {"run_id": source, "step": at, "visit": where.visit}}
        events = [
            RunEvent("run_started", new_id, None, origin, now, 1),
            RunEvent("step_started", new_id, at, None, now, 2),
        ]
        if not await self.store.create(record, events):
            return await self.attach(new_id)
        outputs = [o for o in loaded.outputs if o.visit < where.visit]
        if outputs:
            await self.store.commit(new_id, lease, Commit(outputs=outputs, seq=1))
        live = await sup.adopt(new_id, lease)
        return RunHandle(self, new_id, live)

    def agent_statistics(self) -> dict[str, Any]:
        """Per agent: handles open, acquirers waiting, pool size and calls sent (for display)."""
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
                ``form`` model when it has one.

        Raises:
            NotAuthorizedError: ``by`` is not an approver; nothing changes.
            InvalidInputError: ``data`` does not fit the gate's form (names the field);
                nothing changes.
            InvalidStateError: the run is not waiting; ``approval`` is not pending (unknown
                or decided already); or it is left out while several are pending (the ids
                are listed). Nothing changes.
            RunNotFoundError: there is no such run.
        """
        return await self._decide(run_id, True, by, approval, comment, data)

    async def reject(
        self, run_id: str, by: str, approval: str | None = None, reason: str | None = None
    ) -> RunHandle:
        """Reject an approval ``run_id`` waits for: on_reject if given, else the run ends ``rejected``.

        ``approval`` as for :meth:`approve`; raises what it raises.
        """
        return await self._decide(run_id, False, by, approval, reason, None)

    async def _decide(
        self, run_id: str, approved: bool, by: str, approval: str | None, comment: str | None, data: Any
    ) -> RunHandle:
        run_id = await self._holder(run_id, approval)  # a child's approval is decided on the child
        decision_id = os.urandom(8).hex()

        def fn(rec: RunRecord, now: float) -> Transition | None:
            self._check_workflow(rec)
            if any(d.get("id") == decision_id for d in rec.decisions):
                return None  # a retry after a lost reply: the decision is already counted
            if rec.status != RunStatus.WAITING:
                if approval is not None:
                    done = any(d.get("approval") == approval for d in rec.decisions)
                    why = "was decided already" if done else "is not an approval of this run"
                    raise InvalidStateError(
                        f"run {run_id}: approval {approval!r} {why}; the run is {rec.status.value}"
                    )
                raise InvalidStateError(
                    f"run {run_id} is {rec.status.value}, not waiting at a gate; nothing to decide"
                )
            chosen = choose(run_id, rec.pending, approval, rec.decisions)
            if expired(rec) is not None:
                raise InvalidStateError(
                    f"run {run_id}: approval {chosen['id']} at step {chosen.get('step')!r} timed out"
                )
            spec = self._specs.get(rec.workflow, self.spec)
            form = form_of(spec, chosen.get("step")) if chosen.get("form") is not None else None
            out = decide(run_id, rec.pending, chosen, approved, by, comment, data, form)
            return Transition.of(rec, out, decision_id)

        try:
            rec = await self.supervisor.transition(run_id, fn)
        except InvalidStateError:
            await self.supervisor.expire(run_id)  # a gate past its deadline expires now
            raise
        return RunHandle(self, run_id, self.supervisor.local.get(run_id), status=rec.status)

    async def _holder(self, run_id: str, approval: str | None) -> str:
        """The run that holds ``approval``: ``run_id`` itself, or one of the child runs it waits on.

        Without ``approval``, a run that waits only on its children, of which exactly
        one approval is pending, hands that one's run. Otherwise ``run_id`` (whose own
        decision then says what is wrong).
        """
        rec = await self.store.get(run_id)
        if rec is None or not isinstance(rec.pending, dict) or rec.pending.get("kind") != "children":
            return run_id
        found = await self._child_approvals(rec)
        if approval is None:
            return found[0].run_id if len(found) == 1 else run_id
        return next((a.run_id for a in found if a.id == approval), run_id)

    async def _child_approvals(self, rec: RunRecord) -> list[Approval]:
        """Pending approvals of the child runs ``rec`` waits on (their children's too), in child order."""
        pending = rec.pending
        if (
            not isinstance(pending, dict)
            or pending.get("kind") != "children"
            or rec.status != RunStatus.WAITING
        ):
            return []
        ids = [str(c["run_id"]) for c in pending.get("children") or ()]
        out: list[Approval] = []
        for i in range(0, len(ids), _FAN):
            for child in await asyncio.gather(*(self.store.get(c) for c in ids[i : i + _FAN])):
                if child is None or child.status != RunStatus.WAITING:
                    continue
                out += child.info().approvals
                out += await self._child_approvals(child)
        return out

    async def _info(self, run_id: str) -> RunInfo:
        """``RunInfo`` of ``run_id``, its children's pending approvals listed after its own."""
        rec = await self._record(run_id)
        info = rec.info()
        children = await self._child_approvals(rec)
        if not children:
            return info
        approvals = (*info.approvals, *children)
        return dataclasses.replace(info, approvals=approvals, pending=approvals[0])

    def _check_workflow(self, rec: RunRecord) -> None:
        if rec.workflow not in self._specs:
            raise AgentflowError(
                f"run {rec.run_id} belongs to workflow {rec.workflow!r}, not {self.spec.name!r}; "
                "use that workflow's runner"
            )

    # -- control ---------------------------------------------------------------

    async def _record(self, run_id: str) -> RunRecord:
        rec = await self.store.get(run_id)
        if rec is None:
            raise RunNotFoundError(f"no run {run_id!r} in the store of workflow {self.spec.name!r}")
        self._check_workflow(rec)
        return rec

    async def _until(
        self, run_id: str, done: Callable[[RunRecord], bool], timeout: float | None
    ) -> RunRecord:
        sup = self.supervisor
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            live = sup.local.get(run_id)
            if live is not None and not live.finished:
                try:
                    async with asyncio.timeout(None if deadline is None else deadline - time.monotonic()):
                        await live.wait_finished()
                except TimeoutError:
                    raise TimeoutError(f"run {run_id} did not get there within {timeout} s") from None
                if live.failure is not None:
                    raise live.failure
            rec = await self._record(run_id)
            if done(rec):
                return rec
            if rec.status == RunStatus.WAITING and rec.pending and rec.pending.get("deadline"):
                sup.watch_deadlines()
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {run_id} did not get there within {timeout} s")
            left = _POLL if deadline is None else min(_POLL, max(0.0, deadline - time.monotonic()))
            await sup.notifier.changed(run_id, left)

    async def _each_child(self, run_id: str, action: Callable[[str], Any], every: bool = False) -> None:
        """Apply ``action`` to ``run_id``'s child runs (those of its wait; with ``every``, all).

        A child that cannot take it (it ended meanwhile) is left as it is.
        """
        rec = await self.store.get(run_id)
        if rec is None:
            return
        if every:
            ids = list(rec.children)
        elif isinstance(rec.pending, dict) and rec.pending.get("kind") == "children":
            ids = [str(c["run_id"]) for c in rec.pending.get("children") or ()]
        else:
            return

        async def one(child: str) -> None:
            try:
                await action(child)
            except (InvalidStateError, RunNotFoundError):
                pass

        for i in range(0, len(ids), _FAN):
            await asyncio.gather(*(one(c) for c in ids[i : i + _FAN]))

    async def _pause(self, run_id: str) -> None:
        """Pause the run, and its child runs (they pause where they are; the parent waits on)."""
        await self._pause_one(run_id)
        await self._each_child(run_id, self._pause)

    async def _pause_one(self, run_id: str) -> None:
        sup = self.supervisor
        live = sup.local.get(run_id)
        if live is not None and live.status is RunStatus.RUNNING and not live.finished:
            live.pause_requested = True
            # Waiting counts as parked: the pause takes effect where the decision sends the run.
            await self._until(run_id, lambda r: r.status != RunStatus.RUNNING, None)
            return

        def change(rec: RunRecord, now: float) -> Change | None:
            if rec.status == RunStatus.PAUSED:
                return None
            if rec.status not in (RunStatus.RUNNING, RunStatus.WAITING, RunStatus.PENDING):
                raise InvalidStateError(
                    f"run {run_id} is {rec.status.value}; only a running or waiting run can be paused"
                )
            if rec.status == RunStatus.RUNNING and (rec.lease_owner is None or rec.lease_expires <= now):
                # Its owner is gone: it parks at the step it was in (which runs again on
                # resume), or ends there when a stop was asked for too.
                status = RunStatus.STOPPED if rec.control == "stop" else RunStatus.PAUSED
                ev = RunEvent(status.value, run_id, rec.step, None, time.time(), rec.event_count + 1)
                return Change(dataclasses.replace(rec, status=status, lease_owner=None, control=None), [ev])
            return (
                None
                if rec.control in ("pause", "stop")
                else Change(dataclasses.replace(rec, control="pause"))
            )

        while True:
            rec = await sup.update(run_id, change)
            if rec is None:
                raise RunNotFoundError(f"no run {run_id!r} in the store of workflow {self.spec.name!r}")
            sup.notify(run_id)
            if rec.status != RunStatus.RUNNING:
                return
            # Owned elsewhere: it pauses at its next commit or lease renewal; if its owner
            # dies first, its lease runs out and the next round parks it here.
            try:
                await self._until(run_id, lambda r: r.status != RunStatus.RUNNING, self._lease_ttl)
                return
            except TimeoutError:
                continue

    async def _resume(self, run_id: str) -> None:
        """Resume the run, and its paused child runs."""
        await self._resume_one(run_id)
        await self._each_child(run_id, self._resume)

    async def _resume_one(self, run_id: str) -> None:
        def fn(rec: RunRecord, now: float) -> Transition | None:
            if rec.status == RunStatus.RUNNING:
                return None
            if rec.status == RunStatus.WAITING and rec.control == "pause":
                return None  # nothing to resume yet; the pause is dropped below
            if rec.status != RunStatus.PAUSED:
                raise InvalidStateError(
                    f"run {run_id} is {rec.status.value}; only a paused run can be resumed"
                )
            return Transition({}, [("resumed", rec.step, None)], resume_at=rec.step)

        rec = await self.supervisor.transition(run_id, fn)
        if rec.status == RunStatus.WAITING and rec.control == "pause":
            await self.supervisor.update(run_id, lambda r, now: Change(dataclasses.replace(r, control=None)))

    async def _stop(self, run_id: str) -> None:
        """Stop the run, then every child run it started that has not ended."""
        await self._stop_one(run_id)
        await self._each_child(run_id, self._stop, every=True)

    async def _stop_one(self, run_id: str) -> None:
        sup = self.supervisor
        while True:
            live = sup.local.get(run_id)
            if live is not None and not live.finished:
                live.stop_requested = True
                live.cancel()
                await live.wait_finished()

            def change(rec: RunRecord, now: float) -> Change | None:
                if rec.status in FINAL and rec.status != RunStatus.STOPPED:
                    raise InvalidStateError(
                        f"run {run_id} is already {rec.status.value}; it cannot be stopped"
                    )
                return stop_change(rec, now)

            rec = await sup.update(run_id, change)
            if rec is None:
                raise RunNotFoundError(f"no run {run_id!r} in the store of workflow {self.spec.name!r}")
            sup.notify(run_id)
            sup.settled(rec)
            if rec.status in FINAL:
                return
            # Owned elsewhere (alive): it stops at its next commit or lease renewal. If it
            # parks first (at a gate, paused) or dies (its lease runs out), the next round
            # stops it here.
            try:
                rec = await self._until(run_id, lambda r: r.status != RunStatus.RUNNING, self._lease_ttl)
            except TimeoutError:
                continue
            if rec.status in FINAL:
                return

    async def _result(self, run_id: str, timeout: float | None) -> RunResult:
        rec = await self._until(run_id, lambda r: r.status in FINAL, timeout)
        if rec.status == RunStatus.FAILED:
            err = rec.error or {}
            raise RunFailedError(
                run_id,
                err.get("step"),
                err.get("type", "Error"),
                err.get("message", ""),
                err.get("traceback", ""),
            )
        if rec.status == RunStatus.STOPPED:
            raise RunStoppedError(run_id, rec.step)
        if rec.status in (RunStatus.REJECTED, RunStatus.EXPIRED):
            last = rec.decisions[-1] if rec.decisions else {}
            raise RunRejectedError(run_id, rec.status.value, last.get("comment"), last.get("by"))
        loaded = await self.store.load(run_id)
        if loaded is None:
            raise RunNotFoundError(f"run {run_id} vanished from the store of workflow {self.spec.name!r}")
        spec = self._specs.get(rec.workflow, self.spec)
        results: dict[str, Any] = {}
        for out in loaded.outputs:
            results[out.step] = decode_output(spec, out.step, out.value)
        state = (
            spec.state_model.model_validate(rec.state)
            if spec.state_model and rec.state is not None
            else rec.state
        )
        return RunResult(rec.status, run_output(spec, run_id, rec.output), state, results)

    async def _events(self, run_id: str) -> AsyncIterator[RunEvent]:
        sup = self.supervisor
        after = 0
        while True:
            batch = await self.store.events(run_id, after)
            live = sup.local.get(run_id)
            if live is not None:
                batch = [*batch, *(e for e in live.outbox if e.seq > (batch[-1].seq if batch else after))]
            for ev in batch:
                if ev.seq <= after:
                    continue
                after = ev.seq
                yield ev
                if ev.kind in _FINAL_KINDS and ev is batch[-1]:
                    # The end, unless the run went on since (a failed run that was retried).
                    rec = await self._record(run_id)
                    if rec.status in FINAL and rec.event_count <= after:
                        return
            if not batch:
                rec = await self._record(run_id)
                if rec.status in FINAL and rec.event_count <= after:
                    return
            await sup.notifier.changed(run_id, _POLL)
