"""Operating parents of child runs: retry, delete, and a fan-out that fails (SPEC §4, §12, §17).

Every test goes through the public API, on each store kind.
"""

from __future__ import annotations

import asyncio
import collections
import re

import pytest
from helpers import wait_status
from pydantic import BaseModel

from agentflow import (
    END,
    START,
    HumanApproval,
    InvalidStateError,
    Next,
    Parallel,
    Run,
    RunFailedError,
    RunStatus,
    Wait,
    Workflow,
    WorkflowRunner,
)

KINDS = ["memory", "sqlite", "redis"]


class Tally(BaseModel):
    prepared: int = 0


class Flaky:
    """A child workflow START → Prep → Work; Work fails while ``broken``. A parent runs it."""

    def __init__(self) -> None:
        self.broken = True
        self.calls: collections.Counter[str] = collections.Counter()

    def workflows(self) -> tuple[Workflow, Workflow]:
        def prep(ctx):
            self.calls["Prep"] += 1
            ctx.set_state(prepared=ctx.state.prepared + 1)
            return "Work"

        def work(ctx):
            self.calls["Work"] += 1
            if self.broken:
                raise ValueError("the build farm is down")
            return Next(END, output={"prepared": ctx.state.prepared})

        child = (
            Workflow("FlakyChild").state(Tally).flow({START: lambda ctx: "Prep", "Prep": prep, "Work": work})
        )

        def spawn(ctx):
            self.calls["Spawn"] += 1
            return Run(child, None, "Done")

        def done(ctx):
            return Next(END, output=ctx.step_results[START])

        return Workflow("FlakyParent").flow({START: spawn, "Done": done}), child


@pytest.mark.parametrize("kind", KINDS)
async def test_retry_of_a_parent_retries_its_failed_child_at_its_failing_step(make_store, kind):
    f = Flaky()
    parent, _ = f.workflows()
    async with WorkflowRunner(parent, store=make_store(kind)) as runner:
        handle = await runner.run(run_id="fp")
        with pytest.raises(RunFailedError) as err:
            await handle.result(timeout=10)
        assert "fp/__start__.1" in str(err.value)
        child = await runner.attach("fp/__start__.1")
        assert (await child.info()).status == RunStatus.FAILED
        f.broken = False
        again = await runner.retry("fp")  # the child is not retried by hand
        result = await again.result(timeout=10)
        cinfo = await child.info()
    assert result.output == {"prepared": 1}  # the child kept its state
    assert cinfo.status == RunStatus.COMPLETED and cinfo.error is None
    # Neither the parent's step nor the child's steps before its failing one ran again.
    assert f.calls == {"Spawn": 1, "Prep": 1, "Work": 2}


@pytest.mark.parametrize("kind", KINDS)
async def test_retry_reaches_a_failed_grandchild_past_its_gate(make_store, kind):
    broken = {"yes"}
    calls: collections.Counter[str] = collections.Counter()

    def work(ctx):
        calls["Work"] += 1
        if broken:
            raise ValueError("signing key expired")
        return Next(END, output="signed")

    leaf = Workflow("Leaf").flow(
        {START: lambda ctx: Wait(HumanApproval(approvers=["qa"]), "Work"), "Work": work}
    )
    mid = Workflow("Middle").flow({START: lambda ctx: Run(leaf, None, END)})
    top = Workflow("Top").flow({START: lambda ctx: Run(mid, None, END)})
    async with WorkflowRunner(top, store=make_store(kind)) as runner:
        handle = await runner.run(run_id="t")
        leaf_id = "t/__start__.1/__start__.1"
        await wait_status(handle, RunStatus.WAITING)
        await wait_status(await runner.attach("t/__start__.1"), RunStatus.WAITING)
        await wait_status(await runner.attach(leaf_id), RunStatus.WAITING)
        await runner.approve("t", by="qa")
        with pytest.raises(RunFailedError):
            await handle.result(timeout=10)
        assert (await (await runner.attach("t/__start__.1")).info()).status == RunStatus.FAILED
        broken.clear()
        result = await (await runner.retry("t")).result(timeout=10)
        leaf_info = await (await runner.attach(leaf_id)).info()
    assert result.output == "signed"
    assert calls == {"Work": 2}  # the gate was not asked again
    assert leaf_info.status == RunStatus.COMPLETED


@pytest.mark.parametrize("kind", KINDS)
async def test_retry_of_an_imperative_parent_retries_the_child_its_ctx_run_raised_for(make_store, kind):
    f = Flaky()
    _, child = f.workflows()
    before: list[str] = []

    async def main(ctx):
        before.append(await ctx.step("plan", lambda: "planned"))
        out = await ctx.run(child)
        return {"child": out, "plan": before[-1]}

    parent = Workflow("ImperativeParent").children(child).execute(main)
    async with WorkflowRunner(parent, store=make_store(kind)) as runner:
        handle = await runner.run(run_id="ip")
        with pytest.raises(RunFailedError):
            await handle.result(timeout=10)
        f.broken = False
        result = await (await runner.retry("ip")).result(timeout=10)
    assert result.output == {"child": {"prepared": 1}, "plan": "planned"}
    assert f.calls == {"Prep": 1, "Work": 2}


