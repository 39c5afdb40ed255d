"""Parallel steps on the in-memory store (SPEC section 4)."""

from __future__ import annotations

import asyncio

import pytest
from helpers import wait_no_tasks
from pydantic import BaseModel

from agentflow import (
    END,
    START,
    BranchError,
    Next,
    Parallel,
    RetryPolicy,
    RunFailedError,
    RunResult,
    Workflow,
    WorkflowRunner,
    step,
)


class Build(BaseModel):
    target: str
    size: int


class Board(BaseModel):
    winner: str = ""
    linux: bool = False
    mac: bool = False


async def run_to_end(wf: Workflow) -> RunResult:
    async with WorkflowRunner(wf) as runner:
        return await (await runner.run()).result()


def join_results(names: list[str]):
    """A Join step returning the listed step results as the run output."""

    def join(ctx):
        return Next(END, output={n: ctx.step_results[n] for n in names})

    return join


async def build_linux(ctx):
    await asyncio.sleep(0.02)
    return f"linux:{ctx.step_name}"


def build_mac(ctx):
    return f"mac:{ctx.step_name}"


async def test_parallel_list_puts_each_output_under_the_function_name() -> None:
    wf = Workflow("P").flow(
        {
            START: lambda ctx: Parallel([build_linux, build_mac], "Join"),
            "Join": join_results(["build_linux", "build_mac"]),
        }
    )
    result = await run_to_end(wf)
    assert result.output == {"build_linux": "linux:build_linux", "build_mac": "mac:build_mac"}


async def test_parallel_dict_puts_each_output_under_its_key() -> None:
    wf = Workflow("P").flow(
        {
            START: lambda ctx: Parallel({"linux": build_linux, "mac": build_mac}, "Join"),
            "Join": join_results(["linux", "mac"]),
        }
    )
    result = await run_to_end(wf)
    assert result.output == {"linux": "linux:linux", "mac": "mac:mac"}
    assert result.step_results["linux"] == "linux:linux"


async def test_branches_run_concurrently() -> None:
    both_started = asyncio.Event()
    started: list[str] = []

    async def meet(ctx):
        started.append(ctx.step_name)
        if len(started) == 2:
            both_started.set()
        await asyncio.wait_for(both_started.wait(), 2)  # deadlocks unless both run at once
        return ctx.step_name

    wf = Workflow("P").flow(
        {START: lambda ctx: Parallel({"a": meet, "b": meet}, "Join"), "Join": join_results(["a", "b"])}
    )
    assert (await run_to_end(wf)).output == {"a": "a", "b": "b"}


async def test_map_gives_ctx_item_and_results_in_item_order() -> None:
    finished: list[int] = []

    async def square(ctx):
        await asyncio.sleep(0.01 * (5 - ctx.item))  # later items finish first
        finished.append(ctx.item)
        return ctx.item * ctx.item

    wf = Workflow("P").flow(
        {START: lambda ctx: Parallel.map(square, [1, 2, 3, 4], "Join"), "Join": join_results(["square"])}
    )
    result = await run_to_end(wf)
    assert finished == [4, 3, 2, 1]
    assert result.output == {"square": [1, 4, 9, 16]}


async def test_map_respects_max_concurrency() -> None:
    running = 0
    peak = 0

    async def work(ctx):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        return ctx.item

    wf = Workflow("P").flow(
        {
            START: lambda ctx: Parallel.map(work, range(8), "Join", max_concurrency=3),
            "Join": join_results(["work"]),
        }
    )
    result = await run_to_end(wf)
    assert result.output == {"work": list(range(8))}
    assert peak == 3


async def test_parallel_list_respects_max_concurrency() -> None:
    running = 0
    peak = 0

    async def work(ctx):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        return 1

    branches = {f"b{i}": work for i in range(5)}
    wf = Workflow("P").flow(
        {
            START: lambda ctx: Parallel(branches, "Join", max_concurrency=2),
            "Join": join_results(list(branches)),
        }
    )
    await run_to_end(wf)
    assert peak == 2


