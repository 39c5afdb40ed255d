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

The suite in :mod:`agentflow.testing.store_conformance` pins this contract for every
store, ours and others'.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
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
    "ChangeFeed",
    "TakesRuns",
    "Claim",
    "Credentials",
    "QueueDepth",
    "Quota",
    "REDELIVER_AFTER",
    "RateLimits",
    "WorkQueue",
    "approval_id",
    "claim_waiting",
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


#: Seconds after which an entry a worker claimed and did not acknowledge (it died in
#: between) is delivered again. A claim is acknowledged as soon as the run's lease is
#: taken, so this only covers the moment between the two.
REDELIVER_AFTER = 30.0


@dataclass(frozen=True, slots=True)
class Claim:
    """A queue entry delivered to a worker; :meth:`WorkQueue.ack` it once the run is taken.

    Attributes:
        workflow: the queue (one per workflow).
        run_id: the run handed over.
        receipt: what ``ack`` needs to find the entry (store-specific).
        enqueued_at: when it was handed over (the store's clock, seconds).
    """

    workflow: str
    run_id: str
    receipt: str
    enqueued_at: float


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """What waits in a workflow's queue: entries not yet claimed, and the oldest one's age."""

    waiting: int
    oldest_age: float | None


async def claim_waiting(
    attempt: Callable[[], Awaitable[list[Claim]]], arrived: asyncio.Event | None, wait: float, poll: float
) -> list[Claim]:
    """What a store's ``claim`` does while its queues are empty: ``attempt()`` again until it
    claims something or ``wait`` seconds passed.

    Between two attempts it waits for ``arrived`` (set by the store when an entry may have
    been queued; cleared before each attempt, so one queued meanwhile is not missed), at
    most ``poll`` seconds.
    """
    deadline = time.monotonic() + wait
    while True:
        if arrived is not None:
            arrived.clear()
        claims = await attempt()
        left = deadline - time.monotonic()
        if claims or left <= 0:
            return claims
        if arrived is None:
            await asyncio.sleep(min(left, poll))
            continue
        try:
            async with asyncio.timeout(min(left, poll)):
                await arrived.wait()
        except TimeoutError:
            pass


@runtime_checkable
class WorkQueue(Protocol):
    """The hand-over of runs to workers (§16): one queue per workflow, in the store.

    Delivery is at least once: a run's lease, not the queue, makes the work happen once
    (a worker takes the lease of a run it claims, and a claim of a run someone else
    holds, or that no longer exists, is acknowledged and dropped). Entries are claimed
    oldest first, never more than asked for, and only from the queues named.
    """

    async def enqueue(self, workflow: str, run_id: str) -> None:
        """Hand ``run_id`` to the workers that serve ``workflow``."""
        ...

    async def claim(self, workflows: Sequence[str], consumer: str, limit: int, wait: float) -> list[Claim]:
        """Up to ``limit`` entries of these workflows' queues for ``consumer``.

        Waits up to ``wait`` seconds while there are none. An entry claimed and not
        acknowledged within :data:`REDELIVER_AFTER` seconds is delivered again.
        """
        ...

    async def ack(self, claims: Sequence[Claim]) -> None:
        """The worker is done with these entries: they are not delivered again."""
        ...

    async def queue_depth(self, workflow: str) -> QueueDepth:
        """How many entries of ``workflow`` wait, and how long the oldest has."""
        ...


@runtime_checkable
class ChangeFeed(Protocol):
    """A store that pushes changes: watchers of a run another process advances are woken
    by it within milliseconds instead of polling the store (§16).
    """

    async def changes(self, changed: Callable[[str], None]) -> None:
        """Call ``changed(run_id)`` when a run is created or its status, pending approvals or
        control flag change, by any process, until cancelled (a store may tell of more
        writes than these).

        Raises:
            StoreError: the feed was cut (the caller starts it again; changes made while
                it was down are not replayed, so the caller looks at the store then).
        """
        ...


