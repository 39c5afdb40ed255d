"""Imperative mode: ``Workflow(...).execute(fn)``.

``fn(ctx)`` is re-run from the top whenever the run resumes (after a gate, a pause or
a crash). Each ``ctx.step``, ``ctx.parallel`` and ``ctx.wait`` takes the next position
in the run's journal; on replay a finished position returns its journaled result
without running again, and a position asked for under another name raises
``NonDeterminismError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .context import StepContext
from .engine import LiveRun, StepError, _wait
from .errors import NonDeterminismError, StepLimitExceeded
from .gates import Gate, Wait
from .parallel import BranchError, OnError, Parallel, run_parallel
from .records import Commit, Decision, OutputRecord, RunStatus
from .steps import StepFunction, as_step
from .values import decode_output, run_output

__all__ = ["ImperativeContext", "advance_imperative"]


class _Suspend(BaseException):
    """Unwinds ``fn`` when the run parks (a gate or a pause); user code cannot catch it by accident."""


class ImperativeContext(StepContext):
    """``ctx`` of an ``.execute(fn)`` workflow: adds ``step``, ``parallel`` and ``wait``."""

    __slots__ = ("_decisions", "_seq")

    def __init__(self, run: LiveRun, name: str, decisions: dict[str, Decision]) -> None:
        super().__init__(run, name, run.visit)
        self._seq = 0
        self._decisions = decisions

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
            self._state = model.model_validate(entry["state"])

    async def _record(self, key: str, entry: dict[str, Any], name: str, value: Any) -> None:
        run = self._run
        if run.spec.state_model is not None:
            entry["state"] = self._state
        run.journal[key] = entry
        run.results[name] = value
        run.history.setdefault(name, []).append(value)
        fields: dict[str, Any] = {"visit": run.visit}
        if self._state is not run.state:
            run.state = self._state
            fields["state"] = self._state
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
            raise _Suspend()

    async def step(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` once for this run, journaled under ``name``.

        On replay the journaled result comes back (typed, when ``fn`` was declared with
        ``step(output=Model)``) and ``fn`` does not run.
        """
        key, entry = self._next("step", name)
        spec = as_step(fn, f"ctx.step({name!r}, ...)")
        if entry is not None:
            self._replayed(entry)
            return _typed(spec, entry["value"])
        self._count(name)
        run = self._run
        run.event("step_started", name)
        try:
            value = await _call(spec, args, kwargs, self)
            if spec.output is not None and value is not None and not isinstance(value, spec.output):
                value = spec.output.model_validate(value)
        except (asyncio.CancelledError, _Suspend):
            raise
        except Exception as exc:
            raise StepError(name, exc) from exc
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
                state, outputs = await run_parallel(self._run, label, self, par, prefix=f"{key}:")
            except (asyncio.CancelledError, _Suspend):
                raise
            except Exception as exc:
                raise StepError(label, exc) from exc
            self._state = state
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
        """
        self._next("wait", "gate")
        step = f"wait:{self._seq}"
        decision = self._decisions.get(step)
        if decision is not None:
            return decision
        run = self._run
        run.visit += 1
        main = run.spec.main
        assert main is not None
        await _wait(run, step, self, gate, Wait(gate, main.name, main.name, main.name))
        raise _Suspend()


def _typed(spec: StepFunction, value: Any) -> Any:
    if spec.output is not None and value is not None and not isinstance(value, spec.output):
        return spec.output.model_validate(value)
    return value


async def _call(spec: StepFunction, args: tuple[Any, ...], kwargs: dict[str, Any], ctx: StepContext) -> Any:
    async def once() -> Any:
        if spec.timeout is not None:
            async with asyncio.timeout(spec.timeout):
                if spec.is_async:
                    return await spec.fn(*args, **kwargs)
                res = await asyncio.to_thread(spec.fn, *args, **kwargs)
                return await res if asyncio.iscoroutine(res) else res
        out = spec.fn(*args, **kwargs)
        if spec.is_async or asyncio.iscoroutine(out):
            out = await out
        return out

    policy = spec.retry
    if policy is None:
        return await once()
    attempt = 0
    async for trial in policy.retrying():
        with trial:
            attempt += 1
            await ctx._begin_attempt(attempt)
            return await once()
    raise AssertionError("unreachable")  # pragma: no cover


async def advance_imperative(run: LiveRun) -> None:
    """Re-run the main function from the top, replaying its journal."""
    spec = run.spec
    main = spec.main
    assert main is not None
    # The record was read when the run was restored; its decisions come with it.
    decisions = {str(d["step"]): Decision.from_json(d) for d in run.decisions if d.get("step")}
    ctx = ImperativeContext(run, main.name, decisions)
    if spec.state_model is not None:
        ctx._state = spec.state_model.model_validate(spec.initial_state)
    try:
        value = await main.fn(ctx)
    except _Suspend:
        return
    except (asyncio.CancelledError, StepError):
        raise
    except Exception as exc:
        raise StepError(main.name, exc) from exc
    finally:
        if ctx._agents is not None:
            await ctx._agents.close_all()
    output = run.output = run_output(spec, run.run_id, value)
    fields: dict[str, Any] = {"status": RunStatus.COMPLETED, "output": output, "control": None}
    if ctx._state is not run.state:
        run.state = ctx._state
        fields["state"] = ctx._state
    run.event("step_completed", main.name)
    run.event("completed", None)
    run.status = RunStatus.COMPLETED
    await run.commit(Commit(fields=fields, release=True))
