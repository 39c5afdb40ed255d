"""The SQLite store's tables, indexes and statements, rows to records, and the upgrade of old files.

Layout (schema version 7, kept in ``PRAGMA user_version``)::

    agentflow_runs      the hot row of a run: one column per small RunRecord field
                        (JSON text for pending, decisions, error, usage, parent,
                        children), plus
                        ``deadline`` (the waiting gate's, for due_gates),
                        ``expires_at`` (set when a finished run has a ttl), and
                        ``input``, ``state``, ``output`` when their JSON is short
    agentflow_values    (ns, run_id, field) -> JSON text, for the big fields (input,
                        state, output) whose JSON is longer than ``INLINE_MAX``.
                        Written only when that field changes, so a step that leaves a
                        1 MB state alone does not rewrite it (SQLite rewrites the whole
                        row on UPDATE). A row here wins over the hot row's column.
    agentflow_events    (ns, run_id, seq) -> event JSON; seq is the 1-based position
    agentflow_outputs   step outputs in append order
    agentflow_journal   (ns, run_id, key) -> JSON value
    agentflow_approvals (ns, id) -> an approval's JSON, with its run, workflow, kind
                        and created_at: a row per approval a waiting run's ``pending``
                        holds (``pending = 1``), written with ``pending``; a decided
                        one stays (``pending = 0``) until its run goes, so a page can
                        start after it
    agentflow_approvers (ns, approver, created_at, id): who may decide each pending one
    agentflow_queue     the hand-over of runs to workers: one row per entry, claimed by
                        setting ``claimed_by``/``claimed_at``, deleted when acknowledged
    agentflow_credentials (ns, key) -> JSON text: small records kept beside the runs
                        (the review page's reviewers and session key)

A short value rides in the hot row, which a commit rewrites anyway: a step whose state
is a few counters writes two pages (the row and its events), not three. When a value
grows past ``INLINE_MAX`` it moves to ``agentflow_values`` (and the column is cleared);
when it shrinks back, its row there is deleted.

Indexes make every listing cost what it returns: newest first overall, by workflow,
by status and by both (``created_at``; the rowid breaks ties), running runs by lease
expiry, waiting runs by gate deadline, and finished runs by expiry (for the purge).
The last three are partial indexes, so a run leaves them when it leaves that status.
"""

from __future__ import annotations

import sqlite3
import time

from ..errors import CorruptRecordError, StoreError
from .codec import decode

__all__ = [
    "APPROVALS",
    "APPROVERS",
    "BIG",
    "BUSY_TIMEOUT",
    "CHECKPOINT_WAIT",
    "CREDENTIALS",
    "EVENTS",
    "JOURNAL",
    "OUTPUTS",
    "QUEUE",
    "RUNS",
    "STATEMENTS",
    "VALUES",
    "VERSION",
    "checkpoint",
    "checkpoint_behind",
    "connect",
    "connect_checkpointer",
    "connect_inline",
    "ensure_schema",
]

RUNS, VALUES, EVENTS, OUTPUTS, JOURNAL, APPROVALS, APPROVERS, QUEUE = (
    "agentflow_runs",
    "agentflow_values",
    "agentflow_events",
    "agentflow_outputs",
    "agentflow_journal",
    "agentflow_approvals",
    "agentflow_approvers",
    "agentflow_queue",
)
CREDENTIALS = "agentflow_credentials"

#: The layout this module creates; files with a higher ``user_version`` are refused.
VERSION = 7

_CREDENTIALS = (
    f"""CREATE TABLE IF NOT EXISTS {CREDENTIALS} (
        ns TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (ns, key)
    ) WITHOUT ROWID""",
)

_QUEUE = (
    f"""CREATE TABLE IF NOT EXISTS {QUEUE} (
        id INTEGER PRIMARY KEY AUTOINCREMENT, ns TEXT NOT NULL, workflow TEXT NOT NULL,
        run_id TEXT NOT NULL, enqueued_at REAL NOT NULL, claimed_by TEXT, claimed_at REAL
    )""",
    f"CREATE INDEX IF NOT EXISTS {QUEUE}_next ON {QUEUE} (ns, workflow, claimed_at, id)",
)

