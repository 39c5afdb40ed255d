"""RedisStore beyond the conformance suite: round trips, keys, lost replies, clocks, scale,
damaged data (connections and outages: ``test_redis_connections``)."""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from conftest import RedisServer
from redis.crc import key_slot
from redis_fakes import CountingConnection, LossyProxy, bare_redis_server, db_of, pause

from agentflow.errors import CorruptRecordError, WorkflowDefinitionError
from agentflow.stores import Change, MemoryStore, SqliteStore, open_store
from agentflow.stores.contract import Commit, OutputRecord, RunRecord
from agentflow.stores.redis import RedisStore
from agentflow.stores.redis_wire import pack
from agentflow.testing.store_conformance import (
    State,
    acquire,
    approval,
    event,
    expire,
    gate_pending,
    record,
    started,
    store_now,
)
from agentflow.types import RunStatus


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[LossyProxy]:
    async with LossyProxy(redis_server.port) as p:
        yield p


@pytest.fixture(scope="module")
def bare_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with bare_redis_server(tmp_path_factory.mktemp("bare-redis")) as port:
        yield port


GATE = {"approvers": ["ops"], "deadline": None}


# -- round trips and layout -------------------------------------------------------------


async def _evalsha_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_commit_renew_get_are_one_round_trip_each(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, connection_class=CountingConnection)
    store = RedisStore(client=client)
    try:
        lease = await started(store)
        await store.commit("r1", lease, Commit(fields={"step": "warm-up"}, seq=1))  # loads the scripts
        await store.renew("r1", lease, 15.0)
        commit = Commit(
            fields={"state": State(artifact="a", count=1), "step": "B", "visit": 1},
            outputs=[OutputRecord(1, "A", {"x": 1})],
            events=[event("step_started", 2), event("step_completed", 3)],
            journal={"A/1": "reply"},
            seq=2,
        )
        before = await _evalsha_calls(client)
        CountingConnection.sends = 0
        await store.commit("r1", lease, commit)
        assert CountingConnection.sends == 1
        assert await _evalsha_calls(client) == before + 1
        # A commit that moves the run to a gate files it (status index, deadline) in
        # the same round trip, with what the store remembers of the run.
        CountingConnection.sends = 0
        pending = {"approvers": ["ops"], "deadline": time.time() - 1}
        await store.commit(
            "r1", lease, Commit(fields={"status": RunStatus.WAITING, "pending": pending}, seq=3)
        )
        assert CountingConnection.sends == 1
        assert await store.due_gates("wf", time.time()) == ["r1"]
        assert [r.run_id for r in await store.list_runs("wf", RunStatus.WAITING)] == ["r1"]
        CountingConnection.sends = 0
        await store.renew("r1", lease, 15.0)
        assert CountingConnection.sends == 1
        CountingConnection.sends = 0
        await store.get("r1")
        assert CountingConnection.sends == 1
        # A store that never read the run reads its workflow first: one more round trip.
        other = RedisStore(client=client)
        CountingConnection.sends = 0
        await other.commit("r1", lease, Commit(fields={"status": RunStatus.RUNNING}, seq=4))
        assert CountingConnection.sends == 2
        assert [r.run_id for r in await store.list_runs(status=RunStatus.RUNNING)] == ["r1"]
        assert await store.list_runs(status=RunStatus.WAITING) == []
    finally:
        await store.close()
        await client.aclose()


