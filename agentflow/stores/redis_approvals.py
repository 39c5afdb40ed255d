"""The Redis store's index of pending approvals: filing them with each run's ``pending``, and listing.

Keys are :mod:`agentflow.stores.keys`'s (``P#ap:...``). An approval is filed in four
sorted sets (every approval, its workflow's, its kind's, and one per approver), member
``<id> NUL <run id>`` scored by its ``created_at``, so a set orders approvals by
``(created_at, id)``; ``P#ap:at`` says where each sorts, so a page can start after it.

As with the status indexes, writers file an approval *before* the write that gives a
run its ``pending`` (in the same round trip), and drop the entries of the approvals a
write decided once it applied; a decided approval's place moves to the day's
``P#ap:gone:<day>`` (kept two days), so a page that ended on it goes on. Readers check
every entry against the run's record (waiting, with that approval in ``pending``),
drop the stale ones they meet (a crash between the two writes, a run that expired or
was deleted) and never list an approval its record does not hold. Listing costs the
page (plus the stale entries met, once), not what is stored.

On a cluster the sets are sharded by run id and the places by approval id (see
:mod:`agentflow.stores.keys`); a page merges the shards of its set.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from ..errors import StoreError
from ..types import RunStatus
from .codec import approval_rank, approvers_of, decode
from .contract import pending_approvals
from .keys import Keys
from .redis_index import Index, score
from .redis_pages import Pages
from .redis_wire import Command, Wire

__all__ = ["Approvals"]

_DAY = 86_400
_KEEP_GONE_MS = 2 * _DAY * 1000  # how long a decided approval's place is kept


def _member(approval: dict[str, Any], run_id: str) -> bytes:
    return str(approval["id"]).encode() + b"\0" + run_id.encode()


class Approvals:
    """Files approvals in the index of ``keys`` and lists them through ``wire``.

    Args:
        keys: the store's key builder.
        wire: the store's round trips.
        index: the store's run indexes (whose reads check records in one round trip).
    """

    def __init__(self, keys: Keys, wire: Wire, index: Index) -> None:
        self.keys = keys
        self.wire = wire
        self.index = index

    def _sets(self, approval: dict[str, Any], workflow: str, run_id: str) -> list[bytes]:
        keys = self.keys
        shard = keys.shard_of(run_id)
        names = [
            keys.approvals("all", None, shard),
            keys.approvals("wf", workflow, shard),
            keys.approvals("kind", str(approval.get("kind") or "gate"), shard),
        ]
        names += [keys.approvals("by", name, shard) for name in approvers_of(approval)]
        return [k.encode() for k in names]

    def _places(self, aid: str, day: int | None = None) -> bytes:
        return self.keys.approval_places(day, self.keys.shard_of(aid)).encode()

    def file(self, run_id: str, workflow: str, approvals: Sequence[dict[str, Any]]) -> list[Command]:
        """Commands filing ``approvals`` of run ``run_id`` (idempotent)."""
        commands: list[Command] = []
        for a in approvals:
            at, _ = approval_rank(a)
            member, place = _member(a, run_id), score(at)
            commands += [[b"ZADD", key, place, member] for key in self._sets(a, workflow, run_id)]
            aid = member[: member.index(b"\0")]
            commands.append([b"HSET", self._places(aid.decode()), aid, place + b"\0" + run_id.encode()])
        return commands

    def unfile(
        self, run_id: str, workflow: str, approvals: Sequence[dict[str, Any]], decided: bool = True
    ) -> list[Command]:
        """Commands dropping the entries of ``approvals``; ``decided`` keeps their places a while."""
        commands: list[Command] = []
        today = int(time.time()) // _DAY
        for a in approvals:
            at, aid = approval_rank(a)
            member = _member(a, run_id)
            commands += [[b"ZREM", key, member] for key in self._sets(a, workflow, run_id)]
            commands.append([b"HDEL", self._places(aid), aid.encode()])
            if decided:
                gone = self._places(aid, today)
                commands.append([b"HSET", gone, aid.encode(), score(at) + b"\0" + run_id.encode()])
                commands.append([b"PEXPIRE", gone, b"%d" % _KEEP_GONE_MS, b"NX"])
        return commands

    def unfile_deleted(self, run_id: str, workflow: str, pending: Any) -> list[Command]:
        """The clean-ups of a deleted run's approvals (``pending`` as the delete script read it)."""
        try:
            value = decode(run_id, "pending", pending) if isinstance(pending, bytes) and pending else None
        except StoreError:
            return []
        found = [{**a, "run_id": run_id, "workflow": workflow} for a in pending_approvals(run_id, value)]
        return self.unfile(run_id, workflow, found, decided=False)

    def moved(
        self, run_id: str, workflow: str, old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]
    ) -> tuple[list[Command], list[Command], list[Command]]:
        """What a write taking a run's approvals from ``old`` to ``new`` files, with the clean-ups
        should it not apply, and those once it did (the decided ones)."""
        before = {a["id"] for a in old}
        after = {a["id"] for a in new}
        entries = self.file(run_id, workflow, new)
        undo = self.unfile(run_id, workflow, [a for a in new if a["id"] not in before], decided=False)
        stale = self.unfile(run_id, workflow, [a for a in old if a["id"] not in after])
        return entries, undo, stale

    async def _place(self, after: str) -> tuple[float, bytes]:
        """Where approval ``after`` sorts (pending, or decided within two days)."""
        today = int(time.time()) // _DAY
        names = [self._places(after), *(self._places(after, d) for d in (today, today - 1, today - 2))]
        commands = [[b"HGET", name, after.encode()] for name in names]
        replies = await self.wire.retrying("approvals", None, lambda: self.wire.call(commands))
        for found in replies:
            if isinstance(found, bytes) and b"\0" in found:
                at, _, run_id = found.partition(b"\0")
                return float(at), after.encode() + b"\0" + run_id
        raise StoreError(
            f"approvals(after={after!r}): approval {after} is not stored (its run was deleted since the "
            "previous page); list again from the first page"
        )

    async def _narrowest(self, scopes: list[tuple[str, str]]) -> tuple[str, str]:
        """Of the sets the filters name, the one with the fewest entries (the others are
        checked entry by entry): ``kind="tool_outcome", workflow=...`` reads the few
        unknown outcomes, not every approval of the workflow."""
        if len(scopes) == 1:
            return scopes[0]

        async def count(key: bytes) -> int:
            reply = await self.wire.retrying("approvals", None, lambda: self.wire.call([[b"ZCARD", key]]))
            return int(reply[0])

        async def size(scope: str, value: str) -> int:
            keys = [self.keys.approvals(scope, value, shard).encode() for shard in self.keys.shards]
            return sum(await asyncio.gather(*(count(k) for k in keys)))

        sizes = await asyncio.gather(*(size(s, v) for s, v in scopes))
        return min(zip(sizes, range(len(scopes)), scopes, strict=True))[2]

    async def page(
        self,
        approver: str | None,
        workflow: str | None,
        kind: str | None,
        limit: int,
        after: str | None,
    ) -> list[dict[str, Any]]:
        """Pending approvals, newest first (``created_at``, then id), after approval ``after``."""
        if limit <= 0:
            return []
        scopes = [(s, v) for s, v in (("by", approver), ("wf", workflow), ("kind", kind)) if v is not None]
        scope, value = await self._narrowest(scopes) if scopes else ("all", None)
        sources = [self.keys.approvals(scope, value, shard).encode() for shard in self.keys.shards]
        cursor = await self._place(after) if after is not None else None
        pages = Pages(self.wire, "approvals", sources, cursor)
        out: list[dict[str, Any]] = []
        drops: list[Command] = []
        while len(out) < limit:
            candidates = await pages.take(limit - len(out))
            if not candidates:
                break
            run_ids = [m[m.index(b"\0") + 1 :].decode(errors="replace") for _, m, _ in candidates]
            found = await self.index._read(run_ids, ("status", "workflow", "pending"))
            for (_, member, source), run_id, rec in zip(candidates, run_ids, found, strict=True):
                aid = member[: member.index(b"\0")].decode(errors="replace")
                if isinstance(rec, Exception) or (rec is not None and rec.broken):
                    continue  # a damaged record: listed by list_runs, not here
                approval = None
                if rec is not None and rec.values.get("status") == RunStatus.WAITING:
                    own = rec.values.get("workflow")
                    for a in pending_approvals(run_id, rec.values.get("pending")):
                        if a["id"] == aid:
                            approval = {**a, "run_id": run_id, "workflow": own}
                if approval is None:
                    drops.append([b"ZREM", sources[source], member])  # decided, gone, or never written
                    continue
                if workflow is not None and approval["workflow"] != workflow:
                    continue
                if kind is not None and str(approval.get("kind") or "gate") != kind:
                    continue
                if approver is not None and approver not in approvers_of(approval):
                    continue
                out.append(approval)
        if drops:
            self.wire.defer(drops)
            await self.wire.flush()
        return out
