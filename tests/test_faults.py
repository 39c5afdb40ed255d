"""Faults: control requests racing each other and the steps, dead owners, lost replies, outages.

Every control call must return within a bound and be honoured, wherever the run is:
advanced here, advanced by another runner, parked at a gate, or owned by a process
that died. A reply the store sent but the caller never got must neither be lost nor
counted twice, and a store outage must never fail a run.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import pytest
from helpers import all_events, wait_status, wait_until
from test_crash import _kill, _lines, _spawn, _target, _wait_for

from agentflow import (
    END,
    START,
    HumanApproval,
    Next,
    RunStatus,
    RunStoppedError,
    StoreError,
    Wait,
    Workflow,
    WorkflowRunner,
)

#: Seconds a control call may take here: runs under test move in milliseconds.
BOUND = 3.0


class Gated:
    """START → Work (waits for the test, then returns a gate, or goes on) → Done."""

    def __init__(self, gate: bool = True) -> None:
        self.gate = gate
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.ran: list[str] = []
        self.hold: Any = None  # an async callable awaited instead of ``release`` when set

    def workflow(self, name: str = "Faults") -> Workflow:
        async def work(ctx):
            self.ran.append("Work")
            self.started.set()
            if self.hold is not None:
                await self.hold(ctx)
            else:
                await self.release.wait()
            if self.gate:
                return Wait(HumanApproval(approvers=["ops"], quorum=1), "Done")
            return "Done"

        def done(ctx):
            self.ran.append("Done")
            return Next(END, output="done")

        return Workflow(name).flow({START: lambda ctx: "Work", "Work": work, "Done": done})


async def _control(store: Any, run_id: str, flag: str) -> None:
    """Wait until another runner's ``flag`` (pause or stop) is on the stored record."""
    async with asyncio.timeout(BOUND):
        while True:
            if (await store.get(run_id)).control == flag:
                return
            await asyncio.sleep(0.005)