async def test_keys_are_prefixed_and_a_run_shares_one_slot(redis_url: str) -> None:
    store = RedisStore(redis_url, key_prefix="app:", ttl=3600)
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
                seq=1,
            ),
        )
        # (This create also carries the clean-up queued by the commit: the running entry.)
        await store.create(record("done", status=RunStatus.COMPLETED), [])
        keys = {cast(bytes, k).decode() for k in await store.client.keys("*")}
        run_keys = set(store.keys.run("run-1"))
        assert run_keys <= keys
        assert all(k.startswith("app:#") for k in keys)
        assert all("{run-1}" in k for k in run_keys)
        assert len({key_slot(k.encode()) for k in run_keys}) == 1
        indexes = keys - run_keys - set(store.keys.run("done"))
        assert store.keys.status("waiting") in indexes and store.keys.status("waiting", "wf") in indexes
        assert store.keys.gates("wf") in indexes and store.keys.buckets() in indexes
        assert store.keys.status("running") not in indexes  # left when the run went to its gate
        # Finished runs are indexed in buckets that expire after them.
        [bucket] = [k for k in indexes if k.startswith(store.keys.status("completed", "wf") + ":")]
        assert 3600_000 < await store.client.pttl(bucket) <= (3600 + 2 * 450) * 1000
        # Every record field is a JSON string, so the Lua scripts never parse JSON.
        raw = await store.client.hgetall(store.keys.run("run-1").rec)
        assert raw[b"status"] == b'"waiting"' and raw[b"lease_owner"] == b"null"
    finally:
        await store.close()


async def test_two_prefixes_never_see_each_others_runs(redis_url: str) -> None:
    prefixes = ["", "a", "ab", "a:", "a#", "a#run:", "{a}", "a%23", "a:#run:{b}:"]
    run_ids = ["b", "#b", "x}:rec", "{b}", "run:{b}", "b c", "%7Bb%7D", "é"]
    stores = {p: RedisStore(redis_url, key_prefix=p) for p in prefixes}
    try:
        for p, store in stores.items():
            for run_id in run_ids:
                assert await store.create(record(run_id, workflow=f"wf:{p}", input={"prefix": p}), [])
            await started(store, "held", workflow="w")
            await expire(store, "held")
        for p, store in stores.items():
            assert sorted(r.run_id for r in await store.list_runs()) == sorted([*run_ids, "held"]), p
            assert await store.recoverable("w") == ["held"]
            for run_id in run_ids:
                rec = await store.get(run_id)
                assert rec is not None and rec.input == {"prefix": p} and rec.workflow == f"wf:{p}"
        for run_id in run_ids:
            assert await stores["a"].delete(run_id)
        assert await stores["a"].delete("held")
        assert await stores["a"].list_runs() == [] and await stores["a"].recoverable("w") == []
        for p, store in stores.items():
            if p != "a":
                assert len(await store.list_runs()) == len(run_ids) + 1, p
                assert all([await store.get(run_id) for run_id in run_ids]), p
        # A key's prefix is what comes before its last '#': never another prefix's key.
        async for key in stores[""].client.scan_iter():
            assert key.decode()[: key.decode().rindex("#")] in prefixes
    finally:
        for store in stores.values():
            await store.close()


async def test_a_record_of_another_workflow_is_never_listed_nor_recovered_under_this_one(
    redis_url: str,
) -> None:
    store = RedisStore(redis_url)
    try:
        await started(store, "x", workflow="A")
        await expire(store, "x")
        await store.create(record("y", workflow="A"), [])
        assert await store.recoverable("A") == ["x"]
        for run_id in ("x", "y"):  # the records now name another workflow
            await store.client.hset(store.keys.run(run_id).rec, "workflow", '"B"')
        assert await store.list_runs("A") == [] and await store.list_runs("A", RunStatus.RUNNING) == []
        assert await store.recoverable("A") == [] and await store.recoverable("B") == []
        assert sorted(r.run_id for r in await store.list_runs()) == ["x", "y"]
    finally:
        await store.close()


# -- once only, through lost replies ---------------------------------------------------


