"""Workflows the CLI tests discover (the store path comes from the environment)."""

from __future__ import annotations

import os

from pydantic import BaseModel

from agentflow import END, START, HumanApproval, Next, Wait, Workflow


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
