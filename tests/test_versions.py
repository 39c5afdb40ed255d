"""Versions and migrations (SPEC 17): a run parked on one version of its workflow, picked up by the next.

Each test parks a run on version 1 through one store, then opens another store on the same
data (another process) serving a version 2 of the workflow: a renamed state field
(``title`` → ``headline``) and a new step (``Notify``), with or without a migration.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import StoreFactory
from pydantic import BaseModel

from agentflow import (
    END,
    START,
    HumanApproval,
    IncompatibleRunError,
    RunStatus,
    Wait,
    Workflow,
    WorkflowDefinitionError,
    WorkflowRunner,
    check_runs,
)
from agentflow.stores.contract import RunRecord

DURABLE = ("sqlite", "redis", "postgres")


class V1State(BaseModel):
    title: str = ""


class V2State(BaseModel):
    headline: str  # required: a version-1 state ({"title": ...}) does not validate
    notified: bool = False


def v1() -> Workflow:
    return (
        Workflow("Article", "write, review, publish")
        .state(V1State)
        .flow(
            {
                START: lambda ctx: (ctx.set_state(title="Durable runs"), "Review")[1],
                "Review": lambda ctx: Wait(HumanApproval(approvers=["editor"]), "Publish"),
                "Publish": lambda ctx: END,
            }
        )
    )


def v2(migration: Callable[[dict[str, Any]], dict[str, Any]] | None = None, publish: bool = True) -> Workflow:
    """Version 2: ``headline`` for ``title``, a new ``Notify`` step (``publish=False``: no ``Publish``)."""

    def notify(ctx: Any) -> Any:
        ctx.set_state(notified=True)
        return END

    steps: dict[str, Any] = {
        START: lambda ctx: (ctx.set_state(headline="new"), "Review")[1],
        "Review": lambda ctx: Wait(HumanApproval(approvers=["editor"]), "Publish" if publish else "Notify"),
        "Notify": notify,
    }
    if publish:
        steps["Publish"] = lambda ctx: "Notify"
    wf = (
        Workflow("Article", "write, review, publish", version="2")
        .state(V2State, {"headline": ""})
        .flow(steps)
    )
    return wf.migrate("1", migration) if migration is not None else wf


class Counted:
    """A migration that counts its calls."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, state: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        if self.fail:
            raise KeyError("subtitle")
        return {"headline": state.pop("title")}


async def parked_on_v1(make_store: StoreFactory, kind: str) -> str:
    """A run of version 1 waiting at its Review gate; the runner (process) that parked it is closed."""
    async with WorkflowRunner(v1(), store=make_store(kind)) as runner:
        handle = await runner.run()
        info = await handle.wait_for(RunStatus.WAITING, timeout=10)
        assert info.version == "1"
        return handle.run_id


@pytest.mark.parametrize("kind", DURABLE)
async def test_approving_a_v1_run_with_v2_migrates_it_once_and_it_goes_on(
    make_store: StoreFactory, kind: str
) -> None:
    run_id = await parked_on_v1(make_store, kind)
    migration = Counted()
    async with WorkflowRunner(v2(migration), store=make_store(kind)) as runner:
        handle = await runner.approve(run_id, by="editor")
        result = await handle.result(timeout=10)
        assert result.status == RunStatus.COMPLETED
        assert result.state == V2State(headline="Durable runs", notified=True)  # the new step ran
        assert migration.calls == 1
        info = await handle.info()
        assert info.version == "2" and info.error is None
        events = [e async for e in handle.events()]
        kinds = [e.kind for e in events]
        assert kinds.count("migrated") == 1 and kinds.index("migrated") == kinds.index("decided") - 1
        migrated = next(e for e in events if e.kind == "migrated")
        assert migrated.data == {
            "from": "1",
            "to": "2",
            "path": ["1", "2"],
            "steps": {},
            "state": {"headline": "Durable runs"},
        }
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
    # Another process serving version 2 finds it migrated: its recovery migrates nothing again.
    async with WorkflowRunner(v2(migration), store=make_store(kind)) as again:
        assert await again.recover() == []
        [listed] = await again.list_runs()
        assert (listed.version, listed.status) == ("2", RunStatus.COMPLETED)
    assert migration.calls == 1