_TABLES = (
    f"""CREATE TABLE IF NOT EXISTS {RUNS} (
        id INTEGER PRIMARY KEY,
        ns TEXT NOT NULL,
        run_id TEXT NOT NULL,
        workflow TEXT NOT NULL,
        status TEXT NOT NULL,
        step TEXT,
        visit INTEGER NOT NULL,
        pending TEXT NOT NULL,
        decisions TEXT NOT NULL,
        error TEXT NOT NULL,
        usage TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        event_count INTEGER NOT NULL,
        lease_owner TEXT,
        lease_token INTEGER NOT NULL,
        lease_expires REAL NOT NULL,
        control TEXT,
        commit_token INTEGER NOT NULL DEFAULT 0,
        commit_seq INTEGER NOT NULL DEFAULT 0,
        deadline REAL,
        expires_at REAL,
        input TEXT,
        state TEXT,
        output TEXT,
        parent TEXT NOT NULL DEFAULT 'null',
        children TEXT NOT NULL DEFAULT '[]',
        version TEXT NOT NULL DEFAULT '1',
        UNIQUE (ns, run_id)
    )""",
    f"""CREATE TABLE IF NOT EXISTS {VALUES} (
        ns TEXT NOT NULL, run_id TEXT NOT NULL, field TEXT NOT NULL, value TEXT NOT NULL,
        PRIMARY KEY (ns, run_id, field)
    )""",
    f"""CREATE TABLE IF NOT EXISTS {EVENTS} (
        ns TEXT NOT NULL, run_id TEXT NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL,
        PRIMARY KEY (ns, run_id, seq)
    ) WITHOUT ROWID""",
    f"""CREATE TABLE IF NOT EXISTS {OUTPUTS} (
        id INTEGER PRIMARY KEY, ns TEXT NOT NULL, run_id TEXT NOT NULL, body TEXT NOT NULL
    )""",
    f"""CREATE TABLE IF NOT EXISTS {JOURNAL} (
        ns TEXT NOT NULL, run_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
        PRIMARY KEY (ns, run_id, key)
    ) WITHOUT ROWID""",
    f"""CREATE TABLE IF NOT EXISTS {APPROVALS} (
        ns TEXT NOT NULL, id TEXT NOT NULL, run_id TEXT NOT NULL, workflow TEXT NOT NULL,
        kind TEXT NOT NULL, created_at REAL NOT NULL, body TEXT NOT NULL, pending INTEGER NOT NULL,
        PRIMARY KEY (ns, id)
    ) WITHOUT ROWID""",
    f"""CREATE TABLE IF NOT EXISTS {APPROVERS} (
        ns TEXT NOT NULL, approver TEXT NOT NULL, created_at REAL NOT NULL, id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        PRIMARY KEY (ns, approver, created_at, id)
    ) WITHOUT ROWID""",
)

# The partial indexes name their status as a literal: SQLite uses a partial index only
# for a query whose WHERE contains the index's condition as written.
_INDEXES = (
    f"CREATE INDEX IF NOT EXISTS {RUNS}_by_created ON {RUNS} (ns, created_at)",
    f"CREATE INDEX IF NOT EXISTS {RUNS}_by_workflow ON {RUNS} (ns, workflow, created_at)",
    f"CREATE INDEX IF NOT EXISTS {RUNS}_by_status ON {RUNS} (ns, status, created_at)",
    f"CREATE INDEX IF NOT EXISTS {RUNS}_by_workflow_status ON {RUNS} (ns, workflow, status, created_at)",
    f"CREATE INDEX IF NOT EXISTS {RUNS}_leases ON {RUNS} (ns, workflow, lease_expires) "
    "WHERE status = 'running'",
    f"CREATE INDEX IF NOT EXISTS {RUNS}_due ON {RUNS} (ns, workflow, deadline) "
    "WHERE status = 'waiting' AND deadline IS NOT NULL",
    f"CREATE INDEX IF NOT EXISTS {RUNS}_expiry ON {RUNS} (ns, expires_at) WHERE expires_at IS NOT NULL",
    f"CREATE INDEX IF NOT EXISTS {OUTPUTS}_by_run ON {OUTPUTS} (ns, run_id, id)",
    f"CREATE INDEX IF NOT EXISTS {APPROVALS}_pending ON {APPROVALS} (ns, created_at, id) WHERE pending = 1",
    f"CREATE INDEX IF NOT EXISTS {APPROVALS}_by_workflow ON {APPROVALS} (ns, workflow, created_at, id) "
    "WHERE pending = 1",
    f"CREATE INDEX IF NOT EXISTS {APPROVALS}_by_kind ON {APPROVALS} (ns, kind, created_at, id) "
    "WHERE pending = 1",
    # With pending: an index on (ns, run_id) alone is not used by the UPDATE that sets it.
    f"CREATE INDEX IF NOT EXISTS {APPROVALS}_of_run ON {APPROVALS} (ns, run_id, pending)",
    f"CREATE INDEX IF NOT EXISTS {APPROVERS}_by_run ON {APPROVERS} (ns, run_id)",
)

