"""SQLite rows: the statements the store runs, and runs turned into rows and back.

The tables are :mod:`agentflow.stores.sqlite_schema`'s; this module knows their columns.
The listings and the approval index are :mod:`agentflow.stores.sqlite_index`'s.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import CorruptRecordError
from ..types import FINAL, RunStatus
from .codec import JSON_FIELDS, RECORD_FIELDS, damaged, decode, encode, json_text, make_record
from .contract import RunRecord
from .sqlite_schema import APPROVALS, APPROVERS, BIG, EVENTS, JOURNAL, OUTPUTS, RUNS, VALUES

__all__ = [
    "FINAL_VALUES",
    "HOT",
    "INLINE_MAX",
    "LIVE",
    "RENEW",
    "SELECT_EVENTS",
    "SELECT_EXPIRED",
    "SELECT_FENCE",
    "SELECT_FULL",
    "SELECT_JOURNAL",
    "SELECT_LEASE",
    "SELECT_LIGHT",
    "SELECT_LIVE",
    "SELECT_VERSIONS",
    "SELECT_OUTPUTS",
    "SELECT_STORED",
    "commit_update",
    "delete_runs",
    "delete_values",
    "hot_row",
    "insert_rows",
    "insert_run",
    "listed",
    "place",
    "stored_form",
    "to_record",
    "transaction",
]


#: Longest JSON (in characters) of a big field kept in the hot row.
INLINE_MAX = 1000
HOT = tuple(f for f in RECORD_FIELDS if f not in BIG)
# How ``hot_row`` writes each hot column.
_AS_IS, _AS_JSON, _AS_STATUS, _AS_COUNT = range(4)
_KINDS = {"status": _AS_STATUS, "event_count": _AS_COUNT, **dict.fromkeys(JSON_FIELDS, _AS_JSON)}
_HOT_KINDS = tuple((f, _KINDS.get(f, _AS_IS)) for f in HOT)

FINAL_VALUES = frozenset(s.value for s in FINAL)
#: The condition of a run that has not expired; its parameter is now.
LIVE = "(expires_at IS NULL OR expires_at > ?)"
_VALUE = (
    f"(SELECT value FROM {VALUES} v WHERE v.ns = r.ns AND v.run_id = r.run_id AND v.field = '{{0}}'), r.{{0}}"
)
#: The hot columns, then for each big field its ``agentflow_values`` row and its column.
_COLUMNS = f"{', '.join(HOT)}, {', '.join(_VALUE.format(f) for f in BIG)}"
SELECT_LIGHT = f"SELECT {', '.join(HOT)} FROM {RUNS}"
#: One statement, so one snapshot: the hot row and the big values of one live run.
SELECT_FULL = f"SELECT {_COLUMNS} FROM {RUNS} r WHERE ns = ? AND run_id = ? AND {LIVE}"
#: What tells whether runs changed (``{marks}``: a ``?`` per run id); then ``LIVE``'s now.
SELECT_VERSIONS = (
    f"SELECT run_id, status, control, event_count, updated_at FROM {RUNS} "
    f"WHERE ns = ? AND run_id IN ({{marks}}) AND {LIVE}"
)
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
    f"INSERT INTO {RUNS} ({', '.join(HOT)}, ns, deadline, expires_at, {', '.join(BIG)}) "
    f"VALUES ({', '.join('?' * (len(HOT) + 3 + len(BIG)))})"
)
#: A create that finds the id taken writes nothing (and reads the stored run instead).
_INSERT_NEW_RUN = f"{_INSERT_RUN} ON CONFLICT (ns, run_id) DO NOTHING"
_INSERT_EVENT = f"INSERT INTO {EVENTS} (ns, run_id, seq, body) VALUES (?, ?, ?, ?)"
_INSERT_OUTPUT = f"INSERT INTO {OUTPUTS} (ns, run_id, body) VALUES (?, ?, ?)"
_UPSERT_JOURNAL = (
    f"INSERT INTO {JOURNAL} (ns, run_id, key, value) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (ns, run_id, key) DO UPDATE SET value = excluded.value"
)
_DELETE_VALUES = f"DELETE FROM {VALUES} WHERE ns = ? AND run_id = ? AND field IN ({{}})"
# An unchanged value (the same JSON) is not written again.
_UPSERT_VALUE = (
    f"INSERT INTO {VALUES} (ns, run_id, field, value) VALUES (?, ?, ?, ?) ON CONFLICT (ns, run_id, field) "
    "DO UPDATE SET value = excluded.value WHERE value IS NOT excluded.value"
)


class transaction:
    """One transaction: committed when the block ends, rolled back if it raises.

    A write transaction takes the write lock before its first read (``BEGIN IMMEDIATE``).
    Inside a transaction already open (the store's thread runs the calls waiting for it
    together, in one transaction: see :mod:`.sqlite_calls`) it is a savepoint, released
    when the block ends and rolled back alone if it raises.
    A class rather than a generator: it opens and closes every commit.
    """

    __slots__ = ("db", "nested")

    def __init__(self, db: sqlite3.Connection, write: bool = True) -> None:
        self.nested = db.in_transaction
        db.execute("SAVEPOINT call" if self.nested else "BEGIN IMMEDIATE" if write else "BEGIN")
        self.db = db

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self.nested:
            if kind is not None:
                self.db.execute("ROLLBACK TO call")
            self.db.execute("RELEASE call")
        elif kind is None:
            self.db.execute("COMMIT")
        elif self.db.in_transaction:
            self.db.execute("ROLLBACK")


def hot_row(record: RunRecord, event_count: int) -> list[Any]:
    """The ``HOT`` columns of ``record`` in order, with ``event_count`` for its own.

    Raises:
        StoreError: a value is not JSON-able (names the run and the field).
    """
    run_id = record.run_id
    row = []
    for name, kind in _HOT_KINDS:
        value = getattr(record, name)
        if kind == _AS_JSON:
            value = json_text(run_id, name, value)
        elif kind == _AS_STATUS:
            value = RunStatus(value).value
        elif kind == _AS_COUNT:
            value = event_count
        row.append(value)
    return row


def place(run_id: str, name: str, value: Any, columns: dict[str, Any], spilled: dict[str, str]) -> None:
    """Encode the big field ``name``: into ``columns`` when short, else into ``spilled``.

    A spilled value goes to ``agentflow_values`` and its column in ``columns`` is cleared.

    Raises:
        StoreError: the value is not JSON-able (names the run and the field).
    """
    text = encode(run_id, name, value).decode()
    if len(text) <= INLINE_MAX:
        columns[name] = text
    else:
        columns[name] = None
        spilled[name] = text


def to_record(row: Sequence[Any], light: bool) -> RunRecord:
    """The record of a ``SELECT_FULL`` row, or a light one (no big values) of a ``SELECT_LIGHT`` row.

    Raises:
        CorruptRecordError: a field cannot be decoded (names the run and the field).
    """
    run_id = str(row[0])
    values: dict[str, Any] = {}
    for name, value in zip(HOT, row, strict=False):
        values[name] = decode(run_id, f"{RUNS}.{name}", value) if name in JSON_FIELDS else value
    if light:
        values["input"] = None
    else:
        at = len(HOT)
        for name in BIG:
            spilled, column = row[at], row[at + 1]
            at += 2
            if spilled is not None:
                values[name] = decode(run_id, f"{VALUES}[{name}]", spilled)
            elif column is not None:
                values[name] = decode(run_id, f"{RUNS}.{name}", column)
            else:
                values[name] = None
    return make_record(run_id, RUNS, values)


def stored_form(hot: Sequence[Any], columns: Mapping[str, Any], spilled: Mapping[str, str]) -> list[Any]:
    """What ``SELECT_STORED`` reads back (after ``expires_at``) for a run written so."""
    out = list(hot)
    for name in BIG:
        out += (spilled.get(name), columns.get(name))
    return out


def listed(row: Sequence[Any]) -> RunRecord:
    """A light record; a damaged row is listed with ``corrupt`` set instead of raising."""
    try:
        return to_record(row, light=True)
    except CorruptRecordError as exc:
        return damaged(dict(zip(HOT, row, strict=True)), str(exc))


def insert_run(
    db: sqlite3.Connection,
    ns: str,
    hot: Sequence[Any],
    deadline: Any,
    expires: Any,
    columns: Mapping[str, Any],
) -> bool:
    """Insert a run's hot row unless its id is stored (expired or not); True if inserted.

    ``hot`` holds the ``HOT`` columns in order, ``columns`` the short big values.
    """
    params = [*hot, ns, deadline, expires, *(columns.get(name) for name in BIG)]
    return db.execute(_INSERT_NEW_RUN, params).rowcount == 1


def delete_values(db: sqlite3.Connection, ns: str, run_id: str, names: Sequence[str]) -> None:
    """Delete the ``agentflow_values`` rows of ``names`` (values now kept in the hot row)."""
    db.execute(_DELETE_VALUES.format(", ".join("?" * len(names))), [ns, run_id, *names])


@functools.lru_cache(maxsize=256)
def commit_update(
    names: tuple[str, ...], release: bool, expires: bool, inline: tuple[str, ...], filing: bool = False
) -> str:
    """A commit's one statement on the hot row: fence, once-only check and write together.

    Its parameters: the values of ``names``; with ``expires``, ``expires_at``; then
    ``updated_at``, the number of events, the lease token and the commit seq (the new
    marker); ns, run_id and now; the lease's owner and token, and its token and the
    seq again (the once-only check); with a ``status`` among ``names``, that status
    once more. It matches no row — and the caller reads the row to say why — when the
    run is gone or expired, the lease moved on, the commit was applied before, a
    counter is not an integer, or the status would not change. With ``release`` it
    drops the lease. It returns the new ``event_count`` and ``control``, and with
    ``inline`` (big fields written into the row) whether ``agentflow_values`` still has
    a row for one of them (to delete), and with ``filing`` the run's workflow and status
    last (to file its approvals with).
    """
    sets = [f"{name} = ?" for name in names]
    if expires:
        sets.append("expires_at = ?")
    sets += ["updated_at = ?", "event_count = event_count + ?", "commit_token = ?", "commit_seq = ?"]
    if release:
        sets += ["lease_owner = NULL", "lease_expires = 0.0"]
    changes = " AND status IS NOT ?" if "status" in names else ""
    stale = ""
    if inline:
        fields = ", ".join(f"'{name}'" for name in inline)
        stale = (
            f", EXISTS (SELECT 1 FROM {VALUES} v WHERE v.ns = {RUNS}.ns AND v.run_id = {RUNS}.run_id "
            f"AND v.field IN ({fields}))"
        )
    filed = ", workflow, status" if filing else ""
    return (
        f"UPDATE {RUNS} SET {', '.join(sets)} WHERE ns = ? AND run_id = ? AND {LIVE} "
        "AND lease_owner = ? AND lease_token = ? "
        "AND typeof(event_count) = 'integer' AND typeof(commit_seq) = 'integer' "
        f"AND NOT (commit_token = ? AND commit_seq >= ?){changes} "
        f"RETURNING event_count, control{stale}{filed}"
    )


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
    if len(events) == 1:
        db.execute(_INSERT_EVENT, (ns, run_id, first_seq, events[0]))
    elif 1 < len(events) <= _EVENTS_PER_INSERT:  # one statement for all of them
        params: list[Any] = []
        for i, body in enumerate(events, first_seq):
            params += (ns, run_id, i, body)
        db.execute(_insert_events(len(events)), params)
    elif events:
        db.executemany(_INSERT_EVENT, [(ns, run_id, first_seq + i, e) for i, e in enumerate(events)])
    for name, value in big.items():
        db.execute(_UPSERT_VALUE, (ns, run_id, name, value))
    if outputs:
        db.executemany(_INSERT_OUTPUT, [(ns, run_id, body) for body in outputs])
    if journal:
        db.executemany(_UPSERT_JOURNAL, [(ns, run_id, key, value) for key, value in journal.items()])


_EVENTS_PER_INSERT = 64


@functools.lru_cache(maxsize=_EVENTS_PER_INSERT)
def _insert_events(n: int) -> str:
    return f"INSERT INTO {EVENTS} (ns, run_id, seq, body) VALUES {', '.join(['(?, ?, ?, ?)'] * n)}"


def delete_runs(db: sqlite3.Connection, ns: str, run_ids: Sequence[str]) -> None:
    """Delete the runs and every row stored with them."""
    rows = [(ns, run_id) for run_id in run_ids]
    for table in (EVENTS, OUTPUTS, JOURNAL, VALUES, APPROVALS, APPROVERS, RUNS):
        db.executemany(f"DELETE FROM {table} WHERE ns = ? AND run_id = ?", rows)
