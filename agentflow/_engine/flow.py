"""The flow interpreter: execute steps of a ``.flow({...})`` workflow until the run parks or ends.

The ``step_started`` event of a step is committed together with the completion of the
step before it, so a running record always names the step in flight.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .. import tracing
from ..definition.compose import Run
from ..definition.gates import Wait
from ..definition.parallel import Parallel
from ..definition.steps import END, START, Next, StepFunction
from ..errors import LeaseLostError, StepLimitExceeded, StoreError, UnknownStepError, redact
from ..stores.contract import Commit, OutputRecord
from ..types import NO_USAGE, RunEvent, RunStatus
from .advance import complete_step
from .compose import Spawned, resume_children, spawn, wait_of, wait_on
from .context import Frame, StepContext
from .fanout import run_parallel
from .gates import park
from .history import state_delta
from .invoke import invoke
from .run import _YIELD_EVERY, LiveRun, StepError, Stop
from .values import run_output, step_output

__all__ = ["advance_flow", "obey"]

# A RunEvent from a tuple of its fields, without the Python-level ``__new__`` call.
_event = RunEvent._make


async def advance_flow(run: LiveRun) -> None:
    """Execute steps until the run completes, waits, pauses or stops."""
    spec = run.spec
    steps = spec.steps
    kernel = run.kernel
    store = kernel.store
    max_steps = spec.max_steps
    run_id = run.run_id
    attempts = run.journal.get("attempts")  # of steps that failed before a retry
    seg = tracing.current()  # None when not traced: then no step pays for tracing
    if run.resolving is not None:
        # Back from a wait on child runs that ended: the step that started them completes.
        control = await resume_children(run)
        if control is not None:
            await obey(run, control)
        if run.status is not RunStatus.RUNNING or kernel.stopping:
            return
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
        frame = Frame(run.state)
        ctx: StepContext[Any, Any] = StepContext(run, name, visit, frame)
        if attempts:
            ctx.attempt += attempts.get(f"{visit}:{name}", 0)
        span = seg.step(name, visit, ctx.attempt) if seg is not None else None
        try:
            if fn.plain:
                ret = fn.fn(ctx)
                if fn.is_async or (type(ret) is not str and asyncio.iscoroutine(ret)):
                    ret = await ret
            else:
                ret = await invoke(fn, (ctx,), frame, _retry_events(run, name), ctx)
        except (asyncio.CancelledError, Stop, LeaseLostError, StoreError):
            raise
        except Exception as exc:
            if span is not None:
                span.end("failed", ctx.attempt, error=exc)
            raise StepError(name, exc, ctx.attempt, f"{visit}:{name}") from exc
        finally:
            if frame.agents is not None:
                await frame.close_agents()
        if (
            type(ret) is str
            and ret in steps
            and not run.pause_requested
            and not run.stop_requested
            and run.step_usage is NO_USAGE
        ):
            # The common case (go to another step), kept lean: it is most of a run's time.
            fields: dict[str, Any] = {"step": ret, "visit": visit}
            done = None
            if frame.state is not run.state:
                done = {"state": state_delta(run.state, frame.state)}  # what fork() replays
                run.state = fields["state"] = frame.state
            seq = run.event_seq
            run.event_seq = seq + 2
            now = time.time()
            events = run.outbox
            events.append(_event(("step_completed", run_id, name, done, now, seq + 1)))
            events.append(_event(("step_started", run_id, ret, None, now, seq + 2)))
            run.outbox = []
            run.step = ret
            run.commit_seq += 1  # used up even if the commit is cancelled in flight (see LiveRun.commit)
            commit = Commit(fields, [], events, {}, False, run.commit_seq)
            try:
                control = await store.commit(run_id, run.lease, commit)
            except StoreError as exc:
                if isinstance(exc, LeaseLostError):
                    raise
                # The slow path retries through the outage under the same seq.
                run.outbox = []
                control = await run._commit_through_outage(commit, exc)
            if kernel.waiters:
                kernel.notify(run_id)
            if span is not None:
                span.end("next", ctx.attempt, ret)
            if control is not None:
                await obey(run, control)
                if run.status is not RunStatus.RUNNING:
                    return
            if kernel.stopping:
                return
            if not commit.seq & _YIELD_EVERY:
                await asyncio.sleep(0)  # as LiveRun.commit does
            continue
        try:
            await _apply(run, fn, name, frame, ret)
        except StepError as err:
            if err.at is None:  # what the step returned failed it: its attempt counts too
                err.attempt, err.at = ctx.attempt, f"{visit}:{name}"
            if span is not None:
                span.end("failed", ctx.attempt, error=err.error)
            raise
        if span is not None:
            outcome, target = _outcome(ret)
            span.end(outcome, ctx.attempt, target)
        if run.status is not RunStatus.RUNNING or kernel.stopping:
            return


def _outcome(ret: Any) -> tuple[str, str | None]:
    """What a step's return did, for its span: the outcome and the step it named."""
    target = ret if type(ret) is str else getattr(ret, "target", None)
    if isinstance(ret, Wait):
        return "wait", target
    if isinstance(ret, Parallel):
        return "parallel", target
    if isinstance(ret, Run):
        return "run", target
    return ("end" if target == END else "next"), target


