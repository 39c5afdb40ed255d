"""The ``Store`` Protocol: the only way the engine reads or advances a run.

A store keeps, per run: the :class:`RunRecord`, an append-only list of step outputs,
an append-only list of events, and a journal (key → JSON value) for replayed work
(agent replies, imperative steps, finished parallel branches).

Two kinds of write exist:

* ``commit`` is the owner's hot path: a fenced delta (the caller must hold the lease
  with that token) applied atomically together with its outputs, events and journal
  entries. One round trip on a networked store.
* ``update`` is for everyone else (decisions, pause/stop requests, resuming, lease
  acquisition by ``recover``): an optimistic read-modify-write of the whole record.
  The ``change`` callable may be called more than once and must be pure.

Values are JSON-able Python data or pydantic models; a durable store writes them as
JSON and hands back plain JSON data, never an object built by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..records import Commit, OutputRecord, RunEvent, RunRecord, RunStatus

__all__ = ["Change", "Lease", "LoadedRun", "Store"]


@dataclass(frozen=True, slots=True)
class Lease:
    """Proof of ownership of a run: the owner's id and the fencing token."""

    owner: str
    token: int


@dataclass(slots=True)
class Change:
    """What an ``update`` writes: the new record and events to append."""

    record: RunRecord
    events: list[RunEvent] = field(default_factory=list)


@dataclass(slots=True)
class LoadedRun:
    """A run as read back for resuming: record, outputs and journal."""

    record: RunRecord
    outputs: list[OutputRecord]
    journal: dict[str, Any]


@runtime_checkable
class Store(Protocol):
    """Where runs live. Implementations: memory, SQLite, Redis."""

    async def create(self, record: RunRecord, events: Sequence[RunEvent]) -> bool:
        """Store a new run; False (and nothing written) if the run id exists."""
        ...

    async def get(self, run_id: str) -> RunRecord | None:
        """The run's record, or None."""
        ...

    async def load(self, run_id: str) -> LoadedRun | None:
        """The record with its outputs and journal, for resuming; or None."""
        ...

    async def commit(self, run_id: str, lease: Lease, commit: Commit) -> str | None:
        """Apply ``commit`` atomically if ``lease`` still holds; return the control flag.

        A commit does not extend the lease (``renew`` does, on a timer); with
        ``commit.release`` the lease is dropped. When ``commit.fields`` moves the run
        to a final status, a store with a ``ttl`` sets the run to expire.

        Raises:
            LeaseLostError: the token no longer matches; nothing was written.
        """
        ...

    async def renew(self, run_id: str, lease: Lease, ttl: float) -> str | None:
        """Extend the lease by ``ttl`` seconds from now; return the control flag.

        Raises:
            LeaseLostError: the token no longer matches.
        """
        ...

    async def update(self, run_id: str, change: Callable[[RunRecord], Change | None]) -> RunRecord | None:
        """Read-modify-write the record atomically (optimistic, retried on conflict).

        Returns the record as written, the unchanged record when ``change`` returned
        None, or None when the run does not exist. Errors ``change`` raises propagate.
        """
        ...

    async def events(self, run_id: str, after: int = 0) -> list[RunEvent]:
        """The run's events with ``seq`` greater than ``after``, in order."""
        ...

    async def list_runs(
        self, workflow: str | None = None, status: RunStatus | None = None
    ) -> list[RunRecord]:
        """Records of the runs of ``workflow`` (all when None), oldest first."""
        ...

    async def due_gates(self, workflow: str, now: float) -> list[str]:
        """Ids of runs of ``workflow`` waiting at a gate whose deadline is before ``now``."""
        ...

    async def delete(self, run_id: str) -> bool:
        """Remove a run and everything stored with it; False if it did not exist."""
        ...

    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...
