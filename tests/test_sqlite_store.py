"""SqliteStore beyond the conformance suite: once-only commits, the loop kept free, durability,
costs that do not grow with what is stored, expiry, damaged rows, several processes on one file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import sqlite3
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agentflow.errors import CorruptRecordError, LeaseLostError, StoreError, WorkflowDefinitionError
from agentflow.stores import SqliteStore, open_store
from agentflow.stores.contract import Change, Commit, Lease, OutputRecord, RunRecord, approval_id
from agentflow.stores.sqlite_index import page_of_approvals
from agentflow.stores.sqlite_schema import VERSION
from agentflow.testing.store_builders import acquire
from agentflow.types import RunEvent, RunStatus

ROOT = Path(__file__).resolve().parents[1]


def record(run_id: str = "r1", workflow: str = "wf", created_at: float = 1000.0, **fields: Any) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        workflow=workflow,
        status=fields.pop("status", RunStatus.PENDING),
        input=fields.pop("input", {"repo": "acme/app"}),
        state=fields.pop("state", {"count": 0}),
        created_at=created_at,
        updated_at=created_at,
        **fields,
    )


def event(kind: str, seq: int = 0, step: str | None = None) -> RunEvent:
    return RunEvent(kind=kind, run_id="r1", step=step, data=None, at=1000.0 + seq, seq=seq)


async def started(store: SqliteStore, run_id: str = "r1", **fields: Any) -> Lease:
    assert await store.create(record(run_id, **fields), [event("run_started", 1)])
    return await acquire(store, run_id)


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    store = SqliteStore(str(tmp_path / "agentflow.db"))
    yield store
    await store.close()


# -- once-only commits, the store's clock ------------------------------------------------


async def test_a_retried_commit_is_applied_once_even_after_another_writer(store: SqliteStore) -> None:
    lease = await started(store)
    step = Commit(
        fields={"step": "b", "visit": 1},
        outputs=[OutputRecord(1, "a", {"n": 1})],
        events=[event("step_completed", step="a")],
        seq=1,
    )
    assert await store.commit("r1", lease, step) is None

    def pause(rec: RunRecord, now: float) -> Change:  # a pause request lands before the retry
        return Change(dataclasses.replace(rec, control="pause"), [event("pause_requested")])

    await store.update("r1", pause)
    assert await store.commit("r1", lease, step) == "pause"  # the lost reply's retry
    loaded = await store.load("r1")
    assert loaded is not None
    assert loaded.outputs == [OutputRecord(1, "a", {"n": 1})]
    assert [e.kind for e in await store.events("r1")] == ["run_started", "step_completed", "pause_requested"]
    assert (loaded.record.commit_token, loaded.record.commit_seq) == (lease.token, 1)
    # The next commit applies; one without a commit number is refused, naming the run.
    assert await store.commit("r1", lease, Commit(fields={"visit": 2}, seq=2)) == "pause"
    with pytest.raises(StoreError, match="run r1: commit seq 0 is not a commit number"):
        await store.commit("r1", lease, Commit(fields={"visit": 3}))
    rec = await store.get("r1")
    assert rec is not None and rec.visit == 2


async def test_a_commit_after_the_lease_moved_on_is_refused(store: SqliteStore) -> None:
    old = await started(store)
    new = await acquire(store, owner="w2")
    with pytest.raises(LeaseLostError, match=r"run r1: .*token 1 of 'w1' is stale; the lease is 2 of 'w2'"):
        await store.commit("r1", old, Commit(fields={"visit": 1}, seq=1))
    with pytest.raises(LeaseLostError, match="run r1"):
        await store.renew("r1", old, 15)
    assert await store.commit("r1", new, Commit(fields={"visit": 1}, seq=1)) is None
    with pytest.raises(LeaseLostError, match=r"run nope: .*no longer exists"):
        await store.commit("nope", new, Commit(seq=1))


async def test_update_and_renew_use_the_store_clock(store: SqliteStore) -> None:
    assert await store.create(record(), [])
    seen: list[float] = []

    def look(rec: RunRecord, now: float) -> None:
        seen.append(now)
        return None

    before = time.time()
    unchanged = await store.update("r1", look)
    assert unchanged is not None and unchanged.updated_at == 1000.0
    assert before <= seen[0] <= time.time()
    lease = await acquire(store, ttl=1.0)
    before = time.time()
    assert await store.renew("r1", lease, 30.0) is None
    rec = await store.get("r1")
    assert rec is not None and before + 30 <= rec.lease_expires <= time.time() + 30
    assert await store.update("missing", look) is None


async def test_recoverable_lists_running_runs_whose_lease_ran_out(store: SqliteStore) -> None:
    for run_id in ("dead", "alive", "other", "done"):
        await store.create(record(run_id, workflow="other" if run_id == "other" else "wf"), [])
    for run_id in ("dead", "other"):
        await acquire(store, run_id, ttl=-1.0)
    await acquire(store, "alive")
    done = await acquire(store, "done", ttl=-1.0)
    await store.commit("done", done, Commit(fields={"status": RunStatus.COMPLETED}, release=True, seq=1))
    assert await store.recoverable("wf") == ["dead"]
    assert await store.recoverable("other") == ["other"]
    assert await store.recoverable("wf", limit=0) == []


# -- listing ---------------------------------------------------------------------------


async def test_list_runs_is_light_newest_first_and_paged(store: SqliteStore) -> None:
    for i in range(7):
        status = RunStatus.WAITING if i % 2 else RunStatus.COMPLETED
        wf = "wf" if i < 5 else "other"
        rec = record(f"r{i}", workflow=wf, created_at=1000.0 + i // 2, status=status, output={"big": i})
        await store.create(rec, [])
    listed = await store.list_runs()
    assert [r.run_id for r in listed] == ["r6", "r5", "r4", "r3", "r2", "r1", "r0"]  # ties: newest insert
    assert all(r.input is None and r.state is None and r.output is None for r in listed)
    pages, after = [], None
    while page := await store.list_runs(limit=3, after=after):
        pages.append([r.run_id for r in page])
        after = page[-1].run_id
    assert pages == [["r6", "r5", "r4"], ["r3", "r2", "r1"], ["r0"]]
    assert [r.run_id for r in await store.list_runs("wf", RunStatus.WAITING)] == ["r3", "r1"]
    assert [r.run_id for r in await store.list_runs(status=RunStatus.WAITING, after="r5")] == ["r3", "r1"]
    assert [r.run_id for r in await store.list_runs("other", limit=1)] == ["r6"]
    full = await store.get("r4")
    assert full is not None and full.output == {"big": 4} and full.input == {"repo": "acme/app"}
    with pytest.raises(StoreError, match="run gone is not stored"):
        await store.list_runs(after="gone")


async def test_a_damaged_row_is_listed_as_corrupt_and_hides_no_other_run(store: SqliteStore) -> None:
    for run_id in ("a", "b", "c"):
        await store.create(record(run_id), [])
    await store.create(record("d", state={"blob": "z" * 5000}), [])  # kept out of the hot row
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE agentflow_runs SET pending = '{nope' WHERE run_id = 'b'")
        db.execute("UPDATE agentflow_runs SET visit = 'many' WHERE run_id = 'c'")
        db.execute("UPDATE agentflow_runs SET state = '[1,' WHERE run_id = 'a'")
        db.execute("UPDATE agentflow_values SET value = '[2,' WHERE run_id = 'd' AND field = 'state'")
    db.close()
    listed = {r.run_id: r for r in await store.list_runs()}
    assert sorted(listed) == ["a", "b", "c", "d"]
    assert listed["a"].corrupt is None and listed["d"].corrupt is None  # a light listing reads no state
    assert "agentflow_runs.pending" in (listed["b"].corrupt or "")
    assert "visit" in (listed["c"].corrupt or "") and listed["c"].info().error is not None
    with pytest.raises(CorruptRecordError, match=r"run b: .*agentflow_runs.pending") as exc:
        await store.get("b")
    assert exc.value.run_id == "b"
    with pytest.raises(CorruptRecordError, match=r"run a: .*agentflow_runs.state"):
        await store.load("a")
    with pytest.raises(CorruptRecordError, match=r"run d: .*agentflow_values\[state\]"):
        await store.get("d")
    with pytest.raises(CorruptRecordError, match="run c"):
        await store.update("c", lambda rec, now: None)


async def test_values_that_cannot_be_stored_are_refused_naming_run_and_field(store: SqliteStore) -> None:
    lease = await started(store)
    with pytest.raises(StoreError, match="run r1: cannot store 'state'"):
        await store.commit("r1", lease, Commit(fields={"state": object()}, seq=1))
    with pytest.raises(StoreError, match="run r1: 'lease_token' cannot be committed"):
        await store.commit("r1", lease, Commit(fields={"lease_token": 9}, seq=1))
    with pytest.raises(StoreError, match="run r2: cannot store 'visit'"):
        await store.create(record("r2", visit="one"), [])
    assert await store.commit("r1", lease, Commit(fields={"visit": 1}, seq=1)) is None


# -- off the event loop ----------------------------------------------------------------


@pytest.mark.parametrize("durability", ["full", "normal"])
async def test_a_held_write_lock_does_not_block_the_event_loop(tmp_path: Path, durability: Any) -> None:
    store = SqliteStore(str(tmp_path / "agentflow.db"), durability=durability)
    try:
        await _held_lock_leaves_the_loop_free(store)
    finally:
        await store.close()


async def _held_lock_leaves_the_loop_free(store: SqliteStore) -> None:
    lease = await started(store)
    await store.get("r1")  # the loop's connection is open: at "normal" the commit tries it first
    lag = 0.0

    async def tick() -> None:
        nonlocal lag
        while True:
            due = time.monotonic() + 0.01
            await asyncio.sleep(0.01)
            lag = max(lag, time.monotonic() - due)

    other = sqlite3.connect(store.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process's writer, holding the lock for 2 s
        asyncio.get_running_loop().call_later(2.0, other.execute, "COMMIT")
        ticker = asyncio.create_task(tick())
        start = time.monotonic()
        assert await store.commit("r1", lease, Commit(fields={"visit": 1}, seq=1)) is None
        waited = time.monotonic() - start
        ticker.cancel()
    finally:
        other.close()
    assert waited >= 1.9
    assert lag < 0.1, f"the event loop stalled {lag * 1000:.0f} ms"
    rec = await store.get("r1")
    assert rec is not None and rec.visit == 1


async def test_reads_and_renewals_go_on_while_another_connection_holds_the_lock(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "agentflow.db"), durability="normal")
    other = sqlite3.connect(store.path, isolation_level=None)
    try:
        lease = await started(store)
        await store.get("r1")
        other.execute("BEGIN IMMEDIATE")
        start = time.monotonic()
        rec = await store.get("r1")
        assert rec is not None and [e.kind for e in await store.events("r1")] == ["run_started"]
        assert [r.run_id for r in await store.list_runs()] == ["r1"]
        assert time.monotonic() - start < 0.5  # reads do not wait for the writer
        renewal = asyncio.ensure_future(store.renew("r1", lease, 30.0))  # a write: it waits, off the loop
        bump = asyncio.ensure_future(
            store.update("r1", lambda rec, now: Change(dataclasses.replace(rec, visit=7)))
        )
        await asyncio.sleep(0.3)
        assert not renewal.done() and not bump.done()
        other.execute("COMMIT")
        assert await renewal is None and (await bump) is not None
        rec = await store.get("r1")
        assert rec is not None and rec.visit == 7 and rec.lease_expires > time.time() + 20
    finally:
        other.close()
        await store.close()


@pytest.mark.parametrize("durability", ["full", "normal"])
async def test_which_calls_the_store_thread_makes(tmp_path: Path, durability: Any) -> None:
    """Reads and renewals run on the loop; writes too at "normal"; at "full" the thread flushes."""
    store = SqliteStore(str(tmp_path / "agentflow.db"), durability=durability)
    try:
        await store.get("r0")  # the first call opens the file on the thread
        hops: list[str] = []
        submit = store._submit

        def counted(job: Any) -> Any:
            hops.append(sys._getframe(1).f_code.co_name)
            return submit(job)

        store._submit = counted  # type: ignore[method-assign]
        store._next_purge = time.time() + 60  # no purge due
        lease = await started(store)
        assert (
            await store.commit("r1", lease, Commit(fields={"visit": 1}, events=[event("e")], seq=1)) is None
        )
        await store.renew("r1", lease, 30.0)
        await store.get("r1")
        await store.load("r1")
        await store.events("r1")
        await store.list_runs()
        await store.recoverable("wf")
        await store.due_gates("wf", time.time())
        writes = ["_call"] * 3  # create, update (the lease), commit
        assert hops == ([] if durability == "normal" else writes)
        hops.clear()
        assert await store.delete("r1")
        assert hops == ["_call"]  # a delete is as long as the run: always on the thread
    finally:
        await store.close()


async def test_the_store_and_its_sibling_serve_other_event_loops(store: SqliteStore) -> None:
    lease = await started(store)
    sibling = store.sibling()
    assert isinstance(sibling, SqliteStore) and sibling is not store
    assert (sibling.path, sibling.ttl, sibling.key_prefix, sibling.durability) == (
        store.path, store.ttl, store.key_prefix, store.durability
    )  # fmt: skip
    results: list[Any] = []

    async def elsewhere() -> None:
        results.append(await sibling.renew("r1", lease, 30.0))
        results.append(await store.get("r1"))  # the same store, from a second loop
        await sibling.close()

    thread = threading.Thread(target=asyncio.run, args=(elsewhere(),))
    thread.start()
    await asyncio.to_thread(thread.join)
    assert results[0] is None and results[1].lease_expires > time.time() + 20


async def test_close_lets_queued_calls_finish_and_a_dropped_store_stops_its_thread(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "t.db"))
    created = asyncio.ensure_future(store.create(record(), []))
    await asyncio.sleep(0)  # queued before close
    await store.close()
    assert await created
    dropped = SqliteStore(str(tmp_path / "t.db"))
    assert await dropped.get("r1") is not None
    thread = dropped._thread
    assert thread is not None and thread.is_alive()
    del dropped
    gc.collect()
    await asyncio.to_thread(thread.join, 5)
    assert not thread.is_alive()


async def test_the_wal_of_the_loop_connection_is_checkpointed_and_started_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agentflow.stores.sqlite_calls.CHECKPOINT_BYTES", 400_000)
    store = SqliteStore(str(tmp_path / "agentflow.db"), durability="normal")
    try:
        lease = await started(store)
        await store.get("r1")
        for seq in range(1, 2001):  # a few pages each, back to back: 30 MB of WAL if it never restarts
            step = Commit(fields={"visit": seq, "state": {"n": seq}}, events=[event("e")], seq=seq)
            await store.commit("r1", lease, step)
        assert wal_bytes(store.path) < 2_000_000
        rec = await store.get("r1")
        assert rec is not None and rec.visit == 2000 and rec.state == {"n": 2000}
    finally:
        await store.close()


async def test_writes_go_on_while_a_checkpoint_copies_the_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first part of a checkpoint copies the WAL with the loop still writing; only the
    short second part, which starts the WAL over, has the writes wait."""
    import agentflow.stores.sqlite_schema as schema

    monkeypatch.setattr("agentflow.stores.sqlite_calls.CHECKPOINT_BYTES", 400_000)
    copying, copied = threading.Event(), threading.Event()
    behind = getattr(schema, "checkpoint_behind", None)

    def slow_copy(db: sqlite3.Connection) -> None:  # a copy that takes long: a busy disk
        copying.set()
        copied.wait(10)
        if behind is not None:
            behind(db)

    monkeypatch.setattr(schema, "checkpoint_behind", slow_copy, raising=False)
    store = SqliteStore(str(tmp_path / "agentflow.db"), durability="normal")
    seq = 0

    async def step() -> None:
        nonlocal seq
        seq += 1
        commit = Commit(fields={"visit": seq, "state": {"n": seq}}, events=[event("e")], seq=seq)
        await asyncio.wait_for(store.commit("r1", lease, commit), 5)

    try:
        lease = await started(store)
        await store.get("r1")
        while not copying.is_set():  # until the store asks for a checkpoint
            assert seq < 2000, "no checkpoint was asked for"
            await step()
        start = time.monotonic()
        for _ in range(100):  # while the WAL is being copied
            await step()
        assert time.monotonic() - start < 3
        assert store._checkpoint.pending and not copied.is_set()  # the copy is still running
        copied.set()
        for _ in range(500):
            if not store._checkpoint.pending:
                break
            await asyncio.sleep(0.01)
        assert not store._checkpoint.pending
        await step()  # the first write after the checkpoint starts the WAL over
        reader = sqlite3.connect(store.path, isolation_level=None)
        try:
            _, frames, _ = reader.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            reader.close()
        assert 0 < frames < 20, frames  # the last write only, not the 100 made during the copy
        rec = await store.get("r1")
        assert rec is not None and rec.visit == seq and rec.state == {"n": seq}
    finally:
        copied.set()
        await store.close()


