"""The store contract: what a store keeps, the records it trades in, and the ``Store`` Protocol.

A store keeps, per run: the :class:`RunRecord`, an append-only list of step outputs,
an append-only list of events, and a journal (key → JSON value) for replayed work
(agent replies, imperative steps, finished parallel branches).

Writes come in two kinds:

* ``commit`` is the owner's hot path: a fenced delta (the caller holds the lease with
  that token) applied atomically with its outputs, events and journal entries, one
  round trip on a networked store. Each commit carries ``seq``, the owner's commit
  number; the record remembers the ``(lease token, seq)`` of the last commit applied,
  so a retry of a commit whose reply was lost is recognised and applied once, whatever
  other writers did to the run in between.
* ``update`` is for everyone else (decisions, pause/stop requests, resuming, taking a
  lease): an atomic read-modify-write of the whole record. ``change(record, now)`` gets
  ``now`` from the *store's* clock, so leases are judged by one clock however skewed
  the machines around it are; it may be called more than once (a conflict, a retry
  after a lost reply that sees the first attempt's write) and must be pure.

Leases: ``lease_expires`` is in the store's clock. ``renew`` extends it from the
store's ``now``; ``recoverable`` lists running runs whose lease ran out by that clock.

Listing costs what it returns: ``list_runs`` (by workflow and status, newest first,
paged) and ``recoverable`` read indexes, not every stored run. Listed records are
*light*: ``input``, ``state`` and ``output`` are None. A record that cannot be decoded
is listed with ``corrupt`` set to the reason, and ``get``/``load`` raise
:class:`~agentflow.errors.CorruptRecordError` for it; it never hides the other runs.

Values are JSON-able Python data or pydantic models; a store writes them as JSON and
hands back plain JSON data, never an object built by name. A value that cannot be
written raises :class:`~agentflow.errors.StoreError` before anything is written.

Errors: ``StoreError`` when the store cannot be reached (after the store's own bounded
retries) — a commit that raised it may or may not have applied, and retrying it with
the same ``seq`` is safe; ``LeaseLostError`` when the fence no longer holds.

The capabilities a store may have beyond this (a work queue, a change feed, taking a
run in one operation, rate limits, credentials) are in :mod:`agentflow.stores.capabilities`.

The suite in :mod:`agentflow.testing.store_conformance` pins this contract for every
store, ours and others'.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from ..types import Approval, Decision, ParentRef, RunEvent, RunInfo, RunStatus, Usage, utc

__all__ = [
    "COMMIT_FIELDS",
    "Change",
    "Commit",
    "Lease",
    "LoadedRun",
    "OutputRecord",
    "RunRecord",
    "Store",
    "approval_id",
    "indexed_approvals",
    "pending_approvals",
]


def approval_id(run_id: str, step: str, visit: int, n: int | str = 0) -> str:
    """The id of approval ``n`` of ``step``'s visit ``visit`` in ``run_id`` (0 for a gate;
    a tool call's approvals are named by the call's journal key and what they decide).

    Derived, not drawn: a run parked again at the same place after a crash waits for
    the same approval, and ids are unique across runs.
    """
    digest = hashlib.sha256(f"{run_id}\0{step}\0{visit}\0{n}".encode()).hexdigest()
    return "ap_" + digest[:20]


def indexed_approvals(record: RunRecord) -> list[dict[str, Any]]:
    """What a store lists of ``record`` in :meth:`Store.approvals`: a waiting run's approvals.

    Each is complete (``run_id`` and ``workflow`` from the record when the stored JSON
    lacks them).
    """
    if record.status != RunStatus.WAITING:
        return []
    found = pending_approvals(record.run_id, record.pending)
    return [
        a
        if a.get("run_id") == record.run_id and a.get("workflow") == record.workflow
        else {**a, "run_id": record.run_id, "workflow": record.workflow}
        for a in found
    ]


def pending_approvals(run_id: str, pending: Any) -> list[dict[str, Any]]:
    """The approvals (Approval JSON) a run's ``pending`` waits for; [] when it waits for none.

    A gate parked before approvals had ids (``kind: "human_approval"``, its votes in
    ``approvals`` as names) reads as the one approval it is, with the id it gets now.
    """
    if not isinstance(pending, Mapping):
        return []
    found = pending.get("approvals")
    if pending.get("kind") == "human_approval" or (
        "kind" not in pending and "approvers" in pending
    ):  # the gate's own fields at the top, its votes as names
        step, visit, since = pending.get("step"), pending.get("visit"), pending.get("since")
        return [
            {
                "id": approval_id(run_id, str(step), int(visit or 0)),
                "kind": "gate",
                "run_id": run_id,
                "workflow": pending.get("workflow"),
                "step": step,
                "visit": visit,
                "approvers": list(pending.get("approvers") or ()),
                "quorum": pending.get("quorum", 1),
                "prompt": pending.get("prompt"),
                "context": pending.get("context"),
                "form": None,
                "deadline": pending.get("deadline"),
                "votes": [v for v in found or () if isinstance(v, str)],
                "created_at": since if isinstance(since, int | float) else 0.0,
                "agent": None,
                "tool": None,
                "arguments": None,
            }
        ]
    if not isinstance(found, list):
        return []
    return [a for a in found if isinstance(a, dict) and isinstance(a.get("id"), str)]


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """One step output in a run's history: ``visit`` orders them."""

    visit: int
    step: str
    value: Any

    def to_json(self) -> dict[str, Any]:
        """The stored form."""
        return {"visit": self.visit, "step": self.step, "value": self.value}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OutputRecord:
        """Read the stored form back."""
        return cls(int(data["visit"]), str(data["step"]), data.get("value"))


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A run as a store holds it (everything but its outputs, events and journal).

    Attributes:
        step: the step to run next, or the step in flight while running.
        visit: how many steps the run has started (the ``max_steps`` count).
        pending: the waiting gate (JSON) while status is ``waiting``.
        decisions: every decision taken at the run's gates (JSON).
        error: ``{"step", "type", "message", "traceback"}`` when failed.
        event_count: how many events the run's history holds.
        lease_owner / lease_token / lease_expires: who advances the run, its fencing
            token, and the Unix time

            (store clock) its lease runs out.
        control: ``"pause"`` or ``"stop"`` when another process asked the owner to.
        commit_token / commit_seq: the lease token and ``Commit.seq`` of the last
            commit applied (what makes a retried commit apply once).
        parent: ``{"run_id", "step", "visit", "index"}`` (JSON) for a child run: the run
            and step that started it (``index``: its position in a ``Parallel.map`` of
            children, else None); None for a run started on its own. Set at create.
        children: ids of every child run this run started, in the order it started
            them (append-only; a commit may set it).
        version: the workflow version the run is at (``Workflow(..., version=...)``):
            set at create, moved on by a migration; a record stored before versions
            existed reads as ``"1"``.
        corrupt: set (to the reason) only on a listed record that could not be decoded.
    """

    run_id: str
    workflow: str
    status: RunStatus
    input: Any
    state: Any = None
    step: str | None = None
    visit: int = 0
    pending: Any = None
    decisions: tuple[Any, ...] = ()
    output: Any = None
    error: Any = None
    usage: Any = None
    created_at: float = 0.0
    updated_at: float = 0.0
    event_count: int = 0
    lease_owner: str | None = None
    lease_token: int = 0
    lease_expires: float = 0.0
    control: str | None = None
    commit_token: int = 0
    commit_seq: int = 0
    parent: Any = None
    children: tuple[str, ...] = ()
    version: str = "1"
    corrupt: str | None = None

    def info(self) -> RunInfo:
        """The public snapshot of this record."""
        error = self.error
        if self.corrupt is not None:
            error = {"step": self.step, "type": "CorruptRecordError", "message": self.corrupt}
        approvals = tuple(Approval.from_json(dict(a)) for a in pending_approvals(self.run_id, self.pending))
        return RunInfo(
            run_id=self.run_id,
            workflow=self.workflow,
            status=self.status,
            step=self.step,
            error=error,
            usage=Usage.from_json(self.usage),
            created_at=utc(self.created_at),
            updated_at=utc(self.updated_at),
            decisions=tuple(Decision.from_json(d) for d in self.decisions),
            pending=approvals[0] if approvals else None,
            approvals=approvals,
            parent=ParentRef.from_json(self.parent),
            children=tuple(self.children),
            version=self.version,
        )


#: RunRecord fields a :class:`Commit` may set.
COMMIT_FIELDS = frozenset(
    {
        "status",
        "state",
        "step",
        "visit",
        "pending",
        "decisions",
        "output",
        "error",
        "usage",
        "control",
        "children",
        "version",
    }
)


@dataclass(slots=True)
class Commit:
    """What the owner of a run writes in one atomic commit.

    Attributes:
        fields: RunRecord fields to set (names from ``COMMIT_FIELDS``).
        outputs: step outputs to append to the run's history.
        events: events to append (their ``seq`` continue ``event_count``).
        journal: journal entries to write (key → JSON-able value).
        release: drop the lease: the run leaves this process (waiting, paused, final).
        seq: the owner's commit number, one more than the last (``RunRecord.commit_seq``
            of the record it loaded, plus one per commit since).
    """

    fields: dict[str, Any] = field(default_factory=dict)
    outputs: list[OutputRecord] = field(default_factory=list)
    events: list[RunEvent] = field(default_factory=list)
    journal: dict[str, Any] = field(default_factory=dict)
    release: bool = False
    seq: int = 0


@dataclass(frozen=True, slots=True)
class Lease:
    """Proof of ownership of a run: the owner's id and the fencing token."""

    owner: str
    token: int


