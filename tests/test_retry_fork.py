"""Operating runs: retry a failed run, fork a run at a step, wait_for (SPEC section 17)."""

from __future__ import annotations

import asyncio
import collections

import pytest
from conftest import StoreFactory
from helpers import all_events, wait_status
from pydantic import BaseModel

from agentflow import (
    END,
    START,
    HumanApproval,
    InvalidStateError,
    Next,
    Parallel,
    RetryPolicy,
    Run,
    RunFailedError,
    RunNotFoundError,
    RunStatus,
    StateValidationError,
    UnknownStepError,
    Wait,
    Workflow,
    WorkflowRunner,
    step,
)
from agentflow.stores.contract import Store

KINDS = ["memory", "sqlite", "redis"]


class Ledger(BaseModel):
    items: list[str] = []
    note: str = ""
    count: int = 0


class Pipeline:
    """START → Fetch → Transform → Load → END; Transform fails while ``broken`` is set."""

    def __init__(self, broken: bool = True, policy: RetryPolicy | None = None) -> None:
        self.broken = broken
        self.calls: collections.Counter[str] = collections.Counter()
        self.attempts: list[int] = []
        self.seen: list[tuple[list[str], dict[str, object]]] = []
        self.policy = policy

    def workflow(self) -> Workflow:
        def start(ctx):
            self.calls["Start"] += 1
            ctx.set_state(items=["start"], count=1)
            return Next("Fetch", output="started")

        def fetch(ctx):
            self.calls["Fetch"] += 1
            ctx.set_state(items=[*ctx.state.items, "fetched"], count=ctx.state.count + 1)
            return Next("Transform", output={"rows": 3})

        def transform(ctx):
            self.calls["Transform"] += 1
            self.attempts.append(ctx.attempt)
            self.seen.append((list(ctx.state.items), dict(ctx.step_results)))
            ctx.set_state(items=[*ctx.state.items, "half-transformed"])  # lost when it fails
            if self.broken:
                raise ValueError("upstream schema changed")
            ctx.set_state(items=[*ctx.state.items[:-1], "transformed"], count=ctx.state.count + 1)
            return Next("Load", output={"rows": ctx.step_results["Fetch"]["rows"] * 2})

        def load(ctx):
            self.calls["Load"] += 1
            return Next(END, output={"loaded": ctx.step_results["Transform"]["rows"], "note": ctx.state.note})

        fn = step(transform, retry=self.policy) if self.policy is not None else transform
        return (
            Workflow("Pipeline")
            .state(Ledger)
            .flow({START: start, "Fetch": fetch, "Transform": fn, "Load": load})
        )


def shared(make_store: StoreFactory, kind: str, first: Store) -> Store:
    """Another store on the same data (as another process would open; memory: the same one)."""
    return first if kind == "memory" else make_store(kind)


async def failed_run(runner: WorkflowRunner) -> str:
    handle = await runner.run()
    with pytest.raises(RunFailedError) as err:
        await handle.result(timeout=5)
    assert err.value.step == "Transform"
    return handle.run_id


# -- retry --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_retry_continues_a_failed_run_at_its_failing_step_with_what_it_had_before(kind, make_store):
    p = Pipeline()
    async with WorkflowRunner(p.workflow(), store=make_store(kind)) as runner:
        run_id = await failed_run(runner)
        p.broken = False
        handle = await runner.retry(run_id)
        result = await handle.result(timeout=5)
        info = await handle.info()
        events = await all_events(handle)
    assert result.status == RunStatus.COMPLETED and info.error is None
    assert result.output == {"loaded": 6, "note": ""}
    assert result.state == Ledger(items=["start", "fetched", "transformed"], count=3)
    # Steps before the failing one did not run again; it saw the same state and results both times.
    assert p.calls == {"Start": 1, "Fetch": 1, "Transform": 2, "Load": 1}
    assert p.seen[0] == p.seen[1] == (["start", "fetched"], {"__start__": "started", "Fetch": {"rows": 3}})
    kinds = [(e.kind, e.step) for e in events]
    at = kinds.index(("failed", "Transform"))
    assert kinds[at + 1 : at + 3] == [("resumed", "Transform"), ("step_started", "Transform")]
    retried = events[at + 1].data
    assert retried["retried"] is True
    assert retried["error"] == {"type": "ValueError", "message": "upstream schema changed"}