async def test_a_commit_whose_reply_is_lost_applies_once_despite_a_pause_in_between(
    proxy: LossyProxy, redis_url: str
) -> None:
    store, other = RedisStore(proxy.url(db_of(redis_url))), RedisStore(redis_url)
    try:
        lease = await started(store)
        await store.commit("r1", lease, Commit(fields={"step": "A"}, seq=1))  # loads the script

        async def pause_it() -> None:  # the commit ran, its reply is on its way
            await other.update("r1", pause)

        proxy.lose(b"EVALSHA", pause_it)
        commit = Commit(
            fields={"visit": 1, "step": "B"},
            outputs=[OutputRecord(1, "A", 1)],
            events=[event("step_completed", 2)],
            journal={"A/1": "reply"},
            seq=2,
        )
        assert await store.commit("r1", lease, commit) == "pause"  # recognised: not applied again
        assert proxy.lost == 1
        loaded = await store.load("r1")
        assert loaded is not None and len(loaded.outputs) == 1 and loaded.journal == {"A/1": "reply"}
        assert [e.kind for e in await store.events("r1")] == [
            "run_started",
            "step_completed",
            "pause_requested",
        ]
        assert (loaded.record.event_count, loaded.record.commit_seq) == (3, 2)
    finally:
        await store.close()
        await other.close()


async def test_a_final_commit_whose_reply_is_lost_is_filed_once(proxy: LossyProxy, redis_url: str) -> None:
    store, other = RedisStore(proxy.url(db_of(redis_url))), RedisStore(redis_url)
    try:
        lease = await started(store)
        await store.commit("r1", lease, Commit(fields={"step": "A"}, seq=1))

        async def stop_it() -> None:
            await other.update("r1", lambda rec, now: Change(dataclasses.replace(rec, control="stop")))

        proxy.lose(b"EVALSHA", stop_it)
        final = Commit(
            fields={"status": RunStatus.COMPLETED}, events=[event("completed", 2)], release=True, seq=2
        )
        assert await store.commit("r1", lease, final) == "stop"
        assert [r.run_id for r in await other.list_runs(status=RunStatus.COMPLETED)] == ["r1"]
        assert await other.list_runs(status=RunStatus.RUNNING) == []
        assert len(await store.events("r1")) == 2
    finally:
        await store.close()
        await other.close()


async def test_a_create_whose_reply_is_lost_reports_it_created_the_run(
    proxy: LossyProxy, redis_url: str
) -> None:
    store, other = RedisStore(proxy.url(db_of(redis_url))), RedisStore(redis_url)
    try:
        assert await store.create(record("warm-up"), [])  # loads the script

        async def take_it() -> None:  # another process takes the new run at once
            await acquire(other, "r1", owner="w2")

        proxy.lose(b"EVALSHA", take_it)
        assert await store.create(record("r1"), [event("run_started", 1)])
        assert proxy.lost == 1
        assert not await store.create(record("r1"), [])  # and a real second create is refused
        rec = await store.get("r1")
        assert rec is not None and rec.lease_owner == "w2" and rec.event_count == 1
    finally:
        await store.close()
        await other.close()


async def test_an_update_whose_reply_is_lost_is_not_applied_twice(proxy: LossyProxy, redis_url: str) -> None:
    store = RedisStore(proxy.url(db_of(redis_url)))
    try:
        await store.create(record(), [])
        calls: list[tuple[int, float]] = []

        def bump(rec: RunRecord, now: float) -> Change:
            calls.append((rec.visit, now))
            return Change(dataclasses.replace(rec, visit=rec.visit + 1), [event("bumped", 1)])

        async def nothing() -> None:
            pass

        proxy.lose(b"EXEC", nothing)
        rec = await store.update("r1", bump)
        assert proxy.lost == 1 and [visit for visit, _ in calls] == [0]
        assert rec is not None and rec.visit == 1
        got = await store.get("r1")
        assert got is not None and (got.visit, got.event_count) == (1, 1)
    finally:
        await store.close()


async def test_update_runs_the_change_again_when_another_writer_gets_in_first(
    redis_server: RedisServer, redis_url: str
) -> None:
    store = RedisStore(redis_url)
    try:
        await store.create(record(), [])
        seen: list[str | None] = []

        def bump(rec: RunRecord, now: float) -> Change:
            seen.append(rec.control)
            if len(seen) == 1:  # a competing writer between our read and our EXEC
                redis_server.command(
                    "HSET", store.keys.run("r1").rec, "control", '"stop"', db=int(db_of(redis_url))
                )
            return Change(dataclasses.replace(rec, visit=rec.visit + 1))

        rec = await store.update("r1", bump)
        assert seen == [None, "stop"]  # the change ran again on the fresh record
        assert rec is not None and (rec.visit, rec.control) == (1, "stop")
    finally:
        await store.close()