# -- durability ------------------------------------------------------------------------


async def test_durability_sets_synchronous_and_reaches_open_store(tmp_path: Path) -> None:
    path = str(tmp_path / "d.db")
    full = SqliteStore(path)
    normal = open_store("sqlite", path=path, durability="normal")
    try:
        assert isinstance(normal, SqliteStore) and normal.durability == "normal"
        assert full.durability == "full"
        lease = await started(full)
        await full.get("r1")
        await full.renew("r1", lease, 15.0)  # a renewal, never flushed, leaves the setting as it was
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # the next renewal goes to the thread, which flushes
        renewal = asyncio.ensure_future(full.renew("r1", lease, 15.0))
        await asyncio.sleep(0.05)
        other.execute("COMMIT")
        other.close()
        assert await renewal is None

        def synchronous(db: sqlite3.Connection) -> Any:
            return db.execute("PRAGMA synchronous").fetchone()[0]

        for store, want in ((full, 2), (normal, 1)):
            assert await store._call("pragma", None, synchronous, inline=False) == want  # the thread's
            await store.get("r1")
            assert await store._call("pragma", None, synchronous) == 1  # the loop's never flushes
    finally:
        await full.close()
        await normal.close()
    with pytest.raises(WorkflowDefinitionError, match="durability must be 'normal' or 'full'"):
        SqliteStore(path, durability="off")  # type: ignore[arg-type]


