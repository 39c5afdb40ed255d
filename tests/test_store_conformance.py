"""One behaviour for every store: the memory store is the reference, SQLite and Redis match it.

Durable stores hand back plain JSON data where the memory store keeps the objects it
was given, so values are compared in their JSON form.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import time
from typing import Any

import pytest
from store_helpers import BuildOutput, State, acquire, event, js, record, same_record, started

from agentflow.errors import CorruptRecordError, LeaseLostError, StoreError
from agentflow.records import Commit, OutputRecord, RunRecord, RunStatus
from agentflow.stores import Change, Lease, Store

DURABLE = ("sqlite", "redis")


# -- create / get / load ------------------------------------------------------------------


async def test_create_is_idempotent(store: Store) -> None:
    assert await store.create(record(), [event("run_started", 1)])
    assert not await store.create(record(state=State(artifact="other")), [event("run_started", 1)])
    rec = await store.get("r1")
    assert rec is not None and js(rec.state) == {"artifact": None, "count": 0}
    assert rec.event_count == 1
    assert [e.kind for e in await store.events("r1")] == ["run_started"]


async def test_missing_run(store: Store) -> None:
    assert await store.get("nope") is None
    assert await store.load("nope") is None
    assert await store.events("nope") == []
    assert await store.update("nope", lambda rec: Change(rec)) is None
    assert not await store.delete("nope")
    with pytest.raises(LeaseLostError, match="nope"):
        await store.commit("nope", Lease("w1", 1), Commit(fields={"step": "A"}))
    with pytest.raises(LeaseLostError):
        await store.renew("nope", Lease("w1", 1), 15)


async def test_round_trip(store: Store) -> None:
    rec = record(
        state=State(artifact="out.tar", count=3),
        input={"repo": "acme/app", "tags": [1, 2.5, None, "x"], "nested": {"ok": True}},
        step="Build",
        visit=4,
        pending={"approvers": ["ops"], "deadline": None},
        decisions=({"approved": True, "by": "ops", "at": 1.5},),
        usage={"input_tokens": 3, "output_tokens": 4},
        error={"step": "Build", "type": "ValueError", "message": 'é ☃ \x00 "quoted"'},
        output=[1, "two"],
        control="pause",
    )
    assert await store.create(rec, [event("run_started", 1)])
    got = await store.get("r1")
    same_record(got, dataclasses.replace(rec, event_count=1))
    assert got is not None
    assert type(got.status) is RunStatus and got.status == RunStatus.PENDING
    assert isinstance(got.decisions, tuple)
    loaded = await store.load("r1")
    assert loaded is not None
    same_record(loaded.record, dataclasses.replace(rec, event_count=1))
    assert loaded.outputs == [] and loaded.journal == {}


# -- commit -------------------------------------------------------------------------------


async def test_commit_applies_fields_outputs_events_and_journal(store: Store) -> None:
    lease = await started(store)
    before = await store.get("r1")
    assert before is not None
    commit = Commit(
        fields={"state": State(artifact="out.tar", count=1), "step": "Test", "visit": 1},
        outputs=[OutputRecord(1, "Build", BuildOutput(artifact="out.tar", size=42))],
        events=[event("step_started", 2, "Build"), event("step_completed", 3, "Build", {"ms": 5})],
        journal={"Build/agent/1": {"text": "hi", "usage": [1, 2]}},
    )
    assert await store.commit("r1", lease, commit) is None
    loaded = await store.load("r1")
    assert loaded is not None
    rec = loaded.record
    assert js(rec.state) == {"artifact": "out.tar", "count": 1}
    assert (rec.step, rec.visit, rec.event_count, rec.status) == ("Test", 1, 3, RunStatus.RUNNING)
    assert rec.updated_at >= before.updated_at
    assert rec.lease_owner == "w1" and rec.lease_token == lease.token  # a commit keeps the lease
    assert [(o.visit, o.step, js(o.value)) for o in loaded.outputs] == [
        (1, "Build", {"artifact": "out.tar", "size": 42})
    ]
    assert loaded.journal == {"Build/agent/1": {"text": "hi", "usage": [1, 2]}}
    events = await store.events("r1")
    assert [(e.seq, e.kind, e.step, js(e.data), e.run_id) for e in events] == [
        (1, "run_started", None, None, "r1"),
        (2, "step_started", "Build", None, "r1"),
        (3, "step_completed", "Build", {"ms": 5}, "r1"),
    ]
    # A second commit appends and overwrites journal keys.
    await store.commit(
        "r1",
        lease,
        Commit(
            fields={"status": RunStatus.COMPLETED, "output": {"ok": True}},
            outputs=[OutputRecord(2, "Test", None)],
            journal={"Build/agent/1": "replaced", "Test/1": 7},
        ),
    )
    loaded = await store.load("r1")
    assert loaded is not None
    assert loaded.record.status == RunStatus.COMPLETED and loaded.record.event_count == 3
    assert [o.step for o in loaded.outputs] == ["Build", "Test"]
    assert loaded.journal == {"Build/agent/1": "replaced", "Test/1": 7}


async def test_commit_with_stale_token_writes_nothing(store: Store) -> None:
    old = await started(store)
    new = await acquire(store, owner="w2")  # recovered elsewhere
    assert new.token == old.token + 1
    before = await store.load("r1")
    commit = Commit(
        fields={"step": "Evil", "visit": 99},
        outputs=[OutputRecord(9, "Evil", 1)],
        events=[event("step_started", 2)],
        journal={"k": 1},
        release=True,
    )
    for lease in (old, Lease("w1", new.token), Lease("w2", old.token)):
        with pytest.raises(LeaseLostError, match="r1"):
            await store.commit("r1", lease, commit)
    after = await store.load("r1")
    assert before is not None and after is not None
    same_record(after.record, before.record)
    assert after.outputs == [] and after.journal == {}
    assert len(await store.events("r1")) == 1


async def test_renew_extends_the_lease_and_returns_control(store: Store) -> None:
    lease = await started(store)
    assert await store.renew("r1", lease, 100.0) is None
    rec = await store.get("r1")
    assert rec is not None and rec.lease_expires == pytest.approx(time.time() + 100, abs=5)
    await store.update("r1", lambda r: Change(dataclasses.replace(r, control="pause")))
    assert await store.renew("r1", lease, 15.0) == "pause"
    assert await store.commit("r1", lease, Commit(fields={"step": "B"})) == "pause"
    assert await store.commit("r1", lease, Commit(fields={"control": None})) is None
    with pytest.raises(LeaseLostError):
        await store.renew("r1", Lease("w1", lease.token + 1), 15.0)
    with pytest.raises(LeaseLostError):
        await store.renew("r1", Lease("w2", lease.token), 15.0)


async def test_release_clears_the_lease(store: Store) -> None:
    lease = await started(store)
    pending = {"approvers": ["ops"], "deadline": None}
    await store.commit(
        "r1", lease, Commit(fields={"status": RunStatus.WAITING, "pending": pending}, release=True)
    )
    rec = await store.get("r1")
    assert rec is not None
    assert (rec.lease_owner, rec.lease_expires, rec.status) == (None, 0.0, RunStatus.WAITING)
    assert js(rec.pending) == pending
    with pytest.raises(LeaseLostError):
        await store.commit("r1", lease, Commit(fields={"step": "B"}))
    with pytest.raises(LeaseLostError):
        await store.renew("r1", lease, 15.0)


# -- update -------------------------------------------------------------------------------


async def test_update_semantics(store: Store) -> None:
    await store.create(record(), [event("run_started", 1)])
    unchanged = await store.update("r1", lambda rec: None)
    assert unchanged is not None and unchanged.event_count == 1

    def boom(rec: RunRecord) -> Change:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await store.update("r1", boom)
    same_record(await store.get("r1"), unchanged)

    def decide(rec: RunRecord) -> Change:
        decisions = (*rec.decisions, {"approved": True, "by": "ops"})
        return Change(
            dataclasses.replace(rec, decisions=decisions, step="Next"),
            [event("decided", rec.event_count + 1)],
        )

    written = await store.update("r1", decide)
    assert written is not None and written.event_count == 2 and written.updated_at >= unchanged.updated_at
    again = await store.update("r1", decide)
    assert again is not None
    got = await store.get("r1")
    assert got is not None
    assert got.decisions == ({"approved": True, "by": "ops"},) * 2
    assert (got.step, got.event_count) == ("Next", 3)
    assert [e.seq for e in await store.events("r1")] == [1, 2, 3]


async def test_concurrent_updates_serialize(store: Store) -> None:
    await store.create(record(), [])

    def bump(rec: RunRecord) -> Change:
        return Change(dataclasses.replace(rec, visit=rec.visit + 1), [event("bump", rec.event_count + 1)])

    await asyncio.gather(*(store.update("r1", bump) for _ in range(20)))
    rec = await store.get("r1")
    assert rec is not None and rec.visit == 20 and rec.event_count == 20
    assert [e.seq for e in await store.events("r1")] == list(range(1, 21))


# -- reading ------------------------------------------------------------------------------


async def test_events_after(store: Store) -> None:
    lease = await started(store)
    await store.commit("r1", lease, Commit(events=[event(f"e{i}", i) for i in range(2, 6)]))
    assert [e.seq for e in await store.events("r1", after=0)] == [1, 2, 3, 4, 5]
    assert [e.kind for e in await store.events("r1", after=3)] == ["e4", "e5"]
    assert await store.events("r1", after=5) == []
    assert await store.events("r1", after=50) == []


async def test_list_runs_filters_and_orders_oldest_first(store: Store) -> None:
    await store.create(record("b", "wf", created_at=200.0), [])
    await store.create(record("a", "wf", created_at=100.0), [])
    await store.create(record("c", "other", created_at=150.0), [])
    await store.create(record("d", "wf", created_at=300.0, status=RunStatus.COMPLETED), [])
    assert [r.run_id for r in await store.list_runs()] == ["a", "c", "b", "d"]
    assert [r.run_id for r in await store.list_runs("wf")] == ["a", "b", "d"]
    assert [r.run_id for r in await store.list_runs("wf", RunStatus.COMPLETED)] == ["d"]
    assert [r.run_id for r in await store.list_runs(status=RunStatus.PENDING)] == ["a", "c", "b"]
    assert await store.list_runs("nobody") == []
    assert all(type(r.status) is RunStatus for r in await store.list_runs())


async def test_due_gates(store: Store) -> None:
    now = time.time()
    for run_id, deadline in (("early", now - 10), ("late", now + 100), ("none", None)):
        lease = await started(store, run_id)
        pending = {"approvers": ["ops"], "deadline": deadline}
        await store.commit(
            run_id, lease, Commit(fields={"status": RunStatus.WAITING, "pending": pending}, release=True)
        )
    await store.create(
        record("other-wf", "other", status=RunStatus.WAITING, pending={"deadline": now - 5}), []
    )
    assert await store.due_gates("wf", now) == ["early"]
    assert sorted(await store.due_gates("wf", now + 200)) == ["early", "late"]
    assert await store.due_gates("other", now) == ["other-wf"]
    # Decided: no longer waiting, so no longer due.
    await store.update(
        "early", lambda r: Change(dataclasses.replace(r, status=RunStatus.RUNNING, pending=None))
    )
    assert await store.due_gates("wf", now + 200) == ["late"]


async def test_delete(store: Store) -> None:
    lease = await started(store)
    await store.commit("r1", lease, Commit(outputs=[OutputRecord(1, "A", 1)], journal={"k": 1}))
    assert await store.delete("r1")
    assert await store.get("r1") is None and await store.load("r1") is None
    assert await store.events("r1") == [] and await store.list_runs() == []
    assert not await store.delete("r1")
    # The id is free again, with nothing left over from the deleted run.
    assert await store.create(record(), [])
    loaded = await store.load("r1")
    assert loaded is not None and loaded.outputs == [] and loaded.journal == {}
    assert await store.events("r1") == []


@pytest.mark.parametrize("kind", ["memory", *DURABLE])
async def test_ttl_expires_finished_runs(make_store: Any, kind: str) -> None:
    store: Store = make_store(kind, ttl=0.5)
    lease = await started(store, "done")
    await started(store, "busy")
    await store.create(record("stopped"), [])
    await store.commit("done", lease, Commit(fields={"status": RunStatus.COMPLETED}, events=[event("x", 3)]))
    await store.update("stopped", lambda r: Change(dataclasses.replace(r, status=RunStatus.STOPPED)))
    assert await store.get("done") is not None
    await asyncio.sleep(0.7)
    for run_id in ("done", "stopped"):
        assert await store.get(run_id) is None
        assert await store.load(run_id) is None
        assert await store.events(run_id) == []
    assert [r.run_id for r in await store.list_runs()] == ["busy"]  # unfinished runs stay
    assert await store.create(record("done"), [])  # the id is free again
    assert await store.events("done") == []


# -- damage and bad values (durable stores only: memory keeps objects as given) -----------


async def _damage(store: Any, kind: str, run_id: str, field: str, raw: str) -> None:
    if kind == "sqlite":
        with sqlite3.connect(store.path) as db:
            db.execute(f"UPDATE agentflow_runs SET {field} = ? WHERE run_id = ?", (raw, run_id))
        db.close()
    else:
        await store.client.hset(store.keys.run(run_id).rec, field, raw)


@pytest.mark.parametrize("kind", DURABLE)
@pytest.mark.parametrize(
    ("field", "raw"), [("state", "{not json"), ("status", '"sleeping"'), ("visit", '"many"')]
)
async def test_damaged_record_raises_corrupt_record_error(
    make_store: Any, kind: str, field: str, raw: str
) -> None:
    store = make_store(kind)
    await store.create(record(), [])
    if kind == "sqlite" and field != "state":
        raw = json.loads(raw)  # plain columns hold plain values
    await _damage(store, kind, "r1", field, raw)
    for read in (store.get, store.load):
        with pytest.raises(CorruptRecordError) as info:
            await read("r1")
        assert info.value.run_id == "r1" and field in info.value.key
    with pytest.raises(CorruptRecordError):
        await store.list_runs()


@pytest.mark.parametrize("kind", DURABLE)
async def test_unencodable_value_raises_store_error_and_writes_nothing(make_store: Any, kind: str) -> None:
    store = make_store(kind)
    with pytest.raises(StoreError, match=r"run r1: cannot store 'state'"):
        await store.create(record(state={"x": object()}), [])
    assert await store.get("r1") is None
    lease = await started(store)
    with pytest.raises(StoreError, match=r"run r1.*Build"):
        await store.commit(
            "r1", lease, Commit(fields={"step": "B"}, outputs=[OutputRecord(1, "Build", object())])
        )
    with pytest.raises(StoreError, match="'lease_owner'"):
        await store.commit("r1", lease, Commit(fields={"lease_owner": "me"}))
    with pytest.raises(StoreError, match="'status'"):
        await store.commit("r1", lease, Commit(fields={"status": "sleeping"}))
    with pytest.raises(StoreError, match="'state'"):
        await store.update("r1", lambda r: Change(dataclasses.replace(r, state=object())))
    rec = await store.get("r1")
    assert rec is not None and rec.step is None and rec.status == RunStatus.RUNNING
    loaded = await store.load("r1")
    assert loaded is not None and loaded.outputs == []


@pytest.mark.parametrize("kind", DURABLE)
async def test_two_store_instances_share_runs(make_store: Any, kind: str) -> None:
    first, second = make_store(kind), make_store(kind)
    lease = await started(first)
    await first.commit("r1", lease, Commit(fields={"step": "B"}))
    rec = await second.get("r1")
    assert rec is not None and rec.step == "B"
    await acquire(second, owner="w2")
    with pytest.raises(LeaseLostError):
        await first.commit("r1", lease, Commit(fields={"step": "C"}))


@pytest.mark.parametrize("kind", DURABLE)
async def test_key_prefix_separates_namespaces(make_store: Any, kind: str) -> None:
    a, b = make_store(kind, key_prefix="a:"), make_store(kind, key_prefix="b:")
    await a.create(record(), [])
    assert await b.get("r1") is None and await b.list_runs() == []
    assert await b.create(record(), [])
    assert await a.delete("r1")
    assert await b.get("r1") is not None