def _retry_events(run: LiveRun, step: str) -> Any:
    def on_retry(attempt: int, exc: BaseException) -> None:
        data = {"attempt": attempt, "type": type(exc).__name__, "message": redact(str(exc)), "retry": True}
        run.emit("step_failed", step, data)

    return on_retry


def _target(run: LiveRun, name: str, target: Any) -> str:
    if target == END or (target in run.spec.steps and target != START):
        return str(target)
    if not isinstance(target, str):
        raise TypeError(f"run {run.run_id}: step {name!r} gave a target {target!r}; a step name is a str")
    known = sorted(s for s in run.spec.steps if s != START)
    raise UnknownStepError(
        f"run {run.run_id}: step {name!r} returned {target!r}, which is not a step; known steps: {known}"
    )


async def _apply(run: LiveRun, fn: StepFunction, name: str, frame: Frame, ret: Any) -> None:
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
            if run.stop_requested:
                raise Stop()
            return await park(run, name, frame, ret.gate, ret)
        elif isinstance(ret, Parallel):
            target = _target(run, name, ret.target)
            try:
                frame.state, outputs = await run_parallel(run, name, frame, ret)
            except Spawned as sp:
                # Some branches started child runs: the join waits for them, parked.
                pending = wait_of(run, name, sp.refs, target, join=sp.join)
                control = await wait_on(run, frame, pending, sp.journal)
                if control is not None:
                    await obey(run, control)
                return
        elif isinstance(ret, Run):
            for t in (ret.target, ret.on_fail, ret.on_reject):
                if t is not None:
                    _target(run, name, t)
            if run.stop_requested:
                raise Stop()
            ref = await spawn(run, name, run.visit, ret)
            pending = wait_of(run, name, [ref], ret.target, ret.on_fail, ret.on_reject)
            control = await wait_on(run, frame, pending)
            if control is not None:
                await obey(run, control)
            return
        else:
            raise TypeError(
                f"run {run.run_id}: step {name!r} returned {ret!r}; a step returns a step name, END, "
                "Next(target, output=...), Wait(...), Parallel(...) or Run(...)"
            )
        final = run_output(spec, run.run_id, output) if target == END else None
    except (asyncio.CancelledError, Stop, LeaseLostError, StoreError, StepError):
        raise
    except Exception as exc:
        raise StepError(name, exc) from exc
    if run.stop_requested:
        raise Stop()

    control = await complete_step(run, name, target, frame.state, output, outputs, final)
    if control is not None and run.status is RunStatus.RUNNING:
        await obey(run, control)


async def obey(run: LiveRun, control: str) -> None:
    """Act on a control flag another process set (the run is between steps)."""
    if control == "stop":
        run.stop_requested = True
        raise Stop()
    if control == "pause":
        await pause_here(run)


async def pause_here(run: LiveRun) -> None:
    """Park the run as ``paused`` at its next step (it is between steps)."""
    run.status = RunStatus.PAUSED
    run.event("paused", run.step)
    await run.commit(Commit(fields={"status": RunStatus.PAUSED, "control": None}, release=True))
