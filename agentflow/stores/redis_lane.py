"""The Redis store's lane: one pooled connection that many operations share, pipelined.

A commit is one round trip; what it costs the client is mostly what it takes to get a
connection, send, wait and read the reply, not the commit itself. The lane pays each of
those once for many operations:

* It holds one connection of the pool for as long as it works (so it counts against
  ``max_connections``), takes over its socket and writes requests as they come, without
  waiting for the replies of those before: Redis answers in order, so the replies are
  matched to the requests first in, first out.
* Requests made while others are in flight are written together, once per turn of the
  event loop (or whenever 64 KB wait): with many runs in flight, one write and one read
  carry many commits, and a round trip carries more than one step.
* Replies are parsed from the bytes as they arrive (RESP2 and RESP3, by hiredis's C
  reader), in the callback that receives them: no task, no timeout context, no
  per-reply read.

A request whose caller was cancelled stays in line: its reply is read and dropped, so
the connection never gets out of step. A reply that does not come within the
connection's ``socket_timeout`` (counted from the last bytes received), a closed
connection or a reply that cannot be parsed fails every request in flight with
redis-py's ``TimeoutError`` / ``ConnectionError`` (the store's retries take it from
there; its writes are safe to send again) and the next request opens the lane again.

Operations that need a connection of their own (WATCH ... EXEC) use the rest of the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import hiredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError, TimeoutError

from ..errors import StoreError

try:  # the class redis-py builds its error replies with
    from redis._parsers.base import BaseParser

    _parse_error: Any = BaseParser.parse_error
except ImportError:  # pragma: no cover - another layout of redis-py
    from redis.exceptions import ResponseError

    _parse_error = ResponseError

__all__ = ["Lane", "Parser"]

#: Bytes of requests that wait for the end of the loop's turn at most: past them they are
#: written at once (a turn in which thousands of runs start would otherwise hold every
#: request back until the last is made).
_WRITE_AT = 64 * 1024


class Parser:
    """Reads RESP2/RESP3 replies from bytes fed in pieces, however they are cut (hiredis).

    Values as redis-py gives them with ``decode_responses=False``: bulk and simple
    strings as bytes, integers, None, lists (RESP3 sets too), dicts for RESP3 maps, an
    error reply as the exception in its place (redis-py's class for it). Pushes are
    dropped: they answer no request.
    """

    __slots__ = ("_reader",)

    def __init__(self) -> None:
        self._reader = hiredis.Reader(replyError=_parse_error)

    def feed(self, data: bytes) -> list[Any]:
        """Take ``data``; return the replies completed by it, in order.

        Raises:
            ConnectionError: the bytes are not RESP (the connection is out of step).
        """
        reader = self._reader
        reader.feed(data)
        out: list[Any] = []
        try:
            while (reply := reader.gets()) is not False:
                if type(reply) is not hiredis.PushNotification:
                    out.append(reply)
        except hiredis.ProtocolError as exc:
            raise ConnectionError(f"Protocol error: cannot read a reply from Redis ({exc})") from None
        return out


class _Request:
    __slots__ = ("count", "future", "replies")

    def __init__(self, future: asyncio.Future[list[Any]], count: int) -> None:
        self.future = future
        self.count = count
        self.replies: list[Any] = []


class _Link(asyncio.Protocol):
    """One taken-over connection: requests in flight on it, and its reply parser."""

    def __init__(self, lane: Lane, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.lane = lane
        self.conn = conn
        self.loop = loop
        self.timeout: float | None = conn.socket_timeout
        writer = conn._writer
        assert writer is not None
        self.transport: asyncio.WriteTransport | None = writer.transport
        # The stream's own protocol still hears that the connection closed, so that
        # redis-py can close the connection its own way afterwards.
        self.stream = writer.transport.get_protocol()
        self.write = writer.write  # the connection's own writer, which may count or wrap writes
        self.waiting: deque[_Request] = deque()
        self.out: list[bytes] = []
        self.out_bytes = 0  # in ``out``
        self.flushing: asyncio.Handle | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.progress = 0.0  # when the link last heard from Redis, or started waiting
        self.parser = Parser()

    def send(self, data: bytes, count: int) -> asyncio.Future[list[Any]]:
        future: asyncio.Future[list[Any]] = self.loop.create_future()
        waiting = self.waiting
        idle = not waiting
        waiting.append(_Request(future, count))
        if idle:
            self.progress = self.loop.time()
            if self.timer is None and self.timeout:
                self.timer = self.loop.call_at(self.progress + self.timeout, self._check)
        if idle and not self.out:
            self.write(data)
        else:  # others in flight: go with what else is sent in this turn of the loop
            self.out.append(data)
            self.out_bytes += len(data)
            if self.out_bytes >= _WRITE_AT:  # a long turn (many runs starting): send what waits now
                self._write_out()
            elif self.flushing is None:
                self.flushing = self.loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self.flushing = None
        self._write_out()

    def _write_out(self) -> None:
        if self.out and self.transport is not None:
            data = b"".join(self.out)
            self.out = []
            self.out_bytes = 0
            self.write(data)

    def _check(self) -> None:
        self.timer = None
        if not self.waiting or self.transport is None or self.timeout is None:
            return
        due = self.progress + self.timeout
        if self.loop.time() >= due:
            self.fail(TimeoutError("Timeout reading from Redis"))
        else:
            self.timer = self.loop.call_at(due, self._check)

    # -- asyncio.Protocol ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.progress = self.loop.time()
        try:
            replies = self.parser.feed(data)
        except ConnectionError as exc:
            self.fail(exc)
            return
        waiting = self.waiting
        for value in replies:
            if not waiting:
                self.fail(ConnectionError("Protocol error: a reply from Redis that nothing asked for"))
                return
            request = waiting[0]
            request.replies.append(value)
            if len(request.replies) == request.count:
                waiting.popleft()
                if not request.future.done():
                    request.future.set_result(request.replies)

    def eof_received(self) -> bool | None:
        self.fail(ConnectionError("Connection closed by server."))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError(f"Error while reading from Redis: {exc}" if exc else "Connection closed."))
        self.stream.connection_lost(exc)

    def pause_writing(self) -> None:  # the transport buffers; the timeout bounds a stuck server
        pass

    def resume_writing(self) -> None:
        pass

    def fail(self, exc: Exception) -> None:
        """Close the link; every request in flight gets ``exc``."""
        transport, self.transport = self.transport, None
        if transport is None:
            return
        with contextlib.suppress(RuntimeError):  # its event loop may be closed already
            transport.abort()
        for handle in (self.flushing, self.timer):
            if handle is not None:
                handle.cancel()
        self.flushing = self.timer = None
        self.out = []
        self.out_bytes = 0
        waiting, self.waiting = self.waiting, deque()
        for request in waiting:
            if not request.future.done():
                request.future.set_exception(exc)
        self.lane._lost(self)


class Lane:
    """Requests pipelined on one connection of ``pool`` (see the module doc).

    Args:
        pool: the client's connection pool; the lane holds one of its connections.
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._link: _Link | None = None
        self._spent: list[Connection] = []  # connections to hand back to the pool
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def request(self, data: bytes, count: int) -> list[Any]:
        """Send ``data`` (``count`` packed commands) and return their replies, in order.

        An error reply comes back as the exception, in its place.

        Raises:
            ConnectionError: the connection was lost (or could not be opened).
            TimeoutError: no reply came within the connection's socket timeout.
            StoreError: the lane was closed (its store is).
        """
        link = self._link
        if self._closed:
            raise StoreError("the Redis store is closed")
        if link is None or link.transport is None or link.loop is not asyncio.get_running_loop():
            link = await self._open()
        return await link.send(data, count)

    async def _open(self) -> _Link:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._lock is None:
            if self._link is not None:
                self._link.fail(ConnectionError("The event loop changed"))
            self._loop, self._lock = loop, asyncio.Lock()
        async with self._lock:
            link = self._link
            if link is not None and link.transport is not None:
                return link
            if self._closed:
                raise StoreError("the Redis store is closed")
            await self._hand_back()
            conn: Connection = await self._pool.get_connection()
            try:
                reader, writer = conn._reader, conn._writer
                if reader is None or writer is None or getattr(reader, "_buffer", None):
                    raise ConnectionError("Connection not ready")
                link = _Link(self, conn, loop)
                writer.transport.set_protocol(link)
            except BaseException:
                await conn.disconnect(nowait=True)
                await self._pool.release(conn)
                raise
            self._link = link
            return link

    def _lost(self, link: _Link) -> None:
        if self._link is link:
            self._link = None
        self._spent.append(link.conn)

    async def _hand_back(self) -> None:
        spent, self._spent = self._spent, []
        for conn in spent:
            try:
                await conn.disconnect(nowait=True)
            finally:
                await self._pool.release(conn)

    async def close(self) -> None:
        """Fail what is in flight, and hand the connection back to the pool."""
        self._closed = True
        if self._link is not None:
            self._link.fail(ConnectionError("The store is closed"))
        await self._hand_back()