@pytest.mark.parametrize("kind", DURABLE)
async def test_a_v2_without_a_migration_refuses_the_decision_and_the_run_stays_waiting(
    make_store: StoreFactory, kind: str
) -> None:
    run_id = await parked_on_v1(make_store, kind)
    store = make_store(kind)
    before = await store.events(run_id)
    async with WorkflowRunner(v2(), store=store) as runner:
        with pytest.raises(IncompatibleRunError) as caught:
            await runner.approve(run_id, by="editor")
        exc = caught.value
        assert (exc.run_id, exc.version, exc.current, exc.step, exc.field) == (
            run_id,
            "1",
            "2",
            "Review",
            "version",
        )
        assert ".migrate('1', fn)" in str(exc)
        info = await runner.supervisor.store.get(run_id)
        assert info is not None
        assert (info.status, info.decisions, info.version) == (RunStatus.WAITING, (), "1")
        assert info.state == {"title": "Durable runs"}
        assert await store.events(run_id) == before  # no decision, no event
        # Why it cannot go on is on the record, for whoever looks at it.
        shown = (await (await runner.attach(run_id)).info()).error
        assert shown is not None and shown["type"] == "IncompatibleRunError" and shown["field"] == "version"
        [found] = await check_runs(runner)
        assert (found.run_id, found.version, found.step, found.field) == (run_id, "1", "Review", "version")
    # The deploy that adds the migration takes it on; the reason goes with it.
    migration = Counted()
    async with WorkflowRunner(v2(migration), store=make_store(kind)) as fixed:
        result = await (await fixed.approve(run_id, by="editor")).result(timeout=10)
        assert result.state == V2State(headline="Durable runs", notified=True) and migration.calls == 1
        assert (await (await fixed.attach(run_id)).info()).error is None


async def test_a_changed_state_model_without_a_new_version_names_the_field(make_store: StoreFactory) -> None:
    run_id = await parked_on_v1(make_store, "sqlite")
    same_version = (
        Workflow("Article")
        .state(V2State, {"headline": ""})
        .flow(
            {
                START: lambda ctx: "Review",
                "Review": lambda ctx: Wait(HumanApproval(approvers=["editor"]), "Publish"),
                "Publish": lambda ctx: END,
            }
        )
    )
    async with WorkflowRunner(same_version, store=make_store("sqlite")) as runner:
        with pytest.raises(IncompatibleRunError) as caught:
            await runner.approve(run_id, by="editor")
        assert (caught.value.version, caught.value.step, caught.value.field) == ("1", "Review", "headline")
        assert (await runner.store.get(run_id)).status == RunStatus.WAITING  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", DURABLE)
async def test_a_removed_step_is_named_and_the_run_stays_waiting(make_store: StoreFactory, kind: str) -> None:
    run_id = await parked_on_v1(make_store, kind)
    migration = Counted()
    async with WorkflowRunner(v2(migration, publish=False), store=make_store(kind)) as runner:
        with pytest.raises(IncompatibleRunError) as caught:
            await runner.approve(run_id, by="editor")
        exc = caught.value
        assert (exc.version, exc.step, exc.field) == ("1", "Publish", "step")
        assert "'Publish' is not a step" in str(exc) and "['Notify', 'Review']" in str(exc)
        rec = await runner.store.get(run_id)
        assert rec is not None and (rec.status, rec.version, rec.decisions) == (RunStatus.WAITING, "1", ())


async def test_a_step_rename_moves_where_the_gate_goes_on(make_store: StoreFactory) -> None:
    run_id = await parked_on_v1(make_store, "sqlite")
    wf = (
        Workflow("Article", version="2")
        .state(V2State, {"headline": ""})
        .flow(
            {
                START: lambda ctx: "Review",
                "Review": lambda ctx: Wait(HumanApproval(approvers=["editor"]), "Release"),
                "Release": lambda ctx: (ctx.set_state(notified=True), END)[1],
            }
        )
        .migrate("1", Counted(), steps={"Publish": "Release"})
    )
    async with WorkflowRunner(wf, store=make_store("sqlite")) as runner:
        handle = await runner.approve(run_id, by="editor")
        assert (await handle.result(timeout=10)).state.notified
        kinds = [(e.kind, e.step) async for e in handle.events()]
        assert ("step_started", "Release") in kinds and ("step_started", "Publish") not in kinds


@pytest.mark.parametrize("kind", DURABLE)
async def test_a_migration_that_raises_leaves_the_run_parked_with_the_error(
    make_store: StoreFactory, kind: str
) -> None:
    run_id = await parked_on_v1(make_store, kind)
    broken = Counted(fail=True)
    async with WorkflowRunner(v2(broken), store=make_store(kind)) as runner:
        with pytest.raises(IncompatibleRunError, match="raised KeyError: 'subtitle'") as caught:
            await runner.approve(run_id, by="editor")
        assert (caught.value.version, caught.value.step) == ("1", "Review")
        info = await (await runner.attach(run_id)).info()
        assert (info.status, info.version, info.decisions) == (RunStatus.WAITING, "1", ())
        assert info.error is not None and "raised KeyError" in info.error["message"]
        [found] = await check_runs(runner)
        assert (found.run_id, found.status, found.version) == (run_id, RunStatus.WAITING, "1")
        assert "raised KeyError: 'subtitle'" in found.message
        assert found.to_json() == {
            "run_id": run_id,
            "workflow": "Article",
            "status": "waiting",
            "version": "1",
            "step": "Review",
            "field": None,
            "message": found.message,
        }


