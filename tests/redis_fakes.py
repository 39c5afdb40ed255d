"""Redis test fakes: a connection that counts its writes, a proxy that loses or holds back
replies, a server that keeps nothing on disk, and a change that asks for a pause."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from conftest import free_port

from agentflow.stores import Change
from agentflow.stores.contract import RunRecord
from agentflow.testing.store_conformance import event

__all__ = ["CountingConnection", "LossyProxy", "bare_redis_server", "db_of", "pause"]


def pause(rec: RunRecord, now: float) -> Change:
    """An update asking the run to pause (with its event)."""
    return Change(dataclasses.replace(rec, control="pause"), [event("pause_requested", rec.event_count + 1)])


class CountingWriter:
    """A connection's stream writer that counts its writes."""

    def __init__(self, writer: Any) -> None:
        self._writer = writer

    def write(self, data: bytes) -> None:
        CountingConnection.sends += 1
        self._writer.write(data)

    def writelines(self, data: Any) -> None:
        CountingConnection.sends += 1
        self._writer.writelines(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


class CountingConnection(aioredis.Connection):
    """Counts writes to the socket: one per command, or one per pipeline."""

    sends = 0

    async def _connect(self) -> None:
        await super()._connect()  # type: ignore[no-untyped-call]
        self._writer = CountingWriter(self._writer)  # type: ignore[assignment]


class LossyProxy:
    """A TCP proxy to Redis that can lose the reply to a request, as a dropped connection does,
    or hold replies back (``delay``).

    ``lose(when, between)``: the next request containing ``when`` reaches Redis and runs;
    its reply is not passed on. ``between()`` runs first (another writer, say), then the
    client's connection is cut, and the client sees a reply that never came.
    """

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self.lost = 0
        self.delay = 0.0  # seconds each piece of a reply is held back
        self._rule: tuple[bytes, Callable[[], Awaitable[None]]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> LossyProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def url(self, db: str) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def lose(self, when: bytes, between: Callable[[], Awaitable[None]]) -> None:
        self._rule = (when, between)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        doomed: list[Callable[[], Awaitable[None]]] = []

        async def up() -> None:
            while data := await reader.read(65536):
                if self._rule is not None and self._rule[0] in data:
                    doomed.append(self._rule[1])
                    self._rule = None
                up_writer.write(data)
                await up_writer.drain()

        async def down() -> None:
            while data := await up_reader.read(65536):
                if doomed:
                    await doomed[0]()
                    self.lost += 1
                    return
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()

        try:
            pumps = [asyncio.create_task(up()), asyncio.create_task(down())]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            writer.transport.abort()
            up_writer.transport.abort()
            self._tasks.discard(task)


def db_of(redis_url: str) -> str:
    """The database number of a ``redis://host:port/db`` URL."""
    return redis_url.rsplit("/", 1)[1]


@contextlib.contextmanager
def bare_redis_server(folder: Path) -> Iterator[int]:
    """A redis-server (its port) that keeps nothing on disk: for filling with many runs quickly."""
    port = free_port()
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)
        yield port
    finally:
        proc.kill()
        proc.wait()
