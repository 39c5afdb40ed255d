"""Approvals (SPEC section 13): ids, several pending, deciding by id once, forms, listing."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from conftest import StoreFactory
from helpers import wait_status
from pydantic import BaseModel, Field

from agentflow import (
    END,
    START,
    Approval,
    Decision,
    HumanApproval,
    InvalidInputError,
    InvalidStateError,
    Next,
    NotAuthorizedError,
    RunHandle,
    RunStatus,
    Wait,
    Workflow,
    WorkflowRunner,
    step,
)
from agentflow.stores.contract import Change, RunRecord, Store, approval_id


class Review(BaseModel):
    """What a reviewer fills in."""

    title: str
    risk: int = Field(ge=0, le=5)


def gate_flow(name: str = "Gated", seen: list[Decision | None] | None = None, **gate: Any) -> Workflow:
    """START → Ask (waits at a gate) → Done, which records ``ctx.decision``; rejected → Ask again."""
    seen = [] if seen is None else seen
    options = {"approvers": ["alice", "bob"], "prompt": "Ship?", **gate}

    def ask(ctx):
        return Wait(HumanApproval(**options), "Done", on_reject="Ask")

    def done(ctx):
        seen.append(ctx.decision)
        return Next(END, output=ctx.decision.by)

    return Workflow(name).flow({START: lambda ctx: "Ask", "Ask": ask, "Done": done})


async def parked(runner: WorkflowRunner) -> tuple[RunHandle, Approval]:
    handle = await runner.run()
    info = await wait_status(handle, RunStatus.WAITING)
    assert info.pending is not None and info.approvals == (info.pending,)
    return handle, info.pending


async def unchanged(store: Store, run_id: str, before: RunRecord) -> None:
    after = await store.get(run_id)
    assert after is not None
    assert (after.status, after.pending, after.decisions, after.event_count) == (
        before.status,
        before.pending,
        before.decisions,
        before.event_count,
    )


# -- ids and deciding by id ---------------------------------------------------------------


async def test_an_approval_id_is_derived_from_run_step_and_visit(store: Store) -> None:
    async with WorkflowRunner(gate_flow(), store=store) as runner:
        one, first = await parked(runner)
        two, second = await parked(runner)
        assert first.id == approval_id(one.run_id, "Ask", first.visit)
        assert second.id == approval_id(two.run_id, "Ask", second.visit) != first.id
        assert (await one.info()).pending == first  # the same approval, read again


async def test_approve_by_id_and_an_unknown_id_changes_nothing(store: Store) -> None:
    seen: list[Decision | None] = []
    async with WorkflowRunner(gate_flow(seen=seen), store=store) as runner:
        handle, approval = await parked(runner)
        before = await store.get(handle.run_id)
        assert before is not None
        with pytest.raises(InvalidStateError, match=rf"run {handle.run_id}: approval 'ap_nope' is not"):
            await runner.approve(handle.run_id, by="alice", approval="ap_nope")
        with pytest.raises(InvalidStateError, match="ap_nope"):
            await handle.reject(by="alice", approval="ap_nope", reason="no")
        with pytest.raises(NotAuthorizedError, match=approval.id):
            await runner.approve(handle.run_id, by="mallory", approval=approval.id)
        await unchanged(store, handle.run_id, before)
        result = await (await handle.approve(by="bob", approval=approval.id, comment="ok")).result()
    assert result.output == "bob"
    decision = seen[-1]
    assert decision is not None and decision.approval == approval.id and decision.comment == "ok"


async def test_a_decided_approval_is_used_once(store: Store) -> None:
    async with WorkflowRunner(gate_flow(), store=store) as runner:
        handle, first = await parked(runner)
        await runner.reject(handle.run_id, by="alice", approval=first.id, reason="again")
        info = await wait_status(handle, RunStatus.WAITING)  # on_reject: asked again, a new approval
        assert info.pending is not None and info.pending.id != first.id
        before = await store.get(handle.run_id)
        assert before is not None
        for decide in (
            runner.approve(handle.run_id, by="bob", approval=first.id),
            runner.reject(handle.run_id, by="bob", approval=first.id),
        ):
            with pytest.raises(
                InvalidStateError, match=rf"run {handle.run_id}: approval '{first.id}' was decided"
            ):
                await decide
        await unchanged(store, handle.run_id, before)
        result = await (await runner.approve(handle.run_id, by="bob")).result()
        assert result.output == "bob"
        with pytest.raises(
            InvalidStateError, match=rf"run {handle.run_id}: approval '{info.pending.id}' was decided"
        ):
            await runner.approve(handle.run_id, by="bob", approval=info.pending.id)
        decisions = (await handle.info()).decisions
    assert [(d.approval, d.approved) for d in decisions] == [(first.id, False), (info.pending.id, True)]


async def test_several_pending_approvals_need_an_id(store: Store) -> None:
    """A run waiting for two approvals (as tool calls of one step will) goes on once both are decided."""
    async with WorkflowRunner(gate_flow(), store=store) as runner:
        handle, gate = await parked(runner)
        extra = {
            **gate.to_json(),
            "id": approval_id(handle.run_id, "Ask", gate.visit, 1),
            "approvers": ["carol"],
        }

        def add(rec: RunRecord, now: float) -> Change:
            pending = {**rec.pending, "approvals": [*rec.pending["approvals"], extra]}
            return Change(dataclasses.replace(rec, pending=pending))

        await store.update(handle.run_id, add)
        info = await handle.info()
        assert [a.id for a in info.approvals] == [gate.id, extra["id"]] and info.pending == info.approvals[0]
        before = await store.get(handle.run_id)
        assert before is not None
        with pytest.raises(InvalidStateError, match="2 approvals") as err:
            await runner.approve(handle.run_id, by="alice")
        assert gate.id in str(err.value) and extra["id"] in str(err.value)
        with pytest.raises(NotAuthorizedError):
            await runner.approve(handle.run_id, by="alice", approval=extra["id"])
        await unchanged(store, handle.run_id, before)
        await runner.approve(handle.run_id, by="carol", approval=extra["id"])
        info = await handle.info()
        assert info.status == RunStatus.WAITING and [a.id for a in info.approvals] == [gate.id]
        result = await (await runner.approve(handle.run_id, by="alice")).result()  # the one left
    assert result.output == "alice"


async def test_votes_count_towards_the_quorum_of_the_approval(store: Store) -> None:
    async with WorkflowRunner(gate_flow(approvers=["a", "b", "c"], quorum=2), store=store) as runner:
        handle, approval = await parked(runner)
        await runner.approve(handle.run_id, by="a", approval=approval.id)
        await runner.approve(handle.run_id, by="a", approval=approval.id)  # counts once
        info = await handle.info()
        assert info.status == RunStatus.WAITING and info.pending is not None
        assert info.pending.id == approval.id and info.pending.votes == ("a",)
        result = await (await runner.approve(handle.run_id, by="c", approval=approval.id)).result()
    assert result.output == "c"


async def test_a_gate_parked_before_approvals_had_ids_still_decides(store: Store) -> None:
    async with WorkflowRunner(gate_flow(approvers=["a", "b"], quorum=2), store=store) as runner:
        handle, approval = await parked(runner)

        def legacy(rec: RunRecord, now: float) -> Change:
            p = rec.pending
            old = {
                "kind": "human_approval",
                "approvers": ["a", "b"],
                "quorum": 2,
                "timeout": None,
                "prompt": "Ship?",
                "context": None,
                "workflow": p["workflow"],
                "step": p["step"],
                "visit": p["visit"],
                "target": "Done",
                "on_reject": "Ask",
                "on_timeout": None,
                "since": p["since"],
                "deadline": None,
                "approvals": ["a"],  # the votes, as names
            }
            return Change(dataclasses.replace(rec, pending=old))

        await store.update(handle.run_id, legacy)
        info = await handle.info()
        assert info.pending is not None
        assert (info.pending.id, info.pending.kind, info.pending.votes) == (approval.id, "gate", ("a",))
        assert info.pending.approvers == ("a", "b") and info.pending.prompt == "Ship?"
        with pytest.raises(InvalidStateError, match="ap_other"):
            await runner.approve(handle.run_id, by="b", approval="ap_other")
        result = await (await runner.approve(handle.run_id, by="b", approval=approval.id)).result()
        decisions = (await handle.info()).decisions
    assert result.output == "b" and [d.approval for d in decisions] == [approval.id]


# -- forms --------------------------------------------------------------------------------


def form_flow(seen: list[Any], name: str = "Formed") -> Workflow:
    def ask(ctx):
        return Wait(HumanApproval(approvers=["alice"], prompt="Title and risk?", form=Review), "Done")

    def done(ctx):
        seen.append(ctx.decision.data)
        return Next(END, output=ctx.decision.data.title)

    return Workflow(name).flow({START: ask, "Done": done})


async def test_form_data_is_validated_and_typed_for_the_next_step(store: Store) -> None:
    seen: list[Any] = []
    async with WorkflowRunner(form_flow(seen), store=store) as runner:
        handle, approval = await parked(runner)
        assert approval.form == Review.model_json_schema()
        before = await store.get(handle.run_id)
        assert before is not None
        with pytest.raises(InvalidInputError, match=rf"run {handle.run_id}, step '__start__'.*'risk'") as err:
            await handle.approve(by="alice", data={"title": "v2", "risk": 9})
        assert approval.id in str(err.value) and err.value.errors[0]["loc"] == ("risk",)
        with pytest.raises(InvalidInputError, match="'title'"):
            await handle.approve(by="alice", data={"risk": 1})
        await unchanged(store, handle.run_id, before)
        result = await (await handle.approve(by="alice", data={"title": "v2", "risk": "2"})).result()
    assert result.output == "v2"
    assert seen == [Review(title="v2", risk=2)] and type(seen[0]) is Review


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
async def test_form_data_is_typed_after_a_reload_in_another_runner(
    make_store: StoreFactory, kind: str
) -> None:
    seen: list[Any] = []
    async with WorkflowRunner(form_flow(seen), store=make_store(kind)) as first:
        handle, approval = await parked(first)
    # Another runner on a store of its own (as another process would be) decides and goes on.
    async with WorkflowRunner(form_flow(seen), store=make_store(kind)) as second:
        info = await (await second.attach(handle.run_id)).info()
        assert info.pending == approval and info.pending.form == Review.model_json_schema()
        decided = await second.approve(
            handle.run_id, by="alice", approval=approval.id, data=Review(title="t", risk=0)
        )
        result = await decided.result()
        decisions = (await decided.info()).decisions
    assert result.output == "t" and seen == [Review(title="t", risk=0)] and type(seen[0]) is Review
    assert decisions[0].data == {"title": "t", "risk": 0}  # stored (and listed) as JSON


REVIEW_GATE = HumanApproval(approvers=["alice"], form=Review)
GATES = {"default": REVIEW_GATE}


async def test_a_form_is_found_through_a_gate_named_in_the_step_or_declared() -> None:
    seen: list[Any] = []

    def done(ctx):
        seen.append(ctx.decision.data)
        return END

    by_name = Workflow("ByName").flow({START: lambda ctx: Wait(REVIEW_GATE, "Done"), "Done": done})
    # The code names only a dict of gates: the form is declared on the step.
    declared = Workflow("Declared").flow(
        {START: step(lambda ctx: Wait(GATES[ctx.input or "default"], "Done"), form=Review), "Done": done}
    )
    unknown = Workflow("Unknown").flow({START: lambda ctx: Wait(GATES["default"], "Done"), "Done": done})
    assert by_name.compile().forms == {START: (Review,)} == declared.compile().forms
    assert unknown.compile().forms == {}
    for wf in (by_name, declared, unknown):
        async with WorkflowRunner(wf) as runner:
            handle, _ = await parked(runner)
            await (await handle.approve(by="alice", data={"title": "x", "risk": 1})).result()
    assert seen[:2] == [Review(title="x", risk=1)] * 2
    assert seen[2] == {"title": "x", "risk": 1}  # no model known: JSON as given


async def test_an_imperative_gate_gives_its_form_typed(store: Store) -> None:
    seen: list[Any] = []

    async def main(ctx):
        decision = await ctx.wait(HumanApproval(approvers=["alice"], form=Review))
        seen.append(decision.data)
        return decision.data.title

    async with WorkflowRunner(Workflow("ImperativeForm").execute(main), store=store) as runner:
        handle, approval = await parked(runner)
        with pytest.raises(InvalidInputError, match="'risk'"):
            await handle.approve(by="alice", data={"title": "a", "risk": -1})
        result = await (
            await handle.approve(by="alice", approval=approval.id, data={"title": "a", "risk": 3})
        ).result()
    assert result.output == "a" and seen == [Review(title="a", risk=3)]


# -- listing ------------------------------------------------------------------------------


def two_workflows() -> tuple[Workflow, Workflow]:
    def ask(approvers: list[str]):
        return lambda ctx: Wait(HumanApproval(approvers=approvers, prompt=f"ok, {approvers[0]}?"), "Done")

    def done(ctx):
        return END

    a = Workflow("ListA").flow({START: ask(["alice", "bob"]), "Done": done})
    b = Workflow("ListB").flow({START: ask(["carol", "alice"]), "Done": done})
    return a, b


async def test_runner_lists_pending_approvals_across_workflows(store: Store) -> None:
    flow_a, flow_b = two_workflows()
    async with WorkflowRunner(flow_a, store=store) as a, WorkflowRunner(flow_b, store=store) as b:
        made = [await parked(runner) for runner in (a, b, a, b, a)]  # created in this order
        newest_first = [approval for _, approval in reversed(made)]
        listed = await b.approvals()
        assert listed == newest_first and all(isinstance(x, Approval) for x in listed)
        assert await a.approvals(workflow="ListB") == [x for x in newest_first if x.workflow == "ListB"]
        assert await a.approvals(approver="bob") == [x for x in newest_first if x.workflow == "ListA"]
        assert await a.approvals(approver="alice", workflow="ListA", kind="gate") == await a.approvals(
            approver="bob"
        )
        assert await a.approvals(kind="tool_call") == [] and await a.approvals(approver="mallory") == []
        pages, after = [], None
        while page := await a.approvals(limit=2, after=after):
            pages.append(page)
            after = page[-1].id
        assert [len(p) for p in pages] == [2, 2, 1] and [x for p in pages for x in p] == newest_first
        # A reviewer decides what the first page showed; the next page starts where it ended.
        first = await a.approvals(limit=2)
        for approval in first:
            runner = a if approval.workflow == "ListA" else b
            await (await runner.approve(approval.run_id, by="alice", approval=approval.id)).result()
        assert await a.approvals(limit=2, after=first[-1].id) == newest_first[2:4]
        assert await a.approvals() == newest_first[2:]
        # Deleted and stopped runs leave the listing too.
        await a.delete(newest_first[2].run_id)
        await (await b.attach(newest_first[3].run_id)).stop()
        assert await b.approvals() == newest_first[4:]


async def test_an_expired_gate_leaves_the_listing(store: Store) -> None:
    async with (
        WorkflowRunner(gate_flow(timeout=1.0), store=store) as runner,
        WorkflowRunner(gate_flow("Kept"), store=store) as other,
    ):
        _, kept = await parked(other)
        handle, approval = await parked(runner)  # the one that expires: listed at once, before it does
        assert await runner.approvals() == [approval, kept]
        await wait_status(handle, RunStatus.EXPIRED)
        assert await runner.approvals() == [kept]
