"""Handing runs over between processes: a client lets go of a run and queues it; a
worker claims it from the queue and takes it.

Delivery through the queue is at least once; the run's lease makes the work happen
once: :func:`claim` takes a run only while it is running, of the claimed workflow, and
without a live owner.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING

from .._engine.gates import apply
from ..errors import RunNotFoundError, WorkflowDefinitionError
from ..stores.capabilities import WorkQueue
from ..stores.contract import Change, Lease, RunRecord, Store
from ..types import RunStatus
from .leases import take_over

if TYPE_CHECKING:
    from .supervisor import Supervisor

__all__ = ["claim", "hand_over", "queue_of"]


async def hand_over(sup: Supervisor, run_id: str, lease: Lease) -> None:
    """Let go of a run this process just took, and queue it for the workers of its workflow."""

    def release(rec: RunRecord, now: float) -> Change | None:
        if rec.lease_owner != lease.owner or rec.lease_token != lease.token:
            return None  # a retry after a lost reply, or someone else's already
        return Change(dataclasses.replace(rec, lease_owner=None, lease_expires=0.0), [])

    rec = await sup.update(run_id, release)
    if rec is not None and rec.status == RunStatus.RUNNING and rec.lease_owner is None:
        await queue_of(sup.store).enqueue(rec.workflow, run_id)


async def claim(sup: Supervisor, run_id: str, workflow: str, handed_after: float = 0.0) -> str | None:
    """Take a run a worker claimed from the queue, and advance it here.

    Returns ``"handed"`` (it had no owner), ``"recovered"`` (its owner died), or None
    when it is not this process's to take. With ``handed_after``, a run without an
    owner is taken only once it has waited that long (its queue entry was lost).

    A run handed over (no owner) is taken as it is; one whose owner died is recovered
    (a ``resumed`` event says so). A run that is not running, is held by a live owner,
    or is of another workflow is left alone.

    Raises:
        RunNotFoundError: the run no longer exists.
    """
    claiming = sup.root._claiming
    while (other := claiming.get(run_id)) is not None:
        await other.wait()  # one attempt at a time here (they share the owner): then look again
    if run_id in sup.local:
        return None
    done = claiming[run_id] = asyncio.Event()
    try:
        return await _claim(sup, run_id, workflow, handed_after)
    finally:
        del claiming[run_id]
        done.set()


async def _claim(sup: Supervisor, run_id: str, workflow: str, handed_after: float) -> str | None:
    target = sup.of(workflow) if workflow in sup.specs else sup
    if not handed_after and target.execute and sup.takes is not None:
        # The common case, a run handed over: its lease and load in one operation.
        got = await sup.takes.take(run_id, workflow, sup.owner, sup.lease_ttl)
        if got is not None:
            await target.adopt(run_id, *got)
            return "handed"
    taken: list[int] = []
    recovered_from: list[str] = []

    def take(rec: RunRecord, now: float) -> Change | None:
        if rec.status != RunStatus.RUNNING or rec.workflow != workflow:
            return None
        if rec.lease_owner is not None:
            recovered = take_over(workflow)(rec, now)  # its owner died...
            if recovered is None:
                return None  # ...or is alive
            out, lease = apply(rec, now, recovered, sup.owner, sup.lease_ttl)
            if lease is not None:
                taken.append(lease.token)
                recovered_from.append(rec.lease_owner)
            return out
        if handed_after and rec.updated_at > now - handed_after:
            return None  # handed over just now: its queue entry is on its way to a worker
        token = rec.lease_token + 1
        taken.append(token)
        leased = dataclasses.replace(
            rec, lease_owner=sup.owner, lease_token=token, lease_expires=now + sup.lease_ttl
        )
        return Change(leased, [])

    rec = await sup.update(run_id, take)
    if rec is None:
        raise RunNotFoundError(f"no run {run_id!r} in the store of workflow {workflow!r}")
    if rec.lease_owner != sup.owner or rec.lease_token not in taken:
        return None
    await target.adopt(run_id, Lease(sup.owner, rec.lease_token))
    return "recovered" if recovered_from else "handed"


def queue_of(store: Store) -> WorkQueue:
    """``store`` as the work queue runs are handed over through.

    Raises:
        WorkflowDefinitionError: the store keeps no work queue (it cannot serve workers).
    """
    if not isinstance(store, WorkQueue):
        raise WorkflowDefinitionError(
            f"the store {type(store).__name__} keeps no work queue, so runs cannot be handed to "
            "workers through it; use the memory, SQLite, Redis or Postgres store"
        )
    return store
