"""Workers and clients in one process: a client (``execute=False``) hands runs over through
the store's queue, a worker claims and advances them; decisions, timers, concurrency,
graceful stops and queue entries for runs that are gone."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from agentflow import (
    END,
    START,
    HumanApproval,
    Next,
    RunStatus,
    Sleep,
    Wait,
    Worker,
    Workflow,
    WorkflowRunner,
)
from agentflow.stores.contract import Store

RAN: list[str] = []


@pytest.fixture(autouse=True)
def _fresh() -> None:
    RAN.clear()


@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def store(request: pytest.FixtureRequest, make_store) -> Store:
    return make_store(request.param)


def _pipeline(name: str = "Pipeline", pause: float = 0.0) -> Workflow:
    async def step(ctx: Any) -> Any:
        RAN.append(ctx.step_name)
        if pause:
            await asyncio.sleep(pause)
        return {"A": "B", "B": "C"}.get(ctx.step_name, Next(END, output=len(RAN)))

    return Workflow(name).flow({START: lambda ctx: "A", "A": step, "B": step, "C": step})


async def _serving(worker: Worker) -> asyncio.Task[None]:
    task = asyncio.create_task(worker.serve())
    await asyncio.sleep(0)
    return task


async def test_a_client_hands_runs_to_a_worker_and_follows_them(store: Store) -> None:
    wf = _pipeline()
    async with WorkflowRunner(wf, store=store, execute=False) as client:
        handles = [await client.run() for _ in range(5)]
        await asyncio.sleep(0.1)
        assert RAN == []  # a client runs nothing
        assert [(await h.info()).status for h in handles] == [RunStatus.RUNNING] * 5
        worker = Worker(wf, store=store, concurrency=10)
        task = await _serving(worker)
        results = [await h.result(timeout=10) for h in handles]
        stats = await worker.statistics()
        await worker.close()
        await task
    assert [r.status for r in results] == [RunStatus.COMPLETED] * 5
    assert sorted(RAN) == sorted(["A", "B", "C"] * 5)
    assert stats.claimed == 5 and stats.runs == 0 and stats.queues["Pipeline"].waiting == 0
    assert not client.supervisor.local


@pytest.mark.parametrize("kind", ["redis", "postgres"])
async def test_a_clients_result_reads_a_run_advanced_elsewhere_twice(kind: str, make_store) -> None:
    # On a store that pushes new statuses: once to see it running, once (the whole run)
    # when told it changed. The read that saw it final is the one the result is built
    # from, not a third.
    store = make_store(kind)
    wf = _pipeline(pause=0.1)
    async with WorkflowRunner(wf, store=store, execute=False) as client:
        handles = [await client.run() for _ in range(5)]
        worker = Worker(wf, store=store, concurrency=10)
        task = await _serving(worker)
        reads: list[str] = []
        get, load = store.get, store.load

        async def counted_get(run_id: str) -> Any:
            reads.append("get")
            return await get(run_id)

        async def counted_load(run_id: str) -> Any:
            reads.append("load")
            return await load(run_id)

        store.get, store.load = counted_get, counted_load  # type: ignore[method-assign]
        try:
            results = await asyncio.gather(*(h.result(timeout=10) for h in handles))
        finally:
            store.get, store.load = get, load  # type: ignore[method-assign]
        await worker.close()
        await task
    assert all(r.status == RunStatus.COMPLETED for r in results)
    assert [r.step_results for r in results] == [{"C": 15}] * 5  # the outputs, from the one read
    assert reads.count("load") == 5 and reads.count("get") <= 5, reads


async def test_a_decision_in_a_client_is_carried_on_by_a_worker(store: Store) -> None:
    wf = Workflow("Gated").flow(
        {
            START: lambda ctx: Wait(HumanApproval(["ana"]), "Ship"),
            "Ship": lambda ctx: (RAN.append("Ship"), Next(END, output="shipped"))[1],
        }
    )
    async with WorkflowRunner(wf, store=store, execute=False) as client:
        worker = Worker(wf, store=store)
        task = await _serving(worker)
        handle = await client.run()
        await handle.wait_for(RunStatus.WAITING, timeout=10)
        await client.approve(handle.run_id, by="ana")
        result = await handle.result(timeout=10)
        await worker.close()
        await task
    assert result.output == "shipped" and RAN == ["Ship"] and not client.supervisor.local


async def test_a_run_of_a_workflow_no_worker_serves_waits_for_one_that_does(store: Store) -> None:
    served, other = _pipeline("Served"), _pipeline("Other")
    async with WorkflowRunner(other, store=store, execute=False) as client:
        handle = await client.run()
        worker = Worker(served, store=store)
        task = await _serving(worker)
        await asyncio.sleep(0.3)
        assert (await handle.info()).status == RunStatus.RUNNING and RAN == []
        second = Worker(other, store=store)
        task2 = await _serving(second)
        result = await handle.result(timeout=10)
        for w in (worker, second):
            await w.close()
        await asyncio.gather(task, task2)
    assert result.status == RunStatus.COMPLETED and RAN == ["A", "B", "C"]


async def test_a_postgres_take_sent_again_after_a_lost_reply_takes_the_run_once(make_store) -> None:
    from agentflow.stores.postgres import PostgresStore

    store = make_store("postgres")
    assert isinstance(store, PostgresStore)
    async with WorkflowRunner(_pipeline(), store=store, execute=False) as client:
        handle = await client.run()  # handed over: running, no owner
        first = await store._take(handle.run_id, "Pipeline", "w1", 30, "nonce-1")
        # The same statement again (what a retry sends when the first reply was lost):
        # the run as the first attempt took it, not a second token.
        again = await store._take(handle.run_id, "Pipeline", "w1", 30, "nonce-1")
        assert first is not None and again is not None
        assert again[0] == first[0] and again[1].record.lease_token == first[0].token
        assert (await store.get(handle.run_id)).lease_token == first[0].token  # type: ignore[union-attr]
        # Another call (another nonce) finds it owned.
        assert await store._take(handle.run_id, "Pipeline", "w1", 30, "nonce-2") is None


async def test_a_worker_claims_no_more_than_its_concurrency(store: Store) -> None:
    gate = asyncio.Event()
    most = 0
    worker: Worker

    async def slow(ctx: Any) -> Next:
        nonlocal most
        most = max(most, worker.runs)
        await gate.wait()
        return Next(END, output=1)

    wf = Workflow("Slow").flow({START: slow})
    async with WorkflowRunner(wf, store=store, execute=False) as client:
        handles = [await client.run() for _ in range(5)]
        worker = Worker(wf, store=store, concurrency=2)
        task = await _serving(worker)
        for _ in range(1000):  # a loaded machine may take a while to claim the first two
            if worker.runs == 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # time enough to claim a third, were it allowed to
        assert worker.runs == 2 and (await worker.statistics()).queues["Slow"].waiting == 3
        gate.set()
        for h in handles:
            assert (await h.result(timeout=10)).status == RunStatus.COMPLETED
        await worker.close()
        await task
    assert most == 2


async def test_a_stopping_worker_finishes_the_step_in_flight_and_hands_the_run_on(store: Store) -> None:
    wf = _pipeline(pause=0.3)
    async with WorkflowRunner(wf, store=store, execute=False, lease_ttl=30) as client:
        handle = await client.run()
        first = Worker(wf, store=store, lease_ttl=30)
        task = await _serving(first)
        for _ in range(500):
            if RAN == ["A"]:
                break
            await asyncio.sleep(0.01)
        await first.close(grace=5)  # A finishes and is committed; the run goes back on the queue
        await task
        info = await handle.info()
        assert info.status == RunStatus.RUNNING and info.step == "B" and RAN == ["A"]
        second = Worker(wf, store=store, lease_ttl=30)
        task = await _serving(second)
        result = await asyncio.wait_for(handle.result(), 5)  # at once: no lease to wait out
        await second.close()
        await task
    assert result.status == RunStatus.COMPLETED and RAN == ["A", "B", "C"]


async def test_a_queue_entry_for_a_run_that_is_gone_is_dropped(store: Store, caplog) -> None:
    wf = _pipeline()
    async with WorkflowRunner(wf, store=store, execute=False) as client:
        await store.enqueue("Pipeline", "no-such-run")  # type: ignore[attr-defined]
        worker = Worker(wf, store=store)
        task = await _serving(worker)
        handle = await client.run()
        assert (await handle.result(timeout=10)).status == RunStatus.COMPLETED
        stats = await worker.statistics()
        await worker.close()
        await task
    assert stats.dropped >= 1 and stats.claimed == 1 and stats.recovered == 0
    assert "queue entry for run no-such-run, which no longer exists: dropped" in caplog.text


async def test_a_durable_timer_of_a_client_run_fires_in_the_worker(store: Store) -> None:
    wf = Workflow("Later").flow(
        {
            START: lambda ctx: Wait(Sleep(0.2), "Done"),
            "Done": lambda ctx: (RAN.append("Done"), Next(END, output="late"))[1],
        }
    )
    async with WorkflowRunner(wf, store=store, execute=False) as client:
        worker = Worker(wf, store=store)
        task = await _serving(worker)
        handle = await client.run()
        result = await handle.result(timeout=10)
        await worker.close()
        await task
    assert result.output == "late" and RAN == ["Done"]


@pytest.mark.parametrize("kind", ["redis", "postgres"])
async def test_the_feed_wakes_a_client_as_soon_as_a_worker_commits(make_store, kind) -> None:
    from agentflow.stores.capabilities import ChangeFeed

    client_store = make_store(kind, key_prefix="feed:")
    worker_store = make_store(kind, key_prefix="feed:")
    assert isinstance(client_store, ChangeFeed)
    seen: list[str] = []
    feed = asyncio.create_task(client_store.changes(seen.append))
    wf = Workflow("Gated").flow(
        {
            START: lambda ctx: Wait(HumanApproval(["ana"]), "Ship"),
            "Ship": lambda ctx: Next(END, output=time.time()),
        }
    )
    lags = []
    async with WorkflowRunner(wf, store=client_store, execute=False) as client:
        worker = Worker(wf, store=worker_store)
        task = await _serving(worker)
        for _ in range(5):
            handle = await client.run()
            await handle.wait_for(RunStatus.WAITING, timeout=10)
            await client.approve(handle.run_id, by="ana")
            result = await handle.result(timeout=10)
            lags.append(time.time() - float(result.output))
        await worker.close()
        await task
    feed.cancel()
    await asyncio.gather(feed, return_exceptions=True)
    assert handle.run_id in seen  # the worker's writes reached the other store object
    # pushed: every result woke long before the one-second backstop poll would have
    assert max(lags) < 0.4, lags


@pytest.mark.parametrize("kind", ["redis", "redis_cluster", "postgres", "sqlite"])
async def test_a_run_handed_over_is_taken_in_one_operation_and_only_then(make_store, kind) -> None:
    from agentflow.stores.capabilities import TakesRuns
    from agentflow.stores.contract import Commit

    store = make_store(kind)
    assert isinstance(store, TakesRuns)
    wf = _pipeline()
    async with WorkflowRunner(wf, store=store, execute=False) as client:
        handle = await client.run()  # handed over: running, no owner
        before = await store.get(handle.run_id)
        assert before is not None and before.lease_owner is None
        assert await store.take(handle.run_id, "Other", "w1", 30) is None  # not its workflow
        assert await store.take("no-such-run", "Pipeline", "w1", 30) is None
        got = await store.take(handle.run_id, "Pipeline", "w1", 30)
        assert got is not None
        lease, loaded = got
        assert lease.owner == "w1" and lease.token == before.lease_token + 1
        assert loaded.record.lease_owner == "w1" and loaded.record.step == before.step
        assert loaded.record.lease_expires > time.time() + 20
        # Owned now: a second worker gets nothing, and the owner's lease holds for commits.
        assert await store.take(handle.run_id, "Pipeline", "w2", 30) is None
        assert (await store.get(handle.run_id)).lease_owner == "w1"  # type: ignore[union-attr]
        await store.commit(handle.run_id, lease, Commit(release=True, seq=loaded.record.commit_seq + 1))
        # Let go of: a worker takes it again, and advances it to the end.
        worker = Worker(wf, store=store)
        task = await _serving(worker)
        result = await handle.result(timeout=10)
        await worker.close()
        await task
    assert result.status == RunStatus.COMPLETED and RAN == ["A", "B", "C"]
