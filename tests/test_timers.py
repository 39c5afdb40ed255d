"""Durable timers: Wait(Sleep(...), target) on memory, SQLite and Redis (SPEC section 13, last bullet)."""

from __future__ import annotations

import asyncio
import collections
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import StoreFactory
from helpers import all_events, other_tasks, wait_status, wait_until
from pydantic import BaseModel

from agentflow import (
    END,
    START,
    InvalidStateError,
    Next,
    RunStatus,
    RunStoppedError,
    Sleep,
    UnknownStepError,
    Wait,
    Workflow,
    WorkflowDefinitionError,
    WorkflowRunner,
)
from agentflow.stores.contract import Store

KINDS = ["memory", "sqlite", "redis", "postgres"]


class Progress(BaseModel):
    before: str = ""
    after: str = ""


def napping(calls: collections.Counter[str], seconds: float | timedelta = 0.3, name: str = "Nap") -> Workflow:
    """START sets the state and sleeps; After runs once the timer is due and ends the run."""

    def start(ctx):
        calls["Start"] += 1
        ctx.set_state(before="set before the nap")
        return Wait(Sleep(seconds), "After")

    def after(ctx):
        calls["After"] += 1
        ctx.set_state(after="done")
        return Next(END, output=ctx.state.before)

    return Workflow(name).state(Progress).flow({START: start, "After": after})


def shared(make_store: StoreFactory, kind: str, first: Store) -> Store:
    """Another store on the same data (as another process would open; memory: the same one)."""
    return first if kind == "memory" else make_store(kind)


async def record(store: Store, run_id: str):
    rec = await store.get(run_id)
    assert rec is not None
    return rec


