"""Workflows for the crash tests, runnable as a subprocess.

    python tests/crashflows.py start|recover FLOW STORE TARGET LOG RUN_ID

``STORE`` is ``sqlite`` or ``redis``; ``TARGET`` the SQLite path or the Redis URL.
Every step and branch appends ``start NAME PID`` and ``end NAME PID`` lines to ``LOG``
(an append-only file, flushed and fsynced per line). With ``CRASH_BLOCK=1`` in the
environment, the marked step (and branches with item >= 8) block for a minute, so
the test can SIGKILL the process in the middle of them.
"""

from __future__ import annotations

import asyncio
import os
import sys

from helpers import log_line
from pydantic import BaseModel

from agentflow import END, START, Next, Parallel, Workflow, WorkflowRunner

LOG = os.environ.get("CRASH_LOG", "")


def log(line: str) -> None:
    log_line(LOG, line)


def blocking() -> bool:
    return os.environ.get("CRASH_BLOCK") == "1"


class Tally(BaseModel):
    done: list[str] = []


def make_step(name: str, nxt: str, block: bool = False):
    async def fn(ctx):
        log(f"start {name}")
        if block and blocking():
            await asyncio.sleep(60)
        ctx.set_state(done=[*ctx.state.done, name])
        log(f"end {name}")
        return nxt

    fn.__name__ = name
    return fn


async def branch(ctx):
    log(f"start branch{ctx.item}")
    if ctx.item >= 8 and blocking():
        await asyncio.sleep(60)
    else:
        await asyncio.sleep(0.01 * (ctx.item % 3))
    ctx.set_state(done=[f"b{ctx.item}"])
    log(f"end branch{ctx.item}")
    return ctx.item * 10


def flows(store: str, target: str) -> dict[str, Workflow]:
    opts = {"store": store, "lease_ttl": 1.0}
    opts["path" if store == "sqlite" else "url"] = target
    linear = (
        Workflow("CrashLinear")
        .state(Tally)
        .flow(
            {
                START: make_step("A", "B"),
                "B": make_step("B", "C"),
                "C": make_step("C", "D", block=True),
                "D": make_step("D", END),
            }
        )
        .persistence(**opts)
    )
    fanout = (
        Workflow("CrashFanout")
        .state(Tally)
        .flow(
            {
                START: make_step("A", "Fan"),
                "Fan": lambda ctx: Parallel.map(branch, range(12), "Join", max_concurrency=4),
                "Join": lambda ctx: (log("start Join"), END)[1],
            }
        )
        .persistence(**opts)
    )
    return {"linear": linear, "fanout": fanout}


async def main(cmd: str, flow: str, store: str, target: str, run_id: str) -> None:
    wf = agent_flow(store, target) if flow == "agent" else flows(store, target)[flow]
    async with WorkflowRunner(wf) as runner:
        if cmd == "start":
            handle = await runner.run(None, run_id=run_id)
        else:
            handles = []
            for _ in range(100):  # the dead owner's lease runs out within lease_ttl
                handles = await runner.recover()
                if handles:
                    break
                await asyncio.sleep(0.1)
            handle = await runner.attach(run_id)
        result = await handle.result(timeout=60)
        print(f"result {result.status.value} {result.step_results}", flush=True)


def agent_flow(store: str, target: str) -> Workflow:
    from agentflow import Agent

    opts = {"store": store, "lease_ttl": 1.0}
    opts["path" if store == "sqlite" else "url"] = target

    async def ask(ctx):
        log("start Ask")
        async with ctx.agents.writer as writer:
            reply = await writer.send("Write one line about durable runs")
        log(f"replied {reply.text.replace(' ', '_')}")
        if blocking():
            await asyncio.sleep(60)  # killed here, right after the reply was journaled
        return Next(END, output={"text": reply.text, "tokens": reply.usage.output_tokens})

    return (
        Workflow("CrashAgent")
        .flow({START: ask})
        .agents({"writer": Agent(provider="openai", model="gpt-test")})
        .persistence(**opts)
    )


if __name__ == "__main__":
    command, flow_name, store_kind, store_target, LOG, rid = sys.argv[1:7]
    asyncio.run(main(command, flow_name, store_kind, store_target, rid))
