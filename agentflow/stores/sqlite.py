"""SQLite store: one file, durable, shared safely by the processes of one machine.

Layout: see :mod:`agentflow.stores.sqlite_schema`. A run's small fields live in one hot
row; input, state and output live in a table of their own and are written only when a
commit or update changes them, so a step costs a few pages however big the state is.
``key_prefix`` is a *column namespace*: every row carries it in ``ns`` and every query
filters on it, so several prefixes share one file without building table names from
user text.

Off the event loop. Every call runs on a thread owned by the store, which owns the
store's one connection; the caller's loop awaits a future the thread settles. A
connection of another process holding the write lock for seconds stalls that call,
not the loop, and any event loop (a second one in another thread too) can use the
store. One operation is one hop: a commit's check, write and reply, an update's read,
``change`` and write, a load's three reads. ``sibling()`` gives a second store (thread
and connection) on the same file, so lease renewals do not queue behind a slow call.

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
defaults to ``"full"``. Its price is one flush per commit: on an idle virtio SSD a
commit's median went from about 0.1 ms (``"normal"``) to 0.2 ms (a flush is 0.1 ms),
far below any model call; with the disk busy with other writers a flush took 5 ms.
``"normal"`` is there for throughput when a power loss may cost the last steps. Lease
renewals are never flushed: after a power loss their owners are gone anyway.

Expiry. Runs that finish with a ``ttl`` get ``expires_at``; expired rows read as absent
everywhere at once, and a ``create`` now and then purges them in bounded batches
(reads never write).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

from ..errors import CorruptRecordError, LeaseLostError, StoreError, WorkflowDefinitionError
from ..types import RunEvent, RunStatus
from . import sqlite_schema as sql
from .codec import (
    check_commit_fields,
    check_record,
    deadline_of,
    decode,
    encode,
    encode_event,
    encode_output,
    make_event,
    make_output,
)
from .contract import Change, Commit, Lease, LoadedRun, RunRecord

__all__ = ["Durability", "SqliteStore"]

T = TypeVar("T")
Durability = Literal["normal", "full"]
#: Most expired runs one purge deletes, so a backlog never makes one ``create`` slow.
PURGE_BATCH = 200


class SqliteStore:
    """Keeps runs in one SQLite file (WAL mode); safe for several processes on one machine.

    The file is opened on first use, by the store's own thread. See the module
    docstring for the layout, the threading and the durability settings.

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
        self._next_purge = 0.0  # used on the store's thread only
        # A store dropped without close() stops its thread, which holds no reference to it.
        weakref.finalize(self, self._jobs.put, None)

    async def _call(self, what: str, run_id: str | None, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``job(connection)`` on the store's thread and await its result."""
        if self._closed:
            subject = f"run {run_id}: " if run_id else ""
            raise StoreError(f"{subject}{what} refused: the SQLite store on {self.path} is closed")
        try:
            return await self._submit(job)
        except sqlite3.Error as exc:
            subject = f"run {run_id}: " if run_id else ""
            raise StoreError(f"{subject}SQLite {what} on {self.path} failed: {exc}") from exc

    def _submit(self, job: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._thread is None or not self._thread.is_alive():  # first call, or in a forked child
            args = (self._jobs, self.path, self.durability)
            self._thread = threading.Thread(target=_serve, args=args, name="agentflow-sqlite", daemon=True)
            self._thread.start()
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put((future.get_loop(), future, job))
        return future

    def _purge(self, db: sqlite3.Connection, now: float) -> None:
        """Delete a batch of expired runs, now and then; a full batch brings the next one forward."""
        if now < self._next_purge:
            return
        expired = db.execute(sql.SELECT_EXPIRED, (self.key_prefix, now, PURGE_BATCH)).fetchall()
        sql.delete_runs(db, self.key_prefix, [run_id for (run_id,) in expired])
        self._next_purge = now if len(expired) == PURGE_BATCH else now + min(self.ttl or 60.0, 60.0)

    def _expires(self, status: Any, now: float) -> float | None:
        return now + self.ttl if self.ttl is not None and status in sql.FINAL_VALUES else None

    # -- the Store protocol -----------------------------------------------------------

    async def create(self, record: RunRecord, events: Sequence[RunEvent]) -> bool:
        """Store a new run; False (and nothing written) if the run id exists.

        A retry whose first attempt created the run (the stored run is still exactly
        what it wrote) returns True.
        """
        run_id, ns = record.run_id, self.key_prefix
        rec = dataclasses.replace(record, event_count=record.event_count + len(events))
        check_record(rec)
        hot = [sql.column(run_id, name, getattr(rec, name)) for name in sql.HOT]
        big = {f: encode(run_id, f, getattr(rec, f)).decode() for f in sql.BIG if getattr(rec, f) is not None}
        bodies = [encode_event(run_id, e).decode() for e in events]
        deadline, status = deadline_of(rec.pending), RunStatus(rec.status).value

        def job(db: sqlite3.Connection) -> bool:
            now = time.time()
            with sql.transaction(db):
                self._purge(db, now)
                row = db.execute(sql.SELECT_STORED, (ns, run_id)).fetchone()
                if row is not None:
                    if row[0] is None or row[0] > now:
                        return list(row[1:]) == [*hot, *(big.get(f) for f in sql.BIG)]
                    sql.delete_runs(db, ns, [run_id])
                sql.insert_run(db, ns, hot, deadline, self._expires(status, now))
                sql.insert_rows(db, ns, run_id, 1, bodies, big)
            return True

        return await self._call("create", run_id, job)

    async def get(self, run_id: str) -> RunRecord | None:
        """The run's record, or None.

        Raises:
            CorruptRecordError: the stored record cannot be read (names the run and field).
        """

        def job(db: sqlite3.Connection) -> RunRecord | None:
            row = db.execute(sql.SELECT_FULL, (self.key_prefix, run_id, time.time())).fetchone()
            return None if row is None else sql.to_record(row, light=False)

        return await self._call("get", run_id, job)

    async def load(self, run_id: str) -> LoadedRun | None:
        """The record with its outputs and journal, read in one snapshot; or None.

        Raises:
            CorruptRecordError: part of the run cannot be read (names the run and key).
        """
        key = (self.key_prefix, run_id)

        def job(db: sqlite3.Connection) -> LoadedRun | None:
            with sql.transaction(db, write=False):
                row = db.execute(sql.SELECT_FULL, (*key, time.time())).fetchone()
                if row is None:
                    return None
                outputs = db.execute(sql.SELECT_OUTPUTS, key).fetchall()
                journal = db.execute(sql.SELECT_JOURNAL, key).fetchall()
            return LoadedRun(
                sql.to_record(row, light=False),
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
        for name, value in commit.fields.items():
            if name in sql.BIG:
                big[name] = encode(run_id, name, value).decode()
            else:
                hot[name] = sql.column(run_id, name, value)
        if "pending" in hot:
            hot["deadline"] = deadline_of(commit.fields["pending"])
        events = [encode_event(run_id, e).decode() for e in commit.events]
        outputs = [encode_output(run_id, o).decode() for o in commit.outputs]
        journal = {k: encode(run_id, f"journal {k!r}", v).decode() for k, v in commit.journal.items()}
        seq, n = commit.seq, len(events)

        def job(db: sqlite3.Connection) -> str | None:
            now = time.time()
            with sql.transaction(db):
                row = db.execute(sql.SELECT_FENCE, (self.key_prefix, run_id, now)).fetchone()
                if row is None:
                    raise LeaseLostError(run_id, "the run no longer exists")
                rowid, owner, token, done_token, done_seq, count, control, status = row
                for name, value in (("commit_seq", done_seq), ("event_count", count)):
                    if isinstance(value, bool) or not isinstance(value, int):
                        raise CorruptRecordError(run_id, f"{sql.RUNS}.{name}", f"not an integer: {value!r}")
                if done_token == lease.token and seq <= done_seq:
                    return None if control is None else str(control)  # applied before: a retry
                if owner != lease.owner or token != lease.token:
                    held = f"the lease is {token} of {owner!r}"
                    raise LeaseLostError(run_id, f"token {lease.token} of {lease.owner!r} is stale; {held}")
                sets = dict(hot)
                if sets.get("status") == status:
                    del sets["status"]  # an unchanged status leaves the status indexes alone
                elif "status" in sets and (expires := self._expires(sets["status"], now)) is not None:
                    sets["expires_at"] = expires
                sets.update(updated_at=now, event_count=count + n, commit_token=lease.token, commit_seq=seq)
                if commit.release:
                    sets.update(lease_owner=None, lease_expires=0.0)
                assignments = ", ".join(f"{name} = ?" for name in sets)
                db.execute(f"UPDATE {sql.RUNS} SET {assignments} WHERE id = ?", [*sets.values(), rowid])
                sql.insert_rows(db, self.key_prefix, run_id, count + 1, events, big, outputs, journal)
            control = sets["control"] if "control" in sets else control
            return None if control is None else str(control)

        return await self._call("commit", run_id, job)

    async def renew(self, run_id: str, lease: Lease, ttl: float) -> str | None:
        """Extend the lease to ``ttl`` seconds past the store's now; return the control flag.

        Raises:
            LeaseLostError: the lease no longer holds.
        """
        key = (self.key_prefix, run_id)
        full = self.durability == "full"

        def job(db: sqlite3.Connection) -> tuple[bool, Any]:
            now = time.time()
            if full:  # a renewal lost to a power loss lost nothing: its owner is gone too
                db.execute("PRAGMA synchronous = NORMAL")
            try:
                row = db.execute(sql.RENEW, (now + ttl, *key, lease.owner, lease.token, now)).fetchone()
            finally:
                if full:
                    db.execute("PRAGMA synchronous = FULL")
            if row is not None:
                return True, row[0]
            return False, db.execute(sql.SELECT_LEASE, (*key, now)).fetchone()

        renewed, value = await self._call("renew", run_id, job)
        if not renewed:
            detail = f"the lease is {value[1]} of {value[0]!r}" if value else "the run no longer exists"
            raise LeaseLostError(run_id, f"token {lease.token} of {lease.owner!r} is stale; {detail}")
        return None if value is None else str(value)

    async def update(
        self, run_id: str, change: Callable[[RunRecord, float], Change | None]
    ) -> RunRecord | None:
        """Read-modify-write the record under the database write lock.

        ``change(record, now)`` runs on the store's thread, inside the transaction, with
        ``now`` from this machine's clock; other writers wait instead of conflicting, so
        it is called once. Only the fields it changes are written.

        Raises:
            CorruptRecordError: the stored record cannot be read; nothing was written.
        """
        key = (self.key_prefix, run_id)

        def job(db: sqlite3.Connection) -> RunRecord | None:
            with sql.transaction(db):
                now = time.time()
                row = db.execute(sql.SELECT_FULL, (*key, now)).fetchone()
                if row is None:
                    return None
                old = sql.to_record(row, light=False)
                result = change(old, now)
                if result is None:
                    return old
                count = old.event_count + len(result.events)
                rec = dataclasses.replace(result.record, updated_at=now, event_count=count)
                check_record(rec)
                sets = {
                    name: sql.column(run_id, name, getattr(rec, name))
                    for name in sql.HOT[1:]
                    if name in ("updated_at", "event_count") or getattr(rec, name) != getattr(old, name)
                }
                if "pending" in sets or "status" in sets:
                    sets["deadline"] = deadline_of(rec.pending)
                if "status" in sets and (expires := self._expires(sets["status"], now)) is not None:
                    sets["expires_at"] = expires
                big = {  # the same object is the same value: an unchanged state is not encoded
                    name: encode(run_id, name, getattr(rec, name)).decode()
                    for name in sql.BIG
                    if getattr(rec, name) is not getattr(old, name)
                }
                bodies = [encode_event(run_id, e).decode() for e in result.events]
                assignments = ", ".join(f"{name} = ?" for name in sets)
                db.execute(
                    f"UPDATE {sql.RUNS} SET {assignments} WHERE ns = ? AND run_id = ?", [*sets.values(), *key]
                )
                sql.insert_rows(db, self.key_prefix, run_id, old.event_count + 1, bodies, big)
            return rec

        return await self._call("update", run_id, job)

    async def events(self, run_id: str, after: int = 0) -> list[RunEvent]:
        """The run's events with ``seq`` greater than ``after``, in order."""

        def job(db: sqlite3.Connection) -> list[RunEvent]:
            rows = db.execute(sql.SELECT_EVENTS, (self.key_prefix, run_id, after, time.time())).fetchall()
            return [make_event(run_id, f"{sql.EVENTS}[{seq}]", body, seq) for seq, body in rows]

        return await self._call("events", run_id, job)

    async def list_runs(
        self,
        workflow: str | None = None,
        status: RunStatus | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[RunRecord]:
        """Light records (no input, state, output), newest first, at most ``limit``.

        ``after`` is the ``run_id`` of the last record of the previous page. A row that
        cannot be decoded is listed with ``corrupt`` set.

        Raises:
            StoreError: ``after`` names a run that is not stored (deleted since).
        """
        where, params = f"ns = ? AND {sql.LIVE}", [self.key_prefix, time.time()]
        if workflow is not None:
            where, params = where + " AND workflow = ?", [*params, workflow]
        if status is not None:
            where, params = where + " AND status = ?", [*params, RunStatus(status).value]

        def job(db: sqlite3.Connection) -> list[RunRecord]:
            if after is not None:
                cursor = db.execute(sql.SELECT_CURSOR, (self.key_prefix, after)).fetchone()
                if cursor is None:
                    raise StoreError(
                        f"list_runs(after={after!r}): run {after} is not stored (deleted since the previous "
                        "page); list again from the first page"
                    )
                bound, page = " AND (created_at, id) < (?, ?)", [*params, *cursor, limit]
            else:
                bound, page = "", [*params, limit]
            order = "ORDER BY created_at DESC, id DESC LIMIT ?"
            rows = db.execute(f"{sql.SELECT_LIGHT} WHERE {where}{bound} {order}", page).fetchall()
            return [sql.listed(row) for row in rows]

        return await self._call("list_runs", after, job)

    async def recoverable(self, workflow: str, limit: int = 100) -> list[str]:
        """Ids of ``workflow``'s running runs whose lease ran out by this machine's clock."""

        def job(db: sqlite3.Connection) -> list[str]:
            now = time.time()
            rows = db.execute(sql.SELECT_RECOVERABLE, (self.key_prefix, workflow, now, now, limit)).fetchall()
            return [str(run_id) for (run_id,) in rows]

        return await self._call("recoverable", None, job)

    async def due_gates(self, workflow: str, now: float) -> list[str]:
        """Ids of runs of ``workflow`` waiting at a gate whose deadline is at or before ``now``."""

        def job(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(sql.SELECT_DUE, (self.key_prefix, workflow, now, time.time())).fetchall()
            return [str(run_id) for (run_id,) in rows]

        return await self._call("due_gates", None, job)

    async def delete(self, run_id: str) -> bool:
        """Remove a run with its values, events, outputs and journal; False if it did not exist."""

        def job(db: sqlite3.Connection) -> bool:
            with sql.transaction(db):
                live = db.execute(sql.SELECT_LIVE, (self.key_prefix, run_id, time.time())).fetchone()
                sql.delete_runs(db, self.key_prefix, [run_id])
            return live is not None

        return await self._call("delete", run_id, job)

    def sibling(self) -> SqliteStore:
        """A new store on the same file and options, with a thread and connection of its own."""
        return SqliteStore(self.path, ttl=self.ttl, key_prefix=self.key_prefix, durability=self.durability)

    async def close(self) -> None:
        """Close the connection and stop the store's thread; the store is unusable afterwards."""
        if self._closed:
            return
        self._closed = True  # calls made from now on fail; those queued before run first
        if self._thread is not None:
            await self._submit(_close)


def _close(db: sqlite3.Connection) -> None:
    """The job that makes the store's thread close its connection and stop."""


_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[sqlite3.Connection], Any]]


def _serve(jobs: queue.SimpleQueue[_Job | None], path: str, durability: Durability) -> None:
    """The store's thread: runs each job on the connection it owns, settles the job's future.

    A plain thread and a queue rather than an executor: one wake-up each way per call.
    """
    db: sqlite3.Connection | None = None
    try:
        while (item := jobs.get()) is not None:
            loop, future, job = item
            outcome: tuple[Any, BaseException | None] = (None, None)
            try:
                if job is not _close:
                    if db is None:
                        db = sql.connect(path, durability)
                    outcome = (job(db), None)
                elif db is not None:
                    db.close()
                    db = None
            except BaseException as exc:
                outcome = (None, exc)
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, future, *outcome)
            if job is _close:
                return
            del item, loop, future, job, outcome  # hold nothing (the store included) while idle
    finally:
        if db is not None:
            db.close()


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if not future.cancelled():
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)
