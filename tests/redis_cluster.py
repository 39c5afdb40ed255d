"""The ``redis_cluster`` pytest fixtures: a real local Redis Cluster of three masters.

Three ``redis-server --cluster-enabled yes`` processes in a temp dir, joined by
``redis-cli --cluster create ... --cluster-replicas 0``, for the whole session; and
``redis_cluster_url``, the cluster flushed for one test (``redis+cluster://`` URL).

Import them in ``tests/conftest.py``: ``from redis_cluster import redis_cluster, redis_cluster_url``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_MASTERS = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _command(port: int, *args: str) -> bytes:
    """One command over a raw socket; the whole reply (enough for INFO-sized answers)."""
    wire = f"*{len(args)}\r\n".encode() + b"".join(f"${len(a)}\r\n{a}\r\n".encode() for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(wire)
        reply = sock.recv(65536)
        if reply.startswith(b"$"):  # a bulk string: read until all of it is in
            size = int(reply[1 : reply.index(b"\r\n")])
            while len(reply) < reply.index(b"\r\n") + 2 + size + 2:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
    return reply


class RedisCluster:
    """Three cluster-enabled ``redis-server`` masters on 127.0.0.1, one slot range each."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ports = [_free_port() for _ in range(_MASTERS)]
        self.bus_ports = [_free_port() for _ in range(_MASTERS)]  # Redis would add 10000 to the port
        self.url = f"redis+cluster://127.0.0.1:{self.ports[0]}"
        self._procs: list[subprocess.Popen[bytes]] = []

    def command(self, port: int, *args: str) -> bytes:
        """Send one command to the node on ``port``; return its raw reply."""
        return _command(port, *args)

    def start(self) -> None:
        """Start the nodes, join them into one cluster and wait until it serves every slot."""
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        for port, bus in zip(self.ports, self.bus_ports, strict=True):
            node = self.dir / str(port)
            node.mkdir()
            args = [
                binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node),
                "--cluster-enabled", "yes", "--cluster-port", str(bus),
                "--cluster-config-file", str(node / "nodes.conf"), "--cluster-node-timeout", "5000",
                "--appendonly", "no", "--save", "", "--daemonize", "no", "--logfile", str(node / "redis.log"),
            ]  # fmt: skip
            self._procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in self.ports:
            self._wait(lambda p=port: _command(p, "PING") == b"+PONG\r\n", f"node {port} to answer")
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        created = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if created.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}")
        for port in self.ports:
            self._wait(
                lambda p=port: b"cluster_state:ok" in _command(p, "CLUSTER", "INFO"),
                f"node {port} cluster_state:ok",
            )

    def _wait(self, ready, what: str, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    return
            except OSError:
                pass
            if any(p.poll() is not None for p in self._procs) or time.monotonic() > deadline:
                logs = "\n".join(
                    (self.dir / str(p) / "redis.log").read_text()[-1500:]
                    for p in self.ports
                    if (self.dir / str(p) / "redis.log").exists()
                )
                self.stop()
                raise RuntimeError(f"Redis Cluster: timed out waiting for {what}:\n{logs}")
            time.sleep(0.05)

    def flush(self) -> None:
        """Empty every node."""
        for port in self.ports:
            assert _command(port, "FLUSHALL") == b"+OK\r\n"

    def stop(self) -> None:
        """SIGKILL every node."""
        procs, self._procs = self._procs, []
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """One three-master Redis Cluster for the whole session (``.url``, ``.ports``, ``.command()``)."""
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisCluster) -> str:
    """The session cluster's ``redis+cluster://`` URL, flushed for this test."""
    redis_cluster.flush()
    return redis_cluster.url
