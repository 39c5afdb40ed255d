"""Gates: Wait(HumanApproval(...), target) on the in-memory store (SPEC section 3)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from helpers import all_events, other_tasks, wait_no_tasks, wait_status
from pydantic import BaseModel

from agentflow import (
    END,
    START,
    Decision,
    HumanApproval,
    InvalidStateError,
    Next,
    NotAuthorizedError,
    RunFailedError,
    RunHandle,
    RunRejectedError,
    RunStatus,
    Wait,
    Workflow,
    WorkflowRunner,
)


class Doc(BaseModel):
    text: str = ""


def review_flow(
    calls: dict[str, int],
    seen: list[Decision | None],
    approvers: list[str] | None = None,
    quorum: int = 1,
    timeout: float | timedelta | None = None,
    on_reject: str | None = None,
    on_timeout: str | None = None,
) -> Workflow:
    """START → Draft (returns the gate) → Publish; Revise and Late record the decision too."""

    def draft(ctx):
        calls["Draft"] = calls.get("Draft", 0) + 1
        ctx.set_state(text="draft v1")
        gate = HumanApproval(
            approvers=approvers or ["alice", "bob"],
            quorum=quorum,
            timeout=timeout,
            prompt="Publish this?",
            context={"draft": ctx.state.text},
        )
        return Wait(gate, "Publish", on_reject=on_reject, on_timeout=on_timeout)

    def record(name: str):
        def fn(ctx):
            calls[name] = calls.get(name, 0) + 1
            seen.append(ctx.decision)
            return Next(END, output=name)

        return fn

    def start(ctx):
        seen.append(ctx.decision)  # no gate yet
        return "Draft"

    return (
        Workflow("Review")
        .state(Doc)
        .flow(
            {
                START: start,
                "Draft": draft,
                "Publish": record("Publish"),
                "Revise": record("Revise"),
                "Late": record("Late"),
            }
        )
    )


async def start_waiting(runner: WorkflowRunner) -> RunHandle:
    handle = await runner.run()
    await wait_status(handle, RunStatus.WAITING)
    return handle


async def test_reaching_a_gate_commits_a_waiting_run_with_the_pending_approval() -> None:
    calls: dict[str, int] = {}
    async with WorkflowRunner(review_flow(calls, [])) as runner:
        handle = await start_waiting(runner)
        info = await handle.info()
    assert info.status == RunStatus.WAITING
    assert info.step == "Draft"
    pending = info.pending
    assert pending is not None and info.approvals == (pending,)
    assert pending.kind == "gate" and pending.id.startswith("ap_")
    assert (pending.run_id, pending.workflow, pending.step) == (handle.run_id, "Review", "Draft")
    assert pending.approvers == ("alice", "bob")
    assert pending.quorum == 1
    assert pending.prompt == "Publish this?"
    assert pending.context == {"draft": "draft v1"}
    assert pending.votes == () and pending.form is None and pending.deadline is None
    assert (pending.agent, pending.tool, pending.arguments) == (None, None, None)
    assert calls == {"Draft": 1}


async def test_approve_on_the_handle_continues_at_target_with_the_decision() -> None:
    calls: dict[str, int] = {}
    seen: list[Decision | None] = []
    async with WorkflowRunner(review_flow(calls, seen)) as runner:
        handle = await start_waiting(runner)
        before = datetime.now(UTC)
        back = await handle.approve(by="alice", comment="ship it", data={"text": "edited"})
        assert isinstance(back, RunHandle) and back.run_id == handle.run_id
        result = await back.result()
    assert result.status == RunStatus.COMPLETED
    assert result.output == "Publish"
    assert result.state == Doc(text="draft v1")
    assert seen[0] is None
    decision = seen[1]
    assert isinstance(decision, Decision)
    assert decision.approved is True
    assert decision.by == "alice"
    assert decision.comment == "ship it"
    assert decision.data == {"text": "edited"}
    assert before <= decision.at <= datetime.now(UTC)
    assert decision.at.tzinfo is not None
    # The step that returned the gate is not run again.
    assert calls == {"Draft": 1, "Publish": 1}


async def test_approve_on_the_runner_by_run_id() -> None:
    calls: dict[str, int] = {}
    async with WorkflowRunner(review_flow(calls, [])) as runner:
        handle = await start_waiting(runner)
        back = await runner.approve(handle.run_id, by="bob")
        assert (await back.result()).output == "Publish"
        assert (await handle.info()).status == RunStatus.COMPLETED
    assert calls == {"Draft": 1, "Publish": 1}


async def test_reject_without_on_reject_ends_the_run_rejected() -> None:
    calls: dict[str, int] = {}
    async with WorkflowRunner(review_flow(calls, [])) as runner:
        handle = await start_waiting(runner)
        back = await runner.reject(handle.run_id, by="bob", reason="too long")
        with pytest.raises(RunRejectedError) as err:
            await back.result()
        info = await handle.info()
        kinds = [e.kind for e in await all_events(handle)]
    assert (err.value.run_id, err.value.status, err.value.reason, err.value.by) == (
        handle.run_id,
        "rejected",
        "too long",
        "bob",
    )
    assert info.status == RunStatus.REJECTED
    assert info.pending is None
    assert kinds[-2:] == ["decided", "rejected"]
    assert calls == {"Draft": 1}


async def test_reject_with_on_reject_continues_there() -> None:
    calls: dict[str, int] = {}
    seen: list[Decision | None] = []
    async with WorkflowRunner(review_flow(calls, seen, on_reject="Revise")) as runner:
        handle = await start_waiting(runner)
        result = await (await handle.reject(by="alice", reason="needs work")).result()
    assert result.output == "Revise"
    decision = seen[-1]
    assert decision is not None
    assert (decision.approved, decision.by, decision.comment, decision.reason) == (
        False,
        "alice",
        "needs work",
        "needs work",
    )
    assert calls == {"Draft": 1, "Revise": 1}


async def test_a_decision_by_someone_not_an_approver_changes_nothing() -> None:
    calls: dict[str, int] = {}
    async with WorkflowRunner(review_flow(calls, [])) as runner:
        handle = await start_waiting(runner)
        before = await handle.info()
        with pytest.raises(NotAuthorizedError, match="mallory"):
            await handle.approve(by="mallory")
        with pytest.raises(NotAuthorizedError):
            await runner.reject(handle.run_id, by="mallory", reason="no")
        after = await handle.info()
        assert (after.status, after.pending, after.updated_at) == (
            before.status,
            before.pending,
            before.updated_at,
        )
        assert (await (await handle.approve(by="alice")).result()).output == "Publish"
        kinds = [(e.kind, (e.data or {}).get("by")) for e in await all_events(handle)]
    # Nothing was recorded for mallory: the gate's "waiting" is followed by alice's decision.
    waiting = kinds.index(("waiting", None))
    assert kinds[waiting + 1] == ("decided", "alice")
    assert [k for k in kinds if k[0] == "decided"] == [("decided", "alice")]
    assert calls == {"Draft": 1, "Publish": 1}


async def test_quorum_counts_the_same_approver_once() -> None:
    calls: dict[str, int] = {}
    seen: list[Decision | None] = []
    flow = review_flow(calls, seen, approvers=["alice", "bob", "carol"], quorum=2)
    async with WorkflowRunner(flow) as runner:
        handle = await start_waiting(runner)
        await handle.approve(by="alice", comment="first")
        await handle.approve(by="alice", comment="again")
        info = await handle.info()
        assert info.status == RunStatus.WAITING
        assert info.pending is not None and info.pending.votes == ("alice",)
        assert calls == {"Draft": 1}
        result = await (await handle.approve(by="carol", comment="second")).result()
        decided = [e.data for e in await all_events(handle) if e.kind == "decided"]
    assert result.output == "Publish"
    assert seen[-1] is not None and seen[-1].by == "carol"
    # Every decision is kept: who, when, approve or reject, comment.
    assert [(d["by"], d["approved"], d["comment"]) for d in decided] == [
        ("alice", True, "first"),
        ("alice", True, "again"),
        ("carol", True, "second"),
    ]
    assert all(isinstance(d["at"], float) for d in decided)


async def test_deciding_a_run_that_is_not_waiting_raises_invalid_state() -> None:
    release = asyncio.Event()

    async def busy(ctx):
        await release.wait()
        return END

    flow = Workflow("Busy").flow({START: busy})
    async with WorkflowRunner(flow) as runner:
        handle = await runner.run()
        await wait_status(handle, RunStatus.RUNNING)
        with pytest.raises(InvalidStateError, match="running"):
            await handle.approve(by="alice")
        release.set()
        await handle.result()
        with pytest.raises(InvalidStateError, match="completed"):
            await handle.reject(by="alice", reason="late")


async def test_approving_twice_raises_invalid_state_the_second_time() -> None:
    calls: dict[str, int] = {}
    async with WorkflowRunner(review_flow(calls, [])) as runner:
        handle = await start_waiting(runner)
        await (await handle.approve(by="alice")).result()
        with pytest.raises(InvalidStateError):
            await handle.approve(by="bob")
    assert calls == {"Draft": 1, "Publish": 1}


async def test_timeout_goes_to_on_timeout_with_a_timed_out_decision() -> None:
    calls: dict[str, int] = {}
    seen: list[Decision | None] = []
    async with WorkflowRunner(review_flow(calls, seen, timeout=0.1, on_timeout="Late")) as runner:
        handle = await runner.run()
        result = await handle.result(timeout=5)
    assert result.output == "Late"
    decision = seen[-1]
    assert decision is not None
    assert decision.approved is False and decision.timed_out is True and decision.by is None
    assert calls == {"Draft": 1, "Late": 1}


async def test_timeout_without_on_timeout_ends_the_run_expired() -> None:
    calls: dict[str, int] = {}
    async with WorkflowRunner(review_flow(calls, [], timeout=timedelta(milliseconds=100))) as runner:
        handle = await runner.run()
        info = await wait_status(handle, RunStatus.WAITING)
        assert info.pending is not None and info.pending.deadline is not None
        with pytest.raises(RunRejectedError) as err:
            await handle.result(timeout=5)
        assert (await handle.info()).status == RunStatus.EXPIRED
        with pytest.raises(InvalidStateError):
            await handle.approve(by="alice")
    assert err.value.status == "expired"
    assert calls == {"Draft": 1}


async def test_a_waiting_run_holds_no_task() -> None:
    baseline = set(asyncio.all_tasks())
    calls: dict[str, int] = {}
    # A short lease makes the runner's lease-renewal task notice quickly that it has no run left.
    async with WorkflowRunner(review_flow(calls, []), lease_ttl=0.3) as runner:
        handle = await start_waiting(runner)
        assert not [t for t in other_tasks(baseline) if handle.run_id in t.get_name()]
        # What is left is the runner's own: its timer sweeper, one for all its runs.
        baseline |= {t for t in other_tasks(baseline) if t.get_name().startswith("agentflow:timers:")}
        await wait_no_tasks(baseline)
        result = await (await handle.approve(by="alice")).result()
    assert result.output == "Publish"
    assert calls == {"Draft": 1, "Publish": 1}


async def test_two_gates_in_one_run_each_see_their_own_decision() -> None:
    seen: list[Decision | None] = []

    def first(ctx):
        return Wait(HumanApproval(approvers=["alice"]), "Second")

    def second(ctx):
        seen.append(ctx.decision)
        return Wait(HumanApproval(approvers=["bob"]), "Done", on_reject="Done")

    def done(ctx):
        seen.append(ctx.decision)
        return END

    flow = Workflow("Two").flow({START: first, "Second": second, "Done": done})
    async with WorkflowRunner(flow) as runner:
        handle = await runner.run()
        await wait_status(handle, RunStatus.WAITING)
        await handle.approve(by="alice", comment="one")
        await wait_status(handle, RunStatus.WAITING)
        with pytest.raises(NotAuthorizedError):
            await handle.approve(by="alice")
        await (await handle.reject(by="bob", reason="two")).result()
    assert [(d.by, d.approved, d.comment) for d in seen if d] == [
        ("alice", True, "one"),
        ("bob", False, "two"),
    ]


def test_decision_records_default_their_time() -> None:
    d = Decision(approved=True, by="alice")
    assert d.at.tzinfo is not None
    assert (d.comment, d.data, d.timed_out) == (None, None, False)


async def test_a_gate_whose_target_is_not_a_step_fails_before_waiting() -> None:
    wf = Workflow("Bad").flow(
        {
            START: lambda ctx: Wait(HumanApproval(approvers=["a"]), "Done", on_reject="Redo"),
            "Done": lambda ctx: END,
        }
    )
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run()
        with pytest.raises(RunFailedError) as err:
            await handle.result()
    assert err.value.error_type == "UnknownStepError"
    assert "'Redo'" in err.value.message


async def test_a_decision_from_another_runner_on_the_same_store_moves_the_run_on() -> None:
    from agentflow.stores.memory import MemoryStore

    store = MemoryStore()
    calls: dict[str, int] = {}
    flow = review_flow(calls, [])
    async with WorkflowRunner(flow, store=store) as starter, WorkflowRunner(flow, store=store) as reviewer:
        handle = await start_waiting(starter)
        follower = asyncio.create_task(handle.result(timeout=5))
        await reviewer.approve(handle.run_id, by="bob")
        result = await follower
    assert result.output == "Publish"
    assert calls == {"Draft": 1, "Publish": 1}


async def test_two_racing_approvals_move_the_run_on_once() -> None:
    calls: dict[str, int] = {}
    async with WorkflowRunner(review_flow(calls, [])) as runner:
        handle = await start_waiting(runner)
        outcomes = await asyncio.gather(
            runner.approve(handle.run_id, by="alice"),
            runner.approve(handle.run_id, by="bob"),
            return_exceptions=True,
        )
        assert (await handle.result()).output == "Publish"
    assert sorted(type(o).__name__ for o in outcomes) == ["InvalidStateError", "RunHandle"]
    assert calls == {"Draft": 1, "Publish": 1}
