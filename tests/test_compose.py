"""Composition (SPEC §12): a step runs another workflow as a child run of its own.

Every test goes through the public API, on each store kind where the store matters.
"""

from __future__ import annotations

import asyncio

import pytest
from helpers import wait_status, wait_until
from pydantic import BaseModel

from agentflow import (
    END,
    START,
    Agent,
    BranchError,
    HumanApproval,
    Next,
    Parallel,
    Run,
    RunFailedError,
    RunRejectedError,
    RunStatus,
    StepLimitExceeded,
    Wait,
    Workflow,
    WorkflowDefinitionError,
    WorkflowRunner,
)
from agentflow.testing import ScriptedProvider


class BuildIn(BaseModel):
    version: str


class BuildOut(BaseModel):
    artifact: str
    size: int


async def _build(ctx):
    if ctx.input.version == "bad":
        raise ValueError("compiler exploded")
    return Next(END, output={"artifact": f"app-{ctx.input.version}.tar", "size": len(ctx.input.version)})


build = (
    Workflow("Build").input(BuildIn).output(BuildOut).flow({START: lambda ctx: "Compile", "Compile": _build})
)


def _release(ctx):
    return Run(build, {"version": ctx.input["version"]}, "Ship", on_fail="Broken")


def _ship(ctx):
    out = ctx.step_results[START]
    return Next(END, output={"shipped": out.artifact, "typed": type(out).__name__})


def _broken(ctx):
    err = ctx.step_results[START]
    return Next(END, output={"broken": err.name, "type": err.error_type, "message": err.message})


release = Workflow("Release").flow({START: _release, "Ship": _ship, "Broken": _broken})


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis", "postgres"])
async def test_the_child_output_is_the_step_result_typed_and_the_child_names_its_parent(make_store, kind):
    store = make_store(kind)
    async with WorkflowRunner(release, store=store) as runner:
        handle = await runner.run({"version": "1.2"}, run_id="rel-1")
        result = await handle.result(timeout=10)
        assert result.output == {"shipped": "app-1.2.tar", "typed": "BuildOut"}
        info = await handle.info()
        assert info.children == ("rel-1/__start__.1",)
        child = await runner.attach(info.children[0])
        cinfo = await child.info()
        assert cinfo.workflow == "Build" and cinfo.status == RunStatus.COMPLETED
        assert cinfo.parent is not None and (cinfo.parent.run_id, cinfo.parent.step) == ("rel-1", START)
        assert (await child.result()).output == BuildOut(artifact="app-1.2.tar", size=3)
    if kind != "memory":
        # Another process reading the store sees the step result typed by the child's output model.
        async with WorkflowRunner(release, store=make_store(kind)) as again:
            res = await (await again.attach("rel-1")).result()
            assert res.step_results[START] == BuildOut(artifact="app-1.2.tar", size=3)


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis", "postgres"])
async def test_a_failed_child_fails_the_parent_naming_both_runs_and_the_childs_step(make_store, kind):
    plain = Workflow("Plain").flow(
        {START: lambda ctx: Run(build, {"version": "bad"}, "Done"), "Done": lambda ctx: END}
    )
    async with WorkflowRunner(plain, store=make_store(kind)) as runner:
        handle = await runner.run(run_id="p-1")
        with pytest.raises(RunFailedError) as err:
            await handle.result(timeout=10)
        text = str(err.value)
        assert err.value.run_id == "p-1" and err.value.step == START
        assert err.value.error_type == "RunFailedError"
        assert "p-1/__start__.1" in text and "'Compile'" in text and "compiler exploded" in text


async def test_on_fail_routes_a_failed_child_with_a_branch_error():
    async with WorkflowRunner(release) as runner:
        result = await (await runner.run({"version": "bad"}, run_id="r")).result(timeout=5)
    assert result.output["broken"] == "r/__start__.1"
    assert result.output["type"] == "RunFailedError" and "compiler exploded" in result.output["message"]


