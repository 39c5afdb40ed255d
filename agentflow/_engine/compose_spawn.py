"""Starting child runs: their ids, and the first record of each.

A step that returns ``Run(child, input, target)`` (a ``Parallel.map`` branch too, or
``await ctx.run(child, input)`` in imperative code) starts a run of its own in the
same store, under an id derived from the parent's and the step visit
(:func:`child_id`): a replay or a recovery of the step finds the child it started
(``Store.create`` refuses a second one) instead of starting another. Parking the
parent on what it started, and finishing its step, is :mod:`.compose`'s.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from ..definition.compose import Run
from ..errors import StepLimitExceeded, WorkflowDefinitionError
from .run import LiveRun, new_run
from .values import validate_input

if TYPE_CHECKING:
    from .kernel import Kernel

__all__ = ["Spawned", "child_id", "spawn", "start_child", "successor_id"]


def child_id(parent: str, step: str, visit: int, index: int | None = None) -> str:
    """The id of the child a step visit starts (``index``: its position in a fan-out).

    Derived, never random, so running the step again finds the same child. Kept short
    when the parent's own id is long (a child of a child of ...).
    """
    base = parent if len(parent) <= 64 else "c" + hashlib.sha256(parent.encode()).hexdigest()[:31]
    tail = f"{step}.{visit}" if index is None else f"{step}.{visit}.{index}"
    return f"{base}/{tail}"


def successor_id(child: str) -> str:
    """The id of the run that takes the place of the stopped child ``child`` (``…~2``, ``…~3``).

    Derived, as :func:`child_id` is, so a replay finds the successor it started.
    """
    base, sep, n = child.rpartition("~")
    if sep and n.isdigit():
        return f"{base}~{int(n) + 1}"
    return f"{child}~2"


class Spawned(Exception):
    """Internal: parallel branches started child runs; the step parks on them.

    Attributes:
        refs: the children, ``{"run_id", "workflow", "index"}``, in branch order.
        join: how to join the branches once the children ended (see ``run_parallel``).
        journal: failed branches' results (``on_error="collect"``), kept for the join.
    """

    def __init__(self, refs: list[dict[str, Any]], join: dict[str, Any], journal: dict[str, Any]) -> None:
        super().__init__(f"{len(refs)} child runs started")
        self.refs = refs
        self.join = join
        self.journal = journal


async def spawn(
    run: LiveRun, step: str, visit: int, child: Run, index: int | None = None, after: str | None = None
) -> dict[str, Any]:
    """Create (or find again) and start the child run ``child`` asks for; its ref.

    ``after``: the stopped child this one takes the place of (its id is then
    :func:`successor_id` of it).

    Raises:
        WorkflowDefinitionError: the workflow is not one of the parent's children.
        InvalidInputError: the input does not fit the child's input model.
        StepLimitExceeded: runs nest deeper than the child's ``max_steps``.
    """
    spec = run.spec
    wf = child.workflow
    name = wf.name
    if spec.children.get(name) is not wf:
        known = sorted(spec.children)
        raise WorkflowDefinitionError(
            f"run {run.run_id}, step {step!r}: workflow {name!r} is not a child of {spec.name!r} "
            f"(children: {known}); name it in the step's code or declare it with "
            f"Workflow({spec.name!r}).children(...)"
        )
    kernel = run.kernel.child_kernel(name)
    cspec = kernel.spec
    depth = int((run.parent or {}).get("depth", 0)) + 1
    if depth > cspec.max_steps:
        raise StepLimitExceeded(
            f"run {run.run_id}, step {step!r}: child runs nest {depth} deep (workflow {name!r} "
            f"allows {cspec.max_steps} steps); a cycle of workflows that never ends?"
        )
    inp = validate_input(cspec, child.input)
    cid = successor_id(after) if after is not None else child_id(run.run_id, step, visit, index)
    parent = {"run_id": run.run_id, "step": step, "visit": visit, "index": index, "depth": depth}
    await start_child(kernel, cid, inp, parent)
    if cid not in run.children:
        run.spawned.append(cid)
    return {"run_id": cid, "workflow": name, "index": index}


async def start_child(kernel: Kernel, run_id: str, inp: Any, parent: dict[str, Any]) -> None:
    """Store the child's first record and advance it here; nothing when it exists already."""
    data = {"workflow": kernel.spec.name, "parent": parent["run_id"], "step": parent["step"]}
    rec, child, events = new_run(kernel, run_id, inp, data, parent)
    if await kernel.store.create(rec, events):
        kernel.start(child)