class Replies:
    """A store whose replies can be lost or slow.

    ``lose["update"]`` / ``lose["commit"]``: that many calls apply on the real store, then
    raise as if the connection dropped before the reply. ``slow``: each commit applies,
    sets ``applied``, then takes ``slow`` seconds to answer (a cancel lands in between).
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        self.lose: collections.Counter[str] = collections.Counter()
        self.lost: list[str] = []
        self.slow = 0.0
        self.applied = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def update(self, run_id: str, change: Any) -> Any:
        result = await self._store.update(run_id, change)
        if self.lose["update"]:
            self.lose["update"] -= 1
            self.lost.append("update")
            raise StoreError(f"run {run_id}: connection reset before the reply")
        return result

    async def commit(self, run_id: str, lease: Any, commit: Any) -> Any:
        result = await self._store.commit(run_id, lease, commit)
        if self.lose["commit"]:
            self.lose["commit"] -= 1
            self.lost.append("commit")
            raise StoreError(f"run {run_id}: connection reset before the reply")
        if self.slow:
            self.applied.set()
            await asyncio.sleep(self.slow)
        return result


# -- stop racing pause ---------------------------------------------------------------


async def test_stop_while_the_pause_is_being_committed_ends_stopped(store) -> None:
    replies = Replies(store)
    g = Gated(gate=False)
    async with WorkflowRunner(g.workflow(), store=replies, lease_ttl=10) as runner:  # type: ignore[arg-type]
        handle = await runner.run()
        await asyncio.wait_for(g.started.wait(), BOUND)
        pausing = asyncio.create_task(handle.pause())
        await asyncio.sleep(0)
        replies.slow = 0.2  # the pause is committed; its reply is on its way when the stop comes
        g.release.set()
        await asyncio.wait_for(replies.applied.wait(), BOUND)
        assert (await store.get(handle.run_id)).status == RunStatus.PAUSED
        await asyncio.wait_for(asyncio.gather(pausing, handle.stop()), BOUND)
        assert (await handle.info()).status == RunStatus.STOPPED
        with pytest.raises(RunStoppedError):
            await asyncio.wait_for(handle.result(), BOUND)
    assert "Done" not in g.ran


# A sync step on the memory store never yields to the loop: no stop could come in.
@pytest.mark.parametrize(
    ("kind", "step_kind"),
    [("memory", "async"), ("sqlite", "async"), ("sqlite", "sync"), ("redis", "async"), ("redis", "sync")],
)
async def test_stop_while_commits_are_in_flight_returns_promptly(make_store, kind, step_kind) -> None:
    """A stop that cancels a commit whose write landed must still be recorded at once."""
    store = make_store(kind)
    laps = collections.Counter[str]()

    async def lap_async(ctx):
        laps[ctx.run_id] += 1
        await asyncio.sleep(0)
        return "Lap"

    def lap_sync(ctx):
        laps[ctx.run_id] += 1
        return "Lap"

    lap = lap_async if step_kind == "async" else lap_sync
    wf = Workflow("Laps").flow({START: lambda ctx: "Lap", "Lap": lap}).max_steps(1_000_000)
    async with WorkflowRunner(wf, store=store, lease_ttl=10) as runner:
        for _ in range(5):
            handle = await runner.run()
            await wait_until(lambda h=handle: laps[h.run_id] >= 5, what="five laps")
            started = time.monotonic()
            await asyncio.wait_for(handle.stop(), BOUND)
            assert time.monotonic() - started < BOUND
            assert (await handle.info()).status == RunStatus.STOPPED


# -- stop and pause around the step that returns a gate ---------------------------------


async def test_stop_while_the_gate_is_being_committed_ends_stopped(store) -> None:
    replies = Replies(store)
    g = Gated()
    async with WorkflowRunner(g.workflow(), store=replies, lease_ttl=10) as runner:  # type: ignore[arg-type]
        handle = await runner.run()
        await asyncio.wait_for(g.started.wait(), BOUND)
        replies.slow = 0.2  # the gate is committed; its reply is on its way when the stop comes
        g.release.set()
        await asyncio.wait_for(replies.applied.wait(), BOUND)
        assert (await store.get(handle.run_id)).status == RunStatus.WAITING
        await asyncio.wait_for(handle.stop(), BOUND)
        info = await handle.info()
        assert info.status == RunStatus.STOPPED and info.pending is None
        with pytest.raises(RunStoppedError):
            await asyncio.wait_for(handle.result(), BOUND)


async def test_stop_from_another_runner_during_the_step_that_returns_a_gate(store) -> None:
    g = Gated()
    g.hold = lambda ctx: _control(store, ctx.run_id, "stop")  # returns the gate once asked to stop
    wf = g.workflow()
    async with (
        WorkflowRunner(wf, store=store, lease_ttl=10) as owner,
        WorkflowRunner(wf, store=store, lease_ttl=10) as other,
    ):
        handle = await owner.run()
        await asyncio.wait_for(g.started.wait(), BOUND)
        remote = await other.attach(handle.run_id)
        started = time.monotonic()
        await asyncio.wait_for(remote.stop(), BOUND)  # well within the lease (10 s)
        assert time.monotonic() - started < BOUND
        info = await remote.info()
        assert info.status == RunStatus.STOPPED, info
        assert info.pending is None
    assert "Done" not in g.ran


async def test_a_pause_just_before_a_gate_is_kept_until_the_decision(store) -> None:
    g = Gated()
    async with WorkflowRunner(g.workflow(), store=store, lease_ttl=10) as runner:
        handle = await runner.run()
        await asyncio.wait_for(g.started.wait(), BOUND)
        pausing = asyncio.create_task(handle.pause())
        await asyncio.sleep(0)
        g.release.set()
        await asyncio.wait_for(pausing, BOUND)  # waiting at a gate counts as parked
        assert (await handle.info()).status == RunStatus.WAITING
        await runner.approve(handle.run_id, by="ops")
        info = await asyncio.wait_for(_settled(handle), BOUND)
        assert (info.status, info.step) == (RunStatus.PAUSED, "Done")
        assert g.ran == ["Work"]
        await handle.resume()
        assert (await asyncio.wait_for(handle.result(), BOUND)).output == "done"
    assert g.ran == ["Work", "Done"]


async def test_a_pause_from_another_runner_just_before_a_gate_is_kept(store) -> None:
    g = Gated()
    g.hold = lambda ctx: _control(store, ctx.run_id, "pause")  # returns the gate once asked to pause
    wf = g.workflow()
    async with (
        WorkflowRunner(wf, store=store, lease_ttl=10) as owner,
        WorkflowRunner(wf, store=store, lease_ttl=10) as other,
    ):
        handle = await owner.run()
        await asyncio.wait_for(g.started.wait(), BOUND)
        remote = await other.attach(handle.run_id)
        await asyncio.wait_for(remote.pause(), BOUND)
        assert (await remote.info()).status == RunStatus.WAITING
        await other.approve(handle.run_id, by="ops")
        info = await asyncio.wait_for(_settled(remote), BOUND)
        assert (info.status, info.step) == (RunStatus.PAUSED, "Done")
        assert g.ran == ["Work"]
        await remote.resume()
        assert (await asyncio.wait_for(remote.result(), BOUND)).output == "done"
    assert g.ran == ["Work", "Done"]


async def _settled(handle: Any) -> Any:
    """The run's info once it is neither running nor waiting."""
    while True:
        info = await handle.info()
        if info.status not in (RunStatus.RUNNING, RunStatus.WAITING):
            return info
        await asyncio.sleep(0.005)


