"""An agent drafts release notes, a second agent critiques them, an editor reviews.

    python examples/review_release_notes.py

The run waits at a gate for the ``editor``, who sees the draft and the critique and may
edit the draft; then the notes are published. With ``OPENAI_API_KEY`` or
``OPENAI_BASE_URL`` set the writer uses the OpenAI provider (any OpenAI-compatible server
works: ``OPENAI_BASE_URL=http://localhost:11434/v1`` for Ollama), and with
``ANTHROPIC_API_KEY`` or ``ANTHROPIC_BASE_URL`` the critic uses Anthropic; otherwise each
uses agentflow's scripted provider, and the script says so when it starts.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile

from pydantic import BaseModel

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


def writer_agent() -> Agent:
    instructions = "You write concise, friendly release notes in Markdown."
    if os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL"):
        print(f"writer: OpenAI provider, model {os.environ.get('WRITER_MODEL', 'gpt-4o-mini')}")
        return Agent(
            provider="openai", model=os.environ.get("WRITER_MODEL", "gpt-4o-mini"), instructions=instructions
        )
    print("writer: scripted provider (set OPENAI_API_KEY or OPENAI_BASE_URL for a real model)")
    script = ScriptedProvider(
        [
            lambda req: "## acme/app 2.4.0\n\n- Faster builds\n- Fixed login timeouts\n- New export API",
        ],
        name="scripted-writer",
    )
    return Agent(provider=script, model="scripted", instructions=instructions)


def critic_agent() -> Agent:
    instructions = "You review release notes for accuracy and tone. Score them from 1 to 10."
    if os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_BASE_URL"):
        model = os.environ.get("CRITIC_MODEL", "claude-sonnet-5-5")
        print(f"critic: Anthropic provider, model {model}")
        return Agent(provider="anthropic", model=model, instructions=instructions, output=Review)
    print("critic: scripted provider (set ANTHROPIC_API_KEY or ANTHROPIC_BASE_URL for a real model)")
    script = ScriptedProvider(
        [{"score": 7, "issues": ["mention the export API's docs"]}], name="scripted-critic"
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
        ),
        "Publish",
        on_reject=END,
    )


def publish(ctx):
    edited = (ctx.decision.data or {}).get("draft")
    return Next(
        END, output={"notes": edited or ctx.state.draft, "edited_by": ctx.decision.by if edited else None}
    )


def release_notes(path: str) -> Workflow:
    return (
        Workflow("ReleaseNotes", "Draft, critique, review and publish release notes")
        .input(Release)
        .state(Notes)
        .flow({START: draft, "Critique": critique, "Publish": publish})
        .agents(
            {"writer": writer_agent(), "critic": critic_agent()}, max_handles=4, budget=TokenBudget(50_000)
        )
        .persistence(store="sqlite", path=path)
    )


async def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.environ.get("AGENTFLOW_DB") or os.path.join(d, "notes.db")
        async with WorkflowRunner(release_notes(path)) as runner:
            handle = await runner.run(
                {
                    "repo": "acme/app",
                    "version": "2.4.0",
                    "changes": ["faster builds", "login fix", "export API"],
                }
            )
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
    try:
        asyncio.run(main())
    except AgentflowError as exc:
        sys.exit(f"error: {exc}")
