"""The PostgreSQL store's work queue and change feed (``WorkQueue``, ``ChangeFeed``).

The queue is the ``agentflow_queue`` table: an entry is a row, claimed by setting
``claimed_by``/``claimed_at`` on the oldest rows of the workflows asked for in one
``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)`` (two workers never wait
on each other nor claim one row), acknowledged by deleting it; a row claimed longer
than ``REDELIVER_AFTER`` ago is claimable again. Queueing notifies ``agentflow_queued``
in the same statement.

One connection per store object listens (``LISTEN``) on ``agentflow_queued`` and
``agentflow_changes`` (sent by a trigger on the runs table when a run changes): a
waiting claim wakes when an entry of its store's namespace is queued, and the change
feed hands on every run id of its namespace.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from ..errors import StoreError
from . import capabilities
from .capabilities import Claim, QueueDepth
from .postgres_pool import Connections
from .postgres_schema import CHANGES, NOW, QUEUE, QUEUED

__all__ = ["ACK", "CLAIM", "DEPTH", "ENQUEUE", "Listener", "QueueAndFeed", "claims_of"]

ENQUEUE = (
    f"WITH e AS (INSERT INTO {QUEUE} (ns, workflow, run_id, enqueued_at) VALUES (%s, %s, %s, {NOW}) "
    f"RETURNING ns, workflow) SELECT pg_notify('{QUEUED}', json_build_array(ns, workflow)::text) FROM e"
)
#: Parameters by name: owner, ns, workflows, after (seconds a claim holds), n. The
#: oldest unclaimed entries of each workflow are read from the index of unclaimed
#: entries, at most ``n`` per workflow, so a claim reads what it returns however many
#: entries wait; entries claimed longer than ``after`` ago come from the index by claim
#: time (any ``n`` of them). The oldest ``n`` of both are claimed.
CLAIM = (
    f"UPDATE {QUEUE} SET claimed_by = %(owner)s, claimed_at = {NOW} WHERE id = ANY(ARRAY("
    "SELECT id FROM ("
    "SELECT f.id FROM unnest(%(workflows)s::text[]) AS w(name), LATERAL ("
    f"SELECT id FROM {QUEUE} WHERE ns = %(ns)s AND workflow = w.name AND claimed_at IS NULL "
    "ORDER BY id LIMIT %(n)s FOR UPDATE SKIP LOCKED) AS f "
    "UNION ALL "
    f"SELECT id FROM (SELECT id FROM {QUEUE} WHERE ns = %(ns)s AND workflow = ANY(%(workflows)s) "
    f"AND claimed_at <= {NOW} - %(after)s LIMIT %(n)s FOR UPDATE SKIP LOCKED) AS s"
    ") AS c ORDER BY id LIMIT %(n)s)) "
    "RETURNING id, workflow, run_id, enqueued_at"
)
ACK = f"DELETE FROM {QUEUE} WHERE ns = %s AND id = ANY(%s)"
DEPTH = (
    f"SELECT count(*), {NOW} - min(enqueued_at) FROM {QUEUE} "
    "WHERE ns = %s AND workflow = %s AND claimed_at IS NULL"
)


def claims_of(rows: Sequence[Any]) -> list[Claim]:
    """Claims from the rows ``CLAIM`` returned, oldest first."""
    return sorted(
        (Claim(str(wf), str(run_id), str(i), float(at)) for i, wf, run_id, at in rows),
        key=lambda c: int(c.receipt),
    )


def redeliver_after() -> float:
    return capabilities.REDELIVER_AFTER


def depth_of(row: Any) -> QueueDepth:
    n, age = row
    return QueueDepth(int(n), None if age is None else max(0.0, float(age)))


class Listener:
    """One listening connection: wakes claims waiting on a namespace, feeds change callbacks."""

    def __init__(self, url: str, ns: str, connect_timeout: float, where: str) -> None:
        self._url = url
        self._ns = ns
        self._timeout = connect_timeout
        self._where = where
        self._queued = asyncio.Event()
        self._feeds: list[Callable[[str], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._error: BaseException | None = None

    def queued(self) -> asyncio.Event:
        """Set when an entry of this namespace is queued (cleared by the waiter)."""
        self._start()
        return self._queued

    async def ready(self) -> None:
        self._start()
        await self._ready.wait()

    async def feed(self, changed: Callable[[str], None]) -> None:
        """Hand ``changed`` every run id of this namespace written, until cancelled or cut."""
        self._start()
        self._feeds.append(changed)
        try:
            while True:
                task = self._task
                assert task is not None
                await asyncio.shield(task)  # returns only when the connection was cut
                raise StoreError(f"the PostgreSQL change feed on {self._where} was cut: {self._error}")
        finally:
            self._feeds.remove(changed)

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._ready.clear()
            self._task = asyncio.get_running_loop().create_task(self._listen(), name="agentflow:pg-listen")

    async def _listen(self) -> None:
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._url, autocommit=True, connect_timeout=max(1, int(self._timeout))
            )
        except (psycopg.Error, OSError) as exc:
            self._error = exc
            self._ready.set()
            self._queued.set()  # waiters look at the table again (and poll)
            return
        try:
            await conn.execute(f"LISTEN {QUEUED}")
            await conn.execute(f"LISTEN {CHANGES}")
            self._ready.set()
            async for note in conn.notifies():
                try:
                    ns, name = json.loads(note.payload)
                except (ValueError, TypeError):
                    continue
                if ns != self._ns:
                    continue
                if note.channel == QUEUED:
                    self._queued.set()
                else:
                    for fn in list(self._feeds):
                        fn(str(name))
        except (psycopg.Error, OSError) as exc:
            self._error = exc
        finally:
            self._ready.set()
            self._queued.set()
            try:
                await conn.close()
            except (psycopg.Error, OSError):
                pass

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


Conn = psycopg.AsyncConnection[Any]


class QueueAndFeed:
    """The ``WorkQueue`` and ``ChangeFeed`` methods of :class:`PostgresStore`."""

    url: str
    key_prefix: str
    connect_timeout: float
    _db: Connections
    _listener: Listener | None

    async def _close_listener(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None

    def _listening(self) -> Listener:
        if self._listener is None:
            self._listener = Listener(self.url, self.key_prefix, self.connect_timeout, self._db.where)
        return self._listener

    async def enqueue(self, workflow: str, run_id: str) -> None:
        """Hand ``run_id`` to the workers of ``workflow`` (a row, and a notification)."""

        async def job(conn: Conn) -> None:
            await conn.execute(ENQUEUE, (self.key_prefix, workflow, run_id))

        await self._db.run("enqueue", run_id, job)

    async def claim(self, workflows: Sequence[str], consumer: str, limit: int, wait: float) -> list[Claim]:
        """Up to ``limit`` entries (``FOR UPDATE SKIP LOCKED``), woken by ``LISTEN`` while none wait."""
        if limit <= 0 or not workflows:
            return []
        names = list(workflows)

        async def job(conn: Conn) -> list[Claim]:
            args = {
                "owner": consumer,
                "ns": self.key_prefix,
                "workflows": names,
                "after": redeliver_after(),
                "n": limit,
            }
            return claims_of(await (await conn.execute(CLAIM, args)).fetchall())

        async def attempt() -> list[Claim]:
            return await self._db.run("claim", None, job)

        queued = None
        if wait > 0:
            listener = self._listening()
            queued = listener.queued()
            await listener.ready()
        # A notification wakes the wait; half a second bounds a lost one.
        return await capabilities.claim_waiting(attempt, queued, wait, 0.5)

    async def ack(self, claims: Sequence[Claim]) -> None:
        """Delete the acknowledged entries."""
        if not claims:
            return
        ids = [int(c.receipt) for c in claims]

        async def job(conn: Conn) -> None:
            await conn.execute(ACK, (self.key_prefix, ids))

        await self._db.run("ack", None, job)

    async def queue_depth(self, workflow: str) -> QueueDepth:
        """Entries of ``workflow`` not claimed yet, and the oldest one's age."""

        async def job(conn: Conn) -> QueueDepth:
            return depth_of(await (await conn.execute(DEPTH, (self.key_prefix, workflow))).fetchone())

        return await self._db.run("queue_depth", None, job)

    async def changes(self, changed: Callable[[str], None]) -> None:
        """Call ``changed(run_id)`` for every run of this namespace written by anyone (``LISTEN``)."""
        await self._listening().feed(changed)
