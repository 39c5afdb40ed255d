"""A fleet through a store outage: the Redis server (AOF on) and the PostgreSQL server
restarted while a worker advances a client's runs. The worker reconnects, no run is
failed by the outage, nothing is lost, and no finished step runs again."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import pytest

from agentflow import END, START, Next, RunStatus, Worker, Workflow, WorkflowRunner

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

STEPS = 6


def _flow(ran: collections.Counter[tuple[str, str]]) -> Workflow:
    async def step(ctx: Any) -> Any:
        await asyncio.sleep(0.05)
        ran[(ctx.run_id, ctx.step_name)] += 1
        n = int(ctx.step_name[1:])
        return f"s{n + 1}" if n + 1 < STEPS else Next(END, output=ctx.run_id)

    return Workflow("Outage").flow({START: lambda ctx: "s0", **{f"s{i}": step for i in range(STEPS)}})


@pytest.mark.parametrize("kind", ["redis", "postgres"])
async def test_a_fleet_rides_out_a_restart_of_its_store(kind, make_store, request) -> None:
    server = request.getfixturevalue("redis_server" if kind == "redis" else "postgres_server")
    ran: collections.Counter[tuple[str, str]] = collections.Counter()
    wf = _flow(ran)
    client_store = make_store(kind, key_prefix="outage:", retry_for=30.0)
    worker_store = make_store(kind, key_prefix="outage:", retry_for=30.0)
    async with WorkflowRunner(wf, store=client_store, execute=False) as client:
        worker = Worker(wf, store=worker_store, concurrency=50)
        serving = asyncio.create_task(worker.serve())
        handles = [await client.run() for _ in range(30)]
        for _ in range(1500):  # until well under way
            if sum(ran.values()) >= 40:
                break
            await asyncio.sleep(0.02)
        await asyncio.to_thread(server.restart)
        results = await asyncio.gather(*(h.result(timeout=90) for h in handles))
        await worker.close()
        await serving
    assert [r.status for r in results] == [RunStatus.COMPLETED] * 30
    assert sorted(r.output for r in results) == sorted(h.run_id for h in handles)
    # Every step of every run ran once: the commits in flight were retried until the
    # server answered (the leases held), none was lost, none was applied twice.
    assert len(ran) == 30 * STEPS and set(ran.values()) == {1}
