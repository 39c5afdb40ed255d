"""A tool-using agent for the crash tests, runnable as a subprocess.

    python tests/toolcrashflows.py start|recover|approve STORE TARGET LOG RUN_ID

The agent (OpenAI protocol, reaching the local LLM server through ``OPENAI_BASE_URL``)
may call ``lookup`` (idempotent), ``check`` (idempotent, blocks with ``CRASH_BLOCK=check``),
``deploy`` (not idempotent, blocks with ``CRASH_BLOCK=deploy``) and ``release`` (needs
``ops-lead``'s approval). Every tool appends ``start NAME PID`` and ``end NAME PID`` to
``LOG`` (fsynced per line), so a test counts what ran, and in which process.

``start`` runs the workflow and waits for its result (or to be killed); ``recover``
recovers the run and waits until it ends or parks; ``approve`` approves the run's
pending approval as ``ops-lead`` and waits for the result. Each prints
``status STATUS`` and, for a run that parks, ``approval KIND TOOL``.
"""

from __future__ import annotations

import asyncio
import os
import sys

from helpers import log_line

from agentflow import (
    END,
    START,
    Agent,
    HumanApproval,
    Next,
    RunStatus,
    ToolContext,
    Workflow,
    WorkflowRunner,
    tool,
)

LOG = os.environ.get("CRASH_LOG", "")


def log(line: str) -> None:
    log_line(LOG, line)


async def _ran(name: str) -> None:
    log(f"start {name}")
    if os.environ.get("CRASH_BLOCK") == name:
        await asyncio.sleep(60)  # killed here, while the tool runs
    log(f"end {name}")


@tool(idempotent=True)
async def lookup(service: str) -> str:
    """Look a service's version up."""
    await _ran("lookup")
    return f"{service} runs 1.1"


@tool(idempotent=True)
async def check(service: str) -> str:
    """Check a service's health."""
    await _ran("check")
    return "healthy"


@tool
async def deploy(ctx: ToolContext, version: str) -> str:
    """Deploy a version (not idempotent)."""
    await _ran("deploy")
    return f"deployed {version} with key {ctx.idempotency_key}"


@tool(approval=HumanApproval(approvers=["ops-lead"], prompt="Release?"))
async def release(version: str) -> str:
    """Release a version to customers."""
    await _ran("release")
    return f"released {version}"


def workflow(store: str, target: str) -> Workflow:
    opts = {"store": store, "lease_ttl": 1.0}
    opts["path" if store == "sqlite" else "url"] = target

    async def ship(ctx):
        async with ctx.agents.ops as ops:
            run = await ops.run("Ship 1.2")
        return Next(
            END, output={"text": run.text, "calls": [[c.name, c.result, c.error] for c in run.tool_calls]}
        )

    return (
        Workflow("ToolCrash")
        .flow({START: ship})
        .agents(
            {"ops": Agent(provider="openai", model="gpt-4o-mini", tools=[lookup, check, deploy, release])}
        )
        .persistence(**opts)
    )


async def main(cmd: str, store: str, target: str, run_id: str) -> None:
    async with WorkflowRunner(workflow(store, target)) as runner:
        if cmd == "start":
            handle = await runner.run(None, run_id=run_id)
        elif cmd == "recover":
            for _ in range(100):  # the dead owner's lease runs out within lease_ttl
                if await runner.recover():
                    break
                await asyncio.sleep(0.1)
            handle = await runner.attach(run_id)
        else:
            handle = await runner.approve(run_id, by="ops-lead")
        info = await handle.wait_for(RunStatus.WAITING, timeout=60)
        print(f"status {info.status.value}", flush=True)
        for a in info.approvals:
            print(f"approval {a.kind} {a.tool}", flush=True)
        if info.status == RunStatus.COMPLETED:
            print(f"output {(await handle.result()).output}", flush=True)
        if info.status == RunStatus.WAITING and cmd == "start":
            await asyncio.sleep(60)  # stay, parked, until killed


if __name__ == "__main__":
    command, store_kind, store_target, LOG, rid = sys.argv[1:6]
    asyncio.run(main(command, store_kind, store_target, rid))
