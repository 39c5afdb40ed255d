"""At a gate: parking a run, deciding it, timing it out, and resuming it.

A waiting run is only a stored record: its ``pending`` says where it parked, where it
goes next, and the approvals it waits for (Approval JSON: id, approvers, quorum,
prompt, context, form, deadline, votes so far). Deciding is a pure function of that
record, applied through ``Store.update`` by whichever process decides, and idempotent:
a decision carries an id, and a retry that finds it recorded changes nothing (so a
decision whose reply was lost is neither lost nor counted twice). A decision names the
approval it decides, and an approval is decided once: it leaves ``pending`` then.

A gate parked before approvals had ids (``kind: "human_approval"``, its approvers at
the top and its votes as names) is read as the one approval it is (:func:`normalized`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pydantic_core
from pydantic import BaseModel, ValidationError

from ..definition.gates import Gate, Sleep, Wait
from ..definition.steps import END
from ..errors import InvalidInputError, InvalidStateError, NotAuthorizedError
from ..stores.contract import Change, Commit, Lease, RunRecord, approval_id, pending_approvals
from ..types import NO_USAGE, Decision, RunEvent, RunStatus, utc
from .history import state_delta

if TYPE_CHECKING:
    from ..definition.workflow import WorkflowSpec
    from .context import Frame
    from .run import LiveRun

__all__ = [
    "Outcome",
    "Transition",
    "apply",
    "choose",
    "decide",
    "form_of",
    "normalized",
    "park",
    "pending_gate",
    "short_of_quorum",
    "time_out",
    "typed_decision",
    "wake",
]


def pending_gate(
    wait: Wait | None, gate: Gate, step: str, visit: int, workflow: str, run_id: str = ""
) -> dict[str, Any]:
    """The stored form of a gate a run now waits at (``workflow`` lets a store index it).

    A gate waits for one approval, whose id is derived from the run, step and visit.
    """
    if isinstance(gate, Sleep):
        return pending_sleep(wait, gate, step, visit, workflow)
    data = gate.describe()
    timeout = data.get("timeout")
    now = time.time()
    deadline = now + timeout if timeout else None
    approval = {
        "id": approval_id(run_id, step, visit),
        "kind": "gate",
        "run_id": run_id,
        "workflow": workflow,
        "step": step,
        "visit": visit,
        "approvers": list(data.get("approvers") or ()),
        "quorum": data.get("quorum", 1),
        "prompt": data.get("prompt"),
        "context": data.get("context"),
        "form": data.get("form"),
        "deadline": deadline,
        "votes": [],
        "created_at": now,
        "agent": None,
        "tool": None,
        "arguments": None,
    }
    return {
        "kind": "gate",
        "workflow": workflow,
        "step": step,
        "visit": visit,
        "target": wait.target if wait else None,
        "on_reject": wait.on_reject if wait else None,
        "on_timeout": wait.on_timeout if wait else None,
        "on_fail": None,
        "since": now,
        "deadline": deadline,
        "approvals": [approval],
    }


def normalized(run_id: str, pending: dict[str, Any]) -> dict[str, Any]:
    """``pending`` in the current shape: a gate stored before approvals had ids is converted."""
    if pending.get("kind") not in (None, "human_approval"):
        return pending
    return {
        "kind": "gate",
        "workflow": pending.get("workflow"),
        "step": pending.get("step"),
        "visit": pending.get("visit"),
        "target": pending.get("target"),
        "on_reject": pending.get("on_reject"),
        "on_timeout": pending.get("on_timeout"),
        "on_fail": None,
        "since": pending.get("since"),
        "deadline": pending.get("deadline"),
        "approvals": pending_approvals(run_id, pending),
    }


def pending_sleep(wait: Wait | None, gate: Sleep, step: str, visit: int, workflow: str) -> dict[str, Any]:
    """The stored form of a durable timer: due at ``deadline``, then on at ``target``."""
    now = time.time()
    return {
        "kind": "sleep",
        "seconds": gate.seconds,
        "workflow": workflow,
        "step": step,
        "visit": visit,
        "target": wait.target if wait else None,
        "on_reject": None,
        "on_timeout": None,
        "on_fail": None,
        "since": now,
        "deadline": now + gate.seconds,
        "approvals": [],
    }


async def park(
    run: LiveRun,
    name: str,
    frame: Frame,
    gate: Gate,
    wait: Wait | None,
    journal: dict[str, Any] | None = None,
) -> None:
    """Commit the run as ``waiting`` at ``gate`` (with ``journal`` entries) and let go of it.

    A pause asked for while the step ran is kept on the record (``control``), so the
    run pauses where the decision sends it instead of going on; so is a pause or stop
    another process asked for that this one has not seen yet (the commit leaves the
    flag as it is).
    """
    pending = pending_gate(wait, gate, name, run.visit, run.spec.name, run.run_id)
    fields: dict[str, Any] = {
        "status": RunStatus.WAITING,
        "pending": pending,
        "step": name,
        "visit": run.visit,
    }
    if run.pause_requested:
        fields["control"] = "pause"
    done: dict[str, Any] = {}
    if frame.state is not run.state:
        done["state"] = state_delta(run.state, frame.state)
        run.state = frame.state
        fields["state"] = frame.state
    usage = run.step_usage
    if usage.total_tokens:
        done["usage"] = usage.to_json()
    run.event("step_completed", name, done or None)
    run.step_usage = NO_USAGE
    if pending["kind"] == "sleep":
        run.event("waiting", name, {k: pending[k] for k in ("kind", "seconds", "deadline")})
    else:
        approval = pending["approvals"][0]
        keys = ("approvers", "quorum", "prompt", "context", "deadline")
        run.event("waiting", name, {**{k: approval[k] for k in keys}, "approval": approval["id"]})
    run.status = RunStatus.WAITING
    await run.commit(Commit(fields=fields, journal=journal or {}, release=True))
    run.kernel.parked(run, pending)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a decision does to a waiting run.

    Attributes:
        decision: the decision to record.
        pending: the updated ``pending`` while the run still waits (the quorum is not
            met yet, or other approvals are pending), else None.
        resume_at: where the run continues (a step name, possibly END), or None when the
            run ends with ``final``.
        final: ``"rejected"`` or ``"expired"`` when the run ends here.
    """

    decision: Decision
    pending: dict[str, Any] | None
    resume_at: str | None
    final: str | None