# -- the store's clock -----------------------------------------------------------------


async def test_a_clock_20_s_ahead_sees_no_healthy_run_as_recoverable(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, recoverer = RedisStore(redis_url), RedisStore(redis_url)
    try:
        leases = [await started(owner, f"r{i}") for i in range(20)]
        for i, lease in enumerate(leases):
            await owner.renew(f"r{i}", lease, 15.0)
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 20)  # this machine's clock runs ahead
        assert await recoverer.recoverable("wf") == []
        # Leases and update's now come from Redis's clock, not from this machine's.
        now = await store_now(recoverer, "r0")
        assert abs(now - real()) < 5
        await recoverer.renew("r0", leases[0], 15.0)
        rec = await recoverer.get("r0")
        assert rec is not None and now + 14 < rec.lease_expires < now + 16
        await expire(owner, "r3")  # the owner of r3 went silent: its lease ran out
        assert await recoverer.recoverable("wf") == ["r3"]
    finally:
        await owner.close()
        await recoverer.close()


# -- cost follows what is returned -----------------------------------------------------


async def _median_ms(call: Callable[[], Awaitable[Any]], times: int = 7) -> float:
    samples = []
    for _ in range(times):
        t0 = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


async def _fill(store: RedisStore, port: int, n: int) -> None:
    """Store ``n`` finished runs as ``create`` writes them, fast: one run's commands, copied.

    The template's id and created_at are swapped for each run's (same lengths, so the
    RESP stays valid); its script is replaced by the writes it makes (HSET, PEXPIRE),
    and the commands go out over a raw socket in big batches. Every reply is an
    integer, one line each.
    """
    template = store._creation(record("done-000000", created_at=1000000.0, status=RunStatus.COMPLETED), [])
    nonce, ttl_ms, fields = template.args[:3]
    pairs = template.args[3 : 3 + 2 * int(fields)]
    rec = template.keys[0]
    commands = [c for c in template.entries if b"buckets" not in c[1]]
    commands += [[b"HSET", rec, *pairs, b"_created", nonce], [b"PEXPIRE", rec, ttl_ms]]
    packed = b"".join(pack(c) for c in commands)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for start in range(0, n, 5000):
            batch = range(start, min(start + 5000, n))
            writer.write(
                b"".join(
                    packed.replace(b"done-000000", b"done-%06d" % i).replace(
                        b"1000000.0", b"%.1f" % (1e6 + i)
                    )
                    for i in batch
                )
            )
            lines, want = 0, len(batch) * len(commands)
            while lines < want:
                chunk = await reader.read(1 << 20)
                assert chunk and b"-" not in chunk, chunk[:200]
                lines += chunk.count(b"\r\n")
    finally:
        writer.close()
        await writer.wait_closed()