async def test_ctx_attempt_counts_on_across_a_retry() -> None:
    p = Pipeline(policy=RetryPolicy(max_attempts=2, initial_delay=0.001))
    async with WorkflowRunner(p.workflow()) as runner:
        run_id = await failed_run(runner)
        assert p.attempts == [1, 2]
        with pytest.raises(RunFailedError):
            await (await runner.retry(run_id)).result(timeout=5)
        assert p.attempts == [1, 2, 3, 4]  # the policy's two attempts again, counted on
        p.broken = False
        await (await runner.retry(run_id)).result(timeout=5)
    assert p.attempts == [1, 2, 3, 4, 5]


async def test_ctx_attempt_counts_on_for_a_step_without_a_retry_policy() -> None:
    p = Pipeline()
    async with WorkflowRunner(p.workflow()) as runner:
        run_id = await failed_run(runner)
        with pytest.raises(RunFailedError):
            await (await runner.retry(run_id)).result(timeout=5)
        p.broken = False
        await (await runner.retry(run_id)).result(timeout=5)
    assert p.attempts == [1, 2, 3]


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
async def test_retry_from_another_runner_after_the_first_closed(kind, make_store):
    p = Pipeline()
    async with WorkflowRunner(p.workflow(), store=make_store(kind)) as first:
        run_id = await failed_run(first)
    p.broken = False
    async with WorkflowRunner(p.workflow(), store=make_store(kind)) as second:
        handle = await second.attach(run_id)
        result = await (await handle.retry()).result(timeout=5)
    assert result.output == {"loaded": 6, "note": ""}
    assert p.calls == {"Start": 1, "Fetch": 1, "Transform": 2, "Load": 1}
    assert p.attempts == [1, 2]


async def test_retry_of_a_run_that_is_not_failed_raises_invalid_state() -> None:
    p = Pipeline(broken=False)
    async with WorkflowRunner(p.workflow()) as runner:
        handle = await runner.run()
        await handle.result(timeout=5)
        with pytest.raises(InvalidStateError, match=rf"run {handle.run_id} is completed, not failed"):
            await runner.retry(handle.run_id)
        with pytest.raises(RunNotFoundError, match="no-such-run"):
            await runner.retry("no-such-run")
    assert p.calls["Load"] == 1


async def test_retry_of_a_failed_fan_out_runs_only_the_branches_that_did_not_finish() -> None:
    calls: collections.Counter[str] = collections.Counter()
    state = {"broken": True}

    def ok(ctx):
        calls["ok"] += 1
        return "fine"

    async def flaky(ctx):
        calls["flaky"] += 1
        await asyncio.sleep(0.05)  # "ok" finishes, and is checkpointed, first
        if state["broken"]:
            raise RuntimeError("disk full")
        return "recovered"

    wf = Workflow("Fan").flow(
        {
            START: lambda ctx: Parallel({"ok": ok, "flaky": flaky}, "Join", on_error="fail"),
            "Join": lambda ctx: Next(END, output=[ctx.step_results["ok"], ctx.step_results["flaky"]]),
        }
    )
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run()
        with pytest.raises(RunFailedError):
            await handle.result(timeout=5)
        state["broken"] = False
        result = await (await handle.retry()).result(timeout=5)
    assert result.output == ["fine", "recovered"]
    assert calls == {"ok": 1, "flaky": 2}


