"""The work queue every store offers workers (``WorkQueue``): per-workflow FIFO, claims
bounded by the limit, each entry to one consumer, redelivery of what a dead consumer
claimed and never acknowledged, and a wait that ends as soon as work arrives."""

from __future__ import annotations

import asyncio
import time

import pytest

from agentflow.stores import capabilities
from agentflow.stores.capabilities import CreatesQueued, WorkQueue
from agentflow.stores.contract import RunRecord
from agentflow.testing.store_builders import event, record
from agentflow.types import RunStatus

QUEUE_KINDS = ("memory", "sqlite", "redis", "postgres")


@pytest.fixture(params=QUEUE_KINDS)
def queue(request: pytest.FixtureRequest, make_store) -> WorkQueue:
    options = {} if request.param == "memory" else {"key_prefix": f"q{time.monotonic_ns()}:"}
    store = make_store(request.param, **options)
    assert isinstance(store, WorkQueue)
    return store


async def test_entries_come_oldest_first_per_workflow_and_never_more_than_asked(queue: WorkQueue) -> None:
    for run_id in ("a1", "a2", "a3"):
        await queue.enqueue("A", run_id)
    await queue.enqueue("B", "b1")
    first = await queue.claim(["A"], "w1", 2, 0)
    assert [(c.workflow, c.run_id) for c in first] == [("A", "a1"), ("A", "a2")]
    rest = await queue.claim(["A", "B"], "w1", 10, 0)
    assert sorted(c.run_id for c in rest) == ["a3", "b1"]
    assert await queue.claim(["A", "B"], "w1", 10, 0) == []
    assert await queue.claim(["C"], "w1", 10, 0) == []  # a queue nobody filled


