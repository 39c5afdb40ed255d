"""Child runs: parking the parent on them, and finishing the parent's step from how they ended.

A step that returns ``Run(child, input, target)`` (a ``Parallel.map`` branch too, or
``await ctx.run(child, input)`` in imperative code) starts child runs
(:mod:`.compose_spawn`: under ids derived from the parent's, so a replay finds them
again); their endings are read as :class:`ChildOutcome` (:mod:`.compose_outcome`).
This module re-exports both, as the one entry to child runs.

The order makes crashes harmless:

1. the child is created (its record names the parent) and started here;
2. the parent commits as ``waiting`` with ``pending`` of kind ``"children"`` (the
   children, where to go next, a check-back deadline) and the child ids appended to
   its ``children``, and lets go of its lease: it holds no task while it waits.

Children that end at once (after one turn of the loop: in memory, a few plain steps)
spare the parent the wait: its step completes in the same task, under the lease it
never let go of (:func:`wait_on`), so it still goes on exactly once.

A crash between 1 and 2 leaves the parent running with its lease running out:
recovery runs the step again, which finds the same child. When the last child ends,
the process that sees it (or a timer sweep at the check-back deadline, or
``recover()``) moves the parent back to running through one atomic ``Store.update``
(:func:`ended`, judged on the parent's record: exactly once, whoever tries). The
``pending`` stays on the record until the parent's new owner commits the step's
completion (:func:`resume_children`), so a crash in between leaves a running parent
that recovery finishes the same way.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from ..definition.steps import END
from ..errors import WorkflowDefinitionError
from ..stores.contract import Commit, OutputRecord, RunRecord
from ..types import NO_USAGE, RunStatus
from .advance import complete_step
from .compose_outcome import ChildOutcome, add_usage, ended_here, read_children
from .compose_spawn import Spawned, child_id, spawn, start_child, successor_id
from .context import Frame, validate_state
from .history import state_delta
from .run import LiveRun, StepError
from .values import decode_output, run_output, validate_input

if TYPE_CHECKING:
    from .gates import Transition

__all__ = [
    "CHECK_BACK",
    "ChildOutcome",
    "Spawned",
    "child_id",
    "ended",
    "ended_here",
    "finish_step",
    "park_children",
    "read_children",
    "resume_children",
    "spawn",
    "replace_stopped",
    "successor_id",
    "wait_again",
    "wait_of",
    "wait_on",
]

#: Seconds from parking on children to the first check-back: the timer sweep looks at
#: the children then (in case the process that finished the last one died before it
#: resumed the parent), and again later, backing off to :data:`CHECK_BACK_MAX`.
CHECK_BACK = 5.0
CHECK_BACK_MAX = 60.0


def ended(rec: RunRecord, step: str, visit: int) -> Transition | None:
    """The parent goes on: its children (of the wait at ``step``, ``visit``) all ended.

    Pure and judged on the parent's record alone: of several processes that saw the
    last child end, only the first moves the parent on. The pending stays (its
    deadline dropped), for the new owner to read the children's results from.
    """
    from .gates import Transition

    pending = rec.pending
    if (
        rec.status != RunStatus.WAITING
        or not isinstance(pending, dict)
        or pending.get("kind") != "children"
        or pending.get("step") != step
        or pending.get("visit") != visit
    ):
        return None
    data = {"children": len(pending.get("children") or ())}
    resumed = {**pending, "deadline": None, "ended": True}
    return Transition({"pending": resumed}, [("resumed", step, data)], resume_at=step)


def join_jobs(join: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(output name, label, journal key)`` of each branch of a parked ``Parallel``, in order."""
    prefix = join["prefix"]
    if join.get("map") is not None:
        m = join["map"]
        return [(m, f"{m}[{i}]", f"{prefix}{m}:{i}") for i in range(int(join["count"]))]
    return [(b, b, f"{prefix}{b}") for b in join["branches"]]


async def resume_children(run: LiveRun) -> str | None:
    """Finish the step that parked on children (their results read now); the control flag."""
    pending = run.resolving
    assert pending is not None
    run.resolving = None
    return await finish_step(run, pending, run.state, parked=True)


