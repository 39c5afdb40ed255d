"""Redis store: runs shared by any number of processes, on stock Redis 7 or Valkey, or
on a Redis Cluster.

A run is four keys sharing one hash tag (see :mod:`agentflow.stores.keys`). The record
is a HASH with one JSON string per RunRecord field, so the Lua scripts compare and
set fields without ever parsing JSON.

Writes, each safe to send again after a lost reply:

* ``commit`` is one Lua script, one round trip: the ``(lease token, seq)`` fence, the
  lease check, the fields, ``event_count``, events, outputs, journal, dropping the lease
  on release, the ttl when the run is final. A commit that changes the run's status
  files it in the status indexes first, in a round trip of its own.
* ``update`` is WATCH / HMGET / TIME, then the change's index entries and MULTI ...
  EXEC: two round trips, retried on conflict. ``change`` gets the server's clock (see
  :mod:`agentflow.stores.redis_update`).
* ``create`` and ``delete`` are scripts that recognise their own retry. A create whose
  index entries Redis refused (a damaged index key) deletes what it wrote and raises:
  no run is left that no index lists.
* ``renew`` is a script that sets the lease from the server's clock.

Leases are judged by the server's clock only (``TIME`` in the scripts), so machines
whose clocks disagree never take each other's runs. Listing reads the indexes
(:mod:`agentflow.stores.redis_index`): it costs what it returns, not what is stored.

Round trips (:mod:`agentflow.stores.redis_wire`) are pipelined on one connection that
every operation but ``update`` shares (:mod:`agentflow.stores.redis_lane`): with many
runs in flight, their commits travel together, one write and one read for many steps.

A commit that leaves the status alone files nothing in the indexes. To file a commit's
index entries without reading first, the store remembers each run's workflow and
``created_at`` (:mod:`agentflow.stores.redis_known`); the script checks them.

Redis Cluster (a ``redis+cluster://`` URL, or a ``RedisCluster`` client): the same
scripts, each on the run's slot; round trips routed to the nodes by
:mod:`agentflow.stores.redis_cluster`; index keys in the cluster layout of
:mod:`agentflow.stores.keys`, sharded over slots. One server keeps the plain layout,
the one every earlier version wrote, so the runs stored there load as they are.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from ..errors import StoreError
from ..types import FINAL, RunEvent, RunStatus
from . import lua, redis_feed, redis_limits
from .capabilities import Claim, QueueDepth, create_then_enqueue
from .codec import (
    deadline_of,
    decode,
    encode,
    encode_event,
    make_event,
    make_output,
)
from .contract import (
    ChangeFn,
    Lease,
    LoadedRun,
    RunRecord,
    Store,
    indexed_approvals,
)
from .keys import Keys
from .redis_approvals import Approvals
from .redis_cluster import ClusterWire, is_cluster_url, make_cluster_client
from .redis_commit import RedisCommits
from .redis_credentials import RedisCredentials
from .redis_index import Index
from .redis_known import KnownRuns
from .redis_queue import StreamQueue
from .redis_update import Updates, hash_of, record_of
from .redis_wire import Command, IndexRefused, Wire, make_client, pairs

__all__ = ["RedisStore"]


class _Creation(NamedTuple):
    entries: list[Command]  # the index entries, sent in front of the script
    keys: list[bytes]
    args: list[bytes]
    version: bytes
    facts: tuple[bytes, bytes]  # workflow and created_at, JSON


class RedisStore(RedisCommits, RedisCredentials):
    """Keeps runs in Redis (7+, or Valkey); shared by every process that reaches it.

    Args:
        url: ``redis://`` URL, or ``redis+cluster://host:port`` (``rediss+cluster://``
            with TLS) for a Redis Cluster, any one of its nodes; defaults to
            ``$REDIS_URL``, then ``redis://localhost:6379/0``.
        ttl: seconds a finished run is kept, or None to keep it.
        key_prefix: prepended to every key.
        client: an existing ``redis.asyncio.Redis`` (with a connection pool) or
            ``redis.asyncio.cluster.RedisCluster`` to use instead of ``url``, with the
            default ``decode_responses=False``. The store does not close it, and has no
            :meth:`sibling`.
        retry_for: seconds to keep retrying while Redis is unreachable (or no connection
            is free) before an operation raises :class:`StoreError`.
        max_connections: connections the store opens at most (to each node, on a
            cluster); past that, operations wait for a free one.
        socket_timeout: seconds to wait for a reply before the connection counts as lost.

    Raises:
        StoreError: ``client`` cannot serve a store, or ``key_prefix`` has braces that
            would split a run's keys over two slots of a cluster.
    """

    def __init__(
        self,
        url: str | None = None,
        ttl: float | None = None,
        key_prefix: str = "",
        client: aioredis.Redis | RedisCluster | None = None,
        *,
        retry_for: float = 10.0,
        max_connections: int = 64,
        socket_timeout: float = 5.0,
    ) -> None:
        self.ttl = ttl
        self.key_prefix = key_prefix
        self.retry_for = retry_for
        self._url = url or os.environ.get("REDIS_URL") or "redis://localhost:6379/0"
        self._max_connections = max_connections
        self._socket_timeout = socket_timeout
        self._owns_client = client is None
        if client is None:
            make = make_cluster_client if is_cluster_url(self._url) else make_client
            client = make(
                self._url, max_connections=max_connections, socket_timeout=socket_timeout, retry_for=retry_for
            )
        cluster = isinstance(client, RedisCluster)
        self.keys = Keys(key_prefix, cluster=cluster)
        self._wire = (
            ClusterWire(client, retry_for) if isinstance(client, RedisCluster) else Wire(client, retry_for)
        )
        self._index = Index(self.keys, self._wire, ttl)
        self._approvals = Approvals(self.keys, self._wire, self._index)
        self._known = KnownRuns(self.keys, self._wire)  # what the store knows of the runs it advances
        self._updates = Updates(
            self._wire, self._index, self.keys, ttl, self._nonce, self._known.remember, self._approvals
        )
        self._queue = StreamQueue(client, key_prefix, cluster, self._wire)
        self._ttl_arg = b"%d" % self._ttl_ms()
        self._instance = os.urandom(6).hex()
        self._counter = itertools.count()

    @property
    def client(self) -> aioredis.Redis | RedisCluster:
        """The underlying client: a ``redis.asyncio.Redis``, or a ``RedisCluster``."""
        wire = self._wire
        return wire.cluster if isinstance(wire, ClusterWire) else wire.client

    # -- plumbing ---------------------------------------------------------------------

    def _nonce(self) -> bytes:
        return f"{self._instance}{next(self._counter):x}".encode()

    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000)) if self.ttl is not None else 0

    # -- the Store protocol -----------------------------------------------------------

    def _creation(self, record: RunRecord, events: Sequence[RunEvent]) -> _Creation:
        """What creating a run sends: its index entries and the script's keys and arguments.

        Raises:
            StoreError: a value cannot be encoded, or the run id is unusable.
        """
        run_id = record.run_id
        if "\0" in run_id:
            raise StoreError(f"run {run_id!r}: a run id cannot hold a NUL character")
        mapping = hash_of(record)
        if events:
            mapping["event_count"] = b"%d" % (record.event_count + len(events))
        version = mapping["_ix"] = self._nonce()
        status = record.status
        args = [self._nonce(), self._ttl_arg if status in FINAL else b"0", b"%d" % len(mapping)]
        for name, value in mapping.items():
            args += (name.encode(), value)
        args += [encode_event(run_id, e) for e in events]
        index = self._index.file(run_id, status, record.workflow, record.created_at, version)
        gate = deadline_of(record.pending) if status == RunStatus.WAITING else None
        if gate is not None:
            index.append(self._index.file_gate(run_id, record.workflow, gate))
        index += self._approvals.file(run_id, record.workflow, indexed_approvals(record))
        keys = self._known.get(run_id).keys
        return _Creation(index, keys, args, version, (mapping["workflow"], mapping["created_at"]))

    async def create(self, record: RunRecord, events: Sequence[RunEvent]) -> bool:
        """Store a new run; False (and nothing written) if the run id exists.

        A retry after a lost reply returns True when the first attempt created it.
        """
        return await self._create(record, events, queued=False)

    async def create_queued(self, record: RunRecord, events: Sequence[RunEvent]) -> bool:
        """:meth:`create`, and the run queued for the workers of its workflow
        (``CreatesQueued``): by the same script on one server; on a cluster, where the
        stream lives in a slot of its own, by an ``XADD`` once the run is created."""
        if self.keys.cluster:
            return await create_then_enqueue(self.create, self._queue.enqueue, record, events)
        return await self._create(record, events, queued=True)

    async def _create(self, record: RunRecord, events: Sequence[RunEvent], queued: bool) -> bool:
        run_id = record.run_id
        made = self._creation(record, events)
        keys, args = made.keys, made.args
        if queued:
            keys, args = [*keys, self._queue.stream(record.workflow)], [*args, run_id.encode()]
        try:
            replies = await self._wire.retrying(
                "create", run_id, lambda: self._wire.eval(lua.CREATE, keys, args, made.entries)
            )
        except IndexRefused as exc:  # one server: the script ran after the refused entry
            if exc.reply:  # created by this call: undo it, so that no record goes unlisted
                nonce = made.args[0]
                await self._wire.retrying(
                    "create", run_id, lambda: self._wire.eval(lua.DELETE, made.keys, [nonce, nonce])
                )
            self._wire.defer(self._index.unfile(run_id, record.status, record.workflow, made.version))
            if not exc.reply:
                return False
            raise StoreError(
                f"run {run_id}: Redis refused an index entry of the new run ({exc.error}); the run was not "
                "created (look for an index key holding another type)"
            ) from exc.error
        if not replies[-1]:
            self._wire.defer(self._index.unfile(run_id, record.status, record.workflow, made.version))
            return False
        self._known.remember(run_id, *made.facts)
        return True

    async def get(self, run_id: str) -> RunRecord | None:
        """The run's record, or None.

        Raises:
            CorruptRecordError: the stored record cannot be read (names the run and key).
        """
        known = self._known.get(run_id, keep=False)
        command = [b"HGETALL", known.keys[0]]
        [reply] = await self._wire.retrying("get", run_id, lambda: self._wire.call([command]), known.rec)
        raw = pairs(reply)
        key = known.rec
        if not raw:
            return None
        self._known.remember(run_id, raw.get(b"workflow"), raw.get(b"created_at"), keep=False)
        return record_of(run_id, key, raw)

    async def load(self, run_id: str) -> LoadedRun | None:
        """The record with its outputs and journal, read in one MULTI/EXEC snapshot; or None."""
        keys = self.keys.run(run_id)
        rec, _, outs, jour = (k.encode() for k in keys)
        snapshot = [
            [b"MULTI"],
            [b"HGETALL", rec],
            [b"LRANGE", outs, b"0", b"-1"],
            [b"HGETALL", jour],
            [b"EXEC"],
        ]

        async def read() -> list[Any]:
            return self._wire.checked((await self._wire.call(snapshot))[-1])

        found, outputs, found_journal = await self._wire.retrying("load", run_id, read, keys.rec)
        raw, journal = pairs(found), pairs(found_journal)
        if not raw:
            return None
        self._known.remember(run_id, raw.get(b"workflow"), raw.get(b"created_at"), keep=False)
        return LoadedRun(
            record_of(run_id, keys.rec, raw),
            [make_output(run_id, keys.outputs, o) for o in outputs],
            {k.decode(): decode(run_id, f"{keys.journal}[{k.decode()}]", v) for k, v in journal.items()},
        )

    async def take(
        self, run_id: str, workflow: str, owner: str, ttl: float
    ) -> tuple[Lease, LoadedRun] | None:
        """Take the lease of a run handed over and load it, in one round trip (``TakesRuns``).

        Returns None, changing nothing, unless the run is running, of ``workflow`` and
        without an owner (see :class:`~agentflow.stores.capabilities.TakesRuns`).
        """
        keys = self.keys.run(run_id)
        rec, _, outs, jour = (k.encode() for k in keys)
        args = [
            encode(run_id, "workflow", workflow),
            encode(run_id, "lease_owner", owner),
            repr(float(ttl)).encode(),
            self._nonce(),
        ]
        replies = await self._wire.retrying(
            "take", run_id, lambda: self._wire.eval(lua.TAKE, [rec, outs, jour], args), keys.rec
        )
        reply = replies[-1]
        if not isinstance(reply, list):
            return None
        found, outputs, found_journal = reply
        raw, journal = pairs(found), pairs(found_journal)
        record = record_of(run_id, keys.rec, raw)
        if record.lease_owner != owner:
            return None
        # Kept (this process writes the run now): its status-changing commits file index
        # entries without reading these first.
        self._known.remember(run_id, raw.get(b"workflow"), raw.get(b"created_at"))
        loaded = LoadedRun(
            record,
            [make_output(run_id, keys.outputs, o) for o in outputs],
            {k.decode(): decode(run_id, f"{keys.journal}[{k.decode()}]", v) for k, v in journal.items()},
        )
        return Lease(owner, record.lease_token), loaded

    async def update(self, run_id: str, change: ChangeFn) -> RunRecord | None:
        """Read-modify-write with WATCH/MULTI/EXEC; ``change(record, now)`` with the server's clock.

        ``change`` runs again after a conflict, and after a lost reply unless the retry
        finds that the first attempt applied.
        """
        return await self._updates.update(run_id, change)

    async def events(self, run_id: str, after: int = 0) -> list[RunEvent]:
        """The run's events with ``seq`` greater than ``after``, in order."""
        key = self.keys.run(run_id).events
        command = [b"LRANGE", key.encode(), b"%d" % max(after, 0), b"-1"]
        [raw] = await self._wire.retrying("events", run_id, lambda: self._wire.call([command]), key)
        return [make_event(run_id, f"{key}[{after + i}]", body, after + i + 1) for i, body in enumerate(raw)]

    async def list_runs(
        self,
        workflow: str | None = None,
        status: RunStatus | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[RunRecord]:
        """Light records (no input, state, output), newest first, at most ``limit``.

        ``after`` is the ``run_id`` of the last record of the previous page (a run that
        is gone meanwhile ends the listing). A record that cannot be decoded is listed
        with ``corrupt`` set.
        """
        return await self._index.list_runs(workflow, status, limit, after)

    async def recoverable(self, workflow: str, limit: int = 100) -> list[str]:
        """Ids of ``workflow``'s running runs whose lease ran out by the server's clock."""
        return await self._index.recoverable(workflow, limit)

    async def due_gates(self, workflow: str, now: float) -> list[str]:
        """Ids of runs of ``workflow`` waiting at a gate whose deadline is at or before ``now``."""
        return await self._index.due_gates(workflow, now)

    async def approvals(
        self,
        approver: str | None = None,
        workflow: str | None = None,
        kind: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[dict[str, Any]]:
        """Pending approvals, newest first, at most ``limit``, from the approval index (see
        :mod:`agentflow.stores.redis_approvals`).

        Raises:
            StoreError: ``after`` is not an approval of a stored run (or was decided more
                than two days ago).
        """
        return await self._approvals.page(approver, workflow, kind, limit, after)

    async def delete(self, run_id: str) -> bool:
        """Remove a run and everything stored with it; False if it did not exist.

        Nothing of the run is left behind, so a retry after a lost reply finds no run
        and returns False although the first attempt deleted it.
        """
        keys = [k.encode() for k in self.keys.run(run_id)]
        nonce = self._nonce()
        replies = await self._wire.retrying(
            "delete", run_id, lambda: self._wire.eval(lua.DELETE, keys, [nonce])
        )
        reply = replies[-1]
        self._known.forget(run_id)
        if not reply[0]:
            return False
        if len(reply) >= 4 and reply[1]:
            try:
                workflow = decode(run_id, "workflow", reply[1])
            except StoreError:
                workflow = None
            if isinstance(workflow, str):
                self._wire.defer(self._index.unfile_stored(run_id, workflow, reply[2], reply[3]))
                pending = reply[4] if len(reply) > 4 else None
                self._wire.defer(self._approvals.unfile_deleted(run_id, workflow, pending))
                await self._wire.flush()
        return True

    async def connect(self) -> None:
        """Open the shared connection and load the scripts (``Connects``): one round trip.

        Without it, a burst of first calls waits for the connection together, and each
        of them finds its script unknown to the server and sends it again. On a cluster,
        the map of slots is read instead.
        """
        wire = self._wire
        if isinstance(wire, ClusterWire):
            await wire.retrying("connecting", None, wire.ready)
            return
        loads = [[b"SCRIPT", b"LOAD", script.source.encode()] for script in lua.BY_SHA.values()]
        await wire.retrying("connecting", None, lambda: wire.call(loads))

    # -- the change feed (ChangeFeed; see redis_feed) ---------------------------------

    async def changes(self, changed: Callable[[str], None]) -> None:
        """Call ``changed(run_id)`` when a run is created, or its status, approvals or control
        change, in any process (pub/sub)."""
        wire = self._wire
        if isinstance(wire, ClusterWire):  # the subscription is routed by the cluster's slot map
            await wire.retrying("changes", None, wire.ready)
        await redis_feed.follow(self.client, self.keys.changes(), changed)

    # -- the work queue (WorkQueue; see redis_queue) ---------------------------------

    async def enqueue(self, workflow: str, run_id: str) -> None:
        """Hand ``run_id`` to the workers of ``workflow`` (an entry of its stream)."""
        await self._queue.enqueue(workflow, run_id)

    async def claim(self, workflows: Sequence[str], consumer: str, limit: int, wait: float) -> list[Claim]:
        """Up to ``limit`` entries for ``consumer`` through the streams' consumer group."""
        return await self._queue.claim(workflows, consumer, limit, wait)

    async def ack(self, claims: Sequence[Claim]) -> None:
        """Acknowledge and delete the entries."""
        await self._queue.ack(claims)

    async def queue_depth(self, workflow: str) -> QueueDepth:
        """Entries of ``workflow`` not delivered yet, and the oldest one's age."""
        return await self._queue.queue_depth(workflow)

    def sibling(self) -> Store | None:
        """A new store on the same URL and options, for another thread's event loop.

        None when the store was given a client (its pool belongs to one event loop).
        """
        if not self._owns_client:
            return None
        return RedisStore(
            self._url,
            self.ttl,
            self.key_prefix,
            retry_for=self.retry_for,
            max_connections=self._max_connections,
            socket_timeout=self._socket_timeout,
        )

    async def close(self) -> None:
        """Send what clean-ups are queued, and close the connections this store opened."""
        await self._wire.close()
        if self._owns_client:
            await self.client.aclose()

    # -- rate limits (RateLimits; see redis_limits) ----------------------------------

    async def acquire_limit(
        self, key: str, ticket: str, quota: redis_limits.Quota, tokens: int
    ) -> tuple[float, str | None]:
        """A turn of rate limit ``key`` for ``ticket``: one script, on the Redis server's clock."""
        return await redis_limits.acquire(self.client, self.key_prefix, key, ticket, quota, tokens)

    async def renew_limit(self, key: str, ticket: str, quota: redis_limits.Quota) -> None:
        """Keep ``ticket``'s concurrency slot of ``key`` for another ``quota.hold`` seconds."""
        await redis_limits.renew(self.client, self.key_prefix, key, ticket, quota)

    async def release_limit(
        self, key: str, ticket: str, quota: redis_limits.Quota, tokens: int | None
    ) -> None:
        """Give back ``ticket``'s slot of ``key`` and count its real ``tokens``."""
        await redis_limits.release(self.client, self.key_prefix, key, ticket, tokens)
