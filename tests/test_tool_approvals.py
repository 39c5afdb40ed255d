"""Approvals of tool calls inside flows: a call that needs approval parks the run (no task
held), and approve / reject / respond / an edit / a timeout each tell the model the right
thing without any model call or tool running twice; a call cut off by a stopping process
parks on a ``tool_outcome`` approval."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from agentflow import (
    END,
    START,
    Agent,
    HumanApproval,
    Next,
    Parallel,
    RunStatus,
    ToolContext,
    Workflow,
    WorkflowRunner,
    tool,
)
from agentflow.errors import InvalidInputError, InvalidStateError, NotAuthorizedError
from agentflow.stores.contract import Store
from agentflow.testing import ScriptedProvider, call

RAN: Counter[str] = Counter()
KEYS: list[str] = []


@pytest.fixture(autouse=True)
def _fresh() -> None:
    RAN.clear()
    KEYS.clear()


@tool
async def search(repo: str) -> list[str]:
    """Open blockers of a repository."""
    RAN["search"] += 1
    return []


@tool(approval=HumanApproval(approvers=["ops-lead"], prompt="Deploy this version?"))
async def deploy(ctx: ToolContext, version: str) -> dict[str, Any]:
    """Deploy a version to production."""
    RAN["deploy"] += 1
    KEYS.append(ctx.idempotency_key)
    assert ctx.decision is not None and ctx.decision.by == "ops-lead"
    return {"deployed": version}


def _workflow(model: ScriptedProvider, *tools: Any, name: str = "Ship", **agent: Any) -> Workflow:
    async def ship(ctx: Any) -> Next:
        async with ctx.agents.ops as ops:
            run = await ops.run("Ship 1.2 unless blocked")
        calls = [(c.name, c.arguments, c.result, c.error, c.edited) for c in run.tool_calls]
        return Next(END, output={"text": run.text, "calls": calls, "turns": run.turns})

    return (
        Workflow(name)
        .flow({START: lambda ctx: "Ship", "Ship": ship})
        .agents({"ops": Agent(provider=model, model="m", tools=list(tools or (search, deploy)), **agent)})
    )


async def _parked(runner: WorkflowRunner) -> tuple[str, Any]:
    handle = await runner.run()
    info = await handle.wait_for(RunStatus.WAITING, timeout=10)
    assert info.status == RunStatus.WAITING, info
    return handle.run_id, info


async def test_a_call_that_needs_approval_parks_the_run_and_runs_once_approved(store: Store) -> None:
    model = ScriptedProvider(
        [[call("search", repo="acme/app"), call("deploy", version="1.2")], "Shipped 1.2."]
    )
    async with WorkflowRunner(_workflow(model), store=store) as runner:
        run_id, info = await _parked(runner)
        (approval,) = info.approvals
        assert (approval.kind, approval.tool, approval.arguments, approval.agent) == (
            "tool_call",
            "deploy",
            {"version": "1.2"},
            "ops",
        )
        assert approval.approvers == ("ops-lead",) and approval.prompt == "Deploy this version?"
        assert approval.form is not None and "version" in approval.form["properties"]
        # the sibling call that needs no approval ran, and was journaled, before the park
        assert RAN == {"search": 1} and len(model.requests) == 1
        assert run_id not in runner.supervisor.local  # parked: no task, nothing held
        listed = await runner.approvals(approver="ops-lead")
        assert [a.id for a in listed] == [approval.id]
        await runner.approve(run_id, by="ops-lead", comment="go")
        result = await (await runner.attach(run_id)).result(timeout=10)
        # The step ran again: the first turn came from the journal, search did not run again.
        assert RAN == {"search": 1, "deploy": 1} and len(model.requests) == 2
        assert result.output["text"] == "Shipped 1.2." and result.output["turns"] == 2
        assert result.output["calls"][1] == ["deploy", {"version": "1.2"}, {"deployed": "1.2"}, None, False]
        assert model.tool_results[1][1][1] == '{"deployed": "1.2"}'
        kinds = [e.kind async for e in (await runner.attach(run_id)).events()]
        assert kinds.count("tool_completed") == 2 and kinds.count("waiting") == 1
        info = await (await runner.attach(run_id)).info()
        (decision,) = info.decisions
        assert decision.approval == approval.id and decision.by == "ops-lead"
        with pytest.raises(InvalidStateError, match="decided already"):
            await runner.approve(run_id, by="ops-lead", approval=approval.id)


async def test_a_rejection_gives_the_model_the_reason_and_the_tool_never_runs() -> None:
    model = ScriptedProvider([call("deploy", version="1.2"), "Not shipping: the freeze."])
    async with WorkflowRunner(_workflow(model)) as runner:
        run_id, _ = await _parked(runner)
        with pytest.raises(NotAuthorizedError, match="'mallory' may not decide"):
            await runner.reject(run_id, by="mallory", reason="no")
        await runner.reject(run_id, by="ops-lead", reason="release freeze until Monday")
        result = await (await runner.attach(run_id)).result(timeout=10)
    assert RAN["deploy"] == 0 and result.output["text"] == "Not shipping: the freeze."
    ((_, content, is_error),) = model.tool_results[1]
    assert is_error and "ops-lead rejected this call" in content and "release freeze until Monday" in content


async def test_respond_gives_the_model_a_result_instead_of_running_the_tool() -> None:
    model = ScriptedProvider([call("deploy", version="1.2"), "Done."])
    async with WorkflowRunner(_workflow(model)) as runner:
        run_id, _ = await _parked(runner)
        await runner.respond(run_id, by="ops-lead", result={"deployed": "1.2", "by": "hand"})
        result = await (await runner.attach(run_id)).result(timeout=10)
        (decision,) = (await (await runner.attach(run_id)).info()).decisions
    assert (
        RAN["deploy"] == 0
        and decision.responded
        and decision.data == {"result": {"deployed": "1.2", "by": "hand"}}
    )
    assert result.output["calls"][0][2] == {"deployed": "1.2", "by": "hand"}
    assert model.tool_results[1] == [("call_1", '{"deployed": "1.2", "by": "hand"}', False)]


async def test_an_edited_call_is_validated_runs_with_the_edit_and_the_model_is_told() -> None:
    model = ScriptedProvider([call("deploy", version="1.2"), "Shipped 1.2.1."])
    async with WorkflowRunner(_workflow(model)) as runner:
        run_id, info = await _parked(runner)
        with pytest.raises(InvalidInputError, match="version"):
            await runner.approve(run_id, by="ops-lead", data={"arguments": {"version": 121}})
        with pytest.raises(InvalidInputError, match="arguments"):
            await runner.approve(run_id, by="ops-lead", data={"version": "1.2.1"})
        still = await (await runner.attach(run_id)).info()
        assert still.status == RunStatus.WAITING and still.approvals == info.approvals and not still.decisions
        await runner.approve(run_id, by="ops-lead", data={"arguments": {"version": "1.2.1"}})
        result = await (await runner.attach(run_id)).result(timeout=10)
    assert result.output["calls"][0] == ["deploy", {"version": "1.2.1"}, {"deployed": "1.2.1"}, None, True]
    ((_, content, _),) = model.tool_results[1]
    assert "edited this call's arguments" in content and '"1.2.1"' in content


async def test_a_quorum_of_reviewers_and_two_approvals_in_one_turn(store: Store) -> None:
    @tool(approval=HumanApproval(approvers=["ana", "ben", "cy"], quorum=2))
    async def migrate(db: str) -> str:
        """Migrate a database."""
        RAN[f"migrate {db}"] += 1
        return f"{db} migrated"

    model = ScriptedProvider([[call("migrate", db="users"), call("migrate", db="orders")], "Both done."])
    async with WorkflowRunner(_workflow(model, migrate), store=store) as runner:
        run_id, info = await _parked(runner)
        first, second = info.approvals
        assert {a.id for a in await runner.approvals(kind="tool_call")} == {first.id, second.id}
        assert (first.arguments, second.arguments) == ({"db": "users"}, {"db": "orders"})
        with pytest.raises(InvalidStateError, match="say which one"):
            await runner.approve(run_id, by="ana")
        await runner.approve(run_id, by="ana", approval=first.id)
        info = await (await runner.attach(run_id)).info()
        assert info.status == RunStatus.WAITING and info.approvals[0].votes == ("ana",)
        await runner.approve(run_id, by="ben", approval=first.id)
        assert [a.id for a in await runner.approvals(approver="cy")] == [second.id]  # the index follows
        await runner.reject(run_id, by="cy", approval=second.id, reason="orders is busy")
        result = await (await runner.attach(run_id)).result(timeout=10)
    assert RAN == {"migrate users": 1}
    assert [c[3] is None for c in result.output["calls"]] == [True, False]


async def test_no_decision_in_time_counts_as_a_rejection_told_to_the_model() -> None:
    @tool(approval=HumanApproval(approvers=["ops-lead"], timeout=0.3))
    async def page(team: str) -> str:
        """Page a team."""
        RAN["page"] += 1
        return "paged"

    model = ScriptedProvider([call("page", team="db"), "Nobody answered."])
    async with WorkflowRunner(_workflow(model, page)) as runner:
        run_id, _ = await _parked(runner)
        result = await (await runner.attach(run_id)).result(timeout=10)
        (decision,) = (await (await runner.attach(run_id)).info()).decisions
    assert RAN["page"] == 0 and decision.timed_out and result.output["text"] == "Nobody answered."
    assert "in time" in model.tool_results[1][0][1]


async def test_a_call_cut_off_by_a_stopping_process_parks_on_its_unknown_outcome(tmp_path: Any) -> None:
    started = asyncio.Event()

    @tool(idempotent=False)
    async def charge(ctx: ToolContext, cents: int) -> str:
        """Charge a card."""
        RAN["charge"] += 1
        KEYS.append(ctx.idempotency_key)
        started.set()
        if RAN["charge"] == 1:
            await asyncio.sleep(60)  # the process closes while it runs
        return f"charged {cents} (attempt {ctx.attempt})"

    def wf(model: ScriptedProvider) -> Workflow:
        return (
            _workflow(model, charge, name="Bill")
            .operators(["billing-oncall"])
            .persistence(store="sqlite", path=str(tmp_path / "runs.db"))
        )

    first = ScriptedProvider([call("charge", cents=500)])
    runner = WorkflowRunner(wf(first))
    handle = await runner.run()
    await asyncio.wait_for(started.wait(), 10)
    await runner.close()  # the call's reply (its intent) is journaled, its result is not

    model = ScriptedProvider(["Charged once."])
    async with WorkflowRunner(wf(model)) as runner:
        await runner.recover()
        info = await (await runner.attach(handle.run_id)).wait_for(RunStatus.WAITING, timeout=10)
        (approval,) = info.approvals
        assert (approval.kind, approval.tool, approval.approvers) == (
            "tool_outcome",
            "charge",
            ("billing-oncall",),
        )
        assert approval.context["idempotency_key"] == KEYS[0] and RAN["charge"] == 1
        with pytest.raises(InvalidInputError, match="takes no data"):
            await runner.approve(handle.run_id, by="billing-oncall", data={"arguments": {"cents": 5}})
        await runner.approve(handle.run_id, by="billing-oncall", comment="the processor has no record")
        result = await (await runner.attach(handle.run_id)).result(timeout=10)
    # run once more, on the decision, with the same idempotency key; the model was not asked again
    assert RAN["charge"] == 2 and KEYS[0] == KEYS[1] and len(model.requests) == 1
    assert result.output["calls"][0][2] == "charged 500 (attempt 2)"


async def test_a_call_in_a_parallel_branch_cannot_park_and_says_so() -> None:
    model = ScriptedProvider([call("deploy", version="1.2")])

    async def branch(ctx: Any) -> str:
        async with ctx.agents.ops as ops:
            await ops.run("go")
        return "x"

    wf = (
        Workflow("Fan")
        .flow({START: lambda ctx: Parallel([branch], target=END)})
        .agents({"ops": Agent(provider=model, model="m", tools=[deploy])})
    )
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run()
        info = await handle.wait_for(RunStatus.FAILED, timeout=10)
    assert info.status == RunStatus.FAILED and "inside a parallel branch" in (info.error or {}).get(
        "message", ""
    )
    assert RAN["deploy"] == 0


async def test_an_imperative_workflow_parks_on_a_tool_call_and_replays_to_it() -> None:
    model = ScriptedProvider([call("deploy", version="3.0"), "Deployed 3.0."])
    steps: list[str] = []

    def prepare() -> str:
        steps.append("prepare")
        return "ready"

    async def main(ctx: Any) -> dict[str, Any]:
        await ctx.step("prepare", prepare)
        async with ctx.agents.ops as ops:
            run = await ops.run("deploy 3.0")
        return {"text": run.text}

    wf = (
        Workflow("Imperative").execute(main).agents({"ops": Agent(provider=model, model="m", tools=[deploy])})
    )
    async with WorkflowRunner(wf) as runner:
        run_id, info = await _parked(runner)
        assert [a.kind for a in info.approvals] == ["tool_call"]
        await runner.approve(run_id, by="ops-lead")
        result = await (await runner.attach(run_id)).result(timeout=10)
    assert result.output == {"text": "Deployed 3.0."} and RAN["deploy"] == 1
    assert steps == ["prepare"] and len(model.requests) == 2  # replayed, not re-run


async def test_an_unknown_outcome_with_no_approvers_or_operators_is_anyones_to_decide(tmp_path: Any) -> None:
    started = asyncio.Event()

    @tool
    async def send_email(to: str) -> str:
        """Send an e-mail (not idempotent)."""
        RAN["send"] += 1
        started.set()
        await asyncio.sleep(60)
        return "sent"

    def wf(model: ScriptedProvider) -> Workflow:
        return _workflow(model, send_email, name="Mail").persistence(
            store="sqlite", path=str(tmp_path / "m.db")
        )

    runner = WorkflowRunner(wf(ScriptedProvider([call("send_email", to="ana@example.com")])))
    handle = await runner.run()
    await asyncio.wait_for(started.wait(), 10)
    await runner.close()
    model = ScriptedProvider(["It did not go out; I will tell the user."])
    async with WorkflowRunner(wf(model)) as runner:
        await runner.recover()
        info = await (await runner.attach(handle.run_id)).wait_for(RunStatus.WAITING, timeout=10)
        assert [(a.kind, a.approvers) for a in info.approvals] == [("tool_outcome", ())]
        await runner.reject(handle.run_id, by="whoever-is-on-call", reason="bounced")
        result = await (await runner.attach(handle.run_id)).result(timeout=10)
        (decision,) = (await (await runner.attach(handle.run_id)).info()).decisions
    assert RAN["send"] == 1 and decision.by == "whoever-is-on-call"
    assert (
        result.output["calls"][0][3]
        == "ToolFailed: whoever-is-on-call reported that the call failed: bounced"
    )
    assert model.tool_results[0][0][2] is True


async def test_the_step_that_parked_reports_the_usage_of_all_its_turns_once() -> None:
    model = ScriptedProvider([call("deploy", version="1.2"), "Shipped."])
    async with WorkflowRunner(_workflow(model)) as runner:
        run_id, _ = await _parked(runner)
        await runner.approve(run_id, by="ops-lead")
        handle = await runner.attach(run_id)
        await handle.result(timeout=10)
        info = await handle.info()
        done = [e async for e in handle.events() if e.kind == "step_completed" and e.step == "Ship"]
    (event,) = done
    assert info.usage.total_tokens > 0
    assert (
        event.data["usage"]["input_tokens"] + event.data["usage"]["output_tokens"] == info.usage.total_tokens
    )
