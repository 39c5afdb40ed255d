"""A client following many runs on SQLite (no change feed): one look at all of them.

The SQLite store tells, in one read, which of many runs changed (``ReadsVersions``), so
a process waiting on runs that another process advances reads their versions together
every 100 ms, and a run's record only when it changed, instead of every record every
100 ms.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from agentflow import END, START, HumanApproval, Next, RunStatus, Wait, Workflow, WorkflowRunner
from agentflow.stores import SqliteStore
from agentflow.stores.capabilities import ReadsVersions
from agentflow.stores.contract import Change, RunRecord
from agentflow.testing.store_builders import record


class CountingSqliteStore(SqliteStore):
    """Counts the records it reads one by one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gets = 0

    async def get(self, run_id: str) -> Any:
        self.gets += 1
        return await super().get(run_id)


def _gated() -> Workflow:
    return Workflow("Gated").flow(
        {
            START: lambda ctx: Wait(HumanApproval(["ops"]), "Done"),
            "Done": lambda ctx: Next(END, output=time.time()),
        }
    )


async def test_versions_change_with_status_control_and_events(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "v.db"))
    try:
        assert isinstance(store, ReadsVersions)
        await store.create(record("r1"), [])
        await store.create(record("r2"), [])
        first = await store.versions(["r1", "r2", "nope"])
        assert set(first) == {"r1", "r2"}

        def pause(rec: RunRecord, now: float) -> Change:
            import dataclasses

            return Change(dataclasses.replace(rec, control="pause"), [])

        await store.update("r1", pause)
        second = await store.versions(["r1", "r2"])
        assert second["r1"] != first["r1"] and second["r2"] == first["r2"]
        assert await store.versions([]) == {}
        many = [f"m{i}" for i in range(1200)]  # more ids than one statement asks about
        for run_id in many[:3]:
            await store.create(record(run_id), [])
        assert set(await store.versions([*many, "r2"])) == {"m0", "m1", "m2", "r2"}
    finally:
        await store.close()


async def test_a_client_waiting_on_many_runs_reads_each_record_only_when_it_changed(tmp_path: Path) -> None:
    path = str(tmp_path / "f.db")
    client_store, other_store = CountingSqliteStore(path), SqliteStore(path)
    wf = _gated()
    try:
        async with (
            WorkflowRunner(wf, store=other_store) as other,
            WorkflowRunner(wf, store=client_store, execute=False) as client,
        ):
            handles = [await other.run() for _ in range(100)]
            for h in handles:
                await h.wait_for(RunStatus.WAITING, timeout=10)
            remote = [await client.attach(h.run_id) for h in handles]
            client_store.gets = 0
            waiting = [asyncio.ensure_future(h.result(timeout=30)) for h in remote]
            await asyncio.sleep(2.0)  # nothing changes meanwhile
            idle_reads = client_store.gets
            approved = time.time()
            for h in handles:  # decided, and advanced, in the other process's runner
                await other.approve(h.run_id, by="ops")
            results = await asyncio.gather(*waiting)
            seen = time.time() - approved
    finally:
        await client_store.close()
        await other_store.close()
    # Each record read once at the start, and by the backstop at 1 s and 3 s: not every 100 ms
    # (which would be 2,000 reads in 2 s).
    assert idle_reads <= 100 * 3, idle_reads
    assert [r.status for r in results] == [RunStatus.COMPLETED] * 100
    assert seen < 3.0  # the last of the 100 seen within a few looks of its commit


async def test_a_client_reads_a_run_of_many_steps_a_few_times_not_once_a_step(tmp_path: Path) -> None:
    # Twenty runs of eight 0.1 s steps advanced by a worker: the client's result() wakes
    # for their new status, not for each step the poll sees (which was a read a step).
    from agentflow import Worker

    async def step(ctx: Any) -> Any:
        await asyncio.sleep(0.1)
        n = int(ctx.step_name[1:])
        return f"s{n + 1}" if n < 7 else Next(END, output=n)

    wf = Workflow("Long").flow({START: lambda ctx: "s0", **{f"s{i}": step for i in range(8)}})
    path = str(tmp_path / "steps.db")
    client_store, worker_store = CountingSqliteStore(path), SqliteStore(path)
    try:
        async with WorkflowRunner(wf, store=client_store, execute=False) as client:
            handles = [await client.run() for _ in range(20)]
            worker = Worker(wf, store=worker_store, concurrency=20)
            serving = asyncio.ensure_future(worker.serve())
            client_store.gets = 0
            results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
            await worker.close()
            await serving
    finally:
        await client_store.close()
        await worker_store.close()
    assert [r.output for r in results] == [7] * 20
    # A read when result() starts, one when the run is seen final (and its load), and a
    # backstop look for a run that took over a second: not the ~8 a step-by-step wake made.
    assert client_store.gets <= 20 * 3, client_store.gets
