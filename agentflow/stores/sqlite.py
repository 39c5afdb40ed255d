"""SQLite store: one file, durable, shared safely by the processes of one machine.

Layout. Four tables, created on first use::

    agentflow_runs      one row per run: a column per RunRecord field (JSON text for the
                        free-form ones: input, state, pending, decisions, output, error,
                        usage), plus ``deadline`` (the waiting gate's, for due_gates) and
                        ``expires_at`` (set when a finished run has a ttl)
    agentflow_events    (ns, run_id, seq) -> event JSON; seq is the 1-based position
    agentflow_outputs   step outputs in append order
    agentflow_journal   (ns, run_id, key) -> JSON value

``key_prefix`` is a *column namespace*: every row carries it in ``ns`` and every query
filters on it, so several prefixes share one file and one schema without building
table names from user text.

Concurrency. The database runs in WAL mode, so readers never block the writer. Every
read-modify-write starts with ``BEGIN IMMEDIATE``: it takes the write lock before
reading, so two processes cannot both read the old value (a deferred transaction
would fail with SQLITE_BUSY on the upgrade instead of waiting). ``busy_timeout``
makes a contended writer wait rather than fail.

Calls run inline on the event loop thread: a commit is one short transaction (tens
of microseconds), far cheaper than a hop to a worker thread. The cost is that a
writer waiting on another *process's* lock blocks the loop for up to the busy
timeout; transactions here are short, so that wait is short too.

Durability: ``synchronous=NORMAL``, the usual WAL setting. A committed step survives
a crash of the process; a power loss may roll back the last few commits (the file is
never corrupted). Runs that finish with a ``ttl`` get ``expires_at``; expired rows
read as absent and are purged by a later ``create``.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..errors import LeaseLostError, StoreError
from ..records import FINAL, Commit, RunEvent, RunRecord, RunStatus
from .base import Change, Lease, LoadedRun
from .codec import (
    RECORD_FIELDS,
    check_commit_fields,
    check_record,
    deadline_of,
    decode,
    encode,
    encode_event,
    encode_output,
    make_event,
    make_output,
    make_record,
)

__all__ = ["SqliteStore"]

RUNS, EVENTS, OUTPUTS, JOURNAL = (
    "agentflow_runs",
    "agentflow_events",
    "agentflow_outputs",
    "agentflow_journal",
)

# Free-form fields, stored as JSON text; the rest are plain columns so they can be
# filtered and compared in SQL.
_JSON = frozenset({"input", "state", "pending", "decisions", "output", "error", "usage"})

_SCHEMA = f"""
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS {RUNS} (
    id INTEGER PRIMARY KEY,
    ns TEXT NOT NULL,
    run_id TEXT NOT NULL,
    workflow TEXT NOT NULL,
    status TEXT NOT NULL,
    input TEXT NOT NULL,
    state TEXT NOT NULL,
    step TEXT,
    visit INTEGER NOT NULL,
    pending TEXT NOT NULL,
    decisions TEXT NOT NULL,
    output TEXT NOT NULL,
    error TEXT NOT NULL,
    usage TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    event_count INTEGER NOT NULL,
    lease_owner TEXT,
    lease_token INTEGER NOT NULL,
    lease_expires REAL NOT NULL,
    control TEXT,
    deadline REAL,
    expires_at REAL,
    UNIQUE (ns, run_id)
);
CREATE INDEX IF NOT EXISTS {RUNS}_by_workflow ON {RUNS} (ns, workflow, created_at);
CREATE INDEX IF NOT EXISTS {RUNS}_gates ON {RUNS} (ns, workflow, status, deadline);
CREATE TABLE IF NOT EXISTS {EVENTS} (
    ns TEXT NOT NULL, run_id TEXT NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (ns, run_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {OUTPUTS} (
    id INTEGER PRIMARY KEY, ns TEXT NOT NULL, run_id TEXT NOT NULL, body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS {OUTPUTS}_by_run ON {OUTPUTS} (ns, run_id, id);
CREATE TABLE IF NOT EXISTS {JOURNAL} (
    ns TEXT NOT NULL, run_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (ns, run_id, key)
) WITHOUT ROWID;
COMMIT;
"""

_COLS = ", ".join(RECORD_FIELDS)
_LIVE = "(expires_at IS NULL OR expires_at > ?)"
_FINAL_SQL = "(" + ", ".join(f"'{s.value}'" for s in sorted(FINAL)) + ")"
_SELECT = f"SELECT {_COLS} FROM {RUNS} WHERE ns = ? AND run_id = ? AND {_LIVE}"
_INSERT_RUN = (
    f"INSERT INTO {RUNS} ({_COLS}, ns, deadline, expires_at) "
    f"VALUES ({', '.join('?' * (len(RECORD_FIELDS) + 3))})"
)
_UPDATE_RUN = (
    f"UPDATE {RUNS} SET {', '.join(f'{c} = ?' for c in RECORD_FIELDS)}, deadline = ?, "
    "expires_at = COALESCE(?, expires_at) WHERE ns = ? AND run_id = ?"
)
_INSERT_EVENT = f"INSERT INTO {EVENTS} (ns, run_id, seq, body) VALUES (?, ?, ?, ?)"
_INSERT_OUTPUT = f"INSERT INTO {OUTPUTS} (ns, run_id, body) VALUES (?, ?, ?)"
_UPSERT_JOURNAL = (
    f"INSERT INTO {JOURNAL} (ns, run_id, key, value) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (ns, run_id, key) DO UPDATE SET value = excluded.value"
)

#: Seconds a contended writer waits for another connection's lock before failing.
BUSY_TIMEOUT = 10.0


class SqliteStore:
    """Keeps runs in one SQLite file (WAL mode); safe for several processes on one machine.

    The file is opened on first use. See the module docstring for the layout and the
    locking discipline.

    Args:
        path: the database file (created if missing).
        ttl: seconds a finished run is kept, or None to keep it.
        key_prefix: a namespace stored in every row; stores with different prefixes
            sharing a file never see each other's runs.
    """

    def __init__(self, path: str = "agentflow.db", ttl: float | None = None, key_prefix: str = "") -> None:
        self.path = path
        self.ttl = ttl
        self.key_prefix = key_prefix
        self._db: sqlite3.Connection | None = None
        self._closed = False
        self._next_purge = 0.0

    # -- plumbing ---------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            if self._closed:
                raise StoreError(f"the SQLite store on {self.path} is closed")
            # check_same_thread=False: a store may be handed from one event loop's thread
            # to another's (run_sync); calls never overlap, each completes inline.
            db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            try:
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")
                db.executescript(_SCHEMA)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    @contextmanager
    def _errors(self, what: str, run_id: str | None) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            subject = f"run {run_id}: " if run_id else ""
            raise StoreError(f"{subject}SQLite {what} on {self.path} failed: {exc}") from exc

    @contextmanager
    def _tx(self, what: str, run_id: str | None, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        with self._errors(what, run_id):
            db = self._conn()
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            try:
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _column(self, run_id: str, name: str, value: Any) -> Any:
        if name in _JSON:
            return encode(run_id, name, value).decode()
        if name == "status":
            return RunStatus(value).value
        return value

    def _values(self, rec: RunRecord) -> list[Any]:
        check_record(rec)
        return [self._column(rec.run_id, name, getattr(rec, name)) for name in RECORD_FIELDS]

    def _record(self, run_id: str, row: Sequence[Any]) -> RunRecord:
        values = {}
        for name, value in zip(RECORD_FIELDS, row, strict=True):
            values[name] = decode(run_id, f"{RUNS}.{name}", value) if name in _JSON else value
        return make_record(run_id, RUNS, values)

    def _expiry(self, status: Any, now: float) -> float | None:
        return now + self.ttl if self.ttl is not None and status in FINAL else None

    def _insert_events(
        self, db: sqlite3.Connection, run_id: str, first_seq: int, bodies: Sequence[str]
    ) -> None:
        if bodies:
            ns = self.key_prefix
            rows = [(ns, run_id, first_seq + i, body) for i, body in enumerate(bodies)]
            db.executemany(_INSERT_EVENT, rows)

    def _purge(self, db: sqlite3.Connection, now: float, run_id: str | None = None) -> None:
        """Delete expired runs (all of this namespace, or just ``run_id``) with their rows."""
        where, params = "ns = ? AND expires_at <= ?", [self.key_prefix, now]
        if run_id is not None:
            where, params = where + " AND run_id = ?", [*params, run_id]
        expired = f"SELECT ns, run_id FROM {RUNS} WHERE {where}"
        for table in (EVENTS, OUTPUTS, JOURNAL):
            db.execute(f"DELETE FROM {table} WHERE (ns, run_id) IN ({expired})", params)
        db.execute(f"DELETE FROM {RUNS} WHERE {where}", params)

    # -- the Store protocol -----------------------------------------------------------

    async def create(self, record: RunRecord, events: Sequence[RunEvent]) -> bool:
        """Store a new run; False (and nothing written) if the run id exists."""
        run_id, now = record.run_id, time.time()
        rec = dataclasses.replace(record, event_count=record.event_count + len(events))
        values = self._values(rec)
        bodies = [encode_event(run_id, e).decode() for e in events]
        with self._tx("create", run_id) as db:
            if now >= self._next_purge:
                # Expired runs are purged in bulk now and then, on the write path, so
                # reads stay read-only; until then they are merely invisible.
                self._purge(db, now)
                self._next_purge = now + min(self.ttl or 60.0, 60.0)
            row = db.execute(
                f"SELECT expires_at FROM {RUNS} WHERE ns = ? AND run_id = ?", (self.key_prefix, run_id)
            ).fetchone()
            if row is not None:
                if row[0] is None or row[0] > now:
                    return False
                self._purge(db, now, run_id)
            db.execute(
                _INSERT_RUN,
                [*values, self.key_prefix, deadline_of(rec.pending), self._expiry(rec.status, now)],
            )
            self._insert_events(db, run_id, 1, bodies)
        return True

    async def get(self, run_id: str) -> RunRecord | None:
        """The run's record, or None."""
        with self._errors("get", run_id):
            row = self._conn().execute(_SELECT, (self.key_prefix, run_id, time.time())).fetchone()
        return None if row is None else self._record(run_id, row)

    async def load(self, run_id: str) -> LoadedRun | None:
        """The record with its outputs and journal, read in one snapshot; or None."""
        ns = self.key_prefix
        with self._tx("load", run_id, write=False) as db:
            row = db.execute(_SELECT, (ns, run_id, time.time())).fetchone()
            if row is None:
                return None
            outputs = db.execute(
                f"SELECT body FROM {OUTPUTS} WHERE ns = ? AND run_id = ? ORDER BY id", (ns, run_id)
            ).fetchall()
            journal = db.execute(
                f"SELECT key, value FROM {JOURNAL} WHERE ns = ? AND run_id = ?", (ns, run_id)
            ).fetchall()
        return LoadedRun(
            self._record(run_id, row),
            [make_output(run_id, f"{OUTPUTS}.body", body) for (body,) in outputs],
            {key: decode(run_id, f"{JOURNAL}[{key}]", value) for key, value in journal},
        )

    async def commit(self, run_id: str, lease: Lease, commit: Commit) -> str | None:
        """Apply ``commit`` in one transaction if ``lease`` still holds; return the control flag.

        Raises:
            LeaseLostError: the token no longer matches; nothing was written.
            StoreError: a value cannot be encoded (nothing was written), or SQLite failed.
        """
        check_commit_fields(run_id, commit.fields)
        now = time.time()
        sets: list[str] = []
        params: list[Any] = []
        for name, value in commit.fields.items():
            sets.append(f"{name} = ?")
            params.append(self._column(run_id, name, value))
            if name == "pending":
                sets.append("deadline = ?")
                params.append(deadline_of(value))
        n = len(commit.events)
        sets += ["updated_at = ?", "event_count = event_count + ?"]
        params += [now, n]
        if commit.release:
            sets.append("lease_owner = NULL, lease_expires = 0.0")
        if self.ttl is not None:
            # The new status, or the current one when this commit does not set it.
            sets.append(
                f"expires_at = CASE WHEN COALESCE(?, status) IN {_FINAL_SQL} THEN ? ELSE expires_at END"
            )
            status = commit.fields.get("status")
            params += [None if status is None else RunStatus(status).value, now + self.ttl]
        # Encode everything before the transaction: a bad value must not leave one open.
        events = [encode_event(run_id, e).decode() for e in commit.events]
        ns = self.key_prefix
        outputs = [(ns, run_id, encode_output(run_id, o).decode()) for o in commit.outputs]
        journal = [
            (ns, run_id, k, encode(run_id, f"journal {k!r}", v).decode()) for k, v in commit.journal.items()
        ]
        sql = (
            f"UPDATE {RUNS} SET {', '.join(sets)} WHERE ns = ? AND run_id = ? AND lease_owner = ? "
            f"AND lease_token = ? AND {_LIVE} RETURNING event_count, control"
        )
        params += [ns, run_id, lease.owner, lease.token, now]
        with self._tx("commit", run_id) as db:
            rows = db.execute(sql, params).fetchall()
            if not rows:
                raise LeaseLostError(run_id, self._why_lost(db, run_id, lease, now))
            count, control = rows[0]
            self._insert_events(db, run_id, count - n + 1, events)
            if outputs:
                db.executemany(_INSERT_OUTPUT, outputs)
            if journal:
                db.executemany(_UPSERT_JOURNAL, journal)
        return str(control) if control is not None else None

    def _why_lost(self, db: sqlite3.Connection, run_id: str, lease: Lease, now: float) -> str:
        row = db.execute(
            f"SELECT lease_owner, lease_token FROM {RUNS} WHERE ns = ? AND run_id = ? AND {_LIVE}",
            (self.key_prefix, run_id, now),
        ).fetchone()
        if row is None:
            return "the run no longer exists"
        return f"token {lease.token} of {lease.owner!r} is stale; the lease is {row[1]} of {row[0]!r}"

    async def renew(self, run_id: str, lease: Lease, ttl: float) -> str | None:
        """Extend the lease by ``ttl`` seconds from now; return the control flag.

        Raises:
            LeaseLostError: the token no longer matches.
        """
        now = time.time()
        with self._errors("renew", run_id):
            # One UPDATE statement takes the write lock up front, so it needs no BEGIN.
            rows = (
                self._conn()
                .execute(
                    f"UPDATE {RUNS} SET lease_expires = ? WHERE ns = ? AND run_id = ? AND lease_owner = ? "
                    f"AND lease_token = ? AND {_LIVE} RETURNING control",
                    (now + ttl, self.key_prefix, run_id, lease.owner, lease.token, now),
                )
                .fetchall()
            )
        if not rows:
            raise LeaseLostError(run_id, f"token {lease.token} is stale")
        control = rows[0][0]
        return str(control) if control is not None else None

    async def update(self, run_id: str, change: Callable[[RunRecord], Change | None]) -> RunRecord | None:
        """Read-modify-write the record under the database write lock.

        Other processes wait (up to the busy timeout) instead of conflicting, so
        ``change`` is called exactly once.
        """
        with self._tx("update", run_id) as db:
            now = time.time()
            row = db.execute(_SELECT, (self.key_prefix, run_id, now)).fetchone()
            if row is None:
                return None
            old = self._record(run_id, row)
            result = change(old)
            if result is None:
                return old
            rec = dataclasses.replace(
                result.record, updated_at=now, event_count=old.event_count + len(result.events)
            )
            values = self._values(rec)
            bodies = [encode_event(run_id, e).decode() for e in result.events]
            expires = self._expiry(rec.status, now)
            db.execute(_UPDATE_RUN, [*values, deadline_of(rec.pending), expires, self.key_prefix, run_id])
            self._insert_events(db, run_id, old.event_count + 1, bodies)
        return rec

    async def events(self, run_id: str, after: int = 0) -> list[RunEvent]:
        """The run's events with ``seq`` greater than ``after``, in order."""
        with self._errors("events", run_id):
            rows = (
                self._conn()
                .execute(
                    f"SELECT e.seq, e.body FROM {EVENTS} e JOIN {RUNS} r "
                    "ON r.ns = e.ns AND r.run_id = e.run_id WHERE e.ns = ? AND e.run_id = ? AND e.seq > ? "
                    "AND (r.expires_at IS NULL OR r.expires_at > ?) ORDER BY e.seq",
                    (self.key_prefix, run_id, after, time.time()),
                )
                .fetchall()
            )
        return [make_event(run_id, f"{EVENTS}[{seq}]", body, seq) for seq, body in rows]

    async def list_runs(
        self, workflow: str | None = None, status: RunStatus | None = None
    ) -> list[RunRecord]:
        """Records of the runs of ``workflow`` (all when None), oldest first."""
        where, params = f"ns = ? AND {_LIVE}", [self.key_prefix, time.time()]
        if workflow is not None:
            where, params = where + " AND workflow = ?", [*params, workflow]
        if status is not None:
            where, params = where + " AND status = ?", [*params, RunStatus(status).value]
        with self._errors("list_runs", None):
            rows = (
                self._conn()
                .execute(f"SELECT {_COLS} FROM {RUNS} WHERE {where} ORDER BY created_at, id", params)
                .fetchall()
            )
        return [self._record(str(row[0]), row) for row in rows]

    async def due_gates(self, workflow: str, now: float) -> list[str]:
        """Ids of runs of ``workflow`` waiting at a gate whose deadline is at or before ``now``."""
        with self._errors("due_gates", None):
            rows = (
                self._conn()
                .execute(
                    f"SELECT run_id FROM {RUNS} WHERE ns = ? AND workflow = ? AND status = ? "
                    f"AND deadline <= ? AND {_LIVE} ORDER BY deadline",
                    (self.key_prefix, workflow, RunStatus.WAITING.value, now, time.time()),
                )
                .fetchall()
            )
        return [str(run_id) for (run_id,) in rows]

    async def delete(self, run_id: str) -> bool:
        """Remove a run with its events, outputs and journal; False if it did not exist."""
        with self._tx("delete", run_id) as db:
            now = time.time()
            live = db.execute(
                f"SELECT 1 FROM {RUNS} WHERE ns = ? AND run_id = ? AND {_LIVE}",
                (self.key_prefix, run_id, now),
            ).fetchone()
            for table in (EVENTS, OUTPUTS, JOURNAL, RUNS):
                db.execute(f"DELETE FROM {table} WHERE ns = ? AND run_id = ?", (self.key_prefix, run_id))
        return live is not None

    async def close(self) -> None:
        """Close the database connection; the store is unusable afterwards."""
        self._closed = True
        if self._db is not None:
            db, self._db = self._db, None
            db.close()