async def test_on_error_fail_cancels_running_siblings_and_names_the_branch() -> None:
    log: list[str] = []

    async def slow(ctx):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            log.append("slow cancelled")
            raise
        log.append("slow finished")
        return "slow"

    async def broken(ctx):
        await asyncio.sleep(0.01)
        raise ValueError("compiler crashed")

    joined: list[bool] = []
    wf = Workflow("P").flow(
        {
            START: lambda ctx: "Fan",
            "Fan": lambda ctx: Parallel({"slow": slow, "broken": broken}, "Join"),
            "Join": lambda ctx: joined.append(True) or END,
        }
    )
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run()
        with pytest.raises(RunFailedError) as err:
            await asyncio.wait_for(handle.result(), 5)
        info = await handle.info()
    assert log == ["slow cancelled"]
    assert joined == []
    assert err.value.step == "Fan"
    assert "'broken'" in err.value.message and "compiler crashed" in err.value.message
    assert err.value.error_type == "ValueError"  # the branch's own error, not an internal wrapper
    assert info.error["step"] == "Fan"


@pytest.mark.parametrize("broken_waits", [False, True])
async def test_a_failure_cancels_waiting_siblings_whether_or_not_it_waited(broken_waits: bool) -> None:
    # Branches start in the step's task and move to a task of their own only when they
    # wait: a failure that happens without waiting must still cancel the waiting ones.
    log: list[str] = []

    async def slow(ctx):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            log.append(f"{ctx.step_name} cancelled")
            raise
        return ctx.item

    async def quick(ctx):
        return ctx.item

    async def broken(ctx):
        if broken_waits:
            await asyncio.sleep(0)
        raise ValueError("boom")

    wf = Workflow("P").flow(
        {
            START: lambda ctx: Parallel({"a": slow, "q": quick, "broken": broken, "b": slow}, "Join"),
            "Join": lambda ctx: END,
        }
    )
    baseline = set(asyncio.all_tasks())
    async with WorkflowRunner(wf) as runner:
        with pytest.raises(RunFailedError) as err:
            await asyncio.wait_for((await runner.run()).result(), 5)
    await wait_no_tasks(baseline)
    # "b" starts only when the failure waited first; what started is cancelled, and told so.
    assert sorted(log) == (["a cancelled", "b cancelled"] if broken_waits else ["a cancelled"]), log
    assert "'broken'" in err.value.message and err.value.error_type == "ValueError"


async def test_on_error_collect_runs_every_branch_and_gives_branch_errors() -> None:
    seen = {}

    def broken(ctx):
        ctx.set_state(winner="broken")  # a failed branch's state is not applied
        raise ValueError("no space left")

    async def fine(ctx):
        await asyncio.sleep(0.01)
        return "ok"

    def join(ctx):
        seen.update({k: ctx.step_results[k] for k in ("broken", "fine")})
        return END

    wf = (
        Workflow("P")
        .state(Board)
        .flow(
            {
                START: lambda ctx: Parallel({"broken": broken, "fine": fine}, "Join", on_error="collect"),
                "Join": join,
            }
        )
    )
    result = await run_to_end(wf)
    assert seen == {"broken": BranchError("broken", "ValueError", "no space left"), "fine": "ok"}
    err = seen["broken"]
    assert (err.name, err.error_type, err.message) == ("broken", "ValueError", "no space left")
    assert result.state == Board()


async def test_map_on_error_collect_names_the_failed_item() -> None:
    def half(ctx):
        if ctx.item == 0:
            raise ZeroDivisionError("item zero")
        return 10 // ctx.item

    wf = Workflow("P").flow(
        {
            START: lambda ctx: Parallel.map(half, [5, 0, 2], "Join", on_error="collect"),
            "Join": join_results(["half"]),
        }
    )
    out = (await run_to_end(wf)).output["half"]
    assert out[0] == 2 and out[2] == 5
    assert isinstance(out[1], BranchError)
    assert out[1].error_type == "ZeroDivisionError" and out[1].message == "item zero"
    assert "half" in out[1].name


