"""The SQLite store's tables, indexes and statements, rows to records, and the upgrade of old files.

Layout (schema version 2, kept in ``PRAGMA user_version``)::

    agentflow_runs      the hot row of a run: one column per small RunRecord field
                        (JSON text for pending, decisions, error, usage), plus
                        ``deadline`` (the waiting gate's, for due_gates) and
                        ``expires_at`` (set when a finished run has a ttl)
    agentflow_values    (ns, run_id, field) -> JSON text, for the big fields: input,
                        state, output. Written only when that field changes, so a step
                        that leaves a 1 MB state alone does not rewrite it (SQLite
                        rewrites the whole row on UPDATE).
    agentflow_events    (ns, run_id, seq) -> event JSON; seq is the 1-based position
    agentflow_outputs   step outputs in append order
    agentflow_journal   (ns, run_id, key) -> JSON value

Indexes make every listing cost what it returns: newest first overall, by workflow,
by status and by both (``created_at``; the rowid breaks ties), running runs by lease
expiry, waiting runs by gate deadline, and finished runs by expiry (for the purge).
The last three are partial indexes, so a run leaves them when it leaves that status.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from ..errors import CorruptRecordError, StoreError
from ..types import FINAL, RunStatus
from .codec import RECORD_FIELDS, decode, encode, make_record
from .contract import RunRecord

__all__ = [
    "BIG",
    "BUSY_TIMEOUT",
    "EVENTS",
    "FINAL_VALUES",
    "HOT",
    "JOURNAL",
    "LIVE",
    "OUTPUTS",
    "RENEW",
    "RUNS",
    "SELECT_CURSOR",
    "SELECT_DUE",
    "SELECT_EVENTS",
    "SELECT_EXPIRED",
    "SELECT_FENCE",
    "SELECT_FULL",
    "SELECT_JOURNAL",
    "SELECT_LEASE",
    "SELECT_LIGHT",
    "SELECT_LIVE",
    "SELECT_OUTPUTS",
    "SELECT_RECOVERABLE",
    "SELECT_STORED",
    "VALUES",
    "VERSION",
    "column",
    "connect",
    "delete_runs",
    "ensure_schema",
    "insert_rows",
    "insert_run",
    "listed",
    "to_record",
    "transaction",
]

RUNS, VALUES, EVENTS, OUTPUTS, JOURNAL = (
    "agentflow_runs",
    "agentflow_values",
    "agentflow_events",
    "agentflow_outputs",
    "agentflow_journal",
)

#: The layout this module creates; files with a higher ``user_version`` are refused.
VERSION = 2

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
)

_HOT = (
    "id, ns, run_id, workflow, status, step, visit, pending, decisions, error, usage, created_at, "
    "updated_at, event_count, lease_owner, lease_token, lease_expires, control, deadline, expires_at"
)

# Version 1 kept input, state and output in the run's row, had no commit marker, and
# indexes under names version 2 reuses with other definitions.
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


def connect(path: str, durability: str) -> sqlite3.Connection:
    """Open ``path`` in WAL mode with ``synchronous`` set from ``durability``; create the schema.

    Raises:
        StoreError: the file was written by a newer layout.
        sqlite3.Error: the file cannot be opened.
    """
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {'FULL' if durability == 'full' else 'NORMAL'}")
        if durability == "full":
            db.execute("PRAGMA fullfsync = ON")  # macOS: flush the drive's cache too
        ensure_schema(db, path)
    except BaseException:
        db.close()
        raise
    return db


def ensure_schema(db: sqlite3.Connection, path: str) -> None:
    """Create the tables and indexes, upgrading a version 1 file in place (one transaction).

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
            old = db.execute("SELECT 1 FROM pragma_table_info(?) WHERE name = 'input'", (RUNS,)).fetchone()
            for sql in _FROM_V1 if old else _TABLES:
                db.execute(sql)
            for sql in _INDEXES:
                db.execute(sql)
            db.execute(f"PRAGMA user_version = {VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


#: The big fields, kept in ``agentflow_values``; the others are the hot row's columns.
BIG = ("input", "state", "output")
HOT = tuple(f for f in RECORD_FIELDS if f not in BIG)
_JSON = frozenset({"pending", "decisions", "error", "usage", *BIG})
FINAL_VALUES = frozenset(s.value for s in FINAL)
#: The condition of a run that has not expired; its parameter is now.
LIVE = "(expires_at IS NULL OR expires_at > ?)"
_VALUE = f"(SELECT value FROM {VALUES} v WHERE v.ns = r.ns AND v.run_id = r.run_id AND v.field = '{{}}')"
_COLUMNS = f"{', '.join(HOT)}, {', '.join(_VALUE.format(f) for f in BIG)}"
SELECT_LIGHT = f"SELECT {', '.join(HOT)} FROM {RUNS}"
#: One statement, so one snapshot: the hot row and the big values of one live run.
SELECT_FULL = f"SELECT {_COLUMNS} FROM {RUNS} r WHERE ns = ? AND run_id = ? AND {LIVE}"
#: ``expires_at``, then what ``SELECT_FULL`` reads, expired or not.
SELECT_STORED = f"SELECT expires_at, {_COLUMNS} FROM {RUNS} r WHERE ns = ? AND run_id = ?"
#: What a commit checks before it writes: the fence, the last commit and the counters.
SELECT_FENCE = (
    f"SELECT id, lease_owner, lease_token, commit_token, commit_seq, event_count, control, status "
    f"FROM {RUNS} WHERE ns = ? AND run_id = ? AND {LIVE}"
)
SELECT_LEASE = f"SELECT lease_owner, lease_token FROM {RUNS} WHERE ns = ? AND run_id = ? AND {LIVE}"
SELECT_OUTPUTS = f"SELECT body FROM {OUTPUTS} WHERE ns = ? AND run_id = ? ORDER BY id"
SELECT_JOURNAL = f"SELECT key, value FROM {JOURNAL} WHERE ns = ? AND run_id = ?"
SELECT_EVENTS = (
    f"SELECT e.seq, e.body FROM {EVENTS} e JOIN {RUNS} r ON r.ns = e.ns AND r.run_id = e.run_id "
    "WHERE e.ns = ? AND e.run_id = ? AND e.seq > ? AND (r.expires_at IS NULL OR r.expires_at > ?) "
    "ORDER BY e.seq"
)
SELECT_CURSOR = f"SELECT created_at, id FROM {RUNS} WHERE ns = ? AND run_id = ?"
SELECT_RECOVERABLE = (
    f"SELECT run_id FROM {RUNS} WHERE ns = ? AND workflow = ? AND status = 'running' "
    f"AND lease_expires <= ? AND {LIVE} ORDER BY lease_expires LIMIT ?"
)
SELECT_DUE = (
    f"SELECT run_id FROM {RUNS} WHERE ns = ? AND workflow = ? AND status = 'waiting' "
    f"AND deadline IS NOT NULL AND deadline <= ? AND {LIVE} ORDER BY deadline"
)
SELECT_EXPIRED = (
    f"SELECT run_id FROM {RUNS} WHERE ns = ? AND expires_at IS NOT NULL AND expires_at <= ? LIMIT ?"
)
SELECT_LIVE = f"SELECT 1 FROM {RUNS} WHERE ns = ? AND run_id = ? AND {LIVE}"
#: One statement takes the write lock up front, so a renewal needs no BEGIN.
RENEW = (
    f"UPDATE {RUNS} SET lease_expires = ? WHERE ns = ? AND run_id = ? AND lease_owner = ? "
    f"AND lease_token = ? AND {LIVE} RETURNING control"
)
_INSERT_RUN = (
    f"INSERT INTO {RUNS} ({', '.join(HOT)}, ns, deadline, expires_at) "
    f"VALUES ({', '.join('?' * (len(HOT) + 3))})"
)
_INSERT_EVENT = f"INSERT INTO {EVENTS} (ns, run_id, seq, body) VALUES (?, ?, ?, ?)"
_INSERT_OUTPUT = f"INSERT INTO {OUTPUTS} (ns, run_id, body) VALUES (?, ?, ?)"
_UPSERT_JOURNAL = (
    f"INSERT INTO {JOURNAL} (ns, run_id, key, value) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (ns, run_id, key) DO UPDATE SET value = excluded.value"
)
# An unchanged value (the same JSON) is not written again.
_UPSERT_VALUE = (
    f"INSERT INTO {VALUES} (ns, run_id, field, value) VALUES (?, ?, ?, ?) ON CONFLICT (ns, run_id, field) "
    "DO UPDATE SET value = excluded.value WHERE value IS NOT excluded.value"
)


@contextmanager
def transaction(db: sqlite3.Connection, write: bool = True) -> Iterator[None]:
    """One transaction: committed when the block ends, rolled back if it raises.

    A write transaction takes the write lock before its first read (``BEGIN IMMEDIATE``).
    """
    db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def column(run_id: str, name: str, value: Any) -> Any:
    """The stored form of one RunRecord field: JSON text, a status's value, or the value.

    Raises:
        StoreError: the value is not JSON-able (names the run and the field).
    """
    if name in _JSON:
        return encode(run_id, name, value).decode()
    if name == "status":
        return RunStatus(value).value
    return value


def to_record(row: Sequence[Any], light: bool) -> RunRecord:
    """The record of a ``SELECT_FULL`` row, or a light one (no big values) of a ``SELECT_LIGHT`` row.

    Raises:
        CorruptRecordError: a field cannot be decoded (names the run and the field).
    """
    run_id = str(row[0])
    values: dict[str, Any] = {}
    for name, value in zip(HOT, row, strict=False):
        values[name] = decode(run_id, f"{RUNS}.{name}", value) if name in _JSON else value
    if light:
        values["input"] = None
    else:
        for name, value in zip(BIG, row[len(HOT) :], strict=True):
            values[name] = None if value is None else decode(run_id, f"{VALUES}[{name}]", value)
    return make_record(run_id, RUNS, values)


def listed(row: Sequence[Any]) -> RunRecord:
    """A light record; a damaged row is listed with ``corrupt`` set instead of raising."""
    try:
        return to_record(row, light=True)
    except CorruptRecordError as exc:
        cols = dict(zip(HOT, row, strict=True))
        try:
            status = RunStatus(cols["status"])
        except ValueError:
            status = RunStatus.FAILED
        created = cols["created_at"] if isinstance(cols["created_at"], int | float) else 0.0
        return RunRecord(
            run_id=str(cols["run_id"]),
            workflow=str(cols["workflow"]),
            status=status,
            input=None,
            created_at=float(created),
            updated_at=float(created),
            corrupt=str(exc),
        )


def insert_run(db: sqlite3.Connection, ns: str, hot: Sequence[Any], deadline: Any, expires: Any) -> None:
    """Insert a run's hot row: ``hot`` holds the ``HOT`` columns in order."""
    db.execute(_INSERT_RUN, [*hot, ns, deadline, expires])


def insert_rows(
    db: sqlite3.Connection,
    ns: str,
    run_id: str,
    first_seq: int,
    events: Sequence[str],
    big: Mapping[str, str],
    outputs: Sequence[str] = (),
    journal: Mapping[str, str] | None = None,
) -> None:
    """Append events (numbered from ``first_seq``) and outputs; write big values and journal entries."""
    if events:
        db.executemany(_INSERT_EVENT, [(ns, run_id, first_seq + i, e) for i, e in enumerate(events)])
    if big:
        db.executemany(_UPSERT_VALUE, [(ns, run_id, name, value) for name, value in big.items()])
    if outputs:
        db.executemany(_INSERT_OUTPUT, [(ns, run_id, body) for body in outputs])
    if journal:
        db.executemany(_UPSERT_JOURNAL, [(ns, run_id, key, value) for key, value in journal.items()])


def delete_runs(db: sqlite3.Connection, ns: str, run_ids: Sequence[str]) -> None:
    """Delete the runs and every row stored with them."""
    rows = [(ns, run_id) for run_id in run_ids]
    for table in (EVENTS, OUTPUTS, JOURNAL, VALUES, RUNS):
        db.executemany(f"DELETE FROM {table} WHERE ns = ? AND run_id = ?", rows)
