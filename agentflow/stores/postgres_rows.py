"""PostgreSQL rows: the statements the store runs, and runs turned into rows and back.

The tables are :mod:`agentflow.stores.postgres_schema`'s; this module knows their
columns. Statements that depend on what a write sets are built once per shape and cached.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import pydantic_core

from ..errors import CorruptRecordError
from ..types import FINAL
from .codec import JSON_FIELDS, RECORD_FIELDS, column_value, damaged, decode, make_record
from .contract import RunRecord
from .postgres_schema import EVENTS, JOURNAL, NOW, OUTPUTS, QUEUE, QUEUED, RUN_TABLES, RUNS

__all__ = [
    "BIG",
    "COLUMNS",
    "CREATE",
    "DELETE",
    "FINAL_VALUES",
    "INSERT_EVENTS",
    "INSERT_RUN",
    "BATCH_KEYS",
    "LIVE",
    "LIVE_R",
    "PURGE",
    "RENEW",
    "RENEWS",
    "SELECT_CREATED",
    "SELECT_EVENTS",
    "SELECT_FENCE",
    "SELECT_FOR_UPDATE",
    "SELECT_FULL",
    "SELECT_FULLS",
    "SELECT_LEASE",
    "SELECT_LIGHT",
    "SELECT_LOADED",
    "SELECT_LOADEDS",
    "attached",
    "commit_statement",
    "commits_statement",
    "creates_statement",
    "listed",
    "row_of",
    "texts",
    "to_record",
    "update_statement",
]

#: One column per RunRecord field, in the record's order.
COLUMNS = RECORD_FIELDS
#: The fields a listing leaves out.
BIG = ("input", "state", "output")
FINAL_VALUES = tuple(sorted(s.value for s in FINAL))
#: The condition of a run that has not expired (by the database's clock).
LIVE = f"(expires_at IS NULL OR expires_at > {NOW})"
#: :data:`LIVE` of the runs' rows under the alias ``r``.
LIVE_R = f"(r.expires_at IS NULL OR r.expires_at > {NOW})"
#: A batch's rows (``r``) by the keys of its recordset ``i``. The keys go as an array
#: too: the planner then reads the rows by the primary key (it takes a set-returning
#: function for 100 rows, and would scan a table of a few thousand runs whole for them).
BATCH_KEYS = "r.ns = %(ns)s AND r.run_id = ANY(ARRAY(SELECT i.run_id FROM i)) AND r.run_id = i.run_id"
_KEY = "ns = %s AND run_id = %s"

SELECT_FULL = f"SELECT {', '.join(COLUMNS)} FROM {RUNS} WHERE {_KEY} AND {LIVE}"
_LIGHT = ", ".join("NULL" if name in BIG else name for name in COLUMNS)
SELECT_LIGHT = f"SELECT {_LIGHT} FROM {RUNS}"
#: An update's read: the record, its last writer's nonce and the clock; the row stays locked.
SELECT_FOR_UPDATE = (
    f"SELECT {', '.join(COLUMNS)}, written_by, {NOW} FROM {RUNS} WHERE {_KEY} AND {LIVE} FOR UPDATE"
)


def attached(ns: str, run_id: str) -> str:
    """The two columns a load adds to a run's record: its outputs (in order) and its
    journal (key, value pairs), of the run that SQL expressions ``ns`` and ``run_id`` name."""
    return (
        f"(SELECT array_agg(o.body ORDER BY o.id) FROM {OUTPUTS} o "
        f"WHERE o.ns = {ns} AND o.run_id = {run_id}), "
        f"(SELECT array_agg(ARRAY[j.key, j.value]) FROM {JOURNAL} j "
        f"WHERE j.ns = {ns} AND j.run_id = {run_id})"
    )


#: A load's one statement (one snapshot): the record, its outputs and journal.
SELECT_LOADED = (
    f"SELECT {', '.join(f'r.{name}' for name in COLUMNS)}, {attached('r.ns', 'r.run_id')} "
    f"FROM {RUNS} r WHERE r.ns = %s AND r.run_id = %s AND {LIVE_R}"
)
_BATCH_IDS = "ANY(ARRAY(SELECT i.run_id FROM json_to_recordset(%(batch)s::json) AS i(run_id text)))"
#: :data:`SELECT_FULL` of many runs (see :mod:`~agentflow.stores.postgres_batches`): parameters
#: ns and batch, a JSON array of objects naming a ``run_id`` each; a row for each live run.
SELECT_FULLS = (
    f"SELECT {', '.join(COLUMNS)} FROM {RUNS} WHERE ns = %(ns)s AND run_id = {_BATCH_IDS} AND {LIVE}"
)
#: :data:`SELECT_LOADED` of many runs, as :data:`SELECT_FULLS`.
SELECT_LOADEDS = SELECT_LOADED.replace(
    "r.ns = %s AND r.run_id = %s", f"r.ns = %(ns)s AND r.run_id = {_BATCH_IDS}"
)
#: What a commit that matched no row reads to say why.
SELECT_FENCE = (
    f"SELECT lease_owner, lease_token, commit_token, commit_seq, control FROM {RUNS} WHERE {_KEY} AND {LIVE}"
)
SELECT_LEASE = f"SELECT lease_owner, lease_token FROM {RUNS} WHERE {_KEY} AND {LIVE}"
#: What a create that found the id taken reads: whose create it was, and whether it expired.
SELECT_CREATED = f"SELECT created_by, NOT {LIVE} FROM {RUNS} WHERE {_KEY}"
SELECT_EVENTS = (
    f"SELECT e.seq, e.body FROM {EVENTS} e JOIN {RUNS} r ON r.ns = e.ns AND r.run_id = e.run_id "
    f"WHERE e.ns = %s AND e.run_id = %s AND e.seq > %s AND (r.expires_at IS NULL OR r.expires_at > {NOW}) "
    "ORDER BY e.seq"
)
RENEW = (
    f"UPDATE {RUNS} SET lease_expires = {NOW} + %s WHERE {_KEY} AND lease_owner = %s AND lease_token = %s "
    f"AND {LIVE} RETURNING control"
)
#: :data:`RENEW` of many runs (see :mod:`~agentflow.stores.postgres_batches`): parameters
#: ns and batch, a JSON array of one object per lease (run_id, owner, token, ttl); the
#: run id and control flag of each lease renewed, no row for the others.
RENEWS = (
    "WITH i AS (SELECT * FROM json_to_recordset(%(batch)s::json) "
    "AS i(run_id text, owner text, token bigint, ttl float8)) "
    f"UPDATE {RUNS} r SET lease_expires = {NOW} + i.ttl FROM i "
    f"WHERE {BATCH_KEYS} AND r.lease_owner = i.owner AND r.lease_token = i.token "
    f"AND {LIVE_R} RETURNING r.run_id, r.control"
)


def _deleting(runs: str, returning: str) -> str:
    """Deletes the runs ``runs`` selects with their rows in every other table, in one
    statement (schema 6: no foreign keys, see postgres_schema), and returns ``returning``
    of the deleted runs."""
    ctes = ", ".join(
        f"d{i} AS (DELETE FROM {table} x USING r WHERE x.ns = r.ns AND x.run_id = r.run_id)"
        for i, table in enumerate(RUN_TABLES)
    )
    deleted = f"r AS (DELETE FROM {RUNS} WHERE {runs} RETURNING ns, run_id, {LIVE} AS live)"
    return f"WITH {deleted}, {ctes} {returning}"


#: Deletes a run and everything of it: ns, run_id; returns whether it was live (a row
#: only if the run existed).
DELETE = _deleting(_KEY, "SELECT live FROM r")
#: Deletes a batch of expired runs (ns, then the batch size); returns how many.
PURGE = _deleting(
    f"(ns, run_id) IN (SELECT ns, run_id FROM {RUNS} WHERE ns = %s "
    f"AND expires_at IS NOT NULL AND expires_at <= {NOW} LIMIT %s)",
    "SELECT count(*) FROM r",
)

#: A new run's row: the columns, then ns, deadline, expires_at (a ttl in seconds from
#: now, or NULL) and the create's nonce.
_NEW_ROW = (
    f"INSERT INTO {RUNS} ({', '.join(COLUMNS)}, ns, deadline, expires_at, created_by) "
    f"VALUES ({', '.join(['%s'] * len(COLUMNS))}, %s, %s, {NOW} + %s, %s) "
    "ON CONFLICT (ns, run_id) DO NOTHING"
)
INSERT_RUN = f"{_NEW_ROW} RETURNING 1"


def _appending_events(ns: str, run_id: str, first: str, bodies: str, after: str = "") -> str:
    """An INSERT of a run's events: SQL expressions of its ``ns`` and ``run_id``, of the
    first event's seq and of the events (a JSON array of their texts); ``after`` names the
    write they depend on (a CTE, or a batch's: that CTE joined with the batch's rows; no
    row of it, no event)."""
    source = f"{after}, " if after else ""
    return (
        f"INSERT INTO {EVENTS} (ns, run_id, seq, body) SELECT {ns}, {run_id}, {first} + t.n - 1, t.body "
        f"FROM {source}json_array_elements_text({bodies}::json) WITH ORDINALITY AS t(body, n)"
    )


def _creating(queued: bool) -> str:
    """A new run's row with its events, and its queue entry if ``queued``, in one
    statement: :data:`INSERT_RUN`'s parameters, then the first event's seq and the
    events (a JSON array of their texts). A row comes back if the run was created, none
    if its id was taken (then nothing was written)."""
    events = f"e AS ({_appending_events('r.ns', 'r.run_id', '%s', '%s', after='r')})"
    if not queued:
        return f"WITH r AS ({_NEW_ROW} RETURNING ns, run_id), {events} SELECT 1 FROM r"
    queue = (
        f"q AS (INSERT INTO {QUEUE} (ns, workflow, run_id, enqueued_at) "
        f"SELECT r.ns, r.workflow, r.run_id, {NOW} FROM r RETURNING ns, workflow)"
    )
    notify = f"SELECT pg_notify('{QUEUED}', json_build_array(ns, workflow)::text) FROM q"
    return f"WITH r AS ({_NEW_ROW} RETURNING ns, run_id, workflow), {events}, {queue} {notify}"


#: :func:`_creating`'s statements, by ``queued``.
CREATE = {False: _creating(False), True: _creating(True)}
#: Appends events: ns, run_id, the first seq, the bodies.
INSERT_EVENTS = _appending_events("%s", "%s", "%s", "%s")


def row_of(record: RunRecord, event_count: int) -> list[Any]:
    """The ``COLUMNS`` of ``record`` in order, with ``event_count`` for its own.

    Raises:
        StoreError: a value is not JSON-able (names the run and the field).
    """
    run_id = record.run_id
    row = [column_value(run_id, name, getattr(record, name)) for name in COLUMNS]
    row[COLUMNS.index("event_count")] = event_count
    return row


def to_record(row: Sequence[Any]) -> RunRecord:
    """The record of a row of ``COLUMNS`` (a light one when the big columns are NULL).

    Raises:
        CorruptRecordError: a field cannot be decoded (names the run and the field).
    """
    run_id = str(row[0])
    values: dict[str, Any] = {}
    for name, value in zip(COLUMNS, row, strict=False):
        if name in JSON_FIELDS:
            values[name] = None if value is None else decode(run_id, f"{RUNS}.{name}", value)
        else:
            values[name] = value
    return make_record(run_id, RUNS, values)


def listed(row: Sequence[Any]) -> RunRecord:
    """A light record; a damaged row is listed with ``corrupt`` set instead of raising."""
    try:
        return to_record(row)
    except CorruptRecordError as exc:
        return damaged(dict(zip(COLUMNS, row, strict=False)), str(exc))


def texts(values: list[str] | dict[str, str]) -> str:
    """Texts sent as one JSON parameter (``json_array_elements_text`` / ``json_each_text``
    read them back): psycopg's adaptation of a ``text[]`` escapes each element in Python,
    about a fifth of a commit's time in the client."""
    return pydantic_core.to_json(values).decode()