async def test_branch_set_state_is_applied_at_the_join_in_declared_order() -> None:
    during: list[Board] = []

    async def first(ctx):
        await asyncio.sleep(0.03)  # finishes last, yet was declared first
        ctx.set_state(winner="first", linux=True)
        return 1

    async def second(ctx):
        ctx.set_state(winner="second", mac=True)
        during.append(ctx.state.model_copy())
        return 2

    def join(ctx):
        during.append(ctx.state.model_copy())
        return END

    wf = Workflow("P").state(Board).flow({START: lambda ctx: Parallel([first, second], "Join"), "Join": join})
    result = await run_to_end(wf)
    # A branch sees its own updates at once; the join applies all, the later-declared branch last.
    assert during[0] == Board(winner="second", mac=True)
    assert during[1] == Board(winner="second", linux=True, mac=True)
    assert result.state == Board(winner="second", linux=True, mac=True)


async def test_a_branch_with_a_declared_output_model_is_validated_and_typed() -> None:
    @step(output=Build)
    def compile_linux(ctx):
        return {"target": "linux", "size": "12"}

    @step(output=Build)
    def compile_each(ctx):
        return {"target": ctx.item, "size": len(ctx.item)}

    wf = Workflow("P").flow(
        {
            START: lambda ctx: Parallel([compile_linux], "Map"),
            "Map": lambda ctx: Parallel.map(compile_each, ["mac", "win32"], "Join"),
            "Join": join_results(["compile_linux", "compile_each"]),
        }
    )
    result = await run_to_end(wf)
    assert result.step_results["compile_linux"] == Build(target="linux", size=12)
    assert result.step_results["compile_each"] == [Build(target="mac", size=3), Build(target="win32", size=5)]
    # The run declares no output model: its output is JSON, live as after a reload.
    assert result.output == {
        "compile_linux": {"target": "linux", "size": 12},
        "compile_each": [{"target": "mac", "size": 3}, {"target": "win32", "size": 5}],
    }


async def test_a_branch_output_that_does_not_fit_its_model_fails_the_run() -> None:
    @step(output=Build)
    def compile_linux(ctx):
        return {"target": "linux"}

    wf = Workflow("P").flow({START: lambda ctx: Parallel([compile_linux], "Join"), "Join": lambda ctx: END})
    async with WorkflowRunner(wf) as runner:
        with pytest.raises(RunFailedError) as err:
            await (await runner.run()).result()
    assert "compile_linux" in err.value.message and "size" in err.value.message


async def test_a_branch_retries_under_its_policy_without_leaking_state() -> None:
    attempts: list[int] = []

    @step(retry=RetryPolicy(max_attempts=3, initial_delay=0.001))
    def flaky(ctx):
        attempts.append(ctx.attempt)
        ctx.set_state(winner=f"attempt {ctx.attempt}", linux=ctx.attempt == 1)
        if ctx.attempt < 2:
            raise ConnectionError("flaky")
        return ctx.attempt

    wf = (
        Workflow("P")
        .state(Board)
        .flow({START: lambda ctx: Parallel([flaky], "Join"), "Join": join_results(["flaky"])})
    )
    result = await run_to_end(wf)
    assert attempts == [1, 2]
    assert result.output == {"flaky": 2}
    assert result.state == Board(winner="attempt 2", linux=False)


async def test_branch_outputs_are_in_step_results_history() -> None:
    seen = []

    def fan(ctx):
        if len(ctx.step_results.history("build_mac")) == 2:
            seen.append(ctx.step_results.history("build_mac"))
            return END
        return Parallel([build_mac], "Fan")

    await run_to_end(Workflow("P").flow({START: lambda ctx: "Fan", "Fan": fan}))
    assert seen == [["mac:build_mac", "mac:build_mac"]]


async def test_a_sync_branch_returning_a_coroutine_is_awaited_under_a_retry_policy() -> None:
    wf = Workflow("P").flow(
        {
            START: lambda ctx: Parallel({"linux": step(lambda ctx: build_linux(ctx), retry=2)}, "Join"),
            "Join": join_results(["linux"]),
        }
    )
    assert (await run_to_end(wf)).output == {"linux": "linux:linux"}


async def test_map_over_no_items_joins_at_once_with_an_empty_list() -> None:
    wf = Workflow("P").flow(
        {START: lambda ctx: Parallel.map(build_mac, [], "Join"), "Join": join_results(["build_mac"])}
    )
    assert (await run_to_end(wf)).output == {"build_mac": []}