async def test_migrations_chain_from_each_older_version(make_store: StoreFactory) -> None:
    run_id = await parked_on_v1(make_store, "sqlite")
    path: list[str] = []

    def one_to_two(state: dict[str, Any]) -> dict[str, Any]:
        path.append("1->2")
        return {"name": state["title"]}

    def two_to_three(state: dict[str, Any]) -> dict[str, Any]:
        path.append("2->3")
        return {"headline": state["name"].upper()}

    wf = (
        Workflow("Article", version="3")
        .state(V2State, {"headline": ""})
        .flow(
            {
                START: lambda ctx: "Review",
                "Review": lambda ctx: Wait(HumanApproval(approvers=["editor"]), "Publish"),
                "Publish": lambda ctx: END,
            }
        )
        .migrate("1", one_to_two)
        .migrate("2", two_to_three)
    )
    async with WorkflowRunner(wf, store=make_store("sqlite")) as runner:
        handle = await runner.approve(run_id, by="editor")
        assert (await handle.result(timeout=10)).state.headline == "DURABLE RUNS"
        assert path == ["1->2", "2->3"]
        migrated = [e async for e in handle.events() if e.kind == "migrated"]
        assert [e.data["path"] for e in migrated] == [["1", "2", "3"]]


def test_migrations_that_do_not_reach_the_version_are_a_definition_error() -> None:
    def same(state: dict[str, Any]) -> dict[str, Any]:
        return state

    base = Workflow("W", version="3").flow({START: lambda ctx: END})
    with pytest.raises(WorkflowDefinitionError, match="loop"):
        base.migrate("1", same, to="2").migrate("2", same, to="1").compile()
    with pytest.raises(WorkflowDefinitionError, match="two migrations from version '1'"):
        Workflow("W", version="3").flow({START: lambda ctx: END}).migrate("1", same).migrate(
            "1", same
        ).compile()
    with pytest.raises(WorkflowDefinitionError, match="nowhere to go"):
        Workflow("W", version="3").flow({START: lambda ctx: END}).migrate("3", same).compile()
    with pytest.raises(WorkflowDefinitionError, match="non-empty string"):
        Workflow("W", version="")
    assert Workflow("W").flow({START: lambda ctx: END}).compile().version == "1"


async def test_a_run_recovered_by_a_definition_that_cannot_load_it_fails_once(
    make_store: StoreFactory,
) -> None:
    """A running run whose owner died, picked up by a v2 without a migration: it fails, and stays failed."""
    entered = asyncio.Event()

    async def work(ctx: Any) -> Any:
        entered.set()
        await asyncio.sleep(3600)
        return END

    old = Workflow("Article").state(V1State).flow({START: work})
    runner = WorkflowRunner(old, store=make_store("sqlite"), lease_ttl=0.2)
    handle = await runner.run()
    await asyncio.wait_for(entered.wait(), 10)
    await runner.close()  # the run stays running, its lease let go: recoverable
    new = Workflow("Article", version="2").state(V2State, {"headline": ""}).flow({START: work})
    async with WorkflowRunner(new, store=make_store("sqlite")) as later:
        await later.recover()
        info = await (await later.attach(handle.run_id)).wait_for(RunStatus.FAILED, timeout=10)
        assert info.error is not None and info.error["type"] == "IncompatibleRunError"
        assert info.version == "1"
        assert await later.recover() == []  # failed: not picked up again
        assert await check_runs(later) == []  # failed is final: nothing to check
    # Once a deploy can load it, a retry continues it from its step, migrated.
    migration = Counted()
    fixed = (
        Workflow("Article", version="2")
        .state(V2State, {"headline": ""})
        .flow({START: lambda ctx: (ctx.set_state(notified=True), END)[1]})
        .migrate("1", migration)
    )
    async with WorkflowRunner(fixed, store=make_store("sqlite")) as deployed:
        result = await (await deployed.retry(handle.run_id)).result(timeout=10)
        assert result.state == V2State(headline="", notified=True) and migration.calls == 1
        info = await (await deployed.attach(handle.run_id)).info()
        assert (info.version, info.error) == ("2", None)