def choose(
    run_id: str, pending: dict[str, Any] | None, approval: str | None, decisions: Sequence[Any] = ()
) -> dict[str, Any]:
    """The approval (JSON) of ``pending`` a decision is for: ``approval``, or the only one.

    Raises:
        InvalidStateError: the run waits for no approval; several are pending and
            ``approval`` is None (the ids are listed); or ``approval`` is not pending
            (unknown, or decided already). Nothing changes.
    """
    if pending is None:
        raise InvalidStateError(f"run {run_id} is not waiting at a gate, so it cannot be decided")
    if pending.get("kind") == "sleep":
        raise InvalidStateError(
            f"run {run_id} is sleeping at step {pending.get('step')!r} until {utc(pending['deadline'])}; "
            "there is no decision to make"
        )
    approvals = normalized(run_id, pending)["approvals"]
    ids = [a["id"] for a in approvals]
    if approval is None:
        if len(approvals) == 1:
            return dict(approvals[0])
        if not approvals:
            raise InvalidStateError(f"run {run_id} waits for no approval, so there is nothing to decide")
        raise InvalidStateError(
            f"run {run_id} waits for {len(ids)} approvals: {ids}; say which one with approval=..."
        )
    for a in approvals:
        if a["id"] == approval:
            return dict(a)
    done = any(isinstance(d, dict) and d.get("approval") == approval for d in decisions)
    why = "was decided already" if done else "is not an approval of this run"
    raise InvalidStateError(f"run {run_id}: approval {approval!r} {why}; pending approvals are {ids}")


def decide(
    run_id: str,
    pending: dict[str, Any],
    approval: dict[str, Any],
    approved: bool,
    by: str,
    comment: str | None,
    data: Any,
    form: type[BaseModel] | None = None,
) -> Outcome:
    """Apply one reviewer's decision on ``approval`` (one of :func:`choose`) to ``pending``.

    With a ``form`` model, an approval's ``data`` is validated into it (None stays None).

    Raises:
        NotAuthorizedError: ``by`` is not one of the approval's approvers.
        InvalidInputError: ``data`` does not fit ``form`` (names the field).
    """
    pending = normalized(run_id, pending)
    step, aid = approval.get("step"), approval["id"]
    approvers = list(approval.get("approvers") or ())
    if by not in approvers:
        raise NotAuthorizedError(
            f"run {run_id}: {by!r} may not decide approval {aid} at step {step!r}; approvers are {approvers}"
        )
    if approved and form is not None and data is not None:
        data = _fill(run_id, step, aid, form, data)
    decision = Decision(
        approved=approved,
        by=by,
        comment=comment,
        data=pydantic_core.to_jsonable_python(data),
        approval=aid,
    )
    if not approved:
        target = pending.get("on_reject")
        return Outcome(decision, None, target, None if target else "rejected")
    waiting = short_of_quorum(pending, approval, by, decision)
    if waiting is not None:
        return waiting
    others = [a for a in pending["approvals"] if a["id"] != aid]
    if others:  # decided; the run goes on once every approval it waits for is
        return Outcome(decision, {**pending, "approvals": others}, None, None)
    return Outcome(decision, None, pending.get("target"), None)