def _expiry(ttl: bool) -> str:
    """``expires_at``'s new value when a write sets the status (the status is the parameter)."""
    if not ttl:
        return "NULL"
    finals = ", ".join(f"'{s}'" for s in FINAL_VALUES)
    return f"CASE WHEN %(status)s IN ({finals}) THEN {NOW} + %(ttl)s END"


@functools.lru_cache(maxsize=256)
def commit_statement(
    names: tuple[str, ...], release: bool, ttl: bool, events: bool, outputs: bool, journal: bool
) -> str:
    """A commit's one statement: fence, once-only check, the row and the appended rows together.

    Parameters by name: each of ``names``; ``deadline`` when ``pending`` is among them;
    ``ttl`` (with ``ttl``, when ``status`` is among them); ``n`` (events), ``token``,
    ``seq``, ``ns``, ``run_id``, ``owner``; ``events`` and ``outputs`` (JSON arrays of
    the texts), ``journal`` (a JSON object of them) when there are any. It matches no row, and writes nothing,
    when the run is gone or expired, the lease moved on or the commit was applied
    before; the caller then reads the row to say which. It returns the new
    ``event_count``, ``control``, the run's workflow and status.
    """
    sets = [f"{name} = %({name})s" for name in names]
    if "pending" in names:
        sets.append("deadline = %(deadline)s")
    if "status" in names:
        sets.append(f"expires_at = {_expiry(ttl)}")
    sets += [
        f"updated_at = {NOW}",
        "event_count = event_count + %(n)s",
        "commit_token = %(token)s",
        "commit_seq = %(seq)s",
    ]
    if release:
        sets += ["lease_owner = NULL", "lease_expires = 0"]
    parts = [
        f"WITH u AS (UPDATE {RUNS} SET {', '.join(sets)} "
        f"WHERE ns = %(ns)s AND run_id = %(run_id)s AND {LIVE} "
        "AND lease_owner = %(owner)s AND lease_token = %(token)s "
        "AND NOT (commit_token = %(token)s AND commit_seq >= %(seq)s) "
        "RETURNING event_count, control, workflow, status)"
    ]
    if events:
        first = "u.event_count - %(n)s + 1"  # the count the update returns includes them
        parts.append(f", e AS ({_appending_events('%(ns)s', '%(run_id)s', first, '%(events)s', after='u')})")
    if outputs:
        parts.append(
            f", o AS (INSERT INTO {OUTPUTS} (ns, run_id, body) SELECT %(ns)s, %(run_id)s, t.body "
            "FROM u, json_array_elements_text(%(outputs)s::json) WITH ORDINALITY AS t(body, n) ORDER BY t.n)"
        )
    if journal:
        parts.append(
            f", j AS (INSERT INTO {JOURNAL} (ns, run_id, key, value) SELECT %(ns)s, %(run_id)s, t.k, t.v "
            "FROM u, json_each_text(%(journal)s::json) AS t(k, v) "
            "ON CONFLICT (ns, run_id, key) DO UPDATE SET value = excluded.value)"
        )
    parts.append(" SELECT event_count, control, workflow, status FROM u")
    return "".join(parts)


