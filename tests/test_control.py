"""Controlling runs: pause, resume, stop, attach, list_runs, close (SPEC section 5)."""

from __future__ import annotations

import asyncio

import pytest
from helpers import all_events, wait_no_tasks, wait_status

from agentflow import (
    END,
    START,
    AgentflowError,
    HumanApproval,
    InvalidStateError,
    Next,
    RunHandle,
    RunStatus,
    RunStoppedError,
    Wait,
    Workflow,
    WorkflowRunner,
)


class Steps:
    """A three-step flow whose middle step waits for the test to release it."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.log: list[str] = []

    def workflow(self, name: str = "Ctl") -> Workflow:
        async def slow(ctx):
            self.log.append("slow started")
            self.started.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.log.append("slow cancelled")
                raise
            self.log.append("slow finished")
            return Next("Last", output="slow output")

        def last(ctx):
            self.log.append("last")
            return Next(END, output=ctx.step_results["Slow"])

        return Workflow(name).flow({START: lambda ctx: "Slow", "Slow": slow, "Last": last})


async def test_pause_lets_the_step_in_flight_finish_then_parks_the_run() -> None:
    s = Steps()
    async with WorkflowRunner(s.workflow()) as runner:
        handle = await runner.run()
        await asyncio.wait_for(s.started.wait(), 5)
        pausing = asyncio.create_task(handle.pause())
        await asyncio.sleep(0.02)
        assert not pausing.done(), "pause() returns only once the run is paused"
        s.release.set()
        await asyncio.wait_for(pausing, 5)
        info = await handle.info()
        assert info.status == RunStatus.PAUSED
        assert info.step == "Last"  # where it will continue
        assert s.log == ["slow started", "slow finished"]
        await handle.pause()  # pausing twice is harmless
        assert (await handle.info()).status == RunStatus.PAUSED

        await handle.resume()
        result = await handle.result()
        kinds = [e.kind for e in await all_events(handle)]
    assert result.output == "slow output"
    assert s.log == ["slow started", "slow finished", "last"]
    assert kinds.index("paused") < kinds.index("resumed") < kinds.index("completed")


@pytest.mark.parametrize("control", ["resume", "pause", "stop"])
async def test_resume_pause_or_stop_of_a_finished_run_raises_invalid_state(control: str) -> None:
    s = Steps()
    s.release.set()
    async with WorkflowRunner(s.workflow()) as runner:
        handle = await runner.run()
        await handle.result()
        with pytest.raises(InvalidStateError, match="completed"):
            await getattr(handle, control)()
        assert (await handle.info()).status == RunStatus.COMPLETED


async def test_stop_cancels_the_step_in_flight() -> None:
    s = Steps()
    async with WorkflowRunner(s.workflow()) as runner:
        handle = await runner.run()
        await asyncio.wait_for(s.started.wait(), 5)
        await handle.stop()
        info = await handle.info()
        assert info.status == RunStatus.STOPPED
        assert s.log == ["slow started", "slow cancelled"]
        await handle.stop()  # stopping twice is harmless
        assert (await handle.info()).status == RunStatus.STOPPED
        with pytest.raises(RunStoppedError) as err:
            await handle.result()
        assert err.value.run_id == handle.run_id
        with pytest.raises(InvalidStateError):
            await handle.resume()
        kinds = [e.kind for e in await all_events(handle)]
    s.release.set()
    await asyncio.sleep(0)
    assert "slow finished" not in s.log
    assert kinds[-1] == "stopped"


async def test_stop_a_paused_run() -> None:
    s = Steps()
    async with WorkflowRunner(s.workflow()) as runner:
        handle = await runner.run()
        await asyncio.wait_for(s.started.wait(), 5)
        pausing = asyncio.create_task(handle.pause())
        s.release.set()
        await asyncio.wait_for(pausing, 5)
        await handle.stop()
        assert (await handle.info()).status == RunStatus.STOPPED
        with pytest.raises(RunStoppedError):
            await handle.result()
    assert "last" not in s.log


async def test_stop_a_waiting_run() -> None:
    wf = Workflow("Gate").flow(
        {START: lambda ctx: Wait(HumanApproval(approvers=["alice"]), "Done"), "Done": lambda ctx: END}
    )
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run()
        await wait_status(handle, RunStatus.WAITING)
        await handle.stop()
        info = await handle.info()
        assert info.status == RunStatus.STOPPED and info.pending is None
        with pytest.raises(InvalidStateError):
            await handle.approve(by="alice")


async def test_list_runs_filters_by_status() -> None:
    s = Steps()
    wf = s.workflow()
    async with WorkflowRunner(wf) as runner:
        busy = await runner.run()  # stays running until released
        await asyncio.wait_for(s.started.wait(), 5)
        stopped = await runner.run()
        await stopped.stop()
        assert [i.run_id for i in await runner.list_runs()] == [stopped.run_id, busy.run_id]  # newest first
        assert [i.run_id for i in await runner.list_runs(status="running")] == [busy.run_id]
        assert [i.run_id for i in await runner.list_runs(status=RunStatus.STOPPED)] == [stopped.run_id]
        assert await runner.list_runs(status=RunStatus.COMPLETED) == []
        s.release.set()
        await busy.result()
        assert [i.run_id for i in await runner.list_runs(status=RunStatus.COMPLETED)] == [busy.run_id]
        infos = await runner.list_runs()
    assert {i.workflow for i in infos} == {"Ctl"}


async def test_list_runs_lists_only_this_workflows_runs() -> None:
    from agentflow.stores.memory import MemoryStore

    store = MemoryStore()
    a = Workflow("A").flow({START: lambda ctx: END})
    b = Workflow("B").flow({START: lambda ctx: END})
    async with WorkflowRunner(a, store=store) as ra, WorkflowRunner(b, store=store) as rb:
        await (await ra.run()).result()
        run_b = await rb.run()
        await run_b.result()
        assert [i.run_id for i in await rb.list_runs()] == [run_b.run_id]
        with pytest.raises(AgentflowError, match="'B'"):
            await ra.attach(run_b.run_id)


async def test_attach_gives_a_handle_to_an_existing_run() -> None:
    wf = Workflow("Gate").flow(
        {
            START: lambda ctx: Wait(HumanApproval(approvers=["alice"]), "Done"),
            "Done": lambda ctx: Next(END, output=7),
        }
    )
    async with WorkflowRunner(wf) as runner:
        started = await runner.run()
        await wait_status(started, RunStatus.WAITING)
        attached = await runner.attach(started.run_id)
        assert isinstance(attached, RunHandle) and attached.run_id == started.run_id
        assert (await attached.info()).status == RunStatus.WAITING
        await attached.approve(by="alice")
        assert (await attached.result()).output == 7
        assert (await started.result()).output == 7
        with pytest.raises(AgentflowError, match="no-such-run"):
            await runner.attach("no-such-run")


async def test_close_leaves_no_task_behind() -> None:
    baseline = set(asyncio.all_tasks())
    s = Steps()
    gated = Workflow("Gated").flow(
        {START: lambda ctx: Wait(HumanApproval(approvers=["a"], timeout=60), "Done"), "Done": lambda ctx: END}
    )
    runner = WorkflowRunner(s.workflow())
    gate_runner = WorkflowRunner(gated)
    await runner.run()
    handle = await gate_runner.run()  # its deadline keeps a sweeper task alive
    await asyncio.wait_for(s.started.wait(), 5)
    await wait_status(handle, RunStatus.WAITING)
    await runner.close()
    await gate_runner.close()
    await wait_no_tasks(baseline, timeout=0.5)
    assert s.log == ["slow started", "slow cancelled"]


async def test_a_closed_runner_leaves_the_run_recoverable() -> None:
    from agentflow.stores.memory import MemoryStore

    store = MemoryStore()
    s = Steps()
    runner = WorkflowRunner(s.workflow(), store=store)
    handle = await runner.run()
    await asyncio.wait_for(s.started.wait(), 5)
    await runner.close()
    assert s.log == ["slow started", "slow cancelled"]
    async with WorkflowRunner(s.workflow(), store=store) as other:
        info = await (await other.attach(handle.run_id)).info()
        assert (info.status, info.step) == (RunStatus.RUNNING, "Slow")
        recovered = await other.recover()
        assert [h.run_id for h in recovered] == [handle.run_id]
        s.release.set()
        assert (await recovered[0].result(timeout=5)).output == "slow output"


async def test_stop_right_after_run_stops_the_run_before_its_first_step() -> None:
    s = Steps()
    async with WorkflowRunner(s.workflow()) as runner:
        handle = await runner.run()
        async with asyncio.timeout(5):  # not wait_for: its new task would let the run start first
            await handle.stop()
        assert (await handle.info()).status == RunStatus.STOPPED
        with pytest.raises(RunStoppedError):
            await handle.result()
    assert s.log == []


async def test_close_right_after_run_leaves_the_run_recoverable_and_no_task() -> None:
    from agentflow.stores.memory import MemoryStore

    baseline = set(asyncio.all_tasks())
    store = MemoryStore()
    s = Steps()
    runner = WorkflowRunner(s.workflow(), store=store)
    handle = await runner.run()
    async with asyncio.timeout(5):
        await runner.close()
    await wait_no_tasks(baseline, timeout=0.5)
    assert s.log == []
    # The closing runner let go of the run, so another one recovers it at once.
    async with WorkflowRunner(s.workflow(), store=store) as other:
        recovered = await other.recover()
        assert [h.run_id for h in recovered] == [handle.run_id]
        s.release.set()
        assert (await recovered[0].result(timeout=5)).output == "slow output"
    assert s.log == ["slow started", "slow finished", "last"]


async def test_result_follows_the_run_through_pause_and_resume() -> None:
    s = Steps()
    async with WorkflowRunner(s.workflow()) as runner:
        handle = await runner.run()
        follower = asyncio.create_task(handle.result(timeout=5))
        await asyncio.wait_for(s.started.wait(), 5)
        pausing = asyncio.create_task(handle.pause())
        s.release.set()
        await asyncio.wait_for(pausing, 5)
        assert not follower.done()
        await handle.resume()
        assert (await follower).output == "slow output"


async def test_pause_after_a_step_that_returns_a_plain_name() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    ran: list[str] = []

    async def first(ctx):
        started.set()
        await release.wait()
        ran.append("first")
        return "Second"

    def second(ctx):
        ran.append("second")
        return END

    async with WorkflowRunner(Workflow("Plain").flow({START: first, "Second": second})) as runner:
        handle = await runner.run()
        await asyncio.wait_for(started.wait(), 5)
        pausing = asyncio.create_task(handle.pause())
        await asyncio.sleep(0)
        release.set()
        await asyncio.wait_for(pausing, 5)
        info = await handle.info()
        assert (info.status, info.step, ran) == (RunStatus.PAUSED, "Second", ["first"])
        await handle.resume()
        await handle.result()
    assert ran == ["first", "second"]


def _gate_flow(name: str = "Waits") -> Workflow:
    return Workflow(name).flow(
        {
            START: lambda ctx: Wait(HumanApproval(approvers=["alice"], prompt="Ship?"), "Done"),
            "Done": lambda ctx: Next(END, output="shipped"),
        }
    )


async def test_wait_for_returns_the_info_at_the_gate() -> None:
    async with WorkflowRunner(_gate_flow()) as runner:
        handle = await runner.run()
        info = await handle.wait_for("waiting", timeout=5)
        assert (info.run_id, info.status, info.step) == (handle.run_id, RunStatus.WAITING, START)
        assert info.pending is not None and info.pending.prompt == "Ship?"
        assert handle.status == RunStatus.WAITING
        with pytest.raises(TimeoutError):
            await handle.wait_for(RunStatus.PAUSED, timeout=0.1)
        await handle.approve(by="alice")
        final = await handle.wait_for("paused", timeout=5)  # a final status ends the wait too
        assert final.status == RunStatus.COMPLETED


async def test_an_unknown_run_id_raises_run_not_found() -> None:
    from agentflow import RunNotFoundError

    async with WorkflowRunner(_gate_flow()) as runner:
        with pytest.raises(RunNotFoundError, match="no-such-run"):
            await runner.attach("no-such-run")
        ghost = RunHandle(runner, "no-such-run")
        with pytest.raises(RunNotFoundError):
            await ghost.wait_for("waiting", timeout=1)
        with pytest.raises(RunNotFoundError):
            await ghost.info()
    assert issubclass(RunNotFoundError, AgentflowError)


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis", "postgres"])
async def test_list_runs_pages_newest_first_without_duplicates_or_gaps(make_store, kind) -> None:
    store = make_store(kind)
    gated = Workflow("Pages").flow(
        {
            START: lambda ctx: Wait(HumanApproval(approvers=["a"]), "Done") if ctx.input["gate"] else END,
            "Done": lambda ctx: END,
        }
    )
    other = Workflow("Other").flow({START: lambda ctx: END})
    async with WorkflowRunner(gated, store=store) as runner, WorkflowRunner(other, store=store) as elsewhere:
        handles = [await runner.run({"gate": i % 3 == 0}) for i in range(8)]
        for h in handles:
            await h.wait_for("waiting", timeout=5)
        theirs = [(await elsewhere.run()).run_id for _ in range(2)]

        async def pages(**filters) -> list[list[str]]:
            out: list[list[str]] = []
            after = None
            while page := await runner.list_runs(limit=3, after=after, **filters):
                assert len(page) <= 3
                out.append([i.run_id for i in page])
                after = page[-1].run_id
            return out

        everything = await runner.list_runs()
        assert len(everything) == 8 and {i.workflow for i in everything} == {"Pages"}
        keys = [(i.created_at, i.run_id) for i in everything]
        assert keys == sorted(keys, reverse=True)  # newest first
        paged = await pages()
        assert [len(p) for p in paged] == [3, 3, 2]
        assert [r for p in paged for r in p] == [i.run_id for i in everything]  # no duplicate, no gap
        waiting = [r for p in await pages(status="waiting") for r in p]
        assert waiting == [i.run_id for i in everything if i.status == RunStatus.WAITING]
        assert sorted(waiting) == sorted(h.run_id for i, h in enumerate(handles) if i % 3 == 0)
        assert [r for p in await pages(workflow="Other") for r in p] == theirs[::-1]
        assert [i.run_id for i in await runner.list_runs(status="completed", limit=2)] == [
            i.run_id for i in everything if i.status == RunStatus.COMPLETED
        ][:2]


async def test_a_handle_from_approve_attach_or_a_finished_run_shows_its_status() -> None:
    async with WorkflowRunner(_gate_flow()) as runner:
        handle = await runner.run()
        await handle.wait_for("waiting", timeout=5)
        attached = await runner.attach(handle.run_id)
        assert "waiting" in repr(attached) and "waiting" in attached._repr_html_()
        approved = await runner.approve(handle.run_id, by="alice")
        assert repr(approved).split()[-1].rstrip(">") in ("running", "completed"), repr(approved)
        await approved.result()
        await handle.result()
        for h in (approved, handle, await runner.attach(handle.run_id)):
            assert repr(h).endswith(" completed>"), repr(h)
            assert "completed" in h._repr_html_()
