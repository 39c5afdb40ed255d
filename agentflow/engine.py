"""The engine: advances a run it owns, one committed step at a time.

Invariants:

* A run advances only through ``Store.commit`` under its lease; each step's completion
  (state, output, next step, events) is one commit.
* The record alone is enough to pick a run up again: ``LiveRun.restore`` rebuilds the
  typed input, state and step outputs from it, with types known from the workflow
  definition, never from the store.
* The ``step_started`` event of a step is committed together with the completion of the
  step before it, so a running record always names the step in flight.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from .context import StepContext, StepResults
from .errors import (
    AgentflowError,
    CorruptRecordError,
    InvalidInputError,
    LeaseLostError,
    StepLimitExceeded,
    StoreError,
    UnknownStepError,
)
from .gates import Gate, Wait, pending_gate
from .parallel import BranchFailed, Parallel, run_parallel
from .records import Commit, Decision, OutputRecord, RunEvent, RunRecord, RunStatus, Usage
from .steps import END, START, Next, StepFunction, invoke
from .stores.base import Lease, LoadedRun
from .values import decode_output, encode_branch, run_output, step_output, validate_input

if TYPE_CHECKING:
    from .runner import Engine
    from .workflow import WorkflowSpec

__all__ = ["LiveRun", "StepJournal", "advance_flow", "drive", "new_record"]

log = logging.getLogger("agentflow")


class StepError(Exception):
    """Internal: a step failed; carries the step name and the cause."""

    def __init__(self, step: str, error: BaseException) -> None:
        super().__init__(str(error))
        self.step = step
        self.error = error


class _Stop(Exception):
    """Internal: the run must stop (another process asked, through the control flag)."""


class LiveRun:
    """A run owned and advanced by this process."""

    __slots__ = (
        "decision",
        "decisions",
        "engine",
        "event_seq",
        "failure",
        "finished",
        "history",
        "input",
        "journal",
        "lease",
        "outbox",
        "output",
        "pause_requested",
        "results",
        "results_view",
        "run_id",
        "spec",
        "started",
        "state",
        "status",
        "step",
        "step_usage",
        "stop_requested",
        "task",
        "usage",
        "visit",
        "watchers",
    )

    def __init__(self, engine: Engine, run_id: str, lease: Lease, inp: Any, state: Any) -> None:
        self.engine = engine
        self.spec = engine.spec
        self.run_id = run_id
        self.lease = lease
        self.input = inp
        self.state: BaseModel | None = state
        self.step: str = START
        self.visit = 0
        self.results: dict[str, Any] = {}
        self.history: dict[str, list[Any]] = {}
        self.results_view = StepResults(self.results, self.history)
        self.decision: Decision | None = None
        self.decisions: tuple[Any, ...] = ()  # every decision as stored (JSON), oldest first
        self.usage = Usage()
        self.step_usage = Usage()
        self.event_seq = 0
        self.outbox: list[RunEvent] = []
        self.journal: dict[str, Any] = {}
        self.status = RunStatus.RUNNING
        self.output: Any = None
        self.pause_requested = False
        self.stop_requested = False
        self.task: asyncio.Task[None] | None = None
        self.started = False  # drive() has begun: its cleanup is guaranteed to run
        self.finished = False
        self.failure: BaseException | None = None  # a store failure that left the run at its last commit
        self.watchers: list[asyncio.Future[None]] = []

    @classmethod
    def restore(cls, engine: Engine, loaded: LoadedRun, lease: Lease) -> LiveRun:
        """Rebuild a run from its stored record, outputs and journal."""
        rec = loaded.record
        spec = engine.spec
        key = "input"
        try:
            inp = validate_input(spec, rec.input)
            key = "state"
            state = spec.state_model.model_validate(rec.state) if spec.state_model else None
            run = cls(engine, rec.run_id, lease, inp, state)
            key = "outputs"
            for out in loaded.outputs:
                value = decode_output(spec, out.step, out.value)
                run.results[out.step] = value
                run.history.setdefault(out.step, []).append(value)
            key = "decisions"
            run.decisions = rec.decisions
            if rec.decisions:
                run.decision = Decision.from_json(rec.decisions[-1])
        except (ValidationError, InvalidInputError, KeyError, TypeError, ValueError) as exc:
            raise CorruptRecordError(rec.run_id, key, str(exc)) from None
        run.step = rec.step or START
        run.visit = rec.visit
        run.usage = Usage.from_json(rec.usage)
        run.event_seq = rec.event_count
        run.journal = dict(loaded.journal)
        return run

    # -- events ---------------------------------------------------------------

    def event(self, kind: str, step: str | None = None, data: Any = None) -> RunEvent:
        """A new event with the next sequence number, queued for the next commit."""
        self.event_seq += 1
        ev = RunEvent(kind, self.run_id, step, data, time.time(), self.event_seq)
        self.outbox.append(ev)
        return ev

    def emit(self, ev: RunEvent) -> None:
        """Queue a custom event (from ``ctx.emit``); it is published right away."""
        self.event(ev.kind, ev.step, ev.data)
        self.engine.notify(self.run_id)

    def wait_finished(self) -> asyncio.Future[None]:
        """A future resolved when this process stops advancing the run (fresh per caller)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.finished:
            fut.set_result(None)
        else:
            self.watchers.append(fut)
        return fut

    def cancel(self) -> None:
        """Cancel the run's task. A task cancelled before it starts never runs ``drive``'s
        cleanup (its watchers would wait forever), so a run not started yet is left to see
        ``stop_requested`` or ``engine.stopping`` when it starts.
        """
        if self.started and self.task is not None:
            self.task.cancel()

    def take_events(self) -> list[RunEvent]:
        out, self.outbox = self.outbox, []
        return out

    async def commit(self, commit: Commit) -> str | None:
        """Commit under this run's lease, with the queued events."""
        commit.events = self.take_events() if not commit.events else [*self.take_events(), *commit.events]
        control = await self.engine.store.commit(self.run_id, self.lease, commit)
        self.engine.notify(self.run_id)
        return control

    # -- agents ---------------------------------------------------------------

    def agents_for(self, ctx: StepContext) -> Any:
        pools = self.engine.pools
        if pools is None:
            raise AgentflowError(
                f"run {self.run_id}, step {ctx.step_name!r}: the workflow declares no agents; "
                "add .agents({...}) to the workflow"
            )
        return pools.accessor(
            StepJournal(self, f"{ctx.visit}:{ctx.step_name}:{getattr(ctx, 'journal_scope', '')}")
        )