def test_sleep_takes_seconds_or_a_timedelta_and_refuses_the_rest() -> None:
    assert Sleep(5).seconds == 5.0
    assert Sleep(timedelta(minutes=2)).seconds == 120.0
    for bad in (0, -1, timedelta(0)):
        with pytest.raises(WorkflowDefinitionError, match="Sleep duration must be positive"):
            Sleep(bad)
    for bad in ("5", None, True):
        with pytest.raises(WorkflowDefinitionError, match="seconds or a timedelta"):
            Sleep(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_sleeping_run_parks_without_a_task_and_goes_on_at_target_when_due(kind, make_store) -> None:
    calls: collections.Counter[str] = collections.Counter()
    store = make_store(kind)
    async with WorkflowRunner(napping(calls, seconds=0.5), store=store) as runner:
        started = time.time()
        handle = await runner.run()
        info = await wait_status(handle, RunStatus.WAITING)
        rec = await record(store, handle.run_id)
        assert rec.pending["kind"] == "sleep"
        assert rec.pending["target"] == "After"
        assert started + 0.5 <= rec.pending["deadline"] <= time.time() + 0.5
        assert info.step == START and calls == {"Start": 1}
        assert handle.run_id not in runner.supervisor.local
        assert not [t for t in asyncio.all_tasks() if handle.run_id in t.get_name()]
        result = await handle.result(timeout=5)
        woke = time.time()
    assert woke - started >= 0.5
    assert result.status == RunStatus.COMPLETED
    assert result.output == "set before the nap"
    assert result.state == Progress(before="set before the nap", after="done")
    assert calls == {"Start": 1, "After": 1}


@pytest.mark.parametrize("kind", KINDS)
async def test_a_sleep_emits_waiting_with_the_due_time_then_resumed_and_step_started(
    kind, make_store
) -> None:
    async with WorkflowRunner(napping(collections.Counter(), seconds=0.2), store=make_store(kind)) as runner:
        handle = await runner.run()
        events = await all_events(handle)
    kinds = [(e.kind, e.step) for e in events]
    at = kinds.index(("waiting", START))
    assert kinds[at : at + 3] == [("waiting", START), ("resumed", START), ("step_started", "After")]
    waiting, resumed = events[at], events[at + 1]
    assert waiting.data["kind"] == "sleep" and waiting.data["seconds"] == 0.2
    deadline = waiting.data["deadline"]
    assert abs(deadline - (waiting.at + 0.2)) < 0.05
    assert resumed.data["timer"] is True and resumed.data["deadline"] == deadline
    assert resumed.at >= deadline
    assert kinds[-1] == ("completed", None)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_timer_due_while_no_process_served_the_store_fires_when_a_runner_starts(
    kind, make_store
) -> None:
    calls: collections.Counter[str] = collections.Counter()
    store = make_store(kind)
    first = WorkflowRunner(napping(calls, seconds=0.2), store=store)
    handle = await first.run()
    await wait_status(handle, RunStatus.WAITING)
    await first.close()
    await asyncio.sleep(0.4)  # due now, and nobody is serving the workflow
    rec = await record(store, handle.run_id)
    assert rec.status == RunStatus.WAITING and calls["After"] == 0

    # A runner that is only entered (no run, no recover) picks the due timer up.
    async with WorkflowRunner(napping(calls, seconds=0.2), store=shared(make_store, kind, store)) as second:
        await wait_until(lambda: calls["After"] == 1, what="the timer to fire in the new runner")
        result = await (await second.attach(handle.run_id)).result(timeout=5)
    assert result.output == "set before the nap"
    assert calls == {"Start": 1, "After": 1}


@pytest.mark.parametrize("kind", KINDS)
async def test_recover_fires_timers_that_came_due(kind, make_store) -> None:
    calls: collections.Counter[str] = collections.Counter()
    store = make_store(kind)
    async with WorkflowRunner(napping(calls, seconds=0.1), store=store) as first:
        handle = await first.run()
        await wait_status(handle, RunStatus.WAITING)
        await first.supervisor.timers.close()  # this process stops serving timers
        await asyncio.sleep(0.3)
        assert calls["After"] == 0
        runner = WorkflowRunner(napping(calls, seconds=0.1), store=shared(make_store, kind, store))
        try:
            await runner.recover()
            # Fired here: by recover() or by this runner's own sweeper, which starts with it
            # and may win the race on a store whose calls wait for the network (then the
            # run's next step starts just after recover() returns).
            await wait_until(lambda: calls["After"] == 1, what="the timer to fire in this runner")
            assert (await runner.attach(handle.run_id)).run_id == handle.run_id
            result = await (await runner.attach(handle.run_id)).result(timeout=5)
        finally:
            await runner.close()
    assert result.status == RunStatus.COMPLETED


@pytest.mark.parametrize("kind", KINDS)
async def test_two_runners_serving_one_store_fire_a_timer_once(kind, make_store) -> None:
    calls: collections.Counter[str] = collections.Counter()
    store = make_store(kind)
    runners = [
        WorkflowRunner(napping(calls, seconds=0.3), store=shared(make_store, kind, store)) for _ in range(3)
    ]
    try:
        handles = [await runners[i % 3].run() for i in range(12)]
        for h in handles:
            await wait_status(h, RunStatus.WAITING)
        for r in runners:
            await r.recover()  # every runner sweeps, and will keep sweeping
        results = [await runners[0]._result(h.run_id, 5) for h in handles]
        for h in handles:
            events = await all_events(await runners[1].attach(h.run_id))
            assert [e.kind for e in events].count("resumed") == 1
    finally:
        for r in runners:
            await r.close()
    assert all(r.status == RunStatus.COMPLETED for r in results)
    assert calls == {"Start": 12, "After": 12}


@pytest.mark.parametrize("kind", KINDS)
async def test_pause_asked_while_sleeping_parks_the_run_at_target_when_due(kind, make_store) -> None:
    calls: collections.Counter[str] = collections.Counter()
    store = make_store(kind)
    async with WorkflowRunner(napping(calls, seconds=0.2), store=store) as runner:
        handle = await runner.run()
        await wait_status(handle, RunStatus.WAITING)
        await handle.pause()
        info = await wait_status(handle, RunStatus.PAUSED)
        assert info.step == "After" and calls["After"] == 0
        assert (await record(store, handle.run_id)).pending is None
        await handle.resume()
        result = await handle.result(timeout=5)
    assert result.status == RunStatus.COMPLETED
    assert calls == {"Start": 1, "After": 1}


@pytest.mark.parametrize("kind", KINDS)
async def test_stop_while_sleeping_ends_the_run_and_the_timer_never_fires(kind, make_store) -> None:
    calls: collections.Counter[str] = collections.Counter()
    store = make_store(kind)
    async with WorkflowRunner(napping(calls, seconds=0.2), store=store) as runner:
        handle = await runner.run()
        await wait_status(handle, RunStatus.WAITING)
        await handle.stop()
        await asyncio.sleep(0.5)
        await runner.recover()
        with pytest.raises(RunStoppedError):
            await handle.result(timeout=1)
        assert await store.due_gates("Nap", time.time()) == []
    assert calls == {"Start": 1}


async def test_a_sleeping_run_cannot_be_decided(make_store: StoreFactory) -> None:
    async with WorkflowRunner(
        napping(collections.Counter(), seconds=30), store=make_store("memory")
    ) as runner:
        handle = await runner.run()
        await wait_status(handle, RunStatus.WAITING)
        with pytest.raises(InvalidStateError, match=rf"run {handle.run_id} is sleeping at step '__start__'"):
            await handle.approve(by="anyone")
        assert (await handle.info()).status == RunStatus.WAITING
        await handle.stop()


async def test_a_sleep_whose_target_is_not_a_step_fails_before_sleeping() -> None:
    wf = Workflow("BadNap").flow({START: lambda ctx: Wait(Sleep(1), "Nowhere")})
    async with WorkflowRunner(wf) as runner:
        handle = await runner.run()
        with pytest.raises(Exception) as err:
            await handle.result(timeout=5)
    assert err.value.error_type == UnknownStepError.__name__
    assert "'Nowhere'" in err.value.message


async def test_many_sleeping_runs_hold_no_task_and_nothing_in_the_process() -> None:
    calls: collections.Counter[str] = collections.Counter()
    baseline = set(asyncio.all_tasks())
    async with WorkflowRunner(napping(calls, seconds=60), lease_ttl=0.3) as runner:
        handles = [await runner.run() for _ in range(200)]
        for h in handles:
            await wait_status(h, RunStatus.WAITING)
        assert runner.supervisor.local == {}
        # The runner's own sweeper is all that is left: nothing per run.
        await wait_until(
            lambda: {t.get_name() for t in other_tasks(baseline)} <= {"agentflow:timers:Nap"},
            what="the runs' tasks to end",
        )
        for h in handles:
            await h.stop()
    assert calls == {"Start": 200}


# -- a timer due while its process is dead --------------------------------------------------


def _spawn_timer(cmd: str, kind: str, target: str, log: Path, run_id: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("timerflows.py")), cmd, kind, target, str(log), run_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
async def test_a_timer_due_while_its_process_was_killed_fires_once_with_two_recoverers(
    kind, tmp_path, request
) -> None:
    target = str(tmp_path / "timers.db") if kind == "sqlite" else request.getfixturevalue(f"{kind}_url")
    log = tmp_path / "timer.log"
    first = _spawn_timer("start", kind, target, log, "nap-1")
    assert first.stdout is not None
    line = await asyncio.to_thread(first.stdout.readline)
    assert line.strip() == "waiting", first.communicate()
    first.send_signal(signal.SIGKILL)
    first.communicate()

    store = make_crash_store(kind, target)
    try:
        rec = await record(store, "nap-1")
        assert rec.status == RunStatus.WAITING and rec.pending["kind"] == "sleep"
        await asyncio.sleep(max(0.0, rec.pending["deadline"] - time.time()) + 0.3)  # due, nobody alive
        assert (await record(store, "nap-1")).status == RunStatus.WAITING

        racers = [_spawn_timer("recover", kind, target, log, "nap-1") for _ in range(2)]
        outs = [await asyncio.to_thread(p.communicate, timeout=90) for p in racers]
        for p, (out, err) in zip(racers, outs, strict=True):
            assert p.returncode == 0, f"recovering process failed:\n{out}\n{err}"
        runner_pid = {int(out.split()[-1]) for out, _ in outs}
        events = await store.events("nap-1")
    finally:
        await store.close()
    lines = log.read_text().split("\n")
    assert [ln.split()[1] for ln in lines if ln] == ["Nap", "After"]  # the timer fired once
    after_pid = int(next(ln for ln in lines if ln.startswith("start After")).split()[2])
    assert runner_pid == {after_pid} and after_pid in {p.pid for p in racers}
    assert [e.kind for e in events].count("resumed") == 1
    assert [e.kind for e in events][-1] == "completed"


def make_crash_store(kind: str, target: str) -> Store:
    if kind == "sqlite":
        from agentflow.stores import SqliteStore

        return SqliteStore(target)
    if kind == "postgres":
        from agentflow.stores.postgres import PostgresStore

        return PostgresStore(target)
    from agentflow.stores.redis import RedisStore

    return RedisStore(target)


@pytest.mark.parametrize("kind", KINDS)
async def test_ctx_wait_sleep_in_imperative_code_parks_and_goes_on_after_the_timer(kind, make_store) -> None:
    calls: collections.Counter[str] = collections.Counter()

    def fetch() -> str:
        calls["fetch"] += 1
        return "page"

    def publish(page: str) -> str:
        calls["publish"] += 1
        return f"published {page}"

    async def main(ctx):
        page = await ctx.step("fetch", fetch)
        woke = await ctx.wait(Sleep(0.3))
        assert woke.approved and woke.by is None
        return await ctx.step("publish", publish, page)

    store = make_store(kind)
    wf = Workflow("ImperativeNap").execute(main)
    async with WorkflowRunner(wf, store=store) as first:
        handle = await first.run()
        await wait_status(handle, RunStatus.WAITING)
        assert (await record(store, handle.run_id)).pending["kind"] == "sleep"
    await asyncio.sleep(0.4)  # due while no runner is open
    async with WorkflowRunner(wf, store=shared(make_store, kind, store)) as second:
        result = await (await second.attach(handle.run_id)).result(timeout=5)
        events = await all_events(await second.attach(handle.run_id))
    assert result.output == "published page"
    assert calls == {"fetch": 1, "publish": 1}
    assert [e.kind for e in events].count("waiting") == 1  # the replay did not sleep again
