"""The PostgreSQL store's tables and indexes, and their creation and upgrade on first use.

Layout (schema version 6, kept in ``agentflow_schema``)::

    agentflow_schema     one row: the version of the layout below
    agentflow_runs       one row per run, primary key (ns, run_id): a column per
                         RunRecord field (JSON text for input, state, output, pending,
                         decisions, error, usage, parent, children), plus
                         ``id`` (ties in listings), ``deadline`` (the waiting gate's, for
                         due_gates), ``expires_at`` (a finished run with a ttl), and the
                         nonces of the create (``created_by``) and of the last update
                         (``written_by``) that make a write sent again after a lost reply
                         apply once
    agentflow_events     (ns, run_id, seq) -> event JSON; seq is the 1-based position
    agentflow_outputs    step outputs in append order (``id``)
    agentflow_journal    (ns, run_id, key) -> JSON value
    agentflow_approvals  (ns, id) -> an approval's JSON with its run, workflow, kind and
                         created_at: a row per approval a waiting run's ``pending`` holds
                         (``pending``), filed in the transaction that writes the run; a
                         decided one stays (not pending) until its run goes, so a page can
                         start after it
    agentflow_approvers  (ns, approver, created_at, id): who may decide each pending one
    agentflow_queue      the hand-over of runs to workers (version 2, below)
    agentflow_credentials (ns, key) -> JSON text: small records kept beside the runs (the
                         review page's reviewers and session key; version 3)

Every table but the first carries ``ns`` (the key prefix) and every query filters on
it, so stores with different prefixes share a database without building table names
from user text; a store also lives in whatever schema the connection's ``search_path``
names first (``options=-csearch_path=NAME`` in the URL). A run's rows in the other
tables are deleted with its row, in the same statement (``postgres_rows.DELETE``).

JSON is stored as ``text``, not ``jsonb``: it comes back byte for byte as written
(key order, numbers), and nothing is parsed in the database. Large values are moved
out of the row by TOAST, and an UPDATE that leaves such a column alone does not copy
it, so a step that leaves a 1 MB state alone does not rewrite it.

Indexes make every listing cost what it returns: newest first overall, by workflow,
by status and by both, running runs by workflow, waiting runs by gate deadline,
finished runs by expiry (the purge), pending approvals by each filter. The last ones
are partial indexes, so a run leaves them when it leaves that status.

Upgrades. ``ensure_schema`` creates the tables of a new database and brings an older
layout to ``VERSION`` in one transaction under an advisory lock, so processes starting
together do not race; a database written by a newer layout is refused. Version 2 added
the workers' hand-over queue (``agentflow_queue``, claimed with ``FOR UPDATE SKIP
LOCKED``) and a trigger that notifies ``agentflow_changes`` when a run's status, pending
approvals or control flag change (a step or a lease renewal notifies nobody). Version 3
added ``agentflow_credentials``. Version 4 added the workflow version a run is at
(``version``; the runs of an older database read as ``'1'``). Version 5 made a step's
writes cheaper: the running runs' index leaves out ``lease_expires``, so taking a run
and renewing its lease are heap-only updates that touch no index, and the notifying
trigger's condition is a ``WHEN`` clause. Version 6 dropped the foreign keys from the
other tables to the run's row, and split the queue's index by claim time into two
partial ones, of the unclaimed entries and of the claimed (see ``_V6``).
"""

from __future__ import annotations

from typing import Any

from ..errors import StoreError

__all__ = [
    "APPROVALS",
    "APPROVERS",
    "EVENTS",
    "JOURNAL",
    "NOW",
    "OUTPUTS",
    "CHANGES",
    "CREDENTIALS",
    "QUEUE",
    "QUEUED",
    "RUNS",
    "RUN_TABLES",
    "SCHEMA",
    "ANALYZE_AFTER",
    "VERSION",
    "analyze_if_never",
    "ensure_schema",
]

SCHEMA, RUNS, EVENTS, OUTPUTS, JOURNAL, APPROVALS, APPROVERS, QUEUE = (
    "agentflow_schema",
    "agentflow_runs",
    "agentflow_events",
    "agentflow_outputs",
    "agentflow_journal",
    "agentflow_approvals",
    "agentflow_approvers",
    "agentflow_queue",
)
CREDENTIALS = "agentflow_credentials"
#: The tables holding rows of a run beside its own (deleted with it: see ``_V6``).
RUN_TABLES = (EVENTS, OUTPUTS, JOURNAL, APPROVALS, APPROVERS)

