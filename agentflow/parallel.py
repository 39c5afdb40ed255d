"""Parallel steps: ``Parallel([...], target)`` and ``Parallel.map(fn, items, target)``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from .context import StepContext, validate_state
from .errors import WorkflowDefinitionError
from .records import Commit, OutputRecord
from .steps import StepFunction, as_step, invoke

if TYPE_CHECKING:
    from .engine import LiveRun

__all__ = ["BranchContext", "BranchError", "BranchFailed", "Parallel", "run_branches", "run_parallel"]

OnError = Literal["fail", "collect"]

#: Reserved key marking a stored BranchError (stored outputs are plain JSON).
_ERROR_TAG = "__agentflow_branch_error__"


@dataclass(frozen=True, slots=True)
class BranchError:
    """The result of a branch that failed under ``on_error="collect"``."""

    name: str
    error_type: str
    message: str

    def to_json(self) -> dict[str, Any]:
        """The stored form."""
        return {_ERROR_TAG: True, "name": self.name, "error_type": self.error_type, "message": self.message}

    @staticmethod
    def is_stored(value: Any) -> bool:
        """True when ``value`` is the stored form of a BranchError."""
        return type(value) is dict and value.get(_ERROR_TAG) is True

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> BranchError:
        """Read the stored form back."""
        return cls(str(value["name"]), str(value["error_type"]), str(value["message"]))


class BranchFailed(Exception):
    """Internal: a branch failed under ``on_error="fail"``; carries the branch name."""

    def __init__(self, name: str, error: BaseException) -> None:
        super().__init__(f"branch {name!r} failed: {type(error).__name__}: {error}")
        self.name = name
        self.error = error


class Parallel:
    """Run branch callables concurrently, then go to ``target``.

    A branch is a callable of ctx returning its output. Each output lands in
    ``ctx.step_results`` under the function's name, or the key when ``branches`` is a
    dict. Branch ``set_state`` calls are applied at the join, in declared order.

    Args:
        branches: callables, or a dict name → callable.
        target: the step to go to once every branch finished.
        max_concurrency: how many branches run at once (all when None).
        on_error: ``"fail"``: the first failure cancels the siblings and fails the run;
            ``"collect"``: every branch runs, a failure's result is a :class:`BranchError`.
    """

    __slots__ = ("branches", "items", "map_name", "max_concurrency", "on_error", "target")

    def __init__(
        self,
        branches: Sequence[Callable[..., Any]] | Mapping[str, Callable[..., Any]],
        target: str,
        max_concurrency: int | None = None,
        on_error: OnError = "fail",
    ) -> None:
        if isinstance(branches, Mapping):
            named = {str(k): as_step(v, f"parallel branch {k!r}") for k, v in branches.items()}
        else:
            named = {}
            for fn in branches:
                spec = as_step(fn, "a parallel branch")
                if spec.name in named or spec.name == "<lambda>":
                    raise WorkflowDefinitionError(
                        f"parallel branch name {spec.name!r} is not unique; pass a dict {{name: fn}}"
                    )
                named[spec.name] = spec
        self.branches: dict[str, StepFunction] = named
        self.target = target
        self.max_concurrency = _check(max_concurrency, on_error)
        self.on_error: OnError = on_error
        self.map_name: str | None = None
        self.items: list[Any] | None = None
        if not named:
            raise WorkflowDefinitionError("Parallel needs at least one branch")

    @classmethod
    def map(
        cls,
        fn: Callable[..., Any],
        items: Iterable[Any],
        target: str,
        max_concurrency: int | None = None,
        on_error: OnError = "fail",
    ) -> Parallel:
        """One branch per item (``ctx.item`` inside); results as a list in item order under ``fn``'s name."""
        spec = as_step(fn, "Parallel.map's function")
        self = cls.__new__(cls)
        self.branches = {spec.name: spec}
        self.target = target
        self.max_concurrency = _check(max_concurrency, on_error)
        self.on_error = on_error
        self.map_name = spec.name
        self.items = list(items)
        return self

    def __repr__(self) -> str:
        what = (
            f"map {self.map_name} over {len(self.items or [])} items"
            if self.map_name
            else list(self.branches)
        )
        return f"Parallel({what}, {self.target!r})"


def _check(max_concurrency: int | None, on_error: str) -> int | None:
    if max_concurrency is not None and max_concurrency < 1:
        raise WorkflowDefinitionError(f"max_concurrency must be at least 1, got {max_concurrency}")
    if on_error not in ("fail", "collect"):
        raise WorkflowDefinitionError(f"on_error must be 'fail' or 'collect', got {on_error!r}")
    return max_concurrency