_HOT = (
    "id, ns, run_id, workflow, status, step, visit, pending, decisions, error, usage, created_at, "
    "updated_at, event_count, lease_owner, lease_token, lease_expires, control, deadline, expires_at"
)

# Version 6 had no workflow version per run: its runs read as version "1".
_FROM_V6 = (f"ALTER TABLE {RUNS} ADD COLUMN version TEXT NOT NULL DEFAULT '1'",)
# Version 5 had no credentials (the table is made on every upgrade, below).
_FROM_V5: tuple[str, ...] = _FROM_V6
# Version 4 had no work queue.
_FROM_V4 = (*_QUEUE, *_FROM_V6)
# Version 3 had no parent, children nor approval index (the new tables are in _TABLES).
_FROM_V3 = (
    f"ALTER TABLE {RUNS} ADD COLUMN parent TEXT NOT NULL DEFAULT 'null'",
    f"ALTER TABLE {RUNS} ADD COLUMN children TEXT NOT NULL DEFAULT '[]'",
    *_FROM_V6,
    *_TABLES,
)
# Version 2 kept every input, state and output in agentflow_values.
_FROM_V2 = (
    *(f"ALTER TABLE {RUNS} ADD COLUMN {name} TEXT" for name in ("input", "state", "output")),
    *_FROM_V3,
)
# Version 1 kept input, state and output in the run's row (NOT NULL, 'null' for None),
# had no commit marker, and indexes under names version 2 reuses with other definitions.
_FROM_V1 = (
    f"DROP INDEX IF EXISTS {RUNS}_by_workflow",
    f"DROP INDEX IF EXISTS {RUNS}_gates",
    f"ALTER TABLE {RUNS} RENAME TO {RUNS}_v1",
    *_TABLES,
    f"INSERT INTO {RUNS} ({_HOT}) SELECT {_HOT} FROM {RUNS}_v1",
    *(
        f"INSERT INTO {VALUES} (ns, run_id, field, value) SELECT ns, run_id, '{name}', {name} "
        f"FROM {RUNS}_v1 WHERE {name} IS NOT NULL AND {name} != 'null'"
        for name in ("input", "state", "output")
    ),
    f"DROP TABLE {RUNS}_v1",
)


#: Seconds a contended writer waits for another connection's lock before failing.
BUSY_TIMEOUT = 10.0
#: Seconds a checkpoint waits for the write lock, and then for readers to leave the WAL.
CHECKPOINT_WAIT = 0.05
#: Prepared statements a connection keeps: commits and updates build theirs from the
#: fields they set, so there are more than the hundred-odd fixed ones.
STATEMENTS = 512


def connect(path: str, durability: str) -> sqlite3.Connection:
    """Open ``path`` in WAL mode with ``synchronous`` set from ``durability``; create the schema.

    Raises:
        StoreError: the file was written by a newer layout.
        sqlite3.Error: the file cannot be opened.
    """
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None, cached_statements=STATEMENTS)
    try:
        _wal(db)
        db.execute(f"PRAGMA synchronous = {'FULL' if durability == 'full' else 'NORMAL'}")
        if durability == "full":
            db.execute("PRAGMA fullfsync = ON")  # macOS: flush the drive's cache too
        ensure_schema(db, path)
    except BaseException:
        db.close()
        raise
    return db