# -- fork ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_fork_starts_a_new_run_at_a_step_with_the_history_and_state_it_had_there(kind, make_store):
    p = Pipeline(broken=False)
    store = make_store(kind)
    async with WorkflowRunner(p.workflow(), store=store) as runner:
        original = await runner.run()
        first = await original.result(timeout=5)
        before = await all_events(original)
        fork = await runner.fork(original.run_id, at="Transform", state={"note": "replayed"})
        assert fork.run_id != original.run_id
        result = await fork.result(timeout=5)
        after = await all_events(await runner.attach(original.run_id))
        forked_events = await all_events(fork)
    # The fork saw the state as it was when the original reached Transform, plus the merge.
    assert p.seen[1] == (["start", "fetched"], {"__start__": "started", "Fetch": {"rows": 3}})
    assert result.output == {"loaded": 6, "note": "replayed"}
    assert result.state == Ledger(items=["start", "fetched", "transformed"], note="replayed", count=3)
    assert result.step_results == {
        "__start__": "started",
        "Fetch": {"rows": 3},
        "Transform": {"rows": 6},
        "Load": {"loaded": 6, "note": "replayed"},
    }
    assert p.calls == {"Start": 1, "Fetch": 1, "Transform": 2, "Load": 2}
    # The original is untouched.
    assert after == before and first.state == Ledger(items=["start", "fetched", "transformed"], count=3)
    assert forked_events[0].kind == "run_started"
    assert forked_events[0].data["forked_from"] == {
        "run_id": original.run_id,
        "step": "Transform",
        "visit": 3,
    }
    assert [(e.kind, e.step) for e in forked_events[1:3]] == [
        ("step_started", "Transform"),
        ("step_completed", "Transform"),
    ]


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
async def test_fork_of_a_run_from_another_runner_and_the_forks_result_elsewhere(kind, make_store):
    p = Pipeline()
    async with WorkflowRunner(p.workflow(), store=make_store(kind)) as first:
        run_id = await failed_run(first)
    p.broken = False
    async with WorkflowRunner(p.workflow(), store=make_store(kind)) as second:
        fork = await second.fork(run_id, at="Transform", run_id="fork-1")
        assert fork.run_id == "fork-1"
        assert (await fork.result(timeout=5)).output == {"loaded": 6, "note": ""}
        original = await second.attach(run_id)
        assert (await original.info()).status == RunStatus.FAILED  # untouched
    async with WorkflowRunner(p.workflow(), store=make_store(kind)) as third:
        assert (await (await third.attach("fork-1")).result(timeout=5)).output == {"loaded": 6, "note": ""}


async def test_fork_at_a_step_visited_several_times_starts_from_its_last_visit() -> None:
    seen: list[int] = []

    def loop(ctx):
        seen.append(ctx.state.count)
        ctx.set_state(count=ctx.state.count + 1, items=[*ctx.state.items, f"lap{ctx.state.count}"])
        return "Loop" if ctx.state.count < 3 else Next(END, output=ctx.state.count)

    wf = Workflow("Laps").state(Ledger).flow({START: lambda ctx: "Loop", "Loop": loop})
    async with WorkflowRunner(wf) as runner:
        original = await runner.run()
        assert (await original.result(timeout=5)).output == 3
        fork = await original.fork(at="Loop")
        result = await fork.result(timeout=5)
    assert seen == [0, 1, 2, 2]
    assert result.state == Ledger(items=["lap0", "lap1", "lap2"], count=3)
    assert result.step_results == {"Loop": 3}


async def test_fork_after_a_gate_keeps_the_decision_taken_before_the_step() -> None:
    decisions = []

    def publish(ctx):
        decisions.append((ctx.decision.by, ctx.decision.comment))
        return Next(END, output="published")

    wf = Workflow("Gated").flow(
        {START: lambda ctx: Wait(HumanApproval(approvers=["ed"]), "Publish"), "Publish": publish}
    )
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run()
        await wait_status(handle, RunStatus.WAITING)
        await (await handle.approve(by="ed", comment="ok")).result(timeout=5)
        fork = await runner.fork(handle.run_id, at="Publish")
        assert (await fork.result(timeout=5)).output == "published"
    assert decisions == [("ed", "ok"), ("ed", "ok")]


async def test_fork_with_a_run_id_that_exists_returns_it_and_starts_nothing() -> None:
    p = Pipeline(broken=False)
    async with WorkflowRunner(p.workflow()) as runner:
        original = await runner.run()
        await original.result(timeout=5)
        fork = await runner.fork(original.run_id, at="Load", run_id="again")
        await fork.result(timeout=5)
        same = await runner.fork(original.run_id, at="Load", run_id="again")
        assert same.run_id == "again"
        await same.result(timeout=5)
    assert p.calls["Load"] == 2


async def test_fork_errors_name_the_run_the_step_and_the_field() -> None:
    p = Pipeline()
    async with WorkflowRunner(p.workflow()) as runner:
        run_id = await failed_run(runner)
        with pytest.raises(UnknownStepError, match=rf"run {run_id} at step 'Nope'.*steps are \['Fetch'"):
            await runner.fork(run_id, at="Nope")
        with pytest.raises(
            InvalidStateError, match=rf"run {run_id} at step 'Load': the run never reached it"
        ):
            await runner.fork(run_id, at="Load")
        with pytest.raises(StateValidationError, match=rf"run {run_id} at step 'Fetch'.*'count'") as err:
            await runner.fork(run_id, at="Fetch", state={"count": "many"})
        assert err.value.field == "count"
        with pytest.raises(StateValidationError, match="no field 'colour'") as err:
            await runner.fork(run_id, at="Fetch", state={"colour": "red"})
        assert err.value.field == "colour"
        with pytest.raises(RunNotFoundError):
            await runner.fork("no-such-run", at="Fetch")
        assert len(await runner.list_runs()) == 1  # nothing was created