class StepJournal:
    """The engine's side of agent calls for one step execution (``AgentJournal``)."""

    __slots__ = ("_run", "_scope")

    def __init__(self, run: LiveRun, scope: str) -> None:
        self._run = run
        self._scope = scope

    @property
    def scope(self) -> str:
        return self._scope

    def lookup(self, key: str) -> Any | None:
        return self._run.journal.get(key)

    async def record(self, key: str, value: Any, usage: Usage) -> None:
        run = self._run
        run.journal[key] = value
        run.usage = run.usage + usage
        run.step_usage = run.step_usage + usage
        await run.commit(Commit(fields={"usage": run.usage.to_json()}, journal={key: value}))

    def spent(self) -> int:
        return self._run.usage.total_tokens

    def emit(self, kind: str, data: Any = None) -> None:
        self._run.event(kind, None, data)
        self._run.engine.notify(self._run.run_id)


def _error_info(step: str | None, exc: BaseException) -> dict[str, Any]:
    return {
        "step": step,
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


async def drive(run: LiveRun, advance: Callable[[LiveRun], Any]) -> None:
    """Run ``advance`` to its end, turning failures, stops and lease loss into commits."""
    engine = run.engine
    try:
        run.started = True
        if run.stop_requested:
            raise _Stop()
        if engine.stopping:
            raise asyncio.CancelledError()  # the runner closed before the run began: leave it for recovery
        await advance(run)
    except asyncio.CancelledError:
        if run.stop_requested:
            await _finish_stopped(run)
        else:
            # The runner is closing: leave the run for recovery, releasing the lease so
            # another process need not wait for it to expire.
            await _release_quietly(run)
            run.status = RunStatus.RUNNING
    except _Stop:
        await _finish_stopped(run)
    except LeaseLostError as exc:
        log.warning("run %s: %s; this process stops advancing it", run.run_id, exc)
    except BaseException as exc:
        step_err = exc if isinstance(exc, StepError) else StepError(run.step, exc)
        await _finish_failed(run, step_err)
    finally:
        run.finished = True
        engine.forget(run)
        for fut in run.watchers:
            if not fut.done():
                fut.set_result(None)
        run.watchers.clear()


async def _finish_failed(run: LiveRun, err: StepError) -> None:
    if isinstance(err.error, BranchFailed):
        # Report the branch's own error; the branch is named in the message and the info.
        cause = err.error.error
        info = _error_info(err.step, cause)
        info["message"] = f"branch {err.error.name!r}: {info['message']}"
        info["branch"] = err.error.name
    else:
        info = _error_info(err.step, err.error)
    run.status = RunStatus.FAILED
    run.event("step_failed", err.step, {"type": info["type"], "message": info["message"]})
    run.event("failed", err.step, {"type": info["type"], "message": info["message"]})
    try:
        await run.commit(
            Commit(fields={"status": RunStatus.FAILED, "error": info, "control": None}, release=True)
        )
    except (StoreError, LeaseLostError) as exc:
        # The store is out of reach: the run stays at its last commit, recoverable later.
        log.error("run %s: could not record its failure (%s): %s", run.run_id, info["message"], exc)
        run.failure = err.error if isinstance(err.error, StoreError) else exc


async def _finish_stopped(run: LiveRun) -> None:
    run.status = RunStatus.STOPPED
    run.event("stopped", run.step)
    try:
        await asyncio.shield(
            run.commit(Commit(fields={"status": RunStatus.STOPPED, "control": None}, release=True))
        )
    except (StoreError, LeaseLostError) as exc:
        log.error("run %s: could not record its stop: %s", run.run_id, exc)


async def _release_quietly(run: LiveRun) -> None:
    try:
        await asyncio.shield(run.commit(Commit(release=True)))
    except (StoreError, LeaseLostError, asyncio.CancelledError):
        pass


# -- the flow interpreter ------------------------------------------------------


async def advance_flow(run: LiveRun) -> None:
    """Execute steps until the run completes, waits, pauses or stops."""
    spec = run.spec
    steps = spec.steps
    engine = run.engine
    store = engine.store
    max_steps = spec.max_steps
    run_id = run.run_id
    while True:
        name = run.step
        fn = steps[name]
        run.visit += 1
        visit = run.visit
        if visit > max_steps:
            raise StepError(
                name,
                StepLimitExceeded(
                    f"run {run_id}: more than {max_steps} steps (at step {name!r}); "
                    "a loop that never ends? raise the guard with .max_steps(n)"
                ),
            )
        ctx = StepContext(run, name, visit)
        try:
            if fn.retry is None and fn.timeout is None:
                ret = fn.fn(ctx)
                if fn.is_async or (type(ret) is not str and asyncio.iscoroutine(ret)):
                    ret = await ret
            else:
                ret = await invoke(fn, ctx, functools.partial(_retrying, run, name))
        except (asyncio.CancelledError, _Stop, LeaseLostError, StoreError):
            raise
        except Exception as exc:
            raise StepError(name, exc) from exc
        finally:
            if ctx._agents is not None:
                await ctx._agents.close_all()
        if type(ret) is str and ret in steps and not run.pause_requested and not run.step_usage.total_tokens:
            # The common case (go to another step), kept lean: it is most of a run's time.
            fields: dict[str, Any] = {"step": ret, "visit": visit}
            if ctx._state is not run.state:
                run.state = fields["state"] = ctx._state
            seq = run.event_seq
            run.event_seq = seq + 2
            now = time.time()
            events = run.outbox
            events.append(RunEvent("step_completed", run_id, name, None, now, seq + 1))
            events.append(RunEvent("step_started", run_id, ret, None, now, seq + 2))
            run.outbox = []
            run.step = ret
            control = await store.commit(run_id, run.lease, Commit(fields, [], events, {}, False))
            if engine.waiters:
                engine.notify(run_id)
            if control is not None:
                await _obey(run, control)
                if run.status is not RunStatus.RUNNING:
                    return
            continue
        await _apply(run, fn, name, ctx, ret)
        if run.status is not RunStatus.RUNNING:
            return
        if engine.stopping:
            return


def _retrying(run: LiveRun, step: str, attempt: int, exc: BaseException) -> None:
    run.event(
        "step_failed",
        step,
        {"attempt": attempt, "type": type(exc).__name__, "message": str(exc), "retry": True},
    )
    run.engine.notify(run.run_id)


def _target(run: LiveRun, name: str, target: Any) -> str:
    if target == END or target in run.spec.steps:
        return str(target)
    if not isinstance(target, str):
        raise TypeError(f"run {run.run_id}: step {name!r} gave a target {target!r}; a step name is a str")
    known = sorted(s for s in run.spec.steps if s != START)
    raise UnknownStepError(
        f"run {run.run_id}: step {name!r} returned {target!r}, which is not a step; known steps: {known}"
    )


async def _apply(run: LiveRun, fn: StepFunction, name: str, ctx: StepContext, ret: Any) -> None:
    """Turn what a step returned into the run's next commit."""
    spec = run.spec
    output: Any = None
    outputs: list[OutputRecord] = []
    tret = type(ret)
    try:
        if tret is str:
            target = _target(run, name, ret)
        elif tret is Next:
            target = _target(run, name, ret.target)
            output = step_output(fn, name, run.run_id, ret.output)
        elif isinstance(ret, Wait):
            for t in (ret.target, ret.on_reject, ret.on_timeout):
                if t is not None:
                    _target(run, name, t)
            return await _wait(run, name, ctx, ret.gate, ret)
        elif isinstance(ret, Parallel):
            target = _target(run, name, ret.target)
            state, outputs = await run_parallel(run, name, ctx, ret)
            ctx._state = state
        else:
            raise TypeError(
                f"run {run.run_id}: step {name!r} returned {ret!r}; a step returns a step name, END, "
                "Next(target, output=...), Wait(...) or Parallel(...)"
            )
        final = run_output(spec, run.run_id, output) if target == END else None
    except (asyncio.CancelledError, _Stop, LeaseLostError, StoreError, StepError):
        raise
    except Exception as exc:
        raise StepError(name, exc) from exc

    fields: dict[str, Any] = {"step": target, "visit": run.visit}
    if ctx._state is not run.state:
        run.state = ctx._state
        fields["state"] = ctx._state
    if output is not None:
        outputs.append(OutputRecord(run.visit, name, output))
    for rec in outputs:
        run.results[rec.step] = rec.value
        run.history.setdefault(rec.step, []).append(rec.value)
    if outputs:
        outputs = [OutputRecord(o.visit, o.step, encode_branch(o.value)) for o in outputs]
    usage = run.step_usage
    run.event("step_completed", name, {"usage": usage.to_json()} if usage.total_tokens else None)
    run.step_usage = Usage()
    release = False
    if target == END:
        fields["status"] = RunStatus.COMPLETED
        fields["output"] = run.output = final
        fields["control"] = None
        run.event("completed", None)
        run.status = RunStatus.COMPLETED
        release = True
    elif run.pause_requested:
        fields["status"] = RunStatus.PAUSED
        fields["control"] = None
        run.event("paused", target)
        run.status = RunStatus.PAUSED
        release = True
    else:
        run.event("step_started", target)
    run.step = target
    control = await run.commit(Commit(fields=fields, outputs=outputs, release=release))
    if control is not None and run.status is RunStatus.RUNNING:
        await _obey(run, control)


async def _obey(run: LiveRun, control: str) -> None:
    """Act on a control flag another process set."""
    if control == "stop":
        raise _Stop()
    if control == "pause":
        run.status = RunStatus.PAUSED
        run.event("paused", run.step)
        await run.commit(Commit(fields={"status": RunStatus.PAUSED, "control": None}, release=True))


async def _wait(run: LiveRun, name: str, ctx: StepContext, gate: Gate, wait: Wait | None) -> None:
    pending = pending_gate(wait, gate, name, run.visit, run.spec.name)
    fields: dict[str, Any] = {
        "status": RunStatus.WAITING,
        "pending": pending,
        "step": name,
        "visit": run.visit,
    }
    if ctx._state is not run.state:
        run.state = ctx._state
        fields["state"] = ctx._state
    run.event("step_completed", name)
    run.event(
        "waiting", name, {k: pending[k] for k in ("approvers", "quorum", "prompt", "context", "deadline")}
    )
    run.status = RunStatus.WAITING
    await run.commit(Commit(fields=fields, release=True))
    if pending["deadline"] is not None:
        run.engine.watch_deadlines()


# -- parallel ------------------------------------------------------------------


def new_record(
    spec: WorkflowSpec, run_id: str, inp: Any, state: Any, lease: Lease, lease_ttl: float
) -> RunRecord:
    """The record of a run about to start, owned by ``lease``."""
    now = time.time()
    return RunRecord(
        run_id=run_id,
        workflow=spec.name,
        status=RunStatus.RUNNING,
        input=inp,
        state=state,
        step=START,
        created_at=now,
        updated_at=now,
        lease_owner=lease.owner,
        lease_token=lease.token,
        lease_expires=now + lease_ttl,
    )
