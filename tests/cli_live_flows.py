"""A workflow with slow steps and an agent, for the CLI's live view (the store path comes from CLI_DB)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from pydantic import BaseModel

from agentflow import END, START, Agent, HumanApproval, Next, Wait, Workflow
from agentflow.agents import ProviderReply
from agentflow.testing import ScriptedProvider
from agentflow.types import Usage


class Ticket(BaseModel):
    title: str
    fail: bool = False


async def _hold(step: str) -> None:
    """Take a while: until the file named after the step appears in CLI_GATES (a test lets it
    go), or CLI_STEP_SECONDS (0.6 s) without it."""
    gates = os.environ.get("CLI_GATES")
    if not gates:
        await asyncio.sleep(float(os.environ.get("CLI_STEP_SECONDS", "0.6")))
        return
    path = Path(gates, step)
    # Another process lets it go (the test, a file), so there is no event to wait on: look.
    while not await asyncio.to_thread(path.exists):  # noqa: ASYNC110
        await asyncio.sleep(0.05)


async def _triage(ctx):
    await _hold("Triage")
    return "Draft"


async def _draft(ctx):
    async with ctx.agents.writer as writer:
        reply = await writer.run(f"draft a fix for {ctx.input.title}")
    await _hold("Draft")
    if ctx.input.fail:
        raise RuntimeError("the build is red")
    return Next(END, output=reply.text)


live = (
    Workflow("CliLive", "Triage a ticket, then an agent drafts a fix")
    .input(Ticket)
    .flow({START: lambda ctx: "Triage", "Triage": _triage, "Draft": _draft})
    .agents(
        {
            "writer": Agent(
                provider=ScriptedProvider(
                    [ProviderReply("patched", usage=Usage(1204, 311))] * 50, latency=0.05
                ),
                model="m",
            )
        }
    )
    .persistence(store="sqlite", path=os.environ.get("CLI_DB", "cli.db"))
)


def _ask(ctx):
    return Wait(HumanApproval(["editor"], prompt="Ship it?"), "Ship")


# Version 1 waits before step "Ship"; version 2 (CLI_VERSION=2, a deploy of new code)
# renamed that step "Release" and has no migration: runs parked on 1 would not load.
if os.environ.get("CLI_VERSION", "1") == "1":
    versioned = (
        Workflow("CliVersioned", "Asks, then ships", version="1")
        .flow({START: _ask, "Ship": lambda ctx: Next(END, output="shipped")})
        .persistence(store="sqlite", path=os.environ.get("CLI_DB", "cli.db"))
    )
else:
    versioned = (
        Workflow("CliVersioned", "Asks, then releases", version="2")
        .flow({START: lambda ctx: "Release", "Release": lambda ctx: Next(END, output="released")})
        .persistence(store="sqlite", path=os.environ.get("CLI_DB", "cli.db"))
    )
