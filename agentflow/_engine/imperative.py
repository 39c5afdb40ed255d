"""Imperative mode: ``Workflow(...).execute(fn)``.

``fn(ctx)`` is re-run from the top whenever the run resumes (after a gate, a pause or
a crash). Each ``ctx.step``, ``ctx.parallel`` and ``ctx.wait`` takes the next position
in the run's journal; on replay a finished position returns its journaled result
without running again, and a position asked for under another name raises
``NonDeterminismError``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .. import tracing
from ..definition.compose import Run
from ..definition.gates import Gate, Sleep, Wait
from ..definition.parallel import BranchError, OnError, Parallel
from ..definition.steps import StepFunction, as_step
from ..definition.workflow import Workflow
from ..errors import NonDeterminismError, StepLimitExceeded
from ..stores.contract import Commit, OutputRecord
from ..types import Decision, RunStatus, utc
from .compose import park_children, replace_stopped, wait_again, wait_of
from .compose_outcome import ChildOutcome, ended_here, read_children
from .compose_spawn import Spawned, spawn
from .context import Frame, StepContext
from .fanout import run_parallel
from .gates import park
from .invoke import invoke
from .run import LiveRun, StepError, Suspend
from .values import decode_output, normalize, run_output

__all__ = ["ImperativeContext", "advance_imperative"]


class ImperativeContext(StepContext[Any, Any]):
    """``ctx`` of an ``.execute(fn)`` workflow: adds ``step``, ``parallel``, ``wait`` and ``run``."""

    __slots__ = ("_decisions", "_seq", "child_failure")

    def __init__(self, run: LiveRun, name: str, frame: Frame, decisions: dict[str, Decision]) -> None:
        super().__init__(run, name, run.visit, frame)
        self._seq = 0
        self._decisions = decisions
        # The error the last ctx.run raised for its child's ending, and the wait on that
        # child: when it fails the run, the wait is kept for a retry.
        self.child_failure: tuple[BaseException, dict[str, Any]] | None = None

    def _next(self, kind: str, name: str) -> tuple[str, Any]:
        self._seq += 1
        key = f"x:{self._seq}"
        entry = self._run.journal.get(key)
        if entry is not None and (entry.get("kind"), entry.get("name")) != (kind, name):
            raise NonDeterminismError(
                f"run {self.run_id}: replay asked for {kind} {name!r} at position {self._seq}, but the "
                f"journal holds {entry.get('kind')} {entry.get('name')!r} there; code between ctx.step "
                "calls must be deterministic"
            )
        return key, entry

    def _count(self, what: str) -> None:
        run = self._run
        run.visit += 1
        self.visit = run.visit
        if run.visit > run.spec.max_steps:
            raise StepLimitExceeded(f"run {run.run_id}: more than {run.spec.max_steps} steps (at {what!r})")

    def _replayed(self, entry: dict[str, Any]) -> None:
        """Back at a finished position: the state is what it was when that position finished.

        The state is re-built from the initial state on replay, so without this a
        ``set_state`` inside a journaled call (which does not run again) would be lost.
        """
        model = self._run.spec.state_model
        if model is not None and entry.get("state") is not None:
            self._frame.state = model.model_validate(entry["state"])

    async def _record(
        self, key: str, entry: dict[str, Any], name: str, value: Any, extra: dict[str, Any] | None = None
    ) -> None:
        run = self._run
        state = self._frame.state
        if run.spec.state_model is not None:
            entry["state"] = state
        run.journal[key] = entry
        run.results[name] = value
        run.history.setdefault(name, []).append(value)
        fields: dict[str, Any] = {"visit": run.visit, **(extra or {})}
        if state is not run.state:
            run.state = state
            fields["state"] = state
        run.event("step_completed", name)
        release = False
        if run.pause_requested:
            fields.update(status=RunStatus.PAUSED, control=None)
            run.event("paused", name)
            run.status = RunStatus.PAUSED
            release = True
        await run.commit(
            Commit(
                fields=fields,
                outputs=[OutputRecord(run.visit, name, value)],
                journal={key: entry},
                release=release,
            )
        )
        if release:
            raise Suspend()

    async def step(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` once for this run, journaled under ``name``.

        On replay the journaled result comes back (typed, when ``fn`` was declared with
        ``step(output=Model)``) and ``fn`` does not run.
        """
        key, entry = self._next("step", name)
        spec = as_step(fn, f"ctx.step({name!r}, ...)")
        if entry is not None:
            self._replayed(entry)
            value = _typed(spec, entry["value"])
            # The model is known here, not from the store: results see it typed again.
            self._run.results[name] = value
            return value
        self._count(name)
        run = self._run
        run.event("step_started", name)
        frame = self._frame
        frame.base = frame.state
        attempts = run.journal.get("attempts")
        self.attempt = 1 + (attempts.get(key, 0) if attempts else 0)
        seg = tracing.current()
        span = seg.step(name, run.visit, self.attempt) if seg is not None else None
        try:
            value = await invoke(spec, args, frame, ctx=self, kwargs=kwargs)
            if spec.output is not None and value is not None and not isinstance(value, spec.output):
                value = spec.output.model_validate(value)
            elif spec.output is None:
                value = normalize(value, f"run {self.run_id}, ctx.step({name!r})")
        except (asyncio.CancelledError, Suspend):
            raise
        except Exception as exc:
            if span is not None:
                span.end("failed", self.attempt, error=exc)
            raise StepError(name, exc, self.attempt, key) from exc
        if span is not None:
            span.end("done", self.attempt)
        await self._record(key, {"kind": "step", "name": name, "value": value}, name, value)
        return value

    async def parallel(
        self,
        branches: Sequence[Callable[..., Any]] | Mapping[str, Callable[..., Any]],
        *,
        max_concurrency: int | None = None,
        on_error: OnError = "fail",
    ) -> list[Any] | dict[str, Any]:
        """Run branch callables of ctx concurrently; results in order (a dict for a dict).

        Finished branches are journaled one by one, so a crash re-runs only unfinished ones.
        """
        par = Parallel(branches, "__join__", max_concurrency, on_error)
        label = "parallel:" + ",".join(par.branches)
        key, entry = self._next("parallel", label)
        if entry is not None:
            self._replayed(entry)
            values = [
                decode_output(self._run.spec, n, v) for n, v in zip(par.branches, entry["value"], strict=True)
            ]
        else:
            self._count(label)
            try:
                state, outputs = await run_parallel(self._run, label, self._frame, par, prefix=f"{key}:")
            except (asyncio.CancelledError, Suspend):
                raise
            except Spawned:
                raise StepError(
                    label,
                    TypeError(
                        f"run {self.run_id}: a branch of ctx.parallel returned Run(...); in imperative "
                        "code run a child with await ctx.run(child, input)"
                    ),
                ) from None
            except Exception as exc:
                raise StepError(label, exc) from exc
            self._frame.state = state
            values = [o.value for o in outputs]
            stored = [v.to_json() if isinstance(v, BranchError) else v for v in values]
            for o in outputs[:-1]:
                self._run.results[o.step] = o.value
            await self._record(
                key, {"kind": "parallel", "name": label, "value": stored}, outputs[-1].step, values[-1]
            )
        if isinstance(branches, Mapping):
            return dict(zip(par.branches, values, strict=True))
        return values

    async def wait(self, gate: Gate) -> Decision:
        """Park the run at ``gate`` (holding no task) and return the decision once made.

        A rejection or a timeout also returns: ``decision.approved`` is False then.
        ``ctx.wait(Sleep(...))`` returns once the timer fired: approved, by no one.
        """
        key, entry = self._next("wait", "gate")
        step = f"wait:{self._seq}"
        if isinstance(gate, Sleep):
            return await self._sleep(key, entry, step, gate)
        decision = self._decisions.get(step)
        if decision is not None:
            form = getattr(gate, "form", None)
            if form is not None and decision.approved and decision.data is not None:
                return dataclasses.replace(decision, data=form.model_validate(decision.data))
            return decision
        run = self._run
        run.visit += 1
        main = run.spec.main
        assert main is not None
        await park(run, step, self._frame, gate, Wait(gate, main.name, main.name, main.name))
        raise Suspend()

    async def _sleep(self, key: str, entry: dict[str, Any] | None, step: str, gate: Sleep) -> Decision:
        """A durable timer: its due time is journaled with the park, so a replay knows it fired."""
        now = time.time()
        until = entry.get("until") if entry is not None else None
        if isinstance(until, int | float) and until <= now:
            return Decision(approved=True, by=None, comment="timer fired", at=utc(until))
        if not isinstance(until, int | float):
            entry, until = {"kind": "wait", "name": "gate", "until": now + gate.seconds}, now + gate.seconds
        run = self._run
        run.visit += 1
        main = run.spec.main
        assert main is not None
        left = Sleep(max(0.001, until - now))
        await park(run, step, self._frame, left, Wait(left, main.name), journal={key: entry})
        run.journal[key] = entry
        raise Suspend()

    async def run(self, workflow: Workflow, input: Any = None) -> Any:
        """Run ``workflow`` as a child run and return its output (typed by its ``.output(Model)``).

        The parent parks (holding no task) until the child ends; on replay the child's
        journaled result comes back and no second child starts.

        Raises:
            RunFailedError: the child failed (naming the child run and its failing step).
            RunStoppedError: the child was stopped.
            RunRejectedError: the child ended rejected or expired at a gate.
            WorkflowDefinitionError: ``workflow`` is not one of this workflow's children.
        """
        if not isinstance(workflow, Workflow):
            raise TypeError(f"run {self.run_id}: ctx.run() takes a Workflow, got {workflow!r}")
        key, entry = self._next("run", workflow.name)
        step = f"run:{self._seq}"
        run = self._run
        pending = run.resolving
        parked = pending is not None and pending.get("step") == step
        if entry is not None and not parked:
            self._replayed(entry)
            return self._child_result(entry)
        if parked:
            run.resolving = None  # back from the wait: the child ended
        else:
            self._count(step)
            ref = await spawn(run, step, run.visit, Run(workflow, input))
            main = run.spec.main
            assert main is not None
            pending = wait_of(run, step, [ref], main.name)
            if not await ended_here(run, [ref]):
                await park_children(run, self._frame, pending)
                raise Suspend()
        assert pending is not None
        refs = list(pending["children"])
        outcomes = await read_children(run, refs)
        if pending.get("retried"):  # a retry of the run: its journaled failure is not replayed
            refs, outcomes, _ = await replace_stopped(run, pending, refs, outcomes, None)
        (outcome,) = outcomes
        if outcome.going:
            await park_children(run, self._frame, wait_again(pending, refs))
            raise Suspend()
        extra: dict[str, Any] = {"pending": None} if parked else {}
        if outcome.usage.total_tokens:
            run.usage = run.usage + outcome.usage
            extra["usage"] = run.usage.to_json()
        entry = {"kind": "run", "name": workflow.name, "child": outcome.run_id}
        if outcome.ok:
            entry["value"] = outcome.value
        else:
            entry["error"] = outcome.to_json()
        run.spawned = []
        if outcome.run_id not in run.children:
            run.children = extra["children"] = (*run.children, outcome.run_id)
        await self._record(key, entry, workflow.name, outcome.value, extra)
        if not outcome.ok:
            exc = outcome.exception()
            self.child_failure = (exc, wait_again(pending, refs))
            raise exc
        return self._child_result(entry)

    def _child_result(self, entry: dict[str, Any]) -> Any:
        """A journaled child result: its output typed again, or its failure raised again."""
        if entry.get("error") is not None:
            raise ChildOutcome.from_json(entry["error"]).exception()
        try:
            spec = self._run.kernel.child_kernel(str(entry["name"])).spec
        except KeyError:
            return entry.get("value")
        return run_output(spec, str(entry.get("child")), entry.get("value"))


