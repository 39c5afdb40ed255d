"""Redis store: runs shared by any number of processes, on stock Redis 7 or Valkey.

A run is four keys sharing one hash tag (see :mod:`agentflow.stores.keys`). The record
is a HASH with one JSON string per RunRecord field, so the Lua scripts compare and
set fields without ever parsing JSON.

Writes:

* ``commit`` is one Lua script, one round trip: check the lease, set the fields, bump
  ``event_count``, append events and outputs, write the journal, drop the lease on
  release, and set the ttl when the run is final. A gate's deadline index entry, when
  the commit sets one, is pipelined in front of the script: still one round trip.
* ``update`` is WATCH / HGETALL / MULTI / EXEC, retried on conflict.
* ``create`` is a Lua script (exists? then write), so it is idempotent.

The scripts' calls (commit, create, renew, delete) skip redis-py's command layer: the
store packs the RESP itself from bytes and sends it on a connection of the client's
pool, then reads the replies with redis-py (its parser, timeouts and error handling).
That is most of a commit's client time otherwise: encoding two dozen arguments one by
one, per-command bookkeeping, and on Python < 3.12 a task per send.

The scripts live in :mod:`agentflow.stores.lua`. Index entries (runs per workflow,
gate deadlines) are written *before* the run's write, so a crash in between leaves an
entry that readers check against the record and drop, never a run no index lists.

Redis unreachable: every operation retries connection errors and timeouts with
exponential backoff for ``retry_for`` seconds, then raises :class:`StoreError`. A
retry after a lost reply is safe: each commit, create and update writes a unique
nonce into the record, and the script (or the retry's read) that finds its own nonce
already there knows the first attempt applied and does not apply it again.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import itertools
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError, WatchError

from ..errors import CorruptRecordError, LeaseLostError, StoreError
from ..records import FINAL, Commit, RunEvent, RunRecord, RunStatus
from . import lua
from .base import Change, Lease, LoadedRun
from .codec import (
    RECORD_FIELDS,
    check_commit_fields,
    check_record,
    deadline_of,
    decode,
    encode,
    encode_event,
    encode_output,
    make_event,
    make_output,
    make_record,
)
from .keys import Keys, RunKeys

__all__ = ["RedisStore"]

T = TypeVar("T")

_BATCH = 256  # records fetched per pipelined round trip when listing
_MAX_CONFLICTS = 1000  # update attempts lost to concurrent writers before giving up


def _pack(command: Sequence[bytes]) -> bytes:
    """One command in RESP, the form Redis reads: an array of bulk strings."""
    return b"*%d\r\n" % len(command) + b"".join([b"$%d\r\n%b\r\n" % (len(a), a) for a in command])


async def _send(conn: Connection, data: bytes) -> None:
    """``conn.send_packed_command(data)``, without its cost when the socket takes it all.

    redis-py bounds every send by the socket timeout with ``asyncio.wait_for``, which on
    Python < 3.12 runs the send as a task of its own: two more event-loop turns per
    command. A send the kernel takes at once cannot hang, so the bound (and redis-py's
    error handling, which closes the connection) is only needed when data is left over.
    """
    writer = getattr(conn, "_writer", None)
    if writer is None or conn.health_check_interval or not conn.is_connected:
        await conn.send_packed_command(data)  # connects, checks health: redis-py's own way
        return
    try:
        writer.write(data)
    except OSError as exc:
        await conn.disconnect(nowait=True)
        raise ConnectionError(f"Error while writing to socket: {exc}") from exc
    if writer.transport.get_write_buffer_size():
        try:
            await asyncio.wait_for(writer.drain(), conn.socket_timeout)
        except builtins.TimeoutError:  # asyncio's; TimeoutError here is redis-py's
            await conn.disconnect(nowait=True)
            raise TimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await conn.disconnect(nowait=True)
            raise ConnectionError(f"Error while writing to socket: {exc}") from exc


def _score(value: float) -> bytes:
    return repr(float(value)).encode()


def _where(client: aioredis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    if "path" in kw:
        return f"unix:{kw['path']}"
    return f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


class RedisStore:
    """Keeps runs in Redis (7+, or Valkey); shared by every process that reaches it.

    Args:
        url: ``redis://`` URL; defaults to ``$REDIS_URL``, then ``redis://localhost:6379/0``.
        ttl: seconds a finished run is kept, or None to keep it.
        key_prefix: prepended to every key.
        client: an existing ``redis.asyncio.Redis`` to use instead of ``url`` (created
            with the default ``decode_responses=False``). The store does not close it.
        retry_for: seconds to keep retrying while Redis is unreachable before an
            operation raises :class:`StoreError`.
    """

    def __init__(
        self,
        url: str | None = None,
        ttl: float | None = None,
        key_prefix: str = "",
        client: aioredis.Redis | None = None,
        *,
        retry_for: float = 10.0,
    ) -> None:
        self.ttl = ttl
        self.key_prefix = key_prefix
        self.retry_for = retry_for
        self.keys = Keys(key_prefix)
        self._owns_client = client is None
        if client is None:
            url = url or os.environ.get("REDIS_URL") or "redis://localhost:6379/0"
            # Retries are ours (bounded by retry_for, nonce-protected), not redis-py's.
            connect_timeout = min(5.0, max(retry_for, 0.1))
            client = aioredis.Redis.from_url(
                url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=connect_timeout
            )
        self._client = client
        self._where = _where(client)
        self._nonces = itertools.count()
        self._instance = os.urandom(6).hex()

    @property
    def client(self) -> aioredis.Redis:
        """The underlying ``redis.asyncio.Redis`` client."""
        return self._client

    # -- plumbing ---------------------------------------------------------------------

    def _nonce(self) -> bytes:
        return f"{self._instance}:{next(self._nonces)}".encode()

    async def _retrying(
        self, what: str, run_id: str | None, attempt: Callable[[], Awaitable[T]], key: str | None = None
    ) -> T:
        """Run ``attempt``, retrying connection failures with backoff for ``retry_for`` s.

        A reply saying stored data has the wrong shape (a key of the wrong type, a count
        that is not a number) is reported as a damaged ``key`` of ``run_id``.
        """
        give_up = time.monotonic() + self.retry_for
        delay = 0.02
        while True:
            try:
                return await attempt()
            except (ConnectionError, TimeoutError) as exc:
                left = give_up - time.monotonic()
                if left <= 0:
                    subject = f"run {run_id}: " if run_id else ""
                    raise StoreError(
                        f"{subject}Redis at {self._where} unreachable for {self.retry_for:g} s during "
                        f"{what} ({exc}); a write is atomic, so it was applied entirely or not at all"
                    ) from exc
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, 1.0)
            except ResponseError as exc:
                if run_id and key and any(m in str(exc) for m in ("WRONGTYPE", "not an integer")):
                    raise CorruptRecordError(run_id, key, str(exc)) from exc
                subject = f"run {run_id}: " if run_id else ""
                raise StoreError(f"{subject}Redis refused {what}: {exc}") from exc

    async def _round_trip(self, commands: Sequence[Sequence[bytes]]) -> list[Any]:
        """Send ``commands`` together and read their replies: one round trip.

        A reply that is an error comes back as the exception, in its place. The commands
        are packed here (RESP, from bytes) and sent on a connection of the client's pool,
        which skips redis-py's per-argument encoding and per-command bookkeeping: most of
        a commit's client time otherwise. Connection failures raise, as with redis-py, and
        leave the connection closed (redis-py closes it on any error mid-read).
        """
        client = self._client
        if client.single_connection_client:  # its one connection is redis-py's to manage
            pipe = client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return list(await pipe.execute(raise_on_error=False))
        pool = client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]  # untyped in redis-py 8
        try:
            await _send(conn, b"".join([_pack(command) for command in commands]))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:  # the connection stays in step: read the rest
                    replies.append(exc)
            return replies
        except BaseException:
            # Replies may be left unread (an error reply redis-py raises as a connection
            # error, a cancellation): never hand the connection on out of step.
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

    async def _eval(
        self,
        script: lua.Script,
        keys: Sequence[bytes],
        args: Sequence[bytes],
        before: Sequence[Sequence[bytes]] = (),
    ) -> list[Any]:
        """Run ``script`` by its SHA after the commands ``before`` (idempotent index writes),
        all in one round trip; the script is loaded on a NOSCRIPT reply.

        Returns every reply, the script's last.

        Raises:
            ResponseError: one of the commands failed.
        """
        command = [b"EVALSHA", script.sha_bytes, b"%d" % len(keys), *keys, *args]
        for _ in range(2):
            replies = await self._round_trip([*before, command])
            if isinstance(replies[-1], NoScriptError):
                # First use on this server (or after a restart / SCRIPT FLUSH). Running
                # the index writes again is harmless.
                await self._client.script_load(script.source)
                continue
            for r in replies:
                if isinstance(r, Exception):
                    raise r
            return replies
        raise StoreError(f"Redis at {self._where} keeps forgetting agentflow's scripts")

    def _mapping(self, rec: RunRecord) -> dict[str, bytes]:
        check_record(rec)
        return {name: encode(rec.run_id, name, getattr(rec, name)) for name in RECORD_FIELDS}

    def _record(self, run_id: str, key: str, raw: dict[Any, Any]) -> RunRecord:
        values = {}
        for field, value in raw.items():
            name = field.decode() if isinstance(field, bytes) else str(field)
            if name != "_commit":
                values[name] = decode(run_id, f"{key}[{name}]", value)
        rec = make_record(run_id, key, values)
        return rec

    @staticmethod
    def _ttl_ms(ttl: float | None) -> int:
        return max(1, int(ttl * 1000)) if ttl is not None else 0

    async def _zrem_if_score(self, key: str, member: str | bytes, score: float) -> None:
        # Best effort: a stale index entry is harmless, readers check it against the record.
        with contextlib.suppress(ConnectionError, TimeoutError):
            member = member if isinstance(member, bytes) else member.encode()
            await self._eval(lua.ZREM_IF_SCORE, [key.encode()], [member, _score(score)])

    # -- the Store protocol -----------------------------------------------------------

    async def create(self, record: RunRecord, events: Sequence[RunEvent]) -> bool:
        """Store a new run; False (and nothing written) if the run id exists."""
        run_id = record.run_id
        rec = dataclasses.replace(record, event_count=record.event_count + len(events))
        mapping = self._mapping(rec)
        args: list[bytes] = [
            self._nonce(),
            b"%d" % self._ttl_ms(self.ttl if rec.status in FINAL else None),
            b"%d" % len(mapping),
        ]
        for name, value in mapping.items():
            args += (name.encode(), value)
        args += [encode_event(run_id, e) for e in events]
        gate = deadline_of(rec.pending) if rec.status == RunStatus.WAITING else None
        # Before the record, so a crash in between leaves an entry readers drop, never a
        # run that no index lists.
        member, created = run_id.encode(), _score(rec.created_at)
        index = [
            [b"ZADD", self.keys.all_runs().encode(), b"NX", created, member],
            [b"ZADD", self.keys.workflow_runs(rec.workflow).encode(), b"NX", created, member],
        ]
        if gate is not None:
            index.append([b"ZADD", self.keys.gates(rec.workflow).encode(), b"NX", _score(gate), member])
        keys = [k.encode() for k in self.keys.run(run_id)]
        replies = await self._retrying("create", run_id, lambda: self._eval(lua.CREATE, keys, args, index))
        if not replies[-1]:
            return False
        if not (replies[0] and replies[1]):
            # An entry of an earlier run with this id (expired, not yet dropped) was
            # there. Re-score it, so a reader dropping the stale entry (it checks the
            # score) cannot drop this run's.
            async def rescore() -> None:
                pipe = self._client.pipeline(transaction=False)
                pipe.zadd(self.keys.all_runs(), {run_id: rec.created_at})
                pipe.zadd(self.keys.workflow_runs(rec.workflow), {run_id: rec.created_at})
                await pipe.execute()

            await self._retrying("create", run_id, rescore)
        return True

    async def get(self, run_id: str) -> RunRecord | None:
        """The run's record, or None."""
        key = self.keys.run(run_id).rec
        raw = await self._retrying("get", run_id, lambda: self._client.hgetall(key), key)
        return self._record(run_id, key, raw) if raw else None

    async def load(self, run_id: str) -> LoadedRun | None:
        """The record with its outputs and journal, read in one MULTI/EXEC snapshot; or None."""
        keys = self.keys.run(run_id)

        async def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=True)
            pipe.hgetall(keys.rec)
            pipe.lrange(keys.outputs, 0, -1)
            pipe.hgetall(keys.journal)
            return await pipe.execute()

        raw, outputs, journal = await self._retrying("load", run_id, read, keys.rec)
        if not raw:
            return None
        return LoadedRun(
            self._record(run_id, keys.rec, raw),
            [make_output(run_id, keys.outputs, o) for o in outputs],
            {k.decode(): decode(run_id, f"{keys.journal}[{k.decode()}]", v) for k, v in journal.items()},
        )

    async def commit(self, run_id: str, lease: Lease, commit: Commit) -> str | None:
        """Apply ``commit`` atomically (one Lua script, one round trip) if ``lease`` holds.

        Returns:
            The run's control flag (``"pause"``, ``"stop"`` or None).

        Raises:
            LeaseLostError: the token no longer matches; nothing was written.
            StoreError: a value cannot be encoded (nothing was written), or Redis stayed
                unreachable for ``retry_for`` seconds.
        """
        fields = commit.fields
        check_commit_fields(run_id, fields)
        args = [
            self._nonce(),
            encode(run_id, "lease_owner", lease.owner),
            encode(run_id, "lease_token", lease.token),
            b"1" if commit.release else b"0",
            b"%d" % self._ttl_ms(self.ttl),
            encode(run_id, "updated_at", time.time()),
            b"%d" % len(fields),
            b"%d" % len(commit.events),
            b"%d" % len(commit.outputs),
            b"%d" % len(commit.journal),
        ]
        for name, value in fields.items():
            args += (name.encode(), encode(run_id, name, value))
        args += [encode_event(run_id, e) for e in commit.events]
        args += [encode_output(run_id, o) for o in commit.outputs]
        for k, v in commit.journal.items():
            args += (k.encode(), encode(run_id, f"journal {k!r}", v))
        keys = self.keys.run(run_id)
        keys_b = [k.encode() for k in keys]
        index: list[list[bytes]] = []
        if "pending" in fields and fields.get("status", RunStatus.WAITING) == RunStatus.WAITING:
            gate = deadline_of(fields["pending"])
            if gate is not None:
                # The engine files the workflow's name with the gate, so no read is needed
                # and the store keeps nothing per run in memory. In front of the script,
                # in the same round trip.
                workflow = fields["pending"].get("workflow")
                if workflow is None:  # a gate written by another client: one extra read
                    raw = await self._retrying(
                        "commit", run_id, lambda: self._client.hget(keys.rec, "workflow")
                    )
                    workflow = decode(run_id, f"{keys.rec}[workflow]", raw) if raw else ""
                gates_key = self.keys.gates(str(workflow)).encode()
                index.append([b"ZADD", gates_key, _score(gate), run_id.encode()])
        replies = await self._retrying(
            "commit", run_id, lambda: self._eval(lua.COMMIT, keys_b, args, index), keys.rec
        )
        return self._control(run_id, keys, lease, replies[-1])

    def _control(self, run_id: str, keys: RunKeys, lease: Lease, reply: Any) -> str | None:
        """The control flag in a commit or renew script's reply; or LeaseLostError."""
        if isinstance(reply, int):
            raise LeaseLostError(
                run_id, f"token {lease.token} is stale" if reply == 1 else "the run no longer exists"
            )
        value = decode(run_id, f"{keys.rec}[control]", reply) if reply else None
        return value if isinstance(value, str) else None

    async def renew(self, run_id: str, lease: Lease, ttl: float) -> str | None:
        """Extend the lease by ``ttl`` seconds from now (one round trip); return the control flag.

        Raises:
            LeaseLostError: the token no longer matches.
        """
        keys = self.keys.run(run_id)
        args = [
            encode(run_id, "lease_owner", lease.owner),
            encode(run_id, "lease_token", lease.token),
            encode(run_id, "lease_expires", time.time() + ttl),
        ]
        rec = keys.rec.encode()
        replies = await self._retrying("renew", run_id, lambda: self._eval(lua.RENEW, [rec], args), keys.rec)
        return self._control(run_id, keys, lease, replies[-1])

    async def update(self, run_id: str, change: Callable[[RunRecord], Change | None]) -> RunRecord | None:
        """Read-modify-write with WATCH/MULTI/EXEC; ``change`` reruns after a conflict."""
        keys = self.keys.run(run_id)
        nonce = self._nonce()
        written: RunRecord | None = None
        give_up = time.monotonic() + self.retry_for
        for attempt in range(_MAX_CONFLICTS):
            try:
                async with self._client.pipeline(transaction=True) as pipe:
                    await pipe.watch(keys.rec)
                    raw = await pipe.hgetall(keys.rec)
                    if written is not None and raw.get(b"_commit") == nonce:
                        return written  # the last EXEC applied, its reply was lost
                    if not raw:
                        return None
                    old = self._record(run_id, keys.rec, raw)
                    result = change(old)
                    if result is None:
                        return old
                    rec = dataclasses.replace(
                        result.record,
                        updated_at=time.time(),
                        event_count=old.event_count + len(result.events),
                    )
                    mapping = self._mapping(rec)
                    events = [encode_event(run_id, e) for e in result.events]
                    gate = deadline_of(rec.pending) if rec.status == RunStatus.WAITING else None
                    if gate is not None:
                        await pipe.zadd(self.keys.gates(rec.workflow), {run_id: gate})
                    pipe.multi()  # type: ignore[no-untyped-call]  # untyped in redis-py 8
                    full: dict[Any, Any] = {**mapping, "_commit": nonce}
                    pipe.hset(keys.rec, mapping=full)
                    if events:
                        pipe.rpush(keys.events, *events)
                    if self.ttl is not None and rec.status in FINAL:
                        for key in keys:
                            pipe.pexpire(key, self._ttl_ms(self.ttl))
                    written = rec
                    await pipe.execute()
            except WatchError:
                # Someone wrote in between (or the connection dropped while watching).
                await asyncio.sleep(random.random() * 0.001 * min(attempt, 20))
                continue
            except (ConnectionError, TimeoutError) as exc:
                if time.monotonic() >= give_up:
                    raise StoreError(
                        f"run {run_id}: Redis at {self._where} unreachable for {self.retry_for:g} s during "
                        f"update ({exc}); a write is atomic, so it was applied entirely or not at all"
                    ) from exc
                await asyncio.sleep(min(0.02 * 2 ** min(attempt, 6), 1.0))
                continue
            except ResponseError as exc:
                raise StoreError(f"run {run_id}: Redis refused update: {exc}") from exc
            old_gate = deadline_of(old.pending) if old.status == RunStatus.WAITING else None
            if old_gate is not None and gate is None:
                await self._zrem_if_score(self.keys.gates(old.workflow), run_id, old_gate)
            return rec
        raise StoreError(f"run {run_id}: update gave up after {_MAX_CONFLICTS} conflicting writes")

    async def events(self, run_id: str, after: int = 0) -> list[RunEvent]:
        """The run's events with ``seq`` greater than ``after``, in order."""
        key = self.keys.run(run_id).events
        raw = await self._retrying("events", run_id, lambda: self._client.lrange(key, max(after, 0), -1), key)
        return [make_event(run_id, f"{key}[{after + i}]", body, after + i + 1) for i, body in enumerate(raw)]

    async def _records(
        self, index: str, entries: list[tuple[bytes, float]]
    ) -> list[tuple[RunRecord, bytes, float]]:
        """Records for index entries (with the entry), dropping entries whose run is gone."""
        out: list[tuple[RunRecord, bytes, float]] = []
        for start in range(0, len(entries), _BATCH):
            chunk = entries[start : start + _BATCH]

            async def fetch(chunk: list[tuple[bytes, float]] = chunk) -> list[Any]:
                pipe = self._client.pipeline(transaction=False)
                for member, _ in chunk:
                    pipe.hgetall(self.keys.run(member.decode()).rec)
                return await pipe.execute()

            raws = await self._retrying("list_runs", None, fetch)
            for (member, score), raw in zip(chunk, raws, strict=True):
                run_id = member.decode()
                if raw:
                    out.append((self._record(run_id, self.keys.run(run_id).rec, raw), member, score))
                else:  # expired or deleted
                    await self._zrem_if_score(index, member, score)
        return out

    async def list_runs(
        self, workflow: str | None = None, status: RunStatus | None = None
    ) -> list[RunRecord]:
        """Records of the runs of ``workflow`` (all when None), oldest first."""
        index = self.keys.all_runs() if workflow is None else self.keys.workflow_runs(workflow)
        entries = await self._retrying(
            "list_runs", None, lambda: self._client.zrange(index, 0, -1, withscores=True)
        )
        records = await self._records(index, cast("list[tuple[bytes, float]]", entries))
        return [r for r, _, _ in records if status is None or r.status == status]

    async def due_gates(self, workflow: str, now: float) -> list[str]:
        """Ids of runs of ``workflow`` waiting at a gate whose deadline is at or before ``now``."""
        index = self.keys.gates(workflow)
        entries = await self._retrying(
            "due_gates", None, lambda: self._client.zrangebyscore(index, "-inf", now, withscores=True)
        )
        due = []
        for rec, member, score in await self._records(index, cast("list[tuple[bytes, float]]", entries)):
            deadline = deadline_of(rec.pending) if rec.status == RunStatus.WAITING else None
            if deadline is not None and deadline <= now:
                due.append(rec.run_id)
            elif deadline is not None:  # re-filed with a later deadline: correct the entry
                refile: dict[Any, Any] = {member: deadline}
                with contextlib.suppress(ConnectionError, TimeoutError):  # best effort, like a drop
                    await self._client.zadd(index, refile, xx=True)
            else:  # no longer waiting
                await self._zrem_if_score(index, member, score)
        return due

    async def delete(self, run_id: str) -> bool:
        """Remove a run and everything stored with it; False if it did not exist."""
        keys = self.keys.run(run_id)
        keys_b = [k.encode() for k in keys]
        raw = (await self._retrying("delete", run_id, lambda: self._eval(lua.DELETE, keys_b, [])))[-1]
        if raw is None:
            return False
        workflow = str(decode(run_id, f"{keys.rec}[workflow]", raw[0]))
        created_at = decode(run_id, f"{keys.rec}[created_at]", raw[1]) if raw[1] is not None else None
        score = float(created_at) if isinstance(created_at, int | float) else 0.0

        async def unindex() -> None:
            # Score-checked, so a run re-created with this id meanwhile keeps its entries.
            for index in (self.keys.all_runs(), self.keys.workflow_runs(workflow)):
                await self._zrem_if_score(index, run_id, score)
            await self._client.zrem(self.keys.gates(workflow), run_id)

        await self._retrying("delete", run_id, unindex)
        return True

    async def close(self) -> None:
        """Close the connections this store opened (a client passed in stays open)."""
        if self._owns_client:
            await self._client.aclose()
