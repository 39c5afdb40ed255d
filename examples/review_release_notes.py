"""An agent drafts release notes, a second agent critiques them, an editor reviews.

    python examples/review_release_notes.py

The run waits at a gate for the ``editor``, who sees the draft and the critique and may
edit the draft (the gate's form, ``Edit``); then the notes are published. Here the script
plays the editor. To review the drafts in a browser instead::

    python examples/review_release_notes.py --drafts 3          # three drafts wait in release_notes.db
    agentflow reviewers add examples.review_release_notes editor  # prints the editor's token, once
    agentflow serve examples.review_release_notes                 # http://127.0.0.1:8000, sign in with it

(``AGENTFLOW_DB`` names another SQLite file.) With ``OPENAI_API_KEY`` or
``OPENAI_BASE_URL`` set the writer uses the OpenAI provider (any OpenAI-compatible server
works: ``OPENAI_BASE_URL=http://localhost:11434/v1`` for Ollama), and with
``ANTHROPIC_API_KEY`` or ``ANTHROPIC_BASE_URL`` the critic uses Anthropic; otherwise each
uses agentflow's scripted provider, and the script says so when it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile

from pydantic import BaseModel, Field

from agentflow import (
    END,
    START,
    Agent,
    AgentflowError,
    HumanApproval,
    Next,
    TokenBudget,
    Wait,
    Workflow,
    WorkflowRunner,
    step,
)
from agentflow.testing import ScriptedProvider


class Release(BaseModel):
    repo: str
    version: str
    changes: list[str]


class Review(BaseModel):
    score: int
    issues: list[str]


class Notes(BaseModel):
    draft: str | None = None
    review: Review | None = None


class Edit(BaseModel):
    """What the editor may change before the notes go out (the review page's form)."""

    draft: str = Field(min_length=10, description="The release notes, in Markdown")


def _openai() -> bool:
    return bool(os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL"))


def _anthropic() -> bool:
    return bool(os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_BASE_URL"))


def providers() -> str:
    """Which provider each agent uses (the script says so when it starts)."""
    writer = (
        f"writer: OpenAI provider, model {os.environ.get('WRITER_MODEL', 'gpt-4o-mini')}"
        if _openai()
        else "writer: scripted provider (set OPENAI_API_KEY or OPENAI_BASE_URL for a real model)"
    )
    critic = (
        f"critic: Anthropic provider, model {os.environ.get('CRITIC_MODEL', 'claude-sonnet-5-5')}"
        if _anthropic()
        else "critic: scripted provider (set ANTHROPIC_API_KEY or ANTHROPIC_BASE_URL for a real model)"
    )
    return f"{writer}\n{critic}"


def writer_agent() -> Agent:
    instructions = "You write concise, friendly release notes in Markdown."
    if _openai():
        return Agent(
            provider="openai", model=os.environ.get("WRITER_MODEL", "gpt-4o-mini"), instructions=instructions
        )
    script = ScriptedProvider(
        [lambda req: "## acme/app 2.4.0\n\n- Faster builds\n- Fixed login timeouts\n- New export API"] * 1000,
        name="scripted-writer",
    )
    return Agent(provider=script, model="scripted", instructions=instructions)


def critic_agent() -> Agent:
    instructions = "You review release notes for accuracy and tone. Score them from 1 to 10."
    if _anthropic():
        model = os.environ.get("CRITIC_MODEL", "claude-sonnet-5-5")
        return Agent(provider="anthropic", model=model, instructions=instructions, output=Review)
    script = ScriptedProvider(
        [{"score": 7, "issues": ["mention the export API's docs"]}] * 1000, name="scripted-critic"
    )
    return Agent(provider=script, model="scripted", instructions=instructions, output=Review)


async def draft(ctx):
    async with ctx.agents.writer as writer:  # the handle closes on exit
        changes = "\n".join(f"- {c}" for c in ctx.input.changes)
        reply = await writer.send(f"Release notes for {ctx.input.repo} {ctx.input.version}:\n{changes}")
    ctx.set_state(draft=reply.text)
    return "Critique"


async def critique(ctx):
    critic = await ctx.agents["critic"]
    try:
        review = (await critic.send(ctx.state.draft)).output  # a Review instance
    finally:
        await critic.close()
    ctx.set_state(review=review)
    return Wait(
        HumanApproval(
            approvers=["editor"],
            prompt="Publish these release notes? Edit the draft if needed.",
            context={"draft": ctx.state.draft, "review": review.model_dump()},
            form=Edit,
        ),
        "Publish",
        on_reject=END,
    )


def publish(ctx):
    edit = ctx.decision.data  # an Edit, or None when the editor approved without the form
    edited = edit is not None and edit.draft != ctx.state.draft
    return Next(
        END,
        output={
            "notes": edit.draft if edited else ctx.state.draft,
            "edited_by": ctx.decision.by if edited else None,
        },
    )


def release_notes(path: str) -> Workflow:
    return (
        Workflow("ReleaseNotes", "Draft, critique, review and publish release notes")
        .input(Release)
        .state(Notes)
        .flow({START: draft, "Critique": step(critique, form=Edit), "Publish": publish})
        .agents(
            {"writer": writer_agent(), "critic": critic_agent()}, max_handles=4, budget=TokenBudget(50_000)
        )
        .persistence(store="sqlite", path=path)
    )


#: What ``agentflow serve examples.review_release_notes`` serves (and ``--drafts`` fills).
DB = os.environ.get("AGENTFLOW_DB", "release_notes.db")
release_notes_workflow = release_notes(DB)

RELEASE = {"repo": "acme/app", "version": "2.4.0", "changes": ["faster builds", "login fix", "export API"]}


async def drafts(n: int) -> None:
    """Start ``n`` runs that wait, each with its draft, for the editor (on the page)."""
    print(providers())
    async with WorkflowRunner(release_notes_workflow) as runner:
        for i in range(n):
            handle = await runner.run({**RELEASE, "version": f"2.4.{i}"})
            info = await handle.wait_for("waiting", timeout=60)
            if info.status != "waiting":
                await handle.result()  # it ended before the gate: say why
    print(f"{n} drafts wait for the editor in {DB}; review them with")
    print("    agentflow reviewers add examples.review_release_notes editor")
    print("    agentflow serve examples.review_release_notes")


async def main() -> None:
    print(providers())
    with tempfile.TemporaryDirectory() as d:
        path = os.environ.get("AGENTFLOW_DB") or os.path.join(d, "notes.db")
        async with WorkflowRunner(release_notes(path)) as runner:
            handle = await runner.run(RELEASE)
            async for ev in handle.events():
                if ev.kind == "waiting":
                    break
            else:
                # The run ended before the gate (a provider refused a call, say): its
                # result raises the reason.
                await handle.result()
            pending = (await handle.info()).pending
            assert pending is not None
            review = pending.context["review"]
            who = list(pending.approvers)
            print(f"waiting for {who}; critic scored {review['score']}: {review['issues']}")
            print("draft:\n" + pending.context["draft"])
            edited = pending.context["draft"] + "\n- Export API docs: https://docs.example.com/export"
            await runner.approve(
                handle.run_id, by="editor", comment="added the docs link", data={"draft": edited}
            )
            result = await handle.result()
            usage = (await handle.info()).usage
            print(f"\npublished (edited by {result.output['edited_by']}):\n{result.output['notes']}")
            print(f"tokens: {usage.input_tokens} in, {usage.output_tokens} out")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Release notes an editor reviews.")
    ap.add_argument("--drafts", type=int, help="leave this many drafts waiting for the review page")
    args = ap.parse_args()
    try:
        asyncio.run(drafts(args.drafts) if args.drafts else main())
    except AgentflowError as exc:
        sys.exit(f"error: {exc}")