def _typed(spec: StepFunction, value: Any) -> Any:
    if spec.output is not None and value is not None and not isinstance(value, spec.output):
        return spec.output.model_validate(value)
    return value


async def advance_imperative(run: LiveRun) -> None:
    """Re-run the main function from the top, replaying its journal."""
    spec = run.spec
    main = spec.main
    assert main is not None
    # The record was read when the run was restored; its decisions come with it.
    decisions = {str(d["step"]): Decision.from_json(d) for d in run.decisions if d.get("step")}
    initial = spec.state_model.model_validate(spec.initial_state) if spec.state_model is not None else None
    frame = Frame(initial)
    ctx = ImperativeContext(run, main.name, frame, decisions)
    try:
        value = await main.fn(ctx)
    except Suspend:
        return
    except (asyncio.CancelledError, StepError):
        raise
    except Exception as exc:
        failed = ctx.child_failure
        wait = failed[1] if failed is not None and failed[0] is exc else None
        raise StepError(main.name, exc, wait=wait) from exc
    finally:
        await frame.close_agents()
    output = run.output = run_output(spec, run.run_id, value)
    fields: dict[str, Any] = {"status": RunStatus.COMPLETED, "output": output, "control": None}
    if frame.state is not run.state:
        run.state = frame.state
        fields["state"] = frame.state
    run.event("step_completed", main.name)
    run.event("completed", None)
    run.status = RunStatus.COMPLETED
    await run.commit(Commit(fields=fields, release=True))