async def test_a_claimed_entry_is_not_delivered_again_unless_its_consumer_never_acknowledged(
    queue: WorkQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    await queue.enqueue("A", "r1")
    await queue.enqueue("A", "r2")
    c1, _ = await queue.claim(["A"], "dead-worker", 2, 0)
    await queue.ack([c1])
    assert await queue.claim(["A"], "w2", 10, 0) == []
    monkeypatch.setattr(capabilities, "REDELIVER_AFTER", 0.05)
    await asyncio.sleep(0.1)
    (again,) = await queue.claim(["A"], "w2", 10, 0)
    assert again.run_id == "r2"  # the dead worker's unacknowledged entry, to another worker
    await queue.ack([again])
    await asyncio.sleep(0.1)
    assert await queue.claim(["A"], "w3", 10, 0) == []


async def test_a_waiting_claim_returns_as_soon_as_work_arrives(queue: WorkQueue) -> None:
    async def later() -> None:
        await asyncio.sleep(0.1)
        await queue.enqueue("A", "r1")

    started = time.monotonic()
    task = asyncio.create_task(later())
    (claim,) = await queue.claim(["A"], "w1", 5, 5.0)
    await task
    assert claim.run_id == "r1" and time.monotonic() - started < 1.0
    empty = time.monotonic()
    assert await queue.claim(["A"], "w1", 5, 0.2) == []
    assert 0.15 < time.monotonic() - empty < 1.0


async def test_depth_counts_what_waits_and_how_long(queue: WorkQueue) -> None:
    assert (await queue.queue_depth("A")).waiting == 0
    await queue.enqueue("A", "r1")
    await asyncio.sleep(0.05)
    await queue.enqueue("A", "r2")
    depth = await queue.queue_depth("A")
    assert depth.waiting == 2 and depth.oldest_age is not None and depth.oldest_age >= 0.04
    await queue.claim(["A"], "w1", 1, 0)
    assert (await queue.queue_depth("A")).waiting == 1


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
async def test_two_consumers_on_one_store_never_get_the_same_entry(make_store, kind) -> None:
    one, two = make_store(kind, key_prefix="race:"), make_store(kind, key_prefix="race:")
    for i in range(200):
        await one.enqueue("A", f"r{i}")
    got: list[str] = []

    async def consume(store, name: str) -> None:
        while claims := await store.claim(["A"], name, 7, 0):
            got.extend(c.run_id for c in claims)
            await store.ack(claims)

    await asyncio.gather(consume(one, "w1"), consume(two, "w2"), consume(one, "w3"))
    assert sorted(got) == sorted(f"r{i}" for i in range(200))


async def test_a_postgres_database_of_the_first_layout_gets_its_queue_in_place(postgres_url) -> None:
    import psycopg

    from agentflow.stores.postgres import PostgresStore
    from agentflow.stores.postgres_schema import _UPGRADES, SCHEMA, VERSION

    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as db:
        for sql in _UPGRADES[0]:  # a database written before workers existed
            await db.execute(sql)
        await db.execute(f"CREATE TABLE {SCHEMA} (version integer NOT NULL)")
        await db.execute(f"INSERT INTO {SCHEMA} (version) VALUES (1)")
    store = PostgresStore(postgres_url)
    try:
        await store.enqueue("A", "r1")
        (claim,) = await store.claim(["A"], "w1", 5, 0)
        assert claim.run_id == "r1"
    finally:
        await store.close()
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as db:
        rows = await (await db.execute(f"SELECT version FROM {SCHEMA}")).fetchall()
    assert rows == [(VERSION,)] and VERSION == 6


# -- a run created and queued in one operation (CreatesQueued) -----------------------------


def _unowned(run_id: str, workflow: str = "A") -> RunRecord:
    """A client's new run: running, no owner (handed to the workers as it is created)."""
    return record(run_id, workflow=workflow, status=RunStatus.RUNNING, lease_owner=None, lease_expires=0.0)


@pytest.mark.parametrize("kind", [*QUEUE_KINDS, "redis_cluster"])
async def test_a_run_created_queued_is_claimable_at_once_and_a_taken_id_queues_nothing(
    kind: str, make_store
) -> None:
    options = {} if kind == "memory" else {"key_prefix": f"cq{time.monotonic_ns()}:"}
    store = make_store(kind, **options)
    assert isinstance(store, CreatesQueued) and isinstance(store, WorkQueue)
    assert await store.create_queued(_unowned("r1"), [event("run_started", 1)])
    (claim,) = await store.claim(["A"], "w1", 5, 0)
    assert (claim.workflow, claim.run_id) == ("A", "r1")
    rec = await store.get("r1")
    assert rec is not None and rec.status == RunStatus.RUNNING and rec.event_count == 1
    assert [e.kind for e in await store.events("r1")] == ["run_started"]
    await store.ack([claim])
    # The id is taken: nothing is written, nothing queued, and the stored run is as it was.
    assert not await store.create_queued(_unowned("r1"), [event("run_started", 1), event("x", 2)])
    assert await store.claim(["A"], "w1", 5, 0) == []
    again = await store.get("r1")
    assert again is not None and again.event_count == 1
    # Queued for its own workflow only.
    assert await store.create_queued(_unowned("r2", workflow="B"), [])
    assert await store.claim(["A"], "w1", 5, 0) == []
    assert [c.run_id for c in await store.claim(["B"], "w1", 5, 0)] == ["r2"]


async def test_a_redis_create_queued_whose_reply_is_lost_queues_the_run_once(redis_server, redis_url) -> None:
    from redis_fakes import LossyProxy, db_of

    from agentflow.stores.redis import RedisStore

    async def nothing() -> None:
        return None

    prefix = f"cq{time.monotonic_ns()}:"
    async with LossyProxy(redis_server.port) as proxy:
        store = RedisStore(proxy.url(db_of(redis_url)), key_prefix=prefix)
        try:
            assert await store.create_queued(_unowned("warm-up"), [])  # script loaded, queue made
            await store.ack(await store.claim(["A"], "w1", 5, 0))
            proxy.lose(b"#q:{A}", nothing)  # the create's script names the queue's stream
            assert await store.create_queued(_unowned("r1"), [event("run_started", 1)])
            assert proxy.lost == 1
            claims = await store.claim(["A"], "w1", 5, 0)
            assert [c.run_id for c in claims] == ["r1"]  # one entry, though the script was sent twice
            rec = await store.get("r1")
            assert rec is not None and rec.event_count == 1
        finally:
            await store.close()


async def test_a_postgres_create_queued_whose_reply_is_lost_queues_the_run_once(
    postgres_server, postgres_url
) -> None:
    from redis_fakes import LossyProxy

    from agentflow.stores.postgres import PostgresStore

    async def nothing() -> None:
        return None

    async with LossyProxy(postgres_server.port) as proxy:
        url = postgres_url.replace(f":{proxy.target}/", f":{proxy.port}/", 1)
        store = PostgresStore(url)
        try:
            assert await store.create(record("warm-up"), [])  # the schema is ready
            proxy.lose(b"agentflow_queued", nothing)  # the create and its queue entry ran
            assert await store.create_queued(_unowned("r1"), [event("run_started", 1)])
            assert proxy.lost == 1
            claims = await store.claim(["A"], "w1", 5, 0)
            assert [c.run_id for c in claims] == ["r1"]
        finally:
            await store.close()


async def test_a_postgres_claim_reads_what_it_returns_however_many_entries_wait(postgres_url) -> None:
    """With 2,000 entries of the workflow and 2,000 of another queued, and 300 claimed, a
    claim of 10 reads about 10 entries (it read every waiting one, from the index by
    claim time where the unclaimed sort last); and it still claims the oldest first,
    an entry whose claim ran out before the fresh ones."""
    import psycopg
    from postgres_server import numbered, rows_scanned

    from agentflow.stores.postgres import PostgresStore
    from agentflow.stores.postgres_queue import CLAIM

    store = PostgresStore(postgres_url)
    try:
        async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as db:
            await store.enqueue("A", "warm-up")  # the tables are ready
            await db.execute(
                "INSERT INTO agentflow_queue (ns, workflow, run_id, enqueued_at) "
                "SELECT '', w, w || i, i FROM generate_series(1, 2000) AS i, unnest(ARRAY['A', 'B']) AS w"
            )
            assert len(await store.claim(["A"], "w1", 300, 0)) == 300
            await db.execute("ANALYZE agentflow_queue")
            await db.execute("SET plan_cache_mode = force_generic_plan")
            claim = numbered(CLAIM, ("owner", "ns", "workflows", "after", "n"))
            await db.execute(f"PREPARE claim AS {claim}")
            cursor = await db.execute("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE claim('w2', '', '{A}', 30, 10)")
            plan = (await cursor.fetchone())[0][0]["Plan"]
            assert rows_scanned(plan, "agentflow_queue") <= 40, plan
            # The oldest entries first, and one whose claim ran out before them all.
            await db.execute("UPDATE agentflow_queue SET claimed_at = claimed_at - 60 WHERE run_id = 'A150'")
        got = await store.claim(["A"], "w3", 3, 0)
        assert [c.run_id for c in got] == ["A150", "A310", "A311"]  # A300..A309 went to w2, above
    finally:
        await store.close()
