"""Change requests behind a two-reviewer gate with a form, decided from the approval list.

Three change requests wait at a gate that two of three reviewers must approve, each
filling in a small form (risk, maintenance window). A reviewer lists what waits for
them (``runner.approvals``, a page at a time), decides each by its approval id, and a
form that does not fit is refused without recording anything. The step after the gate
sees the reviewer's form as a typed ``Review``. The runs live in a SQLite file
(``AGENTFLOW_DB``, else a temporary one).

    python examples/change_review.py
"""

from __future__ import annotations

import asyncio
import os
import tempfile

from pydantic import BaseModel, Field

from agentflow import (
    END,
    START,
    HumanApproval,
    InvalidInputError,
    Next,
    RunStatus,
    Wait,
    Workflow,
    WorkflowRunner,
)


class ChangeRequest(BaseModel):
    service: str
    summary: str


class Review(BaseModel):
    """The reviewer's form: the gate carries its JSON schema, so any UI can render it."""

    risk: int = Field(ge=1, le=5, description="1 (trivial) to 5 (could take the service down)")
    window: str = Field(description="when to apply it, e.g. 'tonight 22:00 UTC'")


def review(ctx):
    gate = HumanApproval(
        approvers=["alice", "bob", "carol"],
        quorum=2,
        prompt=f"Apply '{ctx.input.summary}' to {ctx.input.service}?",
        context={"service": ctx.input.service, "summary": ctx.input.summary},
        form=Review,
    )
    return Wait(gate, "Apply", on_reject="Shelve")


def apply(ctx):
    form = ctx.decision.data  # a Review, also when the run was reloaded from the store
    assert isinstance(form, Review)
    return Next(
        END,
        output=f"{ctx.input.service}: applied {form.window} (risk {form.risk}, last by {ctx.decision.by})",
    )


def shelve(ctx):
    return Next(END, output=f"{ctx.input.service}: shelved ({ctx.decision.reason})")


def change_review(path: str) -> Workflow:
    return (
        Workflow("ChangeReview", "A change request two reviewers approve")
        .input(ChangeRequest)
        .flow({START: lambda ctx: "Review", "Review": review, "Apply": apply, "Shelve": shelve})
        .persistence(store="sqlite", path=path)
    )


async def main(path: str) -> None:
    async with WorkflowRunner(change_review(path)) as runner:
        requests = [
            ChangeRequest(service="billing", summary="raise the connection pool to 64"),
            ChangeRequest(service="search", summary="rebuild the index"),
            ChangeRequest(service="auth", summary="rotate the signing key"),
        ]
        handles = [await runner.run(r) for r in requests]
        for handle in handles:
            await handle.wait_for(RunStatus.WAITING, timeout=10)

        # What waits for alice, newest first, two at a time.
        pages, after = [], None
        while page := await runner.approvals(approver="alice", limit=2, after=after):
            pages.append(page)
            after = page[-1].id
        print(f"alice has {sum(map(len, pages))} approvals waiting, in {len(pages)} pages:")
        for approval in (a for p in pages for a in p):
            print(f"  {approval.id}  {approval.prompt}  (quorum {approval.quorum})")
        print(f"  the form asks for: {sorted(pages[0][0].form['properties'])}")

        billing, search, auth = [(await h.info()).pending for h in handles]
        assert billing is not None and search is not None and auth is not None

        # A form that does not fit is refused, and nothing is recorded.
        try:
            await runner.approve(
                billing.run_id, by="alice", approval=billing.id, data={"risk": 9, "window": "now"}
            )
        except InvalidInputError as exc:
            print(f"refused: {exc}")

        await runner.approve(
            billing.run_id, by="alice", approval=billing.id, data={"risk": 2, "window": "tonight"}
        )
        votes = (await handles[0].info()).pending
        assert votes is not None
        print(f"billing: votes {list(votes.votes)} of {votes.quorum}")
        decided = await runner.approve(
            billing.run_id, by="bob", approval=billing.id, comment="go", data=Review(risk=2, window="tonight")
        )
        print((await decided.result()).output)

        await runner.reject(
            search.run_id, by="carol", approval=search.id, reason="wait for the freeze to end"
        )
        print(await _output(runner, search.run_id))

        for who in ("bob", "carol"):
            await runner.approve(
                auth.run_id, by=who, approval=auth.id, data={"risk": 4, "window": "Sunday 06:00"}
            )
        print(await _output(runner, auth.run_id))

        left = await runner.approvals()
        print(f"pending approvals left: {len(left)}")


async def _output(runner: WorkflowRunner, run_id: str) -> object:
    handle = await runner.attach(run_id)
    return (await handle.result(timeout=10)).output


if __name__ == "__main__":
    path = os.environ.get("AGENTFLOW_DB")
    if path:
        asyncio.run(main(path))
    else:
        with tempfile.TemporaryDirectory() as folder:
            asyncio.run(main(os.path.join(folder, "changes.db")))
