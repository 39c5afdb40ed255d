"""SQLite store: one file, durable, shared safely by the processes of one machine.

Layout: see :mod:`agentflow.stores.sqlite_schema` (tables), :mod:`agentflow.stores.sqlite_rows`
(statements, rows) and :mod:`agentflow.stores.sqlite_index` (listings, approvals, read
through :mod:`agentflow.stores.sqlite_listing`). A
run's small fields live in one hot row, with input, state and output when their JSON is
short; longer ones live in a table of their own and are written only when a commit or
update changes them, so a step costs a few pages however big the state is.
``key_prefix`` is a *column namespace*: every row carries it in ``ns`` and every query
filters on it, so several prefixes share one file without building table names from
user text.

Where calls run (on the event loop's thread, or on the store's own): see
:mod:`agentflow.stores.sqlite_calls`.

One operation is one transaction: a commit's fence check and hot-row write (one
``UPDATE ... RETURNING``) with its appended rows, an update's read, ``change`` and
write, a load's three reads, a worker's take of a run handed over (its lease, then
those reads: :mod:`agentflow.stores.sqlite_take`).

Concurrency. WAL mode, so readers never block the writer. Every read-modify-write
starts with ``BEGIN IMMEDIATE``: it takes the write lock before reading, so two
processes cannot both read the old value, and ``busy_timeout`` makes a contended
writer wait rather than fail. Leases are judged by this machine's clock, which every
process sharing the file shares.

Durability. ``durability="full"`` (the default) is ``synchronous=FULL``: a commit is
flushed to the disk before it returns, so a committed step survives a power loss as
well as a crash. ``"normal"`` is ``synchronous=NORMAL``: the WAL is flushed at
checkpoints only, so a crash of the process loses nothing but a power loss may roll
back the last commits (the file is never corrupted). A lost step is executed again,
and steps call paid, slow, side-effecting models and tools, so a store sold as durable
defaults to ``"full"``. Its price is one flush per commit, and the hop to the thread
that keeps the flush off the loop: on a virtio SSD a commit's median is about 0.04 ms
at ``"normal"`` and 0.25 ms at ``"full"`` (a flush took 0.1-0.15 ms, the hop there and
back 0.045 ms), far below any model call; with the disk busy with other writers a flush
took 5 ms, which the loop never waits for. ``"normal"`` is there for throughput when a
power loss may cost the last steps. Lease renewals are never flushed: after a power
loss their owners are gone anyway.

Expiry. Runs that finish with a ``ttl`` get ``expires_at``; expired rows read as absent
everywhere at once, and a ``create`` now and then purges them in bounded batches
(reads never write).
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..errors import CorruptRecordError, LeaseLostError, StoreError, WorkflowDefinitionError
from ..types import RunEvent, RunStatus
from . import sqlite_index as sqlindex
from . import sqlite_queue as sqlqueue
from . import sqlite_rows as sqlrows
from . import sqlite_schema as sql
from .codec import (
    check_commit_fields,
    check_record,
    column_value,
    deadline_of,
    decode,
    encode,
    encode_event,
    encode_output,
    make_event,
    make_output,
)
from .contract import Change, Commit, Lease, LoadedRun, RunRecord
from .sqlite_calls import Durability, _close, _forks, _Job, _Pending
from .sqlite_credentials import SqliteCredentials
from .sqlite_limits import SqliteLimits
from .sqlite_listing import SqliteListing
from .sqlite_queue import SqliteQueue
from .sqlite_take import SqliteTake

__all__ = ["Durability", "SqliteStore"]

T = TypeVar("T")
#: Most expired runs one purge deletes, so a backlog never makes one ``create`` slow.
PURGE_BATCH = 200
_STATUS_AT = sqlrows.HOT.index("status")


class SqliteStore(SqliteCredentials, SqliteTake, SqliteQueue, SqliteLimits, SqliteListing):
    """Keeps runs in one SQLite file (WAL mode); safe for several processes on one machine.

    The file is opened on first use, by the store's own thread. See the module
    docstring for the layout, where calls run and the durability settings.

    Args:
        path: the database file (created if missing).
        ttl: seconds a finished run is kept, or None to keep it.
        key_prefix: a namespace stored in every row; stores with different prefixes
            sharing a file never see each other's runs.
        durability: ``"full"`` (a commit survives a power loss) or ``"normal"`` (it
            survives a crash of the process).

    Raises:
        WorkflowDefinitionError: an unknown ``durability``.
    """

    def __init__(
        self,
        path: str = "agentflow.db",
        ttl: float | None = None,
        key_prefix: str = "",
        durability: Durability = "full",
    ) -> None:
        if durability not in ("normal", "full"):
            raise WorkflowDefinitionError(f"SQLite durability must be 'normal' or 'full', not {durability!r}")
        self.path = path
        self.ttl = ttl
        self.key_prefix = key_prefix
        self.durability: Durability = durability
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._next_purge = 0.0
        self._purge_every = min(self.ttl or 60.0, 60.0)  # seconds between two purges
        # The loop's connection, and (fork count, thread id) of the one thread that uses it.
        self._inline: sqlite3.Connection | None = None
        self._home: tuple[int, int] | None = None
        self._unchecked = 0  # bytes written on the loop's connection since the last checkpoint
        self._checkpoint = _Pending()
        self._contended = 0.0
        self._gathered = None
        self._queued = asyncio.Event()  # an entry was queued through this store object
        # At "full" a write flushes the disk, which may take milliseconds: the thread does it.
        self._writes_inline = durability == "normal"
        # A store dropped without close() stops its thread, which holds no reference to it.
        weakref.finalize(self, self._jobs.put, None)

    def _purging(self) -> bool:
        """Whether the create about to be made purges expired runs (on the store's thread).

        One create at a time is chosen: the next purge is put off at once, so that the
        creates made while it waits for the thread stay on the loop's connection.
        """
        now = time.time()
        if now < self._next_purge:
            return False
        self._next_purge = now + self._purge_every
        return True

    def _purge(self, db: sqlite3.Connection, now: float) -> None:
        """Delete a batch of expired runs; a full batch brings the next purge forward."""
        expired = db.execute(sqlrows.SELECT_EXPIRED, (self.key_prefix, now, PURGE_BATCH)).fetchall()
        sqlrows.delete_runs(db, self.key_prefix, [run_id for (run_id,) in expired])
        self._next_purge = now if len(expired) == PURGE_BATCH else now + self._purge_every

    def _expires(self, status: Any, now: float) -> float | None:
        return now + self.ttl if self.ttl is not None and status in sqlrows.FINAL_VALUES else None

    # -- the Store protocol -----------------------------------------------------------

    async def create(self, record: RunRecord, events: Sequence[RunEvent]) -> bool:
        """Store a new run; False (and nothing written) if the run id exists.

        A retry whose first attempt created the run (the stored run is still exactly
        what it wrote) returns True.
        """
        return await self._create(record, events, queued=False)

    async def create_queued(self, record: RunRecord, events: Sequence[RunEvent]) -> bool:
        """:meth:`create`, with the run's queue entry in the same transaction (``CreatesQueued``)."""
        created = await self._create(record, events, queued=True)
        if created:
            self._queued.set()
        return created

    async def _create(self, record: RunRecord, events: Sequence[RunEvent], queued: bool) -> bool:
        run_id, ns = record.run_id, self.key_prefix
        check_record(record)
        hot = sqlrows.hot_row(record, record.event_count + len(events))
        columns: dict[str, Any] = {}
        big: dict[str, str] = {}
        for name in sql.BIG:
            if (value := getattr(record, name)) is not None:
                sqlrows.place(run_id, name, value, columns, big)
        bodies = [encode_event(run_id, e).decode() for e in events]
        deadline, status = deadline_of(record.pending), hot[_STATUS_AT]
        approvals = sqlindex.approval_rows(run_id, record.workflow, status, record.pending)

        def job(db: sqlite3.Connection) -> bool:
            now = time.time()
            with sqlrows.transaction(db):
                if purge:
                    self._purge(db, now)
                if not sqlrows.insert_run(db, ns, hot, deadline, self._expires(status, now), columns):
                    row = db.execute(sqlrows.SELECT_STORED, (ns, run_id)).fetchone()
                    if row[0] is None or row[0] > now:
                        return list(row[1:]) == sqlrows.stored_form(hot, columns, big)
                    sqlrows.delete_runs(db, ns, [run_id])  # expired, not purged yet: the id is free
                    sqlrows.insert_run(db, ns, hot, deadline, self._expires(status, now), columns)
                sqlrows.insert_rows(db, ns, run_id, 1, bodies, big)
                if approvals:
                    sqlindex.file_approvals(db, ns, run_id, approvals)
                if queued:
                    sqlqueue.insert(db, ns, record.workflow, run_id)
            return True

        purge = self._purging()
        # A purge deletes up to PURGE_BATCH runs: never on the loop.
        inline = self._writes_inline and not purge
        size = sum(map(len, bodies)) + sum(map(len, big.values()))
        return await self._call("create", run_id, job, inline, write=True, size=size)

    async def get(self, run_id: str) -> RunRecord | None:
        """The run's record, or None.

        Raises:
            CorruptRecordError: the stored record cannot be read (names the run and field).
        """

        def job(db: sqlite3.Connection) -> RunRecord | None:
            row = db.execute(sqlrows.SELECT_FULL, (self.key_prefix, run_id, time.time())).fetchone()
            return None if row is None else sqlrows.to_record(row, light=False)

        return await self._call("get", run_id, job)

    async def load(self, run_id: str) -> LoadedRun | None:
        """The record with its outputs and journal, read in one snapshot; or None.

        Raises:
            CorruptRecordError: part of the run cannot be read (names the run and key).
        """
        key = (self.key_prefix, run_id)

        def job(db: sqlite3.Connection) -> LoadedRun | None:
            with sqlrows.transaction(db, write=False):
                row = db.execute(sqlrows.SELECT_FULL, (*key, time.time())).fetchone()
                if row is None:
                    return None
                outputs = db.execute(sqlrows.SELECT_OUTPUTS, key).fetchall()
                journal = db.execute(sqlrows.SELECT_JOURNAL, key).fetchall()
            return LoadedRun(
                sqlrows.to_record(row, light=False),
                [make_output(run_id, f"{sql.OUTPUTS}[{i}]", body) for i, (body,) in enumerate(outputs)],
                {k: decode(run_id, f"{sql.JOURNAL}[{k}]", value) for k, value in journal},
            )

        return await self._call("load", run_id, job)

    async def commit(self, run_id: str, lease: Lease, commit: Commit) -> str | None:
        """Apply ``commit`` in one transaction if ``lease`` still holds; return the control flag.

        A commit whose ``(lease.token, commit.seq)`` was applied already (the record's
        ``commit_token``, and ``commit_seq`` at or past ``seq``) writes nothing.

        Raises:
            LeaseLostError: the lease no longer holds; nothing was written.
            StoreError: a value cannot be encoded or ``seq`` is below 1 (nothing was
                written), or SQLite failed.
        """
        check_commit_fields(run_id, commit.fields)
        if commit.seq < 1:  # a seq the record may carry already would pass for a retry
            raise StoreError(
                f"run {run_id}: commit seq {commit.seq} is not a commit number; a commit carries the "
                "loaded record's commit_seq plus one per commit since"
            )
        hot: dict[str, Any] = {}
        big: dict[str, str] = {}
        inline: tuple[str, ...] = ()
        for name, value in commit.fields.items():
            if name in sql.BIG:
                sqlrows.place(run_id, name, value, hot, big)
                if name not in big:
                    inline += (name,)
            else:
                hot[name] = column_value(run_id, name, value)
        if "pending" in hot:
            hot["deadline"] = deadline_of(commit.fields["pending"])
        events = [encode_event(run_id, e).decode() for e in commit.events]
        outputs = [encode_output(run_id, o).decode() for o in commit.outputs] if commit.outputs else []
        journal = {k: encode(run_id, f"journal {k!r}", v).decode() for k, v in commit.journal.items()}
        ns, token, seq, n = self.key_prefix, lease.token, commit.seq, len(events)
        status = hot.get("status")
        # A commit that sets the run's pending files its approvals. (One that only sets a
        # status has none to drop: a run has an owner that commits only while it runs.)
        refile = "pending" in commit.fields
        pending = commit.fields.get("pending")

        def approvals(db: sqlite3.Connection, workflow: Any = None, now_status: Any = None) -> None:
            if workflow is None:  # the fence's slow path: read what the row holds
                workflow, now_status = db.execute(sqlindex.SELECT_RUN_STATUS, (ns, run_id)).fetchone()
                retire = True
            elif status is not None:  # the fast statement matched only a stored status other than this
                retire = status != RunStatus.WAITING
            else:
                retire = now_status == RunStatus.WAITING
            sqlindex.file_pending(db, ns, run_id, str(workflow), now_status, pending, retire)

        # One statement checks the fence and writes the hot row. A new status must differ
        # from the stored one (an unchanged status would rewrite the status indexes for
        # nothing); when the statement matches no row, the row says why.
        ttl = self.ttl if status in sqlrows.FINAL_VALUES else None  # a final status makes the run expire
        fast = sqlrows.commit_update(tuple(hot), commit.release, ttl is not None, inline, refile)
        last = (status,) if status is not None else ()

        def job(db: sqlite3.Connection) -> str | None:
            now = time.time()
            with sqlrows.transaction(db):
                params = [*hot.values()] if ttl is None else [*hot.values(), now + ttl]
                params += (now, n, token, seq, ns, run_id, now, lease.owner, token, token, seq, *last)
                if done := db.execute(fast, params).fetchone():
                    if inline and done[2]:  # a value that shrank: its long form is gone
                        sqlrows.delete_values(db, ns, run_id, inline)
                    sqlrows.insert_rows(db, ns, run_id, done[0] - n + 1, events, big, outputs, journal)
                    if refile:
                        approvals(db, done[-2], done[-1])
                    return None if done[1] is None else str(done[1])
                row = db.execute(sqlrows.SELECT_FENCE, (ns, run_id, now)).fetchone()
                if row is None:
                    raise LeaseLostError(run_id, "the run no longer exists")
                rowid, owner, held, done_token, done_seq, count, control, status = row
                for name, value in (("commit_seq", done_seq), ("event_count", count)):
                    if isinstance(value, bool) or not isinstance(value, int):
                        raise CorruptRecordError(run_id, f"{sql.RUNS}.{name}", f"not an integer: {value!r}")
                if done_token == token and seq <= done_seq:
                    return None if control is None else str(control)  # applied before: a retry
                if owner != lease.owner or held != token:
                    detail = f"the lease is {held} of {owner!r}"
                    raise LeaseLostError(run_id, f"token {token} of {lease.owner!r} is stale; {detail}")
                sets = dict(hot)
                if sets.get("status") == status:
                    del sets["status"]  # an unchanged status leaves the status indexes alone
                elif "status" in sets and (expires := self._expires(sets["status"], now)) is not None:
                    sets["expires_at"] = expires
                sets.update(updated_at=now, event_count=count + n, commit_token=token, commit_seq=seq)
                if commit.release:
                    sets.update(lease_owner=None, lease_expires=0.0)
                assignments = ", ".join(f"{name} = ?" for name in sets)
                db.execute(f"UPDATE {sql.RUNS} SET {assignments} WHERE id = ?", [*sets.values(), rowid])
                if inline:
                    sqlrows.delete_values(db, ns, run_id, inline)
                sqlrows.insert_rows(db, ns, run_id, count + 1, events, big, outputs, journal)
                if refile:
                    approvals(db)
            control = sets["control"] if "control" in sets else control
            return None if control is None else str(control)

        size = sum(map(len, events)) + sum(map(len, big.values()))
        if outputs or journal:
            size += sum(map(len, outputs)) + sum(map(len, journal.values()))
        return await self._call("commit", run_id, job, self._writes_inline, write=True, size=size)

    async def renew(self, run_id: str, lease: Lease, ttl: float) -> str | None:
        """Extend the lease to ``ttl`` seconds past the store's now; return the control flag.

        Raises:
            LeaseLostError: the lease no longer holds.
        """
        key = (self.key_prefix, run_id)

        def job(db: sqlite3.Connection) -> tuple[bool, Any]:
            now = time.time()
            # The loop's connection never flushes (a renewal lost to a power loss lost
            # nothing: its owner is gone too); on the store's thread a renewal is committed
            # with the calls waiting there with it.
            row = db.execute(sqlrows.RENEW, (now + ttl, *key, lease.owner, lease.token, now)).fetchone()
            if row is not None:
                return True, row[0]
            return False, db.execute(sqlrows.SELECT_LEASE, (*key, now)).fetchone()

        renewed, value = await self._call("renew", run_id, job, write=True)
        if not renewed:
            detail = f"the lease is {value[1]} of {value[0]!r}" if value else "the run no longer exists"
            raise LeaseLostError(run_id, f"token {lease.token} of {lease.owner!r} is stale; {detail}")
        return None if value is None else str(value)

    async def update(
        self, run_id: str, change: Callable[[RunRecord, float], Change | None]
    ) -> RunRecord | None:
        """Read-modify-write the record under the database write lock.

        ``change(record, now)`` runs inside the transaction, with ``now`` from this
        machine's clock; other writers wait instead of conflicting, so it is called once
        (twice if the loop's connection found the lock held before reading). Only the
        fields it changes are written.

        Raises:
            CorruptRecordError: the stored record cannot be read; nothing was written.
        """
        key = (self.key_prefix, run_id)

        def job(db: sqlite3.Connection) -> RunRecord | None:
            with sqlrows.transaction(db):
                now = time.time()
                row = db.execute(sqlrows.SELECT_FULL, (*key, now)).fetchone()
                if row is None:
                    return None
                old = sqlrows.to_record(row, light=False)
                result = change(old, now)
                if result is None:
                    return old
                rec = result.written_over(old, now)
                check_record(rec)
                sets = {
                    name: column_value(run_id, name, getattr(rec, name))
                    for name in sqlrows.HOT[1:]
                    if name in ("updated_at", "event_count") or getattr(rec, name) != getattr(old, name)
                }
                if "pending" in sets or "status" in sets:
                    sets["deadline"] = deadline_of(rec.pending)
                if "status" in sets and (expires := self._expires(sets["status"], now)) is not None:
                    sets["expires_at"] = expires
                big: dict[str, str] = {}
                for name in sql.BIG:  # the same object is the same value: an unchanged state is not encoded
                    if (value := getattr(rec, name)) is not getattr(old, name):
                        sqlrows.place(run_id, name, value, sets, big)
                bodies = [encode_event(run_id, e).decode() for e in result.events]
                assignments = ", ".join(f"{name} = ?" for name in sets)
                db.execute(
                    f"UPDATE {sql.RUNS} SET {assignments} WHERE ns = ? AND run_id = ?", [*sets.values(), *key]
                )
                if inline := [name for name in sql.BIG if sets.get(name) is not None]:
                    sqlrows.delete_values(db, self.key_prefix, run_id, inline)
                sqlrows.insert_rows(db, self.key_prefix, run_id, old.event_count + 1, bodies, big)
                if "pending" in sets or "status" in sets:
                    retire = old.status == RunStatus.WAITING
                    now_status = RunStatus(rec.status).value
                    sqlindex.file_pending(db, *key, rec.workflow, now_status, rec.pending, retire)
            if db is self._inline:
                self._unchecked += sum(map(len, bodies)) + sum(map(len, big.values()))
            return rec

        return await self._call("update", run_id, job, self._writes_inline, write=True)

    async def events(self, run_id: str, after: int = 0) -> list[RunEvent]:
        """The run's events with ``seq`` greater than ``after``, in order."""

        def job(db: sqlite3.Connection) -> list[RunEvent]:
            rows = db.execute(sqlrows.SELECT_EVENTS, (self.key_prefix, run_id, after, time.time())).fetchall()
            return [make_event(run_id, f"{sql.EVENTS}[{seq}]", body, seq) for seq, body in rows]

        return await self._call("events", run_id, job)

    async def delete(self, run_id: str) -> bool:
        """Remove a run with its values, events, outputs and journal; False if it did not exist."""

        def job(db: sqlite3.Connection) -> bool:
            with sqlrows.transaction(db):
                live = db.execute(sqlrows.SELECT_LIVE, (self.key_prefix, run_id, time.time())).fetchone()
                sqlrows.delete_runs(db, self.key_prefix, [run_id])
            return live is not None

        return await self._call("delete", run_id, job, inline=False)  # as long as the run is big

    def sibling(self) -> SqliteStore:
        """A new store on the same file and options, with a thread and connection of its own."""
        return SqliteStore(self.path, ttl=self.ttl, key_prefix=self.key_prefix, durability=self.durability)

    async def close(self) -> None:
        """Close the connection and stop the store's thread; the store is unusable afterwards."""
        if self._closed:
            return
        self._closed = True  # calls made from now on fail; those queued before run first
        if self._gathered:
            self._write_together()  # to the thread, before it is told to close
        inline, self._inline = self._inline, None
        if inline is not None and self._home is not None and self._home[0] == _forks[0]:
            inline.close()
        if self._thread is not None:
            await self._submit(_close)
