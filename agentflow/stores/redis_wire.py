"""The Redis store's wire: connections, round trips, scripts, retries.

* Round trips go on the lane (:mod:`agentflow.stores.redis_lane`): one connection of
  the pool that every caller shares, pipelined, with the RESP packed here from bytes
  (no redis-py command layer) and parsed as it arrives. WATCH ... EXEC, which needs a
  connection of its own, takes one from the rest of the pool.
* The pool is a blocking one (``max_connections``): past that many connections in use,
  the next caller waits for a free one rather than failing. Waiting is not an outage;
  only a wait longer than ``retry_for`` gives up.
* Redis unreachable: :meth:`Wire.retrying` retries connection errors and timeouts with
  backoff for ``retry_for`` seconds, then raises :class:`StoreError`. Every write is
  safe to send again (see :mod:`agentflow.stores.lua`). After a server restart the pool
  reconnects and a script is loaded again on its first NOSCRIPT reply.
* Index clean-ups that need no answer (dropping an index entry a write just made
  stale) are queued with :meth:`Wire.defer` and ride along with the next round trip.
* Index entries a write files go in front of it, in the same round trip: Redis runs
  them first. Should one be refused (a damaged index key), the script has run all the
  same; :class:`IndexRefused` says so, and a create undoes itself, so no record is
  left that no index lists.

On Redis Cluster the same round trips are routed to the nodes that hold their keys by
:class:`agentflow.stores.redis_cluster.ClusterWire`, a subclass.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.connection import BlockingConnectionPool, Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError

from ..errors import CorruptRecordError, StoreError
from . import lua
from .lua import Script
from .redis_lane import Lane

__all__ = ["Command", "IndexRefused", "Packed", "Wire", "make_client", "pack", "pack_args", "pairs"]

T = TypeVar("T")
Command = Sequence[bytes]


class IndexRefused(Exception):
    """Redis refused an index write sent in front of a script, and ran the script.

    Attributes:
        error: the refusal.
        reply: the script's reply.
    """

    def __init__(self, error: Exception, reply: Any) -> None:
        super().__init__(str(error))
        self.error = error
        self.reply = reply


class Packed(NamedTuple):
    """A command packed in RESP already, with the key it touches (its route on a cluster)."""

    data: bytes
    key: bytes


_MAX_DEFERRED = 10_000  # queued clean-ups kept; past that, readers drop the stale entries
_NO_CONNECTION = "No connection available"  # redis-py's BlockingConnectionPool timeout


def make_client(url: str, *, max_connections: int, socket_timeout: float, retry_for: float) -> aioredis.Redis:
    """A client on a blocking pool of ``max_connections``, without redis-py's own retries.

    Retries are the store's (bounded by ``retry_for``, safe for every write); a pool
    wait longer than ``retry_for`` raises like an outage.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=max(retry_for, 0.1),
        retry=Retry(NoBackoff(), 0),
        socket_timeout=socket_timeout,
        socket_connect_timeout=min(socket_timeout, max(retry_for, 0.1)),
    )
    return aioredis.Redis.from_pool(pool)


_HEADS = [b"\r\n$%d\r\n" % n for n in range(4096)]  # what goes before an argument of n bytes


def pack(command: Command) -> bytes:
    """One command in RESP, the form Redis reads: an array of bulk strings."""
    return b"*%d" % len(command) + pack_args(command) + b"\r\n"


def pack_args(args: Sequence[bytes]) -> bytes:
    """``args`` packed as a run of a command's arguments: what :func:`pack` puts between the
    array's head and its last CR LF. Runs packed apart join as they are."""
    # Heads from a table, interleaved by slices: most of a commit's packing time otherwise.
    try:
        heads = [_HEADS[len(arg)] for arg in args]
    except IndexError:
        heads = [b"\r\n$%d\r\n" % len(arg) for arg in args]
    parts: list[bytes] = heads * 2
    parts[::2] = heads
    parts[1::2] = args
    return b"".join(parts)


def _packed(commands: Sequence[Command | Packed]) -> bytes:
    return b"".join([c.data if isinstance(c, Packed) else pack(c) for c in commands])


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