def short_of_quorum(
    pending: dict[str, Any], approval: dict[str, Any], by: str, decision: Decision
) -> Outcome | None:
    """``by``'s approval counted: the outcome while the approval still lacks its quorum, else None."""
    votes = list(approval.get("votes") or ())
    if by not in votes:
        votes.append(by)
    if len(votes) >= int(approval.get("quorum", 1)):
        return None
    aid = approval["id"]
    approvals = [{**a, "votes": votes} if a["id"] == aid else a for a in pending["approvals"]]
    return Outcome(decision, {**pending, "approvals": approvals}, None, None)


def _fill(run_id: str, step: Any, aid: str, form: type[BaseModel], data: Any) -> BaseModel:
    """``data`` validated into ``form``; nothing is recorded when it does not fit."""
    if isinstance(data, form):
        return data
    try:
        return form.model_validate(pydantic_core.to_jsonable_python(data))
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        detail = "; ".join(f"field {'.'.join(map(str, e['loc'])) or '(data)'!r}: {e['msg']}" for e in errors)
        raise InvalidInputError(
            f"run {run_id}, step {step!r}: data for approval {aid} does not fit the form "
            f"{form.__name__}: {detail}",
            errors=errors,
        ) from None
    except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"run {run_id}, step {step!r}: data for approval {aid} is not JSON-able: {exc}"
        ) from None


def form_of(spec: WorkflowSpec, step: str | None, data: Any = None) -> type[BaseModel] | None:
    """The form model of the gate at ``step``, as the workflow's code declares it.

    A step that may wait with one of several forms has them all declared; the first
    ``data`` fits is the one (without ``data``: the first).
    """
    if step is None:
        return None
    models = spec.forms.get(step)
    if models is None and spec.main is not None:  # imperative: the gates of the main function
        models = spec.forms.get(spec.main.name)
    if not models:
        return None
    if data is None or len(models) == 1:
        return models[0]
    for model in models:
        try:
            model.model_validate(data)
        except ValidationError:
            continue
        return model
    return models[0]


def typed_decision(spec: WorkflowSpec, stored: dict[str, Any]) -> Decision:
    """A stored decision with its ``data`` back in the gate's form model (when it has one)."""
    decision = Decision.from_json(stored)
    if decision.data is None or not decision.approved:
        return decision
    model = form_of(spec, stored.get("step"), decision.data)
    if model is None:
        return decision
    return dataclasses.replace(decision, data=model.model_validate(decision.data))


def time_out(pending: dict[str, Any], run_id: str = "") -> Outcome:
    """The outcome of a gate whose deadline passed with no quorum."""
    approvals = pending_approvals(run_id, pending)
    aid = approvals[0]["id"] if approvals else None
    decision = Decision(approved=False, by=None, comment="timed out", timed_out=True, approval=aid)
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
    """The timeout of ``rec``'s gate, if its deadline passed (a timer is not a gate: see :func:`wake`)."""
    if rec.status != RunStatus.WAITING or not rec.pending:
        return None
    if rec.pending.get("kind") in ("sleep", "children", "tools"):  # tools: see tool_gates.past_deadline
        return None
    deadline = rec.pending.get("deadline")
    if deadline is None or deadline > time.time():
        return None
    return Transition.of(rec, time_out(rec.pending, rec.run_id))


def wake(rec: RunRecord) -> Transition | None:
    """A sleeping run whose timer is due goes on at its target; None when it is not (or no longer) due.

    Pure and judged on the record alone, so of two processes sweeping the same timer
    (through ``Store.update``) only the first moves the run on.
    """
    pending = rec.pending
    if rec.status != RunStatus.WAITING or not pending or pending.get("kind") != "sleep":
        return None
    deadline = pending.get("deadline")
    if deadline is None or deadline > time.time():
        return None
    data = {"timer": True, "deadline": deadline, "late": round(max(0.0, time.time() - deadline), 6)}
    events: list[tuple[str, str | None, Any]] = [("resumed", pending.get("step"), data)]
    return Transition({"pending": None}, events, pending.get("target") or END)


def apply(
    rec: RunRecord, now: float, t: Transition, owner: str | None, lease_ttl: float
) -> tuple[Change, Lease | None]:
    """The store change ``t`` makes to ``rec`` (``now`` is the store's clock).

    Resuming takes a new lease for ``owner`` (``None``: the run is left without one, for a
    worker to take) — unless a pause or stop was asked for
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
        elif owner is None:  # for a worker to take (``WorkflowRunner(execute=False)``)
            fields.update(status=RunStatus.RUNNING, step=t.resume_at, lease_owner=None, lease_expires=0.0)
            kinds.append(("step_started", t.resume_at, None))
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