async def test_listing_and_recovery_cost_what_they_return_with_100k_finished_runs(bare_redis: int) -> None:
    redis_url = f"redis://127.0.0.1:{bare_redis}/0"
    store = RedisStore(redis_url, ttl=3600)
    try:
        first = _bucket(store)
        await store.create(record("warm-up", status=RunStatus.COMPLETED), [])
        t0 = time.perf_counter()
        await _fill(store, bare_redis, 100_000)
        filled = time.perf_counter() - t0
        # The finished runs are filed by the time bucket of when they finished: a fill that
        # crosses a bucket's edge (they are 450 s wide here) leaves them in two.
        keys = {store.keys.status("completed", "wf", *b) for b in (first, _bucket(store))}
        assert sum([await store.client.zcard(k) for k in keys]) == 100_001
        for i in range(5):
            lease = await started(store, f"parked-{i}", created_at=2e6 + i)
            await store.commit(
                f"parked-{i}",
                lease,
                Commit(fields={"status": RunStatus.WAITING, "pending": GATE}, release=True, seq=1),
            )
        for i in range(3):
            await started(store, f"busy-{i}", created_at=3e6 + i)
        await expire(store, "busy-1")
        reader = RedisStore(redis_url, ttl=3600)  # a process that did not create the runs
        try:
            waiting = await reader.list_runs("wf", RunStatus.WAITING)
            assert [r.run_id for r in waiting] == [f"parked-{i}" for i in reversed(range(5))]
            assert len(await reader.list_runs(status=RunStatus.WAITING)) == 5
            assert await reader.recoverable("wf") == ["busy-1"]
            latest = [r.run_id for r in await reader.list_runs(limit=10)]
            parked = [f"parked-{i}" for i in reversed(range(5))]
            assert latest == ["busy-2", "busy-1", "busy-0", *parked, "done-099999", "done-099998"]
            done = [
                r.run_id
                for r in await reader.list_runs("wf", RunStatus.COMPLETED, limit=3, after="done-050000")
            ]
            assert done == ["done-049999", "done-049998", "done-049997"]
            timings = {
                "list_runs(status=waiting)": await _median_ms(
                    lambda: reader.list_runs("wf", RunStatus.WAITING)
                ),
                "recoverable": await _median_ms(lambda: reader.recoverable("wf")),
                "list_runs(limit=100)": await _median_ms(lambda: reader.list_runs()),
            }
        finally:
            await reader.close()
        print(
            f"\nfilled 100,000 runs in {filled:.1f} s; "
            + ", ".join(f"{k} {v:.2f} ms" for k, v in timings.items())
        )
        assert timings["list_runs(status=waiting)"] < 20 and timings["recoverable"] < 20, timings
        assert timings["list_runs(limit=100)"] < 100, timings  # a hundred records decoded
    finally:
        await store.close()


def _bucket(store: RedisStore) -> tuple[str]:
    assert store.ttl is not None
    return (store.keys.bucket(store.ttl, time.time()).name,)


async def test_finished_runs_leave_the_live_indexes_and_expire_from_theirs(redis_url: str) -> None:
    store = RedisStore(redis_url, ttl=600)
    try:
        for i in range(50):
            lease = await started(store, f"r{i}")
            await store.commit(f"r{i}", lease, Commit(fields={"step": "B"}, seq=1))
            final = Commit(fields={"status": RunStatus.COMPLETED}, release=True, seq=2)
            await store.commit(f"r{i}", lease, final)
        await store.client.ping()
        await store.close()  # sends the clean-ups still queued
        client = aioredis.Redis.from_url(redis_url)
        try:
            for status in ("pending", "running"):
                for key in (store.keys.status(status), store.keys.status(status, "wf")):
                    assert await client.zcard(key) == 0, key
            # What is left of the finished runs goes away on its own: every key has a ttl.
            width = 60 + 2 * 60
            async for key in client.scan_iter():
                assert 0 < await client.pttl(key) <= (600 + width) * 1000, key
            listed = await RedisStore(client=client).list_runs(status=RunStatus.COMPLETED, limit=1000)
            assert len(listed) == 50
        finally:
            await client.aclose()
    finally:
        await store.close()


# -- damaged data, stale entries, scripts ----------------------------------------------


async def test_a_record_that_is_not_a_hash_is_listed_as_corrupt_and_named_when_read(redis_url: str) -> None:
    store = RedisStore(redis_url)
    try:
        await store.create(record("r0", created_at=900.0), [])
        await store.create(record("r1"), [])
        key = store.keys.run("r1").rec
        await store.client.delete(key)
        await store.client.set(key, "not a hash")
        for read in (store.get, store.load):
            with pytest.raises(CorruptRecordError, match="WRONGTYPE") as info:
                await read("r1")
            assert (info.value.run_id, info.value.key) == ("r1", key)
        listed = {r.run_id: r for r in await store.list_runs()}
        assert sorted(listed) == ["r0", "r1"] and listed["r0"].corrupt is None
        assert listed["r1"].corrupt is not None and "WRONGTYPE" in listed["r1"].corrupt
        assert listed["r1"].status == RunStatus.PENDING  # as the index has it; the workflow is unknown
        [under_wf] = [r for r in await store.list_runs("wf") if r.run_id == "r1"]
        assert under_wf.corrupt is not None and under_wf.workflow == "wf"
        assert await store.delete("r1")  # a damaged run can still be removed
        assert [r.run_id for r in await store.list_runs()] == ["r0"]
    finally:
        await store.close()


