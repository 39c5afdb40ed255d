"""A real PostgreSQL server for the tests: ``initdb`` and ``pg_ctl`` in a temp dir, on a free port.

Debian's ``postgresql`` package (``make postgresql`` installs it) puts the binaries in
``/usr/lib/postgresql/<version>/bin``. ``initdb`` refuses to run as root, so when the
tests run as root (CI) the server runs as the ``postgres`` system user the package
creates, in a directory that user owns. Each test gets a schema of its own in the one
database (``postgres_url``): stores made in one test share it, tests never see each other.
Two helpers read the plans of the store's statements: :func:`numbered` and :func:`rows_scanned`.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

__all__ = ["PostgresServer", "numbered", "postgres_server", "postgres_url", "rows_scanned"]


def numbered(sql: str, names: tuple[str, ...]) -> str:
    """A statement of the store with named parameters (``%(name)s``) as ``$1``, ``$2``... in
    the order of ``names``, for ``PREPARE`` (then ``EXECUTE`` runs its generic plan)."""
    for i, name in enumerate(names, 1):
        sql = sql.replace(f"%({name})s", f"${i}")
    return sql


def rows_scanned(plan: dict[str, Any], table: str) -> int:
    """Rows the scans of ``table`` read in ``plan`` (``EXPLAIN (ANALYZE, FORMAT JSON)``'s
    ``Plan``): those they returned, over all their loops, and those their filter removed."""
    nodes, read = [plan], 0
    while nodes:
        node = nodes.pop()
        if "Scan" in node["Node Type"] and node.get("Relation Name") == table:
            read += node["Actual Rows"] * node.get("Actual Loops", 1) + node.get("Rows Removed by Filter", 0)
        nodes += node.get("Plans", [])
    return read


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bindir() -> Path:
    """Where ``initdb`` and ``pg_ctl`` are: the newest Debian version dir, else the PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is None:
        raise RuntimeError("PostgreSQL is not installed (pg_ctl not found): run `make postgresql`")
    return Path(pg_ctl).parent


class PostgresServer:
    """A PostgreSQL server on 127.0.0.1 with its data, socket and log in ``dir``."""

    def __init__(self) -> None:
        self.bin = _bindir()
        self.user: str | None = "postgres" if os.geteuid() == 0 else None
        # Under /tmp when root: the postgres user must reach it (pytest's own temp dirs are 0700 root).
        self.dir = Path(tempfile.mkdtemp(prefix="agentflow-pg-", dir="/tmp" if self.user else None))
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._admin: psycopg.Connection[Any] | None = None

    def _run(self, *args: str) -> None:
        as_user: dict[str, Any] = {}
        if self.user is not None:
            as_user = {"user": self.user, "group": self.user, "extra_groups": []}
        done = subprocess.run(
            [str(self.bin / args[0]), *args[1:]], capture_output=True, text=True, cwd=self.dir, **as_user
        )
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout}{done.stderr}\n{log[-2000:]}")

    def init(self) -> None:
        """Make the data directory (no fsync of the new files: a test server's are throwaway)."""
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=300"
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "-o", options, "start"
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (clean, clients are disconnected) or ``immediate`` (a crash)."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast") -> None:
        """Stop, then start again on the same port and data directory."""
        self.stop(mode)
        self.start()

    def execute(self, sql: str, params: Any = None) -> None:
        """Run one statement on the server (autocommit)."""
        if self._admin is None or self._admin.closed:
            self._admin = psycopg.connect(self.url, autocommit=True)
        self._admin.execute(sql, params)

    def remove(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session (``.url``, ``.port``, ``.restart()``)."""
    server = PostgresServer()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.remove()


_schemas = itertools.count(1)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """URL of the session server with a schema of this test's own first on the ``search_path``."""
    schema = f"t_{os.getpid()}_{next(_schemas)}"
    postgres_server.execute(f"CREATE SCHEMA {schema}")
    return f"{postgres_server.url}?options=-csearch_path%3D{schema}"
