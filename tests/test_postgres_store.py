"""The PostgreSQL store beyond the conformance suite: its schema, its clock, lost replies,
and a server restarted under a run.

Every test runs against a real server (``postgres_server``), each in a schema of its
own; replies are lost by a TCP proxy in front of it that lets a request through and
drops the connection before its reply comes back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import psycopg.sql
import pytest
from helpers import all_events
from postgres_server import PostgresServer, numbered, rows_scanned
from pydantic import BaseModel
from redis_fakes import LossyProxy, pause
from test_faults import BOUND, Gated

from agentflow import END, START, Next, RunStatus, StoreError, Workflow, WorkflowRunner
from agentflow.errors import LeaseLostError
from agentflow.stores import Change, open_store
from agentflow.stores.contract import Commit, OutputRecord, RunRecord
from agentflow.stores.postgres import PostgresStore
from agentflow.stores.postgres_schema import SCHEMA, VERSION
from agentflow.testing.store_conformance import acquire, event, expire, record, started, store_now


@pytest.fixture
async def proxy(postgres_server: PostgresServer) -> AsyncIterator[LossyProxy]:
    async with LossyProxy(postgres_server.port) as p:
        yield p


def _through(proxy: LossyProxy, url: str) -> str:
    """``url`` with the proxy's port in place of the server's."""
    return url.replace(f":{proxy.target}/", f":{proxy.port}/", 1)


@pytest.fixture
async def stores(postgres_url: str) -> AsyncIterator[list[PostgresStore]]:
    made: list[PostgresStore] = []
    yield made
    for store in made:
        await store.close()


# -- schema ----------------------------------------------------------------------------


async def test_the_schema_is_made_once_by_stores_starting_together(postgres_url: str, stores) -> None:
    stores += [PostgresStore(postgres_url) for _ in range(4)]
    assert await asyncio.gather(*(s.create(record(f"r{i}"), []) for i, s in enumerate(stores))) == [True] * 4
    async with await psycopg.AsyncConnection.connect(postgres_url) as db:
        rows = await (await db.execute(f"SELECT version FROM {SCHEMA}")).fetchall()
    assert rows == [(VERSION,)]


async def test_a_database_of_a_newer_layout_is_refused(postgres_url: str, stores) -> None:
    stores.append(PostgresStore(postgres_url))
    await stores[0].create(record(), [])
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as db:
        await db.execute(f"UPDATE {SCHEMA} SET version = %s", (VERSION + 1,))
    stores.append(PostgresStore(postgres_url))
    with pytest.raises(StoreError, match=f"schema version {VERSION + 1}.*upgrade agentflow"):
        await stores[1].get("r1")


_TABLES = (
    "agentflow_events",
    "agentflow_outputs",
    "agentflow_journal",
    "agentflow_approvals",
    "agentflow_approvers",
)


async def _rows_of(db: psycopg.AsyncConnection, run_id: str) -> dict[str, int]:
    counts = {}
    for table in _TABLES:
        cursor = await db.execute(f"SELECT count(*) FROM {table} WHERE run_id = %s", (run_id,))
        counts[table] = (await cursor.fetchone())[0]
    return counts


async def test_a_version_5_database_loses_its_foreign_keys_and_a_delete_still_takes_every_row(
    postgres_url: str, stores
) -> None:
    """Schema 6 drops the foreign keys whose checks were most of a step's commit; deleting a
    run (and the ttl purge) then deletes its rows in every table itself, and no one else's."""
    from agentflow.stores.postgres_schema import _UPGRADES
    from agentflow.testing._store_approvals import approval, gate_pending

    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as db:
        for version in range(5):  # the layout a database of version 5 has
            for sql in _UPGRADES[version]:
                await db.execute(sql)
        await db.execute(f"CREATE TABLE {SCHEMA} (version integer NOT NULL)")
        await db.execute(f"INSERT INTO {SCHEMA} (version) VALUES (5)")
        found = (
            "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND conrelid::regclass::text = ANY(%s)"
        )
        assert (await (await db.execute(found, (list(_TABLES),))).fetchone())[0] == 5
    store = PostgresStore(postgres_url, ttl=0.5)
    stores.append(store)
    for run_id in ("gone", "kept"):  # a run with a row in each table
        lease = await started(store, run_id)
        commit = Commit(
            fields={
                "visit": 1,
                "step": "B",
                "status": RunStatus.WAITING,
                "pending": gate_pending(approval(run_id)),
            },
            outputs=[OutputRecord(1, "A", 1)],
            events=[event("step_completed", 2)],
            journal={"A/1": "reply"},
            seq=1,
        )
        await store.commit(run_id, lease, commit)
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as db:
        rows = await (await db.execute(f"SELECT version FROM {SCHEMA}")).fetchall()
        assert rows == [(VERSION,)]
        assert (await (await db.execute(found, (list(_TABLES),))).fetchone())[0] == 0
        full = {"agentflow_events": 2, **dict.fromkeys(_TABLES[1:], 1)}
        assert await _rows_of(db, "gone") == full == await _rows_of(db, "kept")
        assert await store.delete("gone") and not await store.delete("gone")
        assert await _rows_of(db, "gone") == dict.fromkeys(_TABLES, 0)
        assert await _rows_of(db, "kept") == full
        # A finished run whose ttl ran out goes with its rows, when the next write purges.
        lease = await acquire(store, "kept")
        done = Commit(fields={"status": RunStatus.COMPLETED, "pending": None}, seq=2)
        await store.commit("kept", lease, done)
        await asyncio.sleep(0.6)
        assert await store.create(record("next"), [])
        assert await _rows_of(db, "kept") == dict.fromkeys(_TABLES, 0)
        assert await store.get("next") is not None