gated = (
    Workflow("Gated")
    .input(BuildIn)
    .output(BuildOut)
    .flow(
        {
            START: lambda ctx: Wait(HumanApproval(approvers=["qa"]), "Go"),
            "Go": lambda ctx: Next(END, output={"artifact": ctx.input.version, "size": 1}),
        }
    )
)


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis", "postgres"])
async def test_a_rejected_child_ends_the_parent_rejected_unless_on_reject(make_store, kind):
    strict = Workflow("Strict").flow(
        {START: lambda ctx: Run(gated, {"version": "v"}, "Done"), "Done": lambda ctx: END}
    )
    lenient = Workflow("Lenient").flow(
        {
            START: lambda ctx: Run(gated, {"version": "v"}, "Done", on_reject="Skipped"),
            "Done": lambda ctx: END,
            "Skipped": lambda ctx: Next(END, output={"skipped": ctx.step_results[START].error_type}),
        }
    )
    store = make_store(kind)
    async with WorkflowRunner(strict, store=store) as runner:
        handle = await runner.run(run_id="s")
        await wait_status(handle, RunStatus.WAITING)
        await wait_status(await runner.attach("s/__start__.1"), RunStatus.WAITING)
        await runner.reject("s/__start__.1", by="qa", reason="flaky tests")
        with pytest.raises(RunRejectedError) as err:
            await handle.result(timeout=10)
        assert err.value.run_id == "s" and "flaky tests" in str(err.value)
    async with WorkflowRunner(lenient, store=store) as runner:
        handle = await runner.run(run_id="l")
        await wait_status(handle, RunStatus.WAITING)
        await wait_status(await runner.attach("l/__start__.1"), RunStatus.WAITING)
        await runner.reject("l/__start__.1", by="qa", reason="no")
        assert (await handle.result(timeout=10)).output == {"skipped": "RunRejectedError"}


async def test_a_workflow_neither_found_nor_declared_fails_the_step_naming_it():
    other = Workflow("Other").flow({START: lambda ctx: END})

    def pick(ctx):
        return Run(other, None, END)

    wf = Workflow("Picker").flow({START: pick})
    assert "Other" in wf.compile().children  # found in the step's code (a closure name)

    registry = {"other": other}
    dynamic = Workflow("Dynamic").flow({START: lambda ctx: Run(registry[ctx.input], None, END)})
    async with WorkflowRunner(dynamic) as runner:
        with pytest.raises(RunFailedError) as err:
            await (await runner.run("other")).result(timeout=5)
    assert err.value.error_type == "WorkflowDefinitionError" and "'Other'" in str(err.value)
    assert ".children(" in str(err.value)

    async with WorkflowRunner(dynamic.children(other)) as runner:
        result = await (await runner.run("other")).result(timeout=5)
    assert result.status == RunStatus.COMPLETED


def test_definition_mistakes_of_run_and_children():
    with pytest.raises(WorkflowDefinitionError, match="takes a Workflow"):
        Run("Build", {}, "x")  # type: ignore[arg-type]
    with pytest.raises(WorkflowDefinitionError, match="takes Workflows"):
        Workflow("W").children("Build")  # type: ignore[arg-type]
    twin = Workflow("Build").flow({START: lambda ctx: END})
    with pytest.raises(WorkflowDefinitionError, match="named 'Build'"):
        Workflow("Twins").children(build, twin).flow({START: lambda ctx: END}).compile()
    broken_child = Workflow("NoSteps")
    with pytest.raises(WorkflowDefinitionError, match="NoSteps"):
        WorkflowRunner(Workflow("P").children(broken_child).flow({START: lambda ctx: END}))


class Report(BaseModel):
    artifacts: list[str] = []


def _one(ctx):
    return Run(gated, {"version": ctx.item})


def _fan(ctx):
    return Parallel.map(_one, ctx.input, "Join")


def _join(ctx):
    outs = ctx.step_results["_one"]
    return Next(
        END,
        output={"artifacts": [o.artifact for o in outs], "types": sorted({type(o).__name__ for o in outs})},
    )


fan = Workflow("Fan").flow({START: _fan, "Join": _join})


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis", "postgres"])
async def test_parallel_map_over_run_fans_out_child_runs_each_with_its_gate(make_store, kind):
    store = make_store(kind)
    async with WorkflowRunner(fan, store=store) as runner:
        handle = await runner.run(["a", "b", "c"], run_id="f")
        info = await wait_status(handle, RunStatus.WAITING)
        assert info.children == ("f/__start__.1.0", "f/__start__.1.1", "f/__start__.1.2")
        for cid in info.children:
            await wait_status(await runner.attach(cid), RunStatus.WAITING)
        for cid in reversed(info.children):
            assert (await handle.info()).status == RunStatus.WAITING  # until the last child ends
            await runner.approve(cid, by="qa")
        result = await handle.result(timeout=10)
        assert result.output == {"artifacts": ["a", "b", "c"], "types": ["BuildOut"]}
        assert (await runner.attach("f/__start__.1.1")).run_id == "f/__start__.1.1"
        parents = [(await (await runner.attach(i)).info()).parent for i in info.children]
        assert [(p.run_id, p.step) for p in parents if p is not None] == [("f", START)] * 3
    if kind != "memory":
        async with WorkflowRunner(fan, store=make_store(kind)) as again:
            res = await (await again.attach("f")).result()
            assert [type(o).__name__ for o in res.step_results["_one"]] == ["BuildOut"] * 3