gate = Workflow("Gate").flow(
    {
        START: lambda ctx: Wait(HumanApproval(approvers=["qa"]), "Go"),
        "Go": lambda ctx: Next(END, output=f"released {ctx.input}"),
    }
)


@pytest.mark.parametrize("kind", KINDS)
async def test_retry_of_a_parent_whose_child_was_stopped_runs_a_new_child_in_its_place(make_store, kind):
    parent = Workflow("GateParent").flow(
        {
            START: lambda ctx: Run(gate, "v1", "Done"),
            "Done": lambda ctx: Next(END, output=ctx.step_results[START]),
        }
    )
    async with WorkflowRunner(parent, store=make_store(kind)) as runner:
        handle = await runner.run(run_id="gp")
        await wait_status(handle, RunStatus.WAITING)
        old = await runner.attach("gp/__start__.1")
        await wait_status(old, RunStatus.WAITING)
        await old.stop()  # the child alone: the parent fails with RunStoppedError
        with pytest.raises(RunFailedError) as err:
            await handle.result(timeout=10)
        assert err.value.error_type == "RunStoppedError"
        again = await runner.retry("gp")
        await wait_status(again, RunStatus.WAITING)
        new = await runner.attach("gp/__start__.1~2")
        await wait_status(new, RunStatus.WAITING)
        await runner.approve("gp", by="qa")  # the new child's approval, listed with the parent
        result = await again.result(timeout=10)
        info = await again.info()
        assert (await old.info()).status == RunStatus.STOPPED  # final: kept as it was
        assert (await new.info()).parent.run_id == "gp"
    assert result.output == "released v1"
    assert info.children == ("gp/__start__.1", "gp/__start__.1~2")


@pytest.mark.parametrize("kind", KINDS)
async def test_retry_of_a_fan_out_retries_only_its_failed_children(make_store, kind):
    broken = {"b"}
    calls: collections.Counter[str] = collections.Counter()

    def build(ctx):
        calls[ctx.input] += 1
        if ctx.input in broken:
            raise RuntimeError(f"{ctx.input}: out of disk")
        return Next(END, output=ctx.input.upper())

    child = Workflow("Part").flow({START: build})

    def one(ctx):
        return Run(child, ctx.item)

    parent = Workflow("Parts").flow(
        {
            START: lambda ctx: Parallel.map(one, ["a", "b", "c"], "Join"),
            "Join": lambda ctx: Next(END, output=ctx.step_results["one"]),
        }
    )
    async with WorkflowRunner(parent, store=make_store(kind)) as runner:
        handle = await runner.run(run_id="ps")
        with pytest.raises(RunFailedError):
            await handle.result(timeout=10)
        broken.clear()
        result = await (await handle.retry()).result(timeout=10)
    assert result.output == ["A", "B", "C"]
    assert calls == {"a": 1, "b": 2, "c": 1}


# -- delete ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_delete_of_a_parent_deletes_its_children_and_theirs(make_store, kind):
    mid = Workflow("Mid").flow({START: lambda ctx: Run(gate, ctx.input, END)})
    outer = Workflow("Outer").flow(
        {START: lambda ctx: Parallel.map(lambda c: Run(mid, c.item), ["x", "y"], END)}
    )
    store = make_store(kind)
    async with WorkflowRunner(outer.children(mid), store=store) as runner:
        handle = await runner.run(run_id="o")
        await wait_status(handle, RunStatus.WAITING)
        ids = [
            "o/__start__.1.0",
            "o/__start__.1.1",
            "o/__start__.1.0/__start__.1",
            "o/__start__.1.1/__start__.1",
        ]
        for cid in ids:
            await wait_status(await runner.attach(cid), RunStatus.WAITING)
        assert await runner.delete("o") is True
        for run_id in ["o", *ids]:
            assert await store.get(run_id) is None, run_id
        assert await runner.delete("o") is False


@pytest.mark.parametrize("kind", KINDS)
async def test_delete_refuses_while_a_child_runs_and_deletes_nothing(make_store, kind):
    hold = asyncio.Event()

    async def slow(ctx):
        await hold.wait()
        return END

    busy = Workflow("Busy").flow({START: slow})
    parent = Workflow("BusyParent").flow(
        {START: lambda ctx: Parallel.map(lambda c: Run(busy, c.item), [1, 2], END)}
    )
    store = make_store(kind)
    async with WorkflowRunner(parent.children(busy), store=store) as runner:
        handle = await runner.run(run_id="bp")
        await wait_status(handle, RunStatus.WAITING)
        with pytest.raises(InvalidStateError, match=re.escape("bp/__start__.1.0")):
            await runner.delete("bp")
        for run_id in ("bp", "bp/__start__.1.0", "bp/__start__.1.1"):
            assert await store.get(run_id) is not None
        await handle.stop()
        assert await runner.delete("bp") is True
        for run_id in ("bp", "bp/__start__.1.0", "bp/__start__.1.1"):
            assert await store.get(run_id) is None
        hold.set()


