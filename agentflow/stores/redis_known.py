"""What the Redis store remembers of the runs it advances: their keys and unchanging facts.

To file a commit's index entries without reading first, the store remembers each run's
workflow and ``created_at`` (JSON, as the record holds them) from when it last read or
wrote the run, in a bounded map; the commit script checks them, so a stale memory costs
a retry, never a wrong index entry. A run that leaves the process (waiting, paused,
finished) is forgotten, so a parked run costs the process nothing.
"""

from __future__ import annotations

from typing import Any

from .codec import encode
from .contract import Lease
from .keys import Keys
from .redis_wire import Wire, pack_args

__all__ = ["MAX_FACTS", "Known", "KnownRuns"]

#: Runs whose workflow and created_at the store remembers.
MAX_FACTS = 10_000


class Known:
    """What the store remembers of a run it advances: its keys, its workflow and created_at
    (JSON) once read or written (facts that never change), its commits' packed head."""

    __slots__ = ("facts", "head", "keys", "lease", "rec")

    def __init__(self, rec: str, keys: list[bytes]) -> None:
        self.rec = rec
        self.keys = keys
        self.facts: tuple[bytes, bytes] | None = None
        self.lease: Lease | None = None  # the lease ``head`` was packed for
        self.head = b""

    def head_for(self, run_id: str, lease: Lease, sha: bytes) -> bytes:
        """The commit script's call up to the commit's own arguments, packed: EVALSHA, the
        script (``sha``), the run's keys, and the lease's owner and token as the record
        stores them (JSON, compared byte for byte in the script)."""
        if self.lease is not lease:
            owner = encode(run_id, "lease_owner", lease.owner)
            token = encode(run_id, "lease_token", lease.token)
            self.head = pack_args([b"EVALSHA", sha, b"4", *self.keys, owner, token])
            self.lease = lease
        return self.head


class KnownRuns:
    """The bounded map of the runs the store knows, oldest dropped first.

    Args:
        keys: the store's key builder.
        wire: the store's round trips (to read the facts of a run not remembered).
    """

    __slots__ = ("keys", "runs", "wire")

    def __init__(self, keys: Keys, wire: Wire) -> None:
        self.keys = keys
        self.wire = wire
        self.runs: dict[str, Known] = {}

    def get(self, run_id: str, keep: bool = True) -> Known:
        """The run's entry (its keys; its facts once seen).

        ``keep=False`` (a read) does not add a run the store does not remember yet: only
        the runs this process creates or writes are kept.
        """
        known = self.runs.get(run_id)
        if known is None:
            keys = self.keys.run(run_id)
            known = Known(keys.rec, [k.encode() for k in keys])
            if keep:
                if len(self.runs) >= MAX_FACTS:
                    del self.runs[next(iter(self.runs))]
                self.runs[run_id] = known
        return known

    def remember(self, run_id: str, workflow: Any, created_at: Any, keep: bool = True) -> None:
        """Keep the run's workflow and created_at as a read or write saw them (JSON bytes)."""
        if isinstance(workflow, bytes) and isinstance(created_at, bytes):
            self.get(run_id, keep).facts = (workflow, created_at)

    def forget(self, run_id: str) -> None:
        """Drop what the store remembers of a run that leaves this process. Whoever takes
        it up again reads its facts on the way."""
        self.runs.pop(run_id, None)

    async def read_facts(self, run_id: str, op: str) -> tuple[bytes, bytes] | None:
        """Read the run's workflow and created_at (one round trip, for ``op``); None if it is gone."""
        known = self.get(run_id)
        command = [b"HMGET", known.keys[0], b"workflow", b"created_at"]
        [(workflow, created_at)] = await self.wire.retrying(
            op, run_id, lambda: self.wire.call([command]), known.rec
        )
        if not isinstance(workflow, bytes) or not isinstance(created_at, bytes):
            return None
        self.remember(run_id, workflow, created_at)
        return workflow, created_at
