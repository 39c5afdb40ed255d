"""The Redis store's wire on Redis Cluster: the same round trips, routed to the nodes.

A round trip's commands are sent to the masters that hold their keys' slots, each
node's share together on that node's lane (a connection of its own, pipelined as in
:mod:`agentflow.stores.redis_lane`), all nodes at once; the replies come back in the
order of the commands. A ``MULTI`` ... ``EXEC`` block (the keys of one run) goes to
one node as one. The cluster's map of slots is redis-py's
(``redis.asyncio.cluster.RedisCluster``'s nodes manager): read when the wire is first
used, again after a connection failed (a master may have failed over), and corrected
slot by slot on a ``MOVED`` reply.

Replies that only say "not here, not now" never reach the store:

* ``MOVED``: the slot has a new master; the command is sent there. It was not run,
  so sending it again is safe.
* ``ASK``: the slot is being migrated and the key is at the target already; the
  command is sent there after ``ASKING`` (a block is sent again later instead).
* ``TRYAGAIN``, ``CLUSTERDOWN``: sent again after a short wait.
* ``NOSCRIPT``: that node has not seen agentflow's scripts yet; they are loaded there.

The index entries of a write live in other slots than the run's, most likely on other
nodes, so they are sent first and their replies checked before the write is sent (one
more round trip for the writes that file entries): the entries are in place before the
write, or the write is not made.

Clocks: a run's lease is set and checked by its own node's clock (``TIME`` in its
scripts, and on the connection of an ``update``'s WATCH), so a lease is always judged by
one clock. Only ``recoverable`` and the bucket registry read the time of some node to
choose candidates; taking a run over is then judged on the run's node.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)

from ..errors import StoreError
from . import lua
from .keys import slot
from .lua import Script
from .redis_lane import Lane
from .redis_wire import Command, Packed, Wire, pack

__all__ = ["ClusterWire", "is_cluster_url", "make_cluster_client"]

_REDIRECTS = 16  # redirections of one command within one round trip before giving up
_KEYLESS = frozenset({b"MULTI", b"EXEC", b"DISCARD", b"TIME", b"PING", b"SCRIPT", b"UNWATCH"})
_REDIRECT = (NoScriptError, AskError, TryAgainError, ClusterDownError)  # replies that are not answers


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return url.split("://", 1)[0].lower() in ("redis+cluster", "rediss+cluster")


def make_cluster_client(
    url: str, *, max_connections: int, socket_timeout: float, retry_for: float
) -> RedisCluster:
    """A cluster client from ``redis+cluster://host:port`` (one node; the others are found).

    ``max_connections`` is per node. Retries are the store's, as with one server.
    """
    scheme, rest = url.split("://", 1)
    return RedisCluster.from_url(
        f"{scheme.lower().replace('+cluster', '')}://{rest}",
        max_connections=max_connections,
        retry=Retry(NoBackoff(), 0),
        socket_timeout=socket_timeout,
        socket_connect_timeout=min(socket_timeout, max(retry_for, 0.1)),
    )


def _key(command: Command) -> bytes | None:
    """The key that routes ``command`` (every command the store sends names at most one
    slot); None for a command that touches no key."""
    name = bytes(command[0]).upper()
    if name in _KEYLESS:
        return None
    if name in (b"EVALSHA", b"EVAL"):
        return command[3] if int(command[2]) > 0 else None
    return command[1]


class _Unit(NamedTuple):
    """Commands that go to one node together, in order: one command, or a MULTI ... EXEC."""

    slot: int | None
    at: list[int]  # their places in the round trip


def _units(commands: Sequence[Command | Packed]) -> list[_Unit]:
    units: list[_Unit] = []
    block: _Unit | None = None
    for i, command in enumerate(commands):
        if isinstance(command, Packed):
            key: bytes | None = command.key
            name = b""
        else:
            key, name = _key(command), bytes(command[0]).upper()
        if block is not None:
            block.at.append(i)
            if key is not None and block.slot is None:
                block = units[-1] = _Unit(slot(key), block.at)
            if name == b"EXEC" or name == b"DISCARD":
                block = None
            continue
        unit = _Unit(slot(key) if key is not None else None, [i])
        units.append(unit)
        if name == b"MULTI":
            block = unit
    return units


class _NodePool:
    """What a lane needs of a pool, over one cluster node's connections."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self.max_connections = node.max_connections

    async def get_connection(self) -> Connection:
        conn = self.node.acquire_connection()
        try:
            await self.node.disconnect_if_needed(conn)
            if not conn.is_connected:
                await conn.connect()  # type: ignore[no-untyped-call]  # untyped in redis-py 8
        except BaseException:
            self.node.release(conn)
            raise
        return conn

    async def release(self, conn: Connection) -> None:
        self.node.release(conn)


