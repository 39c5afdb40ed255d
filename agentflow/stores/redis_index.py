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
from .redis_wire import Command, Wire

__all__ = ["LIGHT", "Index", "score"]

#: The record fields a listing reads: not input, state nor output.
LIGHT: tuple[str, ...] = tuple(f for f in RECORD_FIELDS if f not in ("input", "state", "output"))

_BATCH = 500  # index entries (and records) read per round trip
_TIES = 10_000  # entries sharing one created_at that paging tells apart
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
        self._filed: dict[tuple[str, str, str | None], tuple[bytes, bytes]] = {}

    # -- writing ----------------------------------------------------------------------

    def file(
        self, run_id: str, status: str, workflow: str, created_at: float, version: bytes
    ) -> list[Command]:
        """Commands filing ``run_id`` (at ``version``) under ``status``; idempotent."""
        member, at = entry(run_id, version), score(created_at)
        if status not in FINAL or self.ttl is None:
            return [[b"ZADD", k, at, member] for k in self._keys(status, workflow)]
        bucket = Keys.bucket(self.ttl, time.time())
        keys = self._keys(status, workflow, bucket.name)
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
        return [[b"ZREM", k, member] for k in self._keys(status, workflow)]

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
        return [b"ZADD", self.keys.gates(workflow).encode(), score(deadline), run_id.encode()]

    def unfile_gate(self, run_id: str, workflow: str, deadline: float) -> Command:
        """The command dropping a gate's entry, unless it was filed again since (a new deadline)."""
        key = self.keys.gates(workflow).encode()
        return [b"EVALSHA", lua.ZREM_IF_SCORE.sha_bytes, b"1", key, run_id.encode(), score(deadline)]

    def _keys(self, status: str, workflow: str, bucket: str | None = None) -> tuple[bytes, bytes]:
        """The index keys a run of ``workflow`` in ``status`` is filed under (every workflow's,
        then its own), remembered: every run of a workflow is filed under the same few."""
        found = self._filed.get((status, workflow, bucket))
        if found is None:
            if len(self._filed) > 1024:
                self._filed.clear()
            found = self._filed[status, workflow, bucket] = (
                self.keys.status(status, None, bucket).encode(),
                self.keys.status(status, workflow, bucket).encode(),
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

        async def read() -> list[Any]:
            pipe = self.wire.client.pipeline(transaction=False)
            for i in which:
                pipe.hmget(self.keys.run(run_ids[i]).rec, ["_ix", *fields])
            async with self.wire.slot():
                return list(await pipe.execute(raise_on_error=False))

        for i, values in zip(which, await self.wire.retrying("list_runs", None, read), strict=True):
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

    async def _pipeline(
        self, what: str, calls: Sequence[tuple[str, Sequence[Any], dict[str, Any]]]
    ) -> list[Any]:
        async def run() -> list[Any]:
            pipe = self.wire.client.pipeline(transaction=False)
            for name, args, kwargs in calls:
                getattr(pipe, name)(*args, **kwargs)
            async with self.wire.slot():
                return list(await pipe.execute())

        return await self.wire.retrying(what, None, run)

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
        calls: list[tuple[str, Sequence[Any], dict[str, Any]]] = []
        if finished:  # which time buckets may hold finished runs, by the server's clock
            calls += [("time", (), {}), ("zrange", (self.keys.buckets(), 0, -1), {"withscores": True})]
        if after is not None:
            calls.append(("hmget", (self.keys.run(after).rec, ["created_at"]), {}))
        replies = await self._pipeline("list_runs", calls) if calls else []
        buckets: list[str] = []
        if finished:
            (sec, usec), registry = replies[0], replies[1]
            gone = sec + usec / 1e6 - _BUCKET_SLACK
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
        for s in statuses:
            sources.append((self.keys.status(s, workflow), s))
            if s in FINAL:
                sources += [(self.keys.status(s, workflow, b), s) for b in buckets]
        out: list[RunRecord] = []
        drops: list[Command] = []
        while len(out) < limit:
            candidates, exhausted = await self._candidates(sources, cursor, limit - len(out) + 2)
            if not candidates:
                break
            found = await self._read([entry_run(member)[0] for _, member, _ in candidates], LIGHT)
            for (at, member, source), values in zip(candidates, found, strict=True):
                run_id, version = entry_run(member)
                rec, stale = self._check(run_id, version, sources[source][1], workflow, values)
                if stale:
                    drops.append([b"ZREM", sources[source][0].encode(), member])
                elif rec is not None:
                    out.append(rec)
                    if len(out) == limit:
                        break
                cursor = (at, member)
            if exhausted:
                break
        await self._drop(drops)
        return out

    async def _candidates(
        self, sources: Sequence[tuple[str, str]], cursor: tuple[float, bytes] | None, count: int
    ) -> tuple[list[tuple[float, bytes, int]], bool]:
        """The next ``count`` entries of ``sources`` merged, newest first, past ``cursor``.

        Returns them as ``(score, member, source index)`` with whether nothing is left.
        """
        calls: list[tuple[str, Sequence[Any], dict[str, Any]]] = []
        page = {"byscore": True, "desc": True, "withscores": True, "offset": 0}
        for key, _ in sources:
            if cursor is None:
                calls.append(("zrange", (key, "+inf", "-inf"), {**page, "num": count}))
            else:
                at = repr(cursor[0])
                calls.append(("zrange", (key, f"({at}", "-inf"), {**page, "num": count}))
                calls.append(("zrange", (key, at, at), {**page, "num": _TIES}))
        replies = await self._pipeline("list_runs", calls)
        merged: list[tuple[float, bytes, int]] = []
        more = False
        step = 1 if cursor is None else 2
        for i in range(len(sources)):
            below = replies[i * step]
            more = more or len(below) >= count
            merged += [(float(s), m, i) for m, s in below]
            if cursor is not None:
                merged += [(float(s), m, i) for m, s in replies[i * step + 1] if m < cursor[1]]
        merged.sort(key=lambda e: (e[0], e[1]), reverse=True)
        return merged[:count], not more and len(merged) <= count

    async def recoverable(self, workflow: str, limit: int) -> list[str]:
        """Ids of ``workflow``'s running runs whose lease ran out by the server's clock."""
        key = self.keys.status(RunStatus.RUNNING, workflow)
        out: list[str] = []
        drops: list[Command] = []
        start = 0
        now: float | None = None
        while len(out) < limit:
            calls: list[tuple[str, Sequence[Any], dict[str, Any]]] = [
                ("zrange", (key, start, start + _BATCH - 1), {})
            ]
            if now is None:
                calls.append(("time", (), {}))
            replies = await self._pipeline("recoverable", calls)
            members: list[bytes] = replies[0]
            if now is None:
                sec, usec = replies[1]
                now = sec + usec / 1e6
            if not members:
                break
            found = await self._read(
                [entry_run(m)[0] for m in members], ("status", "workflow", "lease_expires")
            )
            for member, rec in zip(members, found, strict=True):
                run_id, version = entry_run(member)
                if rec is None or (isinstance(rec, _Found) and rec.version != version):
                    drops.append([b"ZREM", key.encode(), member])
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
            start += len(members)
        await self._drop(drops)
        return out

    async def due_gates(self, workflow: str, now: float) -> list[str]:
        """Ids of ``workflow``'s runs waiting at a gate whose deadline is at or before ``now``."""
        key = self.keys.gates(workflow)
        [entries] = await self._pipeline(
            "due_gates", [("zrange", (key, "-inf", now), {"byscore": True, "withscores": True})]
        )
        due: list[str] = []
        drops: list[Command] = []
        for start in range(0, len(entries), _BATCH):
            chunk: list[tuple[bytes, float]] = entries[start : start + _BATCH]
            found = await self._read([m.decode() for m, _ in chunk], ("status", "workflow", "pending"))
            for (member, filed), rec in zip(chunk, found, strict=True):
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
                    drops.append([b"ZADD", key.encode(), b"XX", score(deadline), member])
                else:  # no longer waiting (or gone)
                    drops.append(self.unfile_gate(run_id, workflow, filed))
        await self._drop(drops)
        return due