@dataclass(slots=True)
class Change:
    """What an ``update`` writes: the new record and events to append.

    The store sets ``updated_at`` and ``event_count`` itself; events' ``seq`` continue
    the stored count.
    """

    record: RunRecord
    events: list[RunEvent] = field(default_factory=list)

    def written_over(self, old: RunRecord, now: float) -> RunRecord:
        """The record this change writes over ``old`` at ``now`` (the store's clock): its
        ``updated_at``, the event count continued, and the commits' fence (``commit_token``,
        ``commit_seq``) left as it was: it is the commits' alone."""
        return replace(
            self.record,
            updated_at=now,
            event_count=old.event_count + len(self.events),
            commit_token=old.commit_token,
            commit_seq=old.commit_seq,
        )


@dataclass(slots=True)
class LoadedRun:
    """A run as read back for resuming: record, outputs and journal."""

    record: RunRecord
    outputs: list[OutputRecord]
    journal: dict[str, Any]


#: ``update``'s callable: the current record and the store's clock → the change, or None.
ChangeFn = Callable[[RunRecord, float], "Change | None"]


@runtime_checkable
class Store(Protocol):
    """Where runs live. Implementations: memory, SQLite, Redis (and yours: see the module doc)."""

    async def create(self, record: RunRecord, events: Sequence[RunEvent]) -> bool:
        """Store a new run; False (and nothing written) if the run id exists.

        A retry after a lost reply returns True when the first attempt created it.
        """
        ...

    async def get(self, run_id: str) -> RunRecord | None:
        """The run's record, or None.

        Raises:
            CorruptRecordError: the stored record cannot be read.
        """
        ...

    async def load(self, run_id: str) -> LoadedRun | None:
        """The record with its outputs and journal, read in one snapshot; or None."""
        ...

    async def commit(self, run_id: str, lease: Lease, commit: Commit) -> str | None:
        """Apply ``commit`` atomically if ``lease`` still holds; return the control flag.

        A commit whose ``(lease.token, commit.seq)`` is already the record's
        ``(commit_token, commit_seq)`` was applied before (a retry after a lost reply):
        nothing is written again and the control flag is returned. A commit does not
        extend the lease (``renew`` does); with ``commit.release`` the lease is dropped.
        When ``commit.fields`` moves the run to a final status, a store with a ``ttl``
        sets the run to expire.

        Raises:
            LeaseLostError: the lease no longer holds; nothing was written.
        """
        ...

    async def renew(self, run_id: str, lease: Lease, ttl: float) -> str | None:
        """Extend the lease to ``ttl`` seconds past the store's now; return the control flag.

        Raises:
            LeaseLostError: the lease no longer holds.
        """
        ...

    async def update(self, run_id: str, change: ChangeFn) -> RunRecord | None:
        """Read-modify-write the record atomically; ``change(record, now)`` with the store's clock.

        Returns the record as written, the unchanged record when ``change`` returned
        None, or None when the run does not exist. Errors ``change`` raises propagate and
        nothing is written.
        """
        ...

    async def events(self, run_id: str, after: int = 0) -> list[RunEvent]:
        """The run's events with ``seq`` greater than ``after``, in order."""
        ...

    async def list_runs(
        self,
        workflow: str | None = None,
        status: RunStatus | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[RunRecord]:
        """Light records (no input, state, output), newest first, at most ``limit``.

        ``after`` is the ``run_id`` of the last record of the previous page. From an
        index: the cost follows what is returned, not what is stored.
        """
        ...

    async def recoverable(self, workflow: str, limit: int = 100) -> list[str]:
        """Ids of ``workflow``'s running runs whose lease ran out by the store's clock."""
        ...

    async def approvals(
        self,
        approver: str | None = None,
        workflow: str | None = None,
        kind: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[dict[str, Any]]:
        """Pending approvals (Approval JSON) of waiting runs across the store, newest first.

        Newest is by ``created_at``, then ``id``, descending. Filters: one of an
        approval's ``approvers``, the run's ``workflow``, the approval's ``kind``.
        ``after`` is the id of the last approval of the previous page, and may have
        been decided since. From an index kept with each run's ``pending`` (by create,
        commit, update, delete and expiry): the cost follows what is returned.

        Raises:
            StoreError: ``after`` is an approval the store does not know (its run was
                deleted since); list again from the first page.
        """
        ...

    async def due_gates(self, workflow: str, now: float) -> list[str]:
        """Ids of runs of ``workflow`` waiting at a gate whose deadline is at or before ``now``."""
        ...

    async def delete(self, run_id: str) -> bool:
        """Remove a run and everything stored with it; False if it did not exist."""
        ...

    def sibling(self) -> Store | None:
        """A store on the same data for another thread's event loop, or None.

        The runtime renews leases from a thread of its own (so a step that blocks the
        event loop does not lose its run); a store that cannot be shared that way
        returns None and its leases are renewed on the event loop.
        """
        ...

    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...
