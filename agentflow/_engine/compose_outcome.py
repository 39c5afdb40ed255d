"""How child runs ended, as their parent's step sees them: :class:`ChildOutcome`, read back.

A child that ended in this process is known without a read (the kernel keeps its
outcome until the parent reads it); the others are read from the store.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ..definition.parallel import BranchError
from ..errors import RunFailedError, RunRejectedError, RunStoppedError
from ..stores.contract import RunRecord
from ..types import FINAL, NO_USAGE, RunStatus, Usage
from .run import LiveRun
from .values import run_output

__all__ = ["ChildOutcome", "add_usage", "ended_here", "read_children"]

#: Children read from the store at once when a parent's step finishes.
_READ_BATCH = 64


@dataclass(frozen=True, slots=True)
class ChildOutcome:
    """How a child run ended, as its parent's step sees it."""

    run_id: str
    workflow: str
    status: RunStatus
    value: Any = None
    usage: Usage = NO_USAGE
    error: dict[str, Any] | None = None
    decision: dict[str, Any] | None = None
    step: str | None = None
    #: The child has not ended (it was retried, or reset, since the parent was resumed).
    going: bool = False

    @property
    def ok(self) -> bool:
        """The child completed."""
        return self.status is RunStatus.COMPLETED

    @property
    def rejected(self) -> bool:
        """The child ended at a gate (rejected, or expired without a decision)."""
        return self.status in (RunStatus.REJECTED, RunStatus.EXPIRED)

    def exception(self) -> Exception:
        """The error the parent's step fails with (or ``ctx.run`` raises)."""
        if self.status is RunStatus.STOPPED:
            return RunStoppedError(self.run_id, self.step)
        if self.rejected:
            d = self.decision or {}
            return RunRejectedError(self.run_id, self.status.value, d.get("comment"), d.get("by"))
        err = self.error or {}
        return RunFailedError(
            self.run_id,
            err.get("step"),
            err.get("type", "Error"),
            err.get("message", ""),
            err.get("traceback", ""),
        )

    def branch_error(self) -> BranchError:
        """The result a routed (``on_fail``, ``on_reject``) or collected failure leaves."""
        exc = self.exception()
        return BranchError(self.run_id, type(exc).__name__, str(exc))

    def to_json(self) -> dict[str, Any]:
        """The stored form of a failure (an imperative journal entry)."""
        return {
            "run_id": self.run_id,
            "workflow": self.workflow,
            "status": self.status.value,
            "error": self.error,
            "decision": self.decision,
            "step": self.step,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChildOutcome:
        """Read a stored failure back."""
        return cls(
            str(data["run_id"]),
            str(data["workflow"]),
            RunStatus(data["status"]),
            error=data.get("error"),
            decision=data.get("decision"),
            step=data.get("step"),
        )


def _outcome(run: LiveRun, ref: dict[str, Any], rec: RunRecord | None) -> ChildOutcome:
    cid, wf = str(ref["run_id"]), str(ref["workflow"])
    if rec is None:
        error = {"step": None, "type": "RunNotFoundError", "message": f"child run {cid} vanished"}
        return ChildOutcome(cid, wf, RunStatus.FAILED, error=error)
    usage = Usage.from_json(rec.usage)
    if rec.status is RunStatus.COMPLETED:
        try:
            spec = run.kernel.child_kernel(wf).spec
        except KeyError:
            value = rec.output
        else:
            value = run_output(spec, cid, rec.output)
        return ChildOutcome(cid, wf, rec.status, value, usage, step=rec.step)
    if rec.status not in FINAL:
        # Only a parent whose children all ended is resumed: this one was reset meanwhile.
        error = {"step": rec.step, "type": "InvalidStateError", "message": f"child run {cid} is {rec.status}"}
        return ChildOutcome(cid, wf, RunStatus.FAILED, usage=usage, error=error, step=rec.step, going=True)
    decision = dict(rec.decisions[-1]) if rec.decisions else None
    return ChildOutcome(cid, wf, rec.status, None, usage, rec.error, decision, rec.step)


async def read_children(run: LiveRun, refs: list[dict[str, Any]]) -> list[ChildOutcome]:
    """How each child in ``refs`` ended, in order.

    A child that completed in this process is known without a read; the others are
    read from the store, a batch at a time.
    """
    kernel = run.kernel
    known = kernel.ended_children(run.run_id)
    store = kernel.store
    out: list[ChildOutcome | None] = [known.get(str(r["run_id"])) for r in refs]
    missing = [i for i, o in enumerate(out) if o is None]
    for j in range(0, len(missing), _READ_BATCH):
        chunk = missing[j : j + _READ_BATCH]
        recs = await asyncio.gather(*(store.get(str(refs[i]["run_id"])) for i in chunk))
        for i, rec in zip(chunk, recs, strict=True):
            out[i] = _outcome(run, refs[i], rec)
    kernel.forget_children(run.run_id)
    return [o for o in out if o is not None]


async def ended_here(run: LiveRun, refs: list[dict[str, Any]]) -> bool:
    """True when every child in ``refs`` ended in this process, after one turn of the loop.

    Children that finish at once (in memory, a few plain steps) then complete the
    parent's step without parking it: the parent never let go of its lease, so it goes
    on exactly once, and a crash before its commit runs the step again, which finds
    the same (ended) children.
    """
    await asyncio.sleep(0)
    ended = run.kernel.ended_children(run.run_id)
    return all(str(r["run_id"]) in ended for r in refs)


def add_usage(run: LiveRun, outcomes: list[ChildOutcome]) -> bool:
    """Add the children's usage to the run's (and the step's); True when there was any."""
    total = NO_USAGE
    for o in outcomes:
        if o.usage.total_tokens:
            total = total + o.usage
    if not total.total_tokens:
        return False
    run.usage = run.usage + total
    run.step_usage = run.step_usage + total
    return True
