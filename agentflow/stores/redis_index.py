"""The Redis store's indexes: filing runs by status, and listing from them.

What is filed (keys in :mod:`agentflow.stores.keys`): each run under its status, once
for every workflow and once for its own, scored by ``created_at``; finished runs with a
ttl in time buckets that expire after them; gates by deadline. Writers file a run
*before* the write that gives it the status (in the same round trip), so a crash in
between leaves an entry too many, never a run that no index lists; the entry the run
leaves behind is dropped once the write is known to have applied.

Readers check every entry against the record (version, status, workflow), drop the
stale ones and never list a run under a status or workflow its record does not have.
So a listing costs what it returns (plus the stale entries it meets, once), not what
is stored.

On a cluster every index is sharded (:mod:`agentflow.stores.keys`): a run's entries go
to the shard of its id, and readers merge the shards (:mod:`agentflow.stores.redis_pages`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from ..errors import CorruptRecordError
from ..types import FINAL, RunStatus
from . import lua
from .codec import RECORD_FIELDS, deadline_of, decode, make_record
from .contract import RunRecord
from .keys import Keys, entry, entry_run
from .redis_pages import Pages, score_pairs
from .redis_wire import Command, Wire

__all__ = ["LIGHT", "Index", "score"]

#: The record fields a listing reads: not input, state nor output.
LIGHT: tuple[str, ...] = tuple(f for f in RECORD_FIELDS if f not in ("input", "state", "output"))

_BATCH = 500  # index entries (and records) read per round trip
_BUCKET_SLACK = 300.0  # seconds a bucket stays listed past its expiry (clocks differ)
_STATUSES = frozenset(s.value for s in RunStatus)


def score(value: float) -> bytes:
    """A ZSET score, exactly the float's value."""
    return repr(float(value)).encode()


def _float(raw: Any) -> float | None:
    try:
        value = decode("", "", raw) if raw is not None else None
    except CorruptRecordError:
        return None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class _Found(NamedTuple):
    """A record as a listing reads it."""

    version: bytes  # its ``_ix``
    values: dict[str, Any]  # the fields read and decoded (absent when not stored)
    broken: dict[str, str]  # fields that could not be decoded: why


