"""A client following runs a worker advances: a change whose push is lost is still seen.

The store's change feed wakes a client's ``result()`` at once; the backstop look at the
store (1 s after a read, doubling to 4 s while no push comes) bounds how late a change
is seen when its push never arrives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from agentflow import END, START, Next, Worker, Workflow, WorkflowRunner
from agentflow.stores.redis import RedisStore

#: The longest backstop interval the README states, and what a wait may add to it here.
BOUND, SLACK = 4.0, 0.75


class DeafRedisStore(RedisStore):
    """A Redis store whose feed stays subscribed but loses every push (counts its reads)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gets = 0

    async def changes(self, changed: Callable[[str], None]) -> None:
        await super().changes(lambda run_id: None)

    async def get(self, run_id: str) -> Any:
        self.gets += 1
        return await super().get(run_id)


def _slow(seconds: float) -> Workflow:
    async def work(ctx: Any) -> Next:
        await asyncio.sleep(seconds)
        return Next(END, output=time.time())

    return Workflow("Slow").flow({START: work})


@pytest.mark.parametrize("seconds", [0.3, 7.0])
async def test_a_result_whose_push_is_lost_is_seen_within_the_bound(redis_url, make_store, seconds) -> None:
    client_store = DeafRedisStore(redis_url, key_prefix="deaf:")
    worker_store = make_store("redis", key_prefix="deaf:")
    wf = _slow(seconds)
    try:
        async with WorkflowRunner(wf, store=client_store, execute=False) as client:
            worker = Worker(wf, store=worker_store)
            task = asyncio.create_task(worker.serve())
            handle = await client.run()
            result = await handle.result(timeout=30)
            lag = time.time() - float(result.output)
            await worker.close()
            await task
    finally:
        await client_store.close()
    assert lag <= (1.0 if seconds < 1 else BOUND) + SLACK  # seen with no push at all
    if seconds > BOUND:  # the looks grew rarer while nothing came: 1, 2, 4, 4 s apart
        assert client_store.gets <= 6
