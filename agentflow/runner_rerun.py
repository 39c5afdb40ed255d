"""Retry and fork: a failed run continues at its failing step, or a new run starts where an old one was."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ._engine.context import validate_state
from ._engine.gates import Transition
from ._engine.history import Reached, reached
from ._engine.run import first_record
from ._engine.versions import upgrade
from .definition.steps import START
from .errors import (
    AgentflowError,
    InvalidStateError,
    RunNotFoundError,
    StateValidationError,
    UnknownStepError,
)
from .handle import RunHandle
from .stores.contract import Commit, RunRecord
from .types import RunEvent, RunStatus

if TYPE_CHECKING:
    from .runner import WorkflowRunner

__all__ = ["fork", "retry"]

#: Failed child runs a retry reaches at once.
_FAN = 64


def _fields_of(state: Mapping[str, Any] | BaseModel) -> Mapping[str, Any]:
    """State updates given as a mapping or a model (its set fields)."""
    if isinstance(state, BaseModel):
        return {k: getattr(state, k) for k in state.model_fields_set}
    return state


def _failed_wait(rec: RunRecord) -> dict[str, Any] | None:
    """The wait on child runs whose ending failed ``rec``, if that is how it failed.

    A failed run holds a wait on children only when their ending failed it: a step that
    completes after a wait clears it.
    """
    pending = rec.pending
    if rec.status != RunStatus.FAILED or not isinstance(pending, dict) or pending.get("kind") != "children":
        return None
    return pending


async def retry(runner: WorkflowRunner, run_id: str) -> RunHandle:
    """``WorkflowRunner.retry``: continue failed run ``run_id`` at its failing step."""
    sup = runner.supervisor
    here = run_id in sup.local
    await _retry_children(runner, run_id)

    def fn(rec: RunRecord, now: float) -> Transition | None:
        runner._check_workflow(rec)
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
    return RunHandle(runner, run_id, sup.local.get(run_id), status=rec.status)


async def _retry_children(runner: WorkflowRunner, run_id: str) -> None:
    """Retry the failed child runs whose ending failed ``run_id`` (theirs first, recursively)."""
    rec = await runner.store.get(run_id)
    wait = _failed_wait(rec) if rec is not None else None
    if wait is None:
        return
    ids = [str(c["run_id"]) for c in wait.get("children") or ()]

    async def one(child: RunRecord | None) -> None:
        if child is None or child.status != RunStatus.FAILED:
            return
        try:
            await retry(runner, child.run_id)
        except (InvalidStateError, RunNotFoundError):
            pass  # retried meanwhile (by another process): the parent waits on it all the same

    for i in range(0, len(ids), _FAN):
        children = await asyncio.gather(*(runner.store.get(c) for c in ids[i : i + _FAN]))
        await asyncio.gather(*(one(c) for c in children))


def _migrated(runner: WorkflowRunner, rec: RunRecord, where: Reached, at: str) -> dict[str, Any]:
    """The state fields the source run had set when it reached ``at``, at the workflow's version now.

    A run that reached ``at`` on an older version has its state then migrated (as a
    pick-up would) before it is validated; only the fields its history recorded are
    given to the migration (defaults of that version were not recorded).

    Raises:
        IncompatibleRunError: no migration leads from that version, or one raised.
    """
    spec = runner.spec
    then = where.version or where.started or rec.version
    if then == spec.version:
        return where.changes
    probe = dataclasses.replace(rec, state=dict(where.changes), step=at, pending=None, version=then)
    up = upgrade(spec, probe)
    state = up.record.state if up is not None else where.changes
    return state if isinstance(state, dict) else {}


async def fork(
    runner: WorkflowRunner,
    source: str,
    /,
    at: str,
    state: Mapping[str, Any] | BaseModel | None = None,
    run_id: str | None = None,
) -> RunHandle:
    """``WorkflowRunner.fork``: a new run from where run ``source`` last reached step ``at``.

    The new run is of the workflow's version now; a source of an older version has its
    state migrated (``Workflow.migrate``).
    """
    spec = runner.spec
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
    loaded = await runner.store.load(source)
    if loaded is None:
        raise RunNotFoundError(f"no run {source!r} in the store of workflow {spec.name!r}")
    rec = loaded.record
    runner._check_workflow(rec)
    where = reached(await runner.store.events(source), at)
    if where is None:
        raise InvalidStateError(f"cannot fork run {source} at step {at!r}: the run never reached it")
    label = f"fork of run {source} at step {at!r}"
    changes = _migrated(runner, rec, where, at)
    model = spec.state_model
    new_state: BaseModel | None = None
    if model is not None:
        then = validate_state(model, None, {**spec.initial_state, **changes}, label)
        new_state = then if state is None else validate_state(model, then, _fields_of(state), label)
    elif state:
        raise StateValidationError(
            f"{label}: the workflow declares no state model, so no state can be merged in"
        )
    sup = runner.supervisor
    new_id = run_id or os.urandom(16).hex()
    decisions = tuple(d for d in rec.decisions if int(d.get("visit") or 0) < where.visit)
    record, lease = first_record(
        sup, new_id, rec.input, new_state, at, visit=where.visit - 1, decisions=decisions
    )
    origin = {"workflow": spec.name, "forked_from": {"run_id": source, "step": at, "visit": where.visit}}
    events = [
        RunEvent("run_started", new_id, None, origin, record.created_at, 1),
        RunEvent("step_started", new_id, at, None, record.created_at, 2),
    ]
    if not await runner.store.create(record, events):
        return await runner.attach(new_id)
    outputs = [o for o in loaded.outputs if o.visit < where.visit]
    if outputs:
        await runner.store.commit(new_id, lease, Commit(outputs=outputs, seq=1))
    live = await sup.adopt(new_id, lease)
    return RunHandle(runner, new_id, live)
