"""Imperative mode: ``Workflow(...).execute(fn)`` (SPEC section 7)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from helpers import wait_status
from pydantic import BaseModel

from agentflow import (
    Decision,
    HumanApproval,
    RetryPolicy,
    RunFailedError,
    RunStatus,
    RunStoppedError,
    Workflow,
    WorkflowRunner,
    step,
)


class ReleaseInput(BaseModel):
    repo: str


class Artifact(BaseModel):
    name: str
    size: int


class Released(BaseModel):
    released: bool
    by: str | None


#: Read by ``branching_main``; a test flips it between the gate and the decision.
MODE = {"first": "clone"}


async def test_finished_steps_are_not_run_again_when_main_replays_after_a_gate() -> None:
    calls: Counter[str] = Counter()
    seen: list[Decision] = []

    async def clone_repo(repo: str) -> str:
        calls["clone"] += 1
        return f"/src/{repo}"

    def build(path: str) -> dict:
        calls["build"] += 1
        return {"name": path + ".tar", "size": 3}

    async def main(ctx):
        calls["main"] += 1
        path = await ctx.step("clone", clone_repo, ctx.input.repo)
        artifact = await ctx.step("build", step(build, output=Artifact), path)
        decision = await ctx.wait(HumanApproval(approvers=["ops-lead"], prompt=f"Ship {artifact.name}?"))
        seen.append(decision)
        calls["after gate"] += 1
        return {"released": decision.approved, "by": decision.by, "artifact": artifact.name}

    wf = Workflow("Release").input(ReleaseInput).execute(main)
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run({"repo": "acme/app"})
        info = await wait_status(handle, RunStatus.WAITING)
        assert info.pending is not None and info.pending.prompt == "Ship /src/acme/app.tar?"
        assert calls == {"main": 1, "clone": 1, "build": 1}
        result = await (await handle.approve(by="ops-lead", comment="go")).result()
    assert result.output == {"released": True, "by": "ops-lead", "artifact": "/src/acme/app.tar"}
    # main ran again from the top; the journaled steps returned their results without running.
    assert calls == {"main": 2, "clone": 1, "build": 1, "after gate": 1}
    assert len(seen) == 1 and seen[0].approved and seen[0].comment == "go"
    assert result.step_results["build"] == Artifact(name="/src/acme/app.tar", size=3)


async def test_journaled_step_output_is_typed_on_replay() -> None:
    types: list[type] = []

    def build() -> dict:
        return {"name": "a.tar", "size": 1}

    async def main(ctx):
        artifact = await ctx.step("build", step(build, output=Artifact))
        types.append(type(artifact))
        await ctx.wait(HumanApproval(approvers=["x"]))
        return artifact.size

    async with WorkflowRunner(Workflow("Typed").execute(main)) as runner:
        handle = await runner.run()
        await wait_status(handle, RunStatus.WAITING)
        assert (await (await handle.approve(by="x")).result()).output == 1
    assert types == [Artifact, Artifact]


async def test_wait_returns_a_rejection_as_a_decision() -> None:
    async def main(ctx):
        decision = await ctx.wait(HumanApproval(approvers=["ops-lead"]))
        return {"released": decision.approved, "by": decision.by, "why": decision.comment}

    async with WorkflowRunner(Workflow("Release").execute(main)) as runner:
        handle = await runner.run()
        await wait_status(handle, RunStatus.WAITING)
        result = await (await handle.reject(by="ops-lead", reason="not today")).result()
    assert result.status == RunStatus.COMPLETED
    assert result.output == {"released": False, "by": "ops-lead", "why": "not today"}


async def test_two_waits_each_return_their_own_decision() -> None:
    decisions: list[tuple[str | None, bool]] = []

    async def main(ctx):
        first = await ctx.wait(HumanApproval(approvers=["alice"]))
        second = await ctx.wait(HumanApproval(approvers=["bob"]))
        decisions.append((first.by, first.approved))
        decisions.append((second.by, second.approved))
        return "done"

    async with WorkflowRunner(Workflow("Two").execute(main)) as runner:
        handle = await runner.run()
        await wait_status(handle, RunStatus.WAITING)
        await handle.approve(by="alice")
        await wait_status(handle, RunStatus.WAITING)
        pending = (await handle.info()).pending
        assert pending is not None and pending.approvers == ("bob",)
        await handle.reject(by="bob", reason="no")
        assert (await handle.result()).output == "done"
    assert decisions == [("alice", True), ("bob", False)]


async def test_parallel_runs_branches_and_returns_results_in_order() -> None:
    calls: Counter[str] = Counter()

    async def build_linux(ctx):
        calls["linux"] += 1
        await asyncio.sleep(0.02)
        return "linux.tar"

    def build_mac(ctx):
        calls["mac"] += 1
        return "mac.tar"

    async def main(ctx):
        listed = await ctx.parallel([build_linux, build_mac])
        named = await ctx.parallel({"l": build_linux, "m": build_mac}, max_concurrency=1)
        await ctx.wait(HumanApproval(approvers=["ops"]))
        return {"listed": listed, "named": named}

    async with WorkflowRunner(Workflow("Par").execute(main)) as runner:
        handle = await runner.run()
        await wait_status(handle, RunStatus.WAITING)
        result = await (await handle.approve(by="ops")).result()
    assert result.output == {"listed": ["linux.tar", "mac.tar"], "named": {"l": "linux.tar", "m": "mac.tar"}}
    assert calls == {"linux": 2, "mac": 2}  # not re-run on replay


async def branching_main(ctx):
    if MODE["first"] == "clone":
        await ctx.step("clone", lambda: "cloned")
    else:
        await ctx.step("download", lambda: "downloaded")
    decision = await ctx.wait(HumanApproval(approvers=["ops"]))
    return decision.approved


async def test_a_replay_that_asks_for_another_step_raises_non_determinism() -> None:
    MODE["first"] = "clone"
    try:
        async with WorkflowRunner(Workflow("Branchy").execute(branching_main)) as runner:
            handle = await runner.run()
            await wait_status(handle, RunStatus.WAITING)
            MODE["first"] = "download"
            await handle.approve(by="ops")
            with pytest.raises(RunFailedError) as err:
                await handle.result()
    finally:
        MODE["first"] = "clone"
    assert err.value.error_type == "NonDeterminismError"
    assert "'download'" in err.value.message and "'clone'" in err.value.message


async def test_the_return_value_is_the_output_validated_into_the_output_model() -> None:
    names: list[str] = []

    async def main(ctx):
        names.append(ctx.step_name)
        return {"released": True, "by": None}

    async with WorkflowRunner(Workflow("Out").output(Released).execute(main)) as runner:
        result = await (await runner.run()).result()
    assert result.output == Released(released=True, by=None)
    assert names == ["main"]


async def test_a_failing_ctx_step_fails_the_run_naming_it() -> None:
    def flaky():
        raise OSError("network down")

    async def main(ctx):
        await ctx.step("fetch", flaky)

    async with WorkflowRunner(Workflow("Fail").execute(main)) as runner:
        with pytest.raises(RunFailedError) as err:
            await (await runner.run()).result()
    assert (err.value.step, err.value.error_type, err.value.message) == ("fetch", "OSError", "network down")


async def test_ctx_step_retries_under_its_policy() -> None:
    attempts: list[int] = []

    async def main(ctx):
        def flaky():
            attempts.append(ctx.attempt)
            if ctx.attempt < 3:
                raise ConnectionError("again")
            return "ok"

        return await ctx.step("fetch", step(flaky, retry=RetryPolicy(max_attempts=3, initial_delay=0.001)))

    async with WorkflowRunner(Workflow("Retry").execute(main)) as runner:
        assert (await (await runner.run()).result()).output == "ok"
    assert attempts == [1, 2, 3]


async def test_state_set_in_main_survives_the_replay() -> None:
    class Progress(BaseModel):
        stage: str = "new"

    async def main(ctx):
        await ctx.step("mark", lambda: ctx.set_state(stage="built"))
        await ctx.wait(HumanApproval(approvers=["ops"]))
        return ctx.state.stage

    async with WorkflowRunner(Workflow("State").state(Progress).execute(main)) as runner:
        handle = await runner.run()
        await wait_status(handle, RunStatus.WAITING)
        result = await (await handle.approve(by="ops")).result()
    assert result.output == "built"
    assert result.state == Progress(stage="built")


async def test_wait_returns_a_timed_out_decision() -> None:
    async def main(ctx):
        decision = await ctx.wait(HumanApproval(approvers=["ops"], timeout=0.1))
        return (decision.approved, decision.timed_out, decision.by)

    async with WorkflowRunner(Workflow("Late").execute(main)) as runner:
        result = await (await runner.run()).result(timeout=5)
    assert result.output == [False, True, None]  # JSON, as after a reload: a tuple is a list


async def test_pause_between_steps_and_resume_replays_without_rerunning() -> None:
    calls: Counter[str] = Counter()
    started, release = asyncio.Event(), asyncio.Event()

    async def slow():
        calls["slow"] += 1
        started.set()
        await release.wait()
        return "slow"

    def fast():
        calls["fast"] += 1
        return "fast"

    async def main(ctx):
        calls["main"] += 1
        return [await ctx.step("slow", slow), await ctx.step("fast", fast)]

    async with WorkflowRunner(Workflow("Pausable").execute(main)) as runner:
        handle = await runner.run()
        follower = asyncio.create_task(handle.result(timeout=5))
        await asyncio.wait_for(started.wait(), 5)
        pausing = asyncio.create_task(handle.pause())
        release.set()
        await asyncio.wait_for(pausing, 5)
        assert (await handle.info()).status == RunStatus.PAUSED
        assert calls == {"main": 1, "slow": 1}
        await handle.resume()
        result = await follower
    assert result.output == ["slow", "fast"]
    assert calls == {"main": 2, "slow": 1, "fast": 1}


async def test_stop_cancels_the_call_in_flight() -> None:
    log: list[str] = []
    started = asyncio.Event()

    async def forever():
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            log.append("cancelled")
            raise
        log.append("finished")

    async def main(ctx):
        await ctx.step("forever", forever)

    async with WorkflowRunner(Workflow("Stoppable").execute(main)) as runner:
        handle = await runner.run()
        await asyncio.wait_for(started.wait(), 5)
        await handle.stop()
        with pytest.raises(RunStoppedError):
            await handle.result()
    assert log == ["cancelled"]


async def test_a_long_imperative_run_lets_other_tasks_run() -> None:
    # As in a flow: journaled steps on the memory store never suspend, so the run yields
    # now and then instead of holding the loop until it ends.
    import asyncio as _asyncio

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await _asyncio.sleep(0)

    async def main(ctx):
        total = 0
        for i in range(2_000):
            total += await ctx.step(f"s{i}", lambda n=i: n)
        return total

    async with WorkflowRunner(Workflow("LongImperative").execute(main).max_steps(5_000)) as runner:
        task = _asyncio.create_task(ticker())
        await _asyncio.sleep(0)
        before = ticks
        result = await (await runner.run()).result()
        task.cancel()
    assert result.output == sum(range(2_000))
    assert ticks - before > 10, "the loop was held for the whole run"
