"""The SQLite store's tables and indexes, and the upgrade of files written by older layouts.

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

from ..errors import StoreError

__all__ = ["EVENTS", "JOURNAL", "OUTPUTS", "RUNS", "VALUES", "VERSION", "ensure_schema"]

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