def wait_of(
    run: LiveRun,
    name: str,
    refs: list[dict[str, Any]],
    target: str,
    on_fail: str | None = None,
    on_reject: str | None = None,
    join: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a step waits on once it started children (the ``pending`` it parks with)."""
    now = time.time()
    return {
        "kind": "children",
        "workflow": run.spec.name,
        "step": name,
        "visit": run.visit,
        "target": target,
        "on_reject": on_reject,
        "on_timeout": None,
        "on_fail": on_fail,
        "since": now,
        "deadline": now + CHECK_BACK,
        "approvals": [],
        "children": refs,
        "join": join,
    }


async def wait_on(
    run: LiveRun, frame: Frame, pending: dict[str, Any], journal: dict[str, Any] | None = None
) -> str | None:
    """The step started the children of ``pending``: complete it now if they all ended here, else park.

    Returns the control flag of the commit that completed the step (None when parked).
    """
    if await ended_here(run, list(pending["children"])):
        return await finish_step(run, pending, frame.state, journal)
    await park_children(run, frame, pending, journal)
    return None


async def park_children(
    run: LiveRun, frame: Frame, pending: dict[str, Any], journal: dict[str, Any] | None = None
) -> None:
    """Commit the parent as ``waiting`` on its children and let go of it (see the module docstring)."""
    name = str(pending["step"])
    refs = list(pending["children"])
    fields: dict[str, Any] = {
        "status": RunStatus.WAITING,
        "pending": pending,
        "step": name,
        "visit": run.visit,
    }
    _new_children(run, refs, fields)
    if run.pause_requested:
        fields["control"] = "pause"
    waiting: dict[str, Any] = {}
    if frame.state is not run.state:
        waiting["state"] = state_delta(run.state, frame.state)  # what fork() replays
        run.state = frame.state
        fields["state"] = frame.state
    if journal:
        run.journal.update(journal)
    ids = [r["run_id"] for r in refs]
    run.event("waiting", name, {"kind": "children", "count": len(ids), "children": ids[:20], **waiting})
    run.status = RunStatus.WAITING
    await run.commit(Commit(fields=fields, journal=dict(journal or {}), release=True))
    run.kernel.watch_deadlines()
    run.kernel.watch_children(run.run_id)


async def finish_step(
    run: LiveRun,
    pending: dict[str, Any],
    state: Any,
    journal: dict[str, Any] | None = None,
    parked: bool = False,
) -> str | None:
    """Complete the step that started the children of ``pending``; the control flag.

    The step goes to its target (``on_fail`` / ``on_reject`` when a child did not
    complete and they are given), or the parent fails (a child failed or was stopped:
    the wait is kept with the failure, for a retry), or ends ``rejected`` / ``expired``
    with the child (a child ended at a gate). ``state`` is the step's state; ``journal``
    entries are committed with it; ``parked`` says the record holds ``pending`` (the
    run waited), which the commit clears.

    A parent that was retried (``pending["retried"]``) first puts a new run in the
    place of each stopped child; the step parks again while any child is going.
    """
    from .fanout import BranchFailed

    spec = run.spec
    name = str(pending["step"])
    refs = list(pending.get("children") or ())
    outcomes = await read_children(run, refs)
    if pending.get("retried"):
        refs, outcomes, journal = await replace_stopped(run, pending, refs, outcomes, journal)
    if any(o.going for o in outcomes):
        # Children retried (or reset) since: wait on them again.
        await park_children(run, Frame(state), wait_again(pending, refs), journal)
        return None
    extra: dict[str, Any] = {"pending": None} if parked else {}
    if add_usage(run, outcomes) or parked:
        extra["usage"] = run.usage.to_json()
    join = pending.get("join")
    output: Any = None
    outputs: list[OutputRecord] = []
    if journal:
        run.journal.update(journal)
    if join is None:
        o = outcomes[0]
        if o.ok:
            target, output = str(pending["target"]), o.value
        else:
            route = pending.get("on_reject") if o.rejected else pending.get("on_fail")
            if route:
                target, output = str(route), o.branch_error()
            elif o.rejected:
                await _end_with(run, name, o, refs, journal)
                return None
            else:
                raise StepError(name, o.exception(), wait=wait_again(pending, refs))
    else:
        target = str(pending["target"])
        by_id = {o.run_id: o for o in outcomes}
        collect = join.get("on_error") == "collect"
        values: list[Any] = []
        jobs = join_jobs(join)
        for oname, label, key in jobs:
            entry = run.journal.get(key) or {}
            cid = entry.get("child")
            if cid is None:
                values.append(decode_output(spec, oname, entry.get("output")))
            else:
                o = by_id[cid]
                if o.ok:
                    values.append(o.value)
                elif collect:
                    values.append(o.branch_error())
                    continue
                elif o.rejected:
                    await _end_with(run, name, o, refs, journal)
                    return None
                else:
                    raise StepError(name, BranchFailed(label, o.exception()), wait=wait_again(pending, refs))
            updates = entry.get("updates")
            if updates and spec.state_model is not None:
                state = validate_state(
                    spec.state_model, state, updates, f"run {run.run_id}, join of {name!r}"
                )
        if join.get("map") is not None:
            outputs = [OutputRecord(run.visit, str(join["map"]), values)]
        else:
            outputs = [OutputRecord(run.visit, job[0], v) for job, v in zip(jobs, values, strict=True)]
    if target != END and target not in spec.steps:
        raise StepError(
            name, WorkflowDefinitionError(f"run {run.run_id}: step {name!r} has no step {target!r}")
        )
    return await _complete(run, name, target, output, outputs, state, refs, journal, extra)


def wait_again(pending: dict[str, Any], refs: list[dict[str, Any]]) -> dict[str, Any]:
    """``pending`` as a fresh wait on the children ``refs``."""
    now = time.time()
    kept = {k: v for k, v in pending.items() if k not in ("ended", "retried")}
    return {**kept, "children": refs, "since": now, "deadline": now + CHECK_BACK}


async def replace_stopped(
    run: LiveRun,
    pending: dict[str, Any],
    refs: list[dict[str, Any]],
    outcomes: list[ChildOutcome],
    journal: dict[str, Any] | None,
) -> tuple[list[dict[str, Any]], list[ChildOutcome], dict[str, Any] | None]:
    """Start a new run in the place of each stopped child of a retried parent (same input and step).

    A stopped run is final: its successor (:func:`successor_id`) runs the child
    workflow again from its start, and the stopped one stays in the store. A fan-out's
    journal entry of the branch is pointed at the successor.
    """
    if not any(o.status is RunStatus.STOPPED for o in outcomes):
        return refs, outcomes, journal
    journal = dict(journal or {})
    keys: dict[str, str] = {}
    join = pending.get("join")
    if join is not None:
        for _o, _l, key in join_jobs(join):
            cid = (journal.get(key) or run.journal.get(key) or {}).get("child")
            if cid is not None:
                keys[str(cid)] = key
    refs, outcomes = list(refs), list(outcomes)
    for i, o in enumerate(outcomes):
        if o.status is not RunStatus.STOPPED:
            continue
        rec = await run.kernel.store.get(o.run_id)
        if rec is None or not isinstance(rec.parent, dict):
            continue
        kernel = run.kernel.child_kernel(o.workflow)
        new = successor_id(o.run_id)
        await start_child(kernel, new, validate_input(kernel.spec, rec.input), rec.parent)
        if new not in run.children:
            run.spawned.append(new)
        refs[i] = {**refs[i], "run_id": new}
        outcomes[i] = dataclasses.replace(o, run_id=new, going=True)
        at = keys.get(o.run_id)
        if at is not None:
            journal[at] = {**(journal.get(at) or run.journal[at]), "child": new}
    return refs, outcomes, journal or None


def _new_children(run: LiveRun, refs: list[dict[str, Any]], fields: dict[str, Any]) -> None:
    """Append the ids in ``refs`` the run does not list yet to ``run.children`` (and ``fields``)."""
    known = set(run.children)
    new = tuple(str(r["run_id"]) for r in refs if r["run_id"] not in known)
    run.spawned = []
    if new:
        run.children = fields["children"] = (*run.children, *new)


async def _complete(
    run: LiveRun,
    name: str,
    target: str,
    output: Any,
    outputs: list[OutputRecord],
    state: Any,
    refs: list[dict[str, Any]],
    journal: dict[str, Any] | None,
    extra: dict[str, Any],
) -> str | None:
    spec = run.spec
    try:
        final = run_output(spec, run.run_id, output) if target == END else None
    except Exception as exc:
        raise StepError(name, exc) from exc
    fields = dict(extra)
    _new_children(run, refs, fields)
    control = await complete_step(run, name, target, state, output, outputs, final, fields, journal)
    return control if run.status is RunStatus.RUNNING else None


async def _end_with(
    run: LiveRun, name: str, o: ChildOutcome, refs: list[dict[str, Any]], journal: dict[str, Any] | None
) -> None:
    """The parent ends as its child did at a gate (rejected or expired), the decision kept."""
    status = o.status
    decision = {**(o.decision or {}), "child": o.run_id}
    decision.setdefault("approved", False)
    decision.setdefault("at", time.time())
    decision.setdefault("step", name)
    run.decisions = (*run.decisions, decision)
    fields: dict[str, Any] = {
        "status": status,
        "pending": None,
        "control": None,
        "decisions": run.decisions,
        "usage": run.usage.to_json(),
    }
    _new_children(run, refs, fields)
    run.step_usage = NO_USAGE
    run.event(
        status.value, name, {"child": o.run_id, "by": decision.get("by"), "reason": decision.get("comment")}
    )
    run.status = status
    await run.commit(Commit(fields=fields, journal=dict(journal or {}), release=True))
