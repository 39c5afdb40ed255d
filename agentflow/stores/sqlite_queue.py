"""The SQLite store's work queue: the ``agentflow_queue`` table (see ``WorkQueue``).

An entry is a row; claiming sets ``claimed_by`` and ``claimed_at`` on the oldest rows
of the workflows asked for (in one ``BEGIN IMMEDIATE`` transaction, so two processes
never claim one row), acknowledging deletes them, and a row claimed longer than
``REDELIVER_AFTER`` ago is claimable again. A waiting worker polls every
:data:`POLL_INTERVAL` seconds; an entry queued through the same store object wakes it
at once.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence

from . import capabilities
from .capabilities import Claim, QueueDepth, claim_waiting
from .sqlite_calls import TwoConnections
from .sqlite_rows import transaction
from .sqlite_schema import QUEUE

__all__ = ["POLL_INTERVAL", "SqliteQueue", "ack", "claim", "depth", "enqueue", "insert"]

#: Seconds between two looks at the queue while a worker waits for work.
POLL_INTERVAL = 0.02


def insert(db: sqlite3.Connection, ns: str, workflow: str, run_id: str) -> None:
    """The queue entry, in the transaction open on ``db``."""
    db.execute(
        f"INSERT INTO {QUEUE} (ns, workflow, run_id, enqueued_at) VALUES (?, ?, ?, ?)",
        (ns, workflow, run_id, time.time()),
    )


def enqueue(db: sqlite3.Connection, ns: str, workflow: str, run_id: str) -> None:
    with transaction(db):
        insert(db, ns, workflow, run_id)


def claim(
    db: sqlite3.Connection, ns: str, workflows: Sequence[str], consumer: str, limit: int
) -> list[Claim]:
    if limit <= 0 or not workflows:
        return []
    now = time.time()
    marks = ", ".join("?" for _ in workflows)
    with transaction(db):
        rows = db.execute(
            f"SELECT id, workflow, run_id, enqueued_at FROM {QUEUE} WHERE ns = ? AND workflow IN ({marks}) "
            "AND (claimed_at IS NULL OR claimed_at <= ?) ORDER BY id LIMIT ?",
            (ns, *workflows, now - capabilities.REDELIVER_AFTER, limit),
        ).fetchall()
        db.executemany(
            f"UPDATE {QUEUE} SET claimed_by = ?, claimed_at = ? WHERE id = ?",
            [(consumer, now, row[0]) for row in rows],
        )
    return [Claim(wf, run_id, str(i), at) for i, wf, run_id, at in rows]


def ack(db: sqlite3.Connection, ns: str, claims: Sequence[Claim]) -> None:
    with transaction(db):
        db.executemany(f"DELETE FROM {QUEUE} WHERE ns = ? AND id = ?", [(ns, int(c.receipt)) for c in claims])


def depth(db: sqlite3.Connection, ns: str, workflow: str) -> QueueDepth:
    n, oldest = db.execute(
        f"SELECT count(*), min(enqueued_at) FROM {QUEUE} "
        "WHERE ns = ? AND workflow = ? AND claimed_at IS NULL",
        (ns, workflow),
    ).fetchone()
    return QueueDepth(int(n), None if oldest is None else max(0.0, time.time() - oldest))


class SqliteQueue(TwoConnections):
    """The ``WorkQueue`` methods of :class:`~agentflow.stores.sqlite.SqliteStore`."""

    key_prefix: str
    _writes_inline: bool
    _queued: asyncio.Event  # set when an entry was queued through this store object

    async def enqueue(self, workflow: str, run_id: str) -> None:
        """Hand ``run_id`` to the workers of ``workflow`` (a row of ``agentflow_queue``)."""
        await self._call(
            "enqueue",
            run_id,
            lambda db: enqueue(db, self.key_prefix, workflow, run_id),
            self._writes_inline,
            write=True,
        )
        self._queued.set()

    async def claim(self, workflows: Sequence[str], consumer: str, limit: int, wait: float) -> list[Claim]:
        """Up to ``limit`` entries for ``consumer``, polling every ``POLL_INTERVAL`` s up to ``wait``."""

        async def attempt() -> list[Claim]:
            return await self._call(
                "claim",
                None,
                lambda db: claim(db, self.key_prefix, workflows, consumer, limit),
                write=True,
            )

        return await claim_waiting(attempt, self._queued, wait, POLL_INTERVAL)

    async def ack(self, claims: Sequence[Claim]) -> None:
        """Delete acknowledged entries."""
        if claims:
            await self._call("ack", None, lambda db: ack(db, self.key_prefix, claims), write=True)

    async def queue_depth(self, workflow: str) -> QueueDepth:
        """Entries of ``workflow`` not claimed yet, and the oldest one's age."""
        return await self._call("queue_depth", None, lambda db: depth(db, self.key_prefix, workflow))
