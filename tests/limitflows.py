"""A workflow whose agent keeps to a ``RateLimit``, for the rate-limit tests, in-process and as a script.

Every model call appends ``<start> <end> <pid>`` (wall-clock seconds of this machine,
fsynced) to a log, so a test can check the calls of several processes together.

As a script (``python limitflows.py KIND URL LOG RUNS [SKEW]``) it prints ``ready``,
waits for a line on stdin, runs RUNS runs on the store at URL (KIND sqlite, redis or
postgres; a path for sqlite), and prints the agent's pool statistics as JSON. With
SKEW, the process's ``time.time`` runs SKEW seconds off (what it logs is the true
time): on Redis and Postgres the store's clock judges the limit, not this one.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from agentflow import END, START, Agent, Next, RateLimit, Workflow, WorkflowRunner
from agentflow.agents.spi import ProviderReply, ProviderRequest
from agentflow.testing import ScriptedProvider

#: 5 requests in any 2 seconds, one call at a time.
LIMIT = RateLimit(requests_per_minute=150, window=2.0, concurrent=1)
#: Model calls each run makes.
CALLS = 2
_true_time = time.time


class ClockedProvider(ScriptedProvider):
    """A scripted provider that logs when each call starts and ends."""

    def __init__(self, log: str, latency: float = 0.05) -> None:
        super().__init__(name="clocked", latency=latency)
        self.log = log

    async def complete(self, request: ProviderRequest) -> ProviderReply:
        start = _true_time()
        self.add("ok")
        reply = await super().complete(request)
        line = f"{start:.6f} {_true_time():.6f} {os.getpid()}\n"
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return reply


def limited(log: str, limit: RateLimit = LIMIT, calls: int = CALLS) -> Workflow:
    """One step that sends ``calls`` prompts through agent ``writer``, limited by ``limit``."""

    async def talk(ctx):
        async with ctx.agents.writer as w:
            for i in range(calls):
                await w.send(f"prompt {i}")
        return Next(END, output=calls)

    agent = Agent(provider=ClockedProvider(log), model="test", limit=limit)
    return Workflow("Limited").flow({START: talk}).agents({"writer": agent})


def calls_of(log: str) -> list[tuple[float, float, int]]:
    """``(start, end, pid)`` of every logged call, by start."""
    with open(log) as f:
        rows = [line.split() for line in f if line.strip()]
    return sorted((float(a), float(b), int(p)) for a, b, p in rows)


async def _main(kind: str, url: str, log: str, runs: int) -> None:
    if kind == "sqlite":
        from agentflow.stores import SqliteStore

        store = SqliteStore(url)
    elif kind == "postgres":
        from agentflow.stores.postgres import PostgresStore

        store = PostgresStore(url)
    else:
        from agentflow.stores.redis import RedisStore

        store = RedisStore(url)
    async with WorkflowRunner(limited(log), store=store) as runner:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        handles = [await runner.run() for _ in range(runs)]
        for h in handles:
            await h.result(timeout=60)
        stats = runner.agent_statistics()["writer"]
        print(json.dumps({"waited": stats.waited, "wait_seconds": stats.wait_seconds}), flush=True)
    await store.close()


if __name__ == "__main__":
    kind, url, log, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if len(sys.argv) > 5:
        skew = float(sys.argv[5])
        time.time = lambda: _true_time() + skew
    asyncio.run(_main(kind, url, log, runs))
