"""The SQLite store's work queue: the ``agentflow_queue`` table (see ``WorkQueue``).

An entry is a row; claiming sets ``claimed_by`` and ``claimed_at`` on the oldest rows
of the workflows asked for (in one ``BEGIN IMMEDIATE`` transaction, so two processes
never claim one row), acknowledging deletes them, and a row claimed longer than
``REDELIVER_AFTER`` ago is claimable again. A waiting worker polls every
:data:`POLL_INTERVAL` seconds; an entry queued through the same store object wakes it
at once.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

from . import capabilities
from .capabilities import Claim, QueueDepth
from .sqlite_rows import transaction
from .sqlite_schema import QUEUE

__all__ = ["POLL_INTERVAL", "ack", "claim", "depth", "enqueue", "insert"]

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