# -- costs that do not grow with what is stored -----------------------------------------


def _fill(path: str, n: int) -> None:
    """``n`` completed runs of workflow ``wf``, inserted straight into the table."""
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO agentflow_runs (ns, run_id, workflow, status, step, visit, pending, decisions, "
            "error, usage, created_at, updated_at, event_count, lease_token, lease_expires) "
            "VALUES ('', ?, 'wf', 'completed', NULL, 3, 'null', '[]', 'null', 'null', ?, ?, 4, 1, 0.0)",
            ((f"done-{i}", 1000.0 + i, 1000.0 + i) for i in range(n)),
        )
    db.close()


async def _best_ms(call: Any, times: int = 5) -> float:
    spent = []
    for _ in range(times):
        start = time.perf_counter()
        await call()
        spent.append((time.perf_counter() - start) * 1000)
    return min(spent)


async def test_listing_and_recovery_cost_what_they_return_with_100k_runs(store: SqliteStore) -> None:
    await store.create(record("waiting-1", status=RunStatus.WAITING, created_at=5.0), [])
    await store.create(record("stale", created_at=6.0), [])
    await acquire(store, "stale", ttl=-1.0)
    _fill(store.path, 100_000)
    waiting = await store.list_runs(status=RunStatus.WAITING)
    assert [r.run_id for r in waiting] == ["waiting-1"]
    assert await store.recoverable("wf") == ["stale"]
    timings = {
        "list_runs(status=waiting)": await _best_ms(lambda: store.list_runs(status=RunStatus.WAITING)),
        "list_runs(wf, waiting)": await _best_ms(lambda: store.list_runs("wf", RunStatus.WAITING)),
        "recoverable": await _best_ms(lambda: store.recoverable("wf")),
        "due_gates": await _best_ms(lambda: store.due_gates("wf", time.time())),
        "list_runs() first page": await _best_ms(lambda: store.list_runs()),
        "list_runs(after=) page": await _best_ms(lambda: store.list_runs(limit=100, after="done-50000")),
    }
    print(" ".join(f"{name}={ms:.2f}ms" for name, ms in timings.items()))
    assert all(ms < 20 for ms in timings.values()), timings


