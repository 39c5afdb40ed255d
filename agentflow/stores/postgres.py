"""PostgreSQL store: runs shared by any number of processes on any number of machines.

Layout: see :mod:`agentflow.stores.postgres_schema` (tables, indexes, upgrades),
:mod:`agentflow.stores.postgres_rows` (statements, rows) and
:mod:`agentflow.stores.postgres_index` (listings, approvals, read through
:mod:`agentflow.stores.postgres_listing`); rate limits: :mod:`agentflow.stores.postgres_limits`;
connections and outages: :mod:`agentflow.stores.postgres_pool`. Built on psycopg 3
(async) and its pool.

One write is one transaction:

* ``commit`` is one statement (data-modifying CTEs): the fence and once-only check and
  the row's new fields in an ``UPDATE ... RETURNING``, the events, outputs and journal
  entries inserted from its result, so a commit is one round trip and an atomic unit.
  A commit that sets ``pending`` also refiles the run's approvals, in the same
  transaction. A commit whose ``(lease token, seq)`` the row holds already (a retry
  after a lost reply) matches nothing; the row then says why. The commits of many runs
  made at one moment go together, one statement and one round trip for all of them
  (:mod:`agentflow.stores.postgres_batches`); each is still applied entirely or not at
  all. So do creates, takes, lease renewals, and the reads ``get`` and ``load``.
* ``update`` is ``SELECT ... FOR UPDATE`` of the run's row (with the database's clock),
  ``change(record, now)``, and the write, in one transaction: other writers of the run
  wait for the lock rather than conflict, so ``change`` runs once. The write leaves the
  call's nonce in ``written_by``: a retry after a lost ``COMMIT`` reply finds it and
  returns what the first attempt wrote instead of applying the change twice
  (:mod:`agentflow.stores.postgres_update`).
* ``create`` inserts the row (``ON CONFLICT DO NOTHING``), its events and approvals; its
  nonce in ``created_by`` lets a retry recognise the run it created.
* ``renew`` and ``delete`` are one statement each; so is ``take`` (a worker's lease
  and load of a run handed over, :mod:`agentflow.stores.postgres_take`).

Leases are judged by the database's clock only (``statement_timestamp()``), so machines
whose clocks disagree never take each other's runs. ``key_prefix`` is a column
namespace (``ns``) as in the SQLite store; the schema is the connection's
``search_path``. Runs that finish with a ``ttl`` get ``expires_at``: expired rows read as
absent everywhere at once, and a ``create`` now and then deletes a bounded batch.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import psycopg

from ..errors import LeaseLostError, StoreError
from ..types import RunEvent
from . import postgres_index as pgindex
from . import postgres_queue as pgqueue
from . import postgres_rows as pgrows
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
from .contract import Commit, Lease, LoadedRun, RunRecord
from .postgres_batches import ALONE, Batches
from .postgres_credentials import PgCredentials
from .postgres_limits import PgLimits
from .postgres_listing import PgListing
from .postgres_pool import Connections
from .postgres_schema import ANALYZE_AFTER, EVENTS, JOURNAL, OUTPUTS, analyze_if_never
from .postgres_take import TAKES, PgTake
from .postgres_update import PgUpdate

__all__ = ["PostgresStore"]

log = logging.getLogger("agentflow")

#: Most expired runs one purge deletes, so a backlog never makes one ``create`` slow.
PURGE_BATCH = 200
# Times a commit tries again when its fence held by the time it read why nothing matched.
_FENCE_RACES = 5
_STATUS_AT = pgrows.COLUMNS.index("status")
_N = len(pgrows.COLUMNS)
Conn = psycopg.AsyncConnection[Any]


class PostgresStore(pgqueue.QueueAndFeed, PgCredentials, PgTake, PgUpdate, PgLimits, PgListing):
    """Keeps runs in PostgreSQL (12 or later); shared by every process that reaches it.

    The pool is opened, and the tables created or upgraded, by the first call.

    Args:
        url: a ``postgresql://`` URL or libpq connection string; defaults to
            ``$DATABASE_URL``, then to libpq's defaults (``PGHOST``, ``PGUSER``, ... or
            the local socket). The schema is the connection's ``search_path``
            (``?options=-csearch_path%3Dagentflow`` to pick one).
        ttl: seconds a finished run is kept, or None to keep it.
        key_prefix: a namespace stored in every row; stores with different prefixes
            sharing a database never see each other's runs.
        retry_for: seconds to keep retrying while the server is unreachable before an
            operation raises :class:`StoreError`.
        max_connections: connections the store opens at most; past that, operations
            wait for a free one.
        connect_timeout: seconds one connection attempt may take.
    """

    def __init__(
        self,
        url: str | None = None,
        ttl: float | None = None,
        key_prefix: str = "",
        *,
        retry_for: float = 10.0,
        max_connections: int = 16,
        connect_timeout: float = 5.0,
    ) -> None:
        self.url = url if url is not None else os.environ.get("DATABASE_URL", "")
        self.ttl = ttl
        self.key_prefix = key_prefix
        self.retry_for = retry_for
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self._db = Connections(self.url, retry_for, max_connections, connect_timeout)
        self._commits = Batches(self._db, "commit", self._commits_statement, {"ns": key_prefix, "ttl": ttl})
        self._creates = Batches(self._db, "create", pgrows.creates_statement, {"ns": key_prefix})
        self._takes = Batches(self._db, "take", lambda shape: TAKES, {"ns": key_prefix})
        self._gets = Batches(self._db, "get", lambda shape: pgrows.SELECT_FULLS, {"ns": key_prefix})
        self._loads = Batches(self._db, "load", lambda shape: pgrows.SELECT_LOADEDS, {"ns": key_prefix})
        self._renewals = Batches(self._db, "renew", lambda shape: pgrows.RENEWS, {"ns": key_prefix})
        self._instance = os.urandom(6).hex()
        self._counter = itertools.count()
        self._next_purge = 0.0
        self._listener = None
        self._until_analyze = ANALYZE_AFTER  # writes left before the look at the statistics

    @property
    def where(self) -> str:
        """``host:port/dbname`` of the server (no password)."""
        return self._db.where

    def _commits_statement(self, shape: Any) -> str:
        names, release, events, outputs, journal = shape
        return pgrows.commits_statement(names, release, self.ttl is not None, events, outputs, journal)

    def _nonce(self) -> str:
        return f"{self._instance}{next(self._counter):x}"

    def _expires(self, status: Any) -> float | None:
        """Seconds from now a run written with ``status`` expires in, or None."""
        return self.ttl if self.ttl is not None and status in pgrows.FINAL_VALUES else None

    def _purge_due(self) -> bool:
        """Whether the next ``create`` deletes a batch of expired runs first."""
        return self.ttl is not None and time.monotonic() >= self._next_purge

    async def _purge(self, conn: Conn) -> None:
        """Delete a batch of expired runs, now and then; a full batch brings the next one forward."""
        now = time.monotonic()
        if self.ttl is None or now < self._next_purge:
            return
        row = await (await conn.execute(pgrows.PURGE, (self.key_prefix, PURGE_BATCH))).fetchone()
        purged = row[0] if row is not None else 0  # a count(*): always one row
        self._next_purge = now if purged == PURGE_BATCH else now + min(self.ttl, 60.0)

    # -- the Store protocol -----------------------------------------------------------

    async def create(self, record: RunRecord, events: Sequence[RunEvent]) -> bool:
        """Store a new run; False (and nothing written) if the run id exists.

        A retry whose first attempt created the run (the row holds its nonce) returns True.
        """
        return await self._create(record, events, queued=False)

    async def create_queued(self, record: RunRecord, events: Sequence[RunEvent]) -> bool:
        """:meth:`create`, with the run's queue entry (and its notification) in the same
        transaction (``CreatesQueued``)."""
        return await self._create(record, events, queued=True)

    async def _create(self, record: RunRecord, events: Sequence[RunEvent], queued: bool) -> bool:
        created = await self._create_one(record, events, queued)
        if self._until_analyze:
            await self._count_write()
        return created

    async def _create_one(self, record: RunRecord, events: Sequence[RunEvent], queued: bool) -> bool:
        run_id, ns = record.run_id, self.key_prefix
        check_record(record)
        row = pgrows.row_of(record, record.event_count + len(events))
        bodies = [encode_event(run_id, e).decode() for e in events]
        status = row[_STATUS_AT]
        approvals = pgindex.approval_rows(run_id, record.workflow, status, record.pending)
        nonce = self._nonce()
        deadline, expires_in = deadline_of(record.pending), self._expires(status)
        params = [*row, ns, deadline, expires_in, nonce]

        async def taken(conn: Conn) -> bool | None:
            """What a create that found the id taken returns: True if this call created the
            run (its reply was lost), False if another live run has the id, None if the id
            is free again (the run is gone since, or expired and not purged yet)."""
            found = await (await conn.execute(pgrows.SELECT_CREATED, (ns, run_id))).fetchone()
            if found is None:
                return None
            created_by, expired = found
            if created_by == nonce:
                return True
            return None if expired else False

        matched_nothing = False
        if not approvals and not self._purge_due():
            # The common case: one statement with the other runs created at this moment.
            new = dict(zip(pgrows.COLUMNS, row, strict=True))
            new.update(
                deadline=deadline,
                expires_in=expires_in,
                created_by=nonce,
                first=record.event_count + 1,
                events=bodies,
            )
            created = await self._creates.write(run_id, queued, new)
            if created is not None and created is not ALONE:
                return True
            matched_nothing = created is None  # the id is taken: whose run, below

        async def job(conn: Conn) -> bool:
            nonlocal matched_nothing
            await self._purge(conn)
            if not approvals:  # the common case: one statement, one round trip
                first = [record.event_count + 1, pgrows.texts(bodies)]
                if matched_nothing:
                    matched_nothing = False
                elif await (await conn.execute(pgrows.CREATE[queued], [*params, *first])).fetchone():
                    return True
                verdict = await taken(conn)
                if verdict is not None:
                    return verdict
            async with conn.transaction():
                if await (await conn.execute(pgrows.INSERT_RUN, params)).fetchone() is None:
                    verdict = await taken(conn)
                    if verdict is not None:
                        return verdict
                    await conn.execute(pgrows.DELETE, (ns, run_id))  # expired, not purged yet (if not gone)
                    await conn.execute(pgrows.INSERT_RUN, params)
                if bodies:
                    await conn.execute(
                        pgrows.INSERT_EVENTS, (ns, run_id, record.event_count + 1, pgrows.texts(bodies))
                    )
                if approvals:
                    await pgindex.file_approvals(conn, ns, run_id, record.workflow, approvals, retire=False)
                if queued:
                    await conn.execute(pgqueue.ENQUEUE, (ns, record.workflow, run_id))
            return True

        return await self._db.run("create", run_id, job)

    async def connect(self) -> None:
        """Open the pool and make the tables ready (``Connects``)."""

        async def job(conn: Conn) -> None:
            return None

        await self._db.run("connecting", None, job)

    async def get(self, run_id: str) -> RunRecord | None:
        """The run's record, or None.

        Raises:
            CorruptRecordError: the stored record cannot be read (names the run and field).
        """

        # With the other runs read at this moment (a client's followers): one statement.
        row = await self._gets.write(run_id, None, {"run_id": run_id})
        if row is ALONE:  # the batch was refused: alone, for this run's own answer

            async def job(conn: Conn) -> Any:
                return await (await conn.execute(pgrows.SELECT_FULL, (self.key_prefix, run_id))).fetchone()

            row = await self._db.run("get", run_id, job)
        return None if row is None else pgrows.to_record(row)

    async def load(self, run_id: str) -> LoadedRun | None:
        """The record with its outputs and journal, read in one statement (one snapshot); or None.

        Raises:
            CorruptRecordError: part of the run cannot be read (names the run and key).
        """

        row = await self._loads.write(run_id, None, {"run_id": run_id})  # as get's
        if row is ALONE:

            async def job(conn: Conn) -> Any:
                return await (await conn.execute(pgrows.SELECT_LOADED, (self.key_prefix, run_id))).fetchone()

            row = await self._db.run("load", run_id, job)
        if row is None:
            return None
        outputs, journal = row[_N] or [], row[_N + 1] or []
        return LoadedRun(
            pgrows.to_record(row[:_N]),
            [make_output(run_id, f"{OUTPUTS}[{i}]", body) for i, body in enumerate(outputs)],
            {k: decode(run_id, f"{JOURNAL}[{k}]", v) for k, v in journal},
        )

    async def commit(self, run_id: str, lease: Lease, commit: Commit) -> str | None:
        """Apply ``commit`` in one transaction if ``lease`` still holds; return the control flag.

        A commit whose ``(lease.token, commit.seq)`` was applied already (the record's
        ``commit_token``, and ``commit_seq`` at or past ``seq``) writes nothing.

        Raises:
            LeaseLostError: the lease no longer holds; nothing was written.
            StoreError: a value cannot be encoded or ``seq`` is below 1 (nothing was
                written), or PostgreSQL stayed unreachable.
        """
        control = await self._commit(run_id, lease, commit)
        if self._until_analyze:
            await self._count_write()
        return control

    async def _commit(self, run_id: str, lease: Lease, commit: Commit) -> str | None:
        check_commit_fields(run_id, commit.fields)
        if commit.seq < 1:  # a seq the record may carry already would pass for a retry
            raise StoreError(
                f"run {run_id}: commit seq {commit.seq} is not a commit number; a commit carries the "
                "loaded record's commit_seq plus one per commit since"
            )
        ns = self.key_prefix
        sets = {name: column_value(run_id, name, v) for name, v in commit.fields.items()}
        refile = "pending" in commit.fields
        pending = commit.fields.get("pending")
        events = [encode_event(run_id, e).decode() for e in commit.events]
        outputs = [encode_output(run_id, o).decode() for o in commit.outputs]
        journal = {k: encode(run_id, f"journal {k!r}", v).decode() for k, v in commit.journal.items()}
        names = tuple(commit.fields)

        matched_nothing = False
        if not refile:
            # The common case: one statement with the other runs' commits of this moment.
            row: dict[str, Any] = {**sets, "run_id": run_id, "owner": lease.owner, "token": lease.token}
            row.update(seq=commit.seq, n=len(events))
            if events:
                row["events"] = events
            if outputs:
                row["outputs"] = outputs
            if journal:
                row["journal"] = journal
            shape = (names, commit.release, bool(events), bool(outputs), bool(journal))
            applied = await self._commits.write(run_id, shape, row)
            if applied is not None and applied is not ALONE:
                return None if applied[2] is None else str(applied[2])
            matched_nothing = applied is None  # the fence says why, below; refused: alone now

        # Alone: the commit's own statement.
        statement = pgrows.commit_statement(
            names, commit.release, self.ttl is not None, bool(events), bool(outputs), bool(journal)
        )
        params: dict[str, Any] = dict(sets)
        if refile:
            params["deadline"] = deadline_of(pending)
        if "status" in params and self.ttl is not None:
            params["ttl"] = self.ttl
        params.update(
            n=len(events), token=lease.token, seq=commit.seq, ns=ns, run_id=run_id, owner=lease.owner
        )
        if events:
            params["events"] = pgrows.texts(events)
        if outputs:
            params["outputs"] = pgrows.texts(outputs)
        if journal:
            params["journal"] = pgrows.texts(journal)

        async def job(conn: Conn) -> str | None:
            nonlocal matched_nothing
            for _ in range(_FENCE_RACES):
                if matched_nothing:
                    done, matched_nothing = None, False
                elif refile:
                    async with conn.transaction():
                        done = await (await conn.execute(statement, params)).fetchone()
                        if done is not None:
                            _, _, workflow, status = done
                            rows = pgindex.approval_rows(run_id, workflow, status, pending)
                            await pgindex.file_approvals(conn, ns, run_id, workflow, rows, retire=True)
                else:
                    done = await (await conn.execute(statement, params)).fetchone()
                if done is not None:
                    return None if done[1] is None else str(done[1])
                fence = await (await conn.execute(pgrows.SELECT_FENCE, (ns, run_id))).fetchone()
                if fence is None:
                    raise LeaseLostError(run_id, "the run no longer exists")
                owner, held, done_token, done_seq, control = fence
                if done_token == lease.token and commit.seq <= done_seq:
                    return None if control is None else str(control)  # applied before: a retry
                if owner != lease.owner or held != lease.token:
                    detail = f"the lease is {held} of {owner!r}"
                    raise LeaseLostError(run_id, f"token {lease.token} of {lease.owner!r} is stale; {detail}")
                # The fence holds now: the row changed between the two statements. Again.
            raise StoreError(f"run {run_id}: commit {commit.seq} found its fence moving {_FENCE_RACES} times")

        return await self._db.run("commit", run_id, job)

    async def _count_write(self) -> None:
        """Count a write; at the :data:`ANALYZE_AFTER`-th, give the planner statistics of the
        tables if it has none (:func:`~agentflow.stores.postgres_schema.analyze_if_never`)."""
        self._until_analyze -= 1
        if self._until_analyze:
            return
        try:
            await self._db.run("analyze", None, analyze_if_never)
        except StoreError as exc:  # statistics are an optimisation: the write goes on without
            log.warning("PostgreSQL store on %s: could not analyze its tables: %s", self.where, exc)

    async def renew(self, run_id: str, lease: Lease, ttl: float) -> str | None:
        """Extend the lease to ``ttl`` seconds past the database's now; return the control flag.

        Raises:
            LeaseLostError: the lease no longer holds.
        """
        key = (self.key_prefix, run_id)
        # With the other leases renewed at this moment (a worker's runs): one statement.
        renewal = {"run_id": run_id, "owner": lease.owner, "token": lease.token, "ttl": float(ttl)}
        row = await self._renewals.write(run_id, None, renewal)
        if row is not None and row is not ALONE:
            return None if row[1] is None else str(row[1])
        # Not renewed (whose lease it is, below) or the batch was refused (alone now).

        async def job(conn: Conn) -> tuple[bool, Any]:
            row = await (await conn.execute(pgrows.RENEW, (ttl, *key, lease.owner, lease.token))).fetchone()
            if row is not None:
                return True, row[0]
            return False, await (await conn.execute(pgrows.SELECT_LEASE, key)).fetchone()

        renewed, value = await self._db.run("renew", run_id, job)
        if not renewed:
            detail = f"the lease is {value[1]} of {value[0]!r}" if value else "the run no longer exists"
            raise LeaseLostError(run_id, f"token {lease.token} of {lease.owner!r} is stale; {detail}")
        return None if value is None else str(value)

    async def events(self, run_id: str, after: int = 0) -> list[RunEvent]:
        """The run's events with ``seq`` greater than ``after``, in order."""

        async def job(conn: Conn) -> list[RunEvent]:
            cursor = await conn.execute(pgrows.SELECT_EVENTS, (self.key_prefix, run_id, after))
            rows = await cursor.fetchall()
            return [make_event(run_id, f"{EVENTS}[{seq}]", body, seq) for seq, body in rows]

        return await self._db.run("events", run_id, job)

    async def delete(self, run_id: str) -> bool:
        """Remove a run with its events, outputs, journal and approvals; False if it did not exist."""

        async def job(conn: Conn) -> bool:
            row = await (await conn.execute(pgrows.DELETE, (self.key_prefix, run_id))).fetchone()
            return bool(row is not None and row[0])

        return await self._db.run("delete", run_id, job)

    def sibling(self) -> PostgresStore:
        """A new store on the same database and options, with a pool of its own (for another loop)."""
        return PostgresStore(
            self.url,
            ttl=self.ttl,
            key_prefix=self.key_prefix,
            retry_for=self.retry_for,
            max_connections=2,
            connect_timeout=self.connect_timeout,
        )

    async def close(self) -> None:
        """Close the pool (and the listening connection); the store is unusable afterwards."""
        await self._close_listener()
        await self._commits.drain()
        await self._creates.drain()
        await self._takes.drain()
        await self._gets.drain()
        await self._loads.drain()
        await self._renewals.drain()
        await self._db.close()