#: The layout this module creates; databases with a higher version are refused.
VERSION = 6

#: The channels the store notifies on: a run was written (payload ``[ns, run_id]`` as
#: JSON), and an entry was queued for workers (payload ``[ns, workflow]``).
CHANGES, QUEUED = "agentflow_changes", "agentflow_queued"

#: The database's clock in Unix seconds. ``statement_timestamp()`` is stable within a
#: statement, so a condition on it can use an index (``clock_timestamp()`` could not).
NOW = "extract(epoch from statement_timestamp())::float8"

_RUN = "FOREIGN KEY (ns, run_id) REFERENCES agentflow_runs (ns, run_id) ON DELETE CASCADE"

_V1 = (
    f"""CREATE TABLE {RUNS} (
        id bigint GENERATED ALWAYS AS IDENTITY,
        ns text NOT NULL,
        run_id text NOT NULL,
        workflow text NOT NULL,
        status text NOT NULL,
        input text,
        state text,
        step text,
        visit bigint NOT NULL,
        pending text NOT NULL,
        decisions text NOT NULL,
        output text,
        error text NOT NULL,
        usage text NOT NULL,
        created_at float8 NOT NULL,
        updated_at float8 NOT NULL,
        event_count bigint NOT NULL,
        lease_owner text,
        lease_token bigint NOT NULL,
        lease_expires float8 NOT NULL,
        control text,
        commit_token bigint NOT NULL,
        commit_seq bigint NOT NULL,
        parent text NOT NULL,
        children text NOT NULL,
        deadline float8,
        expires_at float8,
        created_by text,
        written_by text,
        PRIMARY KEY (ns, run_id)
    )""",
    f"""CREATE TABLE {EVENTS} (
        ns text NOT NULL, run_id text NOT NULL, seq bigint NOT NULL, body text NOT NULL,
        PRIMARY KEY (ns, run_id, seq), {_RUN}
    )""",
    f"""CREATE TABLE {OUTPUTS} (
        ns text NOT NULL, run_id text NOT NULL, id bigint GENERATED ALWAYS AS IDENTITY,
        body text NOT NULL,
        PRIMARY KEY (ns, run_id, id), {_RUN}
    )""",
    f"""CREATE TABLE {JOURNAL} (
        ns text NOT NULL, run_id text NOT NULL, key text NOT NULL, value text NOT NULL,
        PRIMARY KEY (ns, run_id, key), {_RUN}
    )""",
    f"""CREATE TABLE {APPROVALS} (
        ns text NOT NULL, id text NOT NULL, run_id text NOT NULL, workflow text NOT NULL,
        kind text NOT NULL, created_at float8 NOT NULL, body text NOT NULL, pending boolean NOT NULL,
        PRIMARY KEY (ns, id), {_RUN}
    )""",
    f"""CREATE TABLE {APPROVERS} (
        ns text NOT NULL, approver text NOT NULL, created_at float8 NOT NULL, id text NOT NULL,
        run_id text NOT NULL,
        PRIMARY KEY (ns, approver, created_at, id), {_RUN}
    )""",
    f"CREATE INDEX {RUNS}_by_created ON {RUNS} (ns, created_at, id)",
    f"CREATE INDEX {RUNS}_by_workflow ON {RUNS} (ns, workflow, created_at, id)",
    f"CREATE INDEX {RUNS}_by_status ON {RUNS} (ns, status, created_at, id)",
    f"CREATE INDEX {RUNS}_by_workflow_status ON {RUNS} (ns, workflow, status, created_at, id)",
    f"CREATE INDEX {RUNS}_leases ON {RUNS} (ns, workflow, lease_expires) WHERE status = 'running'",
    f"CREATE INDEX {RUNS}_due ON {RUNS} (ns, workflow, deadline) "
    "WHERE status = 'waiting' AND deadline IS NOT NULL",
    f"CREATE INDEX {RUNS}_expiry ON {RUNS} (ns, expires_at) WHERE expires_at IS NOT NULL",
    f"CREATE INDEX {APPROVALS}_pending ON {APPROVALS} (ns, created_at, id) WHERE pending",
    f"CREATE INDEX {APPROVALS}_by_workflow ON {APPROVALS} (ns, workflow, created_at, id) WHERE pending",
    f"CREATE INDEX {APPROVALS}_by_kind ON {APPROVALS} (ns, kind, created_at, id) WHERE pending",
    f"CREATE INDEX {APPROVALS}_of_run ON {APPROVALS} (ns, run_id)",
    f"CREATE INDEX {APPROVERS}_of_run ON {APPROVERS} (ns, run_id)",
)

