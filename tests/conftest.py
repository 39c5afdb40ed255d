"""Shared fixtures: a real ``redis-server`` on loopback, and a fresh store of every kind.

No fakes and no skips: ``redis-server`` and PostgreSQL must be installed (``make
redis-server postgresql``), and a missing one fails their tests loudly. The PostgreSQL
server's fixtures live in ``postgres_server.py``.
"""

from __future__ import annotations

import itertools
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import end_process
from llm_fixtures import llm_env, llm_server  # noqa: F401  (the local LLM API server fixtures)
from postgres_server import postgres_server, postgres_url  # noqa: F401  (a real PostgreSQL server)
from redis_cluster import redis_cluster, redis_cluster_url  # noqa: F401  (a local 3-master cluster)

from agentflow.stores import MemoryStore, SqliteStore, Store

STORE_KINDS = ("memory", "sqlite", "redis", "redis_cluster", "postgres")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A ``redis-server`` process on 127.0.0.1 with AOF (``appendfsync always``) in ``dir``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self, *args: str, db: int = 0) -> bytes:
        """Send one command over a raw socket (after SELECT db); return the reply's first line."""
        wire = b""
        for cmd in (("SELECT", str(db)), args):
            wire += f"*{len(cmd)}\r\n".encode() + b"".join(f"${len(a)}\r\n{a}\r\n".encode() for a in cmd)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(wire)
            reply = b""
            while reply.count(b"\r\n") < 2:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return reply.split(b"\r\n")[1]

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self._proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
             "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.command("PING") == b"+PONG":
                    return
            except OSError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "redis.log").read_text() if (self.dir / "redis.log").exists() else ""
                self.stop(kill=True)
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log[-2000:]}")
            time.sleep(0.02)

    def stop(self, kill: bool = False) -> None:
        """Stop the server: SIGTERM (a clean shutdown) or, with ``kill``, SIGKILL (a crash)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            end_process(proc, kill)

    def restart(self, kill: bool = False) -> None:
        """Stop, then start again on the same port and dir, so the AOF is reloaded."""
        self.stop(kill=kill)
        self.start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One ``redis-server`` for the whole session (``.url``, ``.port``, ``.dir``, ``.restart()``)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop(kill=True)


_databases = itertools.cycle(range(1, 16))


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of a logical database of the session server, flushed for this test."""
    db = next(_databases)
    assert redis_server.command("FLUSHDB", db=db) == b"+OK"
    return f"{redis_server.url}/{db}"


StoreFactory = Callable[..., Store]


@pytest.fixture
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """``make_store(kind, **options)``: a fresh store of ``kind``; all are closed after the test.

    Stores of one kind made in one test share their data (same SQLite file, same Redis
    database), like two processes would.
    """
    made: list[Store] = []

    def make(kind: str, **options: Any) -> Store:
        store: Store
        if kind == "memory":
            store = MemoryStore(**options)
        elif kind == "sqlite":
            store = SqliteStore(**{"path": str(tmp_path / "agentflow.db"), **options})
        elif kind == "redis":
            from agentflow.stores.redis import RedisStore

            store = RedisStore(**{"url": request.getfixturevalue("redis_url"), **options})
        elif kind == "redis_cluster":
            from agentflow.stores.redis import RedisStore

            store = RedisStore(**{"url": request.getfixturevalue("redis_cluster_url"), **options})
        elif kind == "postgres":
            from agentflow.stores.postgres import PostgresStore

            store = PostgresStore(**{"url": request.getfixturevalue("postgres_url"), **options})
        else:
            raise ValueError(f"unknown store kind {kind!r}")
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, make_store: StoreFactory) -> Store:
    """A fresh store of each kind in turn."""
    return make_store(request.param)