async def test_collect_keeps_failed_children_as_branch_errors():
    def one(ctx):
        return Run(build, {"version": ctx.item})

    wf = Workflow("Collect").flow(
        {
            START: lambda ctx: Parallel.map(one, ["1.0", "bad", "2.0"], "Join", on_error="collect"),
            "Join": lambda ctx: Next(END, output=[type(r).__name__ for r in ctx.step_results["one"]]),
        }
    )
    async with WorkflowRunner(wf) as runner:
        result = await (await runner.run()).result(timeout=5)
    assert result.output == ["BuildOut", "BranchError", "BuildOut"]
    assert isinstance(result.step_results["one"][1], BranchError)


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis", "postgres"])
async def test_stop_and_pause_of_the_parent_reach_its_children(make_store, kind):
    store = make_store(kind)
    async with WorkflowRunner(fan, store=store) as runner:
        handle = await runner.run(["a", "b"], run_id="sp")
        await wait_status(handle, RunStatus.WAITING)
        kids = [await runner.attach(c) for c in (await handle.info()).children]
        for k in kids:
            await wait_status(k, RunStatus.WAITING)
        await handle.pause()
        # A paused child does not go on when decided: it parks paused where the gate sends it.
        await runner.approve(kids[0].run_id, by="qa")
        assert (await kids[0].info()).status == RunStatus.PAUSED
        assert (await handle.info()).status == RunStatus.WAITING
        await handle.resume()
        await wait_status(kids[0], RunStatus.COMPLETED)
        await handle.stop()
        assert (await handle.info()).status == RunStatus.STOPPED
        assert (await kids[1].info()).status == RunStatus.STOPPED
        assert (await kids[0].info()).status == RunStatus.COMPLETED


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
async def test_a_child_owned_by_another_process_is_stopped_through_the_store(make_store, kind):
    hold = asyncio.Event()

    async def slow(ctx):
        await hold.wait()
        return END

    worker = Workflow("Worker").flow(
        {START: lambda ctx: Wait(HumanApproval(approvers=["qa"]), "Slow"), "Slow": slow}
    )
    boss = Workflow("Boss").flow({START: lambda ctx: Run(worker, None, END)})
    async with (
        WorkflowRunner(boss, store=make_store(kind), lease_ttl=2) as a,
        WorkflowRunner(boss, store=make_store(kind), lease_ttl=2) as b,
    ):
        handle = await a.run(run_id="boss")
        await wait_status(handle, RunStatus.WAITING)
        child = await a.attach("boss/__start__.1")
        await wait_status(child, RunStatus.WAITING)
        await b.approve(child.run_id, by="qa")  # the child goes on in b, and blocks there
        await wait_until(lambda: "boss/__start__.1" in b.supervisor.local, what="the child in b")
        await handle.stop()  # from a
        assert (await child.info()).status == RunStatus.STOPPED
        assert (await handle.info()).status == RunStatus.STOPPED


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
async def test_the_parent_goes_on_once_in_the_process_that_ended_the_child(make_store, kind):
    ran: list[str] = []

    def after(ctx):
        ran.append(ctx.run_id)
        return END

    parent = Workflow("Once").flow({START: lambda ctx: Run(gated, {"version": "x"}, "After"), "After": after})
    async with (
        WorkflowRunner(parent, store=make_store(kind)) as a,
        WorkflowRunner(parent, store=make_store(kind)) as b,
    ):
        handle = await a.run(run_id="once")
        await wait_status(handle, RunStatus.WAITING)
        child = await a.attach("once/__start__.1")
        await wait_status(child, RunStatus.WAITING)
        await b.approve(child.run_id, by="qa")
        await wait_status(handle, RunStatus.COMPLETED, timeout=10)
        # Both processes check on the parent (a at its check-back, b at once); it went on once.
        await b.supervisor.check_children("once")
        await a.supervisor.check_children("once")
    assert ran == ["once"]


async def test_usage_of_the_child_adds_to_the_parent():
    provider = ScriptedProvider(["four words are here", "two words"])

    async def ask(ctx):
        async with ctx.agents.writer as w:
            reply = await w.send("hello there")
        return Next(END, output={"artifact": reply.text, "size": reply.usage.total_tokens})

    talker = (
        Workflow("Talker")
        .output(BuildOut)
        .flow({START: ask})
        .agents({"writer": Agent(provider=provider, model="m")})
    )

    async def own(ctx):
        async with ctx.agents.writer as w:
            await w.send("hi")
        return Run(talker, None, END)

    parent = Workflow("Talks").flow({START: own}).agents({"writer": Agent(provider=provider, model="m")})
    async with WorkflowRunner(parent) as runner:
        handle = await runner.run(run_id="u")
        await handle.result(timeout=5)
        parent_usage = (await handle.info()).usage
        child_usage = (await (await runner.attach("u/__start__.1")).info()).usage
    assert child_usage.total_tokens > 0
    own_usage = parent_usage.total_tokens - child_usage.total_tokens
    assert own_usage > 0  # the parent's own call, plus the child's