def wal_bytes(path: str) -> int:
    return os.path.getsize(path + "-wal")


async def test_a_step_that_leaves_a_1mb_state_alone_writes_under_50kb(store: SqliteStore) -> None:
    lease = await started(store, state={"blob": "x" * 1_000_000})
    await store.commit("r1", lease, Commit(fields={"visit": 1}, seq=1))  # warm the pages up
    reader = sqlite3.connect(store.path, isolation_level=None)
    try:
        # A reader's snapshot keeps the WAL from being reset, so it only grows.
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM agentflow_runs").fetchone()
        before, steps = wal_bytes(store.path), 20
        for i in range(2, steps + 2):
            step = Commit(
                fields={"step": f"s{i}", "visit": i, "usage": {"input_tokens": i, "output_tokens": i}},
                outputs=[OutputRecord(i, f"s{i - 1}", {"summary": "ok" * 50})],
                events=[event("step_completed", step=f"s{i - 1}"), event("step_started", step=f"s{i}")],
                journal={f"agent:{i}": {"reply": "done" * 100}},
                seq=i,
            )
            await store.commit("r1", lease, step)
        per_step = (wal_bytes(store.path) - before) / steps
    finally:
        reader.close()
    print(f"bytes written per step with a 1 MB state: {per_step:,.0f}")
    assert per_step < 50_000
    rec = await store.get("r1")
    assert rec is not None and len(rec.state["blob"]) == 1_000_000 and rec.visit == steps + 1


