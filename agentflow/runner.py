"""``WorkflowRunner`` and ``RunHandle``: start runs and control them."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pydantic_core

from . import gates
from .engine import LiveRun, advance_flow, drive, new_record
from .errors import (
    AgentflowError,
    CorruptRecordError,
    InvalidStateError,
    LeaseLostError,
    RunFailedError,
    RunRejectedError,
    RunStoppedError,
    StoreError,
    WorkflowDefinitionError,
)
from .records import FINAL, Commit, RunEvent, RunInfo, RunRecord, RunResult, RunStatus
from .steps import END
from .stores.base import Change, Lease, Store
from .stores.memory import MemoryStore
from .values import decode_output, run_output, validate_input
from .workflow import Workflow, WorkflowSpec

__all__ = ["Engine", "RunHandle", "WorkflowRunner"]

_FINAL_KINDS = frozenset(s.value for s in FINAL)
_POLL = 0.1  # seconds between store polls for runs another process advances


def _open_store(spec: WorkflowSpec) -> tuple[Store, bool]:
    p = spec.persistence
    if p is None or not p.enabled:
        return MemoryStore(), True
    if not isinstance(p.store, str):
        return p.store, False
    from .stores import open_store

    return open_store(p.store, key_prefix=p.key_prefix, url=p.url, path=p.path, ttl=p.ttl), True


class Engine:
    """Per-runner machinery: the store, the runs this process owns, leases, deadlines."""

    def __init__(self, spec: WorkflowSpec, store: Store, lease_ttl: float, owner: str) -> None:
        self.spec = spec
        self.store = store
        self.lease_ttl = lease_ttl
        self.owner = owner
        self.local: dict[str, LiveRun] = {}
        self.waiters: dict[str, list[asyncio.Event]] = {}
        self.stopping = False
        self.pools: Any = None
        if spec.agents is not None:
            from .pool import AgentPools

            self.pools = AgentPools(spec.agents)
        self._renewer: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        if spec.imperative:
            from .imperative import advance_imperative

            self.advance: Callable[[LiveRun], Any] = advance_imperative
        else:
            self.advance = advance_flow

    # -- notifications ------------------------------------------------------

    def notify(self, run_id: str) -> None:
        """Wake whoever waits on ``run_id`` (handles awaiting results or events)."""
        if self.waiters:
            for ev in self.waiters.pop(run_id, ()):
                ev.set()

    async def changed(self, run_id: str, timeout: float) -> None:
        """Wait until this process commits to ``run_id``, or ``timeout`` passes (other processes)."""
        ev = asyncio.Event()
        waiting = self.waiters.setdefault(run_id, [])
        waiting.append(ev)
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            # Take this waiter out (timed out or cancelled), so watching many runs of
            # other processes leaves nothing behind.
            if not ev.is_set():
                waiting.remove(ev)
                if not waiting and self.waiters.get(run_id) is waiting:
                    del self.waiters[run_id]

    # -- owning runs -----------------------------------------------------------

    def start(self, run: LiveRun) -> None:
        """Advance ``run`` in a task of its own."""
        self.local[run.run_id] = run
        run.task = asyncio.get_running_loop().create_task(
            drive(run, self.advance), name=f"agentflow:{run.run_id}"
        )
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_loop(), name="agentflow:leases"
            )

    def forget(self, run: LiveRun) -> None:
        """``run`` left this process."""
        if self.local.get(run.run_id) is run:
            del self.local[run.run_id]
        self.notify(run.run_id)

    def lease_for(self, rec: RunRecord) -> tuple[Lease, dict[str, Any]]:
        """A new lease for this process on ``rec`` and the record fields that grant it."""
        lease = Lease(self.owner, rec.lease_token + 1)
        return lease, {
            "lease_owner": lease.owner,
            "lease_token": lease.token,
            "lease_expires": time.time() + self.lease_ttl,
            "control": None,
        }

    async def adopt(self, run_id: str, lease: Lease) -> LiveRun:
        """Load a run this process just took the lease of, and start advancing it."""
        loaded = await self.store.load(run_id)
        if loaded is None:
            raise AgentflowError(f"run {run_id} vanished from the store")
        try:
            run = LiveRun.restore(self, loaded, lease)
        except CorruptRecordError as exc:
            # Nothing can advance it: fail the run (so it is not retried for ever) and say why.
            rec, message = loaded.record, str(exc)
            error = {"step": rec.step, "type": type(exc).__name__, "message": message, "traceback": ""}
            data = {"type": error["type"], "message": message}
            event = RunEvent("failed", run_id, rec.step, data, time.time(), rec.event_count + 1)
            fields = {"status": RunStatus.FAILED, "error": error, "control": None}
            await self.store.commit(run_id, lease, Commit(fields=fields, events=[event], release=True))
            self.notify(run_id)
            raise
        self.start(run)
        return run

    async def _renew_loop(self) -> None:
        interval = min(self.lease_ttl / 3, 1.0)
        idle = 0
        while idle < 2:  # ends after two idle ticks, so no task outlives the runs it served
            await asyncio.sleep(interval)
            idle = 0 if self.local else idle + 1
            for run in list(self.local.values()):
                if run.task is None or run.task.done():
                    continue
                try:
                    control = await self.store.renew(run.run_id, run.lease, self.lease_ttl)
                except LeaseLostError:
                    run.task.cancel()
                    continue
                except StoreError:
                    continue  # retried at the next tick; the lease has slack for it
                if control == "stop":
                    run.stop_requested = True
                    run.task.cancel()
                elif control == "pause":
                    run.pause_requested = True

    def watch_deadlines(self) -> None:
        """Make sure gate deadlines of this workflow are enforced while this runner lives."""
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop(), name="agentflow:gates")

    async def _sweep_loop(self) -> None:
        while not self.stopping:
            try:
                due = await self.store.due_gates(self.spec.name, time.time())
            except StoreError:
                due = []
            for run_id in due:
                try:
                    await self.expire(run_id)
                except AgentflowError:
                    pass
            await asyncio.sleep(0.2)

    async def expire(self, run_id: str) -> None:
        """Time out the gate of ``run_id`` if its deadline passed."""
        await self.transition(run_id, lambda rec: _timeout_change(rec))

    async def transition(self, run_id: str, fn: Callable[[RunRecord], _Next | None]) -> RunRecord:
        """Apply a decision-like change; adopt the run when it resumes here."""
        grabbed: list[Lease] = []

        def change(rec: RunRecord) -> Change | None:
            grabbed.clear()
            nxt = fn(rec)
            if nxt is None:
                return None
            fields = dict(nxt.fields)
            kinds = list(nxt.events)
            if nxt.resume_at is not None:
                if nxt.resume_at == END:
                    fields.update(status=RunStatus.COMPLETED, step=END, lease_owner=None)
                    kinds.append(("completed", None, None))
                else:
                    lease, lease_fields = self.lease_for(rec)
                    grabbed.append(lease)
                    fields.update(status=RunStatus.RUNNING, step=nxt.resume_at, **lease_fields)
                    kinds.append(("step_started", nxt.resume_at, None))
            now = time.time()
            events = [
                RunEvent(kind, rec.run_id, step, data, now, rec.event_count + i + 1)
                for i, (kind, step, data) in enumerate(kinds)
            ]
            return Change(dataclasses.replace(rec, **fields), events)

        rec = await self.store.update(run_id, change)
        if rec is None:
            raise AgentflowError(f"no run {run_id!r} in the store of workflow {self.spec.name!r}")
        self.notify(run_id)
        if grabbed and rec.lease_owner == self.owner and rec.lease_token == grabbed[0].token:
            await self.adopt(run_id, grabbed[0])
        return rec

    async def close(self) -> None:
        """Stop advancing runs (they stay recoverable) and stop background tasks."""
        self.stopping = True
        tasks = [r.task for r in self.local.values() if r.task is not None]
        for r in self.local.values():
            r.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for bg in (self._renewer, self._sweeper):
            if bg is not None:
                bg.cancel()
                await asyncio.gather(bg, return_exceptions=True)
        if self.pools is not None:
            await self.pools.aclose()


@dataclasses.dataclass(slots=True)
class _Next:
    """What a gate transition does: record fields, events, and where the run resumes."""

    fields: dict[str, Any]
    events: list[tuple[str, str | None, Any]]
    resume_at: str | None = None


def _outcome_next(rec: RunRecord, out: gates.Outcome) -> _Next:
    pending = rec.pending or {}
    decision = {**out.decision.to_json(), "step": pending.get("step"), "visit": pending.get("visit")}
    fields: dict[str, Any] = {"decisions": (*rec.decisions, decision)}
    events: list[tuple[str, str | None, Any]] = [("decided", pending.get("step"), decision)]
    if out.pending is not None:
        fields["pending"] = out.pending
        return _Next(fields, events)
    fields["pending"] = None
    if out.final is not None:
        fields.update(status=RunStatus(out.final), lease_owner=None)
        events.append((out.final, pending.get("step"), None))
        return _Next(fields, events)
    return _Next(fields, events, resume_at=out.resume_at or END)


def _timeout_change(rec: RunRecord) -> _Next | None:
    if rec.status != RunStatus.WAITING or not rec.pending:
        return None
    deadline = rec.pending.get("deadline")
    if deadline is None or deadline > time.time():
        return None
    return _outcome_next(rec, gates.time_out(rec.pending))


class WorkflowRunner:
    """Starts and controls the runs of one workflow.

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
        self._owns_store = False
        if store is None:
            store, self._owns_store = _open_store(self.spec)
        ttl = lease_ttl or (self.spec.persistence.lease_ttl if self.spec.persistence else 15.0)
        self.store = store
        self.owner = f"{uuid.uuid4().hex[:12]}"
        self._engine: Engine | None = None
        self._lease_ttl = ttl

    @property
    def engine(self) -> Engine:
        # Created on first use, inside the running event loop.
        if self._engine is None:
            self._engine = Engine(self.spec, self.store, self._lease_ttl, self.owner)
        return self._engine

    async def __aenter__(self) -> WorkflowRunner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop advancing this process's runs (they stay recoverable); close agents and the store."""
        if self._engine is not None:
            await self._engine.close()
            self._engine = None
        if self._owns_store:
            await self.store.close()

    # -- starting ------------------------------------------------------------

    async def run(self, input: Any = None, run_id: str | None = None) -> RunHandle:
        """Start a run and return its handle at once; the run goes on in this process.

        With a ``run_id`` that already exists, returns that run's handle and starts nothing.

        Raises:
            InvalidInputError: the input does not fit the input model; no run is created.
        """
        spec = self.spec
        inp = validate_input(spec, input)
        if spec.input_model is None:
            try:
                pydantic_core.to_json(inp)
            except pydantic_core.PydanticSerializationError as exc:
                from .errors import InvalidInputError

                raise InvalidInputError(
                    f"input for workflow {spec.name!r} must be JSON-able: {exc}"
                ) from None
        engine = self.engine
        run_id = run_id or os.urandom(16).hex()
        state = spec.state_model.model_validate(spec.initial_state) if spec.state_model else None
        lease = Lease(engine.owner, 1)
        rec = new_record(spec, run_id, inp, state, lease, engine.lease_ttl)
        run = LiveRun(engine, run_id, lease, inp, state)
        first = spec.main.name if spec.main is not None else None
        if first is not None:
            rec = dataclasses.replace(rec, step=first)
            run.step = first
        events = [
            run.event("run_started", None, {"workflow": spec.name}),
            run.event("step_started", rec.step),
        ]
        run.outbox.clear()
        if not await self.store.create(rec, events):
            return await self.attach(run_id)  # the run exists: start nothing (and check it is ours)
        engine.start(run)
        return RunHandle(self, run_id, run)

    async def attach(self, run_id: str) -> RunHandle:
        """A handle for an existing run (raises AgentflowError when there is none)."""
        rec = await self.store.get(run_id)
        if rec is None:
            raise AgentflowError(f"no run {run_id!r} in the store of workflow {self.spec.name!r}")
        self._check_workflow(rec)
        if rec.status == RunStatus.WAITING and rec.pending and rec.pending.get("deadline"):
            self.engine.watch_deadlines()
        return RunHandle(self, run_id)

    async def list_runs(self, status: RunStatus | str | None = None) -> list[RunInfo]:
        """RunInfo of this workflow's runs, oldest first, optionally of one status."""
        try:
            st = RunStatus(status) if status is not None else None
        except ValueError:
            raise AgentflowError(
                f"unknown status {status!r}; statuses are {[s.value for s in RunStatus]}"
            ) from None
        return [RunInfo.from_record(r) for r in await self.store.list_runs(self.spec.name, st)]

    async def recover(self) -> list[RunHandle]:
        """Resume every run of this workflow whose owner died (running, lease expired)."""
        engine = self.engine
        handles = []
        for rec in await self.store.list_runs(self.spec.name, RunStatus.RUNNING):
            if rec.lease_expires >= time.time() or rec.run_id in engine.local:
                continue

            def take_over(r: RunRecord) -> _Next | None:
                if r.status != RunStatus.RUNNING or r.lease_expires >= time.time():
                    return None  # someone else got there first
                return _Next({}, [("resumed", r.step, {"recovered": True, "from": r.lease_owner})], r.step)

            await engine.transition(rec.run_id, take_over)
            if rec.run_id in engine.local:
                handles.append(RunHandle(self, rec.run_id))
        for run_id in await self.store.due_gates(self.spec.name, time.time()):
            await engine.expire(run_id)
        engine.watch_deadlines()
        return handles

    async def delete(self, run_id: str) -> bool:
        """Remove a run and everything stored with it; False when there was no such run.

        Raises:
            InvalidStateError: the run is running; stop it first.
        """
        rec = await self.store.get(run_id)
        if rec is None:
            return False
        self._check_workflow(rec)
        owned = rec.lease_expires > time.time() or run_id in self.engine.local
        if rec.status == RunStatus.RUNNING and owned:
            raise InvalidStateError(f"run {run_id} is running; stop it before deleting it")
        return await self.store.delete(run_id)

    def agent_statistics(self) -> dict[str, Any]:
        """Per agent: handles open, acquirers waiting, pool size and calls sent (for display)."""
        pools = self.engine.pools
        return dict(pools.statistics()) if pools is not None else {}

    # -- decisions -----------------------------------------------------------

    async def approve(self, run_id: str, by: str, comment: str | None = None, data: Any = None) -> RunHandle:
        """Approve the gate ``run_id`` waits at; the run continues in this process.

        Raises:
            NotAuthorizedError: ``by`` is not an approver; nothing changes.
            InvalidStateError: the run is not waiting.
        """
        return await self._decide(run_id, True, by, comment, data)

    async def reject(self, run_id: str, by: str, reason: str | None = None) -> RunHandle:
        """Reject the gate ``run_id`` waits at: on_reject if given, else the run ends ``rejected``."""
        return await self._decide(run_id, False, by, reason, None)

    async def _decide(
        self, run_id: str, approved: bool, by: str, comment: str | None, data: Any
    ) -> RunHandle:
        def fn(rec: RunRecord) -> _Next | None:
            self._check_workflow(rec)
            if rec.status != RunStatus.WAITING:
                raise InvalidStateError(
                    f"run {run_id} is {rec.status.value}, not waiting at a gate; nothing to decide"
                )
            if _timeout_change(rec) is not None:
                raise InvalidStateError(
                    f"run {run_id}: the gate at step {rec.pending.get('step')!r} timed out"
                )
            return _outcome_next(rec, gates.decide(run_id, rec.pending, approved, by, comment, data))

        try:
            await self.engine.transition(run_id, fn)
        except InvalidStateError:
            await self.engine.expire(run_id)  # a gate past its deadline expires now
            raise
        return RunHandle(self, run_id)

    def _check_workflow(self, rec: RunRecord) -> None:
        if rec.workflow != self.spec.name:
            raise AgentflowError(
                f"run {rec.run_id} belongs to workflow {rec.workflow!r}, not {self.spec.name!r}; "
                "use that workflow's runner"
            )

    # -- control ---------------------------------------------------------------

    async def _record(self, run_id: str) -> RunRecord:
        rec = await self.store.get(run_id)
        if rec is None:
            raise AgentflowError(f"no run {run_id!r} in the store of workflow {self.spec.name!r}")
        return rec

    async def _until(
        self, run_id: str, done: Callable[[RunRecord], bool], timeout: float | None
    ) -> RunRecord:
        engine = self.engine
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            live = engine.local.get(run_id)
            if live is not None and not live.finished:
                wait = live.wait_finished()
                try:
                    await asyncio.wait_for(
                        wait, None if deadline is None else max(0.0, deadline - time.monotonic())
                    )
                except TimeoutError:
                    raise TimeoutError(f"run {run_id} did not get there within {timeout} s") from None
                if live.failure is not None:
                    raise live.failure
            rec = await self._record(run_id)
            if done(rec):
                return rec
            if rec.status == RunStatus.WAITING and rec.pending and rec.pending.get("deadline"):
                engine.watch_deadlines()
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {run_id} did not get there within {timeout} s")
            left = _POLL if deadline is None else min(_POLL, max(0.0, deadline - time.monotonic()))
            await engine.changed(run_id, left)

    async def _pause(self, run_id: str) -> None:
        live = self.engine.local.get(run_id)
        if live is not None and live.status is RunStatus.RUNNING:
            live.pause_requested = True
        else:

            def change(rec: RunRecord) -> Change | None:
                if rec.status in (RunStatus.PAUSED,) or rec.control == "pause":
                    return None
                if rec.status != RunStatus.RUNNING:
                    raise InvalidStateError(
                        f"run {run_id} is {rec.status.value}; only a running run can be paused"
                    )
                return Change(dataclasses.replace(rec, control="pause"))

            await self.store.update(run_id, change)
        await self._until(run_id, lambda r: r.status != RunStatus.RUNNING, None)

    async def _resume(self, run_id: str) -> None:
        def fn(rec: RunRecord) -> _Next | None:
            if rec.status == RunStatus.RUNNING:
                return None
            if rec.status != RunStatus.PAUSED:
                raise InvalidStateError(
                    f"run {run_id} is {rec.status.value}; only a paused run can be resumed"
                )
            return _Next({}, [("resumed", rec.step, None)], resume_at=rec.step)

        await self.engine.transition(run_id, fn)

    async def _stop(self, run_id: str) -> None:
        live = self.engine.local.get(run_id)
        if live is not None and live.task is not None and not live.task.done():
            live.stop_requested = True
            live.cancel()
            await live.wait_finished()
            return

        def change(rec: RunRecord) -> Change | None:
            if rec.status == RunStatus.STOPPED:
                return None
            if rec.status in FINAL:
                raise InvalidStateError(f"run {run_id} is already {rec.status.value}; it cannot be stopped")
            if rec.status == RunStatus.RUNNING and rec.lease_expires > time.time():
                return Change(dataclasses.replace(rec, control="stop"))
            ev = RunEvent("stopped", run_id, rec.step, None, time.time(), rec.event_count + 1)
            return Change(
                dataclasses.replace(
                    rec, status=RunStatus.STOPPED, pending=None, lease_owner=None, control=None
                ),
                [ev],
            )

        await self.store.update(run_id, change)
        self.engine.notify(run_id)
        await self._until(run_id, lambda r: r.status in FINAL, None)

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
        assert loaded is not None
        spec = self.spec
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
        engine = self.engine
        after = 0
        while True:
            batch = await self.store.events(run_id, after)
            live = engine.local.get(run_id)
            if live is not None:
                batch = [*batch, *(e for e in live.outbox if e.seq > (batch[-1].seq if batch else after))]
            for ev in batch:
                if ev.seq <= after:
                    continue
                after = ev.seq
                yield ev
                if ev.kind in _FINAL_KINDS:
                    return
            if not batch:
                rec = await self._record(run_id)
                if rec.status in FINAL and rec.event_count <= after:
                    return
            await engine.changed(run_id, _POLL)