@functools.lru_cache(maxsize=256)
def update_statement(names: tuple[str, ...], ttl: bool) -> str:
    """An update's write of the locked row: ``names`` (by name), ``updated_at``,
    ``event_count``, ``written_by``; with ``pending`` or ``status`` among them, the
    ``deadline``; with ``status``, ``expires_at`` (``ttl``). Then ``ns`` and ``run_id``."""
    sets = [f"{name} = %({name})s" for name in names]
    if "pending" in names or "status" in names:
        sets.append("deadline = %(deadline)s")
    if "status" in names:
        sets.append(f"expires_at = {_expiry(ttl)}")
    sets.append("written_by = %(written_by)s")
    return f"UPDATE {RUNS} SET {', '.join(sets)} WHERE ns = %(ns)s AND run_id = %(run_id)s"


#: The columns that are not text, and their types.
_TYPED = {
    **dict.fromkeys(("visit", "event_count", "lease_token", "commit_token", "commit_seq"), "bigint"),
    **dict.fromkeys(("created_at", "updated_at", "lease_expires"), "float8"),
}


@functools.lru_cache(maxsize=256)
def commits_statement(
    names: tuple[str, ...], release: bool, ttl: bool, events: bool, outputs: bool, journal: bool
) -> str:
    """Many runs' commits of one shape in one statement, each with its fence and once-only check.

    :func:`commit_statement` for a batch: parameters ``ns``, ``ttl`` (with ``ttl``, when
    ``status`` is among ``names``) and ``batch``, a JSON array of one object per commit
    (one per run): its ``run_id``, ``owner``, ``token``, ``seq``, ``n`` (events), each of
    ``names`` as :func:`column` stores it, and ``events`` and ``outputs`` (arrays of their
    texts) and ``journal`` (an object of them) when there are any. It returns the
    ``run_id``, new ``event_count``, ``control``, ``workflow`` and ``status`` of each
    commit it applied; a commit that matched nothing (the run is gone or expired, the
    lease moved on, the commit was applied before) returns no row and writes nothing.
    """
    cols = ["run_id text", "owner text", "token bigint", "seq bigint", "n bigint"]
    cols += [f"{name} {_TYPED.get(name, 'text')}" for name in names]
    appended = (("events", events), ("outputs", outputs), ("journal", journal))
    cols += [f"{part} json" for part, on in appended if on]
    sets = [f"{name} = i.{name}" for name in names]
    if "pending" in names:
        raise ValueError("a commit that sets pending refiles approvals: it is committed alone")
    if "status" in names:
        sets.append(f"expires_at = {_expiry(ttl).replace('%(status)s', 'i.status')}")
    sets += [
        f"updated_at = {NOW}",
        "event_count = r.event_count + i.n",
        "commit_token = i.token",
        "commit_seq = i.seq",
    ]
    if release:
        sets += ["lease_owner = NULL", "lease_expires = 0"]
    parts = [
        f"WITH i AS (SELECT * FROM json_to_recordset(%(batch)s::json) AS i({', '.join(cols)})), "
        f"u AS (UPDATE {RUNS} r SET {', '.join(sets)} FROM i "
        f"WHERE {BATCH_KEYS} AND {LIVE_R} "
        "AND r.lease_owner = i.owner AND r.lease_token = i.token "
        "AND NOT (r.commit_token = i.token AND r.commit_seq >= i.seq) "
        "RETURNING r.run_id, r.event_count, r.control, r.workflow, r.status)"
    ]
    each = "u JOIN i ON i.run_id = u.run_id"  # each commit applied, with its row of the batch
    if events:
        parts.append(
            # The count the update returns includes the commit's events.
            f", e AS ({_appending_events('%(ns)s', 'u.run_id', 'u.event_count - i.n + 1', 'i.events', each)})"
        )
    if outputs:
        parts.append(
            f", o AS (INSERT INTO {OUTPUTS} (ns, run_id, body) SELECT %(ns)s, u.run_id, t.body FROM {each}, "
            "json_array_elements_text(i.outputs) WITH ORDINALITY AS t(body, n) ORDER BY u.run_id, t.n)"
        )
    if journal:
        parts.append(
            f", j AS (INSERT INTO {JOURNAL} (ns, run_id, key, value) "
            f"SELECT %(ns)s, u.run_id, t.k, t.v FROM {each}, json_each_text(i.journal) AS t(k, v) "
            "ON CONFLICT (ns, run_id, key) DO UPDATE SET value = excluded.value)"
        )
    parts.append(" SELECT run_id, event_count, control, workflow, status FROM u")
    return "".join(parts)