async def test_imperative_ctx_run_returns_the_typed_output_and_raises_a_failure():
    async def main(ctx):
        good = await ctx.run(build, {"version": "3.1"})
        try:
            await ctx.run(build, {"version": "bad"})
        except RunFailedError as exc:
            failed = exc.run_id
        return {"artifact": good.artifact, "typed": type(good).__name__, "failed": failed}

    wf = Workflow("Imperative").execute(main)
    async with WorkflowRunner(wf) as runner:
        result = await (await runner.run(run_id="i")).result(timeout=5)
    assert result.output == {"artifact": "app-3.1.tar", "typed": "BuildOut", "failed": "i/run:2.2"}


async def test_children_of_children_and_a_cycle_bounded_by_max_steps():
    leaf = (
        Workflow("Leaf")
        .output(BuildOut)
        .flow({START: lambda ctx: Next(END, output={"artifact": "leaf", "size": 1})})
    )
    mid = Workflow("Mid").output(BuildOut).flow({START: lambda ctx: Run(leaf, None, END)})
    top = Workflow("Top").flow(
        {
            START: lambda ctx: Run(mid, None, "Done"),
            "Done": lambda ctx: Next(END, output=ctx.step_results[START].artifact),
        }
    )
    async with WorkflowRunner(top) as runner:
        assert (await (await runner.run(run_id="t")).result(timeout=5)).output == "leaf"
        assert (await (await runner.attach("t/__start__.1/__start__.1")).info()).workflow == "Leaf"

    loop = Workflow("Loop").max_steps(5)
    loop.flow({START: lambda ctx: Run(loop, None, END)})
    async with WorkflowRunner(loop) as runner:
        with pytest.raises(RunFailedError) as err:
            await (await runner.run(run_id="c")).result(timeout=10)
    assert StepLimitExceeded.__name__ in str(err.value)


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis", "postgres"])
async def test_a_reviewer_of_the_parent_sees_and_decides_its_childrens_approvals(make_store, kind):
    async with WorkflowRunner(fan, store=make_store(kind)) as runner:
        handle = await runner.run(["a", "b"], run_id="rv")
        await wait_status(handle, RunStatus.WAITING)
        for cid in ("rv/__start__.1.0", "rv/__start__.1.1"):
            await wait_status(await runner.attach(cid), RunStatus.WAITING)
        info = await handle.info()
        assert [a.run_id for a in info.approvals] == ["rv/__start__.1.0", "rv/__start__.1.1"]
        assert info.pending == info.approvals[0] and list(info.approvals[0].approvers) == ["qa"]
        first, second = info.approvals
        await runner.approve("rv", by="qa", approval=second.id)  # the parent's id, a child's approval
        assert [a.id for a in (await handle.info()).approvals] == [first.id]
        await handle.approve(by="qa")  # one left: no id needed
        result = await handle.result(timeout=10)
        assert result.output["artifacts"] == ["a", "b"]


def test_mermaid_draws_where_a_child_step_goes():
    chart = release.mermaid()
    assert "__start__ -- child run ended --> s_Ship" in chart
    assert "__start__ -- child run failed --> s_Broken" in chart


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_imperative_child_result_is_typed_again_on_replay(make_store, kind):
    seen: list[str] = []

    async def main(ctx):
        built = await ctx.run(build, {"version": "9"})
        seen.append(type(built).__name__)
        decision = await ctx.wait(HumanApproval(approvers=["qa"]))
        return {"artifact": built.artifact, "approved": decision.approved}

    wf = Workflow("ImperativeReplay").execute(main)
    async with WorkflowRunner(wf, store=make_store(kind)) as runner:
        handle = await runner.run(run_id="ir")
        info = await wait_status(handle, RunStatus.WAITING)
        while not info.approvals:  # on SQLite it may wait on its child first, then at its gate
            await asyncio.sleep(0.01)
            info = await handle.info()
        assert info.children == ("ir/run:1.1",)
        await runner.approve("ir", by="qa")
        result = await handle.result(timeout=10)
    assert result.output == {"artifact": "app-9.tar", "approved": True}
    assert seen == ["BuildOut", "BuildOut"]  # the replay after the gate got it typed from the journal