# Version 2: the work queue, and a notification when a run's status, pending approvals or
# control flag change, sent by the database when it commits. Not for every step: NOTIFY
# takes a lock every notifying commit waits on, which would serialize the steps of all
# runs (watchers of a run's events look at the store every 100 ms instead).
_V2 = (
    f"""CREATE TABLE {QUEUE} (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        ns text NOT NULL, workflow text NOT NULL, run_id text NOT NULL,
        enqueued_at float8 NOT NULL, claimed_by text, claimed_at float8
    )""",
    f"CREATE INDEX {QUEUE}_next ON {QUEUE} (ns, workflow, claimed_at, id)",
    f"""CREATE FUNCTION {RUNS}_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP = 'INSERT' OR NEW.status <> OLD.status OR NEW.pending <> OLD.pending
         OR NEW.control IS DISTINCT FROM OLD.control THEN
        PERFORM pg_notify('{CHANGES}', json_build_array(NEW.ns, NEW.run_id)::text);
      END IF;
      RETURN NULL;
    END $$""",
    f"CREATE TRIGGER {RUNS}_changed AFTER INSERT OR UPDATE ON {RUNS} "
    f"FOR EACH ROW EXECUTE FUNCTION {RUNS}_notify()",
)

# Version 3: credentials (the review page's reviewers and session key).
_V3 = (
    f"""CREATE TABLE {CREDENTIALS} (
        ns text NOT NULL, key text NOT NULL, value text NOT NULL, PRIMARY KEY (ns, key)
    )""",
)

# Version 4: the workflow version each run is at (``Workflow(..., version=)``).
_V4 = (f"ALTER TABLE {RUNS} ADD COLUMN version text NOT NULL DEFAULT '1'",)

# Version 5: cheaper writes of a step. A row update that changes no indexed column can be
# a heap-only tuple (HOT: no index is touched), so the running runs' index no longer holds
# ``lease_expires`` (taking a run and renewing its lease changed it, and so wrote every
# index of the table); the recoverer reads the running runs of the workflow, as many as
# are in flight, and compares their expiry. Pages keep a fifth free for those updates.
# The change notification is sent by a trigger whose WHEN clause PostgreSQL evaluates
# itself: a step's commit (no status, pending or control change) queues no trigger event
# and calls no PL/pgSQL.
_V5 = (
    f"DROP INDEX IF EXISTS {RUNS}_leases",
    f"CREATE INDEX IF NOT EXISTS {RUNS}_running ON {RUNS} (ns, workflow) WHERE status = 'running'",
    f"ALTER TABLE {RUNS} SET (fillfactor = 80)",
    f"DROP TRIGGER IF EXISTS {RUNS}_changed ON {RUNS}",
    f"DROP TRIGGER IF EXISTS {RUNS}_created ON {RUNS}",
    f"""CREATE OR REPLACE FUNCTION {RUNS}_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      PERFORM pg_notify('{CHANGES}', json_build_array(NEW.ns, NEW.run_id)::text);
      RETURN NULL;
    END $$""",
    f"CREATE TRIGGER {RUNS}_created AFTER INSERT ON {RUNS} FOR EACH ROW EXECUTE FUNCTION {RUNS}_notify()",
    f"CREATE TRIGGER {RUNS}_changed AFTER UPDATE ON {RUNS} FOR EACH ROW "
    "WHEN (NEW.status <> OLD.status OR NEW.pending <> OLD.pending "
    "OR NEW.control IS DISTINCT FROM OLD.control) "
    f"EXECUTE FUNCTION {RUNS}_notify()",
)

