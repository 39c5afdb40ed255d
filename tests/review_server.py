"""``agentflow serve reviewflows`` as a real subprocess, for the review page's browser tests.

The ``review_server`` fixture (module scope, once per store kind: SQLite in a temp dir, Redis on the
session's ``redis-server``) starts the server on a free loopback port, waits until it
answers, makes the reviewers with ``agentflow reviewers add`` (their one-time tokens are
in ``.tokens``) and stops it after the module. ``.store()`` opens the same store in the
test process, where the tests start the runs the reviewers decide.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RedisServer, free_port
from helpers import end_process

from agentflow.stores import SqliteStore, Store

__all__ = ["REVIEWERS", "ReviewServer", "review_server_fixture"]

HERE = Path(__file__).parent
MODULE = "reviewflows"

#: Who the tests sign in as: the approvers of ``reviewflows`` and one who approves nothing.
REVIEWERS = ("editor", "ops-lead", "intruder")

#: What ``agentflow reviewers add`` prints last: the token, alone on its line.
_TOKEN = re.compile(r"af_[A-Za-z0-9_\-]+")


class ReviewServer:
    """One ``agentflow serve`` process on 127.0.0.1 over a store given by the environment.

    Args:
        kind: ``"sqlite"`` or ``"redis"``.
        where: the SQLite file or the Redis URL (``REVIEW_STORE_URL`` for ``reviewflows``).
        directory: where the server's log goes.
    """

    def __init__(self, kind: str, where: str, directory: Path) -> None:
        self.kind = kind
        self.where = where
        self.dir = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = directory / "serve.log"
        self.tokens: dict[str, str] = {}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment of every ``agentflow`` command run against this server's store."""
        return {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
            "REVIEW_STORE": self.kind,
            "REVIEW_STORE_URL": self.where,
        }

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``agentflow ARGS`` against the store; the finished process."""
        return subprocess.run(
            [sys.executable, "-m", "agentflow.cli", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
        )

    def add_reviewers(self, *names: str) -> None:
        """``agentflow reviewers add reviewflows NAME`` for each name (at once); keep each token printed."""
        procs = {
            name: subprocess.Popen(
                [sys.executable, "-m", "agentflow.cli", "reviewers", "add", MODULE, name],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=self.env,
            )
            for name in names
        }
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=60)
            lines = out.strip().splitlines()
            if proc.returncode != 0 or not lines or not _TOKEN.fullmatch(lines[-1].strip()):
                raise RuntimeError(f"`agentflow reviewers add {MODULE} {name}` gave no token:\n{out}{err}")
            self.tokens[name] = lines[-1].strip()

    def start(self) -> None:
        """Start ``agentflow serve`` and wait until it answers ``GET /signin``."""
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "agentflow.cli", "serve", MODULE,
                 "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=self.env,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/signin", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"agentflow serve did not answer on {self.url}:\n{self.output()[-4000:]}")
            time.sleep(0.05)

    def output(self, since: int = 0) -> str:
        """What the server logged (from byte ``since`` on)."""
        if not self.log.exists():
            return ""
        with self.log.open("rb") as log:
            log.seek(since)
            return log.read().decode(errors="replace")

    def output_size(self) -> int:
        """How much the server logged so far (for ``output(since=...)``)."""
        return self.log.stat().st_size if self.log.exists() else 0

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), SIGKILL if it has not exited within 10 s."""
        proc, self._proc = self._proc, None
        if proc is not None:
            end_process(proc)

    def store(self) -> Store:
        """A new store client on the server's store (close it after use)."""
        if self.kind == "redis":
            from agentflow.stores.redis import RedisStore

            return RedisStore(url=self.where)
        return SqliteStore(path=self.where)


#: The Redis database the review server uses (the ``redis_url`` fixture hands out 1-15),
#: flushed before and after.
_REDIS_DB = 0


@pytest.fixture(scope="module", params=["sqlite", "redis"], name="review_server")
def review_server_fixture(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ReviewServer]:
    """``agentflow serve reviewflows`` over a fresh SQLite file, then a fresh Redis database."""
    directory = tmp_path_factory.mktemp(f"review-{request.param}")
    redis: RedisServer | None = None
    if request.param == "redis":
        redis = request.getfixturevalue("redis_server")
        assert redis.command("FLUSHDB", db=_REDIS_DB) == b"+OK"
        server = ReviewServer("redis", f"{redis.url}/{_REDIS_DB}", directory)
    else:
        server = ReviewServer("sqlite", str(directory / "review.db"), directory)
    server.add_reviewers(*REVIEWERS)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        if redis is not None:
            redis.command("FLUSHDB", db=_REDIS_DB)