async def test_a_commit_on_a_damaged_record_raises_and_writes_nothing(redis_url: str) -> None:
    store = RedisStore(redis_url)
    keys = store.keys.run("r1")
    try:
        lease = await started(store)
        commit = Commit(
            fields={"step": "B"}, outputs=[OutputRecord(1, "A", 1)], events=[event("e", 2)], seq=1
        )
        for name, raw in (("event_count", '"many"'), ("commit_seq", "1.5")):
            await store.client.hset(keys.rec, name, raw)
            await store.client.hset(keys.rec, "commit_token", str(lease.token))
            before = await store.client.hgetall(keys.rec)
            with pytest.raises(CorruptRecordError) as info:
                await store.commit("r1", lease, commit)
            assert (info.value.run_id, info.value.key) == ("r1", keys.rec)
            assert await store.client.hgetall(keys.rec) == before
            assert (await store.client.llen(keys.events), await store.client.llen(keys.outputs)) == (1, 0)
            await store.client.hset(keys.rec, mapping={"event_count": "1", "commit_seq": "0"})
        await store.client.delete(keys.rec)
        await store.client.set(keys.rec, "not a hash")
        with pytest.raises(CorruptRecordError, match="WRONGTYPE"):
            await store.commit("r1", lease, commit)
    finally:
        await store.close()


async def test_large_commits(redis_url: str) -> None:
    store = RedisStore(redis_url)
    try:
        lease = await started(store)
        journal = {f"B/{i}": {"i": i} for i in range(2500)}  # more than one HSET per chunk
        events = [event("e", 2 + i) for i in range(2500)]
        outputs = [OutputRecord(1, f"S{i}", i) for i in range(2500)]
        commit = Commit(
            fields={"step": "B", "visit": 1}, outputs=outputs, events=events, journal=journal, seq=1
        )
        assert await store.commit("r1", lease, commit) is None
        loaded = await store.load("r1")
        assert loaded is not None and loaded.record.event_count == 2501
        assert len(loaded.outputs) == 2500 and loaded.journal == journal
        assert [e.seq for e in await store.events("r1", after=2499)] == [2500, 2501]
    finally:
        await store.close()


async def test_scripts_are_reloaded_with_the_index_entries_in_front(redis_url: str) -> None:
    store = RedisStore(redis_url)
    try:
        lease = await started(store)
        await store.client.script_flush()
        pending = {"deadline": time.time() - 1}
        commit = Commit(
            fields={"status": RunStatus.WAITING, "pending": pending}, events=[event("w", 2)], seq=1
        )
        assert await store.commit("r1", lease, commit) is None
        assert await store.due_gates("wf", time.time()) == ["r1"]
        assert [e.seq for e in await store.events("r1")] == [1, 2]  # applied once
        await store.client.script_flush()
        assert await store.create(record("r2", status=RunStatus.WAITING, pending=pending), [])
        assert sorted(await store.due_gates("wf", time.time())) == ["r1", "r2"]
        await store.client.script_flush()
        assert [r.run_id for r in await store.list_runs(status=RunStatus.WAITING)] == ["r2", "r1"]
    finally:
        await store.close()