def _wal(db: sqlite3.Connection) -> None:
    """Switch to WAL mode, waiting out another connection that is switching the same new file.

    Changing the journal mode does not wait on ``busy_timeout``: two stores opening a new
    file at once could see "database is locked". It is retried for up to ``BUSY_TIMEOUT``.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT
    delay = 0.001
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF not in (5, 6) or time.monotonic() >= deadline:  # BUSY, LOCKED
                raise
        time.sleep(delay)  # the store's thread: the event loop never waits here
        delay = min(delay * 2, 0.05)


def connect_inline(path: str) -> sqlite3.Connection:
    """Open ``path`` (made ready by :func:`connect`) for calls made on the event loop's thread.

    Such a call never waits: ``busy_timeout`` is 0, so a write that finds the lock held
    fails at once with SQLITE_BUSY (and the caller hands it to the store's thread), and
    automatic checkpoints are off (they flush the disk: the store's thread runs them).
    ``synchronous=NORMAL``: what this connection writes at ``durability="full"`` (lease
    renewals) is never flushed. Opened by the store's thread, used by the loop's.
    """
    db = sqlite3.connect(
        path, timeout=0, isolation_level=None, check_same_thread=False, cached_statements=STATEMENTS
    )
    try:
        db.execute("PRAGMA wal_autocheckpoint = 0")
        db.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        db.close()
        raise
    return db


def connect_checkpointer(path: str, durability: str) -> sqlite3.Connection:
    """Open ``path`` for :func:`checkpoint`: locks are waited for ``CHECKPOINT_WAIT`` at most."""
    db = sqlite3.connect(path, timeout=CHECKPOINT_WAIT, isolation_level=None)
    try:
        db.execute(f"PRAGMA synchronous = {'FULL' if durability == 'full' else 'NORMAL'}")
    except BaseException:
        db.close()
        raise
    return db


def checkpoint_behind(db: sqlite3.Connection) -> None:
    """Copy what the WAL holds into the database without taking the write lock.

    Writers go on meanwhile, so it never starts the WAL over; run before
    :func:`checkpoint`, it leaves that one (which holds the lock) only what was written
    while it ran to copy.
    """
    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def checkpoint(db: sqlite3.Connection) -> None:
    """Copy the WAL into the database, so that the next writer starts the WAL over.

    A passive checkpoint never catches up with a writer that does not pause: the WAL
    would only grow. A restarting one takes the write lock (other writers wait), copies
    the WAL and waits for readers to leave it, so the next write starts it over; on a
    connection of :func:`connect_checkpointer`, each wait is bounded by
    ``CHECKPOINT_WAIT``, and a checkpoint that could not finish is taken up by the next.
    """
    db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()


def ensure_schema(db: sqlite3.Connection, path: str) -> None:
    """Create the tables and indexes, upgrading an older file in place (one transaction).

    Raises:
        StoreError: the file was written by a newer layout than this one.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > VERSION:
            raise StoreError(
                f"SQLite file {path} has agentflow schema version {version}; this agentflow reads up "
                f"to {VERSION}: upgrade agentflow"
            )
        if version < VERSION:
            steps: tuple[str, ...]
            if version == 6:
                steps = _FROM_V6
            elif version == 5:
                steps = _FROM_V5
            elif version == 4:
                steps = _FROM_V4
            elif version == 3:
                steps = _FROM_V3
            elif version == 2:
                steps = _FROM_V2
            else:  # a file of version 1 (which set no version) has the big fields in its rows
                v1 = db.execute("SELECT 1 FROM pragma_table_info(?) WHERE name = 'input'", (RUNS,)).fetchone()
                steps = _FROM_V1 if v1 else _TABLES
            for sql in (*steps, *_QUEUE, *_CREDENTIALS):
                db.execute(sql)
            for sql in _INDEXES:
                db.execute(sql)
            if version < 4:  # version 4 has the approval index already
                _index_waiting_runs(db)
            db.execute(f"PRAGMA user_version = {VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _index_waiting_runs(db: sqlite3.Connection) -> None:
    """File the approvals of the runs an older file has waiting (version 4 indexes them)."""
    from . import sqlite_index  # the approval index builds on this module

    waiting = db.execute(f"SELECT ns, run_id, workflow, pending FROM {RUNS} WHERE status = 'waiting'")
    for ns, run_id, workflow, pending in waiting.fetchall():
        try:
            value = decode(run_id, "pending", pending)
        except CorruptRecordError:
            continue  # read as damaged, with the run
        rows = sqlite_index.approval_rows(run_id, workflow, "waiting", value)
        sqlite_index.file_approvals(db, ns, run_id, rows)


#: The big fields: in the hot row when short, else in ``agentflow_values``.
BIG = ("input", "state", "output")
