"""At a gate: parking a run, deciding it, timing it out, and resuming it.

A waiting run is only a stored record: the pending gate (approvers, quorum, prompt,
context, deadline, approvals so far, where to go next). Deciding is a pure function
of that record, applied through ``Store.update`` by whichever process decides, and
idempotent: a decision carries an id, and a retry that finds it recorded changes
nothing (so a decision whose reply was lost is neither lost nor counted twice).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pydantic_core

from ..definition.gates import Gate, Wait
from ..definition.steps import END
from ..errors import InvalidStateError, NotAuthorizedError
from ..stores.contract import Change, Commit, Lease, RunRecord
from ..types import NO_USAGE, Decision, RunEvent, RunStatus

if TYPE_CHECKING:
    from .context import Frame
    from .run import LiveRun

__all__ = ["Outcome", "Transition", "apply", "decide", "park", "pending_gate", "time_out"]


def pending_gate(wait: Wait | None, gate: Gate, step: str, visit: int, workflow: str) -> dict[str, Any]:
    """The stored form of a gate a run now waits at (``workflow`` lets a store index it)."""
    data = gate.describe()
    timeout = data.get("timeout")
    now = time.time()
    data.update(
        workflow=workflow,
        step=step,
        visit=visit,
        target=wait.target if wait else None,
        on_reject=wait.on_reject if wait else None,
        on_timeout=wait.on_timeout if wait else None,
        since=now,
        deadline=now + timeout if timeout else None,
        approvals=[],
    )
    return data


async def park(run: LiveRun, name: str, frame: Frame, gate: Gate, wait: Wait | None) -> None:
    """Commit the run as ``waiting`` at ``gate`` and let go of it.

    A pause asked for while the step ran is kept on the record (``control``), so the
    run pauses where the decision sends it instead of going on; so is a pause or stop
    another process asked for that this one has not seen yet (the commit leaves the
    flag as it is).
    """
    pending = pending_gate(wait, gate, name, run.visit, run.spec.name)
    fields: dict[str, Any] = {
        "status": RunStatus.WAITING,
        "pending": pending,
        "step": name,
        "visit": run.visit,
    }
    if run.pause_requested:
        fields["control"] = "pause"
    if frame.state is not run.state:
        run.state = frame.state
        fields["state"] = frame.state
    usage = run.step_usage
    run.event("step_completed", name, {"usage": usage.to_json()} if usage.total_tokens else None)
    run.step_usage = NO_USAGE
    run.event(
        "waiting", name, {k: pending[k] for k in ("approvers", "quorum", "prompt", "context", "deadline")}
    )
    run.status = RunStatus.WAITING
    await run.commit(Commit(fields=fields, release=True))
    if pending["deadline"] is not None:
        run.kernel.watch_deadlines()


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a decision does to a waiting run.

    Attributes:
        decision: the decision to record.
        pending: the updated gate when the quorum is not met yet, else None.
        resume_at: where the run continues (a step name, possibly END), or None when the
            run ends with ``final``.
        final: ``"rejected"`` or ``"expired"`` when the run ends here.
    """

    decision: Decision
    pending: dict[str, Any] | None
    resume_at: str | None
    final: str | None


def decide(
    run_id: str, pending: dict[str, Any] | None, approved: bool, by: str, comment: str | None, data: Any
) -> Outcome:
    """Apply one reviewer's decision to the pending gate."""
    if pending is None:
        raise InvalidStateError(f"run {run_id} is not waiting at a gate, so it cannot be decided")
    approvers = pending.get("approvers", [])
    if by not in approvers:
        raise NotAuthorizedError(
            f"run {run_id}: {by!r} may not decide the gate at step {pending.get('step')!r}; "
            f"approvers are {approvers}"
        )
    decision = Decision(
        approved=approved, by=by, comment=comment, data=pydantic_core.to_jsonable_python(data)
    )
    if not approved:
        target = pending.get("on_reject")
        return Outcome(decision, None, target, None if target else "rejected")
    approvals = list(pending.get("approvals", []))
    if by not in approvals:
        approvals.append(by)
    if len(approvals) < int(pending.get("quorum", 1)):
        return Outcome(decision, {**pending, "approvals": approvals}, None, None)
    return Outcome(decision, None, pending.get("target"), None)


