"""In-memory store: runs live as long as the process. The default without persistence.

It keeps the contract as strictly as the durable stores: commit fields and record
scalars are checked, and every value is encoded to JSON when it comes in (what is not
JSON-able is refused, as SQLite and Redis refuse it, before anything is written) and
decoded when it goes out, so a run sees the same plain JSON data whether it lives here
or was reloaded from a durable store, and no caller can change a stored value in place.
A run's stored form: :mod:`agentflow.stores.memory_records`.

Listing reads indexes (:mod:`agentflow.stores.memory_index`, read through
:mod:`agentflow.stores.memory_listing`): per workflow and status, so ``list_runs``
costs the page it returns and ``recoverable`` and ``due_gates`` look at running and
waiting runs only; pending approvals per workflow, kind and approver.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from typing import Any

import pydantic_core

from ..errors import LeaseLostError, StoreError
from ..types import FINAL, RunEvent, RunStatus
from .capabilities import Claim, QueueDepth, create_then_enqueue
from .codec import JSON_FIELDS, check_commit_fields, deadline_of, decode, encode, encode_event
from .contract import Change, ChangeFn, Commit, Lease, LoadedRun, RunRecord, Store
from .memory_credentials import MemoryCredentials
from .memory_index import ApprovalIndex, RunIndex
from .memory_listing import MemoryListing
from .memory_queue import MemoryQueue
from .memory_records import (
    INF,
    NULL,
    Event,
    Run,
    encode_record,
    read_event,
    read_output,
    record_of,
    store_event,
    store_output,
)

__all__ = ["MemoryStore"]


class MemoryStore(MemoryCredentials, MemoryListing):
    """Keeps runs in dicts. Every operation completes without yielding, so each is atomic.

    The store's clock is ``time.time()``. Nothing survives the process, and
    :meth:`sibling` is None: another thread's event loop cannot share these dicts.

    Args:
        ttl: seconds a finished run is kept, or None to keep it.
    """

    def __init__(self, ttl: float | None = None) -> None:
        self.ttl = ttl
        self._runs: dict[str, Run] = {}
        self._index = RunIndex()
        self._expiring: list[tuple[float, str]] = []  # a heap of (expires, run_id)
        self._approvals = ApprovalIndex()
        self._queue = MemoryQueue()
        self._credentials = {}

    # -- bookkeeping ---------------------------------------------------------------

    def _get(self, run_id: str) -> Run | None:
        run = self._runs.get(run_id)
        if run is None or run.expires is None:
            return run
        if run.expires <= time.time():
            self._drop(run_id)
            return None
        return run

    def _drop(self, run_id: str) -> bool:
        run = self._runs.pop(run_id, None)
        if run is None:
            return False
        fields = run.fields
        self._index.remove(run.sort_key, fields["workflow"], fields["status"])
        for approval_id in run.approvals:
            self._approvals.unfile(approval_id)
        return True

    def _file_approvals(self, run_id: str, run: Run) -> None:
        """Keep the store's approval lists in step with the run's ``pending`` and status."""
        fields = run.fields
        run.approvals = self._approvals.file(
            run_id, fields["workflow"], fields["status"], fields["pending"], run.approvals
        )

    def _purge(self) -> None:
        """Drop the finished runs whose ttl ran out."""
        heap, now = self._expiring, time.time()
        while heap and heap[0][0] <= now:
            expires, run_id = heapq.heappop(heap)
            run = self._runs.get(run_id)
            if run is not None and run.expires == expires:
                self._drop(run_id)

    def _set_expiry(self, run_id: str, run: Run, now: float) -> None:
        if self.ttl is not None and run.fields["status"] in FINAL:
            run.expires = now + self.ttl
            heapq.heappush(self._expiring, (run.expires, run_id))

    # -- the Store protocol --------------------------------------------------------

    async def create(self, record: RunRecord, events: Sequence[RunEvent]) -> bool:
        """Store a new run; False (and nothing written) if the run id exists."""
        run_id = record.run_id
        fields = encode_record(record)
        bodies = [store_event(run_id, e) for e in events]
        if self.ttl is not None:
            self._purge()
        if self._get(run_id) is not None:
            return False
        fields["event_count"] += len(bodies)
        run = self._runs[run_id] = Run(fields, bodies)
        if record.pending is not None:
            run.deadline = deadline_of(record.pending)
        self._index.add((fields["created_at"], run_id), fields["workflow"], fields["status"])
        if fields["status"] == RunStatus.WAITING:
            self._file_approvals(run_id, run)
        if self.ttl is not None:
            self._set_expiry(run_id, run, time.time())
        return True

    async def get(self, run_id: str) -> RunRecord | None:
        """The run's record, or None."""
        run = self._get(run_id)
        return None if run is None else record_of(run)

    async def load(self, run_id: str) -> LoadedRun | None:
        """The record with its outputs and journal; or None."""
        run = self._get(run_id)
        if run is None:
            return None
        outputs = [read_output(run_id, i, stored) for i, stored in enumerate(run.outputs)]
        journal = {key: decode(run_id, f"journal[{key!r}]", raw) for key, raw in run.journal.items()}
        return LoadedRun(record_of(run), outputs, journal)

    async def commit(self, run_id: str, lease: Lease, commit: Commit) -> str | None:
        """Apply ``commit`` if ``lease`` still holds (once per ``(lease.token, seq)``).

        Raises:
            LeaseLostError: the lease no longer holds; nothing was written.
            StoreError: a field that cannot be committed, or a value that is not JSON-able;
                nothing was written.
        """
        # Check and encode everything first, so a bad value writes nothing.
        sets: dict[str, Any] = {}
        for name, value in commit.fields.items():
            # A step's commit (step, visit, state) is checked inline: it runs once per step.
            if (name == "step" and type(value) is str) or (name == "visit" and type(value) is int):
                sets[name] = value
            elif name == "state":
                if value is None:
                    sets[name] = NULL
                else:
                    try:
                        sets[name] = pydantic_core.to_json(value)
                    except (pydantic_core.PydanticSerializationError, TypeError, ValueError):
                        sets[name] = encode(run_id, name, value)  # raises the store's error
            elif name == "status" and type(value) is RunStatus:
                sets[name] = value
            elif name == "control" and (value is None or type(value) is str):
                sets[name] = value
            elif name == "output":
                sets[name] = NULL if value is None else encode(run_id, name, value)
            else:
                check_commit_fields(run_id, {name: value})
                if name in JSON_FIELDS:
                    if value is None:
                        sets[name] = NULL
                    else:
                        sets[name] = encode(run_id, name, list(value) if name == "decisions" else value)
                elif name == "status":
                    sets[name] = RunStatus(value)
                else:
                    sets[name] = value
        events: list[Event] | None = None
        if commit.events:
            events = []
            for e in commit.events:
                # What store_event does, inline for the two events of every step.
                if type(e) is RunEvent:
                    kind, _, step, data, at, _ = e
                    if data is None:
                        if (
                            type(at) is float
                            and -INF < at < INF
                            and type(kind) is str
                            and (step is None or type(step) is str)
                        ):
                            events.append(e)
                            continue
                    else:
                        try:  # encode_event's body, without its two calls
                            body = {"kind": kind, "step": step, "data": data, "at": at}
                            events.append(pydantic_core.to_json(body))
                            continue
                        except (pydantic_core.PydanticSerializationError, TypeError, ValueError):
                            pass
                events.append(encode_event(run_id, e))  # raises the store's error
        outputs = [store_output(run_id, o) for o in commit.outputs] if commit.outputs else None
        journal = (
            {k: encode(run_id, f"journal {k!r}", v) for k, v in commit.journal.items()}
            if commit.journal
            else None
        )
        run = self._runs.get(run_id)
        if run is not None and run.expires is not None:
            run = self._get(run_id)
        if run is None:
            raise LeaseLostError(run_id, "the run no longer exists")
        rec = run.fields
        if rec["commit_seq"] == commit.seq and rec["commit_token"] == lease.token:
            control: str | None = rec["control"]
            return control  # applied before: a retry after a lost reply
        if rec["lease_owner"] != lease.owner or rec["lease_token"] != lease.token:
            raise LeaseLostError(
                run_id,
                f"token {lease.token} of {lease.owner!r} is stale; "
                f"the lease is {rec['lease_token']} of {rec['lease_owner']!r}",
            )
        status = sets.get("status")
        old = (
            {
                "created_at": rec["created_at"],
                "run_id": run_id,
                "workflow": rec["workflow"],
                "status": rec["status"],
            }
            if status is not None and status != rec["status"]
            else None
        )
        rec.update(sets)
        now = time.time()
        rec["updated_at"] = now
        rec["commit_token"] = lease.token
        rec["commit_seq"] = commit.seq
        if events:
            rec["event_count"] += len(events)
            run.events.extend(events)
        if outputs:
            run.outputs.extend(outputs)
        if journal:
            run.journal.update(journal)
        if commit.release:
            rec["lease_owner"] = None
            rec["lease_expires"] = 0.0
        if "pending" in sets:
            run.deadline = deadline_of(commit.fields["pending"])
        if "pending" in sets or (old is not None and (run.approvals or status == RunStatus.WAITING)):
            self._file_approvals(run_id, run)
        if old is not None:
            self._index.move(old, rec)
            if self.ttl is not None:
                self._set_expiry(run_id, run, now)
        control = rec["control"]
        return control

    async def renew(self, run_id: str, lease: Lease, ttl: float) -> str | None:
        """Extend the lease to ``ttl`` seconds from now; return the control flag.

        Raises:
            LeaseLostError: the lease no longer holds.
        """
        run = self._get(run_id)
        if run is None:
            raise LeaseLostError(run_id, "the run no longer exists")
        rec = run.fields
        if rec["lease_owner"] != lease.owner or rec["lease_token"] != lease.token:
            raise LeaseLostError(run_id, f"token {lease.token} of {lease.owner!r} is stale")
        rec["lease_expires"] = time.time() + ttl
        control: str | None = rec["control"]
        return control

    async def update(self, run_id: str, change: ChangeFn) -> RunRecord | None:
        """Read-modify-write the record; ``change(record, now)`` with ``now = time.time()``.

        Raises:
            StoreError: the new record has another run id, a badly typed scalar or a
                value that is not JSON-able; nothing was written.
        """
        run = self._get(run_id)
        if run is None:
            return None
        now = time.time()
        current = record_of(run)
        result: Change | None = change(current, now)
        if result is None:
            return current
        new = result.written_over(current, now)
        if new.run_id != run_id:
            raise StoreError(f"run {run_id}: an update cannot change the run id (to {new.run_id!r})")
        fields = encode_record(new)
        bodies = [store_event(run_id, e) for e in result.events]
        old = run.fields
        run.fields = fields
        run.events.extend(bodies)
        run.deadline = deadline_of(new.pending)
        if fields["pending"] != old["pending"] or fields["status"] != old["status"]:
            self._file_approvals(run_id, run)
        if (fields["status"], fields["workflow"], fields["created_at"]) != (
            old["status"],
            old["workflow"],
            old["created_at"],
        ):
            self._index.move(old, run.fields)
        self._set_expiry(run_id, run, now)
        return record_of(run)

    async def events(self, run_id: str, after: int = 0) -> list[RunEvent]:
        """The run's events with ``seq`` greater than ``after``, in order."""
        run = self._get(run_id)
        if run is None:
            return []
        start = max(after, 0)
        return [read_event(run_id, i, stored) for i, stored in enumerate(run.events[start:], start)]

    async def delete(self, run_id: str) -> bool:
        """Remove a run and everything stored with it; False if it did not exist."""
        return self._get(run_id) is not None and self._drop(run_id)

    def sibling(self) -> Store | None:
        """None: another thread's event loop cannot share this store's dicts."""
        return None

    # -- the work queue (WorkQueue) -----------------------------------------------

    async def create_queued(self, record: RunRecord, events: Sequence[RunEvent]) -> bool:
        """:meth:`create`, and the run queued for the workers of its workflow (``CreatesQueued``)."""
        return await create_then_enqueue(self.create, self._queue.enqueue, record, events)

    async def enqueue(self, workflow: str, run_id: str) -> None:
        """Hand ``run_id`` to the workers of ``workflow`` (in this process)."""
        await self._queue.enqueue(workflow, run_id)

    async def claim(self, workflows: Sequence[str], consumer: str, limit: int, wait: float) -> list[Claim]:
        """Entries for a worker of this process (see ``WorkQueue.claim``)."""
        return await self._queue.claim(workflows, consumer, limit, wait)

    async def ack(self, claims: Sequence[Claim]) -> None:
        """Drop claimed entries."""
        await self._queue.ack(claims)

    async def queue_depth(self, workflow: str) -> QueueDepth:
        """Entries of ``workflow`` waiting."""
        return await self._queue.queue_depth(workflow)

    async def close(self) -> None:
        """Forget every run (and credential)."""
        self._credentials.clear()
        self._runs.clear()
        self._index.clear()
        self._expiring.clear()
        self._approvals.clear()
