"""RedisStore on a real Redis Cluster of three masters (the ``redis_cluster`` fixture).

The conformance suite, then what only a cluster shows: every command on one slot, the
indexes spread over the nodes, a slot that moves under a running store, and a create
that fails leaving nothing behind.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import StoreFactory
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.crc import key_slot
from redis_cluster import RedisCluster

from agentflow.errors import StoreError
from agentflow.stores import Store, redis_pages
from agentflow.stores.contract import Commit, OutputRecord, RunRecord
from agentflow.stores.redis import RedisStore
from agentflow.stores.redis_pages import score_pairs
from agentflow.testing.store_conformance import DurableStoreConformance, event, record, started
from agentflow.types import RunStatus

GATE = {"approvers": ["ops"], "deadline": None}


class TestRedisClusterStore(DurableStoreConformance):
    @pytest.fixture
    def store_factory(self, make_store: StoreFactory) -> StoreFactory:
        return partial(make_store, "redis_cluster")

    async def damage(self, store: Store, run_id: str, field: str, raw: str) -> None:
        from agentflow.stores.redis import RedisStore

        assert isinstance(store, RedisStore)
        await store.client.hset(store.keys.run(run_id).rec, field, raw)


# -- what only a cluster shows ------------------------------------------------------------


@pytest.fixture
def nodes(redis_cluster: RedisCluster, redis_cluster_url: str) -> Iterator[list[redis.Redis]]:
    """A plain client per master of the (flushed) session cluster."""
    clients = [redis.Redis(port=p) for p in redis_cluster.ports]
    yield clients
    for client in clients:
        client.close()


def _keys(nodes: list[redis.Redis]) -> dict[str, int]:
    """Every key of the cluster, with the port of the master holding it."""
    return {k.decode(): n.connection_pool.connection_kwargs["port"] for n in nodes for k in n.keys("*")}


async def test_a_cluster_client_serves_a_store_with_each_run_on_one_slot(
    redis_cluster: RedisCluster, nodes: list[redis.Redis]
) -> None:
    client = AsyncRedisCluster(host="127.0.0.1", port=redis_cluster.ports[1])
    store = RedisStore(client=client, key_prefix="app:")
    try:
        assert store.client is client and store.sibling() is None
        for i in range(40):
            lease = await started(store, f"run-{i}")
            pending = {"approvers": ["ops"], "deadline": time.time() + 60}
            await store.commit(
                f"run-{i}", lease, Commit(fields={"status": RunStatus.WAITING, "pending": pending}, seq=1)
            )
        keys = _keys(nodes)
        for i in range(40):
            run_keys = store.keys.run(f"run-{i}")
            assert {run_keys.rec, run_keys.events} <= set(keys)  # (no outputs nor journal yet)
            assert len({key_slot(k.encode()) for k in run_keys}) == 1
            assert len({keys[k] for k in (run_keys.rec, run_keys.events)}) == 1
        indexes = {k: port for k, port in keys.items() if "#ix{" in k}
        assert all(k.startswith("app:#") for k in keys)
        assert set(keys) - set(indexes) <= {k for i in range(40) for k in store.keys.run(f"run-{i}")}
        # The index entries of 40 runs are spread over the shards, and the shards over the nodes.
        assert len({key_slot(k.encode()) for k in indexes}) >= 8
        assert set(indexes.values()) == set(redis_cluster.ports)
        waiting = await store.list_runs("wf", RunStatus.WAITING, limit=100)
        assert sorted(r.run_id for r in waiting) == sorted(f"run-{i}" for i in range(40))
        assert len(await store.approvals(approver="ops", limit=100)) == 40
    finally:
        await store.close()
        await client.aclose()


async def test_the_plain_layout_is_kept_on_one_server(redis_url: str) -> None:
    # A store on one server writes the keys every earlier version wrote, so runs stored
    # before load as they are: no migration.
    store = RedisStore(redis_url, key_prefix="p:")
    try:
        lease = await started(store, "r1")
        pending = {"approvers": ["ops"], "deadline": time.time() + 60}
        commit = Commit(
            fields={"status": RunStatus.WAITING, "pending": pending},
            outputs=[OutputRecord(1, "A", 1)],
            journal={"A/1": 1},
            seq=1,
        )
        await store.commit("r1", lease, commit)
        keys = {k.decode() for k in await store.client.keys("*")}
        assert keys == {
            "p:#run:{r1}:rec", "p:#run:{r1}:events", "p:#run:{r1}:outputs", "p:#run:{r1}:journal",
            "p:#st:waiting", "p:#wf:wf:st:waiting", "p:#wf:wf:gates",
            "p:#ap:all", "p:#ap:wf:wf", "p:#ap:kind:gate", "p:#ap:by:ops", "p:#ap:at",
        } | ({"p:#st:running", "p:#wf:wf:st:running"} & keys)  # fmt: skip
    finally:
        await store.close()


async def test_a_prefix_whose_braces_would_split_a_run_is_refused_on_a_cluster(
    redis_cluster_url: str,
) -> None:
    with pytest.raises(StoreError, match=re.escape("key_prefix 'app{}'")):
        RedisStore(redis_cluster_url, key_prefix="app{}")
    store = RedisStore(redis_cluster_url, key_prefix="{app}:")  # every key in one slot: works
    try:
        await started(store, "r1")
        assert [r.run_id for r in await store.list_runs()] == ["r1"]
    finally:
        await store.close()


@pytest.mark.parametrize("kind", ["redis", "redis_cluster"])
async def test_a_create_that_fails_leaves_no_record(make_store: StoreFactory, kind: str) -> None:
    store = make_store(kind)
    assert isinstance(store, RedisStore)
    # An index key holding another type: Redis refuses to file the new run in it.
    key = store.keys.status(RunStatus.PENDING, "wf", None, store.keys.shard_of("r1"))
    await store.client.set(key, "not a sorted set")
    with pytest.raises(StoreError, match="run r1"):
        await store.create(record("r1"), [event("run_started", 1)])
    assert await store.get("r1") is None
    assert await store.events("r1") == []
    await store.client.delete(key)
    assert await store.create(record("r1"), [event("run_started", 1)])
    assert [r.run_id for r in await store.list_runs("wf", RunStatus.PENDING)] == ["r1"]


async def test_a_commit_whose_index_entry_fails_is_not_made_on_a_cluster(make_store: StoreFactory) -> None:
    store = make_store("redis_cluster")
    assert isinstance(store, RedisStore)
    lease = await started(store, "r1")
    key = store.keys.status(RunStatus.WAITING, "wf", None, store.keys.shard_of("r1"))
    await store.client.set(key, "not a sorted set")
    with pytest.raises(StoreError, match="run r1"):
        await store.commit("r1", lease, Commit(fields={"status": RunStatus.WAITING, "pending": GATE}, seq=1))
    rec = await store.get("r1")
    assert rec is not None and rec.status == RunStatus.RUNNING and rec.commit_seq == 0
    await store.client.delete(key)
    await store.commit("r1", lease, Commit(fields={"status": RunStatus.WAITING, "pending": GATE}, seq=1))
    assert [r.run_id for r in await store.list_runs(status=RunStatus.WAITING)] == ["r1"]


def _move_slot(nodes: list[redis.Redis], at: int, finish: bool = True) -> tuple[redis.Redis, redis.Redis]:
    """Migrate slot ``at`` with its keys to another master (or leave it migrating)."""
    owner = {n.connection_pool.connection_kwargs["port"]: n for n in nodes}
    src_port = next(int(r[2][1]) for r in nodes[0].execute_command("CLUSTER", "SLOTS") if r[0] <= at <= r[1])
    src = owner[src_port]
    dst = next(n for p, n in owner.items() if p != src_port)
    src_id, dst_id = src.execute_command("CLUSTER", "MYID"), dst.execute_command("CLUSTER", "MYID")
    dst.execute_command("CLUSTER", "SETSLOT", at, "IMPORTING", src_id)
    src.execute_command("CLUSTER", "SETSLOT", at, "MIGRATING", dst_id)
    keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", at, 1000)
    if keys:
        port = dst.connection_pool.connection_kwargs["port"]
        src.execute_command("MIGRATE", "127.0.0.1", port, "", 0, 5000, "KEYS", *keys)
    if finish:
        _settle(nodes, at, dst_id)
    return src, dst


def _settle(nodes: list[redis.Redis], at: int, dst_id: Any) -> None:
    for n in nodes:
        n.execute_command("CLUSTER", "SETSLOT", at, "NODE", dst_id)


async def test_a_slot_that_moves_under_a_store_is_followed(
    make_store: StoreFactory, nodes: list[redis.Redis]
) -> None:
    store = make_store("redis_cluster")
    assert isinstance(store, RedisStore)
    lease = await started(store, "r1")
    await store.commit("r1", lease, Commit(fields={"step": "B"}, seq=1))
    at = key_slot(store.keys.run("r1").rec.encode())
    _move_slot(nodes, at)  # the store's map of slots is out of date: MOVED replies
    await store.commit("r1", lease, Commit(fields={"step": "C"}, seq=2, events=[event("step_started", 2)]))
    loaded = await store.load("r1")
    assert loaded is not None and loaded.record.step == "C" and loaded.record.commit_seq == 2
    assert [e.seq for e in await store.events("r1")] == [1, 2]
    assert [r.run_id for r in await store.list_runs(status=RunStatus.RUNNING)] == ["r1"]
    assert (await store.update("r1", lambda rec, now: None)) is not None
    # Mid-migration (the run's keys moved, the slot not yet handed over): a command of
    # one key follows ASK; a script of the run's keys (some of which do not exist) and a
    # MULTI block wait until the slot settles (TRYAGAIN).
    _, dst = _move_slot(nodes, at, finish=False)
    assert (await store.get("r1")).step == "C"  # type: ignore[union-attr]
    settle = asyncio.get_running_loop().call_later(
        0.3, _settle, nodes, at, dst.execute_command("CLUSTER", "MYID")
    )
    try:
        await store.commit("r1", lease, Commit(fields={"step": "D"}, seq=3))
        loaded = await store.load("r1")
    finally:
        settle.cancel()
    assert loaded is not None and loaded.record.step == "D" and loaded.record.commit_seq == 3


async def test_a_page_over_the_shards_costs_what_it_returns(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store("redis_cluster")
    for i in range(300):
        assert await store.create(record(f"r{i:03}", created_at=1000.0 + i % 50), [])
    fetched = []

    def counting(reply: Any) -> list[tuple[bytes, float]]:
        pairs = score_pairs(reply)
        fetched.append(len(pairs))
        return pairs

    monkeypatch.setattr(redis_pages, "score_pairs", counting)
    page = await store.list_runs(status=RunStatus.PENDING, limit=10)
    assert len(page) == 10
    # Not the 300 runs stored: the page, and a few entries ahead per shard.
    assert sum(fetched) <= 10 + 4 * 16
    # Paging through all of them: newest first, ties by id, each run once.
    monkeypatch.undo()
    seen: list[RunRecord] = []
    after = None
    while True:
        got = await store.list_runs(status=RunStatus.PENDING, limit=7, after=after)
        if not got:
            break
        seen += got
        after = got[-1].run_id
    assert [r.run_id for r in seen] == [
        r.run_id for r in sorted(seen, key=lambda r: (r.created_at, r.run_id), reverse=True)
    ]
    assert sorted(r.run_id for r in seen) == [f"r{i:03}" for i in range(300)]


@pytest.mark.timeout(120)
async def test_a_process_killed_mid_step_on_a_cluster_is_recovered_by_another(
    redis_cluster_url: str, tmp_path: Path
) -> None:
    from test_crash import _finish, _kill, _lines, _load, _spawn, _wait_for

    log = tmp_path / "steps.log"
    # ``.persistence(store="redis", url="redis+cluster://...")`` in both processes.
    first = _spawn("start", "linear", "redis", redis_cluster_url, log, "crash-c", block=True)
    _wait_for(log, lambda ls: ("start", "C", first.pid) in ls, first)
    _kill(first)

    loaded = await _load("redis", redis_cluster_url, "crash-c")
    assert loaded is not None
    assert loaded.record.status == RunStatus.RUNNING and loaded.record.step == "C"
    assert loaded.record.state["done"] == ["A", "B"]

    second = _spawn("recover", "linear", "redis", redis_cluster_url, log, "crash-c", block=False)
    assert "result completed" in _finish(second)
    starts = collections.Counter(name for what, name, _ in _lines(log) if what == "start")
    assert starts == {"A": 1, "B": 1, "C": 2, "D": 1}  # only the step in flight ran again
    assert {pid for _, name, pid in _lines(log) if name == "D"} == {second.pid}


async def test_the_change_feed_follows_writes_on_every_node(make_store: StoreFactory) -> None:
    watcher, writer = make_store("redis_cluster"), make_store("redis_cluster")
    assert isinstance(watcher, RedisStore)
    ids = {f"run-{i}" for i in range(12)}  # their records on all three masters
    seen: set[str] = set()
    every = asyncio.Event()

    def changed(run_id: str) -> None:
        seen.add(run_id)
        if ids <= seen:
            every.set()

    feed = asyncio.create_task(watcher.changes(changed))  # before the store sent anything
    try:
        await asyncio.sleep(0.2)
        for run_id in sorted(ids):
            await started(writer, run_id)
        await asyncio.wait_for(every.wait(), 5)
    finally:
        feed.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feed