def pairs(reply: Any) -> dict[Any, Any]:
    """A hash as HGETALL returns it (a flat list in RESP2, a map in RESP3) as a dict."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))


def _where(client: aioredis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    if "path" in kw:
        return f"unix:{kw['path']}"
    return f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


class Wire:
    """Round trips to one Redis through ``client``'s pool, with the store's retries.

    Args:
        client: a ``redis.asyncio.Redis`` with a connection pool and bytes replies.
        retry_for: seconds to keep retrying while Redis is unreachable.

    Raises:
        StoreError: the client cannot serve a store (one shared connection, or replies
            decoded to str).
    """

    def __init__(self, client: aioredis.Redis, retry_for: float) -> None:
        if client.single_connection_client:
            raise StoreError(
                "RedisStore needs a client with a connection pool: a single-connection client cannot "
                "serve concurrent runs"
            )
        pool = client.connection_pool
        if pool.connection_kwargs.get("decode_responses"):
            raise StoreError("RedisStore needs a client with decode_responses=False (the default)")
        self.client = client
        self.retry_for = retry_for
        self.where = _where(client)
        size = max(1, pool.max_connections)
        # Most round trips share one connection, pipelined (see redis_lane); the others
        # (WATCH ... EXEC) take theirs from the rest of the pool.
        # A pool of one connection is left to them.
        self._lane = Lane(pool) if size >= 2 else None
        # A pool that raises when full would turn a busy moment into errors: hold back
        # our own operations to its size instead.
        self._slots: contextlib.AbstractAsyncContextManager[Any] = (
            contextlib.nullcontext()
            if isinstance(pool, BlockingConnectionPool)
            else asyncio.Semaphore(size - 1 if self._lane is not None else size)
        )
        self._deferred: list[Command] = []

    # -- retries ----------------------------------------------------------------------

    async def retrying(
        self, what: str, run_id: str | None, attempt: Callable[[], Awaitable[T]], key: str | None = None
    ) -> T:
        """Run ``attempt``, retrying connection failures with backoff for ``retry_for`` s.

        A reply saying stored data has the wrong shape (a key of the wrong type, a count
        that is not a number) is reported as a damaged ``key`` of ``run_id``.

        Raises:
            StoreError: Redis stayed unreachable, or refused the command.
            CorruptRecordError: the stored data has the wrong shape.
        """
        give_up = time.monotonic() + self.retry_for
        delay = 0.01
        while True:
            try:
                return await attempt()
            except (ConnectionError, TimeoutError) as exc:
                self.lost()
                left = give_up - time.monotonic()
                if left <= 0:
                    raise self._unreachable(what, run_id, exc) from exc
                await asyncio.sleep(min(delay * (0.5 + random.random()), left))
                delay = min(delay * 2, 0.5)
            except ResponseError as exc:
                left = give_up - time.monotonic()
                if left > 0 and await self.redirected(exc):  # a cluster moving slots: try again
                    await asyncio.sleep(min(delay * random.random(), left))
                    delay = min(delay * 2, 0.5)
                    continue
                subject = f"run {run_id}: " if run_id else ""
                if run_id and key and any(m in str(exc) for m in ("WRONGTYPE", "not an integer")):
                    raise CorruptRecordError(run_id, key, str(exc)) from exc
                raise StoreError(f"{subject}Redis refused {what}: {exc}") from exc

    def lost(self) -> None:
        """Hear that a connection failed (a cluster then reads its topology again)."""

    async def redirected(self, exc: ResponseError) -> bool:
        """Whether ``exc`` only says that the key is served elsewhere for now (Redis Cluster),
        so the attempt is worth making again; the plain wire never is redirected."""
        return False

    def _unreachable(self, what: str, run_id: str | None, exc: Exception) -> StoreError:
        subject = f"run {run_id}: " if run_id else ""
        if _NO_CONNECTION in str(exc):
            return StoreError(
                f"{subject}no connection to Redis at {self.where} came free within {self.retry_for:g} s "
                f"during {what}; raise max_connections or look for what holds them"
            )
        return StoreError(
            f"{subject}Redis at {self.where} unreachable for {self.retry_for:g} s during {what} ({exc}); "
            "a write is atomic, so it was applied entirely or not at all, and sending it again is safe"
        )

    # -- round trips ------------------------------------------------------------------

    def defer(self, commands: Sequence[Command]) -> None:
        """Queue commands whose replies nobody needs, for the next round trip."""
        room = _MAX_DEFERRED - len(self._deferred)
        self._deferred.extend(commands[: max(room, 0)])

    @staticmethod
    def checked(replies: list[Any]) -> list[Any]:
        """``replies``, or the first error among them raised."""
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    @contextlib.asynccontextmanager
    async def connection(self, key: bytes = b"") -> AsyncIterator[Connection]:
        """A pooled connection of one's own (for WATCH), to the node holding ``key`` on a
        cluster; closed if anything goes wrong."""
        pool = self.client.connection_pool
        async with self._slots:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]  # untyped in redis-py 8
            try:
                yield conn
            except BaseException:
                # Replies may be left unread, or a WATCH set: never hand it on out of step.
                await conn.disconnect(nowait=True)
                raise
            finally:
                await pool.release(conn)

    async def exchange(self, conn: Connection, commands: Sequence[Command | Packed]) -> list[Any]:
        """Send ``commands`` (or commands packed already) on ``conn`` together and read their
        replies: one round trip.

        A reply that is an error comes back as the exception, in its place.
        """
        await _send(conn, _packed(commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:  # the connection stays in step: read the rest
                replies.append(exc)
        return replies

    async def transact(
        self, conn: Connection, before: Sequence[Command], commands: Sequence[Command]
    ) -> list[Any]:
        """Send index writes ``before`` and then ``commands`` (MULTI ... EXEC) on ``conn``, which
        holds a WATCH; the replies of ``commands``, the first error reply raised. On one
        server, one round trip."""
        return self.checked(await self.exchange(conn, [*before, *commands]))[len(before) :]

    async def round_trip(self, commands: Sequence[Command | Packed]) -> list[Any]:
        """``commands`` sent together, with the deferred clean-ups in front: their replies
        (an error reply as the exception, in its place), in one round trip on the lane.

        Connection failures raise, as with redis-py.
        """
        deferred, self._deferred = self._deferred, []
        if deferred:
            commands = [*deferred, *commands]
        try:
            if self._lane is not None:
                replies = await self._lane.request(_packed(commands), len(commands))
            else:
                async with self.connection() as conn:
                    replies = await self.exchange(conn, commands)
        except BaseException:
            self.defer(deferred)  # harmless to send again
            raise
        if not deferred:
            return replies
        forgotten = [c for c, r in zip(deferred, replies, strict=False) if isinstance(r, NoScriptError)]
        if forgotten:  # a clean-up script the server does not know yet: load it, send them again
            for sha in {c[1] for c in forgotten}:
                await self.round_trip([[b"SCRIPT", b"LOAD", lua.BY_SHA[sha].source.encode()]])
            self.defer(forgotten)
        return replies[len(deferred) :]

    async def call(self, commands: Sequence[Command]) -> list[Any]:
        """:meth:`round_trip`, raising the first error reply.

        Raises:
            ResponseError: one of the commands failed.
        """
        return self.checked(await self.round_trip(commands))

    async def eval(
        self, script: Script, keys: Sequence[bytes], args: Sequence[bytes], before: Sequence[Command] = ()
    ) -> list[Any]:
        """Run ``script`` by its SHA after the commands ``before`` (idempotent index writes);
        on one server in one round trip; the script is loaded on a NOSCRIPT reply.

        Returns every reply, the script's last.

        Raises:
            ResponseError: the script failed (or, on a cluster, one of ``before``: the
                script was not sent).
            IndexRefused: one of ``before`` failed, and the script ran.
        """
        command = pack([b"EVALSHA", script.sha_bytes, b"%d" % len(keys), *keys, *args])
        return await self.evalsha(script, Packed(command, keys[0] if keys else b""), before)

    async def evalsha(self, script: Script, command: Packed, before: Sequence[Command] = ()) -> list[Any]:
        """:meth:`eval` with the EVALSHA command of ``script`` packed already."""
        for _ in range(2):
            replies = await self.round_trip([*before, command])
            if isinstance(replies[-1], NoScriptError):
                # First use on this server (or after a restart / SCRIPT FLUSH). Sending
                # the index writes again is harmless.
                [loaded] = await self.round_trip([[b"SCRIPT", b"LOAD", script.source.encode()]])
                if isinstance(loaded, Exception):
                    raise loaded
                continue
            if isinstance(replies[-1], Exception):
                raise replies[-1]
            for reply in replies[:-1]:
                if isinstance(reply, Exception):
                    raise IndexRefused(reply, replies[-1])
            return replies
        raise StoreError(f"Redis at {self.where} keeps forgetting agentflow's scripts")

    async def eval_many(
        self, script: Script, calls: Sequence[tuple[Sequence[bytes], Sequence[bytes]]]
    ) -> list[Any]:
        """Run ``script`` once per ``(keys, args)`` in ``calls``, all in one round trip.

        Returns the replies in order, an error reply as the exception in its place; the
        script is loaded on a NOSCRIPT reply.
        """
        commands = [[b"EVALSHA", script.sha_bytes, b"%d" % len(keys), *keys, *args] for keys, args in calls]
        replies = await self.round_trip(commands)
        if any(isinstance(r, NoScriptError) for r in replies):
            [loaded] = await self.round_trip([[b"SCRIPT", b"LOAD", script.source.encode()]])
            if isinstance(loaded, Exception):
                raise loaded
            replies = await self.round_trip(commands)
        return replies

    async def flush(self, timeout: float = 1.0) -> None:
        """Send the deferred clean-ups now (best effort, within ``timeout``)."""
        with contextlib.suppress(ConnectionError, TimeoutError, builtins.TimeoutError, OSError):
            async with asyncio.timeout(timeout):
                for _ in range(2):  # twice: a clean-up script may have had to be loaded first
                    if not self._deferred:
                        return
                    await self.round_trip([[b"PING"]])

    async def close(self) -> None:
        """Send the deferred clean-ups, and hand the lane's connection back to the pool."""
        await self.flush()
        if self._lane is not None:
            await self._lane.close()