async def test_an_unchanged_big_value_is_not_rewritten(store: SqliteStore) -> None:
    lease = await started(store, state={"blob": "y" * 500_000})
    reader = sqlite3.connect(store.path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT 1 FROM agentflow_runs").fetchone()
        before = wal_bytes(store.path)
        await store.commit("r1", lease, Commit(fields={"state": {"blob": "y" * 500_000}}, seq=1))
        assert wal_bytes(store.path) - before < 50_000
    finally:
        reader.close()


async def test_a_value_moves_out_of_the_hot_row_when_it_grows_and_back_when_it_shrinks(
    store: SqliteStore,
) -> None:
    lease = await started(store)

    def stored() -> tuple[Any, list[Any]]:
        with sqlite3.connect(store.path) as db:
            column = db.execute("SELECT state FROM agentflow_runs WHERE run_id = 'r1'").fetchone()[0]
            spilled = db.execute("SELECT field FROM agentflow_values WHERE run_id = 'r1'").fetchall()
        db.close()
        return column, spilled

    assert stored() == ('{"count":0}', [])
    big = {"blob": "b" * 5000}
    await store.commit("r1", lease, Commit(fields={"state": big}, seq=1))
    assert stored() == (None, [("state",)])
    rec = await store.get("r1")
    assert rec is not None and rec.state == big
    await store.commit("r1", lease, Commit(fields={"state": {"count": 1}}, seq=2))
    assert stored() == ('{"count":1}', [])
    rec = await store.get("r1")
    assert rec is not None and rec.state == {"count": 1}
    await store.update("r1", lambda rec, now: Change(dataclasses.replace(rec, state=big)))
    assert stored() == (None, [("state",)])
    await store.update("r1", lambda rec, now: Change(dataclasses.replace(rec, state=[2])))
    assert stored() == ("[2]", [])
    loaded = await store.load("r1")
    assert loaded is not None and loaded.record.state == [2]


# -- expiry ----------------------------------------------------------------------------


async def test_expired_runs_leave_every_listing_and_are_purged_on_create(tmp_path: Path) -> None:
    path = str(tmp_path / "ttl.db")
    store = SqliteStore(path, ttl=0.2)
    try:
        lease = await started(store, "old")
        final = {"status": RunStatus.COMPLETED, "output": {"x": 1}}
        await store.commit(
            "old", lease, Commit(fields=final, events=[event("completed")], seq=1, release=True)
        )
        await store.create(record("gate", status=RunStatus.WAITING, pending={"deadline": 1.0}), [])
        await store.update(
            "gate", lambda rec, now: Change(dataclasses.replace(rec, status=RunStatus.EXPIRED))
        )
        assert [r.run_id for r in await store.list_runs()] == ["gate", "old"]
        await asyncio.sleep(0.3)
        assert await store.get("old") is None and await store.load("old") is None
        assert await store.events("old") == [] and await store.list_runs() == []
        assert await store.list_runs(status=RunStatus.COMPLETED) == []
        assert await store.due_gates("wf", time.time()) == []
        with sqlite3.connect(path) as db:  # reads never write: the rows are still there
            assert db.execute("SELECT count(*) FROM agentflow_runs").fetchone()[0] == 2
        db.close()
        store._next_purge = 0.0  # the next create purges at once
        await store.create(record("new"), [])
        assert await store.create(record("old", created_at=2000.0), [])  # the id is free again
        with sqlite3.connect(path) as db:
            for table in ("runs", "values", "events", "journal", "outputs"):
                rows = db.execute(
                    f"SELECT DISTINCT run_id FROM agentflow_{table} WHERE run_id != 'new'"
                ).fetchall()
                assert rows == ([("old",)] if table == "runs" else []), table  # its values are in its row
        db.close()
    finally:
        await store.close()


async def test_a_burst_of_creates_purges_once(tmp_path: Path) -> None:
    # A client starting 200 runs at once on a store that has not purged yet: one create
    # purges; the others are not sent to the thread to purge too.
    store = SqliteStore(str(tmp_path / "burst.db"))
    try:
        purges: list[float] = []
        purge = store._purge

        def counted(db: Any, now: float) -> None:
            purges.append(now)
            purge(db, now)

        store._purge = counted  # type: ignore[method-assign]
        created = await asyncio.gather(*(store.create(record(f"b{i}"), [event("e")]) for i in range(200)))
        assert all(created) and len(await store.list_runs(limit=500)) == 200
        assert len(purges) == 1 and store._next_purge > time.time() + 30
    finally:
        await store.close()


async def test_calls_waiting_for_the_thread_commit_together_and_one_that_fails_fails_alone(
    tmp_path: Path,
) -> None:
    # At "full" every write goes to the store's thread. Those that queue while it is busy
    # share one transaction (one commit, one flush); a commit refused in it (a stale lease)
    # writes nothing and raises, and the others are stored.
    store = SqliteStore(str(tmp_path / "batch.db"), durability="full")
    try:
        lease = await started(store)
        before = await store.get("r1")
        statements: list[str] = []
        await store._submit(lambda db: db.set_trace_callback(statements.append))
        busy = store._submit(lambda db: time.sleep(0.2))  # the calls below queue behind it
        stale = Lease(lease.owner, lease.token + 1)
        calls = [store.create(record(f"q{i}"), [event("e")]) for i in range(30)]
        refused = store.commit("r1", stale, Commit(fields={"visit": 9}, events=[event("x")], seq=1))
        outcomes = await asyncio.gather(busy, refused, *calls, return_exceptions=True)
        assert isinstance(outcomes[1], LeaseLostError) and outcomes[2:] == [True] * 30
        begun = [s for s in statements if s.startswith("BEGIN")]
        assert 1 <= len(begun) <= 3, begun  # not one per call
        assert len(await store.list_runs(limit=100)) == 31
        assert await store.get("r1") == before  # the refused commit wrote nothing
    finally:
        await store.close()


async def test_while_the_lock_is_contended_the_loops_writes_of_one_turn_commit_together(
    tmp_path: Path,
) -> None:
    # Another process holds the write lock: a write finds it taken (and goes to the
    # thread). The writes made in one turn of the loop after that share one transaction
    # on the loop's connection once the lock is free; a refused commit among them fails
    # alone.
    path = str(tmp_path / "contended.db")
    store = SqliteStore(path, durability="normal")
    try:
        lease = await started(store)
        before = await store.get("r1")
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        blocked = asyncio.ensure_future(store.create(record("first"), []))
        await asyncio.sleep(0.05)
        other.execute("COMMIT")
        other.close()
        assert await blocked
        statements: list[str] = []
        assert store._inline is not None
        store._inline.set_trace_callback(statements.append)
        stale = Lease(lease.owner, lease.token + 1)
        refused = store.commit("r1", stale, Commit(fields={"visit": 9}, events=[event("x")], seq=1))
        outcomes = await asyncio.gather(
            refused, *(store.create(record(f"t{i}"), [event("e")]) for i in range(30)), return_exceptions=True
        )
        store._inline.set_trace_callback(None)
        assert isinstance(outcomes[0], LeaseLostError) and outcomes[1:] == [True] * 30
        assert [s for s in statements if s.startswith("BEGIN")] == ["BEGIN IMMEDIATE"], statements[:5]
        assert len(await store.list_runs(limit=100)) == 32
        assert await store.get("r1") == before  # the refused commit wrote nothing
    finally:
        await store.close()


async def test_writes_gathered_while_the_lock_is_held_wait_for_it_on_the_thread(tmp_path: Path) -> None:
    # The writes of one turn find the lock still taken: they go to the store's thread as
    # one call, which waits for the lock; none fails with "database is locked".
    path = str(tmp_path / "held.db")
    store = SqliteStore(path, durability="normal")
    try:
        await store.get("r0")  # opens the file, and the loop's connection
        for _ in range(100):
            if store._inline is not None:
                break
            await asyncio.sleep(0.01)
        store._next_purge = time.time() + 60  # no purge due: the creates try the loop's connection
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            first = asyncio.ensure_future(store.create(record("first"), []))  # finds it taken
            await asyncio.sleep(0.02)
            assert time.monotonic() < store._contended
            other.execute("COMMIT")  # the first goes in (on the thread), and the lock is taken again
            assert await first
            other.execute("BEGIN IMMEDIATE")
            gathered = [asyncio.ensure_future(store.create(record(f"g{i}"), [event("e")])) for i in range(20)]
            await asyncio.sleep(0.3)  # still held: they wait on the thread, none fails
            assert not any(g.done() for g in gathered)
        finally:
            if other.in_transaction:
                other.execute("COMMIT")
            other.close()
        assert await asyncio.gather(*gathered) == [True] * 20
        assert len(await store.list_runs(limit=100)) == 21
    finally:
        await store.close()


async def test_a_purge_deletes_a_bounded_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agentflow.stores.sqlite.PURGE_BATCH", 3)
    store = SqliteStore(str(tmp_path / "batch.db"), ttl=60)
    try:
        await store.create(record("seed"), [])
        with sqlite3.connect(store.path) as db:
            db.execute("UPDATE agentflow_runs SET expires_at = 1.0, status = 'completed'")
            db.executemany(
                "INSERT INTO agentflow_runs (ns, run_id, workflow, status, visit, pending, decisions, error, "
                "usage, created_at, updated_at, event_count, lease_token, lease_expires, expires_at) "
                "VALUES ('', ?, 'wf', 'completed', 0, 'null', '[]', 'null', 'null', 1, 1, 0, 0, 0, 1.0)",
                [(f"x{i}",) for i in range(6)],
            )  # seven runs that expired long ago
        db.close()
        counts = []
        for i in range(3):
            store._next_purge = 0.0 if i == 0 else store._next_purge
            await store.create(record(f"new{i}"), [])
            with sqlite3.connect(store.path) as db:
                counts.append(
                    db.execute("SELECT count(*) FROM agentflow_runs WHERE expires_at = 1.0").fetchone()[0]
                )
            db.close()
        assert counts == [4, 1, 0]  # three a time, the next batch brought forward while a backlog lasts
    finally:
        await store.close()


# -- the file --------------------------------------------------------------------------


async def test_database_is_in_wal_mode_and_opened_lazily(tmp_path: Path) -> None:
    path = tmp_path / "lazy.db"
    store = SqliteStore(str(path))
    assert not path.exists()  # nothing opened until first use
    await store.get("r1")
    await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == VERSION == 7
    db.close()
    with pytest.raises(StoreError, match="closed"):
        await store.get("r1")


V1_SCHEMA = """
CREATE TABLE agentflow_runs (
    id INTEGER PRIMARY KEY, ns TEXT NOT NULL, run_id TEXT NOT NULL, workflow TEXT NOT NULL,
    status TEXT NOT NULL, input TEXT NOT NULL, state TEXT NOT NULL, step TEXT, visit INTEGER NOT NULL,
    pending TEXT NOT NULL, decisions TEXT NOT NULL, output TEXT NOT NULL, error TEXT NOT NULL,
    usage TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL, event_count INTEGER NOT NULL,
    lease_owner TEXT, lease_token INTEGER NOT NULL, lease_expires REAL NOT NULL, control TEXT,
    deadline REAL, expires_at REAL, UNIQUE (ns, run_id)
);
CREATE INDEX agentflow_runs_by_workflow ON agentflow_runs (ns, workflow, created_at);
CREATE INDEX agentflow_runs_gates ON agentflow_runs (ns, workflow, status, deadline);
CREATE TABLE agentflow_events (
    ns TEXT NOT NULL, run_id TEXT NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (ns, run_id, seq)
) WITHOUT ROWID;
INSERT INTO agentflow_runs VALUES (1, '', 'old', 'wf', 'waiting', '{"repo":"a"}', '{"count":2}', 'review', 2,
    '{"deadline":5.0}', '[]', 'null', 'null', 'null', 1000.0, 1001.0, 1, NULL, 3, 0.0, NULL, 5.0, NULL);
INSERT INTO agentflow_events VALUES ('', 'old', 1, '{"kind":"run_started","step":null,"data":null,"at":1.0}');
"""


async def test_a_file_of_the_first_layout_is_upgraded_in_place(tmp_path: Path) -> None:
    path = str(tmp_path / "v1.db")
    with sqlite3.connect(path) as db:
        db.executescript(V1_SCHEMA)
    db.close()
    store = SqliteStore(path)
    try:
        rec = await store.get("old")
        assert rec is not None and (rec.input, rec.state, rec.output) == ({"repo": "a"}, {"count": 2}, None)
        assert (rec.status, rec.step, rec.lease_token, rec.commit_seq) == ("waiting", "review", 3, 0)
        assert await store.due_gates("wf", 10.0) == ["old"]
        assert [e.kind for e in await store.events("old")] == ["run_started"]
    finally:
        await store.close()


async def test_a_file_of_the_second_layout_is_upgraded_in_place(tmp_path: Path) -> None:
    path = str(tmp_path / "v2.db")
    store = SqliteStore(path)
    lease = await started(store)
    await store.close()
    with sqlite3.connect(path) as db:  # back to version 2: every big value in agentflow_values
        _back_to_version_3(db)
        for name in ("input", "state", "output"):
            db.execute(f"ALTER TABLE agentflow_runs DROP COLUMN {name}")
        db.executemany(
            "INSERT INTO agentflow_values (ns, run_id, field, value) VALUES ('', 'r1', ?, ?)",
            [("input", '{"repo":"v2"}'), ("state", '{"count":7}')],
        )
        db.execute("PRAGMA user_version = 2")
    db.close()
    store = SqliteStore(path)
    try:
        rec = await store.get("r1")
        assert rec is not None and (rec.input, rec.state) == ({"repo": "v2"}, {"count": 7})
        await store.commit("r1", lease, Commit(fields={"state": {"count": 8}}, seq=1))
        loaded = await store.load("r1")
        assert loaded is not None and loaded.record.state == {"count": 8}
        assert loaded.record.input == {"repo": "v2"}
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == VERSION == 7
        assert db.execute("SELECT field FROM agentflow_values").fetchall() == [("input",)]
    db.close()


def _back_to_version_3(db: sqlite3.Connection) -> None:
    """Make a file of this layout one of version 3: no parent, children, version nor approval index."""
    for name in ("parent", "children", "version"):
        db.execute(f"ALTER TABLE agentflow_runs DROP COLUMN {name}")
    for table in ("agentflow_approvals", "agentflow_approvers"):
        db.execute(f"DROP TABLE {table}")
    db.execute("PRAGMA user_version = 3")


async def test_a_file_of_the_third_layout_is_upgraded_in_place(tmp_path: Path) -> None:
    path = str(tmp_path / "v3.db")
    store = SqliteStore(path)
    lease = await started(store, state={"count": 3})
    old_gate = {"kind": "human_approval", "approvers": ["ops"], "quorum": 1, "step": "Review", "visit": 2}
    await store.create(record("gate", status=RunStatus.WAITING, pending={**old_gate, "since": 5.0}), [])
    await store.close()
    with sqlite3.connect(path) as db:
        _back_to_version_3(db)
    db.close()
    store = SqliteStore(path)
    try:
        rec = await store.get("r1")
        assert rec is not None and (rec.parent, rec.children, rec.state) == (None, (), {"count": 3})
        await store.commit("r1", lease, Commit(fields={"children": ("r1/Fan.1",)}, seq=1))
        parent = {"run_id": "r1", "step": "Fan", "visit": 1, "index": None}
        assert await store.create(record("r1/Fan.1", parent=parent), [])
        rec, child = await store.get("r1"), await store.get("r1/Fan.1")
        assert rec is not None and rec.children == ("r1/Fan.1",) and rec.lease_token == lease.token
        assert child is not None and child.parent == parent
        # The gate the file had waiting is in the new index of approvals.
        [listed] = await store.approvals(approver="ops")
        assert (listed["id"], listed["run_id"]) == (approval_id("gate", "Review", 2), "gate")
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == VERSION == 7
    db.close()


async def test_a_file_of_the_fifth_layout_gets_its_credentials_table_in_place(tmp_path: Path) -> None:
    path = str(tmp_path / "v5.db")
    store = SqliteStore(path)
    lease = await started(store)
    await store.close()
    with sqlite3.connect(path) as db:  # back to version 5: no credentials, no run versions
        db.execute("DROP TABLE agentflow_credentials")
        db.execute("ALTER TABLE agentflow_runs DROP COLUMN version")
        db.execute("PRAGMA user_version = 5")
    db.close()
    store = SqliteStore(path)
    try:
        assert await store.put_credential("k", {"v": 1}, only_new=True)
        assert await store.get_credential("k") == {"v": 1}
        await store.commit("r1", lease, Commit(fields={"step": "B"}, seq=1))  # the run is as it was
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == VERSION
    db.close()


async def test_a_file_of_the_sixth_layout_gets_run_versions_in_place(tmp_path: Path) -> None:
    path = str(tmp_path / "v6.db")
    store = SqliteStore(path)
    lease = await started(store)
    await store.close()
    with sqlite3.connect(path) as db:  # back to version 6: no version per run
        db.execute("ALTER TABLE agentflow_runs DROP COLUMN version")
        db.execute("PRAGMA user_version = 6")
    db.close()
    store = SqliteStore(path)
    try:
        rec = await store.get("r1")
        assert rec is not None and rec.version == "1"  # written before versions: version 1
        await store.commit("r1", lease, Commit(fields={"version": "2", "step": "B"}, seq=1))
        rec = await store.get("r1")
        assert rec is not None and (rec.version, rec.step) == ("2", "B")
        [listed] = await store.list_runs("wf")
        assert listed.version == "2"
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == VERSION == 7
    db.close()


@pytest.mark.parametrize(
    "filters",
    [{}, {"approver": "ops"}, {"workflow": "wf"}, {"kind": "gate"}, {"approver": "ops", "kind": "gate"}],
)
async def test_a_page_of_approvals_is_read_from_an_index(tmp_path: Path, filters: dict[str, str]) -> None:
    store = SqliteStore(str(tmp_path / "plan.db"))
    try:
        await store.get("r1")  # opens the file
        for after in (False, True):
            sql = page_of_approvals("approver" in filters, "workflow" in filters, "kind" in filters, after)
            params = ["", *filters.values(), *((1.0, "x") if after else ()), 50]
            with sqlite3.connect(store.path) as db:
                plan = " ".join(row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params))
            db.close()
            assert "USING" in plan and "TEMP B-TREE" not in plan, plan  # no sort, no scan of a table
            assert not any(f"SCAN {t}" in plan for t in ("a", "p", "agentflow_approvals")), plan
    finally:
        await store.close()