async def test_persistence_opens_it_with_the_url_or_database_url(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    wf = Workflow("Pg").flow({"__start__": lambda ctx: "A", "A": lambda ctx: "__end__"})
    wf.persistence(store="postgres", url=postgres_url, key_prefix="pg:")
    async with WorkflowRunner(wf) as runner:
        assert isinstance(runner.store, PostgresStore) and runner.store.key_prefix == "pg:"
        handle = await runner.run()
        assert (await handle.result(timeout=BOUND)).status == RunStatus.COMPLETED
    monkeypatch.setenv("DATABASE_URL", postgres_url)
    store = open_store("postgres", key_prefix="pg:")
    try:
        assert isinstance(store, PostgresStore)
        assert [r.status for r in await store.list_runs()] == [RunStatus.COMPLETED]
    finally:
        await store.close()


# -- the database's clock ----------------------------------------------------------------


async def test_a_clock_20_s_ahead_sees_no_healthy_run_as_recoverable(
    postgres_url: str, stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, recoverer = PostgresStore(postgres_url), PostgresStore(postgres_url)
    stores += [owner, recoverer]
    leases = [await started(owner, f"r{i}") for i in range(5)]
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 20)  # this machine's clock runs ahead
    assert await recoverer.recoverable("wf") == []
    now = await store_now(recoverer, "r0")  # leases and update's now are the database's
    assert abs(now - real()) < 5
    await recoverer.renew("r0", leases[0], 15.0)
    rec = await recoverer.get("r0")
    assert rec is not None and now + 14 < rec.lease_expires < now + 16
    await expire(owner, "r3")
    assert await recoverer.recoverable("wf") == ["r3"]


# -- outages -----------------------------------------------------------------------------


async def test_an_unreachable_server_is_a_store_error_naming_it_without_the_password() -> None:
    from conftest import free_port

    store = PostgresStore(f"postgresql://u:sekrit@127.0.0.1:{free_port()}/db", retry_for=0.3)
    try:
        started_at = time.monotonic()
        with pytest.raises(
            StoreError, match=r"run r1: PostgreSQL at 127\.0\.0\.1:\d+/db unreachable"
        ) as info:
            await store.get("r1")
        assert "sekrit" not in str(info.value) and time.monotonic() - started_at < 5
    finally:
        await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.get("r1")


# -- lost replies ------------------------------------------------------------------------


async def test_a_commit_whose_reply_is_lost_applies_once_despite_a_pause_in_between(
    proxy: LossyProxy, postgres_url: str, stores
) -> None:
    store, other = PostgresStore(_through(proxy, postgres_url)), PostgresStore(postgres_url)
    stores += [store, other]
    lease = await started(store)

    async def pause_it() -> None:  # the commit ran, its reply is on its way
        await other.update("r1", pause)

    proxy.lose(b"step-lost", pause_it)
    commit = Commit(
        fields={"visit": 1, "step": "step-lost"},
        outputs=[OutputRecord(1, "A", 1)],
        events=[event("step_completed", 2)],
        journal={"A/1": "reply"},
        seq=1,
    )
    assert await store.commit("r1", lease, commit) == "pause"  # recognised: not applied again
    assert proxy.lost == 1
    loaded = await store.load("r1")
    assert loaded is not None and len(loaded.outputs) == 1 and loaded.journal == {"A/1": "reply"}
    kinds = [e.kind for e in await store.events("r1")]
    assert kinds == ["run_started", "step_completed", "pause_requested"]
    assert (loaded.record.event_count, loaded.record.commit_seq, loaded.record.step) == (3, 1, "step-lost")


async def test_an_update_whose_commit_reply_is_lost_is_not_applied_twice(
    proxy: LossyProxy, postgres_url: str, stores
) -> None:
    store = PostgresStore(_through(proxy, postgres_url))
    stores.append(store)
    await store.create(record(), [])
    calls: list[int] = []

    def bump(rec: RunRecord, now: float) -> Change:
        calls.append(rec.visit)
        return Change(dataclasses.replace(rec, visit=rec.visit + 1), [event("bumped", 1)])

    async def nothing() -> None:
        pass

    proxy.lose(b"COMMIT", nothing)  # the transaction is committed; its reply never comes
    rec = await store.update("r1", bump)
    assert proxy.lost == 1 and calls == [0]
    assert rec is not None and rec.visit == 1
    got = await store.get("r1")
    assert got is not None and (got.visit, got.event_count) == (1, 1)


async def test_a_create_whose_reply_is_lost_reports_it_created_the_run(
    proxy: LossyProxy, postgres_url: str, stores
) -> None:
    store, other = PostgresStore(_through(proxy, postgres_url)), PostgresStore(postgres_url)
    stores += [store, other]
    assert await store.create(record("warm-up"), [])  # the schema is ready

    async def take_it() -> None:  # another process takes the new run at once
        await acquire(other, "r1", owner="w2")

    proxy.lose(b"DO NOTHING RETURNING run_id", take_it)  # the creates' one statement ran
    assert await store.create(record("r1"), [event("run_started", 1)])
    assert proxy.lost == 1
    assert not await store.create(record("r1"), [])  # and a real second create is refused
    rec = await store.get("r1")
    assert rec is not None and rec.lease_owner == "w2" and rec.event_count == 1


# -- commits of many runs, together ------------------------------------------------------


def _step(seq: int = 1, step: str = "b") -> Commit:
    return Commit(fields={"visit": seq, "step": step}, events=[event("step_completed", seq + 1)], seq=seq)


async def _writers(postgres_url: str, seq: int) -> int:
    """How many transactions wrote the events numbered ``seq`` (their rows' ``xmin``)."""
    async with await psycopg.AsyncConnection.connect(postgres_url) as db:
        sql = "SELECT count(DISTINCT xmin::text) FROM agentflow_events WHERE seq = %s"
        cur = await db.execute(sql, (seq,))
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_commits_of_many_runs_at_one_moment_are_one_transaction(postgres_url: str, stores) -> None:
    store = PostgresStore(postgres_url)
    stores.append(store)
    leases = [await started(store, f"r{i}") for i in range(30)]
    done = await asyncio.gather(*(store.commit(f"r{i}", lease, _step()) for i, lease in enumerate(leases)))
    assert done == [None] * 30
    assert await _writers(postgres_url, 2) == 1
    for i in range(30):
        rec = await store.get(f"r{i}")
        assert rec is not None and (rec.step, rec.visit, rec.event_count, rec.commit_seq) == ("b", 1, 2, 1)


async def test_a_runs_commits_one_after_another_each_go_at_once(postgres_url: str, stores) -> None:
    """Each commit is sent while no batch is in flight: none waits for a batch that never leaves."""
    store = PostgresStore(postgres_url)
    stores.append(store)
    lease = await started(store)
    for seq in range(1, 6):
        async with asyncio.timeout(5):
            assert await store.commit("r1", lease, _step(seq, step=f"s{seq}")) is None
    rec = await store.get("r1")
    assert rec is not None and (rec.step, rec.commit_seq, rec.event_count) == ("s5", 5, 6)


async def test_two_commits_of_one_run_sent_at_once_are_both_applied_in_order(
    postgres_url: str, stores
) -> None:
    store = PostgresStore(postgres_url)
    stores.append(store)
    lease = await started(store)
    first = Commit(fields={"visit": 1, "step": "b"}, seq=1)
    second = Commit(fields={"visit": 2, "step": "c"}, seq=2)
    both = await asyncio.gather(store.commit("r1", lease, first), store.commit("r1", lease, second))
    assert both == [None, None]
    rec = await store.get("r1")
    assert rec is not None and (rec.step, rec.visit, rec.commit_seq) == ("c", 2, 2)


async def test_a_stale_or_repeated_commit_among_many_fails_or_passes_alone(postgres_url: str, stores) -> None:
    store = PostgresStore(postgres_url)
    stores.append(store)
    leases = [await started(store, f"r{i}") for i in range(10)]
    await store.commit("r3", leases[3], _step())  # r3's commit 1 is applied already
    await acquire(store, "r5", owner="w2")  # r5 was taken over: w1's lease is stale
    results = await asyncio.gather(
        *(store.commit(f"r{i}", lease, _step()) for i, lease in enumerate(leases)), return_exceptions=True
    )
    assert isinstance(results[5], LeaseLostError) and "r5" in str(results[5])
    assert [r for i, r in enumerate(results) if i != 5] == [None] * 9  # r3's again: recognised, not applied
    assert [e.kind for e in await store.events("r3")] == ["run_started", "step_completed"]
    rec = await store.get("r5")
    assert rec is not None and (rec.step, rec.event_count, rec.lease_owner) == (None, 1, "w2")
    assert await _writers(postgres_url, 2) == 2  # r3's own, then the other eight's together


async def test_a_commit_the_server_refuses_fails_alone_and_the_others_of_its_batch_are_applied(
    postgres_url: str, stores
) -> None:
    store = PostgresStore(postgres_url)
    stores.append(store)
    leases = [await started(store, f"r{i}") for i in range(8)]
    bad = _step(step="a\x00b")  # PostgreSQL's text holds no NUL: the whole transaction is refused
    results = await asyncio.gather(
        *(store.commit(f"r{i}", lease, bad if i == 4 else _step()) for i, lease in enumerate(leases)),
        return_exceptions=True,
    )
    assert isinstance(results[4], StoreError) and "r4" in str(results[4]) and "commit" in str(results[4])
    assert [r for i, r in enumerate(results) if i != 4] == [None] * 7
    rec = await store.get("r4")
    assert rec is not None and (rec.step, rec.event_count, rec.commit_seq) == (None, 1, 0)  # nothing written
    for i in (0, 7):
        rec = await store.get(f"r{i}")
        assert rec is not None and (rec.step, rec.event_count) == ("b", 2)


async def test_commits_of_many_runs_whose_reply_is_lost_are_each_applied_once(
    proxy: LossyProxy, postgres_url: str, stores
) -> None:
    store = PostgresStore(_through(proxy, postgres_url))
    stores.append(store)
    leases = [await started(store, f"r{i}") for i in range(12)]

    async def nothing() -> None:
        pass

    proxy.lose(b"step-lost", nothing)  # the batch's transaction is committed; its reply never comes
    commit = _step(step="step-lost")
    done = await asyncio.gather(*(store.commit(f"r{i}", lease, commit) for i, lease in enumerate(leases)))
    assert done == [None] * 12
    assert proxy.lost == 1
    for i in range(12):
        assert [e.kind for e in await store.events(f"r{i}")] == ["run_started", "step_completed"]
        rec = await store.get(f"r{i}")
        assert rec is not None and (rec.step, rec.event_count, rec.commit_seq) == ("step-lost", 2, 1)


async def test_runs_created_at_one_moment_are_one_transaction_and_a_taken_id_is_refused_alone(
    postgres_url: str, stores
) -> None:
    store = PostgresStore(postgres_url)
    stores.append(store)
    assert await store.create(record("r3"), [event("run_started", 1)])  # r3 is taken
    ids = [f"r{i}" for i in range(20)]
    created = await asyncio.gather(*(store.create_queued(record(r), [event("run_started", 1)]) for r in ids))
    assert created == [r != "r3" for r in ids]
    async with await psycopg.AsyncConnection.connect(postgres_url) as db:
        writers = "SELECT count(DISTINCT xmin::text), count(*) FROM agentflow_runs WHERE run_id <> 'r3'"
        cur = await db.execute(writers)
        assert await cur.fetchone() == (1, 19)
        cur = await db.execute("SELECT count(*) FROM agentflow_queue")
        assert await cur.fetchone() == (19,)  # r3 was not queued again
    for r in ids:
        assert [(e.kind, e.seq) for e in await store.events(r)] == [("run_started", 1)]


async def test_runs_taken_at_one_moment_are_one_statement_and_each_gets_its_own_run(
    proxy: LossyProxy, postgres_url: str, stores
) -> None:
    store = PostgresStore(_through(proxy, postgres_url))
    stores.append(store)
    unowned = {"status": RunStatus.RUNNING, "lease_owner": None, "lease_expires": 0.0}
    for i in range(12):
        assert await store.create(record(f"r{i}", workflow="wf", **unowned), [event("run_started", 1)])
    await store.update("r4", lambda rec, now: Change(dataclasses.replace(rec, status=RunStatus.PAUSED)))

    async def nothing() -> None:
        pass

    proxy.lose(b"json_to_recordset", nothing)  # the take's statement ran; its reply never comes
    taken = await asyncio.gather(*(store.take(f"r{i}", "wf", "w1", 30) for i in range(12)))
    assert proxy.lost == 1
    assert taken[4] is None  # paused: not taken, alone
    for i, got in enumerate(taken):
        if i != 4:
            assert got is not None
            lease, loaded = got
            assert loaded.record.run_id == f"r{i}" and (lease.owner, lease.token) == ("w1", 1)
    async with await psycopg.AsyncConnection.connect(postgres_url) as db:
        sql = "SELECT count(DISTINCT xmin::text), min(lease_token), max(lease_token) FROM agentflow_runs"
        cur = await db.execute(f"{sql} WHERE lease_owner = 'w1'")
        assert await cur.fetchone() == (1, 1, 1)  # taken once each, by one statement


async def test_reads_of_many_runs_at_one_moment_are_one_statement_each_kind(
    postgres_url: str, stores
) -> None:
    store = PostgresStore(postgres_url, max_connections=1)  # one connection: its transactions
    stores.append(store)
    ids = [f"r{i}" for i in range(30)]
    await asyncio.gather(*(store.create(record(r), [event("run_started", 1)]) for r in ids))

    async def transactions() -> int:
        async def flush(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute("SELECT pg_stat_force_next_flush()")

        await store._db.run("statistics", None, flush)
        async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as db:
            sql = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            row = await (await db.execute(sql)).fetchone()
        assert row is not None
        return int(row[0])

    before = await transactions()
    records = await asyncio.gather(*(store.get(r) for r in [*ids, "missing"]))
    loaded = await asyncio.gather(*(store.load(r) for r in [*ids, "missing"]))
    assert await transactions() - before <= 8  # one read for each kind, the looks themselves
    assert [rec.run_id for rec in records[:30] if rec is not None] == ids and records[30] is None
    assert [run.record.run_id for run in loaded[:30] if run is not None] == ids and loaded[30] is None


async def test_leases_renewed_at_one_moment_are_one_statement_and_a_stale_one_is_refused_alone(
    postgres_url: str, stores
) -> None:
    store = PostgresStore(postgres_url)
    stores.append(store)
    leases = [await started(store, f"r{i}") for i in range(10)]
    await acquire(store, "r6", owner="w2")  # taken over: w1's lease is stale
    renewed = await asyncio.gather(
        *(store.renew(f"r{i}", lease, 60.0) for i, lease in enumerate(leases)), return_exceptions=True
    )
    assert isinstance(renewed[6], LeaseLostError) and "r6" in str(renewed[6]) and "w2" in str(renewed[6])
    assert [r for i, r in enumerate(renewed) if i != 6] == [None] * 9
    async with await psycopg.AsyncConnection.connect(postgres_url) as db:
        sql = "SELECT count(DISTINCT xmin::text) FROM agentflow_runs WHERE lease_owner = 'w1'"
        assert await (await db.execute(sql)).fetchone() == (1,)


async def test_a_worker_renews_the_leases_of_its_runs_in_one_statement(postgres_url: str) -> None:
    release = asyncio.Event()

    async def wait(ctx: Any) -> Any:
        await release.wait()
        return END

    wf = (
        Workflow("Renewed")
        .flow({START: wait})
        .persistence(store="postgres", url=postgres_url, lease_ttl=0.9)  # renewed every 0.3 s
    )
    async with WorkflowRunner(wf) as runner:
        handles = [await runner.run() for _ in range(20)]
        sql = "SELECT count(DISTINCT xmin::text), count(*) FROM agentflow_runs WHERE status = 'running'"
        seen = []
        async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as db:
            give_up = time.monotonic() + 10
            while time.monotonic() < give_up:  # one round of renewals after the runs' first commits
                seen.append(await (await db.execute(sql)).fetchone())
                if seen[-1] == (1, 20):
                    break
                await asyncio.sleep(0.1)
        release.set()
        for h in handles:
            await h.result(timeout=BOUND)
    assert seen[-1] == (1, 20), seen  # every lease renewed by the one statement of a round


async def test_connect_opens_the_pool_and_makes_the_tables_ready(postgres_url: str, stores) -> None:
    from agentflow.stores.capabilities import Connects

    store = PostgresStore(postgres_url)
    stores.append(store)
    assert isinstance(store, Connects)
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as db:
        before = await (await db.execute(f"SELECT to_regclass('{SCHEMA}') IS NOT NULL")).fetchone()
        await store.connect()
        after = await (await db.execute(f"SELECT max(version) FROM {SCHEMA}")).fetchone()
    assert before == (False,) and after == (VERSION,)


async def test_waiting_for_a_connection_of_a_busy_pool_is_not_an_outage(postgres_url: str, stores) -> None:
    """Calls queue for the pool's connections for longer than ``retry_for``: none fails."""
    store = PostgresStore(postgres_url, max_connections=2, retry_for=0.5)
    stores.append(store)
    assert await store.create(record("warm-up"), [])  # the schema is ready

    async def slow(conn) -> None:  # a call that holds its connection for 0.1 s
        await conn.execute("SELECT pg_sleep(0.1)")

    started = time.monotonic()
    # 20 such calls on 2 connections: the last waits about 1 s, twice ``retry_for``.
    await asyncio.gather(*(store._db.run("a slow call", None, slow) for _ in range(20)))
    assert time.monotonic() - started >= 0.9
    assert await store.create(record("r1"), [])


async def test_a_pool_that_completes_nothing_is_an_outage_after_retry_for(postgres_url: str, stores) -> None:
    store = PostgresStore(postgres_url, max_connections=1, retry_for=0.5)
    stores.append(store)
    assert await store.create(record("warm-up"), [])
    held = asyncio.Event()

    async def hold(conn) -> None:  # keeps the only connection far longer than retry_for
        held.set()
        await conn.execute("SELECT pg_sleep(3)")

    holder = asyncio.create_task(store._db.run("holding", None, hold))
    await held.wait()
    started = time.monotonic()
    with pytest.raises(StoreError, match=r"unreachable for 0.5 s during create \(no connection came free\)"):
        await store.create(record("r1"), [])
    assert 0.4 < time.monotonic() - started < 2.5
    await holder


# -- a server restarted under a run -----------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_a_server_restart_between_steps_does_not_fail_the_run(
    postgres_server: PostgresServer, postgres_url: str, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The step's completion meets the restart: its commit is retried until the server is back.

    ``immediate`` is a crash of the server: what was committed before is there after.
    A store that gives up quickly (``retry_for``) hands the outage to the engine, which
    retries the commit until it answers; nothing is failed, nothing runs twice.
    """
    store = PostgresStore(postgres_url, retry_for=0.5)
    g = Gated(gate=False)
    try:
        async with WorkflowRunner(g.workflow("Restart"), store=store) as runner:
            handle = await runner.run()
            finishing = asyncio.create_task(handle.result())
            await asyncio.wait_for(g.started.wait(), BOUND)
            await asyncio.to_thread(postgres_server.stop, mode)
            try:
                g.release.set()  # the step's commit meets the outage
                await asyncio.sleep(1.5)
                assert not finishing.done(), "the run ended during the outage"
            finally:
                await asyncio.to_thread(postgres_server.start)
            result = await asyncio.wait_for(finishing, 20)
            assert result.status == RunStatus.COMPLETED and result.output == "done"
            kinds = [e.kind for e in await all_events(handle)]
    finally:
        await store.close()
    assert kinds.count("step_completed") == 3 and "failed" not in kinds
    assert g.ran == ["Work", "Done"]
    assert "retried until it answers" in caplog.text  # the outage reached the engine


async def test_a_lease_lost_across_a_restart_is_still_refused(
    postgres_server: PostgresServer, postgres_url: str, stores
) -> None:
    store, other = PostgresStore(postgres_url), PostgresStore(postgres_url)
    stores += [store, other]
    lease = await started(store)
    await store.commit("r1", lease, Commit(fields={"step": "B"}, seq=1))
    await asyncio.to_thread(postgres_server.restart)
    await acquire(other, owner="w2")  # both stores reconnect by themselves
    with pytest.raises(LeaseLostError):
        await store.commit("r1", lease, Commit(fields={"step": "C"}, seq=2))
    rec = await store.get("r1")
    assert rec is not None and (rec.step, rec.lease_owner, rec.commit_seq) == ("B", "w2", 1)


class Laps(BaseModel):
    n: int = 0


@pytest.mark.timeout(60)
async def test_runs_under_load_through_a_server_crash_all_complete_with_no_step_run_twice(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    """Twenty runs of forty steps each; the server crashes and comes back while they go."""
    steps = 40
    ran: dict[tuple[str, int], int] = {}

    async def lap(ctx):
        n = ctx.state.n
        ran[(ctx.run_id, n)] = ran.get((ctx.run_id, n), 0) + 1
        ctx.set_state(n=n + 1)
        await asyncio.sleep(0.005)
        return "Lap" if n + 1 < steps else Next(END, output=n + 1)

    wf = Workflow("Load").state(Laps).flow({START: lambda ctx: "Lap", "Lap": lap}).max_steps(steps + 5)
    store = PostgresStore(postgres_url, retry_for=1.0)
    try:
        async with WorkflowRunner(wf, store=store) as runner:
            handles = [await runner.run(run_id=f"load-{i}") for i in range(20)]
            await asyncio.sleep(0.1)
            assert 0 < len(ran) < 20 * steps  # in the middle of it
            await asyncio.to_thread(postgres_server.restart, "immediate")
            results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 40)
    finally:
        await store.close()
    assert [r.output for r in results] == [steps] * 20
    assert len(ran) == 20 * steps and set(ran.values()) == {1}


# -- cost follows what is returned -----------------------------------------------------


async def _store_finished(db: psycopg.AsyncConnection[Any], ns: str, n: int) -> None:
    """``n`` finished runs of workflow ``wf`` under prefix ``ns``, written straight into the
    table (fast), and the table analyzed."""
    from agentflow.stores.postgres_rows import RUNS

    await db.execute(
        f"INSERT INTO {RUNS} (ns, run_id, workflow, status, visit, pending, decisions, error, "
        "usage, created_at, updated_at, event_count, lease_token, lease_expires, commit_token, "
        "commit_seq, parent, children) SELECT %s, 'done-' || i, 'wf', 'completed', 0, 'null', '[]', "
        "'null', 'null', i, i, 0, 0, 0, 0, 0, 'null', '[]' FROM generate_series(1, %s) AS i",
        (ns, n),
    )
    await db.execute(f"ANALYZE {RUNS}")


async def test_listings_read_indexes_not_every_stored_run(postgres_url: str, stores) -> None:
    """With 20,000 finished runs stored, each listing's plan is an index scan of what it returns."""
    from agentflow.stores import postgres_index as pgindex
    from agentflow.stores import postgres_rows as pgrows

    store = PostgresStore(postgres_url)
    stores.append(store)
    await started(store, "live")
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as db:
        await _store_finished(db, "", 20000)
        light = f"{pgrows.SELECT_LIGHT} WHERE ns = %s AND {pgrows.LIVE}"
        queries = [
            (pgindex._SELECT_RECOVERABLE, ("", "wf", 10)),
            (pgindex._SELECT_DUE, ("", "wf", time.time())),
            (f"{light} AND status = %s ORDER BY created_at DESC, id DESC LIMIT %s", ("", "running", 10)),
            (f"{light} AND workflow = %s ORDER BY created_at DESC, id DESC LIMIT %s", ("", "wf", 10)),
            (pgindex._page_of_approvals(True, False, False, False), ("", "ops", 10)),
        ]
        for query, params in queries:
            cursor = await db.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}", params)
            plan = (await cursor.fetchone())[0][0]["Plan"]
            nodes, read = [plan], 0
            while nodes:
                node = nodes.pop()
                assert "Seq Scan" not in node["Node Type"], plan
                read += node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
                nodes += node.get("Plans", [])
            assert read <= 30, (query, plan)  # rows read: a page (10), not the 20,000
    assert [r.run_id for r in await store.list_runs(status=RunStatus.RUNNING)] == ["live"]


async def test_commits_of_many_runs_read_their_rows_not_the_table_however_it_grew(
    postgres_url: str, stores
) -> None:
    """A batch's first commits are planned while the table holds a few runs (a hash join
    over the whole table is then the cheapest plan); 3,000 runs later, a batch must still
    read its own rows by their key, not every run."""
    from agentflow.stores.postgres_rows import RUNS

    store = PostgresStore(postgres_url, max_connections=1)  # one connection: its plans, its statistics
    stores.append(store)
    leases = [await started(store, f"r{i}") for i in range(5)]
    for seq in (1, 2):  # planned on a table of five runs
        await asyncio.gather(*(store.commit(f"r{i}", lease, _step(seq)) for i, lease in enumerate(leases)))

    async def read() -> int:
        async def flush(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute("SELECT pg_stat_force_next_flush()")  # at the end of this statement

        await store._db.run("statistics", None, flush)
        async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as db:
            sql = f"SELECT seq_tup_read FROM pg_stat_user_tables WHERE relname = '{RUNS}'"
            row = await (await db.execute(sql)).fetchone()
        assert row is not None
        return int(row[0])

    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as db:
        await _store_finished(db, "other:", 3000)
    before = await read()
    done = await asyncio.gather(*(store.commit(f"r{i}", lease, _step(3)) for i, lease in enumerate(leases)))
    assert done == [None] * 5
    assert await read() - before < 100


async def test_a_table_never_analyzed_is_analyzed_by_the_store_so_a_batch_reads_its_own_runs(
    postgres_url: str, stores
) -> None:
    """In new tables (this test's own schema) the planner has no statistics: it guesses
    ``ns = $1`` matches a few rows and plans a batch of ten commits as a scan of every run
    of the prefix. A store that has made its first thousand writes gives the tables their
    statistics when autovacuum has not yet, and the batch then reads its ten runs by key."""
    from agentflow.stores import postgres_rows as pgrows
    from agentflow.stores.postgres_schema import ANALYZE_AFTER

    store = PostgresStore(postgres_url)
    stores.append(store)
    ids = [f"r{i}" for i in range(3 * ANALYZE_AFTER)]
    made = await asyncio.gather(*(store.create(record(r), [event("run_started", 1)]) for r in ids))
    assert all(made)
    statement = numbered(
        pgrows.commits_statement(("step", "visit"), False, False, True, False, False), ("batch", "ns")
    )
    batch = [
        {"run_id": r, "owner": "w1", "token": 1, "seq": 1, "n": 1, "step": "b", "visit": 1, "events": ["{}"]}
        for r in ids[100:110]
    ]
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as db:
        await db.execute("SET plan_cache_mode = force_generic_plan")  # as the store's connections
        await db.execute(f"PREPARE commits(json, text) AS {statement}")
        async with db.transaction(force_rollback=True):
            explain = psycopg.sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE commits({}, '')")
            explain = explain.format(psycopg.sql.Literal(json.dumps(batch)))
            plan = (await (await db.execute(explain)).fetchone())[0]
    assert rows_scanned(plan[0]["Plan"], pgrows.RUNS) <= 20, plan  # its ten runs, not 3,000


async def test_a_run_is_found_by_its_key_whatever_the_planner_knows_of_its_prefix(
    postgres_url: str, stores
) -> None:
    """With another prefix's 3,000 runs analyzed, the planner guesses that a new prefix has
    a run or two; the store's lookups by run id must still read one row, not every run of
    the prefix (a take read about 900 a call, through the index by workflow and status)."""
    from agentflow.stores import postgres_rows as pgrows
    from agentflow.stores.postgres_take import TAKE

    old, new = PostgresStore(postgres_url, key_prefix="old:"), PostgresStore(postgres_url, key_prefix="new:")
    stores += [old, new]
    await old.create(record("warm-up"), [])  # the schema is ready
    unowned = {"status": RunStatus.RUNNING, "lease_owner": None, "lease_expires": 0.0}
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as db:
        await _store_finished(db, "old:", 3000)
        for i in range(300):  # queued for workers, after the statistics were taken
            assert await new.create_queued(record(f"q{i}", workflow="wf", **unowned), [])

        async def rows_read(sql: str) -> int:
            plan = (await (await db.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}")).fetchone())[0]
            return rows_scanned(plan[0]["Plan"], pgrows.RUNS)

        # The store runs the generic plan of each statement (planned once per connection),
        # which takes the prefix for an average one.
        await db.execute("SET plan_cache_mode = force_generic_plan")
        take = numbered(TAKE, ("ns", "run_id", "workflow", "owner", "ttl", "nonce"))
        await db.execute(f"PREPARE take AS {take}")
        full = pgrows.SELECT_FULL.replace("%s", "$1", 1).replace("%s", "$2", 1)
        await db.execute(f"PREPARE full_record AS {full}")
        # The row taken, and the look of a retry after a lost reply (which finds none).
        assert await rows_read("EXECUTE take('new:', 'q7', 'wf', 'w1', 15.0, 'n')") <= 2
        assert await rows_read("EXECUTE full_record('new:', 'q9')") == 1

    async def setting(conn: psycopg.AsyncConnection[Any]) -> str:
        return (await (await conn.execute("SHOW plan_cache_mode")).fetchone())[0]

    assert await new._db.run("a look at the session", None, setting) == "force_generic_plan"