# Version 6: no foreign keys from the other tables to the run's row. Checking one takes a
# share lock on the run's row (SELECT ... FOR KEY SHARE) for every event, output and
# journal row inserted, in the very transaction that has just updated that row: a step's
# commit spent two thirds of its time in them (pg_stat_statements: 461 us a commit, 163 us
# a check, two checks a step). Every write of those rows is already conditional on the
# run's row (an INSERT ... SELECT FROM the UPDATE that matched it, or after a create that
# inserted it), and deleting a run deletes its rows in every table in one statement, so
# the keys guarded nothing the statements do not.
#
# And the queue's index by claim time is two partial ones: the unclaimed entries by
# workflow in queue order, and the claimed ones by claim time (to find those whose claim
# ran out). A claim read every entry waiting (the oldest first, across the index by claim
# time, where unclaimed entries sort last): 1,100 rows a claim with 2,000 runs queued.
_V6 = (
    *(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {table}_ns_run_id_fkey" for table in RUN_TABLES),
    f"CREATE INDEX IF NOT EXISTS {QUEUE}_unclaimed ON {QUEUE} (ns, workflow, id) WHERE claimed_at IS NULL",
    f"DROP INDEX IF EXISTS {QUEUE}_next",
    f"CREATE INDEX IF NOT EXISTS {QUEUE}_claimed ON {QUEUE} (ns, workflow, claimed_at) "
    "WHERE claimed_at IS NOT NULL",
)

#: The statements that bring a database of version ``v`` (0: a new one) to ``v + 1``.
_UPGRADES: dict[int, tuple[str, ...]] = {0: _V1, 1: _V2, 2: _V3, 3: _V4, 4: _V5, 5: _V6}

# Any number: the key of the advisory lock that serializes schema changes.
_LOCK = 0x61676E74666C6F77  # "agntflow"


async def ensure_schema(conn: Any, where: str) -> None:
    """Create the tables and indexes, or upgrade an older layout (one transaction).

    ``conn`` is a ``psycopg.AsyncConnection`` in autocommit mode.

    Raises:
        StoreError: the database was written by a newer layout than this one.
    """
    row = await (await conn.execute(f"SELECT to_regclass('{SCHEMA}') IS NOT NULL")).fetchone()
    if row[0]:  # the common case: one read, no lock
        version = await _version(conn)
        _check(version, where)
        if version == VERSION:
            return
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA} (version integer NOT NULL)")
        version = await _version(conn)
        _check(version, where)
        if version == VERSION:
            return  # another process made it ready while this one waited for the lock
        while version < VERSION:
            for sql in _UPGRADES[version]:
                await conn.execute(sql)
            version += 1
        await conn.execute(f"DELETE FROM {SCHEMA}")
        await conn.execute(f"INSERT INTO {SCHEMA} (version) VALUES (%s)", (VERSION,))


#: Writes (creates and commits) a store makes before it looks whether PostgreSQL has
#: statistics of the runs table (:func:`analyze_if_never`).
ANALYZE_AFTER = 1000

# Whether the planner has statistics of the runs' prefixes: ANALYZE wrote them, or
# autovacuum did.
_ANALYZED = (
    "SELECT EXISTS (SELECT 1 FROM pg_stats s JOIN pg_namespace n ON n.nspname = s.schemaname "
    "JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = s.tablename "
    f"WHERE c.oid = to_regclass('{RUNS}') AND s.attname = 'ns')"
)


async def analyze_if_never(conn: Any) -> bool:
    """ANALYZE the runs and events tables if the planner has no statistics of them; True if so.

    Until a table is first analyzed the planner guesses that ``ns = $1`` matches half a
    percent of it, and a batch of commits (or takes, or reads) of ten runs is then planned
    as a scan of every run of the prefix through an index of ``ns`` and something else,
    hashed and joined to the batch: measured with 2,000 runs stored, 1,990 rows read and
    thrown away for a batch of ten, 2.3 ms a batch instead of 0.3. Autovacuum analyzes a
    table within a minute or so of it filling (when it is on); a fleet that enqueues
    100,000 runs at once would meanwhile read all of them for every batch. ``conn`` is
    autocommit; a role that does not own the tables only gets PostgreSQL's warning.
    """
    row = await (await conn.execute(_ANALYZED)).fetchone()
    if row is None or row[0]:
        return False
    await conn.execute(f"ANALYZE {RUNS}, {EVENTS}")
    return True


async def _version(conn: Any) -> int:
    row = await (await conn.execute(f"SELECT max(version) FROM {SCHEMA}")).fetchone()
    return int(row[0] or 0)


def _check(version: int, where: str) -> None:
    if version > VERSION:
        raise StoreError(
            f"PostgreSQL database {where} has agentflow schema version {version}; this agentflow reads "
            f"up to {VERSION}: upgrade agentflow"
        )
