"""Workflows the review page's browser tests serve (``agentflow serve reviewflows``).

The store comes from the environment, set by ``review_server.py``: ``REVIEW_STORE``
(``sqlite`` or ``redis``) and ``REVIEW_STORE_URL`` (the SQLite file, or the Redis URL).
Every model here is played from the conversation, so the serving process can carry on a
run that the test process started.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

from pydantic import BaseModel, Field

from agentflow import END, START, Agent, HumanApproval, Next, Wait, Workflow, step, tool
from agentflow.agents import ProviderReply, ProviderRequest, ToolUse
from agentflow.testing import ScriptedProvider

#: What an agent wrote, as a reviewer must see it: text, never markup that runs.
PAYLOAD = (
    "Summary of the week.\n\n"
    "<script>alert(1)</script>\n\n"
    "An image: <img src=x onerror=alert(1)>\n\n"
    "A [click](javascript:alert(1)) link and a [safe one](https://example.org/notes).\n"
)


def _persisted(workflow: Workflow) -> Workflow:
    where = os.environ.get("REVIEW_STORE_URL", "review.db")
    if os.environ.get("REVIEW_STORE", "sqlite") == "redis":
        return workflow.persistence(store="redis", url=where)
    return workflow.persistence(store="sqlite", path=where)


# -- a gate with a form -------------------------------------------------------------------


class Notes(BaseModel):
    title: str
    previous: str
    draft: str


class NotesEdit(BaseModel):
    """What the editor may change before the notes go out."""

    title: str = Field(min_length=3, description="The release's headline")
    priority: int = Field(ge=1, le=5, description="1 (low) to 5 (urgent)")


def _ask_editor(ctx: Any) -> Wait:
    gate = HumanApproval(
        ["editor"],
        prompt=f"Publish the release notes for {ctx.input.title}?",
        # The title fills the form's field; before and after show as a diff.
        context={"title": ctx.input.title, "before": ctx.input.previous, "after": ctx.input.draft},
        form=NotesEdit,
    )
    return Wait(gate, "Publish")


def _publish(ctx: Any) -> Next:
    edit = ctx.decision.data
    return Next(END, output={"title": edit.title, "priority": edit.priority, "by": ctx.decision.by})


release_notes = _persisted(
    Workflow("ReleaseNotes", "Release notes an editor approves, with an edit")
    .input(Notes)
    .flow({START: lambda ctx: "Review", "Review": step(_ask_editor, form=NotesEdit), "Publish": _publish})
)


# -- a gate without a form, for bulk decisions and the quorum -----------------------------


class Item(BaseModel):
    text: str


triage = _persisted(
    Workflow("Triage", "An item an editor lets through")
    .input(Item)
    .flow(
        {
            START: lambda ctx: "Triage",
            "Triage": lambda ctx: Wait(
                HumanApproval(["editor"], prompt=f"Let {ctx.input.text} through?", context=ctx.input.text),
                "Through",
            ),
            "Through": lambda ctx: Next(END, output=f"{ctx.input.text} by {ctx.decision.by}"),
        }
    )
)

sign_off = _persisted(
    Workflow("SignOff", "A release both the editor and the operator sign off")
    .input(Item)
    .flow(
        {
            START: lambda ctx: "Sign",
            "Sign": lambda ctx: Wait(
                HumanApproval(["editor", "ops-lead"], quorum=2, prompt="Sign off?", context=ctx.input.text),
                "Signed",
            ),
            "Signed": lambda ctx: Next(END, output="signed"),
        }
    )
)


# -- agent output carrying markup ---------------------------------------------------------


def _writer(request: ProviderRequest) -> ProviderReply:
    return ProviderReply(PAYLOAD)


async def _summarize(ctx: Any) -> Wait:
    async with ctx.agents.writer as writer:
        run = await writer.run(f"Summarize {ctx.input.text}")
    return Wait(HumanApproval(["editor"], prompt="Send this summary?", context=run.text), "Send")


summary = _persisted(
    Workflow("Summary", "An agent's summary an editor sends")
    .input(Item)
    .flow(
        {
            START: lambda ctx: "Summarize",
            "Summarize": _summarize,
            "Send": lambda ctx: Next(END, output="sent"),
        }
    )
    .agents({"writer": Agent(provider=ScriptedProvider([_writer] * 500), model="m")})
)


# -- a tool call an operator approves, with edited arguments ------------------------------


def _operator(request: ProviderRequest) -> ProviderReply:
    """Call deploy once; then say what it returned."""
    results = [m for m in request.messages if m.role == "tool"]
    if not results:
        return ProviderReply(
            "Deploying 2.0 to staging.",
            tool_calls=(ToolUse("c1", "deploy", json.dumps({"version": "2.0", "environment": "staging"})),),
        )
    return ProviderReply(f"deploy said: {results[-1].content}")


@tool(approval=HumanApproval(["ops-lead"], prompt="Run this deploy?"))
def deploy(version: str, environment: Literal["staging", "production"]) -> dict[str, str]:
    """Deploy a version to an environment."""
    return {"deployed": version, "to": environment}


async def _ship(ctx: Any) -> Next:
    async with ctx.agents.ops as ops:
        run = await ops.run("Ship 2.0")
    return Next(END, output={"text": run.text, "arguments": [c.arguments for c in run.tool_calls]})


ship = _persisted(
    Workflow("Ship", "An agent whose deploy an operator approves")
    .flow({START: lambda ctx: "Ship", "Ship": _ship})
    .agents({"ops": Agent(provider=ScriptedProvider([_operator] * 500), model="m", tools=(deploy,))})
)
