"""Listeners to approvals: told when a stored commit parks a run on approvals, and when one is decided.

The supervisor calls its listeners (:class:`ApprovalListener`, shared by a runner's
supervisors, its children's workflows' included) at two places only:

* after a run's commit as ``waiting`` on approvals is stored (a gate, tool calls), with
  the approvals it waits for (:func:`announce_pending`);
* after a transition that records a decision is stored (a reviewer's, or a timeout's:
  ``Decision.timed_out``), once the approval has left the run's pending — a vote that
  leaves the quorum short decides nothing yet (:func:`announce_decided`).

They are called in the event loop, synchronously, and must not block: a webhook sender
queues what it is told and sends it from a task of its own. A listener that raises is
logged and never fails the run. A process announces what it stores: a decision made by
another process (a worker, the CLI) is announced there, if anywhere.

With no listener, none of this costs the run anything: the step path is untouched, and
a park or a decision looks at one empty list.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from ..stores.contract import RunRecord, pending_approvals
from ..types import Approval, Decision, RunEvent

__all__ = ["ApprovalListener", "announce_decided", "announce_pending"]

log = logging.getLogger("agentflow")


class ApprovalListener(Protocol):
    """Told of approvals as they are stored; both methods are sync and must return at once."""

    def pending(self, workflow: str, run_id: str, approvals: Sequence[Approval]) -> None:
        """``run_id`` (of ``workflow``) now waits for ``approvals``: its commit is stored."""
        ...

    def decided(self, workflow: str, run_id: str, approval: Approval, decision: Decision) -> None:
        """``approval`` of ``run_id`` was decided (``decision.timed_out``: it expired); it is stored."""
        ...


def announce_pending(
    listeners: Sequence[ApprovalListener], workflow: str, run_id: str, pending: dict[str, Any]
) -> None:
    """Tell ``listeners`` of the approvals ``pending`` (a stored park) holds; none for a timer."""
    found = pending_approvals(run_id, pending)
    if not found:
        return
    approvals = [Approval.from_json({**a, "workflow": workflow, "run_id": run_id}) for a in found]
    for listener in listeners:
        try:
            listener.pending(workflow, run_id, approvals)
        except Exception:
            log.exception("run %s: an approval listener failed on approval_pending", run_id)


def announce_decided(
    listeners: Sequence[ApprovalListener],
    before: RunRecord,
    events: Sequence[RunEvent],
    after: RunRecord,
) -> None:
    """Tell ``listeners`` of each decision ``events`` record that ``after`` (the stored record) holds.

    ``before`` and ``events`` are those of the last attempt of the transition that made
    a change (an earlier attempt whose reply was lost may have stored it): a decision
    counts when its id is among the stored ones (an attempt whose write lost a race
    stored nothing) and its approval no longer pending.
    """
    decisions = [e.data for e in events if e.kind == "decided" and isinstance(e.data, dict)]
    if not decisions:
        return
    stored = {d.get("id") for d in after.decisions if isinstance(d, dict)}
    still = {a["id"] for a in pending_approvals(after.run_id, after.pending)}
    shown = {a["id"]: a for a in pending_approvals(before.run_id, before.pending)}
    for data in decisions:
        aid = data.get("approval")
        if data.get("id") not in stored or aid in still or aid not in shown:
            continue
        approval = Approval.from_json({**shown[aid], "workflow": before.workflow, "run_id": before.run_id})
        decision = Decision.from_json(data)
        for listener in listeners:
            try:
                listener.decided(before.workflow, before.run_id, approval, decision)
            except Exception:
                log.exception("run %s: an approval listener failed on approval_decided", before.run_id)
