"""Parallel branches: run them under a task group, checkpoint each finished one, join.

Finished branches are written to the journal in batches (group commit) while the
others run, so after a crash only unfinished branches run again; when a branch fails
under ``on_error="fail"``, the branches that finished before it are written before the
failure propagates, so a retry runs only the unfinished ones, and the child runs
that branches started are stopped (a retry starts new ones in their place). Every
task lives in an ``asyncio.TaskGroup``: a failure or a cancellation leaves none behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from collections.abc import Coroutine as CoroutineABC
from typing import TYPE_CHECKING, Any

from ..definition.compose import Run
from ..definition.parallel import BranchError, Parallel
from ..definition.steps import StepFunction
from ..stores.contract import Commit, OutputRecord
from .compose_spawn import Spawned, spawn
from .context import Frame, StepContext, validate_state
from .invoke import invoke
from .values import decode_output, step_output

if TYPE_CHECKING:
    from .run import LiveRun

__all__ = ["BranchFailed", "run_branches", "run_parallel", "unwrap"]


class BranchFailed(Exception):
    """Internal: a branch failed under ``on_error="fail"``; carries the branch name."""

    def __init__(self, name: str, error: BaseException) -> None:
        super().__init__(f"branch {name!r} failed: {type(error).__name__}: {error}")
        self.name = name
        self.error = error


def unwrap(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (the error that cancelled the rest)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class _Resumed(CoroutineABC[Any, Any, None]):
    """A started coroutine, suspended on ``yielded``, handed to a task to go on.

    The task's first step gets ``yielded`` back (the awaitable the coroutine waits on);
    every later send or throw — a cancellation included, even one that comes before
    the task's first step — reaches the coroutine itself.
    """

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, None], yielded: Any) -> None:
        self._coro = coro
        self._first: list[Any] | None = [yielded]

    def send(self, value: Any) -> Any:
        first = self._first
        if first is not None:
            self._first = None
            return first[0]
        return self._coro.send(value)

    def throw(self, exc: Any, *args: Any) -> Any:
        self._first = None
        return self._coro.throw(exc, *args)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, None]:
        raise TypeError("a resumed branch is driven by its task, not awaited")


async def run_branches(
    calls: Sequence[tuple[str, Callable[[], Awaitable[Any]]]],
    max_concurrency: int | None,
    fail_fast: bool,
) -> list[Any]:
    """Await each call concurrently; results (or exceptions, when not ``fail_fast``) in order.

    With ``fail_fast`` the first exception cancels the others and raises
    :class:`BranchFailed`. Without a concurrency limit each branch starts at once, in
    the caller's task: one that finishes without waiting on anything needs no task of
    its own (most of the cost of a wide fan-out of quick branches); one that waits goes
    on in a task of the group.
    """
    n = len(calls)
    results: list[Any] = [None] * n
    if n == 0:
        return results

    async def branch(i: int) -> None:
        name, call = calls[i]
        try:
            results[i] = await call()
        except Exception as exc:
            if fail_fast:
                raise BranchFailed(name, exc) from exc
            results[i] = exc

    try:
        async with asyncio.TaskGroup() as tg:
            if max_concurrency is None or max_concurrency >= n:
                for i in range(n):
                    coro = branch(i)
                    try:
                        yielded = coro.send(None)
                    except StopIteration:
                        continue
                    tg.create_task(_Resumed(coro, yielded))
            else:
                next_index = 0

                async def worker() -> None:
                    nonlocal next_index
                    while next_index < n:
                        i = next_index
                        next_index += 1
                        await branch(i)

                for _ in range(max_concurrency):
                    tg.create_task(worker())
    except BaseExceptionGroup as group:
        raise unwrap(group) from None
    return results


async def _stop_children(run: LiveRun, done: dict[str, Any]) -> None:
    """A branch failed the fan-out: stop the child runs its siblings started, and say so in the journal.

    The stops go through the store (as a stop of the parent reaches its children); the
    journal marks those branches, so a retry runs them again under new child runs.
    """
    started = {key: entry for key, entry in done.items() if entry.get("child") is not None}
    ids = [str(e["child"]) for e in started.values()]
    ids += [c for c in run.spawned if c not in ids]  # started by a branch cancelled before it returned
    if not ids:
        return
    stopped = await run.kernel.stop_runs(ids)
    marks = {key: {**entry, "stopped": True} for key, entry in started.items() if entry["child"] in stopped}
    if not marks:
        return
    run.journal.update(marks)
    await run.commit(Commit(journal=marks))


async def run_parallel(
    run: LiveRun, name: str, frame: Frame, par: Parallel, prefix: str | None = None
) -> tuple[Any, list[OutputRecord]]:
    """Run the branches, checkpointing each finished one; return the joined state and outputs."""
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

    def make(
        oname: str, key: str, fn: StepFunction, item: Any, index: int, after: str | None = None
    ) -> Callable[[], Any]:
        async def call() -> Any:
            bframe = Frame(frame.state, key)
            bframe.updates = {}
            bctx: StepContext[Any, Any] = StepContext(run, oname, visit, bframe, item)
            child = None
            try:
                if fn.retry is None and fn.timeout is None:
                    out = fn.fn(bctx)
                    if fn.is_async or asyncio.iscoroutine(out):
                        out = await out
                else:
                    out = await invoke(fn, (bctx,), bframe, ctx=bctx)
                if isinstance(out, Run):
                    # The branch runs a child workflow: its result comes when the child ends.
                    child = await spawn(run, name, visit, out, index, after)
                    out = None
                else:
                    out = step_output(fn, oname, run.run_id, out)
            finally:
                await bframe.close_agents()
            entry = {"output": out, "updates": bframe.updates}
            if child is not None:
                entry["child"], entry["workflow"] = child["run_id"], child["workflow"]
            done[key] = entry
            batch[key] = entry
            wake.set()
            return entry

        return call

    calls = []
    call_keys = []
    for index, (oname, label, key, fn, item) in enumerate(jobs):
        stored = journal.get(key)
        if stored is not None and stored.get("stopped"):
            # Its child run was stopped when a sibling failed: the branch runs again.
            calls.append((label, make(oname, key, fn, item, index, str(stored["child"]))))
            call_keys.append(key)
        elif stored is not None and "child" in stored:
            # The branch started a child run: its result is the child's, read at the join.
            done[key] = {"output": None, "updates": stored["updates"], "child": stored["child"]}
            done[key]["workflow"] = stored.get("workflow")
        elif stored is not None:
            done[key] = {"output": decode_output(spec, oname, stored["output"]), "updates": stored["updates"]}
        else:
            calls.append((label, make(oname, key, fn, item, index)))
            call_keys.append(key)

    failure: BranchFailed | None = None
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(flusher())
            try:
                results = await run_branches(calls, par.max_concurrency, par.on_error == "fail")
            except BranchFailed as failed_branch:
                failure = failed_branch  # the flusher writes the branches that finished before it goes on
            finally:
                finished = True
                wake.set()
    except BaseExceptionGroup as group:
        raise unwrap(group) from None
    if failure is not None:
        await _stop_children(run, done)
        raise failure
    journal.update(done)
    errors = {k: r for k, r in zip(call_keys, results, strict=True) if isinstance(r, BaseException)}
    refs = [
        {"run_id": done[key]["child"], "workflow": done[key]["workflow"], "index": i}
        for i, (_o, _l, key, _f, _i) in enumerate(jobs)
        if key in done and "child" in done[key]
    ]
    if refs:
        # The join waits for the child runs: the step parks, and joins when they ended.
        failed = {
            key: {
                "output": BranchError(label, type(errors[key]).__name__, str(errors[key])).to_json(),
                "updates": {},
            }
            for _o, label, key, _f, _i in jobs
            if key in errors
        }
        join: dict[str, Any] = {"prefix": prefix, "on_error": par.on_error}
        if par.items is not None:
            join.update(map=par.map_name, count=len(jobs))
        else:
            join["branches"] = list(par.branches)
        raise Spawned(refs, join, failed)
    state = frame.state
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
