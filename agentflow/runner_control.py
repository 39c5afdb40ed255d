"""Pause, resume, stop and delete: a run and the child runs it started.

Control calls return within a bound and are honoured wherever the run is: advanced
here (flags on the live run), advanced by another process (the record's ``control``
flag, seen at its next commit or lease renewal), parked (applied to the record, and
kept through a decision), or owned by a process that died (applied when the lease ran
out by the store's clock).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from ._engine.gates import Transition
from ._runtime.supervisor import stop_change
from .errors import InvalidStateError, RunNotFoundError
from .runner_follow import until
from .stores.contract import Change, RunRecord
from .types import FINAL, RunEvent, RunStatus

if TYPE_CHECKING:
    from .runner import WorkflowRunner

__all__ = ["delete", "pause", "resume", "stop"]

#: Child runs a pause, a resume, a stop or a delete reaches at once.
_FAN = 64


def _child_ids(rec: RunRecord) -> list[str]:
    """Every child run ``rec`` started: those it lists, and those of its wait it has not listed yet."""
    ids = list(rec.children)
    if isinstance(rec.pending, dict) and rec.pending.get("kind") == "children":
        ids += [str(c["run_id"]) for c in rec.pending.get("children") or () if c["run_id"] not in ids]
    return ids


async def delete(runner: WorkflowRunner, run_id: str) -> bool:
    """Remove a run and everything stored with it, its child runs too; False when there was no such run.

    The child runs it started (and theirs) are deleted with it, children first, so
    nothing of the run is left behind. Nothing is deleted when any of them is running.

    Raises:
        InvalidStateError: the run, or one of its child runs, is running; stop it
            first (stopping a parent stops its children).
    """
    rec = await runner.store.get(run_id)
    if rec is None:
        return False
    runner._check_workflow(rec)
    tree = [rec]
    seen = {run_id}
    for r in tree:  # grows while it is walked: every child run, breadth first
        if r.status == RunStatus.RUNNING:
            what = f"run {run_id}" if r is rec else f"run {run_id}: its child run {r.run_id}"
            raise InvalidStateError(f"{what} is running; stop it before deleting it")
        ids = [c for c in _child_ids(r) if c not in seen]
        seen.update(ids)
        for i in range(0, len(ids), _FAN):
            found = await asyncio.gather(*(runner.store.get(c) for c in ids[i : i + _FAN]))
            tree += [c for c in found if c is not None]
    for r in reversed(tree[1:]):
        await runner.store.delete(r.run_id)
    return await runner.store.delete(run_id)


async def _each_child(
    runner: WorkflowRunner, run_id: str, action: Callable[[str], Any], every: bool = False
) -> None:
    """Apply ``action`` to ``run_id``'s child runs (those of its wait; with ``every``, all).

    A child that cannot take it (it ended meanwhile) is left as it is.
    """
    rec = await runner.store.get(run_id)
    if rec is None:
        return
    if every:
        ids = list(rec.children)
    elif isinstance(rec.pending, dict) and rec.pending.get("kind") == "children":
        ids = [str(c["run_id"]) for c in rec.pending.get("children") or ()]
    else:
        return

    async def one(child: str) -> None:
        try:
            await action(child)
        except (InvalidStateError, RunNotFoundError):
            pass

    for i in range(0, len(ids), _FAN):
        await asyncio.gather(*(one(c) for c in ids[i : i + _FAN]))


async def pause(runner: WorkflowRunner, run_id: str) -> None:
    """Pause the run, and its child runs (they pause where they are; the parent waits on)."""
    await _pause_one(runner, run_id)
    await _each_child(runner, run_id, partial(pause, runner))


async def _pause_one(runner: WorkflowRunner, run_id: str) -> None:
    sup = runner.supervisor
    live = sup.local.get(run_id)
    if live is not None and live.status is RunStatus.RUNNING and not live.finished:
        live.pause_requested = True
        # Waiting counts as parked: the pause takes effect where the decision sends the run.
        await until(runner, run_id, lambda r: r.status != RunStatus.RUNNING, None)
        return

    def change(rec: RunRecord, now: float) -> Change | None:
        if rec.status == RunStatus.PAUSED:
            return None
        if rec.status not in (RunStatus.RUNNING, RunStatus.WAITING, RunStatus.PENDING):
            raise InvalidStateError(
                f"run {run_id} is {rec.status.value}; only a running or waiting run can be paused"
            )
        if rec.status == RunStatus.RUNNING and (rec.lease_owner is None or rec.lease_expires <= now):
            # Its owner is gone: it parks at the step it was in (which runs again on
            # resume), or ends there when a stop was asked for too.
            status = RunStatus.STOPPED if rec.control == "stop" else RunStatus.PAUSED
            ev = RunEvent(status.value, run_id, rec.step, None, time.time(), rec.event_count + 1)
            return Change(dataclasses.replace(rec, status=status, lease_owner=None, control=None), [ev])
        return None if rec.control in ("pause", "stop") else Change(dataclasses.replace(rec, control="pause"))

    while True:
        rec = await sup.update(run_id, change)
        if rec is None:
            raise RunNotFoundError(f"no run {run_id!r} in the store of workflow {runner.spec.name!r}")
        sup.notify(run_id)
        if rec.status != RunStatus.RUNNING:
            return
        # Owned elsewhere: it pauses at its next commit or lease renewal; if its owner
        # dies first, its lease runs out and the next round parks it here.
        try:
            await until(runner, run_id, lambda r: r.status != RunStatus.RUNNING, runner._lease_ttl)
            return
        except TimeoutError:
            continue


async def resume(runner: WorkflowRunner, run_id: str) -> None:
    """Resume the run, and its paused child runs."""
    await _resume_one(runner, run_id)
    await _each_child(runner, run_id, partial(resume, runner))


async def _resume_one(runner: WorkflowRunner, run_id: str) -> None:
    def fn(rec: RunRecord, now: float) -> Transition | None:
        if rec.status == RunStatus.RUNNING:
            return None
        if rec.status == RunStatus.WAITING and rec.control == "pause":
            return None  # nothing to resume yet; the pause is dropped below
        if rec.status != RunStatus.PAUSED:
            raise InvalidStateError(f"run {run_id} is {rec.status.value}; only a paused run can be resumed")
        return Transition({}, [("resumed", rec.step, None)], resume_at=rec.step)

    rec = await runner.supervisor.transition(run_id, fn)
    if rec.status == RunStatus.WAITING and rec.control == "pause":
        await runner.supervisor.update(run_id, lambda r, now: Change(dataclasses.replace(r, control=None)))


async def stop(runner: WorkflowRunner, run_id: str) -> None:
    """Stop the run, then every child run it started that has not ended."""
    await _stop_one(runner, run_id)
    await _each_child(runner, run_id, partial(stop, runner), every=True)


async def _stop_one(runner: WorkflowRunner, run_id: str) -> None:
    sup = runner.supervisor
    while True:
        live = sup.local.get(run_id)
        if live is not None and not live.finished:
            live.stop_requested = True
            live.cancel()
            await live.wait_finished()

        def change(rec: RunRecord, now: float) -> Change | None:
            if rec.status in FINAL and rec.status != RunStatus.STOPPED:
                raise InvalidStateError(f"run {run_id} is already {rec.status.value}; it cannot be stopped")
            return stop_change(rec, now)

        rec = await sup.update(run_id, change)
        if rec is None:
            raise RunNotFoundError(f"no run {run_id!r} in the store of workflow {runner.spec.name!r}")
        sup.notify(run_id)
        sup.settled(rec)
        if rec.status in FINAL:
            return
        # Owned elsewhere (alive): it stops at its next commit or lease renewal. If it
        # parks first (at a gate, paused) or dies (its lease runs out), the next round
        # stops it here.
        try:
            rec = await until(runner, run_id, lambda r: r.status != RunStatus.RUNNING, runner._lease_ttl)
        except TimeoutError:
            continue
        if rec.status in FINAL:
            return
