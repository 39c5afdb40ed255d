"""RedisStore's connections: the lane (replies read from bytes however they are cut, many
runs' commits in few writes, both protocol versions, replies that do not come, connections
handed back, nothing held for runs gone), the pool (waiting for a connection is not an
outage) and outages (a restart, an unreachable server)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import RedisServer, free_port
from redis.exceptions import NoScriptError, ResponseError
from redis_fakes import CountingConnection, LossyProxy, bare_redis_server, db_of, pause

from agentflow.errors import StoreError
from agentflow.stores import Change, Lease
from agentflow.stores.contract import Commit, OutputRecord
from agentflow.stores.redis import RedisStore
from agentflow.stores.redis_lane import Parser
from agentflow.testing.store_conformance import event, record, started
from agentflow.types import RunStatus


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[LossyProxy]:
    async with LossyProxy(redis_server.port) as p:
        yield p


@pytest.fixture(scope="module")
def bare_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with bare_redis_server(tmp_path_factory.mktemp("bare-redis")) as port:
        yield port


# What Redis may send (RESP2 and RESP3), and what the parser makes of it. (No big
# numbers, attributes or blob errors: hiredis reads the first as bytes and not the other
# two, and no command the store sends is answered with them.)
REPLIES: list[tuple[bytes, Any]] = [
    (b":3\r\n", 3),
    (b"+OK\r\n", b"OK"),
    (b"$5\r\nhe\r\nl\r\n", b"he\r\nl"),  # a bulk string holding CR LF
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (b"_\r\n", None),
    (b"#t\r\n", True),
    (b",1.5\r\n", 1.5),
    (b"=8\r\ntxt:abcd\r\n", b"abcd"),
    (b"*4\r\n:3\r\n$4\r\nnull\r\n*2\r\n:1\r\n*1\r\n$1\r\nx\r\n$0\r\n\r\n", [3, b"null", [1, [b"x"]], b""]),
    (b"%2\r\n$1\r\na\r\n:1\r\n$1\r\nb\r\n*1\r\n:2\r\n", {b"a": 1, b"b": [2]}),
    (b"~2\r\n:1\r\n:2\r\n", [1, 2]),
    (b">2\r\n$7\r\nmessage\r\n$1\r\nx\r\n:7\r\n", 7),  # a push is dropped, the reply after it read
    (b"$20000\r\n" + b"v" * 20000 + b"\r\n", b"v" * 20000),
    (b"*2\r\n-WRONGTYPE Operation against a key\r\n:1\r\n", [ResponseError, 1]),
    (b"-NOSCRIPT No matching script\r\n", NoScriptError),
]


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, type):
        return type(got) is want
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(_same, got, want))
    return bool(got == want) and type(got) is type(want)


def test_the_parser_reads_every_reply_however_the_bytes_are_cut() -> None:
    stream = b"".join(data for data, _ in REPLIES)
    want = [value for _, value in REPLIES]
    rng = random.Random(7)
    for cuts in [[], list(range(1, len(stream)))] + [
        sorted(rng.sample(range(1, len(stream)), k)) for k in (1, 3, 10, 100) for _ in range(20)
    ]:
        parser, got = Parser(), []
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            got += parser.feed(stream[start:end])
        assert len(got) == len(want) and all(map(_same, got, want)), cuts


def test_bytes_that_are_not_resp_fail_the_connection() -> None:
    from redis.exceptions import ConnectionError

    with pytest.raises(ConnectionError, match="Protocol error"):
        Parser().feed(b"?what\r\n")


async def test_many_runs_commits_go_in_few_writes(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, connection_class=CountingConnection)
    store = RedisStore(client=client)
    try:
        leases = [await started(store, f"r{i}") for i in range(200)]
        await store.commit("r0", leases[0], Commit(fields={"step": "A"}, seq=1))  # loads the script
        CountingConnection.sends = 0

        async def commit(i: int) -> None:
            commit = Commit(
                fields={"step": "B"}, events=[event("e", 2)], outputs=[OutputRecord(1, "A", i)], seq=2
            )
            assert await store.commit(f"r{i}", leases[i], commit) is None

        await asyncio.gather(*(commit(i) for i in range(200)))
        assert CountingConnection.sends <= 10  # one write per turn of the event loop, not per commit
        for i in (0, 99, 199):
            loaded = await store.load(f"r{i}")
            assert loaded is not None and loaded.record.step == "B" and loaded.outputs[0].value == i
    finally:
        await store.close()
        await client.aclose()


async def test_connect_opens_the_shared_connection_and_loads_every_script(redis_url: str) -> None:
    from agentflow.stores import lua
    from agentflow.stores.capabilities import Connects

    admin = aioredis.Redis.from_url(redis_url)
    client = aioredis.Redis.from_url(redis_url, connection_class=CountingConnection)
    store = RedisStore(client=client, key_prefix=f"conn{time.monotonic_ns()}:")
    try:
        assert isinstance(store, Connects)
        await admin.script_flush()  # a server that knows none of them (a restart)
        await store.connect()
        shas = [s.sha for s in lua.BY_SHA.values()]
        assert await admin.script_exists(*shas) == [True] * len(shas)
        # The first burst of calls finds its scripts: no call is sent twice.
        CountingConnection.sends = 0
        assert all(await asyncio.gather(*(store.create(record(f"r{i}"), []) for i in range(50))))
        assert CountingConnection.sends <= 3
    finally:
        await store.close()
        await client.aclose()
        await admin.aclose()


async def test_a_runner_whose_store_does_not_answer_starts_all_the_same() -> None:
    from agentflow import END, START, Workflow, WorkflowRunner

    wf = Workflow("Down").flow({START: lambda ctx: END})
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", retry_for=30)  # nothing listens there
    started = time.monotonic()
    async with WorkflowRunner(wf, store=store):
        entered = time.monotonic() - started
    await store.close()
    assert entered < 3.5  # waited briefly for the connection, then carried on


async def test_requests_of_a_long_turn_go_out_before_the_turn_ends(redis_url: str) -> None:
    """Thousands of runs starting in one turn of the loop (``gather``) are not held back
    until the last is made: what waits is written whenever 64 KB have gathered."""
    client = aioredis.Redis.from_url(redis_url, connection_class=CountingConnection)
    store = RedisStore(client=client, key_prefix=f"turn{time.monotonic_ns()}:")
    try:
        await store.create(record("warm-up"), [])  # the lane is open, the script loaded
        big = {"text": "x" * 4000}
        CountingConnection.sends = 0
        tasks = [asyncio.ensure_future(store.create(record(f"r{i}", input=big), [])) for i in range(100)]
        await asyncio.sleep(0)  # one turn: every task makes its request, nothing is read yet
        # 100 requests of over 4 KB: several writes already, not one at the end of the turn.
        assert CountingConnection.sends >= 5
        assert all(await asyncio.gather(*tasks))
        assert CountingConnection.sends <= 12
    finally:
        await store.close()
        await client.aclose()


@pytest.mark.parametrize("protocol", [2, 3])
async def test_every_operation_speaks_either_protocol(redis_url: str, protocol: int) -> None:
    client = aioredis.Redis.from_url(redis_url, protocol=protocol)
    store = RedisStore(client=client, ttl=60)
    try:
        lease = await started(store)
        commit = Commit(
            fields={"step": "B", "visit": 1},
            outputs=[OutputRecord(1, "A", {"x": 1})],
            events=[event("step_completed", 2)],
            journal={"A/1": "reply"},
            seq=1,
        )
        assert await store.commit("r1", lease, commit) is None
        assert await store.renew("r1", lease, 15.0) is None
        await store.update("r1", pause)
        assert await store.commit("r1", lease, Commit(fields={"step": "C"}, seq=2)) == "pause"
        rec = await store.get("r1")
        assert rec is not None and (rec.step, rec.control, rec.event_count) == ("C", "pause", 3)
        loaded = await store.load("r1")
        assert loaded is not None and loaded.journal == {"A/1": "reply"} and len(loaded.outputs) == 1
        assert [e.seq for e in await store.events("r1", after=1)] == [2, 3]
        final = Commit(fields={"status": RunStatus.COMPLETED, "control": None}, release=True, seq=3)
        assert await store.commit("r1", lease, final) is None
        assert [r.run_id for r in await store.list_runs(status=RunStatus.COMPLETED)] == ["r1"]
        assert await store.get("nope") is None and await store.load("nope") is None
        assert await store.delete("r1") and await store.list_runs() == []
    finally:
        await store.close()
        await client.aclose()


async def test_a_reply_that_does_not_come_within_the_socket_timeout_counts_as_an_outage(
    proxy: LossyProxy, redis_url: str
) -> None:
    store = RedisStore(proxy.url(db_of(redis_url)), socket_timeout=0.2, retry_for=1.0)
    try:
        lease = await started(store)
        proxy.delay = 0.5
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="unreachable for 1 s"):
            await store.commit("r1", lease, Commit(fields={"step": "B"}, seq=1))
        assert time.monotonic() - t0 < 3
        proxy.delay = 0
        # The commit may have been applied: sent again, it is recognised.
        assert await store.commit("r1", lease, Commit(fields={"step": "B"}, seq=1)) is None
        assert await store.commit("r1", lease, Commit(fields={"step": "C"}, seq=2)) is None
        rec = await store.get("r1")
        assert rec is not None and (rec.step, rec.commit_seq) == ("C", 2)
    finally:
        await store.close()


async def test_closing_hands_the_connection_back_to_a_given_client(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, max_connections=2)
    store = RedisStore(client=client)
    try:
        await store.create(record(), [])
        pool = client.connection_pool
        assert len(pool._in_use_connections) == 1  # the lane's
        await store.close()
        assert len(pool._in_use_connections) == 0
        assert await client.exists(store.keys.run("r1").rec) == 1  # the client still works
        with pytest.raises(StoreError, match="closed"):
            await store.get("r1")
    finally:
        await client.aclose()


async def test_the_store_holds_nothing_for_runs_that_left_the_process(redis_url: str) -> None:
    store = RedisStore(redis_url)
    try:
        for i in range(50):
            lease = await started(store, f"r{i}")
            await store.commit(f"r{i}", lease, Commit(fields={"step": "B"}, seq=1))
            gate = Commit(
                fields={"status": RunStatus.WAITING, "pending": {"deadline": None}}, release=True, seq=2
            )
            await store.commit(f"r{i}", lease, gate)
        for i in range(100):  # reading runs (a watcher, say) keeps nothing either
            await store.get(f"r{i}")
            await store.load(f"r{i}")
        assert store._known.runs == {}
        assert len(await store.list_runs(status=RunStatus.WAITING)) == 50
    finally:
        await store.close()


# -- connections and outages -----------------------------------------------------------


async def test_400_concurrent_commits_and_updates_on_a_pool_of_4_wait_for_connections_without_errors(
    bare_redis: int,
) -> None:
    # A server that does not fsync every write, so the commits queue for connections.
    store = RedisStore(f"redis://127.0.0.1:{bare_redis}/1", max_connections=4, retry_for=2)
    try:
        await store.client.flushdb()
        leases = [await started(store, f"r{i}") for i in range(400)]

        async def timed(work: Awaitable[Any]) -> float:
            t0 = time.perf_counter()
            await work
            return time.perf_counter() - t0

        async def commit(i: int) -> None:
            commit = Commit(
                fields={"step": "B"}, events=[event("e", 2)], outputs=[OutputRecord(1, "A", i)], seq=1
            )
            assert await store.commit(f"r{i}", leases[i], commit) is None  # no StoreError

        pool = store.client.connection_pool
        # Commits share one connection, pipelined; updates (WATCH ... EXEC) wait for one of
        # the other three in turn.
        for name, work in (("commits", commit), ("updates", lambda i: store.update(f"r{i}", pause))):
            latencies = sorted(await asyncio.gather(*(timed(work(i)) for i in range(400))))
            assert len(pool._available_connections) + len(pool._in_use_connections) <= 4
            p50, p99 = latencies[200] * 1000, latencies[396] * 1000
            print(f"\n400 {name} on 4 connections: p50 {p50:.0f} ms, p99 {p99:.0f} ms")
            assert latencies[396] < 1.0
        runs = await store.list_runs(status=RunStatus.RUNNING, limit=1000)
        assert len(runs) == 400 and {(r.event_count, r.control) for r in runs} == {(3, "pause")}
    finally:
        await store.close()


async def test_a_client_with_a_small_ordinary_pool_is_not_overrun(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, max_connections=3)
    store = RedisStore(client=client, retry_for=0.5)
    try:
        await asyncio.gather(*(store.create(record(f"r{i}"), []) for i in range(300)))
        assert len(await store.list_runs(limit=1000)) == 300
        assert store.sibling() is None  # its pool belongs to this event loop
    finally:
        await store.close()
        await client.aclose()


async def test_a_redis_restart_mid_operation_fails_nothing_and_the_store_carries_on(
    redis_server: RedisServer, redis_url: str
) -> None:
    store = RedisStore(redis_url, retry_for=20)
    try:
        lease = await started(store)
        doomed = await started(store, "doomed")
        await store.commit("r1", lease, Commit(fields={"step": "A"}, seq=1))
        await store.commit("doomed", doomed, Commit(fields={"step": "A"}, seq=1))
        await asyncio.to_thread(redis_server.stop)
        t0 = time.monotonic()
        commit = Commit(
            fields={"step": "B"}, outputs=[OutputRecord(1, "A", 1)], events=[event("e", 2)], seq=2
        )
        work = asyncio.gather(
            store.commit("r1", lease, commit),
            store.renew("r1", lease, 15.0),
            store.create(record("new"), [event("run_started", 1)]),
            store.update("doomed", lambda rec, now: Change(dataclasses.replace(rec, control="stop"))),
            store.get("r1"),
            store.list_runs(),
            store.recoverable("wf"),
        )
        await asyncio.sleep(1.0)
        assert not work.done()  # waiting for Redis, not failing
        await asyncio.to_thread(redis_server.start)  # the scripts are forgotten, the connections dead
        results = await work
        assert time.monotonic() - t0 < 10
        assert results[0] is None and results[2] is True
        loaded = await store.load("r1")
        assert loaded is not None and loaded.record.step == "B" and len(loaded.outputs) == 1
        assert [e.seq for e in await store.events("r1")] == [1, 2]
        assert await store.commit("doomed", doomed, Commit(fields={"step": "B"}, seq=2)) == "stop"
        assert await store.delete("doomed")
        assert sorted(r.run_id for r in await store.list_runs()) == ["new", "r1"]
    finally:
        await store.close()


async def test_unreachable_redis_raises_store_error_within_the_bound() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", retry_for=0.5)
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreError, match=r"run r1: Redis at 127\.0\.0\.1:\d+/0 unreachable for 0\.5 s"):
            await store.commit("r1", Lease("w1", 1), Commit(fields={"step": "B"}, seq=1))
        assert 0.4 < time.monotonic() - t0 < 3
        for call in (store.get("r1"), store.list_runs(), store.recoverable("wf"), store.update("r1", pause)):
            with pytest.raises(StoreError, match="unreachable"):
                await call
    finally:
        await store.close()


async def test_a_cancelled_commit_leaves_no_connection_out_of_step(proxy: LossyProxy, redis_url: str) -> None:
    store = RedisStore(proxy.url(db_of(redis_url)))
    try:
        lease = await started(store)
        await store.commit("r1", lease, Commit(fields={"step": "A"}, seq=1))  # loads the script
        proxy.delay = 0.05
        task = asyncio.create_task(store.commit("r1", lease, Commit(fields={"step": "B"}, seq=2)))
        await asyncio.sleep(0.01)  # sent, its reply not read yet
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The next commands (sent while the cancelled one's reply is on its way, and
        # after) must not read that reply as theirs.
        assert await store.commit("r1", lease, Commit(fields={"control": "pause"}, seq=3)) == "pause"
        proxy.delay = 0
        assert await store.commit("r1", lease, Commit(fields={"step": "C"}, seq=4)) == "pause"
        rec = await store.get("r1")
        assert rec is not None and (rec.step, rec.control) == ("C", "pause")
    finally:
        await store.close()


async def test_clients_the_store_cannot_use_are_refused(redis_url: str) -> None:
    for client in (
        aioredis.Redis.from_url(redis_url, single_connection_client=True),
        aioredis.Redis.from_url(redis_url, decode_responses=True),
    ):
        try:
            with pytest.raises(StoreError, match="RedisStore needs"):
                RedisStore(client=client)
        finally:
            await client.aclose()