async def run_branches(
    calls: Sequence[tuple[str, Callable[[], Awaitable[Any]]]],
    max_concurrency: int | None,
    fail_fast: bool,
) -> list[Any]:
    """Await each call concurrently; results (or exceptions, when not ``fail_fast``) in order.

    With ``fail_fast`` the first exception cancels the others and raises
    :class:`BranchFailed`. No task outlives the call.
    """
    n = len(calls)
    results: list[Any] = [None] * n
    if n == 0:
        return results
    limit = n if max_concurrency is None else min(max_concurrency, n)
    failure: list[BranchFailed] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < n and not failure:
            i = next_index
            next_index += 1
            name, call = calls[i]
            try:
                results[i] = await call()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if fail_fast:
                    failure.append(BranchFailed(name, exc))
                    for t in tasks:
                        if t is not asyncio.current_task():
                            t.cancel()
                    return
                results[i] = exc

    tasks = [asyncio.ensure_future(worker()) for _ in range(limit)]
    try:
        await asyncio.gather(*tasks, return_exceptions=True)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    if failure:
        raise failure[0]
    return results


class BranchContext(StepContext):
    """A branch's ctx: its own view of the state; its updates are applied at the join."""

    __slots__ = ("journal_scope", "updates")

    def __init__(self, run: LiveRun, name: str, visit: int, item: Any, scope: str) -> None:
        super().__init__(run, name, visit, item)
        self.journal_scope = scope
        self.updates: dict[str, Any] = {}

    async def _begin_attempt(self, attempt: int) -> None:
        await super()._begin_attempt(attempt)
        if attempt > 1:
            self.updates = {}

    def set_state(self, updates: Any = None, /, **fields: Any) -> None:
        super().set_state(updates, **fields)
        if isinstance(updates, BaseModel):
            self.updates.update({k: getattr(updates, k) for k in updates.model_fields_set})
        else:
            self.updates.update(updates or {})
        self.updates.update(fields)


async def run_parallel(
    run: LiveRun, name: str, ctx: StepContext, par: Parallel, prefix: str | None = None
) -> tuple[Any, list[OutputRecord]]:
    """Run the branches, checkpointing each finished one; return the joined state and outputs.

    Finished branches are written to the journal in batches (group commit) while the
    others run, so after a crash only unfinished branches run again.
    """
    from .values import decode_output, step_output  # values imports this module

    spec = run.spec
    visit = run.visit
    journal = run.journal
    prefix = prefix if prefix is not None else f"p:{visit}:"
    if par.items is not None:
        assert par.map_name is not None
        mfn = par.branches[par.map_name]
        jobs = [
            (par.map_name, f"{par.map_name}[{i}]", f"{prefix}{par.map_name}:{i}", mfn, item)
            for i, item in enumerate(par.items)
        ]
    else:
        jobs = [(bname, bname, f"{prefix}{bname}", fn, None) for bname, fn in par.branches.items()]

    done: dict[str, Any] = {}
    batch: dict[str, Any] = {}
    wake = asyncio.Event()
    finished = False

    async def flusher() -> None:
        while True:
            await wake.wait()
            wake.clear()
            if batch:
                entries = dict(batch)
                batch.clear()
                await run.commit(Commit(journal=entries))
            if finished and not batch:
                return

    def make(oname: str, key: str, fn: StepFunction, item: Any) -> Callable[[], Any]:
        async def call() -> Any:
            bctx = BranchContext(run, oname, visit, item, key)
            bctx._state = ctx._state
            try:
                if fn.retry is None and fn.timeout is None:
                    out = fn.fn(bctx)
                    if fn.is_async or asyncio.iscoroutine(out):
                        out = await out
                else:
                    out = await invoke(fn, bctx)
                out = step_output(fn, oname, run.run_id, out)
            finally:
                if bctx._agents is not None:
                    await bctx._agents.close_all()
            entry = {"output": out, "updates": bctx.updates}
            done[key] = entry
            batch[key] = entry
            wake.set()
            return entry

        return call

    calls = []
    call_keys = []
    for oname, label, key, fn, item in jobs:
        stored = journal.get(key)
        if stored is not None:
            done[key] = {"output": decode_output(spec, oname, stored["output"]), "updates": stored["updates"]}
        else:
            calls.append((label, make(oname, key, fn, item)))
            call_keys.append(key)

    flush_task = asyncio.ensure_future(flusher())
    try:
        results = await run_branches(calls, par.max_concurrency, par.on_error == "fail")
    except BaseException:
        flush_task.cancel()
        await asyncio.gather(flush_task, return_exceptions=True)
        raise
    finished = True
    wake.set()
    await flush_task
    journal.update(done)
    errors = {k: r for k, r in zip(call_keys, results, strict=True) if isinstance(r, BaseException)}
    state = ctx._state
    model = spec.state_model
    values: list[Any] = []
    for _oname, label, key, _fn, _item in jobs:
        exc = errors.get(key)
        if exc is not None:
            values.append(BranchError(label, type(exc).__name__, str(exc)))
            continue
        entry = done[key]
        values.append(entry["output"])
        if entry["updates"] and model is not None:
            state = validate_state(model, state, entry["updates"], f"run {run.run_id}, join of {name!r}")
    if par.items is not None:
        assert par.map_name is not None
        outputs = [OutputRecord(visit, par.map_name, values)]
    else:
        outputs = [OutputRecord(visit, job[0], v) for job, v in zip(jobs, values, strict=True)]
    return state, outputs