# -- a dead owner ------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("control", ["pause", "stop"])
@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
async def test_a_control_asked_while_the_owner_is_dead_is_honoured_by_recover(
    kind, control, tmp_path, request
) -> None:
    import crashflows

    target = _target(kind, tmp_path, request)
    log = tmp_path / "steps.log"
    run_id = f"dead-{control}"
    first = _spawn("start", "linear", kind, target, log, run_id, block=True)
    _wait_for(log, lambda ls: ("start", "C", first.pid) in ls, first)
    _kill(first)  # its lease (1 s) still runs when the control is asked for

    crashflows.LOG = str(log)
    async with WorkflowRunner(crashflows.flows(kind, target)["linear"]) as runner:
        handle = await runner.attach(run_id)
        asking = asyncio.create_task(getattr(handle, control)())
        async with asyncio.timeout(BOUND):
            while not asking.done():  # recover as soon as the dead owner's lease runs out
                await runner.recover()
                await asyncio.sleep(0.05)
        await asking
        info = await handle.info()
        want = RunStatus.PAUSED if control == "pause" else RunStatus.STOPPED
        assert info.status == want, info
        await asyncio.sleep(0.3)  # a resumed run would have finished C and D by now
        assert (await handle.info()).status == want
        starts = collections.Counter(name for what, name, _ in _lines(log) if what == "start")
        assert (starts["C"], starts["D"]) == (1, 0)
        if control == "pause":
            await handle.resume()
            assert (await handle.result(timeout=10)).status == RunStatus.COMPLETED
            ends = collections.Counter(name for what, name, _ in _lines(log) if what == "end")
            assert (ends["C"], ends["D"]) == (1, 1)


async def test_a_pause_of_a_run_whose_owner_is_gone_returns_without_a_recoverer(store) -> None:
    g = Gated(gate=False)
    owner = WorkflowRunner(g.workflow(), store=store, lease_ttl=10)
    handle = await owner.run()
    await asyncio.wait_for(g.started.wait(), BOUND)
    await owner.close()  # its run stays running, recoverable, with nobody advancing it
    async with WorkflowRunner(g.workflow(), store=store, lease_ttl=10) as other:
        remote = await other.attach(handle.run_id)
        await asyncio.wait_for(remote.pause(), BOUND)
        info = await remote.info()
        assert (info.status, info.step) == (RunStatus.PAUSED, "Work")
        assert await other.recover() == []
        g.release.set()
        await remote.resume()  # the step it was in runs again
        assert (await asyncio.wait_for(remote.result(), BOUND)).output == "done"
    assert g.ran == ["Work", "Work", "Done"]


# -- lost replies ------------------------------------------------------------------------


def _gate_flow(quorum: int) -> Workflow:
    def done(ctx):
        return Next(END, output=[d.by for d in [ctx.decision] if d])

    return Workflow("Lost").flow(
        {
            START: lambda ctx: Wait(HumanApproval(approvers=["a", "b"], quorum=quorum), "Done"),
            "Done": done,
        }
    )


async def test_an_approve_whose_reply_is_lost_returns_and_counts_once(store) -> None:
    lossy = Replies(store)
    async with WorkflowRunner(_gate_flow(quorum=2), store=lossy) as runner:  # type: ignore[arg-type]
        handle = await runner.run()
        await wait_status(handle, RunStatus.WAITING)
        lossy.lose["update"] = 1
        await asyncio.wait_for(runner.approve(handle.run_id, by="a"), BOUND)
        assert lossy.lost == ["update"]
        info = await handle.info()
        assert info.status == RunStatus.WAITING
        assert [d.by for d in info.decisions] == ["a"]
        assert info.pending is not None and info.pending.votes == ("a",)
        await runner.approve(handle.run_id, by="b")
        result = await asyncio.wait_for(handle.result(), BOUND)
        kinds = [e.kind for e in await all_events(handle)]
    assert result.output == ["b"]
    assert kinds.count("decided") == 2


