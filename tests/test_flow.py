"""Flow runs on the in-memory store: returns, outputs, state, retries, failures, events."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest
from helpers import all_events, wait_status, wait_until
from pydantic import BaseModel

from agentflow import (
    END,
    START,
    InvalidInputError,
    Next,
    RetryPolicy,
    RunEvent,
    RunFailedError,
    RunInfo,
    RunResult,
    RunStatus,
    StateValidationError,
    Usage,
    Workflow,
    WorkflowRunner,
    step,
)


class Repo(BaseModel):
    repo: str


class Counter(BaseModel):
    count: int = 0
    label: str = ""


class BuildOutput(BaseModel):
    artifact: str
    size: int


class Summary(BaseModel):
    total: int


async def run_to_end(wf: Workflow, inp=None) -> RunResult:
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run(inp)
        return await handle.result()


async def run_to_failure(wf: Workflow, inp=None) -> RunFailedError:
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run(inp)
        with pytest.raises(RunFailedError) as err:
            await handle.result()
        return err.value


# -- what a step returns -------------------------------------------------------------


async def test_sync_and_async_steps_run_in_order() -> None:
    order = []

    def first(ctx):
        order.append(("first", ctx.step_name))
        return "Second"

    async def second(ctx):
        await asyncio.sleep(0)
        order.append(("second", ctx.step_name))
        return "Third"

    def third(ctx):
        order.append(("third", ctx.step))  # ctx.step is the step name in flow mode
        return END

    result = await run_to_end(Workflow("W").flow({START: first, "Second": second, "Third": third}))
    assert result.status == RunStatus.COMPLETED
    assert order == [("first", START), ("second", "Second"), ("third", "Third")]
    assert result.output is None


async def build_async(ctx):
    await asyncio.sleep(0)
    return Next(END, output=f"built by {ctx.step_name}")


@pytest.mark.parametrize("options", [None, {"retry": 2}, {"timeout": 5}, {"retry": 2, "timeout": 5}])
async def test_a_sync_callable_returning_a_coroutine_is_awaited(options) -> None:
    def wrapper(ctx):
        return build_async(ctx)

    fn = wrapper if options is None else step(wrapper, **options)
    result = await run_to_end(Workflow("W").flow({START: fn}))
    assert result.output == f"built by {START}"


async def test_handle_result_with_a_timeout_raises_timeout_error() -> None:
    release = asyncio.Event()

    async def slow(ctx):
        await release.wait()
        return END

    async with WorkflowRunner(Workflow("W").flow({START: slow})) as runner:
        handle = await runner.run()
        with pytest.raises(TimeoutError):
            await handle.result(timeout=0.05)
        release.set()
        assert (await handle.result(timeout=5)).status == RunStatus.COMPLETED


async def test_next_records_the_step_output_and_next_end_is_the_run_output() -> None:
    seen = {}

    def first(ctx):
        return Next("Sum", output=[1, 2, 3])

    def total(ctx):
        seen["first"] = ctx.step_results[START]
        return Next(END, output={"total": sum(ctx.step_results[START])})

    result = await run_to_end(Workflow("W").flow({START: first, "Sum": total}))
    assert seen["first"] == [1, 2, 3]
    assert result.output == {"total": 6}
    assert result.step_results == {START: [1, 2, 3], "Sum": {"total": 6}}


async def test_run_output_is_validated_into_the_output_model() -> None:
    wf = Workflow("W").output(Summary).flow({START: lambda ctx: Next(END, output={"total": "7"})})
    result = await run_to_end(wf)
    assert result.output == Summary(total=7)


async def test_run_output_that_does_not_fit_the_output_model_fails_the_run() -> None:
    wf = Workflow("W").output(Summary).flow({START: lambda ctx: Next(END, output={"total": "many"})})
    err = await run_to_failure(wf)
    assert err.error_type == "OutputValidationError"
    assert "Summary" in err.message and "total" in err.message


async def test_declared_step_output_is_validated_and_typed_in_step_results() -> None:
    seen = []

    @step(output=BuildOutput)
    def build(ctx):
        return Next("Test", output={"artifact": "out.tar", "size": "42"})

    def test(ctx):
        seen.append(ctx.step_results["Build"])
        return END

    result = await run_to_end(Workflow("W").flow({START: lambda ctx: "Build", "Build": build, "Test": test}))
    assert seen == [BuildOutput(artifact="out.tar", size=42)]
    assert isinstance(result.step_results["Build"], BuildOutput)


async def test_declared_step_output_that_does_not_validate_fails_the_run() -> None:
    @step(output=BuildOutput)
    def build(ctx):
        return Next(END, output={"artifact": "out.tar"})

    err = await run_to_failure(Workflow("W").flow({START: build}))
    assert err.step == START
    assert err.error_type == "OutputValidationError"
    assert "size" in err.message


async def test_history_lists_every_output_of_a_step_that_looped() -> None:
    seen = {}

    def loop(ctx):
        n = len(ctx.step_results.history("Loop"))
        if n == 3:
            seen["latest"] = ctx.step_results["Loop"]
            seen["history"] = ctx.step_results.history("Loop")
            seen["never"] = ctx.step_results.history("Nope")
            return END
        return Next("Loop", output=n * 10)

    await run_to_end(Workflow("W").flow({START: lambda ctx: "Loop", "Loop": loop}))
    assert seen == {"latest": 20, "history": [0, 10, 20], "never": []}


async def test_step_results_is_read_only() -> None:
    errors = []

    def first(ctx):
        try:
            ctx.step_results["x"] = 1
        except TypeError as exc:
            errors.append(exc)
        return END

    await run_to_end(Workflow("W").flow({START: first}))
    assert len(errors) == 1


async def test_max_steps_guard_fails_an_endless_loop() -> None:
    calls = []

    def spin(ctx):
        calls.append(1)
        return "Spin"

    err = await run_to_failure(Workflow("W").max_steps(5).flow({START: lambda ctx: "Spin", "Spin": spin}))
    assert err.error_type == "StepLimitExceeded"
    assert "5" in err.message and "max_steps" in err.message
    assert len(calls) == 4  # START took the first of the five


async def test_unknown_step_fails_naming_the_step_and_the_known_steps() -> None:
    wf = Workflow("W").flow(
        {START: lambda ctx: "Draft", "Draft": lambda ctx: "Pubish", "Publish": lambda ctx: END}
    )
    err = await run_to_failure(wf)
    assert err.error_type == "UnknownStepError"
    assert err.step == "Draft"
    assert "'Pubish'" in err.message
    assert "Draft" in err.message and "Publish" in err.message


@pytest.mark.parametrize("garbage", [None, 42, ["Next"], {"target": "B"}])
async def test_a_step_returning_garbage_fails_with_a_clear_error(garbage) -> None:
    err = await run_to_failure(Workflow("W").flow({START: lambda ctx: garbage, "B": lambda ctx: END}))
    assert err.step == START
    assert repr(garbage) in err.message
    assert "Next(" in err.message and "Wait(" in err.message, "the message says what a step may return"


async def test_next_to_an_unknown_step_fails_too() -> None:
    err = await run_to_failure(Workflow("W").flow({START: lambda ctx: Next("Nowhere", output=1)}))
    assert err.error_type == "UnknownStepError"
    assert "'Nowhere'" in err.message


# -- input ---------------------------------------------------------------------------


async def test_ctx_input_is_the_validated_model() -> None:
    seen = []

    def first(ctx):
        seen.append(ctx.input)
        return END

    await run_to_end(Workflow("W").input(Repo).flow({START: first}), {"repo": "acme/app"})
    assert seen == [Repo(repo="acme/app")]


async def test_invalid_input_creates_no_run() -> None:
    calls = []

    def first(ctx):
        calls.append(1)
        return END

    async with WorkflowRunner(Workflow("W").input(Repo).flow({START: first})) as runner:
        with pytest.raises(InvalidInputError) as err:
            await runner.run({"repository": "acme/app"})
        assert await runner.list_runs() == []
    assert calls == []
    assert [e["loc"] for e in err.value.errors] == [("repo",)]
    assert "repo" in str(err.value)


async def test_input_that_is_not_json_is_refused_without_an_input_model() -> None:
    async with WorkflowRunner(Workflow("W").flow({START: lambda ctx: END})) as runner:
        with pytest.raises(InvalidInputError):
            await runner.run({"when": object()})
        assert await runner.list_runs() == []


async def test_run_with_an_existing_run_id_returns_that_run_and_starts_nothing() -> None:
    calls = []

    def first(ctx):
        calls.append(ctx.run_id)
        return Next(END, output=len(calls))

    async with WorkflowRunner(Workflow("W").flow({START: first})) as runner:
        one = await runner.run(None, run_id="order-17")
        assert (await one.result()).output == 1
        two = await runner.run(None, run_id="order-17")
        assert two.run_id == "order-17"
        assert (await two.result()).output == 1
        assert [i.run_id for i in await runner.list_runs()] == ["order-17"]
    assert calls == ["order-17"]


# -- state ---------------------------------------------------------------------------


async def test_set_state_takes_a_mapping_a_model_or_keywords() -> None:
    seen = []

    def first(ctx):
        ctx.set_state({"count": 1})
        seen.append(ctx.state.model_copy())
        ctx.set_state(Counter(label="model"))  # only the fields the model sets
        seen.append(ctx.state.model_copy())
        ctx.set_state(count=3)
        return "Second"

    def second(ctx):
        seen.append(ctx.state.model_copy())
        return END

    result = await run_to_end(Workflow("W").state(Counter).flow({START: first, "Second": second}))
    assert seen == [Counter(count=1), Counter(count=1, label="model"), Counter(count=3, label="model")]
    assert result.state == Counter(count=3, label="model")


async def test_invalid_set_state_raises_naming_the_field_and_changes_nothing() -> None:
    caught: list[StateValidationError] = []
    after = []

    def first(ctx):
        ctx.set_state(count=1)
        for bad in ({"count": "lots"}, {"colour": "red"}):
            try:
                ctx.set_state(bad)
            except StateValidationError as exc:
                caught.append(exc)
        after.append(ctx.state.model_copy())
        return END

    result = await run_to_end(Workflow("W").state(Counter).flow({START: first}))
    assert [e.field for e in caught] == ["count", "colour"]
    assert "count" in str(caught[0]) and "colour" in str(caught[1])
    assert after == [Counter(count=1)]
    assert result.state == Counter(count=1)


async def test_uncaught_state_validation_error_fails_the_run_naming_the_field() -> None:
    err = await run_to_failure(
        Workflow("W").state(Counter).flow({START: lambda ctx: ctx.set_state(count="x")})
    )
    assert err.error_type == "StateValidationError"
    assert "count" in err.message


async def test_set_state_without_a_state_model_says_how_to_fix_it() -> None:
    err = await run_to_failure(Workflow("W").flow({START: lambda ctx: ctx.set_state(count=1)}))
    assert err.error_type == "StateValidationError"
    assert ".state(" in err.message


async def test_a_failed_attempt_does_not_leak_its_state_into_the_retry() -> None:
    seen = []

    @step(retry=RetryPolicy(max_attempts=2, initial_delay=0.001))
    def first(ctx):
        seen.append(ctx.state.count)
        ctx.set_state(count=ctx.state.count + 1)
        if ctx.attempt == 1:
            raise ConnectionError("flaky")
        return END

    result = await run_to_end(Workflow("W").state(Counter).flow({START: first}))
    assert seen == [0, 0]
    assert result.state == Counter(count=1)


# -- retries and timeouts -------------------------------------------------------------


async def test_retry_count_reruns_a_failing_step_with_ctx_attempt() -> None:
    attempts = []

    @step(retry=3)
    async def flaky(ctx):
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError(f"attempt {ctx.attempt}")
        return Next(END, output="ok")

    async with WorkflowRunner(Workflow("W").flow({START: flaky})) as runner:
        handle = await runner.run()
        assert (await handle.result()).output == "ok"
        events = await all_events(handle)
    assert attempts == [1, 2, 3]
    retried = [e for e in events if e.kind == "step_failed"]
    assert [(e.step, e.data["attempt"], e.data["message"]) for e in retried] == [
        (START, 1, "attempt 1"),
        (START, 2, "attempt 2"),
    ]


async def test_retry_policy_gives_up_after_max_attempts() -> None:
    attempts = []

    @step(retry=RetryPolicy(max_attempts=4, initial_delay=0.001))
    def always(ctx):
        attempts.append(ctx.attempt)
        raise ConnectionError("down")

    err = await run_to_failure(Workflow("W").flow({START: always}))
    assert attempts == [1, 2, 3, 4]
    assert (err.error_type, err.message) == ("ConnectionError", "down")


async def test_retry_policy_does_not_retry_non_retryable_errors() -> None:
    attempts = []

    @step(retry=RetryPolicy(max_attempts=5, initial_delay=0.001, non_retryable=(KeyError,)))
    def broken(ctx):
        attempts.append(ctx.attempt)
        raise KeyError("missing")

    err = await run_to_failure(Workflow("W").flow({START: broken}))
    assert attempts == [1]
    assert err.error_type == "KeyError"


async def test_step_timeout_fails_a_slow_async_step() -> None:
    finished = []

    @step(timeout=0.05)
    async def slow(ctx):
        await asyncio.sleep(10)
        finished.append(1)
        return END

    started = time.monotonic()
    err = await run_to_failure(Workflow("W").flow({START: slow}))
    assert time.monotonic() - started < 2
    assert err.error_type == "TimeoutError"
    assert finished == []


async def test_step_timeout_with_retry_retries_the_slow_attempt() -> None:
    attempts = []

    @step(timeout=0.05, retry=RetryPolicy(max_attempts=2, initial_delay=0.001))
    async def slow_then_fast(ctx):
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            await asyncio.sleep(10)
        return Next(END, output=ctx.attempt)

    result = await run_to_end(Workflow("W").flow({START: slow_then_fast}))
    assert attempts == [1, 2]
    assert result.output == 2


async def test_step_timeout_fails_a_slow_sync_step() -> None:
    @step(timeout=0.05)
    def slow(ctx):
        time.sleep(0.3)
        return END

    err = await run_to_failure(Workflow("W").flow({START: slow}))
    assert err.error_type == "TimeoutError"


# -- failures ----------------------------------------------------------------------------


async def test_a_failing_step_fails_only_its_own_run() -> None:
    gate = asyncio.Event()

    async def work(ctx):
        if ctx.input.repo == "bad":
            raise ValueError("broken repo")
        await gate.wait()
        return Next(END, output=ctx.input.repo)

    async with WorkflowRunner(Workflow("W").input(Repo).flow({START: work})) as runner:
        good = await runner.run({"repo": "good"})
        bad = await runner.run({"repo": "bad"})
        with pytest.raises(RunFailedError):
            await bad.result()
        assert (await good.info()).status == RunStatus.RUNNING
        gate.set()
        assert (await good.result()).output == "good"


async def test_failure_keeps_step_type_message_and_traceback() -> None:
    def explode_here(ctx):
        raise ValueError("the disk is full")

    async with WorkflowRunner(
        Workflow("W").flow({START: lambda ctx: "Write", "Write": explode_here})
    ) as runner:
        handle = await runner.run()
        with pytest.raises(RunFailedError) as caught:
            await handle.result()
        info = await handle.info()
    err = caught.value
    assert (err.run_id, err.step, err.error_type, err.message) == (
        handle.run_id,
        "Write",
        "ValueError",
        "the disk is full",
    )
    assert "explode_here" in err.traceback and "ValueError: the disk is full" in err.traceback
    assert "Write" in str(err) and handle.run_id in str(err)
    assert info.status == RunStatus.FAILED
    assert info.error["step"] == "Write"
    assert info.error["type"] == "ValueError"
    assert info.error["message"] == "the disk is full"
    assert "explode_here" in info.error["traceback"]


# -- events and info ---------------------------------------------------------------------


async def test_ctx_emit_records_a_custom_event() -> None:
    def work(ctx):
        ctx.emit("progress", {"pct": 50})
        ctx.emit("progress", {"pct": 100})
        return END

    async with WorkflowRunner(Workflow("W").flow({START: lambda ctx: "Work", "Work": work})) as runner:
        handle = await runner.run()
        await handle.result()
        events = await all_events(handle)
    progress = [e for e in events if e.kind == "progress"]
    assert [(e.step, e.data, e.run_id) for e in progress] == [
        ("Work", {"pct": 50}, handle.run_id),
        ("Work", {"pct": 100}, handle.run_id),
    ]


async def test_events_come_in_order_and_end_at_the_final_status() -> None:
    def work(ctx):
        ctx.emit("note", "hi")
        return Next(END, output=1)

    async with WorkflowRunner(Workflow("W").flow({START: lambda ctx: "Work", "Work": work})) as runner:
        handle = await runner.run()
        await handle.result()
        events = await all_events(handle)
    assert [(e.kind, e.step) for e in events] == [
        ("run_started", None),
        ("step_started", START),
        ("step_completed", START),
        ("step_started", "Work"),
        ("note", "Work"),
        ("step_completed", "Work"),
        ("completed", None),
    ]
    assert all(isinstance(e, RunEvent) and e.run_id == handle.run_id for e in events)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.at for e in events] == sorted(e.at for e in events)
    assert events[0].data == {"workflow": "W"}


async def test_events_follow_a_live_run_until_it_ends() -> None:
    release = asyncio.Event()

    async def work(ctx):
        ctx.emit("before")
        await release.wait()
        ctx.emit("after")
        return END

    async with WorkflowRunner(Workflow("W").flow({START: work})) as runner:
        handle = await runner.run()
        kinds: list[str] = []

        async def follow() -> None:
            async for ev in handle.events():
                kinds.append(ev.kind)

        follower = asyncio.create_task(follow())
        await wait_until(lambda: "before" in kinds, what="the live 'before' event")
        assert not follower.done()
        release.set()
        await asyncio.wait_for(follower, 5)
    assert kinds[-3:] == ["after", "step_completed", "completed"]


async def test_events_of_a_failed_run_end_with_failed() -> None:
    def boom(ctx):
        raise RuntimeError("no")

    async with WorkflowRunner(Workflow("W").flow({START: boom})) as runner:
        handle = await runner.run()
        events = await all_events(handle)
    assert [e.kind for e in events][-2:] == ["step_failed", "failed"]
    assert events[-1].data == {"type": "RuntimeError", "message": "no"}


async def test_run_info_describes_the_run() -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def work(ctx):
        started.set()
        await release.wait()
        return END

    before = datetime.now(UTC)
    async with WorkflowRunner(Workflow("Info").flow({START: lambda ctx: "Work", "Work": work})) as runner:
        handle = await runner.run()
        await asyncio.wait_for(started.wait(), 5)
        running = await wait_status(handle, RunStatus.RUNNING)
        release.set()
        await handle.result()
        done = await handle.info()
    assert isinstance(running, RunInfo)
    assert running.run_id == handle.run_id
    assert running.workflow == "Info"
    assert running.status == RunStatus.RUNNING
    assert running.step == "Work"
    assert running.pending is None and running.error is None
    assert running.usage == Usage(0, 0)
    assert done.status == "completed"
    assert done.created_at == running.created_at
    assert before <= done.created_at <= done.updated_at <= datetime.now(UTC)
    assert done.created_at.tzinfo is not None


async def test_run_result_has_status_output_state_and_step_results() -> None:
    def first(ctx):
        ctx.set_state(count=2)
        return Next(END, output="done")

    result = await run_to_end(Workflow("W").state(Counter).flow({START: first}))
    assert result == RunResult(RunStatus.COMPLETED, "done", Counter(count=2), {START: "done"})


async def test_a_long_flow_of_plain_steps_lets_other_tasks_run() -> None:
    # Memory commits never suspend: without a yield now and then, a 10,000-step loop
    # would hold the event loop (watchers, other runs, timers) until it ended.
    from agentflow import END, START, Workflow, WorkflowRunner

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    wf = Workflow("Long").flow(
        {START: lambda ctx: "Loop", "Loop": lambda ctx: "Loop" if ctx.visit < 10_000 else END}
    )
    async with WorkflowRunner(wf) as runner:
        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        before = ticks
        await (await runner.run()).result()
        task.cancel()
    assert ticks - before > 100, "the loop was held for the whole run"
