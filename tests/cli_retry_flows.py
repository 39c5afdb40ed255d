"""A workflow whose middle step fails until a file exists, for the CLI's retry and fork tests."""

from __future__ import annotations

import os

from pydantic import BaseModel

from agentflow import END, START, Next, Workflow


class Notes(BaseModel):
    note: str = "plain"


def publish(ctx):
    if not os.path.exists(os.environ["CLI_FIXED"]):
        raise ConnectionError("the registry is down")
    return Next(END, output=f"published ({ctx.state.note})")


flaky = (
    Workflow("CliFlaky", "Publishes once the registry is back")
    .state(Notes)
    .flow({START: lambda ctx: "Publish", "Publish": publish})
    .persistence(store="sqlite", path=os.environ.get("CLI_DB", "cli.db"))
)