async def test_an_approve_whose_reply_is_lost_moves_the_run_on_here(store) -> None:
    lossy = Replies(store)
    async with WorkflowRunner(_gate_flow(quorum=1), store=lossy) as runner:  # type: ignore[arg-type]
        handle = await runner.run()
        await wait_status(handle, RunStatus.WAITING)
        lossy.lose["update"] = 1
        decided = await asyncio.wait_for(runner.approve(handle.run_id, by="a"), BOUND)
        assert lossy.lost == ["update"]
        result = await asyncio.wait_for(decided.result(), BOUND)  # advanced by this runner
        kinds = [e.kind for e in await all_events(handle)]
    assert result.output == ["a"]
    assert kinds.count("decided") == 1 and kinds[-1] == "completed"


async def test_a_commit_whose_reply_is_lost_is_applied_once_despite_another_writer(store) -> None:
    """The retried commit is recognised by its number even after a pause request touched the run."""
    from agentflow.stores.contract import Change

    lossy = Replies(store)
    release = asyncio.Event()

    async def first(ctx):
        lossy.lose["commit"] = 1  # the commit that completes this step loses its reply
        return Next("Second", output="one")

    async def second(ctx):
        await release.wait()
        return Next(END, output="two")

    async def meddle(run_id: str) -> None:
        # Another writer (a pause request, withdrawn) touches the record between the
        # lost reply and the retry.
        def touch(rec: Any, now: float) -> Change:
            import dataclasses

            return Change(dataclasses.replace(rec, control=None))

        await store.update(run_id, touch)

    original = lossy.commit

    async def commit(run_id: str, lease: Any, commit: Any) -> Any:
        try:
            return await original(run_id, lease, commit)
        except StoreError:
            await meddle(run_id)
            raise

    lossy.commit = commit  # type: ignore[method-assign]
    wf = Workflow("LostCommit").flow({START: first, "Second": second})
    async with WorkflowRunner(wf, store=lossy) as runner:  # type: ignore[arg-type]
        handle = await runner.run()
        await wait_until(lambda: bool(lossy.lost), what="the lost reply")
        release.set()
        result = await asyncio.wait_for(handle.result(), BOUND)
        loaded = await store.load(handle.run_id)
        events = await store.events(handle.run_id)
    assert result.output == "two"
    assert [o.step for o in loaded.outputs] == ["__start__", "Second"]
    kinds = [e.kind for e in events]
    assert kinds.count("step_completed") == 2 and kinds.count("completed") == 1
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


# -- a store outage ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_a_redis_outage_mid_run_does_not_fail_the_run(redis_server, make_store) -> None:
    store = make_store("redis")
    g = Gated(gate=False)
    async with WorkflowRunner(g.workflow("Outage"), store=store) as runner:
        handle = await runner.run()
        finishing = asyncio.create_task(handle.result())
        await asyncio.wait_for(g.started.wait(), BOUND)
        await asyncio.to_thread(redis_server.stop)
        try:
            g.release.set()  # the step's completion meets the outage
            await asyncio.sleep(12)
            assert not finishing.done(), "the run ended during the outage"
        finally:
            await asyncio.to_thread(redis_server.start)
        result = await asyncio.wait_for(finishing, 30)
        assert result.status == RunStatus.COMPLETED and result.output == "done"
        info = await handle.info()
        kinds = [e.kind for e in await all_events(handle)]
    assert info.status == RunStatus.COMPLETED
    assert kinds.count("step_completed") == 3 and "failed" not in kinds
    assert g.ran == ["Work", "Done"]


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_a_run_left_by_a_redis_outage_is_recovered_by_another_runner(redis_server, make_store) -> None:
    g = Gated(gate=False)
    wf = g.workflow("Outage")
    first = WorkflowRunner(wf, store=make_store("redis"), lease_ttl=2.0)
    handle = await first.run()
    await asyncio.wait_for(g.started.wait(), BOUND)
    await asyncio.to_thread(redis_server.stop)
    try:
        g.release.set()
        await asyncio.sleep(1)
        async with asyncio.timeout(5):
            await first.close()  # the process goes away while the store is out of reach
        await asyncio.sleep(11)
    finally:
        await asyncio.to_thread(redis_server.start)
    async with WorkflowRunner(wf, store=make_store("redis"), lease_ttl=2.0) as second:
        async with asyncio.timeout(20):
            while True:
                if handles := await second.recover():
                    break
                await asyncio.sleep(0.2)
        result = await handles[0].result(timeout=20)
    assert result.status == RunStatus.COMPLETED and handles[0].run_id == handle.run_id