def time_out(pending: dict[str, Any]) -> Outcome:
    """The outcome of a gate whose deadline passed with no quorum."""
    decision = Decision(approved=False, by=None, comment="timed out", timed_out=True)
    target = pending.get("on_timeout")
    return Outcome(decision, None, target, None if target else "expired")


@dataclass(slots=True)
class Transition:
    """A change to a parked run: record fields, events, and where the run resumes (if it does)."""

    fields: dict[str, Any]
    events: list[tuple[str, str | None, Any]]
    resume_at: str | None = None

    @classmethod
    def of(cls, rec: RunRecord, out: Outcome, decision_id: str | None = None) -> Transition:
        """The transition an outcome makes; the decision is recorded under ``decision_id``."""
        pending = rec.pending or {}
        decision = {
            **out.decision.to_json(),
            "step": pending.get("step"),
            "visit": pending.get("visit"),
            "id": decision_id or os.urandom(8).hex(),
        }
        fields: dict[str, Any] = {"decisions": (*rec.decisions, decision)}
        events: list[tuple[str, str | None, Any]] = [("decided", pending.get("step"), decision)]
        if out.pending is not None:
            fields["pending"] = out.pending
            return cls(fields, events)
        fields["pending"] = None
        if out.final is not None:
            fields.update(status=RunStatus(out.final), lease_owner=None, control=None)
            events.append((out.final, pending.get("step"), None))
            return cls(fields, events)
        return cls(fields, events, resume_at=out.resume_at or END)


def expired(rec: RunRecord) -> Transition | None:
    """The timeout of ``rec``'s gate, if its deadline passed."""
    if rec.status != RunStatus.WAITING or not rec.pending:
        return None
    deadline = rec.pending.get("deadline")
    if deadline is None or deadline > time.time():
        return None
    return Transition.of(rec, time_out(rec.pending))


def apply(
    rec: RunRecord, now: float, t: Transition, owner: str, lease_ttl: float
) -> tuple[Change, Lease | None]:
    """The store change ``t`` makes to ``rec`` (``now`` is the store's clock).

    Resuming takes a new lease for ``owner`` — unless a pause or stop was asked for
    while the run was parked: then it parks as ``paused`` (or ends ``stopped``) where
    it would have resumed.
    """
    fields = dict(t.fields)
    kinds = list(t.events)
    lease: Lease | None = None
    if t.resume_at is not None:
        control = rec.control
        if t.resume_at == END:
            fields.update(status=RunStatus.COMPLETED, step=END, lease_owner=None, control=None)
            kinds.append(("completed", None, None))
        elif control == "stop":
            fields.update(status=RunStatus.STOPPED, step=t.resume_at, lease_owner=None, control=None)
            kinds.append(("stopped", t.resume_at, None))
        elif control == "pause":
            fields.update(status=RunStatus.PAUSED, step=t.resume_at, lease_owner=None, control=None)
            kinds.append(("paused", t.resume_at, None))
        else:
            lease = Lease(owner, rec.lease_token + 1)
            fields.update(
                status=RunStatus.RUNNING,
                step=t.resume_at,
                lease_owner=owner,
                lease_token=lease.token,
                lease_expires=now + lease_ttl,
            )
            kinds.append(("step_started", t.resume_at, None))
    at = time.time()
    events = [
        RunEvent(kind, rec.run_id, step, data, at, rec.event_count + i + 1)
        for i, (kind, step, data) in enumerate(kinds)
    ]
    return Change(dataclasses.replace(rec, **fields), events), lease