WORKER = textwrap.dedent(
    """
    import asyncio, dataclasses, sys
    from agentflow.types import RunEvent
    from agentflow.stores.contract import Change
    from agentflow.stores.sqlite import SqliteStore

    def bump(rec, now):
        event = RunEvent(kind="bump", run_id=rec.run_id, at=now, seq=rec.event_count + 1)
        return Change(dataclasses.replace(rec, visit=rec.visit + 1), [event])

    async def main(path, n):
        store = SqliteStore(path, durability="normal")
        for _ in range(n):
            await store.update("r1", bump)
        await store.close()

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


async def test_processes_updating_one_file_lose_no_writes(store: SqliteStore) -> None:
    await store.create(record(), [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", WORKER, store.path, "150", cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(3)
    ]
    for worker in workers:
        _, err = await asyncio.wait_for(worker.communicate(), 50)
        assert worker.returncode == 0, err.decode()
    rec = await store.get("r1")
    assert rec is not None and rec.visit == 450 and rec.event_count == 450
    assert [e.seq for e in await store.events("r1")] == list(range(1, 451))


def test_stores_opening_one_new_file_at_once_all_open(tmp_path: Path) -> None:
    """Switching a new file to WAL does not wait on busy_timeout: it is retried instead."""
    from agentflow.stores import sqlite_schema

    errors: list[BaseException] = []
    for i in range(150):
        path = str(tmp_path / f"new-{i}.db")
        barrier = threading.Barrier(5)

        def open_it(path: str = path, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                sqlite_schema.connect(path, "normal").close()
            except BaseException as exc:  # collected for the assertion
                errors.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