@runtime_checkable
class TakesRuns(Protocol):
    """A store that takes a run handed over to a worker and loads it in one operation.

    What ``update`` (giving the run an owner) and ``load`` do one after the other, for
    the common case of a worker's claim: a store without it is used through those two.
    """

    async def take(
        self, run_id: str, workflow: str, owner: str, ttl: float
    ) -> tuple[Lease, LoadedRun] | None:
        """Give a run that is running, of ``workflow`` and without an owner a lease held by
        ``owner`` (the next token, ``ttl`` seconds from the store's now), and load it.

        Returns None, changing nothing, for any other run (or no run): the caller's
        ``update`` decides what it is. Safe to call again after a lost reply.
        """
        ...


@dataclass(frozen=True, slots=True)
class Quota:
    """One rate limit in numbers, as a store enforces it (an agent's ``RateLimit``).

    Attributes:
        requests: calls allowed in any ``window`` seconds, or None.
        tokens: tokens allowed in any ``window`` seconds, or None.
        concurrent: calls in flight at most, or None.
        window: the sliding window, seconds.
        hold: seconds a concurrency slot stays taken unless renewed (a dead holder's).
    """

    requests: int | None
    tokens: int | None
    concurrent: int | None
    window: float
    hold: float


@runtime_checkable
class RateLimits(Protocol):
    """A store that keeps rate limits shared by every process using it (§16, optional).

    A limit is named by ``key``; a call by ``ticket`` (unique per call). The store's
    clock judges the window, so processes whose clocks disagree share one limit. All
    three methods are idempotent by ticket: sent again after a lost reply, they apply
    once.
    """

    async def acquire_limit(
        self, key: str, ticket: str, quota: Quota, tokens: int
    ) -> tuple[float, str | None]:
        """Take a turn for ``ticket`` if every limit of ``quota`` allows it now.

        Granted, the call is counted (with ``tokens`` reserved), holds a concurrency
        slot when ``quota.concurrent`` is set, and ``(0.0, None)`` comes back. Otherwise
        nothing is taken, and the answer is the seconds to wait before asking again with
        the limit that asks for the longest wait (``"requests_per_minute"``,
        ``"tokens_per_minute"``, ``"concurrent"``). A call larger than ``quota.tokens``
        is granted in a window with no other call in it.
        """
        ...

    async def renew_limit(self, key: str, ticket: str, quota: Quota) -> None:
        """Keep ``ticket``'s concurrency slot for another ``quota.hold`` seconds."""
        ...

    async def release_limit(self, key: str, ticket: str, quota: Quota, tokens: int | None) -> None:
        """Give back ``ticket``'s slot; count ``tokens`` for its call instead of its reservation
        (None: keep the reservation)."""
        ...


@runtime_checkable
class Credentials(Protocol):
    """A store that keeps small JSON records beside the runs (optional): the review page's
    reviewers (token hashes) and its session-signing key live here (§15).

    Records live under the store's ``key_prefix`` (stores with different prefixes never
    see each other's), are shared by every process using the store, and do not expire.
    A key is a non-empty string; a value a JSON object (a ``dict`` of JSON-able data),
    read back as plain JSON. Each call is atomic; ``put_credential(..., only_new=True)``
    is the put-if-absent that lets processes starting together agree on one value.

    Errors: ``StoreError`` when the store cannot be reached, or the value cannot be
    written (raised before anything is written), or a stored value cannot be read.
    """

    async def put_credential(self, key: str, value: dict[str, Any], only_new: bool = False) -> bool:
        """Write ``value`` under ``key``; True when written.

        With ``only_new``, nothing is written and False comes back when ``key`` holds a
        value already (whoever wrote it).
        """
        ...

    async def get_credential(self, key: str) -> dict[str, Any] | None:
        """The value under ``key``, or None."""
        ...

    async def delete_credential(self, key: str) -> bool:
        """Remove ``key``; False when it held nothing."""
        ...

    async def list_credentials(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        """Every ``(key, value)`` whose key starts with ``prefix`` (literally), by key."""
        ...
