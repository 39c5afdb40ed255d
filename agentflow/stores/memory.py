"""In-memory store: runs live as long as the process. The default without persistence."""

from __future__ import annotations

import dataclasses
import operator
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import LeaseLostError
from ..records import FINAL, Commit, OutputRecord, RunEvent, RunRecord, RunStatus
from .base import Change, Lease, LoadedRun

__all__ = ["MemoryStore"]


_FIELDS = tuple(f.name for f in dataclasses.fields(RunRecord))
_values = operator.attrgetter(*_FIELDS)


class _Run:
    """A run's stored parts; the record is kept as a dict so a commit is a dict update."""

    __slots__ = ("events", "expires", "fields", "journal", "outputs")

    def __init__(self, record: RunRecord, events: Sequence[RunEvent]) -> None:
        self.fields: dict[str, Any] = dict(zip(_FIELDS, _values(record), strict=True))
        self.outputs: list[OutputRecord] = []
        self.events: list[RunEvent] = list(events)
        self.journal: dict[str, Any] = {}
        self.expires: float | None = None

    @property
    def record(self) -> RunRecord:
        return RunRecord(**self.fields)

    @record.setter
    def record(self, rec: RunRecord) -> None:
        self.fields = dict(zip(_FIELDS, _values(rec), strict=True))


class MemoryStore:
    """Keeps runs in a dict. Every operation completes without yielding, so each is atomic.

    Values are kept as given (models stay models), which makes this store the fastest
    and the least durable: nothing survives the process.

    Args:
        ttl: seconds a finished run is kept, or None to keep it.
    """

    def __init__(self, ttl: float | None = None) -> None:
        self.ttl = ttl
        self._runs: dict[str, _Run] = {}

    def _get(self, run_id: str) -> _Run | None:
        run = self._runs.get(run_id)
        if run is None or run.expires is None:
            return run
        if run.expires <= time.time():
            del self._runs[run_id]
            return None
        return run

    async def create(self, record: RunRecord, events: Sequence[RunEvent]) -> bool:
        if self._get(record.run_id) is not None:
            return False
        run = self._runs[record.run_id] = _Run(record, events)
        run.fields["event_count"] += len(events)
        return True

    async def get(self, run_id: str) -> RunRecord | None:
        run = self._get(run_id)
        return run.record if run is not None else None

    async def load(self, run_id: str) -> LoadedRun | None:
        run = self._get(run_id)
        if run is None:
            return None
        return LoadedRun(run.record, list(run.outputs), dict(run.journal))

    async def commit(self, run_id: str, lease: Lease, commit: Commit) -> str | None:
        run = self._get(run_id)
        if run is None:
            raise LeaseLostError(run_id, "the run no longer exists")
        rec = run.fields
        if rec["lease_owner"] != lease.owner or rec["lease_token"] != lease.token:
            raise LeaseLostError(run_id, f"token {lease.token} is stale")
        rec.update(commit.fields)
        rec["updated_at"] = time.time()
        if commit.events:
            rec["event_count"] += len(commit.events)
            run.events.extend(commit.events)
        if commit.release:
            rec["lease_owner"] = None
            rec["lease_expires"] = 0.0
        if commit.outputs:
            run.outputs.extend(commit.outputs)
        if commit.journal:
            run.journal.update(commit.journal)
        if self.ttl is not None and rec["status"] in FINAL:
            run.expires = time.time() + self.ttl
        control: str | None = rec["control"]
        return control

    async def renew(self, run_id: str, lease: Lease, ttl: float) -> str | None:
        run = self._get(run_id)
        if (
            run is None
            or run.fields["lease_owner"] != lease.owner
            or run.fields["lease_token"] != lease.token
        ):
            raise LeaseLostError(run_id)
        run.fields["lease_expires"] = time.time() + ttl
        control: str | None = run.fields["control"]
        return control

    async def update(self, run_id: str, change: Callable[[RunRecord], Change | None]) -> RunRecord | None:
        run = self._get(run_id)
        if run is None:
            return None
        result = change(run.record)
        if result is None:
            return run.record
        rec = dataclasses.replace(
            result.record,
            updated_at=time.time(),
            event_count=run.record.event_count + len(result.events),
        )
        run.record = rec
        run.events.extend(result.events)
        if self.ttl is not None and rec.status in FINAL:
            run.expires = time.time() + self.ttl
        return rec

    async def events(self, run_id: str, after: int = 0) -> list[RunEvent]:
        run = self._get(run_id)
        if run is None:
            return []
        return run.events[after:]

    async def list_runs(
        self, workflow: str | None = None, status: RunStatus | None = None
    ) -> list[RunRecord]:
        out = []
        for run_id in list(self._runs):
            run = self._get(run_id)
            if run is None:
                continue
            f = run.fields
            if (workflow is None or f["workflow"] == workflow) and (status is None or f["status"] == status):
                out.append(run.record)
        out.sort(key=lambda r: r.created_at)
        return out

    async def due_gates(self, workflow: str, now: float) -> list[str]:
        out = []
        for run in self._runs.values():
            f = run.fields
            if f["workflow"] == workflow and f["status"] == RunStatus.WAITING and f["pending"]:
                deadline = f["pending"].get("deadline")
                if deadline is not None and deadline <= now:
                    out.append(f["run_id"])
        return out

    async def delete(self, run_id: str) -> bool:
        return self._runs.pop(run_id, None) is not None

    async def close(self) -> None:
        self._runs.clear()