async def test_stale_index_entries_are_dropped_and_live_ones_kept(redis_url: str) -> None:
    store = RedisStore(redis_url)
    try:
        await store.create(record("gone"), [])
        await store.client.delete(*store.keys.run("gone"))  # as if it expired
        await store.client.zadd(store.keys.gates("wf"), {"gone": 1.0})
        await store.create(record("r1", created_at=2000.0), [])
        await store.client.zadd(store.keys.gates("wf"), {"r1": 1.0})  # not waiting
        pending_key = store.keys.status("pending", "wf")
        stale = b"r1\0old-version"
        await store.client.zadd(pending_key, {stale: 2000.0})  # an entry the record moved on from
        assert [r.run_id for r in await store.list_runs("wf")] == ["r1"]
        assert await store.due_gates("wf", time.time()) == []
        assert [cast(bytes, m).split(b"\0")[0] for m in await store.client.zrange(pending_key, 0, -1)] == [
            b"r1"
        ]
        assert await store.client.zcard(store.keys.gates("wf")) == 0
        # Re-created after expiring, before any reader dropped its old entry: the old
        # entry names another version, so dropping it keeps the new run listed.
        await store.create(record("again", created_at=1.0), [])
        await store.client.delete(*store.keys.run("again"))
        await store.create(record("again", created_at=1.0), [])
        assert [r.run_id for r in await store.list_runs("wf")] == ["r1", "again"]
        assert await store.client.zcard(pending_key) == 2
    finally:
        await store.close()


async def test_sibling_is_a_store_of_its_own_on_the_same_url(redis_url: str) -> None:
    store = RedisStore(redis_url, key_prefix="p:", ttl=60, retry_for=3, max_connections=5)
    sibling = store.sibling()
    try:
        assert isinstance(sibling, RedisStore) and sibling.client is not store.client
        assert (sibling.key_prefix, sibling.ttl, sibling.retry_for) == ("p:", 60, 3)
        assert sibling.client.connection_pool.max_connections == 5
    finally:
        assert sibling is not None
        await sibling.close()
        await store.close()


async def test_open_store_builds_each_kind(redis_url: str, tmp_path: Path) -> None:
    assert isinstance(open_store(), MemoryStore)
    sqlite = open_store("sqlite", path=str(tmp_path / "x.db"), key_prefix="p:", ttl=5)
    assert isinstance(sqlite, SqliteStore) and sqlite.key_prefix == "p:" and sqlite.ttl == 5
    red = open_store("redis", url=redis_url, key_prefix="p:")
    try:
        assert isinstance(red, RedisStore) and red.keys.status("running") == "p:#st:running"
        assert open_store(red) is red
        with pytest.raises(WorkflowDefinitionError, match="memory, sqlite, redis, postgres"):
            open_store("mongodb")
    finally:
        await red.close()
        await sqlite.close()


# -- the approval index ---------------------------------------------------------------------


async def test_stale_approval_entries_are_never_listed_and_are_dropped(redis_url: str) -> None:
    store = RedisStore(redis_url)
    try:
        live, lost = approval("r1", created_at=1001.0), approval("r2", created_at=1002.0)
        assert await store.create(record("r1", status=RunStatus.WAITING, pending=gate_pending(live)), [])
        # A process filed r2's approval and died before the write that gave r2 its pending.
        await store.client.zadd(store.keys.approvals(), {lost["id"].encode() + b"\0r2": 1002.0})
        await store.client.zadd(store.keys.approvals("by", "ops"), {lost["id"].encode() + b"\0r2": 1002.0})
        # r1's record vanished under the index (a key expired, say) after a second filing.
        assert await store.create(
            record("r3", status=RunStatus.WAITING, pending=gate_pending(approval("r3"))), []
        )
        await store.client.delete(store.keys.run("r3").rec)
        assert [a["id"] for a in await store.approvals()] == [live["id"]]
        assert [a["id"] for a in await store.approvals(approver="ops")] == [live["id"]]
        members = await store.client.zrange(store.keys.approvals(), 0, -1)
        assert members == [live["id"].encode() + b"\0r1"]  # the stale ones were dropped on the way
        # Deleting a run takes its entries, and its approval's place, with it.
        assert await store.delete("r1")
        assert await store.client.zcard(store.keys.approvals("by", "ops")) == 0
        assert await store.client.hlen(store.keys.approval_places()) == 1  # r3's, whose record is gone
    finally:
        await store.close()
