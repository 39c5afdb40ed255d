"""RedisStore beyond the conformance suite: round trips, key layout, restarts, outages."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis.asyncio as aioredis
from conftest import RedisServer, free_port
from redis.asyncio.client import Pipeline
from redis.crc import key_slot
from redis.exceptions import ConnectionError
from store_helpers import State, event, record, started

from agentflow.errors import CorruptRecordError, LeaseLostError, StoreError, WorkflowDefinitionError
from agentflow.records import Commit, OutputRecord, RunRecord, RunStatus
from agentflow.stores import Change, Lease, MemoryStore, SqliteStore, open_store
from agentflow.stores.redis import RedisStore


class CountingWriter:
    """A connection's stream writer that counts its writes."""

    def __init__(self, writer: Any) -> None:
        self._writer = writer

    def write(self, data: bytes) -> None:
        CountingConnection.sends += 1
        self._writer.write(data)

    def writelines(self, data: Any) -> None:
        CountingConnection.sends += 1
        self._writer.writelines(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


class CountingConnection(aioredis.Connection):
    """Counts writes to the socket: one per command, or one per pipeline."""

    sends = 0

    async def _connect(self) -> None:
        await super()._connect()  # type: ignore[no-untyped-call]
        self._writer = CountingWriter(self._writer)  # type: ignore[assignment]


async def _commits_stat(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_commit_renew_get_are_one_round_trip_each(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, connection_class=CountingConnection)
    store = RedisStore(client=client)
    try:
        lease = await started(store)
        await store.commit("r1", lease, Commit(fields={"step": "warm-up"}))  # loads the scripts
        await store.renew("r1", lease, 15.0)
        commit = Commit(
            fields={"state": State(artifact="a", count=1), "step": "B", "visit": 1},
            outputs=[OutputRecord(1, "A", {"x": 1})],
            events=[event("step_started", 2), event("step_completed", 3)],
            journal={"A/1": "reply"},
        )
        evalsha_before = await _commits_stat(client)
        CountingConnection.sends = 0
        await store.commit("r1", lease, commit)
        assert CountingConnection.sends == 1
        assert await _commits_stat(client) == evalsha_before + 1
        # A gate's deadline goes to its index in the same round trip (the engine files
        # the workflow's name with the gate, so the store need not read it).
        CountingConnection.sends = 0
        pending = {"approvers": ["ops"], "deadline": time.time() - 1, "workflow": "wf"}
        await store.commit("r1", lease, Commit(fields={"status": RunStatus.WAITING, "pending": pending}))
        assert CountingConnection.sends == 1
        assert await store.due_gates("wf", time.time()) == ["r1"]
        # A gate without the name (written by another client) costs one read first.
        CountingConnection.sends = 0
        pending = {"approvers": ["ops"], "deadline": time.time() - 1}
        await store.commit("r1", lease, Commit(fields={"pending": pending}))
        assert CountingConnection.sends == 2
        assert await store.due_gates("wf", time.time()) == ["r1"]
        CountingConnection.sends = 0
        await store.renew("r1", lease, 15.0)
        assert CountingConnection.sends == 1
        CountingConnection.sends = 0
        await store.get("r1")
        assert CountingConnection.sends == 1
    finally:
        await store.close()
        await client.aclose()


async def test_keys_are_prefixed_and_hash_tagged(redis_url: str) -> None:
    store = RedisStore(redis_url, key_prefix="app:", ttl=None)
    try:
        lease = await started(store, "run-1")
        pending = {"deadline": time.time() + 60}
        await store.commit(
            "run-1",
            lease,
            Commit(
                fields={"status": RunStatus.WAITING, "pending": pending},
                outputs=[OutputRecord(1, "A", 1)],
                events=[event("waiting", 2)],
                journal={"A/1": 1},
                release=True,
            ),
        )
        keys = {k.decode() for k in await store.client.keys("*")}
        run_keys = set(store.keys.run("run-1"))
        assert keys == run_keys | {"app:runs", "app:wf:wf:runs", "app:wf:wf:gates"}
        assert all(k.startswith("app:") for k in keys)
        assert all("{run-1}" in k for k in run_keys)
        assert len({key_slot(k.encode()) for k in run_keys}) == 1
        # Every record field is a JSON string, so the Lua scripts never parse JSON.
        raw = await store.client.hgetall(store.keys.run("run-1").rec)
        assert raw[b"status"] == b'"waiting"' and raw[b"lease_owner"] == b"null"
    finally:
        await store.close()


async def test_records_survive_a_redis_crash_and_restart(redis_server: RedisServer, redis_url: str) -> None:
    store = RedisStore(redis_url)
    try:
        lease = await started(store)
        await store.commit(
            "r1", lease, Commit(fields={"step": "B", "visit": 1}, outputs=[OutputRecord(1, "A", 1)])
        )
        redis_server.restart(kill=True)  # SIGKILL: only what the AOF holds comes back
        loaded = await store.load("r1")  # the same store reconnects by itself
        assert loaded is not None
        assert (loaded.record.step, loaded.record.visit, len(loaded.outputs)) == ("B", 1, 1)
        # The restarted server forgot the scripts: commit reloads them.
        await store.commit("r1", lease, Commit(fields={"step": "C"}))
        rec = await store.get("r1")
        assert rec is not None and rec.step == "C"
    finally:
        await store.close()


async def test_unreachable_redis_raises_store_error_within_the_bound() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", retry_for=0.5)
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreError, match=r"run r1: Redis at 127\.0\.0\.1:\d+/0 unreachable for 0\.5 s"):
            await store.commit("r1", Lease("w1", 1), Commit(fields={"step": "B"}))
        assert 0.4 < time.monotonic() - t0 < 3
        with pytest.raises(StoreError, match="unreachable"):
            await store.get("r1")
    finally:
        await store.close()


class ReplyLostConnection(aioredis.Connection):
    """Loses the connection right after reading the next reply, when armed."""

    armed = False
    lost: ClassVar[list[Any]] = []

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        reply = await super().read_response(*args, **kwargs)
        if ReplyLostConnection.armed:
            ReplyLostConnection.armed = False
            ReplyLostConnection.lost.append(reply)
            await self.disconnect()
            raise ConnectionError("connection reset after the script ran")
        return reply


async def test_a_commit_retried_after_a_lost_reply_applies_once(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, connection_class=ReplyLostConnection)
    store = RedisStore(client=client)
    try:
        lease = await started(store)
        await store.commit("r1", lease, Commit(fields={"step": "A"}))  # loads the script
        await store.update("r1", lambda r: Change(dataclasses.replace(r, control="pause")))
        ReplyLostConnection.lost = []
        ReplyLostConnection.armed = True
        commit = Commit(fields={"visit": 1}, outputs=[OutputRecord(1, "A", 1)], events=[event("e", 2)])
        # The retry finds its nonce: not applied again, and it still reports the flag.
        assert await store.commit("r1", lease, commit) == "pause"
        assert ReplyLostConnection.lost  # the first attempt did run
        loaded = await store.load("r1")
        assert loaded is not None and loaded.record.event_count == 2 and len(loaded.outputs) == 1
        assert [e.seq for e in await store.events("r1")] == [1, 2]
    finally:
        await store.close()
        await client.aclose()


async def test_a_commit_on_a_damaged_record_raises_and_writes_nothing(redis_url: str) -> None:
    store = RedisStore(redis_url)
    keys = store.keys.run("r1")
    try:
        lease = await started(store)
        await store.client.hset(keys.rec, "event_count", '"many"')
        before = await store.client.hgetall(keys.rec)
        commit = Commit(fields={"step": "B"}, outputs=[OutputRecord(1, "A", 1)], events=[event("e", 2)])
        with pytest.raises(CorruptRecordError) as info:
            await store.commit("r1", lease, commit)
        assert (info.value.run_id, info.value.key) == ("r1", keys.rec)
        assert await store.client.hgetall(keys.rec) == before
        assert (await store.client.llen(keys.events), await store.client.llen(keys.outputs)) == (1, 0)
        await store.client.delete(keys.rec)
        await store.client.set(keys.rec, "not a hash")
        with pytest.raises(CorruptRecordError, match="WRONGTYPE"):
            await store.commit("r1", lease, commit)
    finally:
        await store.close()


async def test_large_commits_and_a_single_connection_client(redis_url: str) -> None:
    # redis-py's single-connection client keeps its one connection: the store goes
    # through redis-py's pipeline there, with the same results.
    client = aioredis.Redis.from_url(redis_url, single_connection_client=True)
    store = RedisStore(client=client)
    try:
        lease = await started(store)
        journal = {f"B/{i}": {"i": i} for i in range(2500)}  # more than one HSET per chunk
        events = [event("e", 2 + i) for i in range(2500)]
        outputs = [OutputRecord(1, f"S{i}", i) for i in range(2500)]
        commit = Commit(fields={"step": "B", "visit": 1}, outputs=outputs, events=events, journal=journal)
        assert await store.commit("r1", lease, commit) is None
        loaded = await store.load("r1")
        assert loaded is not None and loaded.record.event_count == 2501
        assert len(loaded.outputs) == 2500 and loaded.journal == journal
        assert [e.seq for e in await store.events("r1", after=2499)] == [2500, 2501]
        pending = {"deadline": time.time() - 1, "workflow": "wf"}
        assert await store.renew("r1", lease, 15.0) is None
        await store.commit("r1", lease, Commit(fields={"status": RunStatus.WAITING, "pending": pending}))
        assert await store.due_gates("wf", time.time()) == ["r1"]
        with pytest.raises(LeaseLostError, match="stale"):
            await store.commit("r1", Lease("w1", lease.token + 1), Commit(fields={"step": "C"}))
    finally:
        await store.close()
        await client.aclose()


class SlowReplyConnection(aioredis.Connection):
    """Waits a moment before reading each reply, when armed."""

    armed = False

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if SlowReplyConnection.armed:
            await asyncio.sleep(0.05)
        return await super().read_response(*args, **kwargs)


async def test_a_cancelled_commit_leaves_no_connection_out_of_step(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, connection_class=SlowReplyConnection)
    store = RedisStore(client=client)
    try:
        lease = await started(store)
        await store.commit("r1", lease, Commit(fields={"step": "A"}))  # loads the script
        SlowReplyConnection.armed = True
        task = asyncio.create_task(store.commit("r1", lease, Commit(fields={"step": "B"})))
        await asyncio.sleep(0.01)  # sent, its reply not read yet
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        SlowReplyConnection.armed = False
        # The next commands must not read the cancelled one's reply as theirs.
        assert await store.commit("r1", lease, Commit(fields={"control": "pause"})) == "pause"
        rec = await store.get("r1")
        assert rec is not None and (rec.step, rec.control) == ("B", "pause")
    finally:
        SlowReplyConnection.armed = False
        await store.close()
        await client.aclose()


async def test_scripts_are_reloaded_with_the_gate_index_in_front(redis_url: str) -> None:
    store = RedisStore(redis_url)
    try:
        lease = await started(store)
        await store.client.script_flush()
        pending = {"deadline": time.time() - 1, "workflow": "wf"}
        commit = Commit(fields={"status": RunStatus.WAITING, "pending": pending}, events=[event("w", 2)])
        assert await store.commit("r1", lease, commit) is None
        assert await store.due_gates("wf", time.time()) == ["r1"]
        assert [e.seq for e in await store.events("r1")] == [1, 2]  # applied once
        await store.client.script_flush()
        assert await store.create(record("r2", status=RunStatus.WAITING, pending=pending), [])
        assert sorted(await store.due_gates("wf", time.time())) == ["r1", "r2"]
    finally:
        await store.close()


async def test_stale_index_entries_are_dropped(redis_url: str) -> None:
    store = RedisStore(redis_url)
    try:
        await store.create(record("gone"), [])
        await store.client.delete(*store.keys.run("gone"))  # as if it expired
        await store.client.zadd(store.keys.gates("wf"), {"gone": 1.0})
        await store.create(record("r1", status=RunStatus.RUNNING), [])
        await store.client.zadd(store.keys.gates("wf"), {"r1": 1.0})  # not waiting
        assert [r.run_id for r in await store.list_runs("wf")] == ["r1"]
        assert await store.due_gates("wf", time.time()) == []
        assert await store.client.zrange(store.keys.workflow_runs("wf"), 0, -1) == [b"r1"]
        assert await store.client.zcard(store.keys.gates("wf")) == 0
        # Re-created after expiring, before any reader dropped its old entry: the entry is
        # re-scored, so dropping the stale one (score-checked) keeps the new run listed.
        await store.create(record("again", created_at=1.0), [])
        await store.client.delete(*store.keys.run("again"))
        await store.create(record("again", created_at=2.0), [])
        assert await store.client.zscore(store.keys.all_runs(), "again") == 2.0
        await store._zrem_if_score(store.keys.all_runs(), "again", 1.0)
        assert [r.run_id for r in await store.list_runs()] == ["again", "r1"]
    finally:
        await store.close()


async def test_update_retries_when_another_writer_gets_in_first(
    redis_server: RedisServer, redis_url: str
) -> None:
    store = RedisStore(redis_url)
    db = redis_url.rsplit("/", 1)[1]
    try:
        await store.create(record(), [])
        seen: list[str | None] = []

        def bump(rec: RunRecord) -> Change:
            seen.append(rec.control)
            if len(seen) == 1:  # a competing writer between our read and our EXEC
                redis_server.command("HSET", store.keys.run("r1").rec, "control", '"stop"', db=int(db))
            return Change(dataclasses.replace(rec, visit=rec.visit + 1))

        rec = await store.update("r1", bump)
        assert seen == [None, "stop"]  # the change ran again on the fresh record
        assert rec is not None and (rec.visit, rec.control) == (1, "stop")
    finally:
        await store.close()


async def test_update_is_not_applied_twice_after_a_lost_exec_reply(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisStore(redis_url)
    try:
        await store.create(record(), [])
        real_execute = Pipeline.execute
        lost: list[bool] = []

        async def execute_reply_lost(self: Pipeline, raise_on_error: bool = True) -> Any:
            result = await real_execute(self, raise_on_error)
            if not lost:
                lost.append(True)
                raise ConnectionError("connection reset after EXEC")
            return result

        monkeypatch.setattr(Pipeline, "execute", execute_reply_lost)
        calls: list[int] = []

        def bump(rec: RunRecord) -> Change:
            calls.append(rec.visit)
            return Change(dataclasses.replace(rec, visit=rec.visit + 1), [event("bumped", 1)])

        rec = await store.update("r1", bump)
        assert lost and calls == [0]
        assert rec is not None and rec.visit == 1
        got = await store.get("r1")
        assert got is not None and (got.visit, got.event_count) == (1, 1)
    finally:
        await store.close()


async def test_open_store_builds_each_kind(redis_url: str, tmp_path: Path) -> None:
    assert isinstance(open_store(), MemoryStore)
    sqlite = open_store("sqlite", path=str(tmp_path / "x.db"), key_prefix="p:", ttl=5)
    assert isinstance(sqlite, SqliteStore) and sqlite.key_prefix == "p:" and sqlite.ttl == 5
    red = open_store("redis", url=redis_url, key_prefix="p:")
    try:
        assert isinstance(red, RedisStore) and red.keys.all_runs() == "p:runs"
        assert open_store(red) is red
        with pytest.raises(WorkflowDefinitionError, match="memory, sqlite, redis"):
            open_store("postgres")
    finally:
        await red.close()
        await sqlite.close()