async def test_resuming_a_paused_run_that_cannot_load_leaves_it_paused(make_store: StoreFactory) -> None:
    async with WorkflowRunner(v1(), store=make_store("sqlite")) as runner:
        handle = await runner.run()
        await handle.wait_for(RunStatus.WAITING, timeout=10)
        await handle.pause()  # asked while parked: it parks paused where it would go on
        await runner.approve(handle.run_id, by="editor")
        assert (await handle.wait_for(RunStatus.PAUSED, timeout=10)).step == "Publish"
    store = make_store("sqlite")
    before = await store.events(handle.run_id)
    async with WorkflowRunner(v2(Counted(), publish=False), store=store) as runner:
        with pytest.raises(IncompatibleRunError) as caught:
            await (await runner.attach(handle.run_id)).resume()
        assert (caught.value.step, caught.value.field) == ("Publish", "step")
        info = await (await runner.attach(handle.run_id)).info()
        assert info.status == RunStatus.PAUSED and info.error is not None
        assert await store.events(handle.run_id) == before


@pytest.mark.timeout(300)
async def test_check_runs_on_ten_thousand_parked_runs(make_store: StoreFactory) -> None:
    store = make_store("sqlite", durability="normal")  # making them need not wait on the disk
    # One real parked run gives the stored form of a waiting run; 10,000 are made like it.
    run_id = await parked_on_v1(make_store, "sqlite")
    model = await store.get(run_id)
    assert model is not None
    n = 10_000
    now = time.time()

    def parked(i: int) -> RunRecord:
        pending = {**model.pending, "approvals": []}  # no approval index rows needed for the check
        title = "bad" if i % 1000 == 7 else f"article {i}"
        return RunRecord(
            run_id=f"p{i:05d}",
            workflow="Article",
            status=RunStatus.WAITING,
            input=None,
            state={"title": title},
            step="Review",
            visit=model.visit,
            pending=pending,
            created_at=now + i * 1e-3,
            updated_at=now,
            event_count=0,
        )

    made = time.perf_counter()
    for i in range(0, n, 500):
        assert all(await asyncio.gather(*(store.create(parked(j), []) for j in range(i, min(n, i + 500)))))
    made = time.perf_counter() - made

    def migration(state: dict[str, Any]) -> dict[str, Any]:
        if state["title"] == "bad":
            raise ValueError("no headline for 'bad'")
        return {"headline": state["title"]}

    async with WorkflowRunner(v2(migration), store=make_store("sqlite")) as runner:
        took = time.perf_counter()
        found = await check_runs(runner)
        took = time.perf_counter() - took
    print(f"\ncheck_runs: {n + 1:,} parked runs on SQLite checked in {took:.2f} s (made in {made:.1f} s)")
    assert sorted(f.run_id for f in found) == [f"p{i:05d}" for i in range(7, n, 1000)]
    assert all(f.version == "1" and f.step == "Review" and "no headline" in f.message for f in found)
    rec = await store.get("p00007")
    assert rec is not None and (rec.status, rec.version, rec.state) == (
        RunStatus.WAITING,
        "1",
        {"title": "bad"},
    )
    assert took < 30


async def test_a_fork_of_a_v1_run_by_v2_starts_from_the_migrated_state(make_store: StoreFactory) -> None:
    run_id = await parked_on_v1(make_store, "sqlite")
    migration = Counted()
    async with WorkflowRunner(v2(migration), store=make_store("sqlite")) as runner:
        fork = await runner.fork(run_id, at="Review")
        info = await fork.wait_for(RunStatus.WAITING, timeout=10)
        assert info.version == "2" and migration.calls == 1
        assert (await runner.store.get(fork.run_id)).state == {"headline": "Durable runs", "notified": False}  # type: ignore[union-attr]
        # The source, migrated and finished on version 2, forks from its history: the
        # migrated state, then what changed after it.
        done = await (await runner.approve(run_id, by="editor")).result(timeout=10)
        assert done.state.notified and migration.calls == 2
        again = await runner.fork(run_id, at="Notify")
        result = await (await runner.attach(again.run_id)).result(timeout=10)
        assert result.state == V2State(headline="Durable runs", notified=True)
        assert migration.calls == 2  # its history is of version 2 there: nothing to migrate