# -- wait_for -------------------------------------------------------------------------------


async def test_wait_for_returns_at_once_when_the_run_is_there_and_raises_for_an_unknown_run() -> None:
    p = Pipeline(broken=False)
    wf = Workflow("Held").flow(
        {START: lambda ctx: Wait(HumanApproval(approvers=["a"]), "Done"), "Done": lambda ctx: END}
    )
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run()
        info = await handle.wait_for(RunStatus.WAITING, timeout=5)
        assert info.status == RunStatus.WAITING
        assert (await handle.wait_for("waiting", timeout=0.01)).status == RunStatus.WAITING
        await handle.stop()
        await runner.delete(handle.run_id)
        with pytest.raises(RunNotFoundError, match=handle.run_id):
            await handle.wait_for(RunStatus.COMPLETED, timeout=1)
    async with WorkflowRunner(p.workflow()) as runner:
        handle = await runner.run()
        assert (await handle.wait_for(RunStatus.COMPLETED, timeout=5)).status == RunStatus.COMPLETED


async def test_retry_of_an_imperative_run_replays_finished_calls_and_counts_attempts_on() -> None:
    calls: collections.Counter[str] = collections.Counter()
    attempts: list[int] = []
    broken = {"b": True}

    def fetch(n: int) -> int:
        calls["fetch"] += 1
        return n * 2

    def publish(ctx, value: int) -> str:
        calls["publish"] += 1
        attempts.append(ctx.attempt)
        if broken["b"]:
            raise ConnectionError("registry down")
        return f"published {value}"

    async def main(ctx):
        value = await ctx.step("fetch", fetch, 21)
        return await ctx.step("publish", publish, ctx, value)

    async with WorkflowRunner(Workflow("Imp").execute(main)) as runner:
        handle = await runner.run()
        with pytest.raises(RunFailedError, match="registry down"):
            await handle.result(timeout=5)
        broken["b"] = False
        result = await (await handle.retry()).result(timeout=5)
    assert result.output == "published 42"
    assert calls == {"fetch": 1, "publish": 2}
    assert attempts == [1, 2]


async def test_a_step_that_returned_an_unknown_step_counts_its_attempt_on_retry() -> None:
    attempts: list[int] = []
    route = {"to": "Nowhere"}

    def pick(ctx):
        attempts.append(ctx.attempt)
        return route["to"]

    wf = Workflow("Route").flow({START: pick, "Done": lambda ctx: Next(END, output="done")})
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run()
        with pytest.raises(RunFailedError) as err:
            await handle.result(timeout=5)
        assert err.value.error_type == "UnknownStepError"
        route["to"] = "Done"
        assert (await (await handle.retry()).result(timeout=5)).output == "done"
    assert attempts == [1, 2]


async def test_fork_at_start_runs_again_from_the_top_with_the_same_input() -> None:
    seen: list[str] = []

    def start(ctx):
        seen.append(ctx.input["who"])
        return Next(END, output=f"hello {ctx.input['who']}")

    async with WorkflowRunner(Workflow("Hello").flow({START: start})) as runner:
        original = await runner.run({"who": "ada"})
        await original.result(timeout=5)
        fork = await runner.fork(original.run_id, at=START)
        assert (await fork.result(timeout=5)).output == "hello ada"
    assert seen == ["ada", "ada"]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_fork_after_a_step_that_ran_a_child_sees_the_state_that_step_set(kind, make_store) -> None:
    seen: list[Ledger] = []

    def child(ctx):
        return Next(END, output=ctx.input["n"] * 10)

    kid = Workflow("Kid").flow({START: child})

    def spawn(ctx):
        ctx.set_state(note="before the child", count=5)
        return Run(kid, {"n": 4}, "After")

    def after(ctx):
        seen.append(ctx.state)
        return Next(END, output=ctx.step_results[START])

    wf = Workflow("Parent").state(Ledger).flow({START: spawn, "After": after})
    async with WorkflowRunner(wf, store=make_store(kind)) as runner:
        original = await runner.run()
        assert (await original.result(timeout=10)).output == 40
        fork = await runner.fork(original.run_id, at="After", state={"items": ["forked"]})
        assert (await fork.result(timeout=10)).output == 40
    assert seen[1] == Ledger(items=["forked"], note="before the child", count=5)