_EACH_NEW = "r JOIN i ON i.run_id = r.run_id"  # each run created, with its row of the batch


@functools.lru_cache(maxsize=2)
def creates_statement(queued: bool) -> str:
    """Many new runs in one statement: :data:`CREATE` for a batch.

    Parameters ``ns`` and ``batch``, a JSON array of one object per run: each of
    ``COLUMNS`` as :func:`row_of` stores it, ``deadline``, ``expires_in`` (seconds, or
    null), ``created_by`` (the create's nonce), ``first`` (the first event's seq) and
    ``events`` (an array of their texts). With ``queued``, each new run's queue entry too,
    and one notification per workflow. It returns the ``run_id`` of each run it created;
    a run whose id was taken returns no row and writes nothing.
    """
    cols = [f"{name} {_TYPED.get(name, 'text')}" for name in COLUMNS]
    cols += ["deadline float8", "expires_in float8", "created_by text", "first bigint", "events json"]
    values = ", ".join(f"i.{name}" for name in COLUMNS)
    parts = [
        f"WITH i AS (SELECT * FROM json_to_recordset(%(batch)s::json) AS i({', '.join(cols)})), "
        f"r AS (INSERT INTO {RUNS} ({', '.join(COLUMNS)}, ns, deadline, expires_at, created_by) "
        f"SELECT {values}, %(ns)s, i.deadline, {NOW} + i.expires_in, i.created_by FROM i "
        "ON CONFLICT (ns, run_id) DO NOTHING RETURNING run_id, workflow), "
        f"e AS ({_appending_events('%(ns)s', 'r.run_id', 'i.first', 'i.events', after=_EACH_NEW)})"
    ]
    if not queued:
        parts.append(" SELECT run_id FROM r")
        return "".join(parts)
    parts.append(
        f", q AS (INSERT INTO {QUEUE} (ns, workflow, run_id, enqueued_at) "
        f"SELECT %(ns)s, r.workflow, r.run_id, {NOW} FROM r RETURNING workflow) "
        # Evaluated once (an uncorrelated subquery): a notification per workflow.
        "SELECT r.run_id, (SELECT count(pg_notify("
        f"'{QUEUED}', json_build_array(%(ns)s::text, w.workflow)::text)) "
        "FROM (SELECT DISTINCT workflow FROM q) w) FROM r"
    )
    return "".join(parts)
