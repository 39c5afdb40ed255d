"""Workflows the CLI tests discover (the store path comes from the environment)."""

from __future__ import annotations

import os

from pydantic import BaseModel

from agentflow import END, START, Agent, HumanApproval, Next, Wait, Workflow, tool
from agentflow.agents import ProviderReply, ProviderRequest, ToolUse
from agentflow.testing import ScriptedProvider


class Draft(BaseModel):
    text: str


review = (
    Workflow("CliReview", "A draft an editor approves")
    .input(Draft)
    .flow(
        {
            START: lambda ctx: Wait(
                HumanApproval(["editor"], prompt="Publish?", context={"draft": ctx.input.text}), "Publish"
            ),
            "Publish": lambda ctx: Next(END, output=(ctx.decision.data or {}).get("text", ctx.input.text)),
        }
    )
    .persistence(store="sqlite", path=os.environ.get("CLI_DB", "cli.db"))
)


def _ops_model(request: ProviderRequest) -> ProviderReply:
    """A model played from the conversation, so any process can go on with it."""
    results = [m for m in request.messages if m.role == "tool"]
    if not results:
        return ProviderReply("Deploying.", tool_calls=(ToolUse("c1", "deploy", {"version": "2.0"}),))
    return ProviderReply(f"deploy said: {results[-1].content}")


@tool(approval=HumanApproval(["ops-lead"], prompt="Deploy?"))
def deploy(version: str) -> str:
    """Deploy a version."""
    raise AssertionError("the CLI test answers this call with respond; it never runs")


async def _ship(ctx):
    async with ctx.agents.ops as ops:
        run = await ops.run("ship 2.0")
    return Next(END, output=run.text)


tooling = (
    Workflow("CliDeploy", "An agent whose deploy a reviewer answers")
    .flow({START: _ship})
    .agents({"ops": Agent(provider=ScriptedProvider([_ops_model] * 5), model="m", tools=[deploy])})
    .persistence(store="sqlite", path=os.environ.get("CLI_DB", "cli.db"))
)
