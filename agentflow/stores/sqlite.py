"""SQLite store: one file, durable, shared safely by the processes of one machine.

Layout: see :mod:`agentflow.stores.sqlite_schema`. The run's small fields live in one
hot row; input, state and output live in a table of their own and are written only
when a commit or update changes them, so a step costs a few pages however big the
state is. ``key_prefix`` is a *column namespace*: every row carries it in ``ns`` and
every query filters on it, so several prefixes share one file and one schema without
building table names from user text.

Off the event loop. Every call runs on a thread owned by the store, which owns the
store's one connection; the loop awaits the result (``asyncio.wrap_future``), so a
connection of another process holding the write lock for seconds stalls that call,
not the loop, and any event loop (a second one in another thread included) can use
the store. One operation is one hop: a commit's check, write and reply, an update's
read, ``change`` and write, a load's three reads, each in one job on that thread.
``sibling()`` gives a second store (thread and connection) on the same file, so lease
renewals do not queue behind a slow call.

Concurrency. The database runs in WAL mode, so readers never block the writer. Every
read-modify-write starts with ``BEGIN IMMEDIATE``: it takes the write lock before
reading, so two processes cannot both read the old value, and ``busy_timeout`` makes
a contended writer wait rather than fail. The clock of every lease is this machine's
(``time.time()`` on the store's thread); all processes sharing the file share it.

Durability. ``durability="full"`` (the default) is ``synchronous=FULL``: every commit
is flushed to the disk before it returns, so a committed step survives a power loss
as well as a crash. ``"normal"`` is ``synchronous=NORMAL``: the WAL is flushed at
checkpoints only, so a crash of the process loses nothing but a power loss may roll
back the last commits (the file is never corrupted). A step that is lost is executed
again, and steps call paid, slow, side-effecting LLMs and tools, so a store sold as
durable defaults to ``"full"``; its price is one flush of the WAL per commit (on an
SSD typically a fraction of a millisecond to a few milliseconds, small next to any
LLM call). Choose ``"normal"`` for throughput when a power loss is acceptable.

Expiry. Runs that finish with a ``ttl`` get ``expires_at``; expired rows read as absent
everywhere at once, and a ``create`` now and then purges them in bounded batches
(reads never write).
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

from ..errors import CorruptRecordError, LeaseLostError, StoreError, WorkflowDefinitionError
from ..types import RunEvent, RunStatus
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
from .sqlite_schema import (
    BIG,
    EVENTS,
    FINAL_VALUES,
    HOT,
    JOURNAL,
    LIVE,
    OUTPUTS,
    RUNS,
    SELECT_FULL,
    SELECT_LIGHT,
    SELECT_STORED,
    column,
    delete_runs,
    ensure_schema,
    insert_rows,
    insert_run,
    listed,
    to_record,
    transaction,
)

__all__ = ["BUSY_TIMEOUT", "Durability", "SqliteStore"]

T = TypeVar("T")
Durability = Literal["normal", "full"]

#: Seconds a contended writer waits for another connection's lock before failing.
BUSY_TIMEOUT = 10.0
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
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentflow-sqlite")
        self._db: sqlite3.Connection | None = None  # used by the store's thread only
        self._closed = False
        self._next_purge = 0.0

    # -- plumbing: everything below runs on the store's thread -------------------------

    async def _call(self, what: str, run_id: str | None, job: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreError(f"the SQLite store on {self.path} is closed ({what} of run {run_id})")
        return await asyncio.wrap_future(self._executor.submit(self._run, what, run_id, job))

    def _run(self, what: str, run_id: str | None, job: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return job(self._conn())
        except sqlite3.Error as exc:
            subject = f"run {run_id}: " if run_id else ""
            raise StoreError(f"{subject}SQLite {what} on {self.path} failed: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode = WAL")
                db.execute(f"PRAGMA synchronous = {self.durability.upper()}")
                if self.durability == "full":
                    db.execute("PRAGMA fullfsync = ON")  # macOS: flush the drive's cache too
                ensure_schema(db, self.path)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _purge(self, db: sqlite3.Connection, now: float) -> None:
        """Delete a batch of expired runs, now and then; a full batch brings the next one forward."""
        if now < self._next_purge:
            return
        expired = db.execute(
            f"SELECT run_id FROM {RUNS} WHERE ns = ? AND expires_at IS NOT NULL AND expires_at <= ? LIMIT ?",
            (self.key_prefix, now, PURGE_BATCH),
        ).fetchall()
        delete_runs(db, self.key_prefix, [run_id for (run_id,) in expired])
        self._next_purge = now if len(expired) == PURGE_BATCH else now + min(self.ttl or 60.0, 60.0)

    def _expires(self, status: Any, now: float) -> float | None:
        return now + self.ttl if self.ttl is not None and status in FINAL_VALUES else None

    # -- the Store protocol -----------------------------------------------------------

    async def create(self, record: RunRecord, events: Sequence[RunEvent]) -> bool:
        """Store a new run; False (and nothing written) if the run id exists.

        A retry whose first attempt created the run (the stored run is still exactly
        what it wrote) returns True.
        """
        run_id, ns = record.run_id, self.key_prefix
        rec = dataclasses.replace(record, event_count=record.event_count + len(events))
        check_record(rec)
        hot = [column(run_id, name, getattr(rec, name)) for name in HOT]
        big = {f: encode(run_id, f, getattr(rec, f)).decode() for f in BIG if getattr(rec, f) is not None}
        bodies = [encode_event(run_id, e).decode() for e in events]
        deadline, status = deadline_of(rec.pending), RunStatus(rec.status).value

        def job(db: sqlite3.Connection) -> bool:
            now = time.time()
            with transaction(db):
                self._purge(db, now)
                row = db.execute(SELECT_STORED, (ns, run_id)).fetchone()
                if row is not None:
                    if row[0] is None or row[0] > now:
                        return list(row[1:]) == [*hot, *(big.get(f) for f in BIG)]
                    delete_runs(db, ns, [run_id])
                insert_run(db, ns, hot, deadline, self._expires(status, now))
                insert_rows(db, ns, run_id, 1, bodies, big)
            return True

        return await self._call("create", run_id, job)

    async def get(self, run_id: str) -> RunRecord | None:
        """The run's record, or None.

        Raises:
            CorruptRecordError: the stored record cannot be read (names the run and field).
        """

        def job(db: sqlite3.Connection) -> RunRecord | None:
            row = db.execute(SELECT_FULL, (self.key_prefix, run_id, time.time())).fetchone()
            return None if row is None else to_record(row, light=False)

        return await self._call("get", run_id, job)

    async def load(self, run_id: str) -> LoadedRun | None:
        """The record with its outputs and journal, read in one snapshot; or None.

        Raises:
            CorruptRecordError: part of the run cannot be read (names the run and key).
        """
        ns = self.key_prefix

        def job(db: sqlite3.Connection) -> LoadedRun | None:
            with transaction(db, write=False):
                row = db.execute(SELECT_FULL, (ns, run_id, time.time())).fetchone()
                if row is None:
                    return None
                outputs = db.execute(
                    f"SELECT body FROM {OUTPUTS} WHERE ns = ? AND run_id = ? ORDER BY id", (ns, run_id)
                ).fetchall()
                journal = db.execute(
                    f"SELECT key, value FROM {JOURNAL} WHERE ns = ? AND run_id = ?", (ns, run_id)
                ).fetchall()
            return LoadedRun(
                to_record(row, light=False),
                [make_output(run_id, f"{OUTPUTS}[{i}]", body) for i, (body,) in enumerate(outputs)],
                {key: decode(run_id, f"{JOURNAL}[{key}]", value) for key, value in journal},
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
        if commit.seq < 1:
            # A seq the record may already carry would make this commit pass for a retry.
            raise StoreError(
                f"run {run_id}: commit seq {commit.seq} is not a commit number; a commit carries the "
                "loaded record's commit_seq plus one per commit since"
            )
        hot: dict[str, Any] = {}
        big: dict[str, str] = {}
        for name, value in commit.fields.items():
            if name in BIG:
                big[name] = encode(run_id, name, value).decode()
            else:
                hot[name] = column(run_id, name, value)
        if "pending" in hot:
            hot["deadline"] = deadline_of(commit.fields["pending"])
        events = [encode_event(run_id, e).decode() for e in commit.events]
        outputs = [encode_output(run_id, o).decode() for o in commit.outputs]
        journal = {k: encode(run_id, f"journal {k!r}", v).decode() for k, v in commit.journal.items()}
        seq, n = commit.seq, len(events)

        def job(db: sqlite3.Connection) -> str | None:
            now = time.time()
            with transaction(db):
                row = db.execute(
                    f"SELECT id, lease_owner, lease_token, commit_token, commit_seq, event_count, control, "
                    f"status FROM {RUNS} WHERE ns = ? AND run_id = ? AND {LIVE}",
                    (self.key_prefix, run_id, now),
                ).fetchone()
                if row is None:
                    raise LeaseLostError(run_id, "the run no longer exists")
                rowid, owner, token, done_token, done_seq, count, control, status = row
                for name, value in (("commit_seq", done_seq), ("event_count", count)):
                    if isinstance(value, bool) or not isinstance(value, int):
                        raise CorruptRecordError(run_id, f"{RUNS}.{name}", f"not an integer: {value!r}")
                if done_token == lease.token and seq <= done_seq:
                    return None if control is None else str(control)  # applied before: a retry
                if owner != lease.owner or token != lease.token:
                    held = f"the lease is {token} of {owner!r}"
                    raise LeaseLostError(run_id, f"token {lease.token} of {lease.owner!r} is stale; {held}")
                sets = dict(hot)
                if sets.get("status") == status:
                    del sets["status"]  # an unchanged status leaves the status indexes untouched
                elif "status" in sets and (expires := self._expires(sets["status"], now)) is not None:
                    sets["expires_at"] = expires
                sets.update(updated_at=now, event_count=count + n, commit_token=lease.token, commit_seq=seq)
                if commit.release:
                    sets.update(lease_owner=None, lease_expires=0.0)
                assignments = ", ".join(f"{name} = ?" for name in sets)
                db.execute(f"UPDATE {RUNS} SET {assignments} WHERE id = ?", [*sets.values(), rowid])
                insert_rows(db, self.key_prefix, run_id, count + 1, events, big, outputs, journal)
            control = sets["control"] if "control" in sets else control
            return None if control is None else str(control)

        return await self._call("commit", run_id, job)

    async def renew(self, run_id: str, lease: Lease, ttl: float) -> str | None:
        """Extend the lease to ``ttl`` seconds past the store's now; return the control flag.

        Raises:
            LeaseLostError: the lease no longer holds.
        """
        ns = self.key_prefix

        def job(db: sqlite3.Connection) -> tuple[bool, Any]:
            now = time.time()
            # One UPDATE statement takes the write lock up front, so it needs no BEGIN.
            row = db.execute(
                f"UPDATE {RUNS} SET lease_expires = ? WHERE ns = ? AND run_id = ? AND lease_owner = ? "
                f"AND lease_token = ? AND {LIVE} RETURNING control",
                (now + ttl, ns, run_id, lease.owner, lease.token, now),
            ).fetchone()
            if row is not None:
                return True, row[0]
            held = db.execute(
                f"SELECT lease_owner, lease_token FROM {RUNS} WHERE ns = ? AND run_id = ? AND {LIVE}",
                (ns, run_id, now),
            ).fetchone()
            return False, held

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
        ns = self.key_prefix

        def job(db: sqlite3.Connection) -> RunRecord | None:
            with transaction(db):
                now = time.time()
                row = db.execute(SELECT_FULL, (ns, run_id, now)).fetchone()
                if row is None:
                    return None
                old = to_record(row, light=False)
                result = change(old, now)
                if result is None:
                    return old
                rec = dataclasses.replace(
                    result.record, updated_at=now, event_count=old.event_count + len(result.events)
                )
                check_record(rec)
                sets = {
                    name: column(run_id, name, getattr(rec, name))
                    for name in HOT[1:]
                    if name in ("updated_at", "event_count") or getattr(rec, name) != getattr(old, name)
                }
                if "pending" in sets or "status" in sets:
                    sets["deadline"] = deadline_of(rec.pending)
                if "status" in sets and (expires := self._expires(sets["status"], now)) is not None:
                    sets["expires_at"] = expires
                big = {
                    name: encode(run_id, name, getattr(rec, name)).decode()
                    for name in BIG
                    if getattr(rec, name) is not getattr(old, name)
                }
                bodies = [encode_event(run_id, e).decode() for e in result.events]
                assignments = ", ".join(f"{name} = ?" for name in sets)
                db.execute(
                    f"UPDATE {RUNS} SET {assignments} WHERE ns = ? AND run_id = ?",
                    [*sets.values(), ns, run_id],
                )
                insert_rows(db, self.key_prefix, run_id, old.event_count + 1, bodies, big)
            return rec

        return await self._call("update", run_id, job)

    async def events(self, run_id: str, after: int = 0) -> list[RunEvent]:
        """The run's events with ``seq`` greater than ``after``, in order."""

        def job(db: sqlite3.Connection) -> list[RunEvent]:
            rows = db.execute(
                f"SELECT e.seq, e.body FROM {EVENTS} e JOIN {RUNS} r ON r.ns = e.ns AND r.run_id = e.run_id "
                "WHERE e.ns = ? AND e.run_id = ? AND e.seq > ? "
                "AND (r.expires_at IS NULL OR r.expires_at > ?) ORDER BY e.seq",
                (self.key_prefix, run_id, after, time.time()),
            ).fetchall()
            return [make_event(run_id, f"{EVENTS}[{seq}]", body, seq) for seq, body in rows]

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
        where, params = f"ns = ? AND {LIVE}", [self.key_prefix, time.time()]
        if workflow is not None:
            where, params = where + " AND workflow = ?", [*params, workflow]
        if status is not None:
            where, params = where + " AND status = ?", [*params, RunStatus(status).value]

        def job(db: sqlite3.Connection) -> list[RunRecord]:
            bound, page = "", list(params)
            if after is not None:
                cursor = db.execute(
                    f"SELECT created_at, id FROM {RUNS} WHERE ns = ? AND run_id = ?", (self.key_prefix, after)
                ).fetchone()
                if cursor is None:
                    raise StoreError(
                        f"list_runs(after={after!r}): run {after} is not stored (deleted since the previous "
                        "page); list again from the first page"
                    )
                bound, page = " AND (created_at, id) < (?, ?)", [*page, *cursor]
            rows = db.execute(
                f"{SELECT_LIGHT} WHERE {where}{bound} ORDER BY created_at DESC, id DESC LIMIT ?",
                [*page, limit],
            ).fetchall()
            return [listed(row) for row in rows]

        return await self._call("list_runs", after, job)

    async def recoverable(self, workflow: str, limit: int = 100) -> list[str]:
        """Ids of ``workflow``'s running runs whose lease ran out by this machine's clock."""

        def job(db: sqlite3.Connection) -> list[str]:
            now = time.time()
            rows = db.execute(
                f"SELECT run_id FROM {RUNS} WHERE ns = ? AND workflow = ? AND status = 'running' "
                f"AND lease_expires <= ? AND {LIVE} ORDER BY lease_expires LIMIT ?",
                (self.key_prefix, workflow, now, now, limit),
            ).fetchall()
            return [str(run_id) for (run_id,) in rows]

        return await self._call("recoverable", None, job)

    async def due_gates(self, workflow: str, now: float) -> list[str]:
        """Ids of runs of ``workflow`` waiting at a gate whose deadline is at or before ``now``."""

        def job(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                f"SELECT run_id FROM {RUNS} WHERE ns = ? AND workflow = ? AND status = 'waiting' "
                f"AND deadline IS NOT NULL AND deadline <= ? AND {LIVE} ORDER BY deadline",
                (self.key_prefix, workflow, now, time.time()),
            ).fetchall()
            return [str(run_id) for (run_id,) in rows]

        return await self._call("due_gates", None, job)

    async def delete(self, run_id: str) -> bool:
        """Remove a run with its values, events, outputs and journal; False if it did not exist."""

        def job(db: sqlite3.Connection) -> bool:
            with transaction(db):
                live = db.execute(
                    f"SELECT 1 FROM {RUNS} WHERE ns = ? AND run_id = ? AND {LIVE}",
                    (self.key_prefix, run_id, time.time()),
                ).fetchone()
                delete_runs(db, self.key_prefix, [run_id])
            return live is not None

        return await self._call("delete", run_id, job)

    def sibling(self) -> SqliteStore:
        """A new store on the same file and options, with a thread and connection of its own."""
        return SqliteStore(self.path, ttl=self.ttl, key_prefix=self.key_prefix, durability=self.durability)

    async def close(self) -> None:
        """Close the connection and stop the store's thread; the store is unusable afterwards."""
        if self._closed:
            return
        self._closed = True

        def job() -> None:
            db, self._db = self._db, None
            if db is not None:
                db.close()

        try:
            await asyncio.wrap_future(self._executor.submit(job))
        finally:
            self._executor.shutdown(wait=False)