# -- a fan-out that fails ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_a_failing_branch_stops_the_child_runs_of_its_siblings_and_a_retry_starts_new_ones(
    make_store, kind
):
    started = asyncio.Event()
    state = {"broken": True}

    def opened(ctx):
        started.set()
        return Wait(HumanApproval(approvers=["qa"]), "Go")

    signed = Workflow("Signed").flow(
        {START: opened, "Go": lambda ctx: Next(END, output=f"signed {ctx.input}")}
    )

    def release(ctx):
        return Run(signed, "r1")

    async def boom(ctx):
        await started.wait()  # the sibling's child run is going
        if state["broken"]:
            raise RuntimeError("notes service is down")
        return "notes"

    parent = Workflow("Half").flow(
        {
            START: lambda ctx: Parallel({"release": release, "boom": boom}, "Join", on_error="fail"),
            "Join": lambda ctx: Next(END, output=[ctx.step_results["release"], ctx.step_results["boom"]]),
        }
    )
    async with WorkflowRunner(parent, store=make_store(kind)) as runner:
        handle = await runner.run(run_id="h")
        with pytest.raises(RunFailedError) as err:
            await handle.result(timeout=10)
        assert "boom" in str(err.value)
        old = await runner.attach("h/__start__.1.0")
        assert (await old.info()).status == RunStatus.STOPPED
        assert (await handle.info()).children == ("h/__start__.1.0",)
        state["broken"] = False
        again = await handle.retry()
        await wait_status(again, RunStatus.WAITING)
        new = await runner.attach("h/__start__.1.0~2")
        await wait_status(new, RunStatus.WAITING)
        await runner.approve(new.run_id, by="qa")
        result = await again.result(timeout=10)
    assert result.output == ["signed r1", "notes"]


@pytest.mark.parametrize("kind", KINDS)
async def test_branches_that_finished_before_a_sibling_failed_do_not_run_again_on_retry(make_store, kind):
    calls: collections.Counter[str] = collections.Counter()
    state = {"broken": True}

    def quick(ctx):
        calls["quick"] += 1
        return "quick"

    def also(ctx):
        calls["also"] += 1
        return "also"

    def fails(ctx):
        calls["fails"] += 1
        if state["broken"]:
            raise RuntimeError("boom")
        return "fixed"

    wf = Workflow("Checkpointed").flow(
        {
            START: lambda ctx: Parallel([quick, also, fails], "Join", on_error="fail"),
            "Join": lambda ctx: Next(END, output=[ctx.step_results[n] for n in ("quick", "also", "fails")]),
        }
    )
    async with WorkflowRunner(wf, store=make_store(kind)) as runner:
        handle = await runner.run()
        with pytest.raises(RunFailedError):
            await handle.result(timeout=10)
        state["broken"] = False
        result = await (await handle.retry()).result(timeout=10)
    assert result.output == ["quick", "also", "fixed"]
    assert calls == {"quick": 1, "also": 1, "fails": 2}


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
async def test_a_waiting_parent_gets_back_a_child_whose_owner_died_without_recover(
    make_store, kind, monkeypatch
):
    """The parent's check-back takes over a child whose owner died: no one need call recover().

    (A parent recovered a moment before its children's leases ran out used to wait on
    them for good.)
    """
    from agentflow._engine import compose as engine_compose
    from agentflow._runtime import children as runtime_children

    monkeypatch.setattr(engine_compose, "CHECK_BACK", 0.3)
    monkeypatch.setattr(runtime_children, "CHECK_BACK", 0.3)
    hold = asyncio.Event()
    ran: list[str] = []

    async def slow(ctx):
        ran.append(ctx.run_id)
        await hold.wait()
        return END

    leg = Workflow("OrphanLeg").flow({START: slow})
    boss = Workflow("OrphanBoss").flow({START: lambda ctx: Run(leg, None, END)})
    a = WorkflowRunner(boss, store=make_store(kind), lease_ttl=0.5)
    handle = await a.run(run_id="orphan")
    await wait_status(handle, RunStatus.WAITING)
    child_id = "orphan/__start__.1"
    await asyncio.sleep(0.05)
    assert ran == [child_id]
    await a.close()  # the process that ran the child is gone; the child stays running
    hold.set()
    async with WorkflowRunner(boss, store=make_store(kind), lease_ttl=0.5) as b:
        again = await b.attach("orphan")
        result = await again.result(timeout=20)
    assert result.status == RunStatus.COMPLETED
    assert ran == [child_id, child_id]  # taken over once, by b