class Index:
    """Files runs in the indexes of ``keys`` and reads them back through ``wire``.

    Args:
        keys: the store's key builder.
        wire: the store's round trips.
        ttl: seconds a finished run is kept (None: kept), which decides its buckets.
    """

    def __init__(self, keys: Keys, wire: Wire, ttl: float | None) -> None:
        self.keys = keys
        self.wire = wire
        self.ttl = ttl
        self._registered: dict[str, float] = {}  # bucket -> when this store last filed it
        self._filed: dict[tuple[str, str, str | None, int], tuple[bytes, bytes]] = {}

    # -- writing ----------------------------------------------------------------------

    def file(
        self, run_id: str, status: str, workflow: str, created_at: float, version: bytes
    ) -> list[Command]:
        """Commands filing ``run_id`` (at ``version``) under ``status``; idempotent."""
        member, at = entry(run_id, version), score(created_at)
        shard = self.keys.shard_of(run_id)
        if status not in FINAL or self.ttl is None:
            return [[b"ZADD", k, at, member] for k in self._keys(status, workflow, None, shard)]
        bucket = Keys.bucket(self.ttl, time.time())
        keys = self._keys(status, workflow, bucket.name, shard)
        life = b"%d" % bucket.ttl_ms
        commands: list[Command] = [[b"ZADD", k, at, member] for k in keys]
        # A new key gets its lifetime from its first run: the end of the bucket plus a
        # width, which covers the runs filed later and clocks up to a width apart.
        commands += [[b"PEXPIRE", k, life, b"NX"] for k in keys]
        sent = self._registered.get(bucket.name)
        if sent is None or time.monotonic() - sent > 10:  # again now and then, in case it was lost
            if len(self._registered) > 64:
                self._registered.clear()
            self._registered[bucket.name] = time.monotonic()
            registry = self.keys.buckets().encode()
            commands.append([b"ZADD", registry, score(bucket.expires_at), bucket.name.encode()])
            # The registry outlives its last bucket, and no more.
            commands += [[b"PEXPIRE", registry, life, flag] for flag in (b"NX", b"GT")]
        return commands

    def unfile(self, run_id: str, status: str, workflow: str, version: bytes) -> list[Command]:
        """Commands dropping the entries of ``run_id`` at ``version`` under ``status``.

        Safe at any time once the record moved on from ``version``: no one files it again.
        Entries in time buckets are left to expire.
        """
        member = entry(run_id, version)
        return [[b"ZREM", k, member] for k in self._keys(status, workflow, None, self.keys.shard_of(run_id))]

    def unfile_stored(self, run_id: str, workflow: str, status: Any, version: Any) -> list[Command]:
        """:meth:`unfile` for a status and version as a script read them (JSON, raw; '' if unset)."""
        if not version or not isinstance(version, bytes):
            return []
        try:
            old = decode(run_id, "status", status)
        except CorruptRecordError:
            return []
        return self.unfile(run_id, old, workflow, version) if old in _STATUSES else []

    def moved(
        self, old: RunRecord, old_status: Any, old_version: Any, new: RunRecord, version: bytes | None
    ) -> tuple[list[Command], list[Command], list[Command]]:
        """What a write taking ``old`` to ``new`` files (``version``: a new status's), with
        the clean-ups should it not apply, and those once it did.

        ``old_status`` and ``old_version`` are the stored status JSON and ``_ix``.
        """
        run_id = new.run_id
        entries: list[Command] = []
        undo: list[Command] = []
        stale: list[Command] = []
        if version is not None:
            entries += self.file(run_id, new.status, new.workflow, new.created_at, version)
            undo += self.unfile(run_id, new.status, new.workflow, version)
            stale += self.unfile_stored(run_id, old.workflow, old_status, old_version)
        gate = deadline_of(new.pending) if new.status == RunStatus.WAITING else None
        if gate is not None:
            entries.append(self.file_gate(run_id, new.workflow, gate))
        old_gate = deadline_of(old.pending) if old.status == RunStatus.WAITING else None
        if old_gate is not None and gate is None:
            stale.append(self.unfile_gate(run_id, old.workflow, old_gate))
        return entries, undo, stale

    def file_gate(self, run_id: str, workflow: str, deadline: float) -> Command:
        """The command filing a gate's deadline."""
        key = self.keys.gates(workflow, self.keys.shard_of(run_id)).encode()
        return [b"ZADD", key, score(deadline), run_id.encode()]

    def unfile_gate(self, run_id: str, workflow: str, deadline: float) -> Command:
        """The command dropping a gate's entry, unless it was filed again since (a new deadline)."""
        key = self.keys.gates(workflow, self.keys.shard_of(run_id)).encode()
        return [b"EVALSHA", lua.ZREM_IF_SCORE.sha_bytes, b"1", key, run_id.encode(), score(deadline)]

    def _keys(self, status: str, workflow: str, bucket: str | None, shard: int) -> tuple[bytes, bytes]:
        """The index keys a run of ``workflow`` in ``status`` is filed under (every workflow's,
        then its own), remembered: every run of a workflow is filed under the same few."""
        found = self._filed.get((status, workflow, bucket, shard))
        if found is None:
            if len(self._filed) > 4096:
                self._filed.clear()
            found = self._filed[status, workflow, bucket, shard] = (
                self.keys.status(status, None, bucket, shard).encode(),
                self.keys.status(status, workflow, bucket, shard).encode(),
            )
        return found

    # -- reading ----------------------------------------------------------------------

    async def _read(self, run_ids: Sequence[str], fields: Sequence[str]) -> list[_Found | Exception | None]:
        """``fields`` of each run's record, decoded, in one round trip (None: no such run).

        A record that is not a hash comes back as the error Redis gave. A record with a
        field that cannot be decoded is read again field by field, so the damage is
        named.
        """
        names = [f.encode() for f in fields]
        calls = [([self.keys.run(run_id).rec.encode()], names) for run_id in run_ids]
        replies = await self.wire.retrying("list_runs", None, lambda: self.wire.eval_many(lua.READ, calls))
        out: list[_Found | Exception | None] = []
        again: list[int] = []
        for i, (run_id, reply) in enumerate(zip(run_ids, replies, strict=True)):
            if isinstance(reply, Exception) or not reply:
                out.append(reply or None)
                continue
            version, text, flags = reply
            try:
                array = decode(run_id, "", text)
            except CorruptRecordError:
                array = None
            if not isinstance(array, list) or len(array) != len(fields):
                again.append(i)
                array = [None] * len(fields)
            present = {
                name: value
                for name, value, flag in zip(fields, array, flags.decode(), strict=True)
                if flag == "1"
            }
            out.append(_Found(version, present, {}))
        if again:
            out = await self._read_fields(run_ids, fields, again, out)
        return out

    async def _read_fields(
        self,
        run_ids: Sequence[str],
        fields: Sequence[str],
        which: list[int],
        out: list[_Found | Exception | None],
    ) -> list[_Found | Exception | None]:
        """Read the records at positions ``which`` field by field, naming each damaged field."""

        names = [b"_ix", *(f.encode() for f in fields)]
        commands = [[b"HMGET", self.keys.run(run_ids[i]).rec.encode(), *names] for i in which]
        replies = await self.wire.retrying("list_runs", None, lambda: self.wire.round_trip(commands))
        for i, values in zip(which, replies, strict=True):
            if isinstance(values, Exception) or all(v is None for v in values):
                out[i] = values if isinstance(values, Exception) else None
                continue
            key = self.keys.run(run_ids[i]).rec
            present: dict[str, Any] = {}
            broken: dict[str, str] = {}
            for name, raw in zip(fields, values[1:], strict=True):
                if raw is not None:
                    try:
                        present[name] = decode(run_ids[i], f"{key}[{name}]", raw)
                    except CorruptRecordError as exc:
                        broken[name] = str(exc)
            out[i] = _Found(values[0] or b"", present, broken)
        return out

    async def _call(self, what: str, commands: list[Command]) -> list[Any]:
        return await self.wire.retrying(what, None, lambda: self.wire.call(commands))

    async def _drop(self, commands: list[Command]) -> None:
        if commands:
            self.wire.defer(commands)
            await self.wire.flush()

    def _check(
        self, run_id: str, version: bytes, status: str, workflow: str | None, found: _Found | Exception | None
    ) -> tuple[RunRecord | None, bool]:
        """The listed record for an index entry (None: not listed), and whether the entry is stale.

        A record that cannot be decoded is listed with ``corrupt`` set, under the
        entry's status (and workflow, unless its own is readable and another).
        """
        key = self.keys.run(run_id).rec
        if found is None:
            return None, True  # deleted or expired
        if isinstance(found, Exception):  # not a hash: damaged, but the run is there
            return self._corrupt(run_id, status, workflow, None, f"{key}: {found}"), False
        if found.version != version:
            return None, True  # the run moved on
        values = found.values
        own = values.get("workflow")
        if workflow is not None and isinstance(own, str) and own != workflow:
            return None, False  # never listed under another workflow's name
        if values.get("status") in _STATUSES and values["status"] != status:
            return None, False  # changed without a new version (by hand): not ours to drop
        listed_as = own if isinstance(own, str) else workflow
        if found.broken:
            return self._corrupt(
                run_id, status, listed_as, values.get("created_at"), *found.broken.values()
            ), False
        try:
            return make_record(run_id, key, {"input": None, **values}), False
        except CorruptRecordError as exc:
            return self._corrupt(run_id, status, listed_as, values.get("created_at"), str(exc)), False

    @staticmethod
    def _corrupt(
        run_id: str, status: str, workflow: str | None, created: Any, reason: str, *_: str
    ) -> RunRecord:
        ok = isinstance(created, int | float) and not isinstance(created, bool)
        at = float(created) if ok else 0.0
        return RunRecord(
            run_id, workflow or "", RunStatus(status), None, created_at=at, updated_at=at, corrupt=reason
        )

    async def list_runs(
        self, workflow: str | None, status: RunStatus | None, limit: int, after: str | None
    ) -> list[RunRecord]:
        """Light records, newest first (``created_at``, then run id), after run ``after``."""
        if limit <= 0:
            return []
        statuses = [RunStatus(status)] if status is not None else list(RunStatus)
        finished = any(s in FINAL for s in statuses)
        commands: list[Command] = []
        if finished:  # which time buckets may hold finished runs, by the server's clock
            commands += [[b"TIME"], [b"ZRANGE", self.keys.buckets().encode(), b"0", b"-1", b"WITHSCORES"]]
        if after is not None:
            commands.append([b"HMGET", self.keys.run(after).rec.encode(), b"created_at"])
        replies = await self._call("list_runs", commands) if commands else []
        buckets: list[str] = []
        if finished:
            (sec, usec), registry = replies[0], score_pairs(replies[1])
            gone = int(sec) + int(usec) / 1e6 - _BUCKET_SLACK
            buckets = [name.decode() for name, expires in registry if expires >= gone]
            if len(buckets) < len(registry):
                self.wire.defer([[b"ZREMRANGEBYSCORE", self.keys.buckets().encode(), b"-inf", score(gone)]])
        cursor: tuple[float, bytes] | None = None
        if after is not None:
            at = _float(replies[-1][0])
            if at is None:
                return []  # the run paged from is gone: nothing is known to come after it
            cursor = (at, after.encode() + b"\0")
        sources: list[tuple[str, str]] = []
        for shard in self.keys.shards:
            for s in statuses:
                sources.append((self.keys.status(s, workflow, None, shard), s))
                if s in FINAL:
                    sources += [(self.keys.status(s, workflow, b, shard), s) for b in buckets]
        pages = Pages(self.wire, "list_runs", [key.encode() for key, _ in sources], cursor)
        out: list[RunRecord] = []
        drops: list[Command] = []
        while len(out) < limit:
            candidates = await pages.take(limit - len(out))
            if not candidates:
                break
            found = await self._read([entry_run(member)[0] for _, member, _ in candidates], LIGHT)
            for (_, member, source), values in zip(candidates, found, strict=True):
                run_id, version = entry_run(member)
                rec, stale = self._check(run_id, version, sources[source][1], workflow, values)
                if stale:
                    drops.append([b"ZREM", sources[source][0].encode(), member])
                elif rec is not None:
                    out.append(rec)
        await self._drop(drops)
        return out

    async def recoverable(self, workflow: str, limit: int) -> list[str]:
        """Ids of ``workflow``'s running runs whose lease ran out by the server's clock.

        Reads the running index (every shard, in step) until ``limit`` are found.
        """
        keys = [self.keys.status(RunStatus.RUNNING, workflow, None, s).encode() for s in self.keys.shards]
        batch = max(32, _BATCH // len(keys))
        starts = dict.fromkeys(range(len(keys)), 0)  # shard -> where its next read starts
        out: list[str] = []
        drops: list[Command] = []
        now: float | None = None
        while len(out) < limit and starts:
            commands: list[Command] = [
                [b"ZRANGE", keys[i], b"%d" % at, b"%d" % (at + batch - 1)] for i, at in starts.items()
            ]
            if now is None:
                commands.append([b"TIME"])
            replies = await self._call("recoverable", commands)
            if now is None:
                sec, usec = replies.pop()
                now = int(sec) + int(usec) / 1e6
            members: list[tuple[int, bytes]] = []
            for i, got in zip(list(starts), replies, strict=True):
                members += [(i, m) for m in got]
                starts[i] += len(got)
                if len(got) < batch:
                    del starts[i]
            if not members:
                break
            found = await self._read(
                [entry_run(m)[0] for _, m in members], ("status", "workflow", "lease_expires")
            )
            for (i, member), rec in zip(members, found, strict=True):
                run_id, version = entry_run(member)
                if rec is None or (isinstance(rec, _Found) and rec.version != version):
                    drops.append([b"ZREM", keys[i], member])
                    continue
                if isinstance(rec, Exception) or rec.broken:
                    continue
                values = rec.values
                expires = values.get("lease_expires")
                if (
                    values.get("status") == RunStatus.RUNNING
                    and values.get("workflow") == workflow
                    and isinstance(expires, int | float)
                    and expires < now
                ):
                    out.append(run_id)
                    if len(out) == limit:
                        break
        await self._drop(drops)
        return out

    async def due_gates(self, workflow: str, now: float) -> list[str]:
        """Ids of ``workflow``'s runs waiting at a gate whose deadline is at or before ``now``."""
        keys = [self.keys.gates(workflow, s).encode() for s in self.keys.shards]
        until = score(now)
        replies = await self._call(
            "due_gates", [[b"ZRANGE", key, b"-inf", until, b"BYSCORE", b"WITHSCORES"] for key in keys]
        )
        entries = sorted(
            (
                (filed, member, key)
                for key, got in zip(keys, replies, strict=True)
                for member, filed in score_pairs(got)
            ),
            key=lambda e: e[0],
        )
        due: list[str] = []
        drops: list[Command] = []
        for start in range(0, len(entries), _BATCH):
            chunk = entries[start : start + _BATCH]
            found = await self._read([m.decode() for _, m, _ in chunk], ("status", "workflow", "pending"))
            for (filed, member, key), rec in zip(chunk, found, strict=True):
                run_id = member.decode()
                if isinstance(rec, Exception) or (rec is not None and rec.broken):
                    continue
                deadline = None
                if rec is not None and rec.values.get("status") == RunStatus.WAITING:
                    if rec.values.get("workflow") == workflow:
                        deadline = deadline_of(rec.values.get("pending"))
                if deadline is not None and deadline <= now:
                    due.append(run_id)
                elif deadline is not None:  # filed again with a later deadline: correct the entry
                    drops.append([b"ZADD", key, b"XX", score(deadline), member])
                else:  # no longer waiting (or gone)
                    drops.append(self.unfile_gate(run_id, workflow, filed))
        await self._drop(drops)
        return due