class ClusterWire(Wire):
    """Round trips to a Redis Cluster through ``client``'s nodes, with the store's retries.

    Args:
        client: a ``redis.asyncio.cluster.RedisCluster`` with bytes replies.
        retry_for: seconds to keep retrying while the cluster is unreachable.

    Raises:
        StoreError: the client decodes replies to str.
    """

    def __init__(self, client: RedisCluster, retry_for: float) -> None:
        if client.get_connection_kwargs().get("decode_responses"):
            raise StoreError("RedisStore needs a client with decode_responses=False (the default)")
        self.client = client  # type: ignore[assignment]  # the cluster's, not one server's
        self.cluster = client
        self.retry_for = retry_for
        startup = list(client.nodes_manager.startup_nodes) or ["?"]
        self.where = f"cluster {', '.join(startup)}"
        self._deferred: list[Command] = []
        self._links: dict[str, tuple[ClusterNode, Lane]] = {}  # per node: its lane
        self._own: dict[str, asyncio.Semaphore] = {}  # per node: connections of one's own
        self._mapped = False  # the slot map was read
        self._stale = False  # a connection failed since: read it again
        self._lock: asyncio.Lock | None = None
        self._closed = False

    # -- the map of slots ---------------------------------------------------------------

    async def ready(self) -> None:
        """Read the cluster's map of slots, unless it is known and no connection failed since.

        Raises:
            ConnectionError: no node answered, or the slots are not all served.
            StoreError: the store is closed.
        """
        if self._closed:
            raise StoreError("the Redis store is closed")
        if self._mapped and not self._stale:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._mapped and not self._stale:
                return
            try:
                if not self._mapped:
                    await self.cluster.initialize()
                else:
                    await self.cluster.nodes_manager.initialize()
            except RedisClusterException as exc:  # no node reachable, slots not covered
                raise ConnectionError(str(exc)) from exc
            self._mapped, self._stale = True, False

    def lost(self) -> None:
        self._stale = True

    async def redirected(self, exc: ResponseError) -> bool:
        if isinstance(exc, MovedError):
            await self.cluster.nodes_manager.move_slot(exc)
            return True
        return isinstance(exc, AskError | TryAgainError | ClusterDownError)

    def _node(self, at: int | None) -> ClusterNode:
        """The master serving slot ``at`` (any node for None)."""
        try:
            if at is None:
                return self.cluster.get_default_node()
            return self.cluster.nodes_manager.get_node_from_slot(at)
        except RedisClusterException as exc:  # a slot nobody serves (yet)
            self._stale = True
            raise ConnectionError(f"Redis Cluster: {exc}") from exc

    async def _lane_of(self, node: ClusterNode) -> Lane:
        found = self._links.get(node.name)
        if found is not None and found[0] is node:
            return found[1]
        if found is not None:  # the node was replaced in the map: its connections went with it
            await found[1].close()
        lane = Lane(_NodePool(node))
        self._links[node.name] = (node, lane)
        return lane

    # -- round trips --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def connection(self, key: bytes = b"") -> AsyncIterator[Connection]:
        await self.ready()
        node = self._node(slot(key) if key else None)
        own = self._own.get(node.name)
        if own is None:
            own = self._own[node.name] = asyncio.Semaphore(max(1, node.max_connections - 1))
        async with own:
            pool = _NodePool(node)
            conn = await pool.get_connection()
            try:
                yield conn
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
            finally:
                await pool.release(conn)

    async def transact(
        self, conn: Connection, before: Sequence[Command], commands: Sequence[Command]
    ) -> list[Any]:
        """Index writes ``before`` to their own nodes, confirmed; then ``commands`` on ``conn``."""
        if before:
            self.checked(await self.round_trip(before))
        return self.checked(await self.exchange(conn, commands))

    async def evalsha(self, script: Script, command: Packed, before: Sequence[Command] = ()) -> list[Any]:
        """The index writes ``before`` to their nodes, confirmed; only then the script.

        Raises:
            ResponseError: an index write failed (the script was not sent), or the script.
        """
        done = self.checked(await self.round_trip(before)) if before else []
        [reply] = await self.round_trip([command])  # NOSCRIPT is handled on the way
        if isinstance(reply, Exception):
            raise reply
        return [*done, reply]

    async def round_trip(self, commands: Sequence[Command | Packed]) -> list[Any]:
        """``commands`` sent to the nodes holding their keys, the deferred clean-ups with them;
        their replies in order (an error reply as the exception, in its place).

        Connection failures raise, as with one server.
        """
        deferred, self._deferred = self._deferred, []
        if deferred:
            commands = [*deferred, *commands]
        try:
            replies = await self._routed(commands)
        except BaseException:
            self.defer(deferred)  # harmless to send again
            raise
        return replies[len(deferred) :] if deferred else replies

    async def _routed(self, commands: Sequence[Command | Packed]) -> list[Any]:
        await self.ready()
        replies: list[Any] = [None] * len(commands)
        todo: list[tuple[_Unit, ClusterNode | None]] = [(unit, None) for unit in _units(commands)]
        for attempt in range(_REDIRECTS):
            groups: dict[str, tuple[ClusterNode, list[tuple[_Unit, ClusterNode | None]]]] = {}
            for unit, asking in todo:
                node = asking or self._node(unit.slot)
                groups.setdefault(node.name, (node, []))[1].append((unit, asking))
            sent: list[list[Any] | BaseException]
            if len(groups) == 1:  # one node (most commits): no task
                [(node, units)] = groups.values()
                sent = [await self._send(node, units, commands)]
            else:
                sent = await asyncio.gather(
                    *(self._send(node, units, commands) for node, units in groups.values()),
                    return_exceptions=True,
                )
            for result in sent:
                if isinstance(result, BaseException):
                    raise result
            todo, wait = [], False
            for (node, units), got in zip(groups.values(), sent, strict=True):
                assert isinstance(got, list)
                pos = 0
                for unit, asking in units:
                    if asking is not None:
                        pos += 1  # ASKING's own reply
                    mine = got[pos : pos + len(unit.at)]
                    pos += len(unit.at)
                    problem = next((r for r in mine if isinstance(r, _REDIRECT)), None)
                    if problem is None:
                        for i, reply in zip(unit.at, mine, strict=True):
                            replies[i] = reply
                        continue
                    target: ClusterNode | None = None
                    if isinstance(problem, NoScriptError):
                        await self._load_scripts(node)
                    elif isinstance(problem, MovedError):
                        await self.cluster.nodes_manager.move_slot(problem)
                    elif isinstance(problem, AskError) and len(unit.at) == 1:
                        target = self.cluster.nodes_manager.get_node(problem.host, problem.port)
                        wait = wait or target is None
                    else:  # TRYAGAIN, CLUSTERDOWN, or ASK within a block: once the slot settles
                        wait = True
                    todo.append((unit, target))
            if not todo:
                return replies
            if wait:
                await asyncio.sleep(0.005 * 2 ** min(attempt, 6))
        self._stale = True
        raise ConnectionError("Redis Cluster kept redirecting the store's commands; its slots are moving")

    async def _send(
        self,
        node: ClusterNode,
        units: list[tuple[_Unit, ClusterNode | None]],
        commands: Sequence[Command | Packed],
    ) -> list[Any]:
        parts: list[bytes] = []
        for unit, asking in units:
            if asking is not None:
                parts.append(pack([b"ASKING"]))
            for i in unit.at:
                command = commands[i]
                parts.append(command.data if isinstance(command, Packed) else pack(command))
        lane = await self._lane_of(node)
        return await lane.request(b"".join(parts), len(parts))

    async def _load_scripts(self, node: ClusterNode) -> None:
        """Load every script on ``node``: it answered NOSCRIPT (new, restarted, or flushed)."""
        scripts = [[b"SCRIPT", b"LOAD", script.source.encode()] for script in lua.BY_SHA.values()]
        lane = await self._lane_of(node)
        for reply in await lane.request(b"".join(pack(c) for c in scripts), len(scripts)):
            if isinstance(reply, Exception):
                raise reply

    async def close(self) -> None:
        """Send what clean-ups are queued, and hand the lanes' connections back to their nodes."""
        await self.flush()
        self._closed = True
        for _, lane in self._links.values():
            await lane.close()
        self._links.clear()
