"""Workflows the worker crash tests serve with ``agentflow worker fleetflows``.

The store comes from the environment (``FLEET_STORE`` sqlite|redis, ``FLEET_TARGET`` a
path or a URL); every step appends ``start NAME RUN PID`` / ``end NAME RUN PID`` to
``FLEET_LOG`` (fsynced), and ``FLEET_BLOCK=NAME`` makes that step hang in the first
process that runs it, so a test can SIGKILL the worker in the middle of it.
"""

from __future__ import annotations

import asyncio
import os

from helpers import log_line

from agentflow import END, START, Agent, Next, Parallel, Workflow, tool
from agentflow.agents import ProviderReply, ProviderRequest, ToolUse
from agentflow.testing import ScriptedProvider

LOG = os.environ.get("FLEET_LOG", "fleet.log")


def log(line: str) -> None:
    log_line(LOG, line)


def stage(name: str, nxt: str):
    async def run(ctx):
        log(f"start {name} {ctx.run_id}")
        if os.environ.get("FLEET_BLOCK") == name:
            await asyncio.sleep(60)
        await asyncio.sleep(0.05)
        log(f"end {name} {ctx.run_id}")
        return nxt if nxt != END else Next(END, output=os.getpid())

    run.__name__ = name
    return run


def _persistence() -> dict[str, object]:
    kind = os.environ.get("FLEET_STORE", "sqlite")
    target = os.environ.get("FLEET_TARGET", "fleet.db")
    return {"store": kind, ("path" if kind == "sqlite" else "url"): target, "lease_ttl": 1.0}


pipeline = (
    Workflow("FleetPipeline")
    .flow({START: stage("A", "B"), "B": stage("B", "C"), "C": stage("C", END)})
    .persistence(**_persistence())
)


async def branch(ctx):
    log(f"start branch{ctx.item} {ctx.run_id}")
    if ctx.item >= 3 and os.environ.get("FLEET_BLOCK") == "branch":
        await asyncio.sleep(60)
    await asyncio.sleep(0.02)
    log(f"end branch{ctx.item} {ctx.run_id}")
    return ctx.item * 10


fanout = (
    Workflow("FleetFanout")
    .flow(
        {
            START: lambda ctx: Parallel.map(branch, range(6), "Join"),
            "Join": lambda ctx: Next(END, output="joined"),
        }
    )
    .persistence(**_persistence())
)


@tool(idempotent=True)
async def probe(service: str) -> str:
    """Probe a service (idempotent: safe to run again)."""
    log(f"start probe {service}")
    if os.environ.get("FLEET_BLOCK") == "probe":
        await asyncio.sleep(60)
    log(f"end probe {service}")
    return f"{service} is up"


def _model(request: ProviderRequest) -> ProviderReply:
    """The model, played from the conversation so far (any process can go on with it)."""
    if not any(m.role == "tool" for m in request.messages):
        return ProviderReply("Probing.", tool_calls=(ToolUse("p1", "probe", {"service": "api"}),))
    return ProviderReply("All up.")


async def _ask(ctx):
    log(f"start Ask {ctx.run_id}")
    async with ctx.agents.ops as ops:
        run = await ops.run("is the api up?")
    log(f"end Ask {ctx.run_id}")
    return Next(END, output=run.text)


agentic = (
    Workflow("FleetAgent")
    .flow({START: _ask})
    .agents({"ops": Agent(provider=ScriptedProvider([_model] * 10), model="m", tools=[probe])})
    .persistence(**_persistence())
)