async def test_stopping_a_parent_mid_fan_out_stops_the_children_it_already_started():
    hold = asyncio.Event()

    async def branch(ctx):
        if ctx.item == "slow":
            await hold.wait()  # a plain branch still running: the parent has not parked yet
            return "never"
        return Run(gated, {"version": ctx.item})

    wf = Workflow("Mixed").flow(
        {START: lambda ctx: Parallel.map(branch, ["a", "slow"], "Join"), "Join": lambda ctx: END}
    )
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run(run_id="m")
        for _ in range(500):
            if await runner.store.get("m/__start__.1.0") is not None:
                break
            await asyncio.sleep(0.01)
        child = await runner.attach("m/__start__.1.0")
        await wait_status(child, RunStatus.WAITING)
        assert (await handle.info()).status == RunStatus.RUNNING
        await handle.stop()
        assert (await handle.info()).children == ("m/__start__.1.0",)
        assert (await child.info()).status == RunStatus.STOPPED


async def test_bad_child_input_fails_the_step_naming_the_child_workflow_and_field():
    wf = Workflow("BadInput").flow({START: lambda ctx: Run(build, {"version": 3.5j}, END)})
    async with WorkflowRunner(wf) as runner:
        with pytest.raises(RunFailedError) as err:
            await (await runner.run(run_id="b")).result(timeout=5)
    assert err.value.step == START and err.value.error_type == "InvalidInputError"
    assert "'Build'" in str(err.value) and "version" in str(err.value)


async def test_run_without_a_target_ends_the_parent_with_the_childs_output():
    wf = Workflow("Delegates").output(BuildOut).flow({START: lambda ctx: Run(build, {"version": "7"})})
    async with WorkflowRunner(wf) as runner:
        result = await (await runner.run()).result(timeout=5)
    assert result.output == BuildOut(artifact="app-7.tar", size=1)


@pytest.mark.parametrize("kind", ["memory", "redis", "postgres"])
async def test_named_parallel_branches_mix_a_child_run_and_a_plain_branch(make_store, kind):
    def release_branch(ctx):
        return Run(gated, {"version": "r1"})

    def notes_branch(ctx):
        ctx.set_state(notes="written")
        return "notes"

    class Notes(BaseModel):
        notes: str = ""

    wf = (
        Workflow("Mix")
        .state(Notes)
        .flow(
            {
                START: lambda ctx: Parallel({"release": release_branch, "notes": notes_branch}, "Join"),
                "Join": lambda ctx: Next(
                    END,
                    output=[ctx.step_results["release"].artifact, ctx.step_results["notes"], ctx.state.notes],
                ),
            }
        )
    )
    async with WorkflowRunner(wf, store=make_store(kind)) as runner:
        handle = await runner.run(run_id="mix")
        await wait_status(handle, RunStatus.WAITING)
        await wait_status(await runner.attach("mix/__start__.1.0"), RunStatus.WAITING)
        await runner.approve("mix", by="qa")  # the one approval pending, a child's
        result = await handle.result(timeout=10)
    assert result.output == ["r1", "notes", "written"]


def test_a_step_that_only_names_a_workflow_keeps_its_own_output_untyped():
    def describe(ctx):
        return Next(END, output={"child": build.name})

    spec = Workflow("Names").flow({START: describe}).compile()
    assert "Build" in spec.children  # it may run it...
    assert START not in spec.output_types  # ...but its output is its own, not a BuildOut
    assert release.compile().output_types[START] is BuildOut


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
async def test_a_parent_whose_child_ended_in_a_process_not_serving_it_goes_on_through_its_timers(
    make_store, kind
):
    parent = Workflow("CheckBack").flow(
        {START: lambda ctx: Run(gated, {"version": "cb"}, "After"), "After": lambda ctx: END}
    )
    async with (
        WorkflowRunner(parent, store=make_store(kind)) as a,
        WorkflowRunner(gated, store=make_store(kind)) as b,  # serves the child's workflow only
    ):
        handle = await a.run(run_id="cb")
        await wait_status(handle, RunStatus.WAITING)
        child = await a.attach("cb/__start__.1")
        await wait_status(child, RunStatus.WAITING)
        await b.approve(child.run_id, by="qa")  # the child ends in b, which cannot resume a "CheckBack"
        await wait_status(child, RunStatus.COMPLETED)
        # b cannot run the parent: it makes the parent's check-back due now, and a's timer
        # sweep resumes it (well before the check-back it would come to on its own).
        await wait_status(handle, RunStatus.COMPLETED, timeout=3)