class RunHandle:
    """Controls one run: inspect it, wait for it, watch it, pause, resume, stop, decide."""

    __slots__ = ("_live", "_runner", "run_id")

    def __init__(self, runner: WorkflowRunner, run_id: str, live: LiveRun | None = None) -> None:
        self._runner = runner
        self._live = live
        self.run_id = run_id

    async def info(self) -> RunInfo:
        """A snapshot: status, step, pending gate, error, usage, timestamps."""
        return RunInfo.from_record(await self._runner._record(self.run_id))

    async def result(self, timeout: float | None = None) -> RunResult:
        """Wait for the run to finish and return its result.

        Raises:
            RunFailedError: with the failing step, error type, message and traceback text.
            RunStoppedError: the run was stopped.
            RunRejectedError: the run was rejected or its gate expired.
            TimeoutError: ``timeout`` seconds passed first.
        """
        live = self._live
        if live is not None and timeout is None:
            # Started here: follow the run in memory while it stays in this process.
            await live.wait_finished()
            if live.failure is not None:
                raise live.failure
            if live.status is RunStatus.COMPLETED:
                return RunResult(RunStatus.COMPLETED, live.output, live.state, dict(live.results))
            self._live = None
        return await self._runner._result(self.run_id, timeout)

    def events(self) -> AsyncIterator[RunEvent]:
        """The run's events from its first (history, then live), ending at a final status."""
        return self._runner._events(self.run_id)

    async def pause(self) -> None:
        """Let the step in flight finish and commit, then park the run as ``paused``."""
        await self._runner._pause(self.run_id)

    async def resume(self) -> None:
        """Continue a paused run from its next step, in this process."""
        await self._runner._resume(self.run_id)

    async def stop(self) -> None:
        """Cancel the step in flight, close its agent handles; status ``stopped`` (final)."""
        await self._runner._stop(self.run_id)

    async def approve(self, by: str, comment: str | None = None, data: Any = None) -> RunHandle:
        """Approve the gate the run waits at (see ``WorkflowRunner.approve``)."""
        return await self._runner.approve(self.run_id, by, comment, data)

    async def reject(self, by: str, reason: str | None = None) -> RunHandle:
        """Reject the gate the run waits at (see ``WorkflowRunner.reject``)."""
        return await self._runner.reject(self.run_id, by, reason)

    def __repr__(self) -> str:
        status = self._live.status.value if self._live is not None else "?"
        return f"<RunHandle {self.run_id} {self._runner.spec.name} {status}>"

    def _repr_html_(self) -> str:
        live = self._live
        rows = [("run", self.run_id), ("workflow", self._runner.spec.name)]
        if live is not None:
            rows += [("status", live.status.value), ("step", live.step), ("steps run", str(live.visit))]
        from html import escape

        return "<table>" + "".join(f"<tr><th>{k}</th><td>{escape(v)}</td></tr>" for k, v in rows) + "</table>"