async def test_a_worker_claiming_a_run_handed_over_on_v1_migrates_it_first(make_store: StoreFactory) -> None:
    from agentflow import Worker

    async with WorkflowRunner(v1(), store=make_store("sqlite"), execute=False) as client:
        handle = await client.run()  # queued for a worker of version 1; none comes
    migration = Counted()
    worker = Worker(v2(migration), store=make_store("sqlite"), concurrency=4)
    task = asyncio.create_task(worker.serve())
    try:
        async with WorkflowRunner(v2(migration), store=make_store("sqlite"), execute=False) as follower:
            info = await (await follower.attach(handle.run_id)).wait_for(RunStatus.WAITING, timeout=10)
            assert (info.version, migration.calls) == ("2", 1)
            rec = await follower.store.get(handle.run_id)
            assert rec is not None and rec.state == {"headline": "new", "notified": False}
            kinds = [e.kind for e in await follower.store.events(handle.run_id)]
            assert kinds[:3] == ["run_started", "step_started", "migrated"]
    finally:
        await worker.close()
        await task


async def test_a_gate_timing_out_on_a_run_that_cannot_load_stays_waiting_and_is_not_retried(
    make_store: StoreFactory,
) -> None:
    old = (
        Workflow("Article")
        .state(V1State)
        .flow(
            {
                START: lambda ctx: "Review",
                "Review": lambda ctx: Wait(
                    HumanApproval(approvers=["editor"], timeout=0.2), "Publish", on_timeout="Publish"
                ),
                "Publish": lambda ctx: END,
            }
        )
    )
    async with WorkflowRunner(old, store=make_store("sqlite")) as runner:
        handle = await runner.run()
        await handle.wait_for(RunStatus.WAITING, timeout=10)
        await runner.supervisor.timers.close()  # this process ends before the deadline passes
    broken = Counted(fail=True)
    store = make_store("sqlite")
    before = await store.events(handle.run_id)
    async with WorkflowRunner(v2(broken), store=store) as runner:
        runner.supervisor.watch_deadlines()
        await asyncio.sleep(1.5)  # several sweeps of the deadline timers
        rec = await store.get(handle.run_id)
        assert rec is not None and (rec.status, rec.version) == (RunStatus.WAITING, "1")
        assert rec.error is not None and rec.error["type"] == "IncompatibleRunError"
        assert await store.events(handle.run_id) == before
        assert broken.calls == 1  # tried once, not once a sweep


async def test_a_postgres_database_of_the_third_layout_reads_its_runs_as_version_1(
    make_store: StoreFactory, postgres_url: str
) -> None:
    import psycopg

    from agentflow.stores.postgres_schema import SCHEMA, VERSION

    run_id = await parked_on_v1(make_store, "postgres")
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as db:
        await db.execute("ALTER TABLE agentflow_runs DROP COLUMN version")
        await db.execute(f"UPDATE {SCHEMA} SET version = 3")
    migration = Counted()
    async with WorkflowRunner(v2(migration), store=make_store("postgres")) as runner:
        [listed] = await runner.list_runs()
        assert listed.version == "1"
        result = await (await runner.approve(run_id, by="editor")).result(timeout=10)
        assert result.state.headline == "Durable runs" and migration.calls == 1
    async with await psycopg.AsyncConnection.connect(postgres_url) as db:
        assert await (await db.execute(f"SELECT version FROM {SCHEMA}")).fetchall() == [(VERSION,)] == [(6,)]


async def test_a_process_killed_after_the_migration_was_committed_is_not_migrated_again(
    make_store: StoreFactory, tmp_path: Path
) -> None:
    run_id = await parked_on_v1(make_store, "sqlite")
    log = tmp_path / "log"
    script = str(Path(__file__).with_name("versionflows.py"))
    db = str(tmp_path / "agentflow.db")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, script, db, str(log), run_id, stderr=asyncio.subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and "publish" in log.read_text()):
            if proc.returncode is not None:
                raise AssertionError((await proc.communicate())[1].decode())
            assert time.monotonic() < deadline, "the process never reached Publish"
            await asyncio.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)  # after the migration's commit, in the step after it
        await proc.communicate()
    assert [line.split()[0] for line in log.read_text().splitlines()] == ["migrated", "publish"]
    store = make_store("sqlite")
    rec = await store.get(run_id)
    assert rec is not None and (rec.status, rec.version, rec.step) == (RunStatus.RUNNING, "2", "Publish")
    migration = Counted()
    await asyncio.sleep(0.6)  # the dead process's lease runs out
    async with WorkflowRunner(v2(migration), store=store) as runner:
        [handle] = await runner.recover()
        result = await handle.result(timeout=10)
    assert result.state == V2State(headline="Durable runs", notified=True)
    assert migration.calls == 0
    assert [e.kind for e in await store.events(run_id)].count("migrated") == 1
